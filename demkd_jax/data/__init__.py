"""Data for demkd_jax: load a dataset on the host once, then batch and augment it on the device.

Host side: :func:`load_dataset` ``(config.data) -> Dataset`` (:mod:`.loader`; fields and defaults in
:func:`default_data_config`). Device side (pure JAX, inside ``jax.jit``; :mod:`.pipeline`): the training order
(:func:`epoch_permutation`, :func:`batch_indices_from_permutation`), :func:`augment` and the evaluation batches
(:func:`num_eval_batches`, :func:`eval_batch_indices`). Every error is a :class:`DataError`. The design, the
sources and a usage sketch: docs/data.md.
"""

from demkd_jax.data.dataset import (PUBLISHED_STATS, DataConfigError, DataError, DataFormatError, DataNotFoundError,
                                    Dataset, DatasetNotPreparedError, channel_stats)
from demkd_jax.data.download import DownloadError
from demkd_jax.data.loader import default_data_config, load_dataset
from demkd_jax.data.pipeline import (augment, batch_indices_from_permutation, crop_and_flip, epoch_permutation,
                                     eval_batch_indices, normalize, num_eval_batches, random_crop_flip, steps_per_epoch)

__all__ = [
    "PUBLISHED_STATS", "DataConfigError", "DataError", "DataFormatError", "DataNotFoundError", "Dataset",
    "DatasetNotPreparedError", "DownloadError", "augment", "batch_indices_from_permutation", "channel_stats",
    "crop_and_flip", "default_data_config", "epoch_permutation", "eval_batch_indices", "load_dataset", "normalize",
    "num_eval_batches", "random_crop_flip", "steps_per_epoch",
]
