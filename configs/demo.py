"""The embedded demo: the whole DE-MKD pipeline on a small real dataset that needs no download.

scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), upsampled to 32x32 RGB:
three resnet14 teachers are trained at once (one compiled step), then a resnet8 student is distilled
from them with DE-MKD (entropy-weighted DKD + the feature term). A few minutes on 2 CPU cores.

    python -m demkd_jax.main --config configs/demo.py --workdir /tmp/demo
"""

from demkd_jax.config import base_config


def get_config():
    config = base_config()
    config.data.source = "digits"
    config.data.name = "digits"
    config.data.num_classes = 10
    config.student.model = "resnet8"
    config.student.width = 0.5
    config.teachers.model = "resnet14"
    config.teachers.num = 3
    config.teachers.num_epochs = 6
    config.distill.method = "demkd"
    config.distill.features = True
    config.distill.warmup_epochs = 2
    config.distill.beta = 2.0  # docs/method.md §3: beta = 2 for the small ResNet pairs
    config.num_epochs = 6
    config.batch_size = 64
    config.eval_batch_size = 120
    config.optim.learning_rate = 0.05
    config.optim.lr_decay_epochs = (4, 5)
    config.log_every_steps = 10
    return config
