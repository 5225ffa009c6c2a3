"""Configuration: the base ``ml_collections.ConfigDict`` every ``configs/*.py`` starts from, with its fields.

Defaults follow docs/method.md §3 (the CRD/CA-MKD CIFAR-100 recipe). ``None`` (``distill.ce_weight``,
``distill.kd_weight``, ``optim.nesterov``) and ``-1`` (``distill.warmup_epochs``) mean the method's own value
from the table in :mod:`demkd_jax.methods`. This module imports nothing else of the package; the checks of a
config live in :mod:`demkd_jax.validation`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

WEIGHT_SCHEMES = ("camkd", "softmax", "ebkd", "uniform")
DATA_ORDERS = ("auto", "shared", "per_replica")
EXECUTIONS = ("auto", "vmap", "loop")
WINOGRAD_MODES = ("auto", "on", "off")
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and what was expected."""


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run, with its default (the sub-configs' fields are listed by their builders)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dtype = "float32"  # computation dtype; parameters, optimizer state and loss reductions stay float32
    config.num_epochs = 240
    config.batch_size = 64
    config.eval_batch_size = 500
    # Independent students (different init seeds, same teachers, same data order) trained in one step.
    config.num_seeds = 1
    # Teacher training (method "ce"): train this many models at once and write each as a teacher checkpoint.
    config.ensemble_size = 0
    config.execution = "auto"  # how the seed/ensemble axis runs: vmap, loop (unrolled), or auto (by backend)
    # Data order and augmentation of the replicas: "shared" (one stream, keyed by the seed), "per_replica" (an
    # independent stream per model: a teacher ensemble of independently trained members), "auto" (per_replica
    # for a teacher ensemble, shared otherwise: students share the teachers' forward, so they share the batch).
    config.data_order = "auto"
    config.data = default_data_config()
    # winograd: "on" computes the 3x3 convolutions where it pays (models/winograd.py: many channels, small maps)
    # as Winograd F(2x2, 3x3) (same parameters, equal up to float rounding), "off" never, "auto" on the CPU
    # backend in float32 only (accelerator libraries choose their own convolution algorithms).
    config.student = ml_collections.ConfigDict({"model": "vgg8", "width": 1.0, "winograd": "auto"})
    config.teachers = _teachers_config()
    config.distill = _distill_config()
    config.optim = ml_collections.ConfigDict({
        "learning_rate": 0.05,
        "momentum": 0.9,
        "nesterov": config_dict.placeholder(bool),  # None: the method's reference (mdistiller's kd/dkd: False)
        "weight_decay": 5e-4,
        "lr_decay_epochs": (150, 180, 210),
        "lr_decay_rate": 0.1,
    })
    config.checkpoint = _checkpoint_config()
    # Data parallelism (demkd_jax/parallel.py): the "data" mesh axis and where the on-device dataset lives.
    config.mesh = default_mesh_config()
    # jax.distributed.initialize(): "auto" (when launched as several processes: TPU pod, SLURM, MPI,
    # JAX_COORDINATOR_ADDRESS), "on" or "off".
    config.distributed = "auto"
    config.log_every_steps = 50
    config.on_nonfinite = "stop"  # "stop": halt before anything non-finite is saved; "skip": drop the step
    config.progress_bar = True
    return config


def _teachers_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "model": "",  # "" = read from the checkpoints; otherwise checked against them
        "checkpoints": (),  # directories written by the teacher trainer or demkd_jax.convert
        "execution": "auto",  # K teacher forwards: vmap, loop, or auto (by backend)
        "fold_bn": True,  # fold frozen teachers' BatchNorm into their convolutions
        "winograd": "auto",  # as student.winograd; also used when the teachers are trained first
        # When no checkpoints are given: train `num` teachers first (in <workdir>/teachers), then distil.
        "num": 3,
        "width": 1.0,
        "num_epochs": -1,  # -1: the student's num_epochs
        "learning_rate": -1.0,  # -1: the student's learning rate
    })


def _distill_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "method": "demkd",  # a name from demkd_jax.methods.METHODS
        "features": True,  # intermediate-feature term (demkd, camkd)
        "weights": "camkd",  # DE-MKD entropy weighting scheme (docs/method.md §2)
        "weight_temperature": 1.0,  # T_w of the entropy
        "weight_tau": 1.0,  # tau of the "softmax" scheme
        "temperature": 4.0,
        "alpha": 1.0,  # TCKD
        "beta": 8.0,  # NCKD
        "ce_weight": config_dict.placeholder(float),  # gamma; None: the method's (0.1 for kd, else 1)
        "kd_weight": config_dict.placeholder(float),  # weight of the logit term; None: the method's
        # DE-MKD (and dkd_uniform) over teachers: "sum" of the weighted per-teacher losses (the entropy weights sum
        # to 1, so the term has single-teacher DKD's scale, for which alpha/beta/warm-up were tuned) or "mean"
        # (that sum divided by K, CA-MKD's convention). The baselines use their references' reductions.
        "teacher_reduction": "sum",
        "feature_weight": 50.0,  # lambda
        "warmup_epochs": -1,  # -1: the method's (20 for the DKD-based methods, 0 otherwise)
        "feature_start_epoch": 2,  # the feature term is off in epoch 1
        "feature_warmup_epochs": 0,  # > 0: the feature term ramps up linearly over this many epochs from its start
        # CA-MKD's feature weights depend on the student (each teacher's head judges its projected feature); its
        # code lets the gradient flow through them (False). True makes them constants.
        "camkd_detach_feature_weights": False,
        "hint_layer": 2,  # FitNet-MKD: index into the feature list of student and teachers
        "hint_weight": 100.0,
    })


def _checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "every_epochs": 1,
        "keep_last": 2,
        "keep_best": True,
        # A corrupted checkpoint is moved aside to <step>.corrupt-<time> (True: deleted); the run resumes from the
        # newest good one. If none is good the run stops rather than silently starting over, unless this is True.
        "delete_corrupt": False,
        "restart_if_all_corrupt": False,
        # A resume whose result-changing fields (seed, hyperparameters, ...) differ from the workdir's config.json
        # is refused, naming them; True resumes with the new values (demkd_jax/workdir.py).
        "allow_config_change": False,
    })


def is_teacher_ensemble(config) -> bool:
    """A run that trains ``ensemble_size`` models with CE and exports them as teacher checkpoints."""
    return config.ensemble_size > 0


def num_replicas(config) -> int:
    """Models trained side by side in one step: the teacher ensemble, or the student seeds."""
    return int(config.ensemble_size if is_teacher_ensemble(config) else config.num_seeds)


def data_order(config) -> str:
    """``shared`` or ``per_replica`` (``auto`` resolved: per replica for a teacher ensemble)."""
    if config.data_order != "auto":
        return config.data_order
    return "per_replica" if is_teacher_ensemble(config) else "shared"


def default_data_config() -> ml_collections.ConfigDict:
    """The fields of ``config.data``, with their defaults.

    - ``source`` ("tfds"): ``tfds``, ``pickle``, ``folder``, ``npz`` or ``digits`` (:mod:`demkd_jax.data.sources`).
    - ``name`` ("cifar100"): the tfds dataset name; for ``pickle`` the archive's dataset (``cifar10`` or
      ``cifar100``, checked against its layout); for ``folder``/``npz`` a free label (``digits`` ignores it).
      With ``normalization="auto"`` the names ``cifar10``/``cifar100`` select the published statistics.
    - ``path`` (""): the local input of ``pickle`` (archive, extracted directory, or a directory holding one),
      ``folder`` (directory tree or tar archive) and ``npz`` (directory); relative to the current directory.
    - ``num_classes`` (100): labels must lie in ``[0, num_classes)``; ``-1`` takes the count from the data.
    - ``image_size`` (32): the required height = width (never resized; ``-1``: any); for ``digits`` the size
      the 8x8 images are upsampled to (a multiple of 8).
    - ``cache_dir`` (""), ``use_cache`` (True): where decoded datasets are cached as ``.npz``; ``""`` means
      ``$DEMKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/demkd_jax``, else ``~/.cache/demkd_jax``.
    - ``tfds_data_dir`` (""): tensorflow-datasets ``data_dir`` (``""``: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    - ``download`` (True): when ``tfds`` has no prepared ``cifar100``/``cifar10`` (preparing one needs
      TensorFlow), read the official python-pickle archive from the cache directory instead, downloading it
      there first if absent (once, MD5-verified, resumable). ``False``: never download (an archive already
      there is still used, else the unprepared tfds dataset is an error). ``download_url``, ``download_md5``
      (""): another address and its MD5.
    - ``normalization`` ("auto"): the published mean/std for ``cifar100`` (docs/method.md §3) and ``cifar10``,
      statistics computed from the train split otherwise; ``computed`` always computes.
    - ``num_workers`` (0): image-decoding processes for ``folder`` (``-1``: one per CPU, at most 8) on the first
      load (then the cache serves). They are spawned: a script that sets it keeps its main code under
      ``if __name__ == "__main__":``.
    - ``downsample`` (1): ``f > 1`` mean-pools every image over ``f x f`` blocks on load (after the cache),
      rounding half to even: ``2`` turns 32x32 CIFAR into 16x16. ``image_size`` still names the source's size;
      ``normalization="auto"`` then computes the statistics (pooling lowers the std).
    - ``crop_padding`` (4), ``random_flip`` (True): the training augmentation (:func:`demkd_jax.data.augment`).
    - ``digits_test_fraction`` (0.2), ``digits_seed`` (0): the fixed stratified split of ``digits``.
    """
    return ml_collections.ConfigDict({
        "source": "tfds", "name": "cifar100", "path": "", "num_classes": 100, "image_size": 32,
        "cache_dir": "", "use_cache": True, "tfds_data_dir": "",
        "download": True, "download_url": "", "download_md5": "",
        "normalization": "auto", "num_workers": 0, "downsample": 1, "crop_padding": 4, "random_flip": True,
        "digits_test_fraction": 0.2, "digits_seed": 0})


def default_mesh_config() -> ml_collections.ConfigDict:
    """The fields of ``config.mesh``, with their defaults (docs/parallel.md).

    - ``num_devices`` (-1): the size of the ``data`` axis: every device of every process; ``n > 0``: the first
      ``n`` devices of this process. ``config.batch_size`` and ``config.eval_batch_size`` must be multiples of it.
    - ``dataset`` ("replicated"): the on-device splits on every device, or ``"sharded"``: 1/n of the rows per
      device (the batch is gathered with one all-reduce; same batches, same run).
    """
    return ml_collections.ConfigDict({"num_devices": -1, "dataset": "replicated"})
