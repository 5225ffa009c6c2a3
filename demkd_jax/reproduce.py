"""The results table in one command: teachers, then every method on the same teachers, with statistics.

    python -m demkd_jax.reproduce --protocol configs/protocols/cifar100_16px_pilot.py --workdir runs/pilot
    python -m demkd_jax.reproduce --pair vgg13-vgg8 --workdir runs/repro_vgg8

Protocols, matched pairs, the statistics and the verdicts: docs/reproduce.md. Every piece runs in its own
sub-directory of the workdir: a rerun skips finished pieces and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from demkd_jax import config as config_lib
from demkd_jax import hugepages
from demkd_jax import interrupts
from demkd_jax import methods
from demkd_jax import stats
from demkd_jax import train
from demkd_jax import validation
from demkd_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a label, the trainer's ``distill.method`` and the config keys it sets."""

    label: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()


VARIANTS: dict[str, Variant] = {
    "ce": Variant("CE", "ce"),
    "kd": Variant("KD (teacher 0)", "kd"),
    "dkd": Variant("DKD (teacher 0)", "dkd"),
    "aver": Variant("AVER", "aver"),
    "ebkd": Variant("EBKD", "ebkd"),
    "camkd": Variant("CA-MKD", "camkd", (("distill.features", True),)),
    "fitnet_mkd": Variant("FitNet-MKD", "fitnet_mkd"),
    "dkd_uniform": Variant("DKD (uniform weights)", "dkd_uniform"),
    "demkd_logits": Variant("DE-MKD (logits)", "demkd", (("distill.features", False),)),
    "demkd": Variant("DE-MKD", "demkd", (("distill.features", True),)),
    # The feature and logit terms averaged over the teachers as CA-MKD's code does (its extra 1/K).
    "demkd_mean": Variant("DE-MKD (1/K reduction)", "demkd",
                          (("distill.features", True), ("distill.teacher_reduction", "mean"))),
}
# What each pair of variants isolates (the first minus the second).
COMPONENTS = (
    ("dkd_uniform", "aver", "decoupling (DKD vs KD, uniform weights)"),
    ("demkd_logits", "dkd_uniform", "entropy weights (logits only)"),
    ("demkd", "demkd_logits", "feature term"),
    ("demkd_mean", "demkd", "teacher reduction (1/K vs sum)"),
)
PAIR_METHODS = ("ce", "kd", "dkd", "aver", "ebkd", "camkd", "demkd_logits", "demkd")
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # docs/method.md §3: lr 0.01
LINEAGE_DECAY = (150, 180, 210)  # of 240 epochs


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


def scaled_decay(epochs: int) -> tuple[int, ...]:
    """The lineage's decay epochs (150, 180, 210 of 240) scaled to ``epochs``."""
    return tuple(max(1, round(e * epochs / 240)) for e in LINEAGE_DECAY)


def scaled_warmup(warmup: int, epochs: int) -> int:
    """A ``warmup``-of-240-epoch KD warm-up scaled to ``epochs``, at least 2.

    The trainer weights the KD term by ``min(epoch / warmup_epochs, 1)`` with 1-based epochs (as mdistiller
    does), so ``warmup_epochs = 1`` is no warm-up at all; 2 is the shortest one (epoch 1 at half weight).
    """
    return max(2, round(warmup * epochs / 240))


def load_protocol(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a protocol file."""
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"protocol file {path!r} does not exist (--protocol)")
    spec = importlib.util.spec_from_file_location("demkd_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise config_lib.ConfigError(f"protocol file {path!r} has no get_config()")
    return module.get_config()


def check_protocol(p: ml_collections.ConfigDict) -> None:
    """The protocol's own consistency: known methods, comparisons among them, seeds (no config built yet)."""
    unknown = [m for m in p.methods if m not in VARIANTS]
    if unknown:
        raise config_lib.ConfigError(f"protocol {p.name!r}: unknown method(s) {unknown}; expected names from "
                                     f"{', '.join(VARIANTS)}")
    if len(set(p.methods)) != len(p.methods):
        raise config_lib.ConfigError(f"protocol {p.name!r}: methods {tuple(p.methods)} repeat a name")
    named = [p.primary, *p.baselines, *p.positive_control]
    missing = [m for m in named if m and m not in p.methods]
    if missing:
        raise config_lib.ConfigError(f"protocol {p.name!r}: primary/baselines/positive_control name {missing}, "
                                     "which are not in its methods")
    if p.positive_control and len(p.positive_control) != 2:
        raise config_lib.ConfigError(f"protocol {p.name!r}: positive_control must be (method, control) or (), got "
                                     f"{tuple(p.positive_control)}")
    s = p.students
    if not (s.seeds >= 1 and s.data_seeds and len(set(s.data_seeds)) == len(s.data_seeds)):
        raise config_lib.ConfigError(f"protocol {p.name!r}: students need seeds >= 1 and distinct data_seeds, got "
                                     f"seeds={s.seeds}, data_seeds={tuple(s.data_seeds)}")


def protocol_template() -> ml_collections.ConfigDict:
    """Every field of a protocol, with the lineage's defaults; protocol files start from it.

    ``teachers.overrides``/``students.overrides``: ``(("dotted.config.key", value), ...)`` set on every teacher
    or student config. ``students.warmup_epochs``: the KD warm-up of the methods that have one (-1: each
    method's default). ``gates``: -1 turns a gate off.
    """
    p = ml_collections.ConfigDict()
    p.name = ""
    p.description = ""
    p.data = ml_collections.ConfigDict({"source": "tfds", "name": "cifar100", "path": "", "num_classes": 100})
    p.batch_size = 64
    p.dtype = "float32"
    p.teachers = ml_collections.ConfigDict({
        "model": "", "num": 3, "epochs": 240, "width": 1.0, "learning_rate": 0.05, "lr_decay_epochs": LINEAGE_DECAY,
        "seed": 1000, "overrides": ()})
    p.students = ml_collections.ConfigDict({
        "model": "", "epochs": 240, "width": 1.0, "seeds": 1, "data_seeds": (0,), "learning_rate": 0.05,
        "lr_decay_epochs": LINEAGE_DECAY, "warmup_epochs": -1, "beta": 8.0, "overrides": ()})
    p.methods = PAIR_METHODS
    p.primary = "demkd"  # compared with each baseline (Holm-corrected)
    p.baselines = ("kd", "dkd", "aver", "ebkd", "camkd")
    p.positive_control = ("dkd", "kd")  # the first must beat the second
    p.margin = 0.3  # "does not win": the upper bound of the difference is below this many points
    p.confidence = 0.95
    p.gates = ml_collections.ConfigDict({"distill_over_ce": -1.0, "ensemble_over_best": -1.0})
    return p


def cifar100_16px_data() -> ml_collections.ConfigDict:
    """``protocol.data`` of the CIFAR-100 16 px proxy: the npz copy of the official split, 2x2 mean-pooled on load
    (``image_size`` names the stored 32x32 images), crop padding 2, statistics computed from the pooled data."""
    return ml_collections.ConfigDict({
        "source": "npz", "name": "cifar100", "path": "../shared/data/cifar100", "num_classes": 100, "image_size": 32,
        "downsample": 2, "crop_padding": 2, "normalization": "computed"})


def pair_protocol(args) -> ml_collections.ConfigDict:
    """The lineage's protocol for ``--pair TEACHER-STUDENT`` and the scaling flags."""
    teacher, student = args.pair.split("-", 1)
    p = protocol_template()
    p.name = args.pair
    p.description = (f"{args.pair}: the lineage's 240-epoch recipe" +
                     ("" if args.epochs == 240 else f", scaled to {args.epochs} epochs"))
    p.data.update({"source": args.data_source, "name": args.data_name, "path": args.data_path,
                   "num_classes": args.num_classes})
    p.batch_size = args.batch_size
    p.dtype = args.dtype
    t_epochs = args.teacher_epochs if args.teacher_epochs > 0 else args.epochs
    p.teachers.update({"model": teacher, "num": args.teachers, "epochs": t_epochs, "width": args.width,
                       "lr_decay_epochs": LINEAGE_DECAY if t_epochs == 240 else scaled_decay(t_epochs),
                       "seed": args.seed + 1000})
    p.students.update({
        "model": student, "epochs": args.epochs, "width": args.width, "seeds": args.seeds,
        "data_seeds": (args.seed,), "learning_rate": 0.01 if student in SMALL_LR_STUDENTS else 0.05,
        "lr_decay_epochs": LINEAGE_DECAY if args.epochs == 240 else scaled_decay(args.epochs),
        "warmup_epochs": scaled_warmup(20, args.epochs) if args.scale_warmup else -1,
        "beta": spec_beta(teacher, student)})
    return p


def set_config_key(config: ml_collections.ConfigDict, key: str, value: Any, who: str) -> None:
    """``config[a][b] = value`` for ``key = "a.b"``; a key this version lacks, or a value of the wrong type, is one
    clear error."""
    *path, leaf = key.split(".")
    target = config
    for part in path:
        target = target.get(part) if isinstance(target, ml_collections.ConfigDict) else None
    if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
        raise config_lib.ConfigError(f"{who} sets config key {key!r}, which this version of demkd_jax does not have")
    try:
        target[leaf] = value
    except TypeError as e:
        raise config_lib.ConfigError(f"{who} sets config key {key!r} to {value!r}: {leaf} must be "
                                     f"{type(target[leaf]).__name__}, got {type(value).__name__}") from e


def _override(config: ml_collections.ConfigDict, overrides, who: str) -> ml_collections.ConfigDict:
    for key, value in overrides:
        set_config_key(config, key, value, who)
    return config


def piece_config(p: ml_collections.ConfigDict, args, piece: str) -> ml_collections.ConfigDict:
    """The protocol's data, batch and dtype, and the schedule of ``p[piece]`` ("teachers" or "students")."""
    c = config_lib.base_config()
    _override(c, [(f"data.{key}", value) for key, value in p.data.items()], f"protocol {p.name!r} data")
    c.data.path = args.data_path or c.data.path
    c.data.cache_dir = args.cache_dir or c.data.cache_dir
    c.batch_size, c.dtype, c.progress_bar = p.batch_size, p.dtype, args.progress
    c.num_epochs = p[piece].epochs
    c.optim.learning_rate = p[piece].learning_rate
    c.optim.lr_decay_epochs = tuple(p[piece].lr_decay_epochs)
    return c


def teacher_run_config(p: ml_collections.ConfigDict, args) -> ml_collections.ConfigDict:
    t = p.teachers
    c = piece_config(p, args, "teachers")
    c.teachers.model, c.teachers.num, c.teachers.width = t.model, t.num, t.width
    c = train.teacher_config(c)  # keeps the schedule: teachers.num_epochs / learning_rate are -1 (unset)
    c.seed = t.seed
    return _override(c, t.overrides, f"protocol {p.name!r} teachers")


def student_config(p: ml_collections.ConfigDict, args, name: str, data_seed: int,
                   teacher_dirs: list[str]) -> ml_collections.ConfigDict:
    s, variant = p.students, VARIANTS[name]
    c = piece_config(p, args, "students")
    c.student.model, c.student.width = s.model, s.width
    c.num_seeds, c.seed, c.distill.beta, c.distill.method = s.seeds, data_seed, s.beta, variant.method
    _override(c, s.overrides, f"protocol {p.name!r} students")
    _override(c, variant.overrides, f"method {name!r} ({variant.label})")
    if s.warmup_epochs >= 0 and methods.resolve(c).warmup_epochs > 0:  # only methods that have a warm-up
        c.distill.warmup_epochs = s.warmup_epochs
    single = methods.get(variant.method).teachers == "one"
    c.teachers.model = "" if variant.method == "ce" else p.teachers.model
    c.teachers.checkpoints = () if variant.method == "ce" else tuple(teacher_dirs[:1] if single else teacher_dirs)
    return c


def validated_teacher_config(p: ml_collections.ConfigDict, args, root: pathlib.Path,
                             names: list[str]) -> ml_collections.ConfigDict:
    """The teachers' config, after validating it and every method's (before any work, before the workdir)."""
    teacher_cfg = teacher_run_config(p, args)
    validation.validate(teacher_cfg, workdir=str(root))
    placeholder = [str(root / "teachers" / f"teacher_{k}") for k in range(p.teachers.num)]
    for name in names:
        cfg = student_config(p, args, name, p.students.data_seeds[0], placeholder)
        cfg.teachers.num = len(cfg.teachers.checkpoints)
        cfg.teachers.checkpoints = ()  # the teacher dirs do not exist yet
        try:
            validation.validate(cfg)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"method {name!r} ({VARIANTS[name].label}): {e}") from e
    return teacher_cfg


def _load_summary(workdir: pathlib.Path) -> dict | None:
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _read_history(workdir: pathlib.Path) -> list[dict]:
    """The per-epoch evaluation records of a finished piece."""
    return [r for r in workdir_lib.MetricsLog(workdir, writable=False).read() if "test_acc_per_replica" in r]


def selected_methods(p, wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return list(p.methods)
    by_label = {VARIANTS[m].label: m for m in p.methods}
    unknown = [w for w in wanted if w not in p.methods and w not in by_label]
    if unknown:
        raise config_lib.ConfigError(f"--methods {unknown} are not in protocol {p.name!r}; expected some of "
                                     f"{', '.join(p.methods)} (or their labels)")
    return [m for m in p.methods if m in wanted or VARIANTS[m].label in wanted]


def train_method(p: ml_collections.ConfigDict, args, name: str, root: pathlib.Path,
                 teacher_dirs: list[str]) -> dict:
    """One method's students on every data seed (finished pieces reused), as its row of the table."""
    runs, weights, wall, speed = [], [], 0.0, []
    for d in p.students.data_seeds:
        workdir = root / name / f"seed_{d}"
        summary = _load_summary(workdir)
        if summary is None:
            print(f"== {VARIANTS[name].label}, data seed {d}")
            summary = train.train_and_evaluate(student_config(p, args, name, d, teacher_dirs), str(workdir))
        else:
            print(f"== {VARIANTS[name].label}, data seed {d}: done, reusing {workdir}")
        history = _read_history(workdir)
        for r, (final, best) in enumerate(zip(summary["final_test_acc"], summary["best_test_acc"])):
            runs.append({"data_seed": d, "student_seed": r, "final_test_acc": final, "best_test_acc": best,
                         "test_acc_per_epoch": [h["test_acc_per_replica"][r] for h in history]})
        weights.append([h["train_teacher_weight"] for h in history if "train_teacher_weight" in h])
        wall += summary["wall_time_s"]
        speed.append(summary["img_per_s"])
    return method_result(name, runs, weights, wall, float(np.median(speed)), p.confidence)


def run(p: ml_collections.ConfigDict, args) -> dict[str, Any]:
    """Trains what is not finished yet, then writes results.json, results.md and the plots; returns the results."""
    check_protocol(p)
    root = pathlib.Path(args.workdir).absolute()
    names = selected_methods(p, args.methods)
    teacher_cfg = validated_teacher_config(p, args, root, names)
    plot = args.plots and importlib.util.find_spec("matplotlib") is not None
    if args.plots and not plot:
        print("warning: matplotlib is not installed: no plots (pip install matplotlib, or the '.[plots]' extra); "
              "results.md and results.json are written", file=sys.stderr)

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    t_dir = root / "teachers"
    t_summary = _load_summary(t_dir)
    if t_summary is None or "teacher_dirs" not in t_summary:
        print(f"== teachers: {p.teachers.num} x {p.teachers.model}")
        t_summary = train.train_and_evaluate(teacher_cfg, str(t_dir))
    else:
        print(f"== teachers: reusing {t_dir}")
    rows = [train_method(p, args, name, root, t_summary["teacher_dirs"]) for name in names]

    results = {
        "protocol": p.to_dict(),
        "command": " ".join(["python -m demkd_jax.reproduce", *sys.argv[1:]]) if args.record_command else "",
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax_version": jax.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "dataset": t_summary["dataset"],
        "teachers": {"model": p.teachers.model, "epochs": p.teachers.epochs, "test_acc": t_summary["final_test_acc"],
                     "best_test_acc": t_summary["best_test_acc"], "ensemble_test_acc": t_summary["ensemble_test_acc"],
                     "wall_time_s": t_summary["wall_time_s"]},
        "methods": rows,
        "wall_time_s_this_invocation": round(time.time() - t0, 1),
        "total_wall_time_s": round(t_summary["wall_time_s"] + sum(m["wall_time_s"] for m in rows), 1),
    }
    results.update(analyse(p, results["teachers"], rows))
    (root / "results.json").write_text(json.dumps(results, indent=2))
    table = results_markdown(results)
    (root / "results.md").write_text(table)
    if plot:
        write_plots(results, root)
    print(table)
    return results


def method_result(name: str, runs: list[dict], weights: list[list], wall: float, img_per_s: float,
                  confidence: float) -> dict:
    """One method's row: its runs, the final/best intervals, the accuracy curve and the teachers' weights."""
    curves = np.array([r["test_acc_per_epoch"] for r in runs], np.float64)
    mean_weights = np.mean(np.array(weights, np.float64), axis=0).tolist() if weights and weights[0] else []
    return {
        "name": name, "label": VARIANTS[name].label, "config_method": VARIANTS[name].method,
        "overrides": dict(VARIANTS[name].overrides), "runs": runs,
        "final": stats.t_interval([r["final_test_acc"] for r in runs], confidence).to_dict(),
        "best": stats.t_interval([r["best_test_acc"] for r in runs], confidence).to_dict(),
        "curve_mean": curves.mean(axis=0).round(3).tolist() if curves.size else [],
        "curve_min": curves.min(axis=0).tolist() if curves.size else [],
        "curve_max": curves.max(axis=0).tolist() if curves.size else [],
        "teacher_weight_per_epoch": mean_weights,
        "img_per_s": img_per_s, "wall_time_s": round(wall, 1),
    }


def _finals(method: dict) -> dict[tuple[int, int], float]:
    return {(r["data_seed"], r["student_seed"]): r["final_test_acc"] for r in method["runs"]}


def paired(a: dict, b: dict, confidence: float) -> dict:
    """``a - b`` in final top-1 over the matched pairs: interval and two-sided p-value."""
    d = stats.paired_differences(_finals(a), _finals(b))
    if not d:
        return {"a": a["name"], "b": b["name"], "n": 0, "mean": None, "low": None, "high": None, "p": None,
                "confidence": confidence}
    iv = stats.t_interval(d, confidence)
    return {"a": a["name"], "b": b["name"], "n": iv.n, "mean": iv.mean, "low": iv.low, "high": iv.high,
            "p": stats.paired_t_p_value(d), "confidence": confidence}


def analyse(p: ml_collections.ConfigDict, teachers: dict, rows: list[dict]) -> dict:
    """Pairwise differences, the Holm-corrected primary comparisons and their verdicts, control, gates."""
    by_name = {m["name"]: m for m in rows}
    conf = p.confidence
    pairwise = [paired(a, b, conf) for i, a in enumerate(rows) for b in rows[i + 1:]]

    comparisons = []
    if p.primary in by_name:
        primary, family = by_name[p.primary], [b for b in p.baselines if b in by_name]
        raw = {b: paired(primary, by_name[b], conf) for b in family}
        testable = [b for b in family if raw[b]["p"] is not None]  # at least two matched pairs
        adjusted, _, levels = stats.holm([raw[b]["p"] for b in testable], 1.0 - conf) if testable else ([], [], [])
        holm_of = dict(zip(testable, zip(adjusted, levels)))
        for b in family:
            c = {**raw[b], "p_holm": None}
            if b in holm_of:  # the interval at its Holm level (the p-value does not depend on the level)
                c = {**paired(primary, by_name[b], 1.0 - holm_of[b][1]), "p_holm": holm_of[b][0]}
            comparisons.append({**c, "verdict": stats.verdict(c["low"], c["high"], p.margin)})

    control = None
    if p.positive_control and all(m in by_name for m in p.positive_control):
        control = paired(by_name[p.positive_control[0]], by_name[p.positive_control[1]], conf)
        control["passes"] = control["low"] is not None and control["low"] > 0

    components = [{**paired(by_name[a], by_name[b], conf), "isolates": what}
                  for a, b, what in COMPONENTS if a in by_name and b in by_name]

    gates = []
    if p.gates.distill_over_ce >= 0 and "ce" in by_name:
        ce = by_name["ce"]["final"]["mean"]
        gains = {m["name"]: m["final"]["mean"] - ce for m in rows if m["name"] != "ce"}
        gates.append({"gate": f"every distillation method beats CE by >= {p.gates.distill_over_ce} points (mean)",
                      "values": gains, "passes": bool(gains) and min(gains.values()) >= p.gates.distill_over_ce})
    if p.gates.ensemble_over_best >= 0 and teachers["ensemble_test_acc"] is not None:
        gain = teachers["ensemble_test_acc"] - max(teachers["test_acc"])
        gates.append({"gate": f"the teacher ensemble beats its best member by >= {p.gates.ensemble_over_best} points",
                      "values": {"ensemble_minus_best": gain}, "passes": gain >= p.gates.ensemble_over_best})
    return {"pairwise": pairwise, "comparisons": comparisons, "positive_control": control,
            "components": components, "gates": gates}


def _f(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(low: float | None, high: float | None, sign: bool = False) -> str:
    return "–" if low is None else f"[{_f(low, sign=sign)}, {_f(high, sign=sign)}]"


def _p(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _md_setup(r: dict, conf: int) -> list[str]:
    """The title, what was trained on what, and the table of every method."""
    p, t = r["protocol"], r["teachers"]
    s = p["students"]
    lines = [
        f"# {p['name']} on {r['dataset']}",
        "",
        p.get("description", ""),
        "",
        f"Teachers: {len(t['test_acc'])} x {t['model']}, {t['epochs']} epochs, final top-1 "
        f"{', '.join(f'{a:.2f}' for a in t['test_acc'])}; ensemble {_f(t['ensemble_test_acc'])} "
        f"({t['wall_time_s']:.0f} s).",
        f"Students: {s['model']}, {s['epochs']} epochs, {s['seeds']} per graph x data seeds "
        f"{', '.join(str(d) for d in s['data_seeds'])}; matched pairs = (data seed, student seed).",
        f"Device: {r['device']} ({r['backend']}, {r['cpu']}, {r['cpu_count']} CPUs), jax {r['jax_version']}. "
        f"Total wall time {r['total_wall_time_s']:.0f} s.",
    ]
    if r.get("command"):
        lines += ["", f"`{r['command']}`"]
    lines += [
        "",
        f"Final-epoch top-1 (%) is the primary metric: mean ± std over the students, {conf} % t-interval. "
        "Best-over-epochs selects on the test set: reported, not decided on.",
        "",
        f"| method | final top-1 | {conf} % interval | n | best-over-epochs | img/s | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["methods"]:
        fin, best = m["final"], m["best"]
        lines.append(f"| {m['label']} | {fin['mean']:.2f} ± {fin['std']:.2f} | {_ci(fin['low'], fin['high'])} | "
                     f"{fin['n']} | {best['mean']:.2f} ± {best['std']:.2f} | {m['img_per_s']:.0f} | "
                     f"{m['wall_time_s']:.0f} |")
    return lines


def _md_decisions(r: dict, conf: int, label: dict[str, str]) -> list[str]:
    """The primary method against each baseline (Holm-corrected, with verdicts), then the positive control."""
    lines = []
    if r["comparisons"]:
        prim = label[r["comparisons"][0]["a"]]
        lines += [
            "",
            f"## {prim} against each baseline",
            "",
            f"Paired difference {prim} − baseline in final top-1 (points) over the matched pairs; intervals at "
            f"Holm-corrected levels (family-wise {conf} % over these {len(r['comparisons'])} comparisons). "
            f"Verdict: wins if the lower bound > 0, does not win if the upper bound < +{r['protocol']['margin']}, "
            "else undecided.",
            "",
            "| baseline | difference | interval | level | n | p | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in r["comparisons"]:
            lines.append(f"| {label[c['b']]} | {_f(c['mean'], sign=True)} | {_ci(c['low'], c['high'], True)} | "
                         f"{100 * c['confidence']:.2f} % | {c['n']} | {_p(c['p'])} | {_p(c['p_holm'])} | "
                         f"**{c['verdict']}** |")
    control = r["positive_control"]
    if control is not None:
        lines += ["", f"Positive control: {label[control['a']]} − {label[control['b']]} = "
                      f"{_f(control['mean'], sign=True)} {_ci(control['low'], control['high'], True)} "
                      f"({conf} %, n = {control['n']}): **{'passes' if control['passes'] else 'fails'}**."]
    return lines


def _md_components_and_gates(r: dict, conf: int, label: dict[str, str]) -> list[str]:
    lines = []
    if r["components"]:
        lines += ["", "## Components", "", f"| difference | isolates | mean | {conf} % interval | n |",
                  "|---|---|---|---|---|"]
        for c in r["components"]:
            lines.append(f"| {label[c['a']]} − {label[c['b']]} | {c['isolates']} | {_f(c['mean'], sign=True)} | "
                         f"{_ci(c['low'], c['high'], True)} | {c['n']} |")
    if r["gates"]:
        lines += ["", "## Gates", ""]
        for g in r["gates"]:
            values = ", ".join(f"{label.get(k, k)} {v:+.2f}" for k, v in g["values"].items())
            lines.append(f"- {g['gate']}: **{'passes' if g['passes'] else 'fails'}** ({values})")
    return lines


def _md_pairwise(r: dict, conf: int) -> list[str]:
    """The upper triangle of every method's paired difference to every later one."""
    if len(r["methods"]) < 2:
        return []
    lines = ["", f"## Paired differences (row − column, final top-1, {conf} % interval)", "",
             "| | " + " | ".join(m["label"] for m in r["methods"][1:]) + " |",
             "|---" * len(r["methods"]) + "|"]
    cell = {(c["a"], c["b"]): c for c in r["pairwise"]}
    for i, a in enumerate(r["methods"][:-1]):
        row = []
        for j, b in enumerate(r["methods"][1:], start=1):
            c = cell.get((a["name"], b["name"]))
            row.append("" if j <= i or c is None else f"{_f(c['mean'], sign=True)} {_ci(c['low'], c['high'], True)}")
        lines.append(f"| {a['label']} | " + " | ".join(row) + " |")
    return lines


def results_markdown(r: dict) -> str:
    """results.md from results.json's content."""
    conf = round(100 * r["protocol"]["confidence"])
    label = {m["name"]: m["label"] for m in r["methods"]}
    lines = (_md_setup(r, conf) + _md_decisions(r, conf, label) + _md_components_and_gates(r, conf, label)
             + _md_pairwise(r, conf))
    return "\n".join(lines) + "\n"


def write_plots(r: dict, directory: pathlib.Path) -> list[pathlib.Path]:
    """``accuracy.png`` (test top-1 per epoch, mean and min-max band) and, where a method weights its teachers
    unequally, ``teacher_weights.png`` (mean weight of each teacher per epoch). Needs matplotlib (optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

    def save(fig, axes, name: str) -> pathlib.Path:
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
        return directory / name

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in r["methods"]:
        epochs = np.arange(1, len(m["curve_mean"]) + 1)
        line, = ax.plot(epochs, m["curve_mean"], label=m["label"])
        ax.fill_between(epochs, m["curve_min"], m["curve_max"], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title=f"{r['protocol']['name']}: mean and range over students")
    ax.legend(fontsize=8)
    written = [save(fig, [ax], "accuracy.png")]

    weighted = [m for m in r["methods"] if m["teacher_weight_per_epoch"]
                and np.ptp(np.array(m["teacher_weight_per_epoch"])) > 1e-6]
    if weighted:
        fig, axes = plt.subplots(1, len(weighted), figsize=(3.5 * len(weighted), 3.2), squeeze=False, sharey=True)
        for ax, m in zip(axes[0], weighted):
            w = np.array(m["teacher_weight_per_epoch"])
            for k in range(w.shape[1]):
                ax.plot(np.arange(1, len(w) + 1), w[:, k], label=f"teacher {k}")
            ax.set(title=m["label"], xlabel="epoch")
        axes[0][0].set_ylabel("mean weight per example")
        axes[0][0].legend(fontsize=8)
        written.append(save(fig, axes[0], "teacher_weights.png"))
    return written


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m demkd_jax.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--protocol", help="a protocol file (get_config()), e.g. configs/protocols/"
                                          "cifar100_16px_pilot.py")
    which.add_argument("--pair", help="TEACHER-STUDENT, e.g. vgg13-vgg8 or wrn_40_2-ShuffleV2")
    p.add_argument("--workdir", required=True)
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help=f"subset, comma-separated, of the protocol's methods ({', '.join(VARIANTS)}) or their labels")
    p.add_argument("--data-path", default="", help="overrides the protocol's data.path")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="accuracy.png and teacher_weights.png next to the results (needs matplotlib)")
    g = p.add_argument_group("--pair only")
    g.add_argument("--epochs", type=int, default=240, help="student epochs (lr decay epochs scale with it)")
    g.add_argument("--teacher-epochs", type=int, default=-1, help="default: --epochs")
    g.add_argument("--teachers", type=int, default=3)
    g.add_argument("--seeds", type=int, default=1, help="students per method, trained in one graph")
    g.add_argument("--width", type=float, default=1.0, help="channel multiplier of teachers and student")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
    g.add_argument("--seed", type=int, default=0, help="the data seed (teachers: seed + 1000)")
    g.add_argument("--scale-warmup", action="store_true",
                   help="scale the 20-epoch KD warm-up with --epochs, at least 2 (the trainer's factor is "
                        "min(epoch / warm-up, 1) with 1-based epochs: 1 would be none); default: keep the recipe's 20")
    g.add_argument("--data-source", default="tfds")
    g.add_argument("--data-name", default="cifar100")
    g.add_argument("--num-classes", type=int, default=100)
    args = p.parse_args(argv)
    args.record_command = argv is None
    if args.pair is not None and "-" not in args.pair:
        p.error(f"--pair must be TEACHER-STUDENT, got {args.pair!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from demkd_jax.checkpoint import CheckpointError
    from demkd_jax.data import DataError

    try:
        protocol = load_protocol(args.protocol) if args.protocol else pair_protocol(args)
        with interrupts.stop_on_signals():
            run(protocol, args)
    except (config_lib.ConfigError, CheckpointError, DataError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as e:
        print(f"interrupted: {e}; rerun the same command to resume (finished pieces are reused)", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    sys.exit(main())
