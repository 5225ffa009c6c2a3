"""DE-MKD, 3 x wrn_40_2 -> ShuffleV2 on CIFAR-100 (docs/method.md §3: lr 0.01 for ShuffleNets, beta 8)."""

from demkd_jax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "tfds"
    config.data.name = "cifar100"
    config.data.num_classes = 100
    config.student.model = "ShuffleV2"
    config.teachers.model = "wrn_40_2"
    config.teachers.num = 3
    config.teachers.learning_rate = 0.05  # teachers keep the default recipe; only the student uses 0.01
    config.distill.method = "demkd"
    config.distill.features = True
    config.distill.beta = 8.0
    config.optim.learning_rate = 0.01
    return config
