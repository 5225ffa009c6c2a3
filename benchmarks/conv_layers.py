"""Per-layer convolution throughput: XLA (direct and Winograd F(2x2, 3x3)) against PyTorch, as JSON lines.

    python benchmarks/conv_layers.py            # the 3x3 layers of vgg13 / vgg8 on CIFAR, batch 64, float32

Where a whole-step gap to PyTorch comes from: each line is one layer shape (``hw`` map size, ``cin`` -> ``cout``
channels), the forward convolution (+ bias-free ReLU) jitted alone, with ``ms`` and ``gflops`` (direct-convolution
FLOPs / time, so Winograd can exceed the machine's peak) for ``xla_direct``, ``xla_winograd`` and, when torch is
installed, ``torch_nchw`` / ``torch_channels_last`` (``torch.set_num_threads(--threads)``, default 2 on CPU).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demkd_jax import hugepages  # noqa: E402
from demkd_jax.models import winograd  # noqa: E402

# (map size, C_in, C_out) of the 3x3 convolutions in vgg13 (and vgg8: a subset) on 32x32 inputs; the last two
# stages both run at 4x4 (no fourth pooling at this input size).
VGG_LAYERS = ((32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256),
              (4, 256, 512), (4, 512, 512))
DN = ("NHWC", "HWIO", "NHWC")


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def xla_layer(hw: int, cin: int, cout: int, batch: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, hw, hw, cin))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout)) / np.sqrt(9 * cin)
    direct = jax.jit(lambda x, k: jax.nn.relu(jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                                         dimension_numbers=DN)))
    wino = jax.jit(lambda x, k: jax.nn.relu(winograd.conv3x3(x, k)))
    np.testing.assert_allclose(np.asarray(wino(x, k)), np.asarray(direct(x, k)), rtol=1e-3, atol=1e-3)
    return {"xla_direct": best_ms(lambda: direct(x, k).block_until_ready(), repeats),
            "xla_winograd": best_ms(lambda: wino(x, k).block_until_ready(), repeats)}


def torch_layer(hw: int, cin: int, cout: int, batch: int, repeats: int) -> dict:
    import torch

    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).eval()
    x = torch.randn(batch, cin, hw, hw)
    out = {}
    with torch.no_grad():
        out["torch_nchw"] = best_ms(lambda: torch.relu(conv(x)), repeats)
        conv_cl, x_cl = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        out["torch_channels_last"] = best_ms(lambda: torch.relu(conv_cl(x_cl)), repeats)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per layer; the best one counts")
    p.add_argument("--layers", nargs="*", default=None, help="HWxCINxCOUT, e.g. 32x64x64 (default: vgg13's)")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    args = p.parse_args(argv)
    layers = [tuple(int(v) for v in s.split("x")) for s in args.layers] if args.layers else VGG_LAYERS
    use_torch = args.torch
    if use_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            use_torch = False
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}", file=sys.stderr, flush=True)
    for hw, cin, cout in layers:
        ms = xla_layer(hw, cin, cout, args.batch, args.repeats)
        if use_torch:
            ms.update(torch_layer(hw, cin, cout, args.batch, args.repeats))
        flop = 2 * args.batch * hw * hw * cin * cout * 9
        print(json.dumps({"hw": hw, "cin": cin, "cout": cout, "batch": args.batch,
                          "winograd_default": winograd.pays_off(hw, hw, cin),
                          "ms": {k: round(v, 2) for k, v in ms.items()},
                          "gflops": {k: float(f"{flop / v / 1e6:.3g}") for k, v in ms.items()},
                          "device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    hugepages.restart_with_huge_pages()
    sys.exit(main())
