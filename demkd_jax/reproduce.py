"""The results table in one command: teachers, then every method on the same teachers.

    python -m demkd_jax.reproduce --pair vgg13-vgg8 --workdir runs/repro_vgg8
    python -m demkd_jax.reproduce --pair wrn_40_2-ShuffleV2 --workdir runs/repro_shufflev2

trains K teachers of the pair's teacher architecture in one compiled step (or reuses them), then a
student with each method — CE (no teacher), single-teacher KD and DKD (teacher 0), AVER, EBKD, CA-MKD,
DE-MKD on logits, DE-MKD with the feature term — each with ``--seeds`` independently initialised
students in one graph, and writes ``results.md`` and ``results.json`` in the workdir. Every piece is a
``train_and_evaluate`` run in its own sub-directory: a rerun skips finished pieces and resumes an
interrupted one. ``--epochs``, ``--teacher-epochs``, ``--width`` and the data flags scale it down
(e.g. the CI test runs it on a few hundred images for one epoch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections

from demkd_jax import config as config_lib
from demkd_jax import hostmem, interrupts
from demkd_jax import methods
from demkd_jax import train

# Student variants of the table: (label, method, use the feature term).
VARIANTS = (
    ("CE", "ce", False),
    ("KD", "kd", False),
    ("DKD", "dkd", False),
    ("AVER", "aver", False),
    ("EBKD", "ebkd", False),
    ("CA-MKD", "camkd", True),
    ("DE-MKD (logits)", "demkd", False),
    ("DE-MKD", "demkd", True),
)
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # docs/method.md §3: lr 0.01


def spec_beta(teacher: str, student: str) -> float:
    """NCKD weight by pair (docs/method.md §3)."""
    if (teacher, student) in {("vgg13", "vgg8"), ("vgg13", "MobileNetV2"), ("wrn_40_2", "wrn_16_2"),
                              ("wrn_40_2", "wrn_40_1")}:
        return 6.0
    if (teacher, student) in {("resnet56", "resnet20"), ("resnet110", "resnet32")}:
        return 2.0
    if teacher.startswith("resnet") and student.startswith("resnet") and "x4" not in teacher + student:
        return 2.0  # the small CIFAR ResNet pairs follow the resnet56 -> resnet20 setting
    return 8.0


def slug(label: str) -> str:
    return label.lower().replace(" ", "").replace("(", "_").replace(")", "").replace("-", "")


def base_for(args) -> ml_collections.ConfigDict:
    teacher, student = args.pair.split("-", 1)
    c = config_lib.base_config()
    c.data.source = args.data_source
    c.data.name = args.data_name
    c.data.path = args.data_path
    c.data.num_classes = args.num_classes
    if args.cache_dir:
        c.data.cache_dir = args.cache_dir
    c.student.model = student
    c.student.width = args.width
    c.teachers.model = teacher
    c.teachers.num = args.teachers
    c.teachers.width = args.width
    c.num_epochs = args.epochs
    c.batch_size = args.batch_size
    c.dtype = args.dtype
    c.num_seeds = args.seeds
    c.seed = args.seed
    c.progress_bar = args.progress
    c.distill.beta = spec_beta(teacher, student)
    c.optim.learning_rate = 0.01 if student in SMALL_LR_STUDENTS else 0.05
    if args.epochs != 240:  # the lineage's decay epochs, scaled to the shortened schedule
        c.optim.lr_decay_epochs = tuple(max(1, round(e * args.epochs / 240)) for e in (150, 180, 210))
    return c


def teacher_run_config(args) -> ml_collections.ConfigDict:
    c = train.teacher_config(base_for(args))
    c.optim.learning_rate = 0.05  # teachers keep the default recipe whatever the student's lr
    epochs = args.teacher_epochs if args.teacher_epochs > 0 else args.epochs
    c.num_epochs = epochs
    if epochs != 240:
        c.optim.lr_decay_epochs = tuple(max(1, round(e * epochs / 240)) for e in (150, 180, 210))
    return c


def student_config(args, method: str, features: bool, teacher_dirs: list[str]) -> ml_collections.ConfigDict:
    c = base_for(args)
    c.distill.method = method
    c.distill.features = features
    if args.scale_warmup and config_lib.warmup_epochs(c) > 0:
        c.distill.warmup_epochs = max(1, round(config_lib.warmup_epochs(c) * args.epochs / 240))
    if method == "ce":
        c.teachers.checkpoints = ()
        c.teachers.model = ""
    else:
        c.teachers.checkpoints = tuple(teacher_dirs[:1] if methods.get(method).teachers == "one"
                                       else teacher_dirs)
    return c


def _load_summary(workdir: pathlib.Path) -> dict | None:
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run(args) -> dict[str, Any]:
    root = pathlib.Path(args.workdir).absolute()
    labels = [v for v in VARIANTS if args.methods is None or v[0] in args.methods or v[1] in args.methods]
    # Validate every piece's config before any work.
    teacher_cfg = teacher_run_config(args)
    config_lib.validate(teacher_cfg, workdir=str(root))
    t_dir = root / "teachers"
    placeholder = [str(t_dir / f"teacher_{k}") for k in range(args.teachers)]
    for label, method, features in labels:
        cfg = student_config(args, method, features, placeholder)
        cfg.teachers.num = len(cfg.teachers.checkpoints)
        cfg.teachers.checkpoints = ()  # the teacher dirs do not exist yet
        config_lib.validate(cfg)

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    t_summary = _load_summary(t_dir)
    if t_summary is None or "teacher_dirs" not in t_summary:
        print(f"== teachers: {args.teachers} x {teacher_cfg.student.model}")
        t_summary = train.train_and_evaluate(teacher_cfg, str(t_dir))
    else:
        print(f"== teachers: reusing {t_dir}")
    teacher_dirs = t_summary["teacher_dirs"]

    rows = []
    for label, method, features in labels:
        workdir = root / slug(label)
        summary = _load_summary(workdir)
        if summary is None:
            print(f"== {label}")
            summary = train.train_and_evaluate(student_config(args, method, features, teacher_dirs), str(workdir))
        else:
            print(f"== {label}: done, reusing {workdir}")
        rows.append({**summary, "method": label, "config_method": method, "features": features})

    results = {
        "pair": args.pair, "epochs": args.epochs, "teacher_epochs": teacher_cfg.num_epochs, "width": args.width,
        "seeds": args.seeds, "dataset": t_summary["dataset"],
        "teachers": {"model": teacher_cfg.student.model, "test_acc": t_summary["final_test_acc"],
                     "best_test_acc": t_summary["best_test_acc"], "ensemble_test_acc": t_summary["ensemble_test_acc"],
                     "wall_time_s": t_summary["wall_time_s"]},
        "students": rows,
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax_version": jax.__version__,
        "wall_time_s_this_invocation": round(time.time() - t0, 1),
        "total_wall_time_s": round(t_summary["wall_time_s"] + sum(r["wall_time_s"] for r in rows), 1),
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    (root / "results.md").write_text(results_markdown(results))
    print(results_markdown(results))
    return results


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f}"


def results_markdown(r: dict) -> str:
    t = r["teachers"]
    n = r["seeds"]
    lines = [
        f"# {r['pair']} on {r['dataset']}",
        "",
        f"Teachers: {len(t['test_acc'])} x {t['model']}, final top-1 {', '.join(f'{a:.2f}' for a in t['test_acc'])}; "
        f"ensemble {t['ensemble_test_acc']:.2f} ({r['teacher_epochs']} epochs, {t['wall_time_s']:.0f} s).",
        f"Students: {r['epochs']} epochs, width {r['width']}, {n} seed(s) per method (mean ± std over seeds; same "
        "teachers and data order, different initialisations).",
        f"Device: {r['device']} ({r['backend']}), jax {r['jax_version']}. Total wall time {r['total_wall_time_s']:.0f} s.",
        "",
        "| method | best top-1 | final top-1 | img/s | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in r["students"]:
        lines.append(f"| {row['method']} | {_pm(row['best_test_acc_mean'], row['best_test_acc_std'], n)} | "
                     f"{_pm(row['final_test_acc_mean'], row['final_test_acc_std'], n)} | {row['img_per_s']:.0f} | "
                     f"{row['wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m demkd_jax.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", required=True, help="TEACHER-STUDENT, e.g. vgg13-vgg8 or wrn_40_2-ShuffleV2")
    p.add_argument("--workdir", required=True)
    p.add_argument("--epochs", type=int, default=240, help="student epochs (lr decay epochs scale with it)")
    p.add_argument("--teacher-epochs", type=int, default=-1, help="default: --epochs")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1, help="students per method, trained in one graph")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of teachers and student")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help=f"subset, comma-separated, of: {', '.join(v[0] for v in VARIANTS)} (or method names)")
    p.add_argument("--scale-warmup", action="store_true",
                   help="scale the 20-epoch KD warm-up with --epochs (default: keep the recipe's 20)")
    p.add_argument("--data-source", default="tfds")
    p.add_argument("--data-name", default="cifar100")
    p.add_argument("--data-path", default="")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if "-" not in args.pair:
        p.error(f"--pair must be TEACHER-STUDENT, got {args.pair!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from demkd_jax.checkpoint import CheckpointError
    from demkd_jax.data import DataError

    try:
        with interrupts.stop_on_signals():
            run(args)
    except (config_lib.ConfigError, CheckpointError, DataError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as e:
        print(f"interrupted: {e}; rerun the same command to resume (finished pieces are reused)", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    hostmem.reexec_with_tunables()
    sys.exit(main())
