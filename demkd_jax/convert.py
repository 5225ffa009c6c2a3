"""Import PyTorch teacher checkpoints of the CRD/RepDistiller family (RepDistiller, CA-MKD, mdistiller).

Command line::

    python -m demkd_jax.convert --torch ckpt_epoch_240.pth --model vgg13 --out teachers/vgg13_a

writes a teacher checkpoint (:func:`demkd_jax.checkpoint.save_teacher`) that distillation configs load
exactly like one our trainer wrote. Python::

    from demkd_jax.convert import from_torch_state_dict
    variables = from_torch_state_dict(torch.load(path, map_location="cpu")["model"], "vgg13")

The mapping from PyTorch ``state_dict`` keys to the Flax tree is derived from the Flax model itself (its
``jax.eval_shape`` tree) and a per-family translation of module names to the reference's, so every one of
the 21 zoo models is covered and the result matches the model's tree exactly. Conv kernels go
OIHW -> HWIO (grouped and depthwise too: [O, I/g, kh, kw] -> [kh, kw, I/g, O]), linear weights
[out, in] -> [in, out], BatchNorm weight/bias -> scale/bias and running_mean/var -> ``batch_stats``
mean/var; ``num_batches_tracked`` is ignored. Missing keys, unused keys and wrong shapes are errors that
name the keys; when the keys fit another zoo model better, the error says which.

``torch`` is optional: it is imported only to read ``.pth`` files (``pip install -e ".[torch]"``);
:func:`from_torch_state_dict` also takes a dict of numpy arrays.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import numbers
import os
import pathlib
import pickle
import re
import sys
from typing import Any, Callable, Iterable, Mapping

import numpy as np

__all__ = [
    "ConversionError",
    "from_torch_state_dict",
    "unwrap_state_dict",
    "guess_model",
    "expected_torch_shapes",
    "load_torch_file",
    "main",
]

TORCH_EXTRA_HINT = 'pip install -e ".[torch]" (in a checkout) or pip install "demkd-jax[torch]"'
_WRAPPER_KEYS = ("model", "state_dict", "net")  # RepDistiller/CA-MKD/mdistiller, Lightning-style, pytorch-cifar
_METADATA_KEYS = ("acc", "accuracy", "best_acc", "epoch")


class ConversionError(ValueError):
    """A PyTorch checkpoint cannot be converted to the requested zoo model (names the offending keys)."""


# ------------------------------------------------------------------------------------- name translation
def _family(model_name: str) -> str:
    from demkd_jax.models import MODEL_NAMES

    if model_name not in MODEL_NAMES:
        raise ConversionError(f"unknown model name {model_name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    for prefix in ("vgg", "resnet", "wrn"):
        if model_name.startswith(prefix):
            return prefix
    return model_name  # ShuffleV1, ShuffleV2, MobileNetV2


# Torch module holding each family's classifier (its weight's rows give the class count).
CLASSIFIER = {
    "vgg": "classifier", "resnet": "fc", "wrn": "fc",
    "ShuffleV1": "linear", "ShuffleV2": "linear", "MobileNetV2": "classifier.0",
}

_Rule = tuple[str, Callable[[re.Match], str]]
_SHUFFLE_RULES: list[_Rule] = [
    (r"stem/(conv|bn)", lambda m: {"conv": "conv1", "bn": "bn1"}[m[1]]),
    (r"layers_(\d+)_(\d+)/conv_bn(\d)/(conv|bn)", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[4]}{m[3]}"),
    (r"conv_last/(conv|bn)", lambda m: {"conv": "conv2", "bn": "bn2"}[m[1]]),
    (r"linear", lambda m: "linear"),
]
_MOBILENET_INDEX = {"expand": 0, "depthwise": 3, "project": 6}
# Flax module path (below params/batch_stats) -> the reference's torch module name, per family.
_RULES: dict[str, list[_Rule]] = {
    "vgg": [
        # block{s} is a Sequential of conv, BN, ReLU per layer (the last ReLU dropped): conv 3j, BN 3j+1.
        (r"blocks_(\d+)_(\d+)/(conv|bn)", lambda m: f"block{m[1]}.{3 * int(m[2]) + (m[3] == 'bn')}"),
        (r"classifier", lambda m: "classifier"),
    ],
    "resnet": [
        (r"stem/(conv|bn)", lambda m: {"conv": "conv1", "bn": "bn1"}[m[1]]),
        (r"layers_(\d+)_(\d+)/conv_bn(\d)/(conv|bn)", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[4]}{m[3]}"),
        (r"layers_(\d+)_(\d+)/downsample/(conv|bn)",
         lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{int(m[3] == 'bn')}"),
        (r"fc", lambda m: "fc"),
    ],
    "wrn": [
        (r"stem", lambda m: "conv1"),
        (r"blocks_(\d+)_(\d+)/(bn1|conv2)", lambda m: f"block{int(m[1]) + 1}.layer.{m[2]}.{m[3]}"),
        (r"blocks_(\d+)_(\d+)/conv1_bn2/(conv|bn)",
         lambda m: f"block{int(m[1]) + 1}.layer.{m[2]}." + {"conv": "conv1", "bn": "bn2"}[m[3]]),
        (r"blocks_(\d+)_(\d+)/shortcut", lambda m: f"block{int(m[1]) + 1}.layer.{m[2]}.convShortcut"),
        (r"bn", lambda m: "bn1"),
        (r"fc", lambda m: "fc"),
    ],
    "ShuffleV1": _SHUFFLE_RULES,
    "ShuffleV2": _SHUFFLE_RULES,
    "MobileNetV2": [
        (r"stem/(conv|bn)", lambda m: f"conv1.{int(m[1] == 'bn')}"),
        (r"blocks_(\d+)_(\d+)/(expand|depthwise|project)/(conv|bn)",
         lambda m: f"blocks.{m[1]}.{m[2]}.conv.{_MOBILENET_INDEX[m[3]] + (m[4] == 'bn')}"),
        (r"conv_last/(conv|bn)", lambda m: f"conv2.{int(m[1] == 'bn')}"),
        (r"classifier", lambda m: "classifier.0"),
    ],
}


def _torch_module_name(family: str, flax_module: str) -> str:
    for pattern, fmt in _RULES[family]:
        m = re.fullmatch(pattern, flax_module)
        if m:
            return fmt(m)
    raise RuntimeError(f"no torch name for Flax module {flax_module!r} of family {family!r} (converter bug)")


# (collection, leaf name, ndim) -> (torch suffix, transform)
_LEAVES = {
    ("params", "kernel", 4): ("weight", "conv"),
    ("params", "kernel", 2): ("weight", "dense"),
    ("params", "bias", 1): ("bias", None),
    ("params", "scale", 1): ("weight", None),
    ("batch_stats", "mean", 1): ("running_mean", None),
    ("batch_stats", "var", 1): ("running_var", None),
}


def _to_torch_shape(shape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    if transform == "conv":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if transform == "dense":  # [in, out] -> [out, in]
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(value: np.ndarray, transform: str | None) -> np.ndarray:
    if transform == "conv":  # [O, I/g, kh, kw] -> [kh, kw, I/g, O]
        value = value.transpose(2, 3, 1, 0)
    elif transform == "dense":
        value = value.T
    return np.ascontiguousarray(value, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _abstract_variables(model_name: str, num_classes: int):
    import jax

    from demkd_jax import models

    model = models.create_model(model_name, num_classes)
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=None)
def _layout(model_name: str, num_classes: int) -> tuple[dict[str, tuple], frozenset[str]]:
    """``{torch key: (flax path, transform, torch shape)}`` and the set of BN module names."""
    if num_classes != 100:  # only the classifier depends on the class count: reuse the 100-class layout
        layout, bn_modules = _layout(model_name, 100)
        layout = dict(layout)
        classifier = CLASSIFIER[_family(model_name)]
        for key in (f"{classifier}.weight", f"{classifier}.bias"):
            path, transform, shape = layout[key]
            layout[key] = (path, transform, (num_classes, *shape[1:]))
        return layout, bn_modules
    import jax

    family = _family(model_name)
    abstract = _abstract_variables(model_name, num_classes)
    layout, bn_modules = {}, set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        collection, module, leaf_name = names[0], "/".join(names[1:-1]), names[-1]
        suffix, transform = _LEAVES[(collection, leaf_name, len(leaf.shape))]
        torch_module = _torch_module_name(family, module)
        if leaf_name == "scale":
            bn_modules.add(torch_module)
        layout[f"{torch_module}.{suffix}"] = (names, transform, _to_torch_shape(tuple(leaf.shape), transform))
    return layout, frozenset(bn_modules)


def expected_torch_shapes(model_name: str, num_classes: int = 100) -> dict[str, tuple[int, ...]]:
    """The reference ``state_dict`` a zoo model's checkpoint holds: ``{key: shape}`` (no ``num_batches_tracked``)."""
    return {k: v[2] for k, v in _layout(model_name, num_classes)[0].items()}


# ------------------------------------------------------------------------------------- state-dict input
def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(checkpoint: Any) -> dict[str, Any]:
    """The state dict inside what these repos save: ``{"model": sd}`` (RepDistiller, CA-MKD, mdistiller),
    ``{"state_dict": sd}``, ``{"net": sd}``, a bare ``sd`` or a whole ``nn.Module``; ``module.`` prefixes
    (DataParallel) are stripped."""
    obj = checkpoint
    if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a pickled nn.Module
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a state dict or a dict holding one, got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:  # a state dict never has a bare "model"/"state_dict"/"net" key holding a dict
        inner = obj.get(key)
        if isinstance(inner, Mapping) or (hasattr(inner, "state_dict") and callable(inner.state_dict)):
            return unwrap_state_dict(inner)
    if not any(_is_array(v) for v in obj.values()):
        raise ConversionError(
            "found no state dict: the checkpoint holds no arrays at the top level and none of the keys "
            f"{', '.join(map(repr, _WRAPPER_KEYS))} (it has: {', '.join(map(repr, list(obj)[:10]))})"
        )
    out = {}
    for key, value in obj.items():
        name = str(key)
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise ConversionError(f"key {name!r} occurs twice once 'module.' prefixes are stripped")
        out[name] = value
    return out


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; converted without importing torch here
        value = value.detach().cpu()
        if value.is_floating_point() and str(value.dtype) != "torch.float32":
            value = value.float()  # float16/bfloat16 checkpoints (numpy has no bfloat16)
        value = value.numpy()
    if not _is_array(value) and not isinstance(value, (numbers.Number, list, tuple)):
        raise ConversionError(f"value of key {key!r} is a {type(value).__name__}, not an array")
    return np.asarray(value)


def _infer_num_classes(shapes: Mapping[str, tuple[int, ...]], family: str) -> int | None:
    shape = shapes.get(CLASSIFIER[family] + ".weight")
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def _pairs(shapes: Mapping[str, tuple[int, ...]]) -> set[tuple[str, tuple[int, ...]]]:
    return {(k, tuple(s)) for k, s in shapes.items() if not k.endswith(".num_batches_tracked")}


def guess_model(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, int, float]:
    """The zoo model whose reference ``state_dict`` best fits ``{key: shape}``: ``(name, classes, score)``,
    with score the Jaccard index of the (key, shape) sets (1.0 = exactly that model)."""
    from demkd_jax.models import MODEL_NAMES

    given = _pairs(shapes)
    best = ("", 0, -1.0)
    for name in MODEL_NAMES:
        num_classes = _infer_num_classes(shapes, _family(name)) or 100
        expected = _pairs(expected_torch_shapes(name, num_classes))
        score = len(given & expected) / max(1, len(given | expected))
        if score > best[2]:
            best = (name, num_classes, score)
    return best


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _convert(state_dict: Any, model_name: str, num_classes: int | None) -> tuple[dict, int]:
    family = _family(model_name)
    sd = unwrap_state_dict(state_dict)
    arrays = {k: _to_numpy(k, v) for k, v in sd.items()}
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}

    classifier_key = CLASSIFIER[family] + ".weight"
    found_classes = _infer_num_classes(shapes, family)
    if num_classes is None:
        num_classes = found_classes or next(
            (n for n in (_infer_num_classes(shapes, f) for f in CLASSIFIER) if n), 100)
    elif found_classes is not None and found_classes != num_classes:
        raise ConversionError(
            f"{classifier_key!r} has {found_classes} classes ({classifier_key} shape {shapes[classifier_key]}), "
            f"but {num_classes} classes were asked for"
        )
    if num_classes < 1:
        raise ConversionError(f"num_classes must be >= 1, got {num_classes}")

    layout, bn_modules = _layout(model_name, num_classes)
    missing = [k for k in layout if k not in arrays]
    unexpected = [k for k in arrays if k not in layout and not k.endswith(".num_batches_tracked")]
    unexpected_modules = {k.rsplit(".", 1)[0] for k in unexpected}
    unexpected += [  # BN counters are ignored; listed only where nothing else names their module
        k for k in arrays
        if k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] not in bn_modules | unexpected_modules
    ]
    wrong = [f"{k}: expected {layout[k][2]}, found {shapes[k]}"
             for k in layout if k in arrays and shapes[k] != layout[k][2]]
    if missing or unexpected or wrong:
        problems = []
        guess, guess_classes, score = guess_model(shapes)
        if guess != model_name:
            if score == 1.0:
                problems.append(f"the keys look like a {guess!r} checkpoint ({guess_classes} classes), not {model_name!r}")
            elif score >= 0.5:
                problems.append(f"the keys look most like a {guess!r} checkpoint ({guess_classes} classes; "
                                f"{score:.0%} of (key, shape) pairs match)")
            else:
                problems.append(f"the keys fit no zoo model well (closest: {guess!r}, {score:.0%} of (key, shape) pairs)")
        if missing:
            problems.append(f"missing {len(missing)} keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
        if wrong:
            problems.append(f"wrong shapes: {_listing(wrong, 5)}")
        raise ConversionError(
            f"cannot convert the state dict to {model_name!r} ({num_classes} classes): " + "; ".join(problems)
        )

    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, (path, transform, _) in layout.items():
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _from_torch(arrays[key], transform)

    from demkd_jax.checkpoint import CheckpointError, compare_trees

    try:
        compare_trees(_abstract_variables(model_name, num_classes), variables, f"converted {model_name!r} variables")
    except CheckpointError as e:  # cannot happen unless the name map is wrong
        raise ConversionError(str(e)) from None
    return variables, num_classes


def from_torch_state_dict(state_dict: Any, model_name: str, num_classes: int | None = None) -> dict[str, Any]:
    """Flax variables ``{"params", "batch_stats"}`` (numpy float32) for zoo model ``model_name``.

    Args:
      state_dict: a PyTorch ``state_dict`` (tensors or numpy arrays), or a checkpoint dict holding it under
        ``model``, ``state_dict`` or ``net``; ``module.`` prefixes are stripped.
      model_name: one of :data:`demkd_jax.models.MODEL_NAMES`.
      num_classes: classifier width; inferred from the classifier weight when ``None`` (checked otherwise).

    Raises:
      ConversionError: unknown model name, missing, unexpected or wrongly shaped keys (named; when the keys
        fit another zoo model, the message says which) or a class-count mismatch.
    """
    return _convert(state_dict, model_name, num_classes)[0]


# ---------------------------------------------------------------------------------------- .pth files
def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading PyTorch checkpoints needs torch: {TORCH_EXTRA_HINT}") from None
    return torch


def load_torch_file(path: str | os.PathLike, *, allow_unsafe: bool = True,
                    note: Callable[[str], None] | None = None) -> Any:
    """``torch.load(path, map_location="cpu")``: with ``weights_only=True`` first; old pickles that need
    ``weights_only=False`` (e.g. RepDistiller's final checkpoint pickles its argparse options) are loaded that
    way when ``allow_unsafe``, with a note (it runs pickled code: only for files you trust)."""
    torch = _import_torch()
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"no such file: {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it pickles {found[1]}" if found else str(e).splitlines()[0][:200]
        if not allow_unsafe:
            raise ConversionError(f"{str(path)!r} cannot be loaded with weights_only=True ({reason})") from None
        (note or (lambda s: print(s, file=sys.stderr)))(
            f"note: {str(path)!r} needs torch.load(weights_only=False) ({reason}); loading it that way, which "
            "runs pickled code: only do this for files you trust (--weights-only refuses)"
        )
    except Exception as e:
        raise ConversionError(f"cannot read {str(path)!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConversionError(f"cannot read {str(path)!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _checkpoint_metadata(checkpoint: Any) -> dict[str, Any]:
    """``acc``/``accuracy``/``best_acc``/``epoch`` of a RepDistiller-style checkpoint dict (tensors -> floats)."""
    meta = {}
    if isinstance(checkpoint, Mapping):
        for key in _METADATA_KEYS:
            value = checkpoint.get(key)
            if hasattr(value, "item"):  # a tensor or numpy scalar
                single = "float32" in str(value.dtype)
                try:
                    value = value.item()
                except (ValueError, RuntimeError):
                    continue
                if single:  # 74.64, not 74.63999938964844
                    value = float(str(np.float32(value)))
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                meta[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return meta


def sanity_forward(model_name: str, num_classes: int, variables: Mapping[str, Any], image_size: int = 32) -> str:
    """An eval-mode forward of the converted model on a fixed random batch of ``image_size`` x ``image_size``
    images; raises if it is not finite."""
    import jax

    from demkd_jax import models

    model = models.create_model(model_name, num_classes)
    x = np.random.default_rng(0).standard_normal((2, image_size, image_size, 3)).astype(np.float32)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    logits = np.asarray(logits)
    if not (np.all(np.isfinite(logits)) and all(np.all(np.isfinite(np.asarray(f))) for f in feats)):
        raise ConversionError(f"the converted {model_name!r} gives non-finite outputs on a random batch")
    return f"sanity forward ok (logits {logits.shape}, |logits| <= {np.abs(logits).max():.3g})"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: Iterable[str] | None = None) -> int:
    from demkd_jax.models import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="python -m demkd_jax.convert",
        description="Convert a PyTorch CIFAR teacher (RepDistiller / CA-MKD / mdistiller .pth) into a demkd_jax "
                    "teacher checkpoint directory.",
    )
    parser.add_argument("--torch", required=True, metavar="PATH", help="the .pth file")
    parser.add_argument("--model", required=True, metavar="NAME", help=f"zoo name: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--out", required=True, metavar="DIR", help="teacher checkpoint directory to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier width (default: read from the classifier weight)")
    parser.add_argument("--no-check", action="store_true", help="skip the sanity forward of the converted model")
    parser.add_argument("--image-size", type=int, default=32, help="input height = width of the sanity forward")
    parser.add_argument("--weights-only", action="store_true",
                        help="refuse files that need torch.load(weights_only=False) (old pickles)")
    args = parser.parse_args(None if argv is None else list(argv))

    from demkd_jax import checkpoint, models

    try:
        path = pathlib.Path(args.torch).absolute()
        loaded = load_torch_file(path, allow_unsafe=not args.weights_only)
        variables, num_classes = _convert(loaded, args.model, args.num_classes)
        check = "" if args.no_check else "; " + sanity_forward(args.model, num_classes, variables, args.image_size)
        meta = {"source": "torch", "torch_file": str(path), "torch_sha256": _sha256(path),
                **_checkpoint_metadata(loaded)}
        out = checkpoint.save_teacher(args.out, variables, model_name=args.model, num_classes=num_classes,
                                      metadata=meta)
    except (ConversionError, checkpoint.CheckpointError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = "".join(f", {k} {meta[k]:g}" for k in _METADATA_KEYS if k in meta)
    print(f"converted {str(path)!r} -> {str(out)!r}: {args.model}, {num_classes} classes, "
          f"{models.count_params(variables['params']):,} parameters{acc}{check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
