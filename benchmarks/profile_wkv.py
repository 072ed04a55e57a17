"""One forward+backward of our WKV kernels between cudaProfilerStart and cudaProfilerStop, for a
profiler started with collection off (two passes before it compile the kernels):

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:_wkv6 \\
        python benchmarks/profile_wkv.py --op wkv6 --shape 8,4096,32,64
    nsys profile --capture-range=cudaProfilerApi python benchmarks/profile_wkv.py

The inputs are bench_wkv.py's (realistic decays), and so are the kernel settings (--config, JSON
keywords of <op>_triton).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_wkv  # noqa: E402  (puts this checkout's src first on the path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=list(bench_wkv.OPS), default="wkv7")
    p.add_argument("--shape", default="8,4096,32,64", help="B,T,H,N")
    p.add_argument("--dtype", default="bf16", choices=list(bench_wkv.DTYPES))
    p.add_argument("--logw-fp32", action="store_true", help="log_w in float32 (as rwkvkit's layers pass it)")
    p.add_argument("--forward-only", action="store_true", help="no backward, under torch.no_grad")
    p.add_argument("--config", default="{}", help="JSON keywords of the op's <op>_triton")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_wkv.py: needs a CUDA GPU")
    op = bench_wkv.OPS[args.op]
    try:
        B, T, H, N = (int(x) for x in args.shape.split(","))
        config = json.loads(args.config)
    except ValueError as e:
        sys.exit(f"profile_wkv.py: bad --shape {args.shape!r} or --config {args.config!r}: {e}")
    dtype = bench_wkv.DTYPES[args.dtype]
    xs, s0 = op.make_inputs(B, T, H, N, dtype=dtype, logw_dtype=torch.float32 if args.logw_fp32 else dtype)
    fn = bench_wkv.ours_fn(op, config)
    leaves = [x.detach().requires_grad_(not args.forward_only) for x in xs]
    s_leaf = s0.detach().requires_grad_(not args.forward_only)

    def once():
        if args.forward_only:
            with torch.no_grad():
                fn(leaves, s_leaf)
            return
        y, s = fn(leaves, s_leaf)
        torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])

    once()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one {'forward' if args.forward_only else 'forward+backward'} of {op.title} at {B}, {T}, {H}, {N}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
