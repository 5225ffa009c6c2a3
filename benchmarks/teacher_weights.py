"""How much do the per-example teacher weights differ, and do they pick the right teacher? On trained teachers.

    python benchmarks/teacher_weights.py --protocol configs/protocols/cifar100_16px_main.py \\
      --teachers runs/main16/teachers/teacher_{0,1,2}

For each split (the test split, and the first ``--train-examples`` training images, unaugmented) it prints one
JSON line: each teacher's top-1 and mean entropy; each teacher's weight (mean, and std over the examples); the
per-example spread max_k w_k − min_k w_k; on the examples where the teachers disagree (some right, some wrong),
how often the most-weighted teacher is right against a teacher drawn at random; and the top-1 of the teachers'
ensemble with uniform and with these weights. ``--scheme`` is the weighting of losses.entropy_weights (DE-MKD's
is "camkd"). Weights near 1/K everywhere, or an ensemble that the weights do not improve, mean the weighting
cannot do much for the student.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from demkd_jax import checkpoint, data, losses, models  # noqa: E402  pylint: disable=g-import-not-at-top
from demkd_jax.config import ConfigError  # noqa: E402
from demkd_jax.reproduce import load_protocol, set_config_key  # noqa: E402


def load_teachers(teacher_dirs: list[str], num_classes: int) -> tuple[object, list[dict]]:
    """``(model, [variables per teacher])`` of verified teacher checkpoints of one architecture."""
    metas = checkpoint.check_teacher_dirs(teacher_dirs, num_classes=num_classes)
    checkpoint.require_one_architecture(teacher_dirs, metas)
    model = models.create_model(metas[0]["model"], num_classes, width=float(metas[0].get("width", 1.0)))
    return model, [checkpoint.load_teacher(d, num_classes=num_classes)[0] for d in teacher_dirs]


def teacher_logits(model, teacher_vars: list[dict], images: np.ndarray, mean: np.ndarray, std: np.ndarray,
                   batch: int) -> np.ndarray:
    """``[K, N, C]`` float32 logits of each teacher (inference mode) on uint8 ``images``."""

    @jax.jit
    def forward(variables, x):
        out = model.apply(variables, data.normalize(x, mean, std), train=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    return np.stack([np.concatenate([np.asarray(forward(v, images[i:i + batch])) for i in range(0, len(images), batch)])
                     for v in teacher_vars])


def weight_stats(logits: np.ndarray, labels: np.ndarray, scheme: str) -> dict:
    """The statistics described in the module docstring, from ``[K, N, C]`` logits and ``[N]`` labels."""
    z = jnp.asarray(logits)
    w = np.asarray(losses.entropy_weights(z, scheme=scheme))  # [K, N]
    h = np.asarray(losses.entropy(z))  # [K, N]
    probs = np.asarray(jax.nn.softmax(z, axis=-1))
    correct = probs.argmax(-1) == labels[None]  # [K, N]
    num_right = correct.sum(0)
    disagree = (num_right > 0) & (num_right < len(logits))
    top_right = correct[w.argmax(0), np.arange(w.shape[1])]
    spread = w.max(0) - w.min(0)
    normalized = w / w.sum(0, keepdims=True)  # ebkd's weights sum to K - 1: compare ensembles on one scale

    def pct(x) -> float:
        return round(100.0 * float(np.mean(x)), 2)

    return {
        "examples": int(len(labels)),
        "teacher_top1": [pct(c) for c in correct],
        "teacher_entropy_mean": [round(float(x), 4) for x in h.mean(1)],
        "weight_mean": [round(float(x), 4) for x in w.mean(1)],
        "weight_std_over_examples": [round(float(x), 4) for x in w.std(1)],
        "weight_spread": {"mean": round(float(spread.mean()), 4), "median": round(float(np.median(spread)), 4),
                          "p90": round(float(np.quantile(spread, 0.9)), 4), "max": round(float(spread.max()), 4)},
        "disagree_percent": pct(disagree),
        "top_weighted_right_when_disagree": pct(top_right[disagree]) if disagree.any() else None,
        "random_teacher_right_when_disagree": pct(correct[:, disagree]) if disagree.any() else None,
        "ensemble_top1_uniform": pct(probs.mean(0).argmax(-1) == labels),
        "ensemble_top1_weighted": pct(np.einsum("kn,knc->nc", normalized, probs).argmax(-1) == labels),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", required=True, help="teacher checkpoint directories (one architecture)")
    p.add_argument("--protocol", help="a protocol file: its `data` block names the dataset (else --data)")
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                   help="data-config overrides, e.g. source=npz path=../shared/data/cifar100 downsample=2")
    p.add_argument("--scheme", default="camkd", choices=[s for s in losses.WEIGHT_SCHEMES if s != "uniform"])
    p.add_argument("--train-examples", type=int, default=10000, help="training images to score too (0: none)")
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args(argv)

    cfg = load_protocol(args.protocol).data if args.protocol else data.default_data_config()
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg:
            p.error(f"--data {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(cfg.keys()))}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # a plain string (a path, a source name)
        try:
            set_config_key(cfg, key, parsed, f"--data {item!r}")
        except ConfigError as e:
            p.error(str(e))
    try:
        ds = data.load_dataset(cfg)
        model, teacher_vars = load_teachers(args.teachers, len(ds.class_names))
    except (data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"{ds.summary()}", file=sys.stderr)
    splits = [("test", ds.test_images, ds.test_labels)]
    if args.train_examples > 0:
        n = min(args.train_examples, len(ds.train_labels))
        splits.append((f"train[:{n}]", ds.train_images[:n], ds.train_labels[:n]))
    for name, images, labels in splits:
        logits = teacher_logits(model, teacher_vars, images, ds.mean, ds.std, args.batch)
        record = {"split": name, "scheme": args.scheme, **weight_stats(logits, np.asarray(labels), args.scheme),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__}
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
