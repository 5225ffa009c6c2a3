"""Configuration: the base ``ml_collections.ConfigDict`` every ``configs/*.py`` starts from, and validation.

Defaults follow docs/method.md §3 (the CRD/CA-MKD CIFAR-100 recipe). ``None`` (``distill.ce_weight``,
``distill.kd_weight``, ``optim.nesterov``) and ``-1`` (``distill.warmup_epochs``) mean the method's own value
from the table in :mod:`demkd_jax.methods`.
:func:`validate` checks a config before any data loading or compilation and raises :class:`ConfigError`
naming the bad value and what was expected; with the teachers' ``teacher.json`` files (architecture, class count)
it reads nothing else. :func:`validate_data` checks what needs the loaded data (batch size against the training
set, the teachers' class count), still before anything is compiled or written into the workdir.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
from ml_collections import config_dict

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import data as data_lib
from demkd_jax import losses
from demkd_jax import methods
from demkd_jax import models
from demkd_jax import parallel

METHODS = methods.METHOD_NAMES
WEIGHT_SCHEMES = ("camkd", "softmax", "ebkd", "uniform")
DATA_ORDERS = ("auto", "shared", "per_replica")
EXECUTIONS = ("auto", "vmap", "loop")
WINOGRAD_MODES = ("auto", "on", "off")
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and what was expected."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # computation dtype; parameters, optimizer state and loss reductions stay float32
    c.num_epochs = 240
    c.batch_size = 64
    c.eval_batch_size = 500
    # Independent students (different init seeds, same teachers, same data order) trained in one step.
    c.num_seeds = 1
    # Teacher training (method "ce"): train this many models at once and write each as a teacher checkpoint.
    c.ensemble_size = 0
    c.execution = "auto"  # how the seed/ensemble axis runs: vmap, loop (unrolled), or auto (by backend)
    # Data order and augmentation of the replicas: "shared" (one stream, keyed by the seed), "per_replica" (an
    # independent stream per model: a teacher ensemble of independently trained members), "auto" (per_replica
    # for a teacher ensemble, shared otherwise: students share the teachers' forward, so they share the batch).
    c.data_order = "auto"

    c.data = data_lib.default_data_config()

    # winograd: "on" computes the 3x3 convolutions where it pays (models/winograd.py: many channels, small maps)
    # as Winograd F(2x2, 3x3) (same parameters, equal up to float rounding), "off" never, "auto" on the CPU
    # backend in float32 only (accelerator libraries choose their own convolution algorithms).
    c.student = ml_collections.ConfigDict({"model": "vgg8", "width": 1.0, "winograd": "auto"})

    c.teachers = ml_collections.ConfigDict()
    c.teachers.model = ""  # "" = read from the checkpoints; otherwise checked against them
    c.teachers.checkpoints = ()  # directories written by the teacher trainer or demkd_jax.convert
    c.teachers.execution = "auto"  # K teacher forwards: vmap, loop, or auto (by backend)
    c.teachers.fold_bn = True  # fold frozen teachers' BatchNorm into their convolutions
    c.teachers.winograd = "auto"  # as student.winograd; also used when the teachers are trained first
    # When no checkpoints are given: train `num` teachers first (in <workdir>/teachers), then distil.
    c.teachers.num = 3
    c.teachers.width = 1.0
    c.teachers.num_epochs = -1  # -1: the student's num_epochs
    c.teachers.learning_rate = -1.0  # -1: the student's learning rate

    c.distill = ml_collections.ConfigDict()
    c.distill.method = "demkd"  # a name from demkd_jax.methods.METHODS
    c.distill.features = True  # intermediate-feature term (demkd, camkd)
    c.distill.weights = "camkd"  # DE-MKD entropy weighting scheme (docs/method.md §2)
    c.distill.weight_temperature = 1.0  # T_w of the entropy
    c.distill.weight_tau = 1.0  # tau of the "softmax" scheme
    c.distill.temperature = 4.0
    c.distill.alpha = 1.0  # TCKD
    c.distill.beta = 8.0  # NCKD
    c.distill.ce_weight = config_dict.placeholder(float)  # gamma; None: the method's (0.1 for kd, else 1)
    c.distill.kd_weight = config_dict.placeholder(float)  # weight of the logit term; None: the method's
    # DE-MKD (and dkd_uniform) over teachers: "sum" of the weighted per-teacher losses (the entropy weights sum to
    # 1, so the term has single-teacher DKD's scale, for which alpha/beta/warm-up were tuned) or "mean" (that sum
    # divided by K, CA-MKD's convention). The baselines use their references' reductions.
    c.distill.teacher_reduction = "sum"
    c.distill.feature_weight = 50.0  # lambda
    c.distill.warmup_epochs = -1  # -1: the method's (20 for the DKD-based methods, 0 otherwise)
    c.distill.feature_start_epoch = 2  # the feature term is off in epoch 1
    c.distill.feature_warmup_epochs = 0  # > 0: the feature term ramps up linearly over this many epochs from its start
    # CA-MKD's feature weights depend on the student (each teacher's head judges its projected feature); its code
    # lets the gradient flow through them (False). True makes them constants.
    c.distill.camkd_detach_feature_weights = False
    c.distill.hint_layer = 2  # FitNet-MKD: index into the feature list of student and teachers
    c.distill.hint_weight = 100.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.05
    c.optim.momentum = 0.9
    c.optim.nesterov = config_dict.placeholder(bool)  # None: the method's reference (mdistiller's kd/dkd: False)
    c.optim.weight_decay = 5e-4
    c.optim.lr_decay_epochs = (150, 180, 210)
    c.optim.lr_decay_rate = 0.1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.keep_last = 2
    c.checkpoint.keep_best = True
    # A corrupted checkpoint is moved aside to <step>.corrupt-<time> (True: deleted); the run resumes from the
    # newest good one. If none is good the run stops rather than silently starting over, unless this is True.
    c.checkpoint.delete_corrupt = False
    c.checkpoint.restart_if_all_corrupt = False
    # A resume whose result-changing fields (seed, hyperparameters, ...) differ from the workdir's config.json is
    # refused, naming them; True resumes with the new values (demkd_jax/workdir.py).
    c.checkpoint.allow_config_change = False

    # Data parallelism (demkd_jax/parallel.py): the "data" mesh axis and where the on-device dataset lives.
    c.mesh = parallel.default_mesh_config()
    # jax.distributed.initialize(): "auto" (when launched as several processes: TPU pod, SLURM, MPI,
    # JAX_COORDINATOR_ADDRESS), "on" or "off".
    c.distributed = "auto"

    c.log_every_steps = 50
    c.on_nonfinite = "stop"  # "stop": halt before anything non-finite is saved; "skip": drop the step
    c.progress_bar = True
    return c


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def warmup_epochs(config) -> int:
    return methods.resolve(config).warmup_epochs


def uses_features(config) -> bool:
    return methods.resolve(config).feature_term != "none"


def is_teacher_ensemble(config) -> bool:
    """A run that trains ``ensemble_size`` models with CE and exports them as teacher checkpoints."""
    return config.ensemble_size > 0


def num_replicas(config) -> int:
    """Models trained side by side in one step: the teacher ensemble, or the student seeds."""
    if is_teacher_ensemble(config):
        return int(config.ensemble_size)
    return int(config.num_seeds)


def data_order(config) -> str:
    """``shared`` or ``per_replica`` (``auto`` resolved: per replica for a teacher ensemble)."""
    if config.data_order != "auto":
        return config.data_order
    return "per_replica" if is_teacher_ensemble(config) else "shared"


def validate(config, *, workdir: str | None = None) -> None:
    """Checks everything that can be checked without touching data or compiling."""
    d, o = config.distill, config.optim
    if d.method not in METHODS:
        _fail(f"unknown method {d.method!r} (config.distill.method); expected one of {', '.join(METHODS)}")
    method = methods.get(d.method)
    if d.teacher_reduction not in losses.TEACHER_REDUCTIONS:
        _fail(f"unknown config.distill.teacher_reduction {d.teacher_reduction!r}; expected one of "
              f"{', '.join(losses.TEACHER_REDUCTIONS)}")
    if config.data_order not in DATA_ORDERS:
        _fail(f"unknown config.data_order {config.data_order!r}; expected one of {', '.join(DATA_ORDERS)}")
    for name in ("ce_weight", "kd_weight"):
        if d[name] is not None and not (_is_number(d[name]) and math.isfinite(d[name]) and d[name] >= 0):
            _fail(f"config.distill.{name} must be a number >= 0 (or None for the method's default), got {d[name]!r}")
    if not (_is_int(d.feature_warmup_epochs) and d.feature_warmup_epochs >= 0):
        _fail(f"config.distill.feature_warmup_epochs must be an integer >= 0, got {d.feature_warmup_epochs!r}")
    if d.weights not in WEIGHT_SCHEMES:
        _fail(f"unknown weighting scheme {d.weights!r} (config.distill.weights); expected one of "
              f"{', '.join(WEIGHT_SCHEMES)}")
    for key in ("execution",):
        if config[key] not in EXECUTIONS:
            _fail(f"unknown config.{key} {config[key]!r}; expected one of {', '.join(EXECUTIONS)}")
    if config.teachers.execution not in EXECUTIONS:
        _fail(f"unknown config.teachers.execution {config.teachers.execution!r}; expected one of "
              f"{', '.join(EXECUTIONS)}")
    for key, value in (("student.winograd", config.student.winograd), ("teachers.winograd", config.teachers.winograd)):
        if value not in WINOGRAD_MODES:
            _fail(f"unknown config.{key} {value!r}; expected one of {', '.join(WINOGRAD_MODES)}")
    if config.dtype not in DTYPES:
        _fail(f"unknown dtype {config.dtype!r} (config.dtype); expected one of {', '.join(DTYPES)}")
    if config.on_nonfinite not in NONFINITE_POLICIES:
        _fail(f"unknown config.on_nonfinite {config.on_nonfinite!r}; expected one of {', '.join(NONFINITE_POLICIES)}")
    if config.student.model not in models.MODEL_NAMES:
        _fail(f"unknown model name {config.student.model!r} (config.student.model); expected one of: "
              f"{', '.join(models.MODEL_NAMES)}")
    if config.teachers.model and config.teachers.model not in models.MODEL_NAMES:
        _fail(f"unknown model name {config.teachers.model!r} (config.teachers.model); expected one of: "
              f"{', '.join(models.MODEL_NAMES)}")
    for name, value in (("optim.learning_rate", o.learning_rate), ("student.width", config.student.width)):
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            _fail(f"config.{name} must be a positive number, got {value!r}")
    for name, value in (("num_epochs", config.num_epochs), ("batch_size", config.batch_size),
                        ("eval_batch_size", config.eval_batch_size), ("num_seeds", config.num_seeds),
                        ("log_every_steps", config.log_every_steps),
                        ("checkpoint.every_epochs", config.checkpoint.every_epochs),
                        ("checkpoint.keep_last", config.checkpoint.keep_last)):
        if not (_is_int(value) and value > 0):
            _fail(f"config.{name} must be a positive integer, got {value!r}")
    if not (_is_number(o.weight_decay) and math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        _fail(f"config.optim.weight_decay must be >= 0, got {o.weight_decay!r}")
    if not (_is_number(o.momentum) and 0 <= o.momentum < 1):
        _fail(f"config.optim.momentum must be in [0, 1), got {o.momentum!r}")
    if not (_is_number(o.lr_decay_rate) and math.isfinite(o.lr_decay_rate) and o.lr_decay_rate > 0):
        _fail(f"config.optim.lr_decay_rate must be a positive number, got {o.lr_decay_rate!r}")
    bad_epochs = [e for e in o.lr_decay_epochs if not (_is_int(e) and e >= 0)]
    if bad_epochs:
        _fail(f"config.optim.lr_decay_epochs must be integer epochs >= 0, got {tuple(o.lr_decay_epochs)!r}")
    for name in ("temperature", "weight_temperature", "weight_tau"):
        if not d[name] > 0:
            _fail(f"config.distill.{name} must be > 0, got {d[name]!r}")
    if config.ensemble_size < 0:
        _fail(f"config.ensemble_size must be >= 0, got {config.ensemble_size}")
    if config.ensemble_size > 0 and method.teachers != "none":
        _fail(f"config.ensemble_size={config.ensemble_size} trains teachers and needs method 'ce', got {d.method!r}; "
              "use config.num_seeds for several students")
    if config.ensemble_size > 1 and config.num_seeds > 1:
        _fail("set either config.ensemble_size (teachers) or config.num_seeds (students), not both")
    if config.data_order == "per_replica" and method.teachers != "none":
        _fail(f"config.data_order='per_replica' with method {d.method!r}: distilled students share the teachers' "
              "forward and so one batch; use 'shared' (or 'auto')")

    if method.teachers != "none":
        ckpts = tuple(config.teachers.checkpoints)
        k = len(ckpts) if ckpts else config.teachers.num
        if not ckpts and not config.teachers.model:
            _fail(f"method {d.method!r} needs teachers: set config.teachers.checkpoints to teacher directories, "
                  "or config.teachers.model (and teachers.num) to train them first")
        if method.teachers == "one" and k != 1:
            _fail(f"method {d.method!r} distils from exactly 1 teacher, got {k}; use 'aver' (KD) or 'demkd' "
                  "(DKD) for several")
        divides = {"confidence": "CA-MKD's weights", "ebkd": "the 'ebkd' weights"}.get(method.weighting)
        if method.weighting == "entropy" and d.weights in ("camkd", "ebkd"):
            divides = f"the {d.weights!r} weights"
        if method.teachers == "many" and k < 2 and divides:
            _fail(f"method {d.method!r} with {k} teacher: {divides} divide by K - 1, so K must be >= 2")
        if k < 1:
            _fail(f"config.teachers.num must be >= 1, got {k}")
        for path in ckpts:
            if os.path.exists(path) and not os.path.isdir(path):
                _fail(f"teacher checkpoint {path!r} is a file, expected a teacher checkpoint directory "
                      "(config.teachers.checkpoints)")
            if not os.path.isdir(path):
                _fail(f"teacher checkpoint directory {path!r} does not exist (config.teachers.checkpoints)")
        # Architecture, class count and agreement of the teachers, from their teacher.json files alone.
        metas = ckpt_lib.check_teacher_dirs(ckpts, model_name=config.teachers.model or None)
        teacher_model = metas[0]["model"] if metas else config.teachers.model
        teacher_width = float(metas[0].get("width", 1.0)) if metas else float(config.teachers.width)
        if method.feature_term == "hint":
            if not _is_int(d.hint_layer):
                _fail(f"config.distill.hint_layer must be an integer feature index, got {d.hint_layer!r}")
            for who, name, width in (("student", config.student.model, config.student.width),
                                     ("teacher", teacher_model, teacher_width)):
                check_feature_index(d.hint_layer, who, name, num_feature_maps(name, width))

    problem = parallel.config_problem(config)  # config.mesh, config.distributed, batch sizes vs devices
    if problem:
        _fail(problem)

    if workdir is not None:
        _check_writable(workdir)


def validate_data(config, ds: data_lib.Dataset) -> None:
    """The checks that need the loaded dataset; still before any compilation or write into the workdir."""
    n_train = ds.num_train
    if config.batch_size > n_train:
        _fail(f"config.batch_size={config.batch_size} is larger than the training set ({n_train} images of "
              f"{ds.name}); expected at most {n_train}")
    if methods.get(config.distill.method).teachers != "none" and config.teachers.checkpoints:
        ckpt_lib.check_teacher_dirs(tuple(config.teachers.checkpoints), num_classes=ds.num_classes)


def check_feature_index(index: int, who: str, model_name: str, n_maps: int) -> None:
    """``index`` must pick one of the ``n_maps`` feature maps (the pooled vector, index -1, is not a map)."""
    if not (0 <= index < n_maps or -n_maps - 1 <= index <= -2):
        _fail(f"config.distill.hint_layer={index} is out of range for the {who} {model_name!r}: it has "
              f"{n_maps} feature maps, expected an index in 0..{n_maps - 1} (or {-n_maps - 1}..-2)")


def num_feature_maps(model_name: str, width: float = 1.0) -> int:
    """How many feature maps ``model_name`` returns before its pooled vector (traced, not compiled)."""
    model = models.create_model(model_name, 10, width=width)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jax.numpy.float32)
    feats = jax.eval_shape(
        lambda x: model.apply(model.init(jax.random.PRNGKey(0), x, train=False), x, train=False)[1], x)
    return len(feats) - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_writable(workdir: str) -> None:
    if not str(workdir).strip():  # os.path.abspath("") is the current directory
        _fail(f"workdir {workdir!r} is empty; expected a directory for the run's checkpoints, metrics and summary "
              "(e.g. --workdir=runs/vgg8)")
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(f"workdir {workdir!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"workdir {workdir!r} is not writable ({probe!r} denies write access)")
