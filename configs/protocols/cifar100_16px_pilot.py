"""Pilot of the CIFAR-100 16 px comparison: a CPU-scale proxy, not the paper's protocol.

    mkdir -p runs/pilot16 && nohup python -m demkd_jax.reproduce --no-progress \
      --protocol configs/protocols/cifar100_16px_pilot.py --workdir runs/pilot16 > runs/pilot16/reproduce.log 2>&1 &

CIFAR-100 (official split) 2x2 mean-pooled to 16x16 on load, crop padding 2 + flip, statistics from the
pooled data. 3 x resnet14 teachers (independent initialisations and data orders), 15 epochs; resnet8
students, 15 epochs, 3 seeds in one graph, one data seed; lr 0.05, x0.1 at the lineage's 150/180/210 of 240
scaled to 15 epochs; KD warm-up 2 (epoch 1 at half weight); beta 2. Methods: CE, AVER, DKD with uniform
weights, DE-MKD logits-only, DE-MKD with features. Gates: distillation beats CE by >= 2 points, the teacher
ensemble beats its best member by >= 1. It measures the seed-to-seed spread that sizes the main run.
"""

from demkd_jax.reproduce import cifar100_16px_data, protocol_template, scaled_decay


def get_config():
    p = protocol_template()
    p.name = "cifar100_16px_pilot"
    p.description = ("A proxy at CPU scale, not the paper's protocol: CIFAR-100 mean-pooled to 16x16, "
                     "3 x resnet14 teachers and resnet8 students, 15 epochs each.")
    p.data = cifar100_16px_data()
    p.batch_size = 64
    p.teachers.update({"model": "resnet14", "num": 3, "epochs": 15, "lr_decay_epochs": scaled_decay(15),
                       "seed": 1000})
    # Independent data orders for the teachers trained side by side.
    p.teachers.overrides = (("data_order", "per_replica"),)
    p.students.update({"model": "resnet8", "epochs": 15, "seeds": 3, "data_seeds": (0,),
                       "lr_decay_epochs": scaled_decay(15), "warmup_epochs": 2, "beta": 2.0})
    p.methods = ("ce", "aver", "dkd_uniform", "demkd_logits", "demkd")
    p.primary = "demkd"
    p.baselines = ("aver", "dkd_uniform")
    p.positive_control = ()
    p.gates.distill_over_ce = 2.0
    p.gates.ensemble_over_best = 1.0
    return p
