"""Data-layer timings: source load (first decode and cache hit) and on-device augmentation throughput.

    python benchmarks/data_pipeline.py                       # augmentation + digits
    python benchmarks/data_pipeline.py --shared ../shared/data --cache /tmp/demkd_cache   # + real CIFAR

The cache directory is emptied first so that "first" really decodes. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from demkd_jax import data  # noqa: E402  pylint: disable=g-import-not-at-top
from demkd_jax import hugepages  # noqa: E402


def time_load(label: str, cfg: dict) -> data.Dataset:
    for attempt in ("first", "cached"):
        start = time.perf_counter()
        ds = data.load_dataset(cfg)
        print(f"load {label:<28} {attempt:<7} {time.perf_counter() - start:7.2f} s   {ds.summary()}", flush=True)
    return ds


def augment_throughput(images: np.ndarray, batch: int, seconds: float = 2.0) -> None:
    """Images/s of the jitted training input path: indices, gather, crop+flip, normalise (float32)."""
    dev = jax.device_put(images)
    n = dev.shape[0]
    mean, std = jnp.asarray(data.PUBLISHED_STATS["cifar100"][0]), jnp.asarray(data.PUBLISHED_STATS["cifar100"][1])
    key = jax.random.key(0)

    @jax.jit
    def just_augment(x, step):
        return data.augment(x, jax.random.fold_in(key, step), mean, std)

    @jax.jit
    def full_path(step):  # the permutation recomputed inside every step
        perm = data.epoch_permutation(key, step // data.steps_per_epoch(n, batch), n)
        idx = data.batch_indices_from_permutation(perm, step, batch)
        return data.augment(dev[idx], jax.random.fold_in(key, step), mean, std)

    @jax.jit
    def from_permutation(perm, step):
        idx = data.batch_indices_from_permutation(perm, step, batch)
        return data.augment(dev[idx], jax.random.fold_in(key, step), mean, std)

    x = dev[:batch]
    perm = data.epoch_permutation(key, 0, n)
    cases = {
        "augment(batch)": lambda s: just_augment(x, s),
        "permutation+gather+augment": full_path,
        "permutation-given+gather+augment": lambda s: from_permutation(perm, s),
    }
    for label, fn in cases.items():
        fn(jnp.int32(0)).block_until_ready()
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(jnp.int32(steps)).block_until_ready()
            steps += 1
        dt = (time.perf_counter() - start) / steps
        print(f"{label:<34} batch {batch:5d}: {dt * 1e3:8.3f} ms/batch {batch / dt:12,.0f} images/s "
              f"({jax.devices()[0].platform}, n={n})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="", help="the shared data directory (real CIFAR); skipped if empty")
    parser.add_argument("--cache", default="/tmp/demkd_data_bench_cache", help="cache dir (emptied first)")
    args = parser.parse_args()
    shutil.rmtree(args.cache, ignore_errors=True)

    digits = time_load("digits", dict(source="digits", num_classes=10, cache_dir=args.cache))
    pool = digits.train_images
    if args.shared:
        shared = pathlib.Path(args.shared)
        cifar100 = time_load("cifar100 npz", dict(source="npz", name="cifar100", path=str(shared / "cifar100"),
                                                  cache_dir=args.cache))
        time_load("cifar10 folder (tar.xz)", dict(source="folder", name="cifar10", num_classes=10,
                                                  path=str(shared / "cifar10-jpeg.tar.xz"), cache_dir=args.cache))
        pool = cifar100.train_images
    for batch in (64, 1024):
        augment_throughput(pool, batch)


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    main()
