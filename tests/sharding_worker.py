"""Runs in a subprocess of ``tests/test_sharding.py`` with 8 CPU devices; writes what it saw to ``OUT``.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py SPEC.json OUT_DIR

``SPEC.json``: ``{"config": {dotted key: value}, "runs": [{"name", "workdir", "config": {...}}, ...]}``; each run
is ``train.train_and_evaluate`` on the tiny config with its overrides (runs sharing a workdir resume each other).
For every run the worker records the per-step metrics and the shardings the trainer passed to and got from
its jitted step (by wrapping :func:`demkd_jax.train.jit_train_step`), the number of compilations of the step,
the compiled step's collectives and convolution batch sizes, and the final state restored from the last
checkpoint (``OUT/<name>.npz``). Then it runs the negative control and the config checks.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys
import time

import jax
import numpy as np

COMPILES: collections.Counter = collections.Counter()


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[kwargs.get("fun_name", "?")] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)

from demkd_jax import checkpoint as ckpt_lib  # noqa: E402
from demkd_jax import config as config_lib  # noqa: E402
from demkd_jax import parallel, train, validation  # noqa: E402


def make_config(overrides: dict):
    c = config_lib.base_config()
    for key, value in overrides.items():
        target = c
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = tuple(value) if isinstance(value, list) else value
    return c


def sharding_info(tree) -> dict:
    leaves = jax.tree_util.tree_leaves(tree)
    return {
        "replicated": all(a.sharding.is_fully_replicated for a in leaves),
        "num_devices": sorted({len(a.sharding.device_set) for a in leaves}),
    }


class Recorder:
    """Wraps the trainer's jitted step: per-step metrics, argument/result shardings, the jitted function.

    A run that trains its teachers first builds two steps; ``jitted``, ``args`` and ``abstract`` describe the
    last one, ``steps`` holds every step of both in order.
    """

    def __init__(self):
        self.steps: list[dict] = []
        self.jitted = None
        self.args = None
        self.original = train.jit_train_step

    def __call__(self, setup):
        fn = self.original(setup)
        self.jitted = fn
        self.args = None

        def step(state, teacher_vars, images, labels, perm):
            if self.args is None:
                self.args = {"state": sharding_info(state), "teachers": sharding_info(teacher_vars),
                             "images_spec": str(images.sharding.spec), "images_shape": list(images.shape),
                             "images_shard_shape": list(images.addressable_shards[0].data.shape),
                             "perm": sharding_info(perm)}
                self.abstract = jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                    (state, teacher_vars, images, labels, perm))
            new_state, metrics = fn(state, teacher_vars, images, labels, perm)
            m = jax.device_get(metrics)
            self.steps.append({"loss": float(m["loss"]), "feature": float(m.get("feature", np.nan)),
                               "logit": float(m.get("logit", np.nan)), "state": sharding_info(new_state),
                               "metrics": sharding_info(metrics)})
            return new_state, metrics

        return step


def compiled_facts(jitted, abstract) -> dict:
    """Collectives and convolution batch sizes of the partitioned (per-device) step program."""
    text = jitted.lower(*abstract).compile().as_text()
    conv_batches = collections.Counter()  # batch size of every convolution whose output is an activation
    for line in text.splitlines():
        m = re.search(r"= f32\[(\d+),(\d+),(\d+),\d+\]\{[^}]*\} convolution\(", line)
        if m and m.group(2) == m.group(3) and int(m.group(2)) > 3:  # [B, H, W, C]; kernels are [C, k, k, C]
            conv_batches[int(m.group(1))] += 1
    return {"all_reduce": len(re.findall(r"\ball-reduce(?:-start)?\(", text)),
            "conv_output_batches": dict(conv_batches)}


def final_state(workdir: str, abstract_state) -> dict[str, np.ndarray]:
    """The last checkpoint of a run, flattened to ``{path: array}``."""
    ckpt = ckpt_lib.TrainCheckpointer(pathlib.Path(workdir) / "checkpoints")
    restored = jax.device_get(ckpt.restore(ckpt.latest_step(), abstract_state))
    ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in flat}


def local_bn_control(base: dict) -> dict:
    """Negative control: BatchNorm with per-device statistics (shard_map, no axis_name) vs the global batch.

    One train-mode forward of the student on a batch split over the 8 devices; what the trainer does (jit over
    a sharded batch) must equal the one-device forward, and per-shard statistics must be far from it, so the
    1-vs-8 comparison is sensitive to exactly the bug it guards against.
    """
    from demkd_jax import models

    config = make_config(base)
    model = models.create_model(config.student.model, config.data.num_classes, width=config.student.width)
    variables = models.init_variables(model, jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (config.batch_size, 32, 32, 3)) * 2.0 + 0.5

    def forward(x):
        (logits, _), upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, upd["batch_stats"]

    mesh = parallel.make_mesh(8)
    one = jax.jit(forward)(jax.device_put(x, jax.devices()[0]))
    sharded = jax.jit(forward, in_shardings=parallel.batch_sharding(mesh),
                      out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))(
        jax.device_put(x, parallel.batch_sharding(mesh)))
    local = jax.jit(jax.shard_map(lambda x: forward(x)[0], mesh=mesh, in_specs=jax.P("data"),
                                  out_specs=jax.P("data")))(jax.device_put(x, parallel.batch_sharding(mesh)))

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    stats_diff = max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(sharded[1]),
                                               jax.tree_util.tree_leaves(one[1])))
    return {"global_vs_one_logits": rel(sharded[0], one[0]), "global_vs_one_stats": stats_diff,
            "local_vs_one_logits": rel(local, one[0])}


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    out = pathlib.Path(out_dir)
    parallel.initialize_distributed("auto")  # before the first device query (the trainer would do it later)
    multiprocess = jax.process_count() > 1
    if multiprocess:
        out = out / f"process_{jax.process_index()}"
        out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device_count": jax.device_count(), "process_count": jax.process_count(),
                    "local_device_count": jax.local_device_count(), "runs": {}}
    for run in spec["runs"]:
        overrides = {**spec["config"], **run.get("config", {})}
        config = make_config(overrides)
        recorder = Recorder()
        train.jit_train_step = recorder
        COMPILES.clear()
        t0 = time.time()
        try:
            summary = train.train_and_evaluate(config, run["workdir"])
        finally:
            train.jit_train_step = recorder.original
        seconds = time.time() - t0
        compiles = dict(COMPILES)
        entry = {"seconds": round(seconds, 1), "steps": recorder.steps, "args": recorder.args,
                 "compiles": compiles,
                 "cache_size": recorder.jitted._cache_size(), "mesh": summary["mesh"],
                 "metrics": [json.loads(line) for line in
                             (pathlib.Path(run["workdir"]) / "metrics.jsonl").read_text().splitlines()]}
        if run.get("inspect"):
            t0 = time.time()
            entry["compiled"] = compiled_facts(recorder.jitted, recorder.abstract)
            entry["inspect_seconds"] = round(time.time() - t0, 1)
        np.savez(out / f"{run['name']}.npz", **final_state(run["workdir"], recorder.abstract[0]))
        report["runs"][run["name"]] = entry
    if spec.get("controls", True):
        t0 = time.time()
        report["local_bn"] = local_bn_control(spec["config"])
        report["local_bn_seconds"] = round(time.time() - t0, 1)
    errors = {}
    for name, overrides in spec.get("invalid", {}).items():
        try:
            validation.validate(make_config({**spec["config"], **overrides}))
            errors[name] = None
        except config_lib.ConfigError as e:
            errors[name] = str(e)
    report["config_errors"] = errors
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
