"""What rounding a float32 log w to tf32 costs in accuracy, on the CPU in float64.

The WKV-6 whole-chunk kernels sum log w (the decay exponents) by masked tensor-core products.
A float32 log w takes two tf32 products to be summed exactly (its tf32 head and the rest); one
product is exact if log w is first rounded to the nearest tf32 value. This script measures the
effect of that rounding alone: the float64 chunked form with the exact log w against the same
with log w rounded to tf32 (nearest, ties to even; and truncated, as a tf32 product of the raw
float32 value would take it), on the benchmark's RWKV-6-like inputs. The kernels' own errors
against float32 (bench_wkv.py --logw-fp32) are about 2e-3.

    python benchmarks/wkv6_logw_rounding.py [--shape B,T,H,N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wkv import rel_err, wkv6_inputs  # noqa: E402

from rwkvkit.ops.chunked import wkv6_chunked  # noqa: E402

NAMES = ["y", "state", "dr", "dlog_w", "dk", "dv", "du", "dstate"]


def to_tf32(x: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 x to tf32 (10 mantissa bits): "nearest" (ties to even) or "truncate"."""
    bits = x.float().view(torch.int32)
    if mode == "nearest":
        bits = bits + 0x0FFF + ((bits >> 13) & 1)
    return (bits & ~0x1FFF).view(torch.float32)


def run(xs, lw_map, dy, ds):
    xs = [t.detach().double().requires_grad_() for t in xs]
    r, lw, k, v, u, s0 = xs
    y, sT = wkv6_chunked(r, lw_map(lw), k, v, u, state=s0)
    grads = torch.autograd.grad((y * dy).sum() + (sT * ds).sum(), xs)
    return [y, sT, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2,512,4,64", help="B,T,H,N")
    args = ap.parse_args()
    B, T, H, N = (int(x) for x in args.shape.split(","))
    for decay in ("realistic", "mixed"):
        (r, lw, k, v, u), s0 = wkv6_inputs(B, T, H, N, dtype=torch.float32, logw_dtype=torch.float32,
                                           device="cpu", decay=decay)
        xs = [r, lw, k, v, u, s0]
        g = torch.Generator().manual_seed(1)
        dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
        ds = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
        ref = run(xs, lambda x: x, dy, ds)
        for mode in ("nearest", "truncate"):
            # the rounded value forward, the gradient taken as for the exact one
            got = run(xs, lambda x: x + (to_tf32(x, mode).double() - x).detach(), dy, ds)
            errs = [rel_err(a, b) for a, b in zip(got, ref)]
            print(f"{decay:9s} {mode:8s} " + "  ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs)))


if __name__ == "__main__":
    main()
