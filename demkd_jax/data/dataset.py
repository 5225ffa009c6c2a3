"""The in-memory dataset every source produces, its validation, and normalisation statistics.

Validation never changes data: a problem is one of the errors below, with a one-line message naming the bad
value and what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


class DataError(Exception):
    """Base class of every error raised by :mod:`demkd_jax.data`."""


class DataConfigError(DataError, ValueError):
    """A ``config.data`` value is invalid (unknown source, empty path, bad option)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A path, a split or the images of a split do not exist."""


class DatasetNotPreparedError(DataNotFoundError):
    """A tensorflow-datasets dataset is not prepared in the searched ``data_dir``."""


class DataFormatError(DataError, ValueError):
    """Data exist but are malformed: corrupted file, wrong shape/dtype, labels out of range, ..."""


def reason(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for embedding in the one-line messages."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RawData(NamedTuple):
    """What a source reader returns (and what the cache stores): both splits plus class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


# Per-channel mean and std of the train split, in units of pixel/255.
PUBLISHED_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # docs/method.md §3 (the CRD/RepDistiller and CA-MKD values).
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    # The values used throughout the CIFAR-10 literature (torchvision examples, pytorch-cifar).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and (population) std of uint8 NHWC images, in units of pixel/255.

    From one 256-bin histogram per channel (built over blocks, so no float copy of the images is made).
    """
    channels = images.shape[-1]
    flat = images.reshape(-1, channels)
    counts = np.zeros((channels, 256), np.int64)
    block = 1 << 22
    for start in range(0, flat.shape[0], block):
        planes = np.ascontiguousarray(flat[start : start + block].T)
        for c in range(channels):
            counts[c] += np.bincount(planes[c], minlength=256)
    levels = np.arange(256, dtype=np.float64)
    total = counts.sum(axis=1)
    mean = (counts * levels).sum(axis=1) / total
    var = (counts * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / total
    return (mean / 255.0).astype(np.float32), (np.sqrt(var) / 255.0).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits of an image-classification dataset, validated, on the host."""

    train_images: np.ndarray  # uint8 [N, H, W, 3] (NHWC, RGB), C-contiguous; so are test_images
    train_labels: np.ndarray  # int32 [N] in [0, num_classes); so are test_labels
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]  # one name per label index
    mean: np.ndarray  # float32 [3] per channel in pixel/255 units, with std: normalised = (pixel / 255 - mean) / std
    std: np.ndarray
    name: str  # cifar100, cifar10, digits or the configured name
    source: str  # the source read: tfds, pickle, folder, npz or digits
    stats_origin: str  # "published" or "computed" (from the train split)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    def summary(self) -> str:
        """One line describing the dataset (for logs)."""
        h, w, c = self.image_shape
        return (
            f"{self.name} ({self.source}): {self.num_train} train / {self.num_test} test images "
            f"{h}x{w}x{c}, {self.num_classes} classes, mean {[round(float(v), 4) for v in self.mean]} "
            f"std {[round(float(v), 4) for v in self.std]} ({self.stats_origin})"
        )

    def __repr__(self) -> str:
        return f"Dataset({self.summary()})"


def validate_split(images: np.ndarray, labels: np.ndarray, where: str, num_classes: int,
                   image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Checks one split (uint8 ``[N, H, W, 3]`` images, integer ``[N]`` labels in ``[0, num_classes)``).

    Returns ``(images, labels)`` with labels as int32 (values unchanged). ``where`` names the split in messages;
    ``image_size`` is the expected H = W, or a value <= 0 to accept any size.
    """
    if not isinstance(images, np.ndarray):
        raise DataFormatError(f"{where}: images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataFormatError(
            f"{where}: images must be uint8 [N, H, W, 3] (NHWC, RGB), got {images.dtype} {list(images.shape)}"
        )
    if images.shape[0] == 0:
        raise DataFormatError(f"{where}: the split has no images")
    if image_size > 0 and images.shape[1:3] != (image_size, image_size):
        raise DataFormatError(
            f"{where}: images are {images.shape[1]}x{images.shape[2]} but data.image_size={image_size} "
            f"(images are never resized; set data.image_size={images.shape[1]} if that size is intended)"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DataFormatError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels (the counts must match)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataFormatError(
            f"{where}: labels span [{lo}, {hi}] but num_classes={num_classes} needs them in [0, {num_classes - 1}]"
        )
    return np.ascontiguousarray(images), labels.astype(np.int32)


def validate_raw(raw: RawData, *, origin: str, num_classes: int, image_size: int) -> RawData:
    """Checks both splits and the class names against ``num_classes`` (``<= 0``: from the class names)."""
    names = tuple(str(n) for n in raw.class_names)
    if not names:
        raise DataFormatError(f"{origin}: the dataset has no class names")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataFormatError(f"{origin}: duplicate class names {dupes}")
    if num_classes > 0 and len(names) != num_classes:
        preview = ", ".join(names) if len(names) <= 4 else ", ".join(names[:3]) + f", ..., {names[-1]}"
        raise DataFormatError(
            f"{origin}: the data has {len(names)} classes ({preview}) but data.num_classes={num_classes}"
        )
    train = validate_split(raw.train_images, raw.train_labels, f"{origin} [train]", len(names), image_size)
    test = validate_split(raw.test_images, raw.test_labels, f"{origin} [test]", len(names), image_size)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataFormatError(
            f"{origin}: train images are {list(train[0].shape[1:])} but test images are {list(test[0].shape[1:])}"
        )
    return RawData(*train, *test, names)
