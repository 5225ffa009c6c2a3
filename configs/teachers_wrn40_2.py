"""Three wrn_40_2 teachers for CIFAR-100 trained at once (one compiled step), each saved as a teacher checkpoint.

Outputs <workdir>/teacher_{0,1,2}; point a distillation config at them with
``--config.teachers.checkpoints="('<workdir>/teacher_0', '<workdir>/teacher_1', '<workdir>/teacher_2')"``.
"""

from demkd_jax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "tfds"
    config.data.name = "cifar100"
    config.data.num_classes = 100
    config.distill.method = "ce"
    config.ensemble_size = 3
    config.student.model = "wrn_40_2"
    config.optim.learning_rate = 0.05
    return config
