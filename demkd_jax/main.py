"""Command line: ``python -m demkd_jax.main --config configs/vgg8.py --workdir runs/vgg8 [--config.key=value]``.

Everything happens in :func:`demkd_jax.train.train_and_evaluate`; this file only parses flags.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summary.json.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_config().", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    from demkd_jax import config as config_lib
    from demkd_jax import train
    from demkd_jax.checkpoint import CheckpointError
    from demkd_jax.data import DataError

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, CheckpointError, DataError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
