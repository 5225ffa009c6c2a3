"""Model zoo summaries: ``python -m demkd_jax.models --summary vgg8`` or ``--list``.

Prints the layer table (Flax ``tabulate``), the parameter count (checked against the PyTorch reference)
and the forward FLOPs per image (32x32 unless ``--image-size``) from XLA's cost analysis.
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from demkd_jax.models import MODEL_NAMES, PARAM_COUNTS, count_params, create_model, init_variables


def forward_flops(model: nn.Module, variables, batch: int = 1, image_size: int = 32) -> float:
    """Forward FLOPs (multiply-adds count 2) per image of one eval-mode batch, from XLA's cost analysis."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) / batch


def summary(name: str, num_classes: int = 100, depth: int = 2, image_size: int = 32) -> str:
    model = create_model(name, num_classes)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    table = nn.tabulate(model, jax.random.PRNGKey(0), depth=depth, console_kwargs={"width": 140})(
        jnp.zeros((1, image_size, image_size, 3)), train=False
    )
    n = count_params(variables["params"])
    ref = PARAM_COUNTS.get(name) if num_classes == 100 else None
    check = "" if ref is None else (" (= PyTorch reference)" if n == ref else f" (reference: {ref:,})")
    flops = forward_flops(model, variables, image_size=image_size)
    return "\n".join([table, f"model: {name}   classes: {num_classes}", f"trainable parameters: {n:,}{check}",
                      f"forward FLOPs per {image_size}x{image_size} image: {flops / 1e6:,.1f} M"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demkd_jax.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--summary", metavar="NAME", help=f"one of: {', '.join(MODEL_NAMES)}")
    group.add_argument("--list", action="store_true", help="every model with its parameter count and FLOPs")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--depth", type=int, default=2, help="module nesting shown in the layer table")
    parser.add_argument("--image-size", type=int, default=32, help="input height = width for the FLOPs")
    args = parser.parse_args(argv)
    try:
        if args.summary:
            print(summary(args.summary, args.num_classes, args.depth, args.image_size))
        else:
            print(f"{'model':<12} {'params':>12} {'MFLOPs':>9}")
            for name in MODEL_NAMES:
                model = create_model(name, args.num_classes)
                variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
                print(f"{name:<12} {count_params(variables['params']):>12,} "
                      f"{forward_flops(model, variables, image_size=args.image_size) / 1e6:>9,.1f}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
