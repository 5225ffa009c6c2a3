"""Readers for the five data sources (``tfds``, ``pickle``, ``folder``, ``npz``, ``digits``; formats in
docs/data.md). Each returns a :class:`RawData` (both splits, class names).
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib
import importlib.util
import io
import itertools
import lzma
import multiprocessing
import os
import pathlib
import pickle
import re
import tarfile
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from demkd_jax.data.dataset import (DataConfigError, DataFormatError, DataNotFoundError, DatasetNotPreparedError,
                                    RawData, reason)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
SPLITS = ("train", "test")
# What tarfile and the gzip/bz2/xz decompressors raise on a damaged archive.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, zipfile.BadZipFile)


def _read_tar(path: pathlib.Path, select: Callable[[str], Any]) -> Iterator[tuple[Any, bytes]]:
    """``(select(member name), bytes)`` of the archive's regular files, in archive order, where that is not None."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and (selected := select(member.name)) is not None:
                    yield selected, tar.extractfile(member).read()  # type: ignore[union-attr]
    except _ARCHIVE_ERRORS as e:
        raise DataFormatError(f"{path} is not a readable tar archive ({reason(e)})") from e


# ----------------------------------------------------------------------------------------------- tfds
def _tfds_root(name: str, data_dir: str | None, variant_dir: str) -> str:
    """The data_dir tfds searched: the given one, else the part of ``variant_dir`` before ``/<name>/``."""
    if data_dir:
        return data_dir
    base = name.split("/")[0].split(":")[0]
    head, sep, _ = variant_dir.rpartition(os.sep + base + os.sep)
    return head if sep else variant_dir


def tfds_dataset_dir(name: str, data_dir: str | None) -> str:
    """The versioned directory tfds reads ``name`` from (for the cache fingerprint and messages)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
        return os.fspath(tfds.builder(name, data_dir=data_dir).data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataConfigError(f"unknown tfds dataset name '{name}' ({reason(e)})") from e


def tfds_prepared(name: str, data_dir: str | None) -> bool:
    """Whether tfds has a prepared copy of ``name`` in ``data_dir`` (reads only its metadata)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds.builder(name, data_dir=data_dir).is_prepared()


def _open_tfds_split(name: str, split: str, data_dir: str | None) -> Any:
    """``tfds.data_source`` of one split; a failure becomes :class:`DatasetNotPreparedError` or a format error."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted types here; classify by asking the builder.
        variant_dir = tfds_dataset_dir(name, data_dir)
        root = _tfds_root(name, data_dir, variant_dir)
        if not tfds_prepared(name, data_dir):
            raise DatasetNotPreparedError(
                f"tfds dataset '{name}' is not prepared in data_dir {root} (no ArrayRecord copy in {variant_dir}); "
                f"prepare it once on a machine with internet access and TensorFlow installed: "
                f"`tfds build {name} --data_dir={root} --file_format=array_record` (or in Python: "
                f"tfds.builder({name!r}, data_dir={root!r}, file_format='array_record').download_and_prepare()), "
                f"then copy {root} here if this machine is offline; or set data.source to 'pickle', 'folder' or "
                f"'npz' to read local files"
            ) from e
        raise DataFormatError(
            f"tfds dataset '{name}' in {variant_dir} cannot be read as split '{split}' with "
            f"tfds.data_source ({reason(e)}); random access needs the ArrayRecord format: "
            f"`tfds build {name} --data_dir={root} --file_format=array_record`"
        ) from e


def _read_records(source: Sequence[Any], chunk: int = 1024) -> Iterator[dict[str, Any]]:
    """The records of a tfds data source, ``chunk`` at a time through ``__getitems__`` where it works."""
    for start in range(0, len(source), chunk):
        indices = range(start, min(len(source), start + chunk))
        try:
            records = source.__getitems__(list(indices))
        except (AttributeError, TypeError):  # tfds.testing.mock_data's data source has only a working __getitem__
            records = [source[i] for i in indices]
        yield from records


def read_tfds(name: str, data_dir: str | None) -> RawData:
    """Both splits of tfds dataset ``name`` (with ``image`` and ``label`` features) from ``data_dir``."""
    splits = {}
    class_names: tuple[str, ...] = ()
    for split in SPLITS:
        source = _open_tfds_split(name, split, data_dir)
        features = source.dataset_info.features
        missing = [k for k in ("image", "label") if k not in features]
        if missing:
            raise DataFormatError(
                f"tfds dataset '{name}' has no feature(s) {missing} (features: {sorted(features.keys())})"
            )
        class_names = tuple(str(n) for n in features["label"].names)
        images, labels = [], []
        for example in _read_records(source):
            images.append(np.asarray(example["image"]))
            labels.append(int(example["label"]))
        if not images:
            raise DataNotFoundError(f"tfds dataset '{name}' split '{split}' is empty")
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise DataFormatError(
                f"tfds dataset '{name}' split '{split}' has images of several shapes {sorted(shapes)}"
            )
        splits[split] = (np.stack(images), np.asarray(labels, np.int64))
    return RawData(*splits["train"], *splits["test"], class_names)


# --------------------------------------------------------------------------------------------- pickle

# (module, name) pairs an official CIFAR pickle needs (numpy arrays, bytes from protocol-2 pickles); pickles
# written by numpy 2 spell numpy.core as numpy._core.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module.replace("numpy._core.", "numpy.core.", 1), name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 renamed numpy.core
        return getattr(importlib.import_module(module), name)


def _unpickle(data: bytes, origin: str) -> dict[str, Any]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on garbage input
        raise DataFormatError(f"{origin} is not a readable CIFAR pickle ({reason(e)})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{origin}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


_PICKLE_LAYOUTS = {
    # name: (train files, test files, meta file, label key, names key)
    "cifar100": (("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
    "cifar10": (
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels", "label_names"
    ),
}
# What a directory given as data.path may hold (exactly one of).
_PICKLE_INPUTS = ("cifar-100-python.tar.gz", "cifar-10-python.tar.gz", "cifar-100-python", "cifar-10-batches-py")


def pickle_layout(members: Iterable[str]) -> str | None:
    """``"cifar100"`` or ``"cifar10"`` from the file names present, or None."""
    members = set(members)
    if "meta" in members or "train" in members:
        return "cifar100"
    if "batches.meta" in members or "data_batch_1" in members:
        return "cifar10"
    return None


def _resolve_pickle_path(path: pathlib.Path) -> pathlib.Path:
    """The archive or extracted directory itself, given it or a directory that holds exactly one of them."""
    if path.is_file() or pickle_layout(p.name for p in path.iterdir()):
        return path
    found = [path / n for n in _PICKLE_INPUTS if (path / n).exists()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataNotFoundError(f"no CIFAR python-pickle archive or directory in {path} (expected one of: "
                                f"{', '.join(_PICKLE_INPUTS)})")
    raise DataConfigError(f"{path} holds several CIFAR pickle inputs {[p.name for p in found]}; point data.path at one")


def _pickle_files(path: pathlib.Path) -> dict[str, bytes]:
    """Base name -> bytes of the top-level-or-nested files of the archive or directory."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}
    files: dict[str, bytes] = {}
    for base, data in _read_tar(path, lambda name: name.rsplit("/", 1)[-1]):
        if base in files:
            raise DataFormatError(f"{path}: the archive holds '{base}' twice")
        files[base] = data
    return files


def _pickle_split(files: dict[str, bytes], names: Sequence[str], label_key: str, where: str):
    images, labels = [], []
    for fn in names:
        d = _unpickle(files[fn], f"{where}/{fn}")
        if "data" not in d or label_key not in d:
            raise DataFormatError(f"{where}/{fn}: expected keys 'data' and '{label_key}', found {sorted(d)}")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataFormatError(
                f"{where}/{fn}: 'data' must be uint8 [N, 3072] (32x32 RGB planes), got {data.dtype} {list(data.shape)}"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(d[label_key]))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_pickle(path: pathlib.Path, name: str) -> RawData:
    """The official CIFAR python-pickle archive (or its extracted directory) at ``path``, holding ``name``."""
    path = _resolve_pickle_path(path)
    files = _pickle_files(path)
    layout = pickle_layout(files)
    if layout is None:
        raise DataFormatError(
            f"{path} is not a CIFAR python-pickle archive: found {sorted(files)[:8]}, expected "
            f"train/test/meta (CIFAR-100) or data_batch_1..5/test_batch/batches.meta (CIFAR-10)"
        )
    if name != layout:
        raise DataConfigError(f"{path} holds {layout} but data.name='{name}'")
    train_files, test_files, meta, label_key, names_key = _PICKLE_LAYOUTS[layout]
    for split, needed in (("train", (*train_files, meta)), ("test", test_files)):
        missing = [f for f in needed if f not in files]
        if missing:
            raise DataNotFoundError(f"{path}: {layout} {split} split is incomplete, missing file(s) {missing}")
    meta_d = _unpickle(files[meta], f"{path}/{meta}")
    if names_key not in meta_d:
        raise DataFormatError(f"{path}/{meta}: expected key '{names_key}', found {sorted(meta_d)}")
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta_d[names_key])
    train = _pickle_split(files, train_files, label_key, str(path))
    test = _pickle_split(files, test_files, label_key, str(path))
    return RawData(*train, *test, class_names)


# --------------------------------------------------------------------------------------------- folder
def _decode_chunk(items: Iterable[tuple[str, bytes | None]]) -> list[np.ndarray]:
    """``(origin, bytes or None to read origin)`` pairs decoded to uint8 [H, W, 3] RGB arrays."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    images = []
    for origin, data in items:
        try:
            with Image.open(io.BytesIO(data) if data is not None else origin) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataFormatError(f"cannot decode image {origin} ({reason(e)})") from e
    return images


def _decode(items: Iterable[tuple[str, bytes | None]], num_workers: int, chunk: int = 1000) -> list[np.ndarray]:
    """Decodes the images in order: here, or in chunks on ``num_workers`` processes (-1: one per CPU, at most 8).

    Decoding a 32x32 JPEG is mostly Pillow's Python-level header parsing, so threads do not help (measured:
    no gain); processes do. They are started with "spawn" (never "fork": JAX's threads may already run
    here), which re-imports the calling script's ``__main__`` module in each worker, so a script that
    sets ``num_workers > 0`` must keep its work under ``if __name__ == "__main__":`` (as absl's
    ``app.run`` scripts do). If the pool breaks anyway, the images it had not returned are decoded here, with
    a warning. At most ``2 * num_workers`` chunks are in flight, so reading an archive overlaps decoding and
    only those chunks' encoded bytes are held at once.
    """
    if num_workers < 0:
        num_workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if num_workers == 0:
        return _decode_chunk(items)
    items = iter(items)
    images: list[np.ndarray] = []
    in_flight: collections.deque = collections.deque()  # (chunk, future), oldest first
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        while True:
            while len(in_flight) < 2 * num_workers and (batch := list(itertools.islice(items, chunk))):
                in_flight.append((batch, pool.submit(_decode_chunk, batch)))
            if not in_flight:
                return images
            images.extend(in_flight[0][1].result())
            in_flight.popleft()
    except concurrent.futures.BrokenExecutor as e:
        logging.warning("image-decoding worker processes failed (%s); decoding in this process", e)
        pending = itertools.chain.from_iterable(batch for batch, _ in in_flight)
        return images + _decode_chunk(itertools.chain(pending, items))
    finally:
        pool.shutdown(cancel_futures=True)


def _is_image_name(fn: str) -> bool:
    return fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith(".")


def _folder_root(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it has train/ or test/, else its only subdirectory that does."""
    if any((path / s).is_dir() for s in SPLITS):
        return path
    inner = [d for d in sorted(path.iterdir()) if d.is_dir() and any((d / s).is_dir() for s in SPLITS)]
    if len(inner) == 1:
        return inner[0]
    if not inner:
        raise DataNotFoundError(
            f"image folder {path} has no train/ or test/ directory (expected {path}/train/<class>/*.png|jpg|jpeg)"
        )
    raise DataFormatError(f"image folder {path} holds several trees {[d.name for d in inner]}; point data.path at one")


def _list_folder(root: pathlib.Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``(split, class, file name)`` of every image of the tree, and the train class directories without images."""
    keys, empty = [], []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            names = [fn for fn in sorted(os.listdir(class_dir)) if _is_image_name(fn)]
            if not names and split == "train":
                empty.append(class_dir.name)
            keys += [(split, class_dir.name, fn) for fn in names]
    return keys, empty


_TAR_MEMBER = re.compile(r"^(?:(.*)/)?(train|test)/([^/]+)/([^/]+)$")


def _tar_image(member_name: str) -> re.Match | None:
    """The ``(root, split, class, file)`` match of an image member of an image-folder tar, or None."""
    m = _TAR_MEMBER.match(member_name.removeprefix("./"))
    return m if m and _is_image_name(m.group(4)) and "__MACOSX" not in member_name else None


def _walk_tar(path: pathlib.Path, keys: list[tuple[str, str, str]]) -> Iterator[tuple[str, bytes]]:
    """``(origin, bytes)`` of the archive's images, appending each one's ``(split, class, file name)`` to ``keys``."""
    prefix: str | None = None
    for m, data in _read_tar(path, _tar_image):
        top = m.group(1) or ""
        prefix = top if prefix is None else prefix
        if top != prefix:
            raise DataFormatError(
                f"{path} holds several image-folder trees ('{prefix or '.'}' and '{top or '.'}'); "
                f"expected one <root>/{{train,test}}/<class>/<image>"
            )
        keys.append(m.group(2, 3, 4))
        yield f"{path}:{m.string}", data


def read_folder(path: pathlib.Path, num_workers: int = 0) -> RawData:
    """An image-folder tree (or a tar archive of one) at ``path``; ``num_workers`` decoding processes."""
    keys: list[tuple[str, str, str]] = []  # (split, class, file name) per image, in decoding order
    empty_classes: list[str] = []
    if path.is_file():
        if not path.name.lower().endswith(TAR_SUFFIXES):
            raise DataConfigError(
                f"{path} is a file but not a tar archive ({', '.join(TAR_SUFFIXES)}); data.path for "
                f"source 'folder' is a directory root/{{train,test}}/<class>/ or a tar archive of one"
            )
        where, items = str(path), _walk_tar(path, keys)
    else:
        root = _folder_root(path)
        keys, empty_classes = _list_folder(root)
        where, items = str(root), ((str(root.joinpath(*key)), None) for key in keys)
    images = _decode(items, num_workers)
    for key, image in zip(keys, images):
        if image.shape != images[0].shape:
            raise DataFormatError(
                f"image {'/'.join(key)} in {where} is {image.shape[0]}x{image.shape[1]} but {'/'.join(keys[0])} is "
                f"{images[0].shape[0]}x{images[0].shape[1]} (images are never resized; all must have one size)"
            )

    # Class-alphabetical, then file-name order, however the archive happened to be ordered.
    order = {s: sorted((i for i, k in enumerate(keys) if k[0] == s), key=lambda i: keys[i][1:]) for s in SPLITS}
    if not order["train"]:
        raise DataNotFoundError(
            f"image folder {where} has no images under train/ (expected train/<class>/*.png|jpg|jpeg)"
        )
    if empty_classes:
        raise DataFormatError(
            f"image folder {where}: train/ class folder(s) {empty_classes} have no images (a class without "
            f"training images would silently shift every later label)"
        )
    if not order["test"]:
        raise DataNotFoundError(f"image folder {where} has no test split (expected test/<class>/*.png|jpg|jpeg)")
    class_names = tuple(sorted({keys[i][1] for i in order["train"]}))
    extra = sorted({keys[i][1] for i in order["test"]} - set(class_names))
    if extra:
        raise DataFormatError(f"image folder {where}: test/ has classes with no train images: {extra}")
    index = {c: i for i, c in enumerate(class_names)}
    out = []
    for split in SPLITS:
        out += [np.stack([images[i] for i in order[split]]),
                np.asarray([index[keys[i][1]] for i in order[split]], np.int64)]
    counts = np.bincount(out[1])
    logging.info("image folder %s: %d classes, %d-%d train images per class", where, len(class_names),
                 counts.min(), counts.max())
    return RawData(*out, class_names)


# ------------------------------------------------------------------------------------------------ npz

NPZ_NAME_FILES = ("class_names.txt", "fine_label_names.txt", "label_names.txt")


def _npz_file(directory: pathlib.Path, split: str) -> pathlib.Path:
    found = sorted(p for p in directory.glob(f"*{split}*.npz") if p.is_file())
    if not found:
        raise DataNotFoundError(f"npz directory {directory} has no {split} split (expected a file *{split}*.npz)")
    if len(found) > 1:
        raise DataFormatError(f"npz directory {directory} has several {split} files {[p.name for p in found]}")
    return found[0]


def _read_npz_file(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    # np.load takes a file that is not a zip archive for a pickle or an .npy; an .npz is always a zip archive.
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataFormatError(f"{path} is not a readable .npz file (not a zip archive, which an .npz is; "
                              "truncated or not written by numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            arrays = {k: z[k] for k in ("image", "label", "class_names") if k in keys}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataFormatError(f"{path} is not a readable .npz file ({reason(e)})") from e
    if "image" not in arrays or "label" not in arrays:
        raise DataFormatError(f"{path}: expected arrays 'image' and 'label', found {keys}")
    return arrays["image"], arrays["label"], arrays.get("class_names")


def read_npz(path: pathlib.Path, num_classes: int) -> RawData:
    """``*train*.npz`` and ``*test*.npz`` from directory ``path`` (format: docs/data.md)."""
    if not path.is_dir():
        raise DataConfigError(
            f"data.path {path} for source 'npz' must be a directory holding *train*.npz and *test*.npz"
        )
    train_file, test_file = _npz_file(path, "train"), _npz_file(path, "test")
    x_train, y_train, names_arr = _read_npz_file(train_file)
    x_test, y_test, _ = _read_npz_file(test_file)
    names_file = next((path / fn for fn in NPZ_NAME_FILES if (path / fn).is_file()), None)
    if names_file is not None:
        names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
    elif names_arr is not None:
        names = tuple(str(n) for n in names_arr.tolist())
    else:
        k = num_classes
        if k <= 0:
            ys = [y for y in (y_train, y_test) if np.issubdtype(np.asarray(y).dtype, np.integer) and np.size(y)]
            k = int(max(int(np.max(y)) for y in ys)) + 1 if ys else 0
        names = tuple(str(i) for i in range(k))
        logging.info("npz %s: no class-name file (%s); naming classes 0..%d", path, "/".join(NPZ_NAME_FILES), k - 1)
    return RawData(x_train, y_train, x_test, y_test, names)


# --------------------------------------------------------------------------------------------- digits
def digits_file() -> pathlib.Path:
    """scikit-learn's bundled digits data file (located without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataConfigError("source 'digits' needs scikit-learn (pip install scikit-learn)")
    return pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices: per class, round(test_fraction * count) random members go to test."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(members.size)]
        k = int(round(test_fraction * members.size))
        test.append(members[:k])
        train.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def read_digits(image_size: int, test_fraction: float, seed: int) -> RawData:
    """The 8x8 digits as ``image_size`` RGB uint8 images, split stratified (docs/data.md).

    Upsampling replicates each pixel ``image_size // 8`` times (nearest neighbour at an integer factor):
    lossless and exactly invertible, so every image is the original data at a convolution-friendly size,
    and a 4-pixel crop shift at 32x32 moves the digit by exactly one original pixel.
    """
    if image_size <= 0 or image_size % 8:
        raise DataConfigError(f"source 'digits' needs data.image_size to be a positive multiple of 8, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise DataConfigError(f"data.digits_test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    bunch = load_digits()
    grey = np.asarray(bunch.images)
    if grey.min() < 0 or grey.max() > 16 or not np.array_equal(grey, np.round(grey)):
        raise DataFormatError("scikit-learn digits: expected integer pixel values in 0..16")
    u8 = ((grey.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)  # 0 -> 0, 16 -> 255, round half up
    factor = image_size // 8
    u8 = np.repeat(np.repeat(u8, factor, axis=1), factor, axis=2)
    rgb = np.repeat(u8[..., None], 3, axis=-1)
    labels = np.asarray(bunch.target, np.int64)
    train, test = stratified_split(labels, test_fraction, seed)
    return RawData(rgb[train], labels[train], rgb[test], labels[test], tuple(str(i) for i in range(10)))
