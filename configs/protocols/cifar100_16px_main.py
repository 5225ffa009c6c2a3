"""Main run of the CIFAR-100 16 px comparison: a CPU-scale proxy, not the paper's protocol.

    mkdir -p runs/main16 && nohup python -m demkd_jax.reproduce --no-progress \
      --protocol configs/protocols/cifar100_16px_main.py --workdir runs/main16 > runs/main16/reproduce.log 2>&1 &

CIFAR-100 (official split) 2x2 mean-pooled to 16x16 on load, crop padding 2 + flip, statistics from the
pooled data. 3 x resnet20 teachers (independent initialisations and data orders), 30 epochs; resnet8
students, 30 epochs, lr 0.05 x0.1 at 19/22/26, KD warm-up 2 (epoch 1 at half weight), beta 2; 3 student
seeds in one graph x 2 data seeds = 6 matched pairs per method. Decided before the runs: final-epoch top-1;
DE-MKD (with features, lambda 50) against each baseline by the paired difference, 95 % t-intervals
Holm-corrected over the baselines; "wins" if the lower bound > 0, "does not win" if the upper bound < +0.3.
DE-MKD with CA-MKD's 1/K teacher reduction is a declared secondary (not in the Holm family). Positive
control: single-teacher DKD beats KD. Every piece resumes from its checkpoints; a rerun skips finished ones.
"""

from demkd_jax.reproduce import cifar100_16px_data, protocol_template


def get_config():
    p = protocol_template()
    p.name = "cifar100_16px_main"
    p.description = ("A proxy at CPU scale, not the paper's protocol: CIFAR-100 mean-pooled to 16x16, "
                     "3 x resnet20 teachers and resnet8 students, 30 epochs each, 6 matched pairs per method.")
    p.data = cifar100_16px_data()
    p.batch_size = 64
    p.teachers.update({"model": "resnet20", "num": 3, "epochs": 30, "lr_decay_epochs": (19, 22, 26),
                       "seed": 1000})
    p.teachers.overrides = (("data_order", "per_replica"),)
    p.students.update({"model": "resnet8", "epochs": 30, "seeds": 3, "data_seeds": (0, 1),
                       "lr_decay_epochs": (19, 22, 26), "warmup_epochs": 2, "beta": 2.0})
    p.methods = ("kd", "dkd", "aver", "ebkd", "camkd", "fitnet_mkd", "dkd_uniform", "demkd_logits", "demkd",
                 "demkd_mean")
    p.primary = "demkd"
    p.baselines = ("kd", "dkd", "aver", "ebkd", "camkd", "fitnet_mkd", "dkd_uniform")
    p.positive_control = ("dkd", "kd")
    return p
