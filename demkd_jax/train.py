"""Training: teacher ensembles and multi-teacher distillation, one jit-compiled step.

``train_and_evaluate(config, workdir)`` is the entry point (``main.py`` is a thin CLI around it): it checks the
data, trains the teachers (:func:`train_teachers`, when the config names none) or loads them, then runs :func:`fit`
(restore or initialise, train and evaluate epoch by epoch, write the summary).

One step (:func:`make_train_step`) is a single XLA graph: batch selection and augmentation of the on-device dataset
-> the K frozen teachers' forwards (variables stacked on a leading axis, vmapped or unrolled) -> teacher weights ->
the losses -> gradients of the student and its connectors -> the SGD update -> metrics. Students carry a leading
*replica* axis: R independently initialised students (seeds, or the members of a teacher ensemble) that share the
batch and the teachers' forward.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import config as config_lib
from demkd_jax import data as data_lib
from demkd_jax import losses
from demkd_jax import methods
from demkd_jax import models
from demkd_jax import parallel
from demkd_jax import validation
from demkd_jax import workdir as workdir_lib

Params = Any


@flax.struct.dataclass
class TrainState:
    """Student state; every leaf except ``step`` has a leading replica axis."""

    step: jax.Array  # int32 scalar, shared by the replicas; also the data position
    params: Params  # {"student": ..., "connectors": ...}
    batch_stats: Params
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The static parts of a run, fixed at trace time."""

    config: ml_collections.ConfigDict
    method: methods.Resolved  # the loss's recipe: the method's table row with the config's overrides
    student: nn.Module
    teacher: nn.Module | None  # the teachers' (possibly BN-folded) architecture
    connector: nn.Module | None
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule  # step -> learning rate, the one inside ``tx``
    image_shape: tuple[int, int, int]  # H, W, C of the dataset's images
    data_order: str  # "shared" or "per_replica"
    steps_per_epoch: int
    num_replicas: int
    num_teachers: int
    replica_execution: str
    teacher_execution: str
    feature_index: int | None  # which feature map the feature/hint term distils
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mesh: jax.sharding.Mesh  # the "data" axis (demkd_jax.parallel)

    @property
    def replicated(self) -> jax.sharding.Sharding:
        """State, teachers, permutation, metrics: a copy on every device of the mesh."""
        return parallel.replicated(self.mesh)


def build_setup(config, ds, teachers: Teachers | None) -> RunSpec:
    """The static description of the run: models, connectors, optimizer, execution modes."""
    dtype = jnp.dtype(config.dtype)
    resolved = methods.resolve(config)
    steps_per_epoch = ds.num_train // config.batch_size
    student = models.create_model(config.student.model, ds.num_classes, dtype, width=config.student.width,
                                  winograd=resolve_winograd(config.student.winograd, dtype))
    teacher = None if teachers is None else models.create_model(
        teachers.model_name, ds.num_classes, dtype, width=teachers.width, fold_bn=teachers.folded,
        winograd=resolve_winograd(config.teachers.winograd, dtype))
    num_teachers = 0 if teachers is None else jax.tree_util.tree_leaves(teachers.variables)[0].shape[0]
    feature_index = connector = None
    if resolved.feature_term != "none":
        feature_index = config.distill.hint_layer if resolved.feature_term == "hint" else -2
        s_feats = models.feature_shapes(student, ds.image_shape)
        t_feats = models.feature_shapes(teacher, ds.image_shape)
        validation.check_feature_index(feature_index, "student", config.student.model, len(s_feats) - 1)
        validation.check_feature_index(feature_index, "teacher", teachers.model_name, len(t_feats) - 1)
        t_shape = t_feats[feature_index].shape
        connector = models.StackedConnector(num_teachers=num_teachers, out_channels=t_shape[-1],
                                            out_size=(t_shape[1], t_shape[2]), dtype=dtype)
    schedule = lr_schedule(config, steps_per_epoch)
    return RunSpec(
        config=config, method=resolved, student=student, teacher=teacher, connector=connector,
        tx=make_optimizer(config, schedule, resolved.nesterov), lr_schedule=schedule, image_shape=ds.image_shape,
        data_order=config_lib.data_order(config),
        steps_per_epoch=steps_per_epoch, num_replicas=config_lib.num_replicas(config), num_teachers=num_teachers,
        replica_execution=resolve_execution(config.execution),
        teacher_execution=resolve_execution(config.teachers.execution), feature_index=feature_index,
        mean=tuple(float(m) for m in ds.mean), std=tuple(float(v) for v in ds.std),
        mesh=parallel.make_mesh(config))


def resolve_execution(value: str) -> str:
    """``auto``: unrolled on CPU (vmapped convolutions become slow grouped convolutions there), else vmap."""
    if value != "auto":
        return value
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def resolve_winograd(value: str, dtype) -> bool:
    """``auto``: Winograd on the CPU backend in float32, where XLA's direct convolution is the bottleneck."""
    if value != "auto":
        return value == "on"
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32


def map_stacked(fn: Callable, execution: str, stacked: Any, *shared: Any) -> Any:
    """``fn(member, *shared)`` for every member of a pytree stacked on axis 0, stacked: ``vmap`` batches the
    members, ``loop`` unrolls them at trace time (K separate convolutions in one graph)."""
    if execution == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    outs = [fn(jax.tree_util.tree_map(lambda a: a[i], stacked), *shared) for i in range(n)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)


def data_keys(config) -> jax.Array:
    """The key(s) of the data order and augmentation, functions of the seed only: one (``shared`` data order: every
    replica sees the same batches) or ``[R]``, one independent stream per replica."""
    base = jax.random.PRNGKey(config.seed)
    if config_lib.data_order(config) == "shared":
        return base
    stream = jax.random.fold_in(base, 2)
    return jnp.stack([jax.random.fold_in(stream, r) for r in range(config_lib.num_replicas(config))])


def epoch_permutation_fn(config, num_train: int, sharding: jax.sharding.Sharding | None = None
                         ) -> Callable[[int], jax.Array]:
    """Jitted ``epoch -> permutation`` (1-based epochs): the order of the training set in that epoch, ``[N]`` or
    (per-replica data order) ``[R, N]``, placed with ``sharding`` (the trainer: replicated on the mesh)."""
    keys = data_keys(config)
    one = lambda key, e: data_lib.epoch_permutation(key, e, num_train)
    perm = one if keys.ndim == 1 else jax.vmap(one, in_axes=(0, None))
    fn = jax.jit(lambda e: perm(keys, e), out_shardings=sharding)
    return lambda epoch: fn(jnp.int32(epoch - 1))


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Step decay as PyTorch's ``MultiStepLR`` stepped once per epoch (and CRD's ``adjust_learning_rate``): epoch e
    (1-based) runs at ``learning_rate * lr_decay_rate ** n``, n = how many entries of ``lr_decay_epochs`` are < e
    (an epoch listed twice decays twice)."""
    optim = config.optim
    counts = collections.Counter(int(e) for e in optim.lr_decay_epochs if int(e) < config.num_epochs)
    boundaries = {e * steps_per_epoch: optim.lr_decay_rate ** n for e, n in sorted(counts.items())}
    return optax.piecewise_constant_schedule(optim.learning_rate, boundaries)


def make_optimizer(config, schedule: optax.Schedule, nesterov: bool) -> optax.GradientTransformation:
    """PyTorch SGD: coupled L2 weight decay on every parameter, (Nesterov) momentum, the rate from ``schedule``."""
    optim = config.optim
    return optax.chain(optax.add_decayed_weights(optim.weight_decay),
                       optax.sgd(schedule, momentum=optim.momentum or None, nesterov=bool(nesterov and optim.momentum)))


def init_state(setup: RunSpec, rng: jax.Array) -> TrainState:
    """R independently initialised students (+ connectors), stacked on a leading replica axis."""
    x = jnp.zeros((2, *setup.image_shape), jnp.float32)

    def init_one(key):
        k_student, k_conn = jax.random.split(key)
        (_, feats), student = setup.student.init_with_output(k_student, x, train=False)
        variables = {"student": student}
        if setup.connector is not None:
            variables["connectors"] = setup.connector.init(k_conn, feats[setup.feature_index], train=False)
        params = {k: v["params"] for k, v in variables.items()}
        stats = {k: v.get("batch_stats", {}) for k, v in variables.items()}
        return params, stats, setup.tx.init(params)

    keys = jnp.stack([jax.random.fold_in(rng, r) for r in range(setup.num_replicas)])
    params, stats, opt_state = jax.vmap(init_one)(keys)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=opt_state)


def teacher_forward(setup: RunSpec, teacher_vars: Params, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Logits [K,B,C] and, if needed, the distilled feature map [K,B,H,W,C] of the frozen teachers."""

    def one(v, x):
        logits, feats = setup.teacher.apply(v, x, train=False)
        return logits, (feats[setup.feature_index] if setup.feature_index is not None else None)

    return jax.lax.stop_gradient(map_stacked(one, setup.teacher_execution, teacher_vars, x))


def _hold_connectors(hold: jax.Array, new: Any, old: Any) -> Any:
    """``new`` with the leaves under a "connectors" dict key taken from ``old`` where ``hold``."""
    def pick(path, a, b):
        under = any(isinstance(p, jax.tree_util.DictKey) and p.key == "connectors" for p in path)
        return jnp.where(hold, b, a) if under else a
    return jax.tree_util.tree_map_with_path(pick, new, old)


def _ramp(epoch: jax.Array, start: int, epochs: int) -> jax.Array:
    """0 before epoch ``start``, then linear up to 1 over ``epochs`` epochs (a step to 1 when ``epochs`` is 0)."""
    if epochs > 0:
        return jnp.clip((epoch - start + 1) / epochs, 0.0, 1.0)
    return (epoch >= start).astype(jnp.float32)


def make_batch_fn(setup: RunSpec) -> Callable:
    """``batch(images, labels, perm, key, step) -> (x, y)``: step ``step``'s batch of the epoch order ``perm``,
    gathered and augmented on the device with the stream ``key``."""
    config = setup.config
    dtype = jnp.dtype(config.dtype)

    def batch(images, labels, perm, key, step):
        # The global batch, split along the mesh's "data" axis from here on: each device gathers, augments
        # and computes its batch_size / n examples; batch reductions (BatchNorm, losses) become all-reduces.
        position = step % setup.steps_per_epoch
        idx = parallel.constrain_batch(data_lib.batch_indices_from_permutation(perm, position, config.batch_size),
                                       setup.mesh)
        x = data_lib.augment(images[idx], jax.random.fold_in(jax.random.fold_in(key, 1), step), setup.mean, setup.std,
                             padding=config.data.crop_padding, flip=config.data.random_flip, dtype=dtype)
        return parallel.constrain_batch((x, labels[idx]), setup.mesh)

    return batch


def make_loss_fn(setup: RunSpec) -> Callable:
    """``loss(params, batch_stats, x, y, t_logits, t_feats, weights, epoch, teacher_vars) -> (total, (terms,
    new_batch_stats, student_logits))`` of one student, built from its method's table row (:mod:`methods`)."""
    distill = setup.config.distill
    recipe = setup.method
    feature_name = "hint" if recipe.feature_term == "hint" else "feature"

    def loss_fn(params, batch_stats, x, y, t_logits, t_feats, weights, epoch, teacher_vars):
        variables = {"params": params["student"], "batch_stats": batch_stats["student"]}
        (s_logits, s_feats), s_updates = setup.student.apply(variables, x, train=True, mutable=["batch_stats"])
        new_stats = {"student": s_updates["batch_stats"]}
        terms = {"ce": jnp.mean(losses.cross_entropy(s_logits, y))}
        total = recipe.ce_weight * terms["ce"]
        if recipe.method.logit_loss is not None:
            terms["logit"] = methods.weighted_logit_term(recipe, s_logits, t_logits, y, weights, distill)
            total = total + _ramp(epoch, 1, recipe.warmup_epochs) * terms["logit"]
        if setup.connector is not None:
            c_vars = {"params": params["connectors"], "batch_stats": batch_stats["connectors"]}
            projected, c_updates = setup.connector.apply(c_vars, s_feats[setup.feature_index], train=True,
                                                         mutable=["batch_stats"])
            new_stats["connectors"] = c_updates["batch_stats"]
            head_logits = None
            if recipe.feature_term == "camkd":
                # CA-MKD: each teacher's own classifier judges the student's projected feature.
                judged = jax.lax.stop_gradient(projected) if distill.camkd_detach_feature_weights else projected
                head_logits = map_stacked(lambda vf: setup.teacher.apply(vf[0], vf[1], method="head"),
                                          setup.teacher_execution, (teacher_vars, judged))
            terms[feature_name] = methods.feature_term(recipe, projected, t_feats, weights, head_logits, y, distill)
            ramp = _ramp(epoch, distill.feature_start_epoch, distill.feature_warmup_epochs)
            total = total + ramp * recipe.feature_weight * terms[feature_name]
        return total, (terms, new_stats, s_logits)

    return loss_fn


def make_replica_update(setup: RunSpec, loss_fn: Callable) -> Callable:
    """``update(params, batch_stats, opt_state, x, y, t_logits, t_feats, weights, epoch, teacher_vars)
    -> ((params, batch_stats, opt_state), metrics)``: one student's gradient step; a non-finite step is dropped."""
    def replica_update(params, batch_stats, opt_state, x, y, t_logits, t_feats, weights, epoch, teacher_vars):
        (loss, (terms, new_stats, s_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y, t_logits, t_feats, weights, epoch, teacher_vars)
        lr = setup.lr_schedule(optax.tree.get(opt_state, "count"))
        updates, new_opt_state = setup.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if setup.connector is not None:
            # PyTorch's SGD skips parameters without a gradient: before the feature term starts, the connectors
            # get neither weight decay nor momentum.
            frozen = epoch < setup.config.distill.feature_start_epoch
            new_params, new_opt_state = _hold_connectors(frozen, (new_params, new_opt_state), (params, opt_state))
        grad_norm = optax.tree.norm(grads)
        # Finite loss and gradients can still overflow in the update (a huge learning rate): check the result too.
        ok = jax.tree.reduce(lambda ok, x: ok & jnp.isfinite(x).all(), (new_params, new_stats, new_opt_state),
                             jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        # A non-finite step never reaches the state (config.on_nonfinite decides whether the run stops); the
        # schedule still advances, so the learning rate stays a function of the step.
        kept_opt_state = optax.tree.set(optax.tree.where(ok, new_opt_state, opt_state),
                                        count=optax.tree.get(new_opt_state, "count"))
        metrics = {"loss": loss, **terms, "accuracy": jnp.mean(jnp.argmax(s_logits, -1) == y) * 100.0,
                   "grad_norm": grad_norm, "param_norm": optax.tree.norm(params), "lr": lr,
                   "nonfinite": (~ok).astype(jnp.int32)}
        return (optax.tree.where(ok, new_params, params), optax.tree.where(ok, new_stats, batch_stats),
                kept_opt_state), metrics

    return replica_update


def make_train_step(setup: RunSpec) -> Callable:
    """Returns ``train_step(state, teacher_vars, images, labels, perm) -> (state, metrics)`` (pure, to be jitted).

    ``perm``: the epoch's permutation of the training set (``[R, N]`` with the per-replica data order), computed
    on the device once per epoch: recomputing a 50k permutation every step would cost more than the augmentation.
    """
    distill = setup.config.distill
    keys = data_keys(setup.config)
    per_replica = setup.data_order == "per_replica"
    batch = make_batch_fn(setup)
    replica_update = make_replica_update(setup, make_loss_fn(setup))

    def train_step(state: TrainState, teacher_vars: Params, images: jax.Array, labels: jax.Array, perm: jax.Array):
        step = state.step
        epoch = (step // setup.steps_per_epoch + 1).astype(jnp.float32)  # 1-based, as the lineage counts epochs
        x = y = t_logits = t_feats = weights = None
        metrics_t = {}
        if not per_replica:
            x, y = batch(images, labels, perm, keys, step)
        if setup.teacher is not None:
            t_logits, t_feats = teacher_forward(setup, teacher_vars, x)
            weights = jax.lax.stop_gradient(methods.teacher_weights(setup.method.method.name, t_logits, y, distill))
            metrics_t = {"teacher_weight": jnp.mean(weights, axis=1),
                         "teacher_entropy": jnp.mean(losses.entropy(t_logits), axis=1),
                         "teacher_accuracy": jnp.mean(jnp.argmax(t_logits, -1) == y[None], axis=1) * 100.0}

        def update(member):
            params, stats, opt = member[:3]
            xb, yb = batch(images, labels, member[3], member[4], step) if per_replica else (x, y)
            return replica_update(params, stats, opt, xb, yb, t_logits, t_feats, weights, epoch, teacher_vars)

        members = (state.params, state.batch_stats, state.opt_state) + ((perm, keys) if per_replica else ())
        (params, stats, opt_state), metrics = map_stacked(update, setup.replica_execution, members)
        metrics = {k: (jnp.sum(v) if k == "nonfinite" else jnp.mean(v)) for k, v in metrics.items()}
        metrics.update(metrics_t)
        return TrainState(step=step + 1, params=params, batch_stats=stats, opt_state=opt_state), metrics

    return train_step


def make_eval_fn(model: nn.Module, execution: str, num_examples: int, batch_size: int, mean, std, dtype,
                 mesh: jax.sharding.Mesh | None = None) -> Callable:
    """``eval_fn(stacked_vars, images, labels) -> (correct[R], ensemble_correct)`` over the whole test split, each
    example once (padded fixed-size batches with a mask); the ensemble predicts with the members' mean probability.
    With a ``mesh``, each batch is split along its "data" axis."""
    num_batches = data_lib.num_eval_batches(num_examples, batch_size)

    def eval_fn(stacked_vars, images, labels):
        def body(carry, b):
            i, m = parallel.constrain_batch(data_lib.eval_batch_indices(b, num_examples, batch_size), mesh)
            x, y = parallel.constrain_batch((data_lib.normalize(images[i], mean, std, dtype), labels[i]), mesh)
            logits = map_stacked(lambda v, x: model.apply(v, x, train=False)[0], execution, stacked_vars, x)
            correct = jnp.sum((jnp.argmax(logits, -1) == y[None]) & m[None], axis=1)
            probs = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), -1), axis=0)
            ensemble_correct = jnp.sum((jnp.argmax(probs, -1) == y) & m)
            return (carry[0] + correct, carry[1] + ensemble_correct), None

        n_members = jax.tree_util.tree_leaves(stacked_vars)[0].shape[0]
        init = (jnp.zeros((n_members,), jnp.int32), jnp.zeros((), jnp.int32))
        return jax.lax.scan(body, init, jnp.arange(num_batches))[0]

    return eval_fn


def jit_train_step(setup: RunSpec) -> Callable:
    """:func:`make_train_step` jitted over ``setup.mesh``: state, teachers and the epoch permutation replicated, the
    splits placed as ``config.mesh.dataset`` says, the batch sharded along "data" inside the step; only the state's
    buffers are donated."""
    rep, data = setup.replicated, parallel.dataset_sharding(setup.mesh, setup.config.mesh.dataset)
    return jax.jit(make_train_step(setup), in_shardings=(rep, rep, data, data, rep), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def jit_eval_fn(setup: RunSpec, model: nn.Module, execution: str, num_examples: int) -> Callable:
    """:func:`make_eval_fn` over ``setup.mesh``: variables replicated, test split as placed, batches sharded."""
    mesh = setup.mesh
    rep, data = setup.replicated, parallel.dataset_sharding(mesh, setup.config.mesh.dataset)
    batch_size = setup.config.eval_batch_size
    if batch_size > num_examples:  # a small test split: the largest batch it fills that is a multiple of the devices
        batch_size = max(mesh.size, num_examples - num_examples % mesh.size)
    return jax.jit(make_eval_fn(model, execution, num_examples, batch_size, setup.mean, setup.std,
                                jnp.dtype(setup.config.dtype), mesh), in_shardings=(rep, data, data), out_shardings=rep)


def abstract_state(setup: RunSpec, rng: jax.Array) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state: the restore target of a checkpoint, with which Orbax
    restores onto this run's mesh whatever mesh saved the checkpoint."""
    return parallel.with_sharding(jax.eval_shape(lambda: init_state(setup, rng)), setup.replicated)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The teacher-ensemble run that a distillation config implies when it names no checkpoints."""
    teachers = config.teachers
    teacher_run = ml_collections.ConfigDict(config.to_dict())
    teacher_run.update(ensemble_size=teachers.num, num_seeds=1, data_order="auto", seed=config.seed + 1000,
                       distill={"method": "ce"}, teachers={"checkpoints": ()},
                       student={"model": teachers.model, "width": teachers.width, "winograd": teachers.winograd})
    if teachers.num_epochs > 0:
        teacher_run.num_epochs = teachers.num_epochs
    if teachers.learning_rate > 0:
        teacher_run.optim.learning_rate = teachers.learning_rate
    return teacher_run


def teacher_dirs(workdir: str | os.PathLike, num: int) -> list[pathlib.Path]:
    return [pathlib.Path(workdir) / f"teacher_{k}" for k in range(num)]


@dataclasses.dataclass(frozen=True)
class Teachers:
    """K frozen teachers of one architecture, variables stacked on axis 0 (BN folded if configured)."""

    model_name: str
    width: float
    variables: Params
    dirs: tuple[pathlib.Path, ...]
    folded: bool


def train_teachers(config: ml_collections.ConfigDict, workdir: pathlib.Path, ds: data_lib.Dataset) -> dict:
    """The teacher phase: trains ``config.ensemble_size`` models with CE in one step, writes each as a teacher
    checkpoint ``<workdir>/teacher_<k>``; resumable like any run. Returns its summary (with ``teacher_dirs``)."""
    validation.validate(config, workdir=str(workdir))
    summary, state = fit(config, workdir, ds, None)
    dirs = teacher_dirs(workdir, config_lib.num_replicas(config))
    # Every process calls Orbax (it writes once, from process 0); the barrier keeps the other processes from
    # reading teacher.json before process 0 wrote it.
    students = jax.device_get({"params": state.params["student"], "batch_stats": state.batch_stats["student"]})
    for k, d in enumerate(dirs):
        ckpt_lib.save_teacher(d, jax.tree_util.tree_map(lambda a: a[k], students), model_name=config.student.model,
                              num_classes=ds.num_classes, width=config.student.width,
                              metadata={"test_acc": summary["final_test_acc"][k], "dataset": ds.name,
                                        "epochs": config.num_epochs, "seed": config.seed, "member": k,
                                        "data_order": summary["data_order"]})
    parallel.sync("demkd_jax: teachers exported")
    summary["teacher_dirs"] = [str(d) for d in dirs]
    if parallel.is_primary():
        ckpt_lib.write_json_atomic(workdir / "summary.json", summary)
    return summary


def prepare_teachers(config, workdir: pathlib.Path | None, ds: data_lib.Dataset,
                     log: Callable = print) -> Teachers | None:
    """Loads and checks the configured teacher checkpoints, or runs the teacher phase first (resumably); None for a
    method without teachers."""
    if methods.get(config.distill.method).teachers == "none":
        return None
    if config.teachers.checkpoints:
        dirs = [pathlib.Path(p) for p in config.teachers.checkpoints]
    else:
        t_workdir = pathlib.Path(workdir) / "teachers"
        dirs = teacher_dirs(t_workdir, config.teachers.num)
        if not all((d / ckpt_lib.TEACHER_META).is_file() for d in dirs):
            log(f"training {config.teachers.num} x {config.teachers.model} teachers in {t_workdir}")
            t_config = teacher_config(config)
            with workdir_lib.claimed(t_workdir, t_config, lock=parallel.is_primary(), log=log):
                train_teachers(t_config, t_workdir, ds)
    members, metas = zip(*[ckpt_lib.load_teacher(d, model_name=config.teachers.model or None,
                                                 num_classes=ds.num_classes) for d in dirs])
    ckpt_lib.require_one_architecture(dirs, metas)
    variables = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *members)
    if config.teachers.fold_bn:
        variables = jax.vmap(models.fold_batchnorm)(variables)
    return Teachers(metas[0]["model"], float(metas[0].get("width", 1.0)), variables, tuple(dirs),
                    bool(config.teachers.fold_bn))


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; nothing non-finite was saved."""


def check_finite(step0: int, metrics: list[dict], policy: str) -> None:
    """Raises (policy 'stop') naming the first non-finite step of the fetched ``metrics`` (``metrics[i]``: step
    ``step0 + i + 1``) and its term. Under 'skip' such a step left the state unchanged in-graph and is only counted
    in the epoch's ``skipped_steps``."""
    bad = [i for i, m in enumerate(metrics) if int(m["nonfinite"])]
    if policy != "stop" or not bad:
        return
    m = metrics[bad[0]]
    terms = [k for k in ("ce", "logit", "feature", "hint") if k in m and not np.isfinite(m[k])]
    if terms:
        what = f"loss term(s) {', '.join(terms)}"
    elif not np.isfinite(m["loss"]):
        what = "total loss"
    elif not np.isfinite(m["grad_norm"]):
        what = "gradients (the loss was finite)"
    else:
        what = "parameter update (loss and gradients were finite; the update overflowed)"
    values = ", ".join(f"{k}={float(m[k]):.4g}" for k in ("loss", "ce", "logit", "feature", "hint", "grad_norm")
                       if k in m)
    raise NonFiniteError(
        f"non-finite {what} at step {step0 + bad[0] + 1}; the run stopped before saving it, the last checkpoint is "
        f"intact ({values}). Lower the learning rate, or set config.on_nonfinite='skip' to drop such steps")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (a teacher ensemble, or a student: distilled, or with CE alone) in ``workdir``, resuming a run there;
    returns the summary also written to ``<workdir>/summary.json``. Data-parallel over ``config.mesh``: in a
    multi-process run every process calls this with the same config, and only process 0 prints and writes files
    (Orbax coordinates checkpoints)."""
    parallel.initialize_distributed(config.distributed)  # before anything touches a device
    # Every check that can fail on a bad input runs before anything is compiled or written into the workdir.
    validation.validate(config, workdir=workdir)
    workdir = pathlib.Path(workdir).absolute()
    log = parallel.primary_only(print)
    with workdir_lib.claimed(workdir, config, lock=parallel.is_primary(), log=log):
        ds = data_lib.load_dataset(config.data)
        validation.validate_data(config, ds)
        if config_lib.is_teacher_ensemble(config):
            return train_teachers(config, workdir, ds)
        teachers = prepare_teachers(config, workdir, ds, log)
        return fit(config, workdir, ds, teachers)[0]


@dataclasses.dataclass
class _Run:
    """What the epochs of :func:`fit` share: the compiled functions and the on-device data."""

    setup: RunSpec
    train_step: Callable
    student_eval: Callable
    permutation: Callable[[int], jax.Array]
    teacher_vars: Params | None
    train: tuple[jax.Array, jax.Array]
    test: tuple[jax.Array, jax.Array]
    num_test: int


def _prepare_run(config, ds: data_lib.Dataset, teachers: Teachers | None) -> _Run:
    setup = build_setup(config, ds, teachers)
    mesh = setup.mesh
    return _Run(
        setup=setup, train_step=jit_train_step(setup),
        student_eval=jit_eval_fn(setup, setup.student, setup.replica_execution, ds.num_test),
        permutation=epoch_permutation_fn(config, ds.num_train, setup.replicated),
        teacher_vars=None if teachers is None else parallel.put_replicated(teachers.variables, mesh),
        train=parallel.put_dataset(ds.train_images, ds.train_labels, mesh, config.mesh.dataset),
        test=parallel.put_dataset(ds.test_images, ds.test_labels, mesh, config.mesh.dataset), num_test=ds.num_test)


def _test_accuracy(run: _Run, eval_fn: Callable, stacked_vars: Params) -> tuple[list[float], float]:
    """Test top-1 (%) of each stacked member and of their ensemble (the mean of their probabilities)."""
    correct, ensemble_correct = jax.device_get(eval_fn(stacked_vars, *run.test))
    percent = lambda c: round(100.0 * float(c) / run.num_test, 2)
    return [percent(c) for c in correct], percent(ensemble_correct)


def _evaluate_teachers(run: _Run, teachers: Teachers, log: Callable) -> dict:
    """The teachers' own test accuracy and their ensemble's, once per run."""
    setup = run.setup
    t_eval = jit_eval_fn(setup, setup.teacher, setup.teacher_execution, run.num_test)
    test_acc, ensemble_acc = _test_accuracy(run, t_eval, run.teacher_vars)
    log(f"teachers ({teachers.model_name} x {setup.num_teachers}): test top-1 {test_acc}, ensemble {ensemble_acc}")
    return {"model": teachers.model_name, "dirs": [str(d) for d in teachers.dirs], "test_acc": test_acc,
            "ensemble_test_acc": ensemble_acc}


def _restore_or_init(run: _Run, workdir: pathlib.Path, checkpointer: ckpt_lib.TrainCheckpointer,
                     metrics_log: workdir_lib.MetricsLog, log: Callable) -> tuple[TrainState, list[dict]]:
    """The newest checkpoint that reads back exactly (newer corrupted ones are reported and set aside), or a
    fresh state; with the epoch records kept from before the restored step."""
    setup, config = run.setup, run.setup.config
    rng = jax.random.PRNGKey(config.seed)
    resumed = checkpointer.restore_latest(abstract_state(setup, rng))
    if parallel.is_primary():
        workdir_lib.record_config(workdir, config, 0 if resumed is None else resumed[0])
    if resumed is not None:
        latest, state = resumed
        history = [r for r in metrics_log.resume(latest, checkpointer.saved_records(latest), log) if "test_acc" in r]
        log(f"resumed from {checkpointer.directory} at step {latest} (epoch {latest // setup.steps_per_epoch})")
        return state, history
    metrics_log.resume(0)
    # A fresh state, created directly replicated on the mesh (a global array on every host).
    return jax.jit(lambda: init_state(setup, rng), out_shardings=setup.replicated)(), []


def _train_epoch(run: _Run, state: TrainState, epoch: int) -> tuple[TrainState, dict, dict]:
    """Runs the steps of ``epoch`` left after ``state.step``; returns the state, the averaged training metrics
    (``train_*``, ``skipped_steps``, ``lr``) and the timing (``epoch_time_s``, ``img_per_s``)."""
    from tqdm.auto import tqdm
    setup, config = run.setup, run.setup.config
    step = int(jax.device_get(state.step))
    epoch_end = epoch * setup.steps_per_epoch
    bar = tqdm(total=epoch_end - step, desc=f"epoch {epoch}/{config.num_epochs}", leave=False, dynamic_ncols=True,
               disable=not (config.progress_bar and parallel.is_primary()))
    t_epoch, images_seen = time.time(), 0
    # finite: the metrics of the averaged steps; a non-finite step (on_nonfinite='skip') is only counted in skipped.
    pending, finite, skipped = [], [], 0
    perm = run.permutation(epoch)
    while step < epoch_end:
        # Everything the step needs is on the device: an implicit host<->device transfer here is a bug.
        with jax.transfer_guard("disallow"):
            state, metrics = run.train_step(state, run.teacher_vars, *run.train, perm)
        pending.append(metrics)
        step += 1
        images_seen += config.batch_size
        bar.update(1)
        if len(pending) >= config.log_every_steps or step == epoch_end:
            fetched, pending = jax.device_get(pending), []  # the only host sync inside an epoch
            check_finite(step - len(fetched), fetched, config.on_nonfinite)
            skipped += sum(int(m["nonfinite"]) for m in fetched)
            finite += [m for m in fetched if not int(m["nonfinite"])]
            if finite and not bar.disable:
                bar.set_postfix(loss=f"{np.mean([m['loss'] for m in finite]):.3f}",
                                acc=f"{np.mean([m['accuracy'] for m in finite]):.1f}",
                                img_s=f"{images_seen / (time.time() - t_epoch):.0f}")
    bar.close()
    elapsed = time.time() - t_epoch
    record = {f"train_{k}": np.asarray(sum(np.asarray(m[k], np.float64) for m in finite) / len(finite)).tolist()
              for k in (finite[0] if finite else ()) if k not in ("nonfinite", "lr")}
    record["skipped_steps"] = skipped
    # The rate the optimizer used in the epoch's last step (the schedule only changes between epochs).
    record["lr"] = float(setup.lr_schedule(epoch_end - 1))
    return state, record, {"epoch_time_s": round(elapsed, 2), "img_per_s": round(images_seen / elapsed, 1)}


def _summary(config, ds: data_lib.Dataset, setup: RunSpec, history: list[dict], t_start: float,
             teacher_summary: dict | None, mesh_info: dict) -> dict:
    final = history[-1] if history else {}
    accs = {"final_test_acc": final.get("test_acc_per_replica"),
            "best_test_acc": np.max([r["test_acc_per_replica"] for r in history], axis=0).tolist() if history else []}
    summary = {
        "method": setup.method.method.name, "student": config.student.model, "dataset": ds.name,
        "replicas": setup.num_replicas, "epochs": config.num_epochs, "data_order": setup.data_order,
        "loss": {"ce_weight": setup.method.ce_weight, "kd_weight": setup.method.kd_weight,
                 "warmup_epochs": setup.method.warmup_epochs, "teacher_reduction": setup.method.reduction,
                 "feature_term": setup.method.feature_term, "nesterov": setup.method.nesterov},
        **accs,
        **{f"{k}_{stat}": float(fn(a)) if history else None  # final_test_acc_mean, ..., best_test_acc_std
           for k, a in accs.items() for stat, fn in (("mean", np.mean), ("std", np.std))},
        "img_per_s": float(np.median([r["img_per_s"] for r in history])) if history else None,
        "wall_time_s": round(time.time() - t_start, 1),
        "skipped_steps": int(sum(r.get("skipped_steps", 0) for r in history)),  # resumed epochs included
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax_version": jax.__version__, "mesh": mesh_info,
    }
    if teacher_summary:
        summary["teachers"] = teacher_summary
    if setup.method.method.teachers == "none" and setup.num_replicas > 1:
        summary["ensemble_test_acc"] = final.get("ensemble_test_acc")
    return summary


def fit(config: ml_collections.ConfigDict, workdir: pathlib.Path, ds: data_lib.Dataset,
        teachers: Teachers | None) -> tuple[dict, TrainState]:
    """Trains the run's replicas in ``workdir`` (resuming from its newest good checkpoint), evaluating after every
    epoch; writes ``metrics.jsonl`` and ``summary.json``; returns the summary and the final state."""
    t_start = time.time()
    log = parallel.primary_only(print)
    run = _prepare_run(config, ds, teachers)
    setup = run.setup
    steps_per_epoch = setup.steps_per_epoch
    total_steps = steps_per_epoch * config.num_epochs
    teacher_summary = None if teachers is None else _evaluate_teachers(run, teachers, log)

    checkpointer = ckpt_lib.TrainCheckpointer(
        workdir / "checkpoints", keep_last=config.checkpoint.keep_last, keep_best=config.checkpoint.keep_best,
        delete_corrupt=config.checkpoint.delete_corrupt,
        restart_if_all_corrupt=config.checkpoint.restart_if_all_corrupt, log=log)
    metrics_log = workdir_lib.MetricsLog(workdir, writable=parallel.is_primary())
    state, history = _restore_or_init(run, workdir, checkpointer, metrics_log, log)
    step = int(jax.device_get(state.step))
    best = max((r["test_acc"] for r in history), default=float("-inf"))
    mesh_info = parallel.describe(setup.mesh, config)
    if step == 0:
        log(f"{setup.method.method.name}: {config.student.model} x {setup.num_replicas} on {ds.name} "
            f"({ds.num_train} train / {ds.num_test} test, {setup.data_order} data order), "
            f"{steps_per_epoch} steps/epoch x {config.num_epochs} epochs; initial compilation...")
    log(f"mesh: {mesh_info['devices']} {mesh_info['platform']} device(s) on axis 'data' "
        f"({mesh_info['processes']} process(es)), {mesh_info['per_device_batch']} examples per device per step, "
        f"dataset {mesh_info['dataset']}")

    while step < total_steps:
        epoch = step // steps_per_epoch + 1
        state, train_record, timing = _train_epoch(run, state, epoch)
        step = epoch * steps_per_epoch
        epoch_acc, ensemble_acc = _test_accuracy(
            run, run.student_eval, {"params": state.params["student"], "batch_stats": state.batch_stats["student"]})
        acc = float(np.mean(epoch_acc))
        best = max(best, acc)
        record = {"epoch": epoch, "step": step, **train_record, "test_acc": acc, "test_acc_per_replica": epoch_acc,
                  "best_test_acc": best, **timing}
        if setup.num_replicas > 1 and setup.method.method.teachers == "none":
            record["ensemble_test_acc"] = ensemble_acc
        metrics_log.write(record)
        history.append(record)
        log(f"epoch {epoch}/{config.num_epochs}: loss {record.get('train_loss', math.nan):.4f} "
            f"train {record.get('train_accuracy', math.nan):.2f}% "
            f"test {acc:.2f}% (best {best:.2f}%) {record['img_per_s']:.0f} img/s"
            + (f"; skipped {record['skipped_steps']} non-finite steps" if record["skipped_steps"] else ""))
        if epoch % config.checkpoint.every_epochs == 0 or step == total_steps:
            checkpointer.save(step, state, test_acc=acc, records=history)
    checkpointer.close()

    summary = _summary(config, ds, setup, history, t_start, teacher_summary, mesh_info)
    if parallel.is_primary():
        ckpt_lib.write_json_atomic(workdir / "summary.json", summary)
    log("summary: " + json.dumps(summary))
    return summary, state
