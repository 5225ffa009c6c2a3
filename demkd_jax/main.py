"""Command line: ``python -m demkd_jax.main --config configs/vgg8.py --workdir runs/vgg8 [--config.key=value]``.

Everything happens in :func:`demkd_jax.train.train_and_evaluate`; this file only parses flags. A bad input (flag,
config file or value, data, checkpoint, a workdir in use) or a non-finite loss ends the run with one line
``error: ...`` on stderr and exit status 2. SIGINT (Ctrl-C) or SIGTERM stops it with one line ``interrupted: ...``
and exit status 130 or 143; the same command resumes it from the last checkpoint.
"""

from __future__ import annotations

import ast
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from demkd_jax import hugepages, interrupts

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


def _config_file_arg(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config X`` or ``--config=X``), None without one."""
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config":
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def check_config_file(value: str) -> None:
    """A ``--config`` file must be Python source defining ``get_config`` (``FILE.py:ARG`` passes ARG to it)."""
    path = pathlib.Path(value)
    if not path.is_file() and ":" in value:
        path = pathlib.Path(value.split(":", 1)[0])
    what = f"--config {str(path)!r}"
    if not path.is_file():
        _fail(f"{what} {'is not a file' if path.exists() else 'does not exist'}; expected a config file such as "
              "configs/vgg8.py")
    try:
        source = path.read_bytes()
    except OSError as e:
        _fail(f"cannot read {what}: {e.strerror}")
    try:
        if b"\0" in source:
            raise UnicodeDecodeError("utf-8", source, source.index(b"\0"), source.index(b"\0") + 1, "NUL byte")
        tree = ast.parse(source.decode("utf-8"), filename=str(path))
    except UnicodeDecodeError:
        _fail(f"{what} is not a Python config file (it holds binary data); expected a .py file defining get_config()")
    except SyntaxError as e:
        _fail(f"{what} is not valid Python (line {e.lineno}: {e.msg}); expected a .py file defining get_config()")
    if "get_config" not in _top_level_names(tree):
        _fail(f"{what} defines no get_config(); expected a function get_config() returning the config "
              "(see configs/vgg8.py)")


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines at its top level: functions, assignments, imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name for a in node.names)
    return names


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with every flag error (a mistyped ``--config.key`` included) reported in one line."""
    config_file = _config_file_arg(argv)
    if config_file is not None:
        check_config_file(config_file)
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
        with interrupts.stop_on_signals():
            train.train_and_evaluate(config, FLAGS.workdir)
    except (config_lib.ConfigError, CheckpointError, DataError, train.NonFiniteError) as e:
        _fail(str(e))
    except interrupts.Interrupted as e:
        print(f"interrupted: {e}; {resume_hint(FLAGS.workdir)}", file=sys.stderr)
        sys.exit(e.exit_status)


def resume_hint(workdir: str) -> str:
    """What a rerun of the same command resumes from."""
    checkpoints = pathlib.Path(workdir).absolute() / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
    if not steps:
        return "no checkpoint was saved yet: rerunning the same command starts the run again"
    return f"rerun the same command to resume from the last checkpoint (step {steps[-1]} in {checkpoints})"


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    app.run(main, flags_parser=parse_flags)
