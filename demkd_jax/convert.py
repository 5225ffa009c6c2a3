"""Import PyTorch teacher checkpoints of the CRD/RepDistiller family (RepDistiller, CA-MKD, mdistiller).

    python -m demkd_jax.convert --torch ckpt_epoch_240.pth --model vgg13 --out teachers/vgg13_a

writes a teacher checkpoint that distillation configs load exactly like one our trainer wrote;
:func:`from_torch_state_dict` does the conversion in Python. ``torch`` is optional: it is imported only to read
``.pth`` files. The key and layout mapping: docs/checkpoints.md.
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

_WRAPPER_KEYS = ("model", "state_dict", "net")  # RepDistiller/CA-MKD/mdistiller, Lightning-style, pytorch-cifar
_METADATA_KEYS = ("acc", "accuracy", "best_acc", "epoch")


class ConversionError(ValueError):
    """A PyTorch checkpoint cannot be converted to the requested zoo model (names the offending keys)."""


# ------------------------------------------------------------------------------------- name translation
def _family(model_name: str) -> str:
    from demkd_jax.models import MODEL_NAMES

    if model_name not in MODEL_NAMES:
        raise ConversionError(f"unknown model name {model_name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    # ShuffleV1, ShuffleV2 and MobileNetV2 are families of one
    return next((f for f in ("vgg", "resnet", "wrn") if model_name.startswith(f)), model_name)


# Torch module holding each family's classifier (its weight's rows give the class count).
CLASSIFIER = {"vgg": "classifier", "resnet": "fc", "wrn": "fc", "ShuffleV1": "linear", "ShuffleV2": "linear",
              "MobileNetV2": "classifier.0"}

_Rule = tuple[str, Callable[[re.Match], str]]
_STEM_AND_LAYERS: list[_Rule] = [  # ResNet and ShuffleNet
    (r"stem/(conv|bn)", lambda m: {"conv": "conv1", "bn": "bn1"}[m[1]]),
    (r"layers_(\d+)_(\d+)/conv_bn(\d)/(conv|bn)", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[4]}{m[3]}"),
]
_SHUFFLE_RULES: list[_Rule] = [
    *_STEM_AND_LAYERS,
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
        *_STEM_AND_LAYERS,
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
        if m := re.fullmatch(pattern, flax_module):
            return fmt(m)
    raise RuntimeError(f"no torch name for Flax module {flax_module!r} of family {family!r} (converter bug)")


# (collection, leaf name, ndim) -> (torch suffix, axes: the Flax leaf is the torch tensor transposed by them)
_LEAVES = {
    ("params", "kernel", 4): ("weight", (2, 3, 1, 0)),  # conv OIHW [O, I/g, kh, kw] -> HWIO [kh, kw, I/g, O]
    ("params", "kernel", 2): ("weight", (1, 0)),  # linear [out, in] -> [in, out]
    ("params", "bias", 1): ("bias", (0,)),
    ("params", "scale", 1): ("weight", (0,)),
    ("batch_stats", "mean", 1): ("running_mean", (0,)),
    ("batch_stats", "var", 1): ("running_var", (0,)),
}


@functools.lru_cache(maxsize=None)
def _layout(model_name: str, num_classes: int) -> tuple[dict[str, tuple], frozenset[str]]:
    """``{torch key: (flax path, axes, torch shape)}`` and the set of BN module names."""
    if num_classes != 100:  # only the classifier depends on the class count: reuse the 100-class layout
        layout, bn_modules = _layout(model_name, 100)
        layout = dict(layout)
        classifier = CLASSIFIER[_family(model_name)]
        for key in (f"{classifier}.weight", f"{classifier}.bias"):
            path, axes, shape = layout[key]
            layout[key] = (path, axes, (num_classes, *shape[1:]))
        return layout, bn_modules
    from demkd_jax.checkpoint import abstract_variables, tree_paths

    family = _family(model_name)
    layout, bn_modules = {}, set()
    for path, leaf in tree_paths(abstract_variables(model_name, num_classes)).items():
        names = tuple(path.split("/"))
        collection, module, leaf_name = names[0], "/".join(names[1:-1]), names[-1]
        suffix, axes = _LEAVES[(collection, leaf_name, len(leaf.shape))]
        torch_module = _torch_module_name(family, module)
        if leaf_name == "scale":
            bn_modules.add(torch_module)
        layout[f"{torch_module}.{suffix}"] = (names, axes, tuple(leaf.shape[axes.index(i)] for i in range(len(axes))))
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
        raise ConversionError("found no state dict: the checkpoint holds no arrays at the top level and none of the "
                              f"keys {', '.join(map(repr, _WRAPPER_KEYS))} "
                              f"(it has: {', '.join(map(repr, list(obj)[:10]))})")
    out = {}
    for key, value in obj.items():
        name = re.sub(r"^(module\.)+", "", str(key))
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


def _num_classes(shapes: Mapping[str, tuple[int, ...]], family: str, asked: int | None) -> int:
    """The class count asked for (checked against the classifier weight), or the one that weight has."""
    found = _infer_num_classes(shapes, family)
    if asked is None:
        asked = found or next((n for n in (_infer_num_classes(shapes, f) for f in CLASSIFIER) if n), 100)
    elif found is not None and found != asked:
        key = CLASSIFIER[family] + ".weight"
        raise ConversionError(f"{key!r} has {found} classes ({key} shape {shapes[key]}), but {asked} classes were "
                              "asked for")
    if asked < 1:
        raise ConversionError(f"num_classes must be >= 1, got {asked}")
    return asked


def _check_keys(shapes: Mapping[str, tuple[int, ...]], model_name: str, num_classes: int) -> None:
    """Raises :class:`ConversionError` naming every missing, unexpected or wrongly shaped key (and a closer model)."""
    layout, bn_modules = _layout(model_name, num_classes)
    missing = [k for k in layout if k not in shapes]
    unexpected = [k for k in shapes if k not in layout and not k.endswith(".num_batches_tracked")]
    unexpected_modules = {k.rsplit(".", 1)[0] for k in unexpected}
    # BN counters are ignored; listed only where nothing else names their module
    unexpected += [k for k in shapes if k.endswith(".num_batches_tracked")
                   and k.rsplit(".", 1)[0] not in bn_modules | unexpected_modules]
    wrong = [f"{k}: expected {layout[k][2]}, found {shapes[k]}"
             for k in layout if k in shapes and shapes[k] != layout[k][2]]
    if not (missing or unexpected or wrong):
        return
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
    for what, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            problems.append(f"{what} {len(items)} keys: {_listing(items)}")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong, 5)}")
    raise ConversionError(f"cannot convert the state dict to {model_name!r} ({num_classes} classes): "
                          + "; ".join(problems))


def _convert(state_dict: Any, model_name: str, num_classes: int | None) -> tuple[dict, int]:
    """``(variables, num_classes)``: the checked, converted Flax variables and the class count used."""
    from demkd_jax.checkpoint import CheckpointError, abstract_variables, compare_trees

    family = _family(model_name)
    arrays = {k: _to_numpy(k, v) for k, v in unwrap_state_dict(state_dict).items()}
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    num_classes = _num_classes(shapes, family, num_classes)
    _check_keys(shapes, model_name, num_classes)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, (path, axes, _) in _layout(model_name, num_classes)[0].items():
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(arrays[key].transpose(axes), dtype=np.float32)
    try:
        compare_trees(abstract_variables(model_name, num_classes), variables, f"converted {model_name!r} variables")
    except CheckpointError as e:  # cannot happen unless the name map is wrong
        raise ConversionError(str(e)) from None
    return variables, num_classes


def from_torch_state_dict(state_dict: Any, model_name: str, num_classes: int | None = None) -> dict[str, Any]:
    """Flax variables ``{"params", "batch_stats"}`` (numpy float32) for zoo model ``model_name``.

    ``state_dict`` may also be a checkpoint dict holding it (:func:`unwrap_state_dict`), of tensors or numpy
    arrays; ``num_classes`` is read from the classifier weight when None (checked otherwise). Raises
    :class:`ConversionError` naming missing, unexpected or wrongly shaped keys (and the zoo model they fit).
    """
    return _convert(state_dict, model_name, num_classes)[0]


# ---------------------------------------------------------------------------------------- .pth files
def _read_error(path: pathlib.Path, e: Exception) -> ConversionError:
    return ConversionError(f"cannot read {str(path)!r}: {type(e).__name__}: {str(e).splitlines()[0]}")


def load_torch_file(path: str | os.PathLike, *, allow_unsafe: bool = True) -> Any:
    """``torch.load(path, map_location="cpu")``: with ``weights_only=True`` first; old pickles that need
    ``weights_only=False`` (e.g. RepDistiller's final checkpoint pickles its argparse options) are loaded that
    way when ``allow_unsafe``, with a note (it runs pickled code: only for files you trust)."""
    try:
        import torch
    except ImportError:
        raise ImportError('reading PyTorch checkpoints needs torch: pip install -e ".[torch]" (in a checkout) or '
                          'pip install "demkd-jax[torch]"') from None
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
        print(f"note: {str(path)!r} needs torch.load(weights_only=False) ({reason}); loading it that way, which "
              "runs pickled code: only do this for files you trust (--weights-only refuses)", file=sys.stderr)
    except Exception as e:
        raise _read_error(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _read_error(path, e) from None


def _checkpoint_metadata(checkpoint: Any) -> dict[str, Any]:
    """``acc``/``accuracy``/``best_acc``/``epoch`` of a RepDistiller-style checkpoint dict (tensors -> floats)."""
    meta = {}
    for key in _METADATA_KEYS if isinstance(checkpoint, Mapping) else ():
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


def main(argv: Iterable[str] | None = None) -> int:
    from demkd_jax import checkpoint, models

    parser = argparse.ArgumentParser(prog="python -m demkd_jax.convert",
                                     description="Convert a PyTorch CIFAR teacher (RepDistiller / CA-MKD / mdistiller "
                                                 ".pth) into a demkd_jax teacher checkpoint directory.")
    parser.add_argument("--torch", required=True, metavar="PATH", help="the .pth file")
    parser.add_argument("--model", required=True, metavar="NAME", help=f"zoo name: {', '.join(models.MODEL_NAMES)}")
    parser.add_argument("--out", required=True, metavar="DIR", help="teacher checkpoint directory to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier width (default: read from the classifier weight)")
    parser.add_argument("--no-check", action="store_true", help="skip the sanity forward of the converted model")
    parser.add_argument("--image-size", type=int, default=32, help="input height = width of the sanity forward")
    parser.add_argument("--weights-only", action="store_true",
                        help="refuse files that need torch.load(weights_only=False) (old pickles)")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        path = pathlib.Path(args.torch).absolute()
        loaded = load_torch_file(path, allow_unsafe=not args.weights_only)
        variables, num_classes = _convert(loaded, args.model, args.num_classes)
        check = "" if args.no_check else "; " + sanity_forward(args.model, num_classes, variables, args.image_size)
        meta = {"source": "torch", "torch_file": str(path),
                "torch_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **_checkpoint_metadata(loaded)}
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
