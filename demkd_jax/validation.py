"""Validation of a run's config before data is loaded or anything compiled (:func:`validate`, reading only the
teachers' ``teacher.json``), and of what needs the loaded data (:func:`validate_data`), before any compilation or
write into the workdir. Both raise :class:`demkd_jax.config.ConfigError` naming the value and what was expected.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import data as data_lib
from demkd_jax import losses
from demkd_jax import methods
from demkd_jax import models
from demkd_jax import parallel
from demkd_jax import workdir as workdir_lib
from demkd_jax.config import (DATA_ORDERS, DTYPES, EXECUTIONS, NONFINITE_POLICIES, WEIGHT_SCHEMES, WINOGRAD_MODES,
                              ConfigError)


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def validate(config, *, workdir: str | None = None) -> None:
    """Checks everything that can be checked without touching data or compiling."""
    if config.distill.method not in methods.METHOD_NAMES:
        _fail(f"unknown method {config.distill.method!r} (config.distill.method); expected one of "
              f"{', '.join(methods.METHOD_NAMES)}")
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


# (config keys, test, what each must be), checked in this order.
_NUMBER_CHECKS = (
    (("distill.ce_weight", "distill.kd_weight"), lambda v: v is None or _finite(v) and v >= 0,
     "a number >= 0 (or None for the method's default)"),
    (("distill.feature_warmup_epochs",), lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    (("optim.learning_rate", "student.width"), lambda v: _finite(v) and v > 0, "a positive number"),
    (("num_epochs", "batch_size", "eval_batch_size", "num_seeds", "log_every_steps", "checkpoint.every_epochs",
      "checkpoint.keep_last"), lambda v: _is_int(v) and v > 0, "a positive integer"),
    (("optim.weight_decay",), lambda v: _finite(v) and v >= 0, ">= 0"),
    (("optim.momentum",), lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    (("optim.lr_decay_rate",), lambda v: _finite(v) and v > 0, "a positive number"),
    (("optim.lr_decay_epochs",), lambda v: all(_is_int(e) and e >= 0 for e in v), "integer epochs >= 0"),
    (("distill.temperature", "distill.weight_temperature", "distill.weight_tau"), lambda v: v > 0, "> 0"),
)


def _check_numbers(config) -> None:
    for keys, ok, what in _NUMBER_CHECKS:
        for key in keys:
            value = functools.reduce(lambda node, k: node[k], key.split("."), config)
            if not ok(value):
                _fail(f"config.{key} must be {what}, got {value!r}")


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
    # Existence, architecture, class count and agreement of the teachers, from their teacher.json files alone.
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
    if config.batch_size > ds.num_train:
        _fail(f"config.batch_size={config.batch_size} is larger than the training set ({ds.num_train} images of "
              f"{ds.name}); expected at most {ds.num_train}")
    if methods.get(config.distill.method).teachers != "none" and config.teachers.checkpoints:
        ckpt_lib.check_teacher_dirs(tuple(config.teachers.checkpoints), num_classes=ds.num_classes)


def check_feature_index(index: int, who: str, model_name: str, n_maps: int) -> None:
    """``index`` must pick one of the ``n_maps`` feature maps (the pooled vector, index -1, is not a map)."""
    if not (0 <= index < n_maps or -n_maps - 1 <= index <= -2):
        _fail(f"config.distill.hint_layer={index} is out of range for the {who} {model_name!r}: it has "
              f"{n_maps} feature maps, expected an index in 0..{n_maps - 1} (or {-n_maps - 1}..-2)")


def num_feature_maps(model_name: str, width: float = 1.0) -> int:
    """How many feature maps ``model_name`` returns before its pooled vector (traced, not compiled)."""
    return len(models.feature_shapes(models.create_model(model_name, 10, width=width))) - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _check_writable(workdir: str) -> None:
    if not str(workdir).strip():  # os.path.abspath("") is the current directory
        _fail(f"workdir {workdir!r} is empty; expected a directory for the run's checkpoints, metrics and summary "
              "(e.g. --workdir=runs/vgg8)")
    path = pathlib.Path(os.path.abspath(workdir))
    if path.exists() and not path.is_dir():
        _fail(f"workdir {workdir!r} exists and is not a directory")
    missing = workdir_lib.first_missing(path)  # what the run will create; its parent must be writable
    probe = str(path if missing is None else missing.parent)
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"workdir {workdir!r} is not writable ({probe!r} denies write access)")
