"""Throughput of the real compiled distillation step, as JSON lines.

    python benchmarks/step_speed.py --config configs/vgg8.py --batch 64 --dtype float32

builds the step that ``train_and_evaluate`` compiles for the config (random teachers of the config's
architecture, BN-folded as in training; a device-resident uint8 dataset) and prints one JSON line per
variant: the DE-MKD step with teachers vmapped and looped, with and without the feature term, plus two
reference points: the K teachers' forward alone and the student-only CE step. Times are after warm-up,
with ``block_until_ready``; ``dispatch_ms`` is how long the host took to enqueue the timed steps (far
below ``ms_per_step`` x steps when dispatch is asynchronous). Without ``--batch``/``--dtype`` it sweeps
batch 64/256/1024 x float32/bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demkd_jax import data as data_lib  # noqa: E402
from demkd_jax import hugepages  # noqa: E402
from demkd_jax import models, train  # noqa: E402


@dataclasses.dataclass
class FakeDataset:
    """What build_setup needs of a dataset, with random uint8 images resident on the device."""

    train_images: np.ndarray
    train_labels: np.ndarray
    num_classes: int
    mean: tuple = (0.5071, 0.4867, 0.4408)
    std: tuple = (0.2675, 0.2565, 0.2761)

    @property
    def num_train(self) -> int:
        return len(self.train_images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def random_teachers(config, num_classes: int) -> train.Teachers:
    t = config.teachers
    model = models.create_model(t.model, num_classes, width=t.width)
    init = jax.jit(lambda key: models.init_variables(model, key))
    members = []
    for k in range(t.num):
        v = init(jax.random.PRNGKey(100 + k))
        # Non-trivial BN statistics, as a trained teacher has.
        v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
            lambda a: a + 0.1 * jnp.abs(jax.random.normal(jax.random.PRNGKey(k), a.shape)), v["batch_stats"])}
        members.append(jax.device_get(v))
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *members)
    if t.fold_bn:
        stacked = jax.vmap(models.fold_batchnorm)(stacked)
    return train.Teachers(t.model, t.width, stacked, (), bool(t.fold_bn))


def page_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` does not exist)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_fn(fn, args_fn, steps: int, warmup: int):
    """Returns (compile+first-call seconds, dispatch ms for `steps` calls, ms per step, page faults per step)."""
    t0 = time.perf_counter()
    out = fn(*args_fn())
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        out = fn(*args_fn(out))
    jax.block_until_ready(out)
    faults = page_faults()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(*args_fn(out))
    dispatched = time.perf_counter() - t0
    jax.block_until_ready(out)
    total = time.perf_counter() - t0
    return first, 1e3 * dispatched, 1e3 * total / steps, (page_faults() - faults) / steps


def bench_variant(config, ds, teachers, *, name, batch, dtype, features, execution, steps, warmup, seeds=1):
    c = config.copy_and_resolve_references()
    c.unlock()
    c.num_seeds = seeds
    c.batch_size = batch
    c.dtype = dtype
    c.distill.features = features
    c.teachers.execution = execution
    c.lock()
    images = jax.device_put(ds.train_images)
    labels = jax.device_put(ds.train_labels)
    n = ds.train_images.shape[0]
    perm = jax.device_put(data_lib.epoch_permutation(jax.random.PRNGKey(0), 0, n))
    if name == "student_ce":
        c.unlock()
        c.distill.method = "ce"
        c.lock()
        teachers = None
    setup = train.build_setup(c, ds, teachers)
    teacher_vars = None if teachers is None else jax.device_put(teachers.variables)
    if name == "teacher_forward":
        mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)

        def forward(step, teacher_vars, images, perm):
            idx = data_lib.batch_indices_from_permutation(perm, step, batch)
            x = data_lib.augment(images[idx], jax.random.fold_in(jax.random.PRNGKey(1), step), mean, std)
            logits, feats = train.teacher_forward(setup, teacher_vars, x.astype(jnp.dtype(dtype)))
            return step + 1, logits, feats

        fn = jax.jit(forward)
        args = lambda out=None: (jnp.int32(0) if out is None else out[0], teacher_vars, images, perm)
    else:
        state = jax.jit(lambda: train.init_state(setup, jax.random.PRNGKey(0)))()
        fn = jax.jit(train.make_train_step(setup), donate_argnums=(0,))
        holder = {"state": state}

        def args(out=None):
            if out is not None:
                holder["state"] = out[0]
            return holder["state"], teacher_vars, images, labels, perm

    first, dispatch_ms, ms, faults = time_fn(fn, args, steps, warmup)
    return {
        "name": name, "config": c.student.model if name == "student_ce" else f"{c.teachers.num}x{c.teachers.model}->"
        f"{c.student.model}", "method": c.distill.method, "batch": batch, "dtype": dtype,
        "features": bool(features) if name not in ("teacher_forward", "student_ce") else None,
        "num_seeds": seeds if name != "teacher_forward" else None,
        "winograd": {"student": train.resolve_winograd(c.student.winograd, dtype),
                     "teachers": train.resolve_winograd(c.teachers.winograd, dtype)},
        "teachers_execution": setup.teacher_execution if name != "student_ce" else None,
        "img_per_s": round(batch / ms * 1e3, 1), "ms_per_step": round(ms, 2), "dispatch_ms": round(dispatch_ms, 2),
        "image_size": int(ds.train_images.shape[1]), "steps": steps, "compile_and_first_s": round(first, 2),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(), "jax_version": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "page_faults_per_step": round(faults),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "vgg8.py"))
    p.add_argument("--batch", type=int, nargs="*", default=None, help="default: 64 256 1024")
    p.add_argument("--dtype", nargs="*", default=None, help="default: float32 bfloat16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first")
    p.add_argument("--variants", nargs="*", default=None,
                   help="subset of: demkd_loop demkd_vmap demkd_logits_loop demkd_logits_vmap teacher_forward "
                        "student_ce")
    p.add_argument("--width", type=float, default=None, help="override student and teacher width (CI: tiny)")
    p.add_argument("--teachers", type=int, default=None, help="override the number of teachers")
    p.add_argument("--student", default=None, help="override the student model")
    p.add_argument("--teacher", default=None, help="override the teacher model")
    p.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="students trained in one graph (config.num_seeds); several values sweep, e.g. 1 3")
    p.add_argument("--winograd", choices=("auto", "on", "off"), default=None,
                   help="Winograd F(2x2,3x3) for the small-map 3x3 convolutions of student and teachers "
                        "(default: the config's, 'auto' for both: on for CPU float32)")
    p.add_argument("--dataset-size", type=int, default=4096, help="images resident on the device")
    p.add_argument("--image-size", type=int, default=32,
                   help="height = width of the random images (16: CIFAR mean-pooled by data.downsample=2)")
    args = p.parse_args(argv)

    config = load_config(args.config)
    if args.width is not None:
        config.student.width = config.teachers.width = args.width
    if args.teachers is not None:
        config.teachers.num = args.teachers
    if args.student is not None:
        config.student.model = args.student
    if args.teacher is not None:
        config.teachers.model = args.teacher
    if args.winograd is not None:
        config.student.winograd = config.teachers.winograd = args.winograd
    seeds_list = args.seeds or [config.num_seeds]
    batches = args.batch or [64, 256, 1024]
    dtypes = args.dtype or ["float32", "bfloat16"]
    variants = args.variants or ["demkd_loop", "demkd_vmap", "demkd_logits_loop", "demkd_logits_vmap",
                                 "teacher_forward", "student_ce"]
    print(f"# device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {platform.processor() or platform.machine()}", file=sys.stderr, flush=True)
    num_classes = config.data.num_classes if config.data.num_classes > 0 else 100
    rng = np.random.default_rng(0)
    size = max(args.dataset_size, max(batches))
    ds = FakeDataset(rng.integers(0, 256, (size, args.image_size, args.image_size, 3), dtype=np.uint8),
                     rng.integers(0, num_classes, size).astype(np.int32), num_classes)
    teachers = random_teachers(config, num_classes)
    for dtype in dtypes:
        for batch in batches:
            for v in variants:
                name, _, execution = v.rpartition("_") if v.endswith(("_loop", "_vmap")) else (v, "", "auto")
                features = name == "demkd"
                for seeds in seeds_list if name != "teacher_forward" else seeds_list[:1]:
                    record = bench_variant(config, ds, teachers, name=name, batch=batch, dtype=dtype,
                                           features=features, execution=execution, steps=args.steps,
                                           warmup=args.warmup, seeds=seeds)
                    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    sys.exit(main())
