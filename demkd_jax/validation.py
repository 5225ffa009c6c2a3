"""Validation of a run's config: everything that can be checked before data is loaded or anything compiled.

:func:`validate` raises :class:`demkd_jax.config.ConfigError` naming the bad value and what was expected; with
the teachers' ``teacher.json`` files (architecture, class count) it reads nothing else. :func:`validate_data`
checks what needs the loaded data (batch size against the training set, the teachers' class count), still before
anything is compiled or written into the workdir.
"""

from __future__ import annotations

import math
import os

import jax

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import data as data_lib
from demkd_jax import losses
from demkd_jax import methods
from demkd_jax import models
from demkd_jax import parallel
from demkd_jax.config import (DATA_ORDERS, DTYPES, EXECUTIONS, NONFINITE_POLICIES, WEIGHT_SCHEMES, WINOGRAD_MODES,
                              ConfigError)

METHODS = methods.METHOD_NAMES


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def validate(config, *, workdir: str | None = None) -> None:
    """Checks everything that can be checked without touching data or compiling."""
    if config.distill.method not in METHODS:
        _fail(f"unknown method {config.distill.method!r} (config.distill.method); expected one of "
              f"{', '.join(METHODS)}")
    method = methods.get(config.distill.method)
    _check_choices(config)
    _check_numbers(config)
    _check_replicas(config, method)
    if method.teachers != "none":
        _check_teachers(config, method)
    problem = parallel.config_problem(config)  # config.mesh, config.distributed, batch sizes vs devices
    if problem:
        _fail(problem)
    if workdir is not None:
        _check_writable(workdir)


def _check_choices(config) -> None:
    """Every field that names one of a fixed set of options."""
    choices = (
        ("distill.teacher_reduction", config.distill.teacher_reduction, losses.TEACHER_REDUCTIONS),
        ("data_order", config.data_order, DATA_ORDERS),
        ("distill.weights", config.distill.weights, WEIGHT_SCHEMES),
        ("execution", config.execution, EXECUTIONS),
        ("teachers.execution", config.teachers.execution, EXECUTIONS),
        ("student.winograd", config.student.winograd, WINOGRAD_MODES),
        ("teachers.winograd", config.teachers.winograd, WINOGRAD_MODES),
        ("dtype", config.dtype, DTYPES),
        ("on_nonfinite", config.on_nonfinite, NONFINITE_POLICIES),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            _fail(f"unknown config.{key} {value!r}; expected one of {', '.join(allowed)}")
    for key, value in (("student.model", config.student.model), ("teachers.model", config.teachers.model)):
        if (value or key == "student.model") and value not in models.MODEL_NAMES:
            _fail(f"unknown model name {value!r} (config.{key}); expected one of: {', '.join(models.MODEL_NAMES)}")


def _check_numbers(config) -> None:
    distill, optim = config.distill, config.optim
    for name in ("ce_weight", "kd_weight"):
        if distill[name] is not None and not (_is_number(distill[name]) and math.isfinite(distill[name]) and distill[name] >= 0):
            _fail(f"config.distill.{name} must be a number >= 0 (or None for the method's default), got {distill[name]!r}")
    if not (_is_int(distill.feature_warmup_epochs) and distill.feature_warmup_epochs >= 0):
        _fail(f"config.distill.feature_warmup_epochs must be an integer >= 0, got {distill.feature_warmup_epochs!r}")
    for name, value in (("optim.learning_rate", optim.learning_rate), ("student.width", config.student.width)):
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            _fail(f"config.{name} must be a positive number, got {value!r}")
    for name, value in (("num_epochs", config.num_epochs), ("batch_size", config.batch_size),
                        ("eval_batch_size", config.eval_batch_size), ("num_seeds", config.num_seeds),
                        ("log_every_steps", config.log_every_steps),
                        ("checkpoint.every_epochs", config.checkpoint.every_epochs),
                        ("checkpoint.keep_last", config.checkpoint.keep_last)):
        if not (_is_int(value) and value > 0):
            _fail(f"config.{name} must be a positive integer, got {value!r}")
    if not (_is_number(optim.weight_decay) and math.isfinite(optim.weight_decay) and optim.weight_decay >= 0):
        _fail(f"config.optim.weight_decay must be >= 0, got {optim.weight_decay!r}")
    if not (_is_number(optim.momentum) and 0 <= optim.momentum < 1):
        _fail(f"config.optim.momentum must be in [0, 1), got {optim.momentum!r}")
    if not (_is_number(optim.lr_decay_rate) and math.isfinite(optim.lr_decay_rate) and optim.lr_decay_rate > 0):
        _fail(f"config.optim.lr_decay_rate must be a positive number, got {optim.lr_decay_rate!r}")
    if any(not (_is_int(e) and e >= 0) for e in optim.lr_decay_epochs):
        _fail(f"config.optim.lr_decay_epochs must be integer epochs >= 0, got {tuple(optim.lr_decay_epochs)!r}")
    for name in ("temperature", "weight_temperature", "weight_tau"):
        if not distill[name] > 0:
            _fail(f"config.distill.{name} must be > 0, got {distill[name]!r}")


def _check_replicas(config, method: methods.Method) -> None:
    """Teacher ensembles, student seeds and their data order."""
    if config.ensemble_size < 0:
        _fail(f"config.ensemble_size must be >= 0, got {config.ensemble_size}")
    if config.ensemble_size > 0 and method.teachers != "none":
        _fail(f"config.ensemble_size={config.ensemble_size} trains teachers and needs method 'ce', got "
              f"{method.name!r}; use config.num_seeds for several students")
    if config.ensemble_size > 1 and config.num_seeds > 1:
        _fail("set either config.ensemble_size (teachers) or config.num_seeds (students), not both")
    if config.data_order == "per_replica" and method.teachers != "none":
        _fail(f"config.data_order='per_replica' with method {method.name!r}: distilled students share the teachers' "
              "forward and so one batch; use 'shared' (or 'auto')")


def _check_teachers(config, method: methods.Method) -> None:
    """The teacher count the method needs, the checkpoint directories, and FitNet's hint layer."""
    distill = config.distill
    ckpts = tuple(config.teachers.checkpoints)
    k = len(ckpts) if ckpts else config.teachers.num
    if not ckpts and not config.teachers.model:
        _fail(f"method {distill.method!r} needs teachers: set config.teachers.checkpoints to teacher directories, "
              "or config.teachers.model (and teachers.num) to train them first")
    if method.teachers == "one" and k != 1:
        _fail(f"method {distill.method!r} distils from exactly 1 teacher, got {k}; use 'aver' (KD) or 'demkd' "
              "(DKD) for several")
    divides = {"confidence": "CA-MKD's weights", "ebkd": "the 'ebkd' weights"}.get(method.weighting)
    if method.weighting == "entropy" and distill.weights in ("camkd", "ebkd"):
        divides = f"the {distill.weights!r} weights"
    if method.teachers == "many" and k < 2 and divides:
        _fail(f"method {distill.method!r} with {k} teacher: {divides} divide by K - 1, so K must be >= 2")
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
    if method.feature_term == "hint":
        teacher_model = metas[0]["model"] if metas else config.teachers.model
        teacher_width = float(metas[0].get("width", 1.0)) if metas else float(config.teachers.width)
        if not _is_int(distill.hint_layer):
            _fail(f"config.distill.hint_layer must be an integer feature index, got {distill.hint_layer!r}")
        for who, name, width in (("student", config.student.model, config.student.width),
                                 ("teacher", teacher_model, teacher_width)):
            check_feature_index(distill.hint_layer, who, name, num_feature_maps(name, width))


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
