"""The trainer: teacher ensembles, one step of every method, loss wiring, no recompiles, exact resume, eval."""

import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from demkd_jax import checkpoint as ckpt_lib
from demkd_jax import config as config_lib
from demkd_jax import data as data_lib
from demkd_jax import methods, models, train
from demkd_jax import validation
from conftest import TINY_CLASSES as NUM_CLASSES
from conftest import TINY_OVERRIDES, apply_overrides, repo_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, cache_dir, **overrides):
    """The shared tiny config (conftest.TINY_OVERRIDES) as a DE-MKD run, with overrides."""
    c = config_lib.base_config()
    apply_overrides(c, {**TINY_OVERRIDES, "distill.method": "demkd", "data.path": str(data_dir),
                        "data.cache_dir": str(cache_dir)})
    return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def cache_dir(tiny_cache):
    return tiny_cache


@pytest.fixture(scope="module")
def teacher_run(data_dir, cache_dir, tmp_path_factory):
    """Two resnet8 teachers trained at once (method 'ce', ensemble_size 2) for one epoch."""
    workdir = tmp_path_factory.mktemp("teachers")
    config = tiny_config(data_dir, cache_dir, **{"distill.method": "ce", "ensemble_size": 2, "num_epochs": 1,
                                                 "student.width": 0.5})
    summary = train.train_and_evaluate(config, str(workdir))
    return workdir, summary


def test_teacher_ensemble_writes_loadable_teachers(teacher_run):
    workdir, summary = teacher_run
    assert summary["replicas"] == 2 and summary["ensemble_test_acc"] is not None
    assert len(summary["final_test_acc"]) == 2
    for k, d in enumerate(summary["teacher_dirs"]):
        variables, meta = ckpt_lib.load_teacher(d, model_name="resnet8", num_classes=NUM_CLASSES)
        assert meta["member"] == k and meta["test_acc"] == summary["final_test_acc"][k]
        assert models.count_params(variables["params"]) > 0
    # The two members were initialised differently.
    a, _ = ckpt_lib.load_teacher(summary["teacher_dirs"][0])
    b, _ = ckpt_lib.load_teacher(summary["teacher_dirs"][1])
    assert not np.array_equal(a["params"]["fc"]["kernel"], b["params"]["fc"]["kernel"])


def build(config, workdir=None):
    ds = data_lib.load_dataset(config.data)
    teachers = train.prepare_teachers(config, workdir, ds)
    setup = train.build_setup(config, ds, teachers)
    return ds, teachers, setup


@pytest.mark.parametrize("method", methods.METHOD_NAMES)
def test_one_step_of_every_method(method, teacher_run, data_dir, cache_dir):
    dirs = teacher_run[1]["teacher_dirs"]
    single = methods.get(method).teachers == "one"
    overrides = {"distill.method": method, "teachers.checkpoints": tuple(dirs[:1] if single else dirs)}
    if method == "fitnet_mkd":
        overrides["distill.hint_layer"] = 1
    config = tiny_config(data_dir, cache_dir, **overrides)
    validation.validate(config)
    ds, teachers, setup = build(config)
    state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
    teacher_vars = None if teachers is None else jax.device_put(teachers.variables)
    teacher_copy = jax.device_get(teacher_vars)
    step_fn = jax.jit(train.make_train_step(setup), donate_argnums=(0,))
    perm = train.epoch_permutation_fn(config, ds.train_images.shape[0])
    images, labels = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)
    for epoch in (1, 2):  # two epochs' permutations: still one compilation
        state, metrics = step_fn(state, teacher_vars, images, labels, perm(epoch))
    metrics = jax.device_get(metrics)
    chex.assert_tree_all_finite(metrics)
    assert int(state.step) == 2 and metrics["nonfinite"] == 0
    expected_terms = {"ce": {"ce"}, "fitnet_mkd": {"ce", "logit", "hint"}}.get(method, {"ce", "logit"})
    if method in ("demkd", "camkd"):
        expected_terms = expected_terms | {"feature"}
    assert expected_terms <= set(metrics), sorted(metrics)
    if teachers is not None:
        chex.assert_shape(metrics["teacher_weight"], (setup.num_teachers,))
        # Teachers are an input, never updated: variables (BN statistics included) are bit-identical.
        chex.assert_trees_all_equal(jax.device_get(teacher_vars), teacher_copy)
    assert step_fn._cache_size() == 1, "the step recompiled"


@pytest.fixture(scope="module")
def demkd_setup(teacher_run, data_dir, cache_dir):
    config = tiny_config(data_dir, cache_dir, **{"teachers.checkpoints": tuple(teacher_run[1]["teacher_dirs"])})
    ds, teachers, setup = build(config)
    step_fn = jax.jit(train.make_train_step(setup))
    return config, ds, teachers, setup, step_fn


def test_loss_is_ce_plus_warmed_logit_plus_feature_from_epoch_2(demkd_setup):
    config, ds, teachers, setup, step_fn = demkd_setup
    state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
    perm = train.epoch_permutation_fn(config, ds.train_images.shape[0])
    args = (jax.device_put(teachers.variables), jax.device_put(ds.train_images), jax.device_put(ds.train_labels))
    _, m1 = step_fn(state, *args, perm(1))
    m1 = jax.device_get(m1)
    np.testing.assert_allclose(m1["loss"], m1["ce"] + m1["logit"] / 20, rtol=1e-5)  # warm-up 1/20, no features
    state2 = state.replace(step=jnp.int32(setup.steps_per_epoch))  # first step of epoch 2
    _, m2 = step_fn(state2, *args, perm(2))
    m2 = jax.device_get(m2)
    np.testing.assert_allclose(m2["loss"], m2["ce"] + m2["logit"] * 2 / 20 + 50.0 * m2["feature"], rtol=1e-5)
    np.testing.assert_allclose(m2["teacher_weight"].sum(), 1.0, rtol=1e-5)  # camkd-form entropy weights


def test_eval_counts_every_example_once(demkd_setup):
    config, ds, teachers, setup, _ = demkd_setup
    model, n = setup.teacher, ds.test_images.shape[0]
    assert n % config.eval_batch_size != 0
    eval_fn = jax.jit(train.make_eval_fn(model, "loop", n, config.eval_batch_size, ds.mean, ds.std, jnp.float32))
    correct, ens = jax.device_get(eval_fn(teachers.variables, ds.test_images, ds.test_labels))
    # Independent count: every example through every teacher, no batching.
    x = data_lib.normalize(ds.test_images, ds.mean, ds.std)
    logits = np.stack([np.asarray(model.apply(jax.tree_util.tree_map(lambda a: a[k], teachers.variables), x,
                                              train=False)[0]) for k in range(setup.num_teachers)])
    np.testing.assert_array_equal(correct, (logits.argmax(-1) == ds.test_labels[None]).sum(1))
    probs = jax.nn.softmax(logits, -1).mean(0)
    assert int(ens) == int((np.asarray(probs).argmax(-1) == ds.test_labels).sum())


def test_sgd_is_pytorch_sgd_with_coupled_weight_decay_and_step_schedule():
    config = config_lib.base_config()
    config.num_epochs = 4
    config.optim.update(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, lr_decay_epochs=(2, 3))
    spe = 3
    schedule = train.lr_schedule(config, spe)
    tx = train.make_optimizer(config, schedule, nesterov=True)
    rng = np.random.default_rng(0)
    p = rng.normal(size=5)
    grads = rng.normal(size=(4 * spe, 5))
    params, opt_state = jnp.asarray(p), tx.init(jnp.asarray(p))
    ref, buf = p.copy(), np.zeros(5)
    for t, g in enumerate(grads):
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
        params = params + updates
        # torch.optim.SGD(nesterov=True, weight_decay=wd), lr x0.1 at epochs 2 and 3
        lr = 0.1 * 0.1 ** sum(t >= e * spe for e in (2, 3))
        d = g + 5e-4 * ref
        buf = 0.9 * buf + d
        ref = ref - lr * (d + 0.9 * buf)
        assert float(schedule(t)) == pytest.approx(lr)
    np.testing.assert_allclose(params, ref, rtol=1e-5, atol=1e-6)


def _restore_latest(workdir, abstract):
    ckpt = ckpt_lib.TrainCheckpointer(pathlib.Path(workdir) / "checkpoints")
    step = ckpt.latest_step()
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return step, jax.device_get(state)


def test_resume_continues_exactly(teacher_run, data_dir, cache_dir, tmp_path, demkd_setup):
    dirs = tuple(teacher_run[1]["teacher_dirs"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = tiny_config(data_dir, cache_dir, **{"teachers.checkpoints": dirs})
    summary = train.train_and_evaluate(config, str(straight))
    train.train_and_evaluate(tiny_config(data_dir, cache_dir, **{"teachers.checkpoints": dirs, "num_epochs": 1}),
                             str(resumed))
    summary_resumed = train.train_and_evaluate(config, str(resumed))  # picks up at the end of epoch 1
    setup = demkd_setup[3]
    abstract = jax.eval_shape(lambda: train.init_state(setup, jax.random.PRNGKey(0)))
    step_a, state_a = _restore_latest(straight, abstract)
    step_b, state_b = _restore_latest(resumed, abstract)
    assert step_a == step_b == 2 * setup.steps_per_epoch
    chex.assert_trees_all_equal(state_a, state_b)
    assert summary["final_test_acc"] == summary_resumed["final_test_acc"]
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "metrics.jsonl holds each epoch once after a resume"


def test_config_errors_name_the_problem(data_dir, cache_dir, teacher_run):
    dirs = tuple(teacher_run[1]["teacher_dirs"])
    with pytest.raises(config_lib.ConfigError, match="method 'kd' distils from exactly 1 teacher, got 2"):
        validation.validate(tiny_config(data_dir, cache_dir, **{"distill.method": "kd", "teachers.checkpoints": dirs}))
    with pytest.raises(config_lib.ConfigError, match="K must be >= 2"):
        validation.validate(tiny_config(data_dir, cache_dir, **{"teachers.checkpoints": dirs[:1]}))
    with pytest.raises(config_lib.ConfigError, match="unknown method 'dkdd'"):
        validation.validate(tiny_config(data_dir, cache_dir, **{"distill.method": "dkdd"}))


def test_cli_runs_the_demo_pipeline(tmp_path):
    """README's first command, at a tiny size: teachers then a DE-MKD student, through the CLI."""
    cmd = [sys.executable, "-m", "demkd_jax.main", "--config", str(REPO / "configs" / "demo.py"),
           "--workdir", str(tmp_path / "demo"), "--config.num_epochs=1", "--config.teachers.num_epochs=1",
           "--config.teachers.num=2", "--config.teachers.model=resnet8", "--config.progress_bar=False",
           f"--config.data.cache_dir={tmp_path / 'cache'}"]
    env = repo_env(JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "summary:" in out.stdout and (tmp_path / "demo" / "summary.json").is_file()
    assert (tmp_path / "demo" / "teachers" / "teacher_1" / "teacher.json").is_file()
    bad = subprocess.run(cmd[:-1] + ["--config.distill.method=nope"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_winograd_auto_is_cpu_float32_and_teacher_training_follows_the_teachers(make_config):
    assert train.resolve_winograd("auto", jnp.float32) == (jax.default_backend() == "cpu")
    assert not train.resolve_winograd("auto", jnp.bfloat16)
    assert train.resolve_winograd("on", jnp.bfloat16) and not train.resolve_winograd("off", jnp.float32)
    config = make_config(**{"teachers.model": "resnet8"})
    assert config.student.winograd == config.teachers.winograd == "auto"
    for mode in ("auto", "on", "off"):
        config.teachers.winograd = mode
        assert train.teacher_config(config).student.winograd == mode


# ---------------------------------------------------------------------------------------------------------
# Schedule, skipped steps, connectors, data order, image geometry


def multistep_lr(lr0, gamma, milestones, epoch):
    """PyTorch MultiStepLR stepped once per epoch: epoch e (1-based) runs at lr0 * gamma ** #{m in milestones: m < e}."""
    return lr0 * gamma ** sum(1 for m in milestones if m < epoch)


@pytest.mark.parametrize("milestones", [(2, 2, 3), (1, 2, 5, 6), (0, 3), (3, 3, 3), (5, 9, 100), ()])
def test_schedule_is_multistep_lr_with_repeated_milestones(milestones):
    config = config_lib.base_config()
    config.num_epochs = 7
    config.optim.update(learning_rate=0.05, lr_decay_rate=0.1, lr_decay_epochs=milestones)
    spe = 4
    schedule = train.lr_schedule(config, spe)
    for step in range(config.num_epochs * spe):
        want = multistep_lr(0.05, 0.1, milestones, step // spe + 1)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6), (milestones, step)
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
    for epoch in range(1, config.num_epochs + 1):
        assert float(schedule((epoch - 1) * spe)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), epoch
        opt.step()
        sched.step()


def _step_fn_and_args(setup, teachers, ds):
    step_fn = jax.jit(train.make_train_step(setup))
    args = (None if teachers is None else jax.device_put(teachers.variables), jax.device_put(ds.train_images),
            jax.device_put(ds.train_labels))
    return step_fn, args


def test_skipped_step_keeps_the_schedule_in_step_and_logs_the_rate(demkd_setup):
    config, ds, teachers, setup, step_fn = demkd_setup
    state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
    perm = train.epoch_permutation_fn(config, ds.train_images.shape[0])(1)
    args = (jax.device_put(teachers.variables), jax.device_put(ds.train_images), jax.device_put(ds.train_labels))
    poisoned = state.replace(params=jax.tree_util.tree_map(lambda a: a.at[...].set(jnp.nan), state.params))
    new, m = step_fn(poisoned, *args, perm)
    assert int(m["nonfinite"]) == setup.num_replicas and int(new.step) == 1
    np.testing.assert_array_equal(optax.tree.get(new.opt_state, "count"), np.ones(setup.num_replicas))
    chex.assert_trees_all_equal(optax.tree.get(new.opt_state, "count"), optax.tree.get(
        step_fn(state, *args, perm)[0].opt_state, "count"))
    assert float(m["lr"]) == pytest.approx(float(setup.lr_schedule(0)))


def test_connectors_are_frozen_until_the_feature_term_starts(demkd_setup):
    config, ds, teachers, setup, step_fn = demkd_setup
    assert config.distill.feature_start_epoch == 2
    state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
    perms = train.epoch_permutation_fn(config, ds.train_images.shape[0])
    args = (jax.device_put(teachers.variables), jax.device_put(ds.train_images), jax.device_put(ds.train_labels))
    s1, _ = step_fn(state, *args, perms(1))
    chex.assert_trees_all_equal(s1.params["connectors"], state.params["connectors"])
    momentum = jax.tree_util.tree_leaves(optax_trace(s1.opt_state)["connectors"])
    assert all(np.all(np.asarray(t) == 0) for t in momentum), "connector momentum before the feature term"
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(s1.params["student"])[0]),
                              np.asarray(jax.tree_util.tree_leaves(state.params["student"])[0]))
    s2, _ = step_fn(state.replace(step=jnp.int32(setup.steps_per_epoch)), *args, perms(2))
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                                     s2.params["connectors"], state.params["connectors"])
    assert all(jax.tree_util.tree_leaves(changed)), "the connectors train from the feature term's first epoch"


def optax_trace(opt_state):
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
             if isinstance(s, optax.TraceState)]
    assert len(found) == 1
    return found[0].trace


def test_feature_warmup_ramps_the_feature_term(teacher_run, data_dir, cache_dir):
    config = tiny_config(data_dir, cache_dir, **{"teachers.checkpoints": tuple(teacher_run[1]["teacher_dirs"]),
                                                 "distill.feature_warmup_epochs": 4})
    ds, teachers, setup = build(config)
    step_fn, args = _step_fn_and_args(setup, teachers, ds)
    state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
    perm = train.epoch_permutation_fn(config, ds.train_images.shape[0])
    for epoch, ramp in ((2, 0.25), (3, 0.5)):
        _, m = step_fn(state.replace(step=jnp.int32((epoch - 1) * setup.steps_per_epoch)), *args, perm(epoch))
        m = jax.device_get(m)
        np.testing.assert_allclose(m["loss"], m["ce"] + m["logit"] * epoch / 20 + 50.0 * ramp * m["feature"],
                                   rtol=1e-5)


def test_camkd_detach_switch_changes_the_student_update(teacher_run, data_dir, cache_dir):
    dirs = tuple(teacher_run[1]["teacher_dirs"])
    updates = []
    for detach in (False, True):
        config = tiny_config(data_dir, cache_dir, **{"distill.method": "camkd", "teachers.checkpoints": dirs,
                                                     "distill.camkd_detach_feature_weights": detach})
        ds, teachers, setup = build(config)
        step_fn, args = _step_fn_and_args(setup, teachers, ds)
        state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
        perm = train.epoch_permutation_fn(config, ds.train_images.shape[0])(2)
        new, m = step_fn(state.replace(step=jnp.int32(setup.steps_per_epoch)), *args, perm)
        updates.append((float(m["feature"]), jax.device_get(new.params["student"])))
    assert updates[0][0] == pytest.approx(updates[1][0], rel=1e-6)  # same value, different gradient
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), updates[0][1], updates[1][1])
    assert max(jax.tree_util.tree_leaves(diffs)) > 0


def test_teacher_ensembles_get_independent_data_orders_students_share_one(data_dir, cache_dir):
    ens = tiny_config(data_dir, cache_dir, **{"distill.method": "ce", "ensemble_size": 3})
    assert config_lib.data_order(ens) == "per_replica"
    perms = np.asarray(train.epoch_permutation_fn(ens, 96)(1))
    chex.assert_shape(perms, (3, 96))
    assert all(sorted(p) == list(range(96)) for p in perms)
    assert len({tuple(p) for p in perms}) == 3
    assert not np.array_equal(perms, np.asarray(train.epoch_permutation_fn(ens, 96)(2)))
    students = tiny_config(data_dir, cache_dir, **{"num_seeds": 3})
    assert config_lib.data_order(students) == "shared"
    shared = np.asarray(train.epoch_permutation_fn(students, 96)(1))
    np.testing.assert_array_equal(shared, data_lib.epoch_permutation(jax.random.PRNGKey(0), 0, 96))
    ens.data_order = "shared"
    chex.assert_shape(train.epoch_permutation_fn(ens, 96)(1), (96,))
    with pytest.raises(config_lib.ConfigError, match="data_order='per_replica' with method 'demkd'"):
        validation.validate(tiny_config(data_dir, cache_dir, **{"data_order": "per_replica",
                                                                "teachers.model": "resnet8"}))


def test_teacher_ensemble_summary_says_per_replica(teacher_run):
    assert teacher_run[1]["data_order"] == "per_replica"
    meta = ckpt_lib.read_teacher_meta(teacher_run[1]["teacher_dirs"][0])
    assert meta["data_order"] == "per_replica"


def _random_teachers(name, num, num_classes, width):
    model = models.create_model(name, num_classes, width=width)
    members = [jax.device_get(models.init_variables(model, jax.random.PRNGKey(10 + k))) for k in range(num)]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *members)
    return train.Teachers(name, width, stacked, (), False)


@pytest.mark.parametrize("size", [16, 64])
def test_demkd_with_features_at_other_image_sizes(size, tmp_path, cache_dir):
    from conftest import write_tiny_npz

    root = write_tiny_npz(tmp_path / f"tiny{size}", size=size, n_train=32, n_test=8)
    config = tiny_config(root, cache_dir, **{"data.image_size": size, "teachers.model": "resnet8",
                                             "teachers.num": 2, "distill.warmup_epochs": 1})
    ds = data_lib.load_dataset(config.data)
    chex.assert_shape(ds.train_images, (32, size, size, 3))
    teachers = _random_teachers("resnet8", 2, NUM_CLASSES, 0.25)
    setup = train.build_setup(config, ds, teachers)
    assert setup.image_shape == (size, size, 3)
    step_fn, args = _step_fn_and_args(setup, teachers, ds)
    state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
    perm = train.epoch_permutation_fn(config, 32)(2)
    state, m = step_fn(state.replace(step=jnp.int32(setup.steps_per_epoch)), *args, perm)
    m = jax.device_get(m)
    chex.assert_tree_all_finite(m)
    assert m["feature"] > 0 and int(m["nonfinite"]) == 0
