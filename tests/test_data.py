"""Data: every source on tiny fixtures written here, validation errors, the cache, the on-device pipeline.

Real data (../shared/data, or $DEMKD_SHARED_DATA) is used where present and skipped otherwise.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import io
import os
import pathlib
import pickle
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from demkd_jax import data
from demkd_jax.data import sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("DEMKD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CIFAR100_TRAIN_MEAN = (0.50707516, 0.48654887, 0.44091784)  # ../shared/data/README.md


def shared(relpath: str) -> pathlib.Path:
    path = SHARED_DATA / relpath
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set DEMKD_SHARED_DATA to the shared data directory)")
    return path


def load(tmp_path, **overrides) -> data.Dataset:
    """load_dataset with the cache in tmp_path (never the user's cache)."""
    cfg = data.default_data_config()
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.update(overrides)
    return data.load_dataset(cfg)


def raises(exc_type, *fragments):
    """pytest.raises that also checks the message is one line and contains every fragment."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(exc_type)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return suppressed

    return _Check()


def rand_images(rng, n, h=32, w=32):
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------ pickle archives


def _py2_pickle(obj) -> bytes:
    """Like the official archives: protocol 2, byte-string keys."""
    return pickle.dumps(obj, protocol=2)


def _batch(images: np.ndarray, labels, label_key: bytes) -> bytes:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # NHWC -> CHW planes
    return _py2_pickle({b"batch_label": b"x", b"data": rows, label_key: list(map(int, labels)),
                        b"filenames": [b"f%d.png" % i for i in range(len(labels))]})


def write_cifar100_pickle(root: pathlib.Path, rng, names=(b"apple", b"bee", b"cat", b"dog"), n=(7, 3), archive=True):
    k = len(names)
    out = {}
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, count in zip(("train", "test"), n):
        x, y = rand_images(rng, count), rng.integers(0, k, count)
        rows = x.transpose(0, 3, 1, 2).reshape(count, 3072)
        (d / split).write_bytes(_py2_pickle({b"data": rows, b"fine_labels": list(map(int, y)),
                                             b"coarse_labels": [0] * count, b"filenames": [b"a"] * count}))
        out[split] = (x, y)
    (d / "meta").write_bytes(_py2_pickle({b"fine_label_names": list(names), b"coarse_label_names": [b"c"]}))
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(d, arcname="cifar-100-python")
    return out


def write_cifar10_pickle(root: pathlib.Path, rng, per_batch=2):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = rand_images(rng, per_batch), rng.integers(0, 10, per_batch)
        (d / f"data_batch_{i}").write_bytes(_batch(x, y, b"labels"))
        xs.append(x), ys.append(y)
    xt, yt = rand_images(rng, 3), rng.integers(0, 10, 3)
    (d / "test_batch").write_bytes(_batch(xt, yt, b"labels"))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(_py2_pickle({b"label_names": names, b"num_vis": 3072}))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    return archive, (np.concatenate(xs), np.concatenate(ys)), (xt, yt)


def test_pickle_cifar100_round_trips_pixels(tmp_path):
    rng = np.random.default_rng(0)
    want = write_cifar100_pickle(tmp_path, rng)
    # The CHW layout: byte c*1024 + y*32 + x of a row is channel c of pixel (y, x).
    ds = load(tmp_path, source="pickle", name="cifar100", num_classes=4, path=str(tmp_path / "cifar-100-python.tar.gz"))
    np.testing.assert_array_equal(ds.train_images, want["train"][0])
    np.testing.assert_array_equal(ds.test_images, want["test"][0])
    np.testing.assert_array_equal(ds.train_labels, want["train"][1])
    assert ds.train_labels.dtype == np.int32 and ds.class_names == ("apple", "bee", "cat", "dog")
    np.testing.assert_allclose(ds.mean, (0.5071, 0.4867, 0.4408))  # cifar100: the published statistics
    # The extracted directory, and a directory holding only the archive, read the same.
    for path in (tmp_path / "cifar-100-python",):
        again = load(tmp_path, source="pickle", name="cifar100", num_classes=4, path=str(path), use_cache=False)
        np.testing.assert_array_equal(again.train_images, ds.train_images)
    holder = tmp_path / "holder"
    holder.mkdir()
    (tmp_path / "cifar-100-python.tar.gz").rename(holder / "cifar-100-python.tar.gz")
    again = load(tmp_path, source="pickle", name="cifar100", num_classes=4, path=str(holder), use_cache=False)
    np.testing.assert_array_equal(again.test_images, ds.test_images)


def test_pickle_chw_planes_map_to_nhwc_channels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0:1024], row[0, 1024:2048], row[0, 2048:3072] = 10, 20, 30  # R, G, B planes
    row[0, 5 * 32 + 7] = 99  # red of pixel (y=5, x=7)
    for split in ("train", "test"):
        (d / split).write_bytes(_py2_pickle({b"data": row, b"fine_labels": [0]}))
    (d / "meta").write_bytes(_py2_pickle({b"fine_label_names": [b"only"]}))
    ds = load(tmp_path, source="pickle", name="cifar100", num_classes=1, path=str(d))
    assert tuple(ds.train_images[0, 0, 0]) == (10, 20, 30)
    assert tuple(ds.train_images[0, 5, 7]) == (99, 20, 30)


def test_pickle_cifar10_layout(tmp_path):
    archive, (x, y), (xt, yt) = write_cifar10_pickle(tmp_path, np.random.default_rng(1))
    ds = load(tmp_path, source="pickle", name="cifar10", num_classes=10, path=str(archive))
    np.testing.assert_array_equal(ds.train_images, x)  # data_batch_1..5 in order
    np.testing.assert_array_equal(ds.train_labels, y)
    np.testing.assert_array_equal(ds.test_images, xt)
    np.testing.assert_array_equal(ds.test_labels, yt)
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    np.testing.assert_allclose(ds.std, (0.2470, 0.2435, 0.2616))
    with raises(data.DataConfigError, "holds cifar10", "data.name='cifar100'"):
        load(tmp_path, source="pickle", name="cifar100", num_classes=10, path=str(archive))


def test_pickle_errors(tmp_path):
    rng = np.random.default_rng(2)
    write_cifar100_pickle(tmp_path, rng, archive=False)
    d = tmp_path / "cifar-100-python"
    (d / "test").unlink()
    with raises(data.DataNotFoundError, "test split", "'test'"):
        load(tmp_path, source="pickle", name="cifar100", num_classes=4, path=str(d))
    bad = tmp_path / "cifar-100-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b definitely not a gzip stream")
    with raises(data.DataFormatError, str(bad), "not a readable tar archive"):
        load(tmp_path, source="pickle", name="cifar100", num_classes=4, path=str(bad))


def test_pickle_cannot_run_code(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for fn in ("train", "test", "meta"):
        (d / fn).write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with raises(data.DataFormatError, "not a readable CIFAR pickle", "not allowed"):
        load(tmp_path, source="pickle", name="cifar100", num_classes=4, path=str(d))
    assert not marker.exists()


# --------------------------------------------------------------------------------------- image folder


def write_tree(root: pathlib.Path, rng, counts=None, size=(32, 32)):
    """PNG (lossless) tree; classes created out of alphabetical order. Returns the expected arrays."""
    counts = counts or {"train": {"dog": 3, "cat": 2, "bird": 2}, "test": {"dog": 1, "cat": 2, "bird": 1}}
    want = {}
    for split, per_class in counts.items():
        xs = []
        for label, cls in enumerate(sorted(per_class)):
            (root / split / cls).mkdir(parents=True)
            for i in reversed(range(per_class[cls])):  # written out of name order
                x = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(x).save(root / split / cls / f"{i:04d}.png")
                xs.append((i, label, x))
        xs.sort(key=lambda t: (t[1], t[0]))
        want[split] = (np.stack([t[2] for t in xs]), np.asarray([t[1] for t in xs]))
    return want


def test_folder_tree_loads_exactly(tmp_path):
    want = write_tree(tmp_path / "tree", np.random.default_rng(3))
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load(tmp_path, source="folder", name="pets", num_classes=3, path=str(tmp_path / "tree"))
    assert ds.class_names == ("bird", "cat", "dog")
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), want[split][0])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), want[split][1])
    assert ds.stats_origin == "computed"
    mean, std = data.channel_stats(ds.train_images)
    np.testing.assert_allclose(ds.mean, ds.train_images.reshape(-1, 3).mean(0) / 255, rtol=1e-5)
    np.testing.assert_allclose(ds.std, ds.train_images.reshape(-1, 3).std(0) / 255, rtol=1e-5)
    np.testing.assert_array_equal(ds.mean, mean)


@pytest.mark.parametrize("mode,suffix", [("w:xz", ".tar.xz"), ("w", ".tar")])
def test_folder_tarball_matches_the_tree(tmp_path, mode, suffix):
    want = write_tree(tmp_path / "mytree", np.random.default_rng(4))
    archive = tmp_path / f"images{suffix}"
    with tarfile.open(archive, mode) as tar:
        if suffix == ".tar.xz":
            tar.add(tmp_path / "mytree", arcname="cifar-like")  # one top directory, like cifar10-jpeg.tar.xz
        else:
            for split in ("train", "test"):
                tar.add(tmp_path / "mytree" / split, arcname=split)  # no top directory
    ds = load(tmp_path, source="folder", name="pets", num_classes=3, path=str(archive))
    np.testing.assert_array_equal(ds.train_images, want["train"][0])
    np.testing.assert_array_equal(ds.test_labels, want["test"][1])


def test_folder_directory_with_one_top_level_tree(tmp_path):
    want = write_tree(tmp_path / "extracted" / "cifar10", np.random.default_rng(5))
    ds = load(tmp_path, source="folder", name="x", num_classes=-1, path=str(tmp_path / "extracted"))
    np.testing.assert_array_equal(ds.train_images, want["train"][0])
    assert ds.num_classes == 3


def test_folder_worker_processes_match_in_process_decoding(tmp_path):
    root = tmp_path / "tree"
    want = write_tree(root, np.random.default_rng(6), counts={"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 1}})
    raw = sources.read_folder(root, num_workers=1)
    np.testing.assert_array_equal(raw.train_images, want["train"][0])
    np.testing.assert_array_equal(raw.test_images, want["test"][0])


def _png_items(rng, n):
    images = rand_images(rng, n)
    items = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        items.append((f"img{i}.png", buf.getvalue()))
    return images, items


def test_decode_keeps_order_across_a_window_of_chunks():
    images, items = _png_items(np.random.default_rng(8), 7)
    decoded = sources._decode(iter(items), num_workers=1, chunk=2)  # 4 chunks, at most 2 in flight
    np.testing.assert_array_equal(np.stack(decoded), images)


def test_decode_finishes_in_process_when_the_pool_breaks(monkeypatch):
    images, items = _png_items(np.random.default_rng(9), 7)

    class BreaksAfterTwoChunks(concurrent.futures.Executor):
        def __init__(self, *args, **kwargs):
            self.submitted = 0

        def submit(self, fn, *args):
            future = concurrent.futures.Future()
            self.submitted += 1
            if self.submitted <= 2:
                future.set_result(fn(*args))
            else:
                future.set_exception(concurrent.futures.process.BrokenProcessPool("a worker died"))
            return future

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", BreaksAfterTwoChunks)
    decoded = sources._decode(iter(items), num_workers=1, chunk=2)
    np.testing.assert_array_equal(np.stack(decoded), images)  # nothing lost, nothing decoded twice


def test_folder_errors(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "t1"
    write_tree(root, rng, counts={"train": {"a": 1, "b": 1}})
    with raises(data.DataNotFoundError, "no test split", str(root)):
        load(tmp_path, source="folder", num_classes=2, path=str(root))

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "test" / "a").mkdir(parents=True)
    with raises(data.DataNotFoundError, "no images under train/", str(empty)):
        load(tmp_path, source="folder", num_classes=1, path=str(empty))

    (empty / "train" / "b" / "0000.png").parent.mkdir()
    Image.fromarray(rand_images(rng, 1)[0]).save(empty / "train" / "b" / "0000.png")
    with raises(data.DataFormatError, "train/ class folder(s) ['a'] have no images"):
        load(tmp_path, source="folder", num_classes=1, path=str(empty))

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with raises(data.DataNotFoundError, "has no train/ or test/", str(nothing)):
        load(tmp_path, source="folder", num_classes=1, path=str(nothing))

    corrupt = tmp_path / "t2"
    write_tree(corrupt, rng, counts={"train": {"a": 2}, "test": {"a": 1}})
    broken = corrupt / "train" / "a" / "0001.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with raises(data.DataFormatError, "cannot decode image", str(broken)):
        load(tmp_path, source="folder", num_classes=1, path=str(corrupt))

    sizes = tmp_path / "t3"
    write_tree(sizes, rng, counts={"train": {"a": 1}, "test": {"a": 1}})
    Image.fromarray(rand_images(rng, 1, 16, 16)[0]).save(sizes / "train" / "a" / "0009.png")
    with raises(data.DataFormatError, "never resized", "0009.png"):
        load(tmp_path, source="folder", num_classes=1, path=str(sizes))

    extra = tmp_path / "t4"
    write_tree(extra, rng, counts={"train": {"a": 1}, "test": {"a": 1, "zebra": 1}})
    with raises(data.DataFormatError, "no train images", "zebra"):
        load(tmp_path, source="folder", num_classes=1, path=str(extra))

    bad_tar = tmp_path / "broken.tar.xz"
    bad_tar.write_bytes(b"\xfd7zXZ\x00 garbage")
    with raises(data.DataFormatError, "not a readable tar archive", str(bad_tar)):
        load(tmp_path, source="folder", num_classes=1, path=str(bad_tar))

    not_tar = tmp_path / "image.png"
    not_tar.write_bytes(b"x")
    with raises(data.DataConfigError, "not a tar archive", str(not_tar)):
        load(tmp_path, source="folder", num_classes=1, path=str(not_tar))


# ----------------------------------------------------------------------------------------------- tfds


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        # mock_data mocks tfds.data_source but not builder.is_prepared(); download=False keeps the loader on tfds.
        ds = load(tmp_path, source="tfds", name="cifar10", num_classes=10, tfds_data_dir=str(tmp_path / "tfds"),
                  download=False)
        direct = tfds.data_source("cifar10", split="test", download=False)
        want = np.stack([direct[i]["image"] for i in range(len(direct))])
        want_labels = np.asarray([direct[i]["label"] for i in range(len(direct))])
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.source == "tfds"
    np.testing.assert_array_equal(ds.test_images, want)
    np.testing.assert_array_equal(ds.test_labels, want_labels)
    np.testing.assert_allclose(ds.mean, (0.4914, 0.4822, 0.4465))


def _tiny_array_record_builder():
    """A real tfds builder writing ArrayRecord; Tensor (not Image) features, so no TensorFlow is needed."""
    import tensorflow_datasets as tfds

    global _TINY_BUILDER
    if _TINY_BUILDER is None:

        class DemkdTinyArrayRecord(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=["ant", "bee", "cat"])}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(7), "test": self._generate_examples(4)}

            def _generate_examples(self, n):
                for i, (x, y) in enumerate(zip(*_tiny_examples(n))):
                    yield i, {"image": x, "label": int(y)}

        _TINY_BUILDER = DemkdTinyArrayRecord
    return _TINY_BUILDER


_TINY_BUILDER = None


def _tiny_examples(n):
    rng = np.random.default_rng(n)
    return rand_images(rng, n), np.arange(n) % 3


def test_tfds_source_reads_a_real_array_record_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tfds"
    _tiny_array_record_builder()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    ds = load(tmp_path, source="tfds", name="demkd_tiny_array_record", num_classes=3, tfds_data_dir=str(data_dir))
    assert ds.class_names == ("ant", "bee", "cat")
    for split, n in (("train", 7), ("test", 4)):
        x, y = _tiny_examples(n)
        got = sorted(zip(getattr(ds, f"{split}_labels").tolist(), (im.tobytes() for im in getattr(ds, f"{split}_images"))))
        assert got == sorted(zip(y.tolist(), (im.tobytes() for im in x)))  # tfds shuffles the order on write


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tfds"
    with raises(data.DatasetNotPreparedError, "'cifar100' is not prepared", str(data_dir),
                f"tfds build cifar100 --data_dir={data_dir} --file_format=array_record", "internet") as info:
        load(tmp_path, source="tfds", name="cifar100", tfds_data_dir=str(data_dir), download=False)
    assert isinstance(info.value, FileNotFoundError)
    assert not any(data_dir.rglob("*.array_record*")) and not (data_dir / "downloads").exists()


def test_tfds_unknown_name(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with raises(data.DataConfigError, "unknown tfds dataset name 'cifar1000'"):
        load(tmp_path, source="tfds", name="cifar1000", tfds_data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ npz


def write_npz(d: pathlib.Path, rng, n=(8, 5), k=4, names=True, **overrides):
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in zip(("train", "test"), n):
        arrays = {"image": rand_images(rng, count), "label": rng.integers(0, k, count).astype(np.int64)}
        arrays.update(overrides.get(split, {}))
        np.savez_compressed(d / f"toy_{split}.npz", **arrays)
        out[split] = arrays
    if names:
        (d / "class_names.txt").write_text("".join(f"class{i}\n" for i in range(k)))
    return out


def test_npz_source(tmp_path):
    want = write_npz(tmp_path / "toy", np.random.default_rng(8))
    ds = load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "toy"))
    np.testing.assert_array_equal(ds.train_images, want["train"]["image"])
    np.testing.assert_array_equal(ds.test_labels, want["test"]["label"])
    assert ds.class_names == ("class0", "class1", "class2", "class3") and ds.train_labels.dtype == np.int32
    unnamed = write_npz(tmp_path / "unnamed", np.random.default_rng(8), names=False)
    ds = load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "unnamed"))
    assert ds.class_names == ("0", "1", "2", "3")
    np.testing.assert_array_equal(ds.test_images, unnamed["test"]["image"])


def test_npz_validation_errors(tmp_path):
    rng = np.random.default_rng(9)
    cases = [
        (dict(train={"label": np.array([0, 1, 2, 3, 4, 5, 6, 12])}), data.DataFormatError,
         ["[train]", "labels span [0, 12]", "num_classes=10", "[0, 9]"], 10),
        (dict(test={"label": np.array([-1, 0, 1, 2, 3])}), data.DataFormatError, ["[test]", "[-1, 3]"], 4),
        (dict(train={"image": rand_images(rng, 8).astype(np.float32)}), data.DataFormatError,
         ["must be uint8 [N, H, W, 3]", "float32 [8, 32, 32, 3]"], 4),
        (dict(train={"image": rand_images(rng, 8)[..., 0]}), data.DataFormatError, ["uint8 [8, 32, 32]"], 4),
        (dict(train={"image": rand_images(rng, 8, 28, 28)}, test={"image": rand_images(rng, 5, 28, 28)}),
         data.DataFormatError, ["28x28", "data.image_size=32", "never resized"], 4),
        (dict(test={"image": rand_images(rng, 5, 28, 28)}), data.DataFormatError,
         ["train images are [32, 32, 3] but test images are [28, 28, 3]"], 4),
        (dict(train={"label": np.zeros(7, np.int64)}), data.DataFormatError, ["8 images but 7 labels"], 4),
        (dict(train={"label": np.zeros(8, np.float32)}), data.DataFormatError, ["1-D integer array", "float32"], 4),
        (dict(), data.DataFormatError, ["has 4 classes (class0, class1, class2, class3)", "data.num_classes=100"], 100),
    ]
    for i, (overrides, exc, fragments, k) in enumerate(cases):
        d = tmp_path / f"case{i}"
        write_npz(d, rng, names=(i != 0), **overrides)  # case 0 has no names file: classes "0".."k-1"
        with raises(exc, *fragments):
            load(tmp_path, source="npz", num_classes=k, path=str(d))

    d = tmp_path / "missing_test"
    write_npz(d, rng)
    (d / "toy_test.npz").unlink()
    with raises(data.DataNotFoundError, "no test split", "*test*.npz", str(d)):
        load(tmp_path, source="npz", num_classes=4, path=str(d))

    d = tmp_path / "corrupt"
    write_npz(d, rng)
    (d / "toy_train.npz").write_bytes(b"PK\x03\x04 truncated")
    with raises(data.DataFormatError, "not a readable .npz file", "toy_train.npz"):
        load(tmp_path, source="npz", num_classes=4, path=str(d))

    d = tmp_path / "keys"
    d.mkdir()
    np.savez(d / "a_train.npz", x=np.zeros(1))
    np.savez(d / "a_test.npz", x=np.zeros(1))
    with raises(data.DataFormatError, "expected arrays 'image' and 'label'", "['x']"):
        load(tmp_path, source="npz", num_classes=4, path=str(d))


# --------------------------------------------------------------------------------------------- digits


def test_digits_source(tmp_path):
    from sklearn.datasets import load_digits

    ds = load(tmp_path, source="digits", num_classes=10)
    assert ds.class_names == tuple("0123456789") and ds.name == "digits"
    assert ds.train_images.shape[1:] == (32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.num_train + ds.num_test == 1797 and abs(ds.num_test - 0.2 * 1797) < 10
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    # Grey, pixel-replicated 4x, 0..16 -> 0..255: the 8x8 originals come back exactly.
    x = ds.train_images
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()
    assert (x == np.repeat(np.repeat(x[:, ::4, ::4], 4, axis=1), 4, axis=2)).all()
    grey = load_digits().images.astype(np.int64)
    originals = {g.tobytes() for g in ((grey * 255 + 8) // 16).astype(np.uint8)}
    assert all(im.tobytes() in originals for im in np.concatenate([x, ds.test_images])[:, ::4, ::4, 0])
    # Stratified: every class in both splits at about the same share.
    share = np.bincount(ds.test_labels, minlength=10) / np.bincount(
        np.concatenate([ds.train_labels, ds.test_labels]), minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.01), share
    # Deterministic: a fresh decode (no cache) gives the same split.
    again = load(tmp_path, source="digits", num_classes=10, use_cache=False)
    np.testing.assert_array_equal(again.test_images, ds.test_images)
    np.testing.assert_array_equal(again.train_labels, ds.train_labels)
    assert ds.stats_origin == "computed"


# ---------------------------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    d = tmp_path / "toy"
    first = write_npz(d, np.random.default_rng(10))
    ds1 = load(tmp_path, source="npz", num_classes=4, path=str(d))
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("npz-cifar100-") and cached[0].suffix == ".npz"

    real_reader = sources.read_npz

    def must_not_decode(*args, **kwargs):
        raise AssertionError("the source was decoded again instead of read from the cache")

    monkeypatch.setattr(sources, "read_npz", must_not_decode)
    ds2 = load(tmp_path, source="npz", num_classes=4, path=str(d))
    np.testing.assert_array_equal(ds2.train_images, ds1.train_images)
    hit = load(tmp_path, source="npz", num_classes=4, path=str(d), normalization="computed")  # stats cached too
    np.testing.assert_array_equal(hit.mean, data.channel_stats(ds1.train_images)[0])

    # A changed source is decoded again, never served stale; the old cache file goes.
    time.sleep(0.01)
    second = write_npz(d, np.random.default_rng(11))
    with pytest.raises(AssertionError, match="decoded again"):
        load(tmp_path, source="npz", num_classes=4, path=str(d))
    monkeypatch.setattr(sources, "read_npz", real_reader)
    ds3 = load(tmp_path, source="npz", num_classes=4, path=str(d))
    np.testing.assert_array_equal(ds3.train_images, second["train"]["image"])
    assert not np.array_equal(ds3.train_images, first["train"]["image"])
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no stale file, no temporary left over

    # An unreadable cache file is rebuilt, not trusted.
    cached[0].write_bytes(b"garbage")
    ds4 = load(tmp_path, source="npz", num_classes=4, path=str(d))
    np.testing.assert_array_equal(ds4.train_images, second["train"]["image"])


def test_a_wrong_class_count_does_not_cost_a_second_decode(tmp_path, monkeypatch):
    write_npz(tmp_path / "toy", np.random.default_rng(14))
    with raises(data.DataFormatError, "has 4 classes", "data.num_classes=7"):
        load(tmp_path, source="npz", name="toy", num_classes=7, path=str(tmp_path / "toy"))
    monkeypatch.setattr(sources, "read_npz", lambda *a: pytest.fail("decoded twice"))
    assert load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "toy")).num_classes == 4


def test_cache_dir_defaults_and_opt_out(tmp_path, monkeypatch):
    from demkd_jax.data import cache

    monkeypatch.setenv("DEMKD_CACHE_DIR", str(tmp_path / "env"))
    assert cache.resolve_cache_dir("") == tmp_path / "env"
    monkeypatch.delenv("DEMKD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.resolve_cache_dir("") == tmp_path / "xdg" / "demkd_jax"
    assert cache.resolve_cache_dir(str(tmp_path / "c")) == tmp_path / "c"
    write_npz(tmp_path / "toy", np.random.default_rng(12))
    load(tmp_path, source="npz", num_classes=4, path=str(tmp_path / "toy"), use_cache=False)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------- config


def test_config_errors(tmp_path):
    cfg = data.default_data_config()
    for field in ("source", "name", "path", "num_classes", "cache_dir", "tfds_data_dir", "image_size"):
        assert field in cfg
    with raises(data.DataConfigError, "unknown data.source 'imagenet'", "digits", "folder", "npz", "pickle", "tfds"):
        load(tmp_path, source="imagenet")
    with raises(data.DataConfigError, "unknown data config field(s) ['sorce']"):
        data.load_dataset({"sorce": "npz"})
    missing = tmp_path / "nowhere"
    with raises(data.DataNotFoundError, f"data.path {missing} does not exist"):
        load(tmp_path, source="npz", path=str(missing))
    with raises(data.DataConfigError, "data.path is empty", "'folder'"):
        load(tmp_path, source="folder")
    with raises(data.DataConfigError, "data.normalization"):
        load(tmp_path, source="digits", normalization="imagenet")
    with raises(data.DataConfigError, "multiple of 8"):
        load(tmp_path, source="digits", num_classes=10, image_size=30)
    assert issubclass(data.DataConfigError, ValueError) and issubclass(data.DataNotFoundError, FileNotFoundError)


def test_normalization_choice(tmp_path, caplog):
    write_npz(tmp_path / "toy", np.random.default_rng(13))
    published = load(tmp_path, source="npz", name="cifar100", num_classes=4, path=str(tmp_path / "toy"))
    np.testing.assert_allclose(published.std, (0.2675, 0.2565, 0.2761))
    # Uniform noise is not CIFAR-100 (blue mean 0.5, not 0.44): said, not silently accepted.
    assert "selects the published mean" in caplog.text
    computed = load(tmp_path, source="npz", name="cifar100", num_classes=4, path=str(tmp_path / "toy"),
                    normalization="computed")
    assert computed.stats_origin == "computed"
    np.testing.assert_allclose(computed.mean, computed.train_images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)


def test_downsample_mean_pools_exactly_and_computes_stats_from_the_pooled_split(tmp_path, caplog):
    want = write_npz(tmp_path / "toy", np.random.default_rng(14))
    ds = load(tmp_path, source="npz", name="cifar100", num_classes=4, path=str(tmp_path / "toy"), downsample=2)
    for split in ("train", "test"):
        x = want[split]["image"].astype(np.float64)
        n, h, w, c = x.shape
        blocks = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        pooled = getattr(ds, f"{split}_images")
        assert pooled.shape == (n, h // 2, w // 2, c) and pooled.dtype == np.uint8
        np.testing.assert_array_equal(pooled, np.rint(blocks).astype(np.uint8))  # nearest, halves to even
    # The name selects published statistics at full size only: pooled images have their own (smaller) std.
    assert ds.stats_origin == "computed" and "selects the published mean" not in caplog.text
    flat = ds.train_images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, flat.std(0), rtol=1e-5)
    full = load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "toy"))
    assert np.all(ds.std < full.std)
    halves = np.array([[[[1], [2]], [[2], [1]]], [[[2], [3]], [[3], [2]]], [[[1], [2]], [[2], [2]]]], np.uint8)
    np.testing.assert_array_equal(data.loader.mean_pool(halves, 2).ravel(), [2, 2, 2])  # 1.5, 2.5 -> 2; 1.75 -> 2
    with raises(data.DataFormatError, "images are 32x32, not divisible by data.downsample=3"):
        load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "toy"), downsample=3)
    with raises(data.DataConfigError, "data.downsample=0", "positive integer"):
        load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "toy"), downsample=0)
    with raises(data.DataConfigError, "bad data config value", "downsample"):
        data.load_dataset({"source": "npz", "path": str(tmp_path / "toy"), "downsample": 1.5})
    with raises(data.DataConfigError, "data.crop_padding=-1", "non-negative integer"):
        load(tmp_path, source="npz", name="toy", num_classes=4, path=str(tmp_path / "toy"), crop_padding=-1)


# ------------------------------------------------------------------------------------------- pipeline

MEAN = np.array([0.5071, 0.4867, 0.4408], np.float32)
STD = np.array([0.2675, 0.2565, 0.2761], np.float32)


def test_batch_indices_epochs_are_permutations():
    key = jax.random.key(0)
    n, b = 10, 3  # steps_per_epoch 3; one example skipped per epoch
    assert data.steps_per_epoch(n, b) == 3

    def batch_indices(key, step):
        return data.batch_indices_from_permutation(data.epoch_permutation(key, step // 3, n), step, b)

    step_fn = jax.jit(lambda s: batch_indices(key, s))
    epochs = [np.concatenate([np.asarray(step_fn(jnp.int32(e * 3 + s))) for s in range(3)]) for e in range(3)]
    for order in epochs:
        assert order.dtype == np.int32 and len(order) == 9 and len(set(order.tolist())) == 9
        assert set(order.tolist()) <= set(range(n))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Reproducible and resumable: a fresh computation of any step agrees; eager == jit.
    np.testing.assert_array_equal(np.asarray(batch_indices(jax.random.key(0), 7)), epochs[2][3:6])
    np.testing.assert_array_equal(np.asarray(data.epoch_permutation(key, 2, n))[:9], epochs[2])
    assert step_fn._cache_size() == 1  # the step is traced: no recompilation across steps
    other = np.asarray(batch_indices(jax.random.key(1), 0))
    assert not np.array_equal(other, epochs[0][:3])
    with pytest.raises(ValueError, match="smaller than batch_size"):
        data.steps_per_epoch(3, 4)


def numpy_crop_flip(images, offsets, flips, p):
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = images.shape[1:3]
    out = np.stack([padded[i, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_crop_and_flip_matches_padded_numpy_crop():
    p = 4
    oy, ox, fl = np.meshgrid(np.arange(2 * p + 1), np.arange(2 * p + 1), [False, True], indexing="ij")
    offsets = np.stack([oy.ravel(), ox.ravel()], 1).astype(np.int32)
    flips = fl.ravel()
    images = np.random.default_rng(14).integers(1, 256, (len(flips), 8, 6, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(data.crop_and_flip, static_argnums=3)(images, offsets, flips, p))
    np.testing.assert_array_equal(got, numpy_crop_flip(images, offsets, flips, p))
    # Offset (4, 4) without flip is the identity; (0, 0) shifts the image down-right by 4, zero-filled.
    centre = (offsets[:, 0] == 4) & (offsets[:, 1] == 4) & ~flips
    np.testing.assert_array_equal(got[centre][0], images[centre][0])
    corner = (offsets[:, 0] == 0) & (offsets[:, 1] == 0) & ~flips
    assert (got[corner][0][:4] == 0).all() and (got[corner][0][:, :4] == 0).all()
    np.testing.assert_array_equal(got[corner][0][4:, 4:], images[corner][0][:-4, :-4])


def test_random_crop_flip_is_a_keyed_translation_and_flip():
    images = np.random.default_rng(15).integers(1, 256, (256, 8, 8, 3), dtype=np.uint8)
    fn = jax.jit(lambda x, k: data.random_crop_flip(x, k, 4))
    got = np.asarray(fn(images, jax.random.key(3)))
    np.testing.assert_array_equal(got, np.asarray(fn(images, jax.random.key(3))))
    assert not np.array_equal(got, np.asarray(fn(images, jax.random.key(4))))
    # Every output is exactly one of the 162 candidates (9 x 9 offsets, flip or not) of its own input.
    candidates = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)]
    stacked = np.stack([numpy_crop_flip(images, [(oy, ox)] * len(images), np.full(len(images), f), 4)
                        for oy, ox, f in candidates])  # [162, B, H, W, C]
    hits = (stacked == got[None]).all(axis=(2, 3, 4))  # [162, B]
    assert hits.any(axis=0).all(), "some outputs are not padded crops (+ flips) of their inputs"
    chosen = [candidates[c] for c in hits.argmax(axis=0)]
    seen_offsets = {c[:2] for c in chosen}
    flips = sum(c[2] for c in chosen)
    assert len(seen_offsets) > 60 and 90 < flips < 166  # offsets spread over the 81, fair coin
    no_flip = np.asarray(jax.jit(lambda x: data.random_crop_flip(x, jax.random.key(3), 0, flip=False))(images))
    np.testing.assert_array_equal(no_flip, images)


def test_augment_output_and_normalisation():
    rng = np.random.default_rng(16)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = jax.jit(lambda x, k: data.augment(x, k, MEAN, STD))(images, jax.random.key(0))
    assert out.shape == (16, 32, 32, 3) and out.dtype == jnp.float32
    ref = (images.astype(np.float64) / 255 - MEAN) / STD
    np.testing.assert_allclose(np.asarray(jax.jit(data.normalize)(images, MEAN, STD)), ref, rtol=1e-5, atol=1e-5)
    # Padding is zero before normalising: padded pixels are -mean/std, as torchvision's pad-then-normalise.
    shift = jax.jit(lambda x: data.normalize(data.crop_and_flip(x, jnp.zeros((16, 2), jnp.int32), jnp.zeros(16, bool), 4),
                                             MEAN, STD))
    np.testing.assert_allclose(np.asarray(shift(images))[:, 0, 0], np.broadcast_to(-MEAN / STD, (16, 3)), rtol=1e-6)
    bf16 = jax.eval_shape(lambda x: data.augment(x, jax.random.key(0), MEAN, STD, dtype=jnp.bfloat16), images)
    assert bf16.dtype == jnp.bfloat16


def test_eval_batches_cover_every_example_once():
    n, b = 10, 4
    assert data.num_eval_batches(n, b) == 3 and data.num_eval_batches(12, 4) == 3
    fn = jax.jit(lambda i: data.eval_batch_indices(i, n, b))
    seen = []
    for i in range(data.num_eval_batches(n, b)):
        idx, mask = fn(jnp.int32(i))
        assert idx.shape == (b,) and mask.dtype == jnp.bool_
        seen += np.asarray(idx)[np.asarray(mask)].tolist()
    assert sorted(seen) == list(range(n)) and fn._cache_size() == 1
    # Masked accuracy over padded batches equals the plain accuracy.
    labels = np.arange(n) % 3
    preds = np.where(np.arange(n) < 7, labels, -1)
    correct = sum(float(jnp.sum((preds[np.asarray(i)] == labels[np.asarray(i)]) * m))
                  for i, m in (fn(jnp.int32(k)) for k in range(3)))
    assert correct == 7


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    path = shared("cifar100")
    return data.load_dataset(dict(source="npz", name="cifar100", num_classes=100, path=str(path), use_cache=False))


def test_real_cifar100_npz(cifar100):
    ds = cifar100
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert ds.num_classes == 100 and ds.class_names[:2] == ("apple", "aquarium_fish") and ds.class_names[-1] == "worm"
    assert (np.bincount(ds.train_labels) == 500).all() and (np.bincount(ds.test_labels) == 100).all()
    np.testing.assert_allclose(ds.train_images.mean(axis=(0, 1, 2)) / 255, CIFAR100_TRAIN_MEAN, atol=1e-6)
    np.testing.assert_allclose(ds.mean, (0.5071, 0.4867, 0.4408))


@pytest.mark.slow
def test_real_cifar10_image_folder(tmp_path):
    ds = load(tmp_path, source="folder", name="cifar10", num_classes=10, path=str(shared("cifar10-jpeg.tar.xz")))
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    assert (np.bincount(ds.train_labels) == 5000).all()
    np.testing.assert_allclose(ds.train_images.mean(axis=(0, 1, 2)) / 255, (0.4914, 0.4822, 0.4465), atol=2e-3)
