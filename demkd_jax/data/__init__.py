"""Data for demkd_jax: load a dataset on the host once, then batch and augment it on the device.

Host side (numpy; :mod:`.loader`, :mod:`.sources`, :mod:`.cache`, :mod:`.dataset`):

- :func:`default_data_config` -- the fields of ``config.data`` and their defaults.
- :func:`load_dataset` ``(config.data) -> Dataset`` -- reads the configured source (``tfds``, ``pickle``,
  ``folder``, ``npz`` or ``digits``), validates it, caches the decoded arrays as ``.npz``. CIFAR-100/10
  without a prepared tfds copy come from the official archive, downloaded once (:mod:`.download`).
- :class:`Dataset` -- ``train_images``/``test_images`` uint8 ``[N, H, W, 3]``, ``train_labels``/
  ``test_labels`` int32 ``[N]``, ``class_names``, ``mean``/``std`` float32 ``[3]`` (pixel/255 units).
- Errors: :class:`DataConfigError` (a ValueError), :class:`DataNotFoundError` (a FileNotFoundError)
  with :class:`DatasetNotPreparedError` and :class:`DownloadError`, :class:`DataFormatError` (a ValueError); all :class:`DataError`.

Device side (pure JAX, call inside ``jax.jit``; :mod:`.pipeline`)::

    ds = load_dataset(config.data)
    images, labels = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)
    # inside the jitted step, ``step`` an int32 array:
    idx = batch_indices(data_key, step, ds.num_train, batch_size)
    x = augment(images[idx], jax.random.fold_in(aug_key, step), ds.mean, ds.std,
                padding=config.data.crop_padding, flip=config.data.random_flip)
    # evaluation, ``i`` in range(num_eval_batches(ds.num_test, batch_size)):
    idx, mask = eval_batch_indices(i, ds.num_test, batch_size)
    x = normalize(test_images[idx], ds.mean, ds.std)

- :func:`steps_per_epoch`, :func:`batch_indices`, :func:`epoch_permutation`,
  :func:`batch_indices_from_permutation` -- the training order, a function of ``(key, step)``.
- :func:`augment` = :func:`random_crop_flip` (:func:`crop_and_flip` with random offsets/flips) then
  :func:`normalize`.
- :func:`num_eval_batches`, :func:`eval_batch_indices` -- every test example exactly once, fixed shapes.
"""

from demkd_jax.data.dataset import (
    PUBLISHED_STATS,
    DataConfigError,
    DataError,
    DataFormatError,
    DataNotFoundError,
    Dataset,
    DatasetNotPreparedError,
    RawData,
    channel_stats,
)
from demkd_jax.data.download import DownloadError
from demkd_jax.data.loader import SOURCES, default_data_config, load_dataset
from demkd_jax.data.pipeline import (
    augment,
    batch_indices,
    batch_indices_from_permutation,
    crop_and_flip,
    epoch_permutation,
    eval_batch_indices,
    normalize,
    num_eval_batches,
    random_crop_flip,
    steps_per_epoch,
)

__all__ = [
    "PUBLISHED_STATS",
    "SOURCES",
    "DataConfigError",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "Dataset",
    "DatasetNotPreparedError",
    "DownloadError",
    "RawData",
    "augment",
    "batch_indices",
    "batch_indices_from_permutation",
    "channel_stats",
    "crop_and_flip",
    "default_data_config",
    "epoch_permutation",
    "eval_batch_indices",
    "load_dataset",
    "normalize",
    "num_eval_batches",
    "random_crop_flip",
    "steps_per_epoch",
]
