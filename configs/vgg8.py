"""DE-MKD, 3 x vgg13 -> vgg8 on CIFAR-100: the paper's headline pair (docs/method.md §2-3).

Without teacher checkpoints the run first trains the three vgg13 teachers (same recipe, seeds 1000..1002)
in <workdir>/teachers. Bring your own with
``--config.teachers.checkpoints="('t0', 't1', 't2')"`` (directories from a teachers_vgg13.py run or from
``python -m demkd_jax.convert``).
"""

from demkd_jax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "tfds"
    config.data.name = "cifar100"
    config.data.num_classes = 100
    config.student.model = "vgg8"
    config.teachers.model = "vgg13"
    config.teachers.num = 3
    config.distill.method = "demkd"
    config.distill.features = True
    config.distill.beta = 6.0  # docs/method.md §3: beta = 6 for VGG13 -> VGG8
    config.optim.learning_rate = 0.05
    config.num_epochs = 240
    config.batch_size = 64
    return config
