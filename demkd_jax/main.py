"""Command line: ``python -m demkd_jax.main --config configs/vgg8.py --workdir runs/vgg8 [--config.key=value]``.

Everything happens in :func:`demkd_jax.train.train_and_evaluate`; this file only parses flags. A bad input (flag,
config value, data, checkpoint) or a non-finite loss ends the run with one line ``error: ...`` on stderr and
exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from demkd_jax import hugepages

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summary.json.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_config().", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

USAGE_ERROR = 2


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _innermost_message(e: BaseException) -> str:
    """ml_collections wraps a KeyError in an AttributeError; the innermost text is the readable one."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    return str(e.args[0]) if e.args and isinstance(e.args[0], str) else str(e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with every flag error (a mistyped ``--config.key`` included) reported in one line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e} (see --helpshort)")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by the locked config for --config.*
        message = _innermost_message(e).replace("\nDid you mean", "; did you mean")
        key = message.split("'")[1] if message.count("'") >= 2 else ""
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if key and key in o.split(".")] or overrides
        _fail(f"unknown config key in {', '.join(named) or 'the flags'}: no field {message} (the config is locked; "
              "expected one of its existing keys: see the config file and base_config() in demkd_jax/config.py)")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        config = FLAGS.config
        config.keys()  # a config file that failed to load raises here
    except OSError as e:
        _fail(f"cannot load --config: {e}")
    from demkd_jax import config as config_lib
    from demkd_jax import train
    from demkd_jax.checkpoint import CheckpointError
    from demkd_jax.data import DataError

    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except (config_lib.ConfigError, CheckpointError, DataError, train.NonFiniteError) as e:
        _fail(str(e))


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    app.run(main, flags_parser=parse_flags)
