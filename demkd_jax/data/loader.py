"""``config.data`` and :func:`load_dataset`: read a source once, validate, cache, attach statistics."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import time
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
from absl import logging

from demkd_jax.config import default_data_config
from demkd_jax.data import cache, download, sources
from demkd_jax.data.dataset import (PUBLISHED_STATS, DataConfigError, DataFormatError, DataNotFoundError, Dataset,
                                    RawData, channel_stats, validate_raw)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to read: ``read()`` produces the data; ``identity``/``fingerprint`` key the cache."""

    read: Callable[[], RawData]
    identity: str
    fingerprint: str
    origin: str
    name: str
    source: str = ""  # the source actually read, when not config.data.source


def _local_path(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    if not cfg.path:
        raise DataConfigError(f"data.path is empty; source '{cfg.source}' reads a local file or directory")
    path = pathlib.Path(os.path.expanduser(str(cfg.path))).absolute()
    if not path.exists():
        raise DataNotFoundError(f"data.path {path} does not exist (source '{cfg.source}')")
    return path


def _plan_tfds(cfg: ml_collections.ConfigDict) -> _Plan:
    if not cfg.name:
        raise DataConfigError("data.name is empty; source 'tfds' needs a tfds dataset name such as 'cifar100'")
    data_dir = str(cfg.tfds_data_dir) or None
    variant_dir = sources.tfds_dataset_dir(cfg.name, data_dir)
    if cfg.name in download.OFFICIAL_ARCHIVES and not sources.tfds_prepared(cfg.name, data_dir):
        archive = cache.resolve_cache_dir(cfg.cache_dir) / download.OFFICIAL_ARCHIVES[cfg.name][0]
        if cfg.download or archive.is_file():
            logging.info("tfds dataset '%s' is not prepared in %s; reading the official archive %s instead",
                         cfg.name, variant_dir, archive)
            return _plan_official_archive(cfg)
    return _path_plan(variant_dir, lambda: sources.read_tfds(cfg.name, data_dir), cfg.name,
                      origin=f"tfds:{cfg.name} ({variant_dir})")


def _plan_official_archive(cfg: ml_collections.ConfigDict) -> _Plan:
    """The official python-pickle archive in the cache directory, downloaded on first read when absent."""
    file_name, official_url, official_md5 = download.OFFICIAL_ARCHIVES[cfg.name]
    archive = cache.resolve_cache_dir(cfg.cache_dir) / file_name
    url = str(cfg.download_url) or official_url
    md5 = (str(cfg.download_md5) or official_md5).lower()
    hint = (f"without a network place {file_name} (MD5 {md5}, from {url}) at {archive}, or set "
            f"data.source='pickle' and data.path to a copy of it")
    return _Plan(
        read=lambda: sources.read_pickle(download.fetch_archive(url, archive, md5, placement_hint=hint), cfg.name),
        # The archive is verified against this MD5 before it is read, so the MD5 identifies the data: a cache
        # hit needs neither the archive nor the network.
        identity=f"official-archive|{md5}",
        fingerprint=md5,
        origin=f"{archive} (official {cfg.name} archive)",
        name=cfg.name,
        source="pickle",
    )


def _path_plan(path: str | pathlib.Path, read: Callable[[], RawData], name: str, identity: str = "",
               origin: str = "") -> _Plan:
    """A plan for data read from ``path`` (a file or directory), fingerprinted by its size and mtime."""
    return _Plan(read=read, identity=identity or str(path), fingerprint=cache.path_fingerprint(path),
                 origin=origin or str(path), name=name)


def _plan_pickle(cfg: ml_collections.ConfigDict) -> _Plan:
    path = _local_path(cfg)
    if cfg.name not in ("cifar10", "cifar100"):
        raise DataConfigError(f"data.name='{cfg.name}' for source 'pickle'; expected 'cifar100' or 'cifar10'")
    return _path_plan(path, lambda: sources.read_pickle(path, cfg.name), cfg.name)


def _plan_folder(cfg: ml_collections.ConfigDict) -> _Plan:
    path = _local_path(cfg)
    return _path_plan(path, lambda: sources.read_folder(path, int(cfg.num_workers)), cfg.name or path.name)


def _plan_npz(cfg: ml_collections.ConfigDict) -> _Plan:
    path = _local_path(cfg)
    num_classes = int(cfg.num_classes)
    # Without a names file, class names are "0".."K-1" with K = num_classes: then K is part of the data.
    named = path.is_dir() and any((path / fn).is_file() for fn in sources.NPZ_NAME_FILES)
    return _path_plan(path, lambda: sources.read_npz(path, num_classes), cfg.name or path.name,
                      identity=str(path) if named else f"{path}|{num_classes}")


def _plan_digits(cfg: ml_collections.ConfigDict) -> _Plan:
    size, frac, seed = int(cfg.image_size), float(cfg.digits_test_fraction), int(cfg.digits_seed)
    data_file = sources.digits_file()
    return _path_plan(data_file, lambda: sources.read_digits(size, frac, seed), "digits",
                      identity=f"{data_file}|{size}|{frac!r}|{seed}", origin="scikit-learn digits")


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], _Plan]] = {
    "tfds": _plan_tfds,
    "pickle": _plan_pickle,
    "folder": _plan_folder,
    "npz": _plan_npz,
    "digits": _plan_digits,
}


def _as_config(config: Any) -> ml_collections.ConfigDict:
    """``default_data_config()`` updated with ``config`` (a ConfigDict or mapping); unknown keys are errors."""
    cfg = default_data_config()
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(given) - set(cfg.keys()))
    if unknown:
        raise DataConfigError(f"unknown data config field(s) {unknown}; known: {sorted(cfg.keys())}")
    try:
        cfg.update(given)
    except TypeError as e:
        raise DataConfigError(f"bad data config value ({' '.join(str(e).split())})") from e
    if cfg.source not in SOURCES:
        raise DataConfigError(f"unknown data.source '{cfg.source}'; expected one of {sorted(SOURCES)}")
    if cfg.normalization not in ("auto", "computed"):
        raise DataConfigError(f"unknown data.normalization '{cfg.normalization}'; expected 'auto' or 'computed'")
    if cfg.download_md5 and not re.fullmatch(r"[0-9a-fA-F]{32}", str(cfg.download_md5)):
        raise DataConfigError(f"data.download_md5='{cfg.download_md5}'; expected 32 hexadecimal digits or ''")
    if cfg.num_classes == 0 or cfg.num_classes < -1:
        raise DataConfigError(f"data.num_classes={cfg.num_classes}; expected a positive count or -1 (from the data)")
    if isinstance(cfg.downsample, bool) or not isinstance(cfg.downsample, int) or cfg.downsample < 1:
        raise DataConfigError(f"data.downsample={cfg.downsample!r}; expected a positive integer pooling factor "
                              "(1: images as stored)")
    if isinstance(cfg.crop_padding, bool) or not isinstance(cfg.crop_padding, int) or cfg.crop_padding < 0:
        raise DataConfigError(f"data.crop_padding={cfg.crop_padding!r}; expected a non-negative integer (pixels)")
    return cfg


def mean_pool(images: np.ndarray, factor: int, origin: str = "images") -> np.ndarray:
    """uint8 ``[N, H, W, C]`` mean-pooled over ``factor x factor`` blocks, rounded to the nearest level.

    Halves round to even, so the rounding adds no bias to the mean (halves up would add 1/8 level at factor 2).
    ``H`` and ``W`` must be multiples of ``factor``; raises :class:`DataFormatError` otherwise.
    """
    n, h, w, c = images.shape
    if h % factor or w % factor:
        raise DataFormatError(f"{origin}: images are {h}x{w}, not divisible by data.downsample={factor}")
    area = factor * factor
    sums = np.zeros((n, h // factor, w // factor, c), np.uint32)
    for i in range(factor):  # strided adds: several times faster than a sum over the axes of a 6-D reshape
        for j in range(factor):
            sums += images[:, i::factor, j::factor]
    return np.rint(sums.astype(np.float32) / area).astype(np.uint8)  # k/4 is exact in float32


# Published and computed means of the same dataset agree far better than this (JPEG CIFAR-10: 1e-3).
_STATS_TOLERANCE = 0.01


def _statistics(computed: tuple[np.ndarray, np.ndarray], name: str,
                normalization: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The (mean, std) to normalise with, and where they come from."""
    if normalization == "auto" and name in PUBLISHED_STATS:
        mean, std = (np.asarray(v, np.float32) for v in PUBLISHED_STATS[name])
        if np.max(np.abs(mean - computed[0])) > _STATS_TOLERANCE:
            logging.warning(
                "data.name='%s' selects the published mean %s, but this train split's mean is %s; is it really "
                "%s? (data.normalization='computed' uses the split's own statistics)",
                name, mean.tolist(), np.round(computed[0], 4).tolist(), name,
            )
        return mean, std, "published"
    return computed[0], computed[1], "computed"


def load_dataset(config: Mapping[str, Any] | ml_collections.ConfigDict) -> Dataset:
    """Reads ``config.data`` 's source (from the cache when it is there), validates it, returns a Dataset.

    ``config`` holds any subset of :func:`default_data_config`'s fields. The first load decodes the source
    and writes the cache; later loads of an unchanged source read only the cache. Errors are
    :class:`DataError` s with a one-line message.
    """
    cfg = _as_config(config)
    plan = SOURCES[cfg.source](cfg)
    source = plan.source or cfg.source
    start = time.perf_counter()
    cache_file = cached = None
    if cfg.use_cache:
        cache_dir = cache.resolve_cache_dir(cfg.cache_dir)
        cache_file = cache.cache_path(cache_dir, source, plan.name, plan.identity, plan.fingerprint)
        cached = cache.load(cache_file)
    if cached is not None:
        raw, computed = cached
    else:
        # Only well-formed data are cached, but before the config's class count and image size are
        # checked, so that fixing those settings does not cost a second decode.
        raw = validate_raw(plan.read(), origin=plan.origin, num_classes=-1, image_size=-1)
        computed = channel_stats(raw.train_images)
        if cache_file is not None:
            cache.save(cache_file, raw, computed)
    raw = validate_raw(raw, origin=plan.origin, num_classes=int(cfg.num_classes), image_size=int(cfg.image_size))
    normalization = cfg.normalization
    if cfg.downsample > 1:
        raw = raw._replace(train_images=mean_pool(raw.train_images, cfg.downsample, f"{plan.origin} [train]"),
                           test_images=mean_pool(raw.test_images, cfg.downsample, f"{plan.origin} [test]"))
        computed = channel_stats(raw.train_images)
        normalization = "computed"
    mean, std, stats_origin = _statistics(computed, plan.name, normalization)
    ds = Dataset(*raw, mean=mean, std=std, name=plan.name, source=source, stats_origin=stats_origin)
    logging.info(
        "loaded %s in %.2f s (%s)", ds.summary(), time.perf_counter() - start,
        f"cache hit {cache_file}" if cached is not None
        else (f"decoded; cached to {cache_file}" if cache_file else "decoded; cache off"),
    )
    return ds
