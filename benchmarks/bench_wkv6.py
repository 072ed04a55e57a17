"""Benchmark the WKV-6 (RWKV-5.2 / RWKV-6) kernels on CUDA: the WKV-6 part of bench_wkv.py.

Times forward and forward+backward (triton.testing.do_bench, median) of
  ours     rwkvkit.ops.triton.wkv6_triton
  chunked  rwkvkit.ops.wkv6_chunked (PyTorch; small shapes only)
  fla      fla.ops.rwkv6.chunk_rwkv6, if importable, at its defaults (chunk 64), scale=1.0
on bf16 inputs with RWKV-6-like decays, prints a table (ms, fla/ours) with the memory floor of
the forward, the relative errors of ours and fla against a float32 chunked reference at one
moderate shape (realistic decays, and sporadic log w = -1e4), and writes everything as JSON.

    python benchmarks/bench_wkv.py --wkv6 --out runs/bench_wkv6.json      (or this file directly)
    python benchmarks/bench_wkv.py --wkv6 --sweep --out runs/sweep_wkv6.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wkv import (  # noqa: E402  (the shared timing helpers)
    backward_bytes,
    forward_bytes,
    kernel_times,
    measure_bandwidth,
    rel_err,
    time_forward,
    time_forward_backward,
)

SHAPES = [(8, 4096, 32, 64), (16, 1024, 12, 64)]
ACCURACY_SHAPE = (2, 2048, 8, 64)
CHUNKED_MAX_TOKENS = 16 * 1024 * 12  # B*T*H up to which the PyTorch chunked form is timed
NAMES = ["r", "log_w", "k", "v", "u", "state"]


def make_inputs(B, T, H, N, *, dtype, logw_dtype, device="cuda", seed=0, decay="realistic"):
    """RWKV-6-like inputs: log w = -exp(time_decay + lora) with time_decay in the init's range
    [-6, -1] ("mixed": also log w = -1e4 at 5% of the entries). Returns ([r, log_w, k, v, u],
    state float32 [B, H, N, N])."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=g)

    log_w = -torch.exp(-6 + 5 * rand(B, T, H, N) + 0.5 * randn(B, T, H, N))
    if decay == "mixed":
        log_w = torch.where(rand(B, T, H, N) < 0.05, torch.full_like(log_w, -1e4), log_w)
    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    u = randn(H, N) * 0.5
    xs = [r, log_w, k, v, u]
    xs = [x.to(logw_dtype if i == 1 else dtype).contiguous() for i, x in enumerate(xs)]
    return xs, randn(B, H, N, N) * 0.1


def load_ops():
    """(wkv6_chunked, the Triton kernels module). Falls back to loading the op files alone
    when the package's own imports fail (they need only torch and triton)."""
    try:
        from rwkvkit.ops import wkv6_chunked
        from rwkvkit.ops.triton import wkv6 as kernels

        return wkv6_chunked, kernels
    except ImportError as e:
        import importlib.util

        print(f"# rwkvkit import failed ({e}); loading ops/chunked.py and ops/triton/wkv6.py alone")
        ops_dir = Path(__file__).resolve().parents[1] / "src" / "rwkvkit" / "ops"

        def load(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module

        chunked = load("bench_wkv6_chunked", ops_dir / "chunked.py")
        return chunked.wkv6_chunked, load("bench_wkv6_triton", ops_dir / "triton" / "wkv6.py")


# --- implementations: each returns fn(xs, s0) -> (y, final state [B, H, V, K]) ----------------


def ours_fn(cfg):
    kernels = load_ops()[1]
    return lambda xs, s0: kernels.wkv6_triton(*xs, s0, **cfg)


def chunked_fn():
    wkv6_chunked = load_ops()[0]
    return lambda xs, s0: wkv6_chunked(*xs, s0)


def fla_fns():
    """{name: fn} for fla's chunk_rwkv6 (empty if fla is missing), and a note."""
    try:
        import fla
        from fla.ops.rwkv6 import chunk_rwkv6
    except Exception as e:  # noqa: BLE001 - any import failure means "no fla"
        return {}, f"fla not importable: {type(e).__name__}: {e}"

    def fn(xs, s0):
        r, lw, k, v, u = xs
        o, s = chunk_rwkv6(
            r=r, k=k, v=v, w=lw, u=u, scale=1.0, output_final_state=True,
            initial_state=None if s0 is None else s0.transpose(-1, -2).contiguous(),
        )
        return o, s.transpose(-1, -2)  # fla's state is [B, H, K, V]

    return {"fla": fn}, f"fla {getattr(fla, '__version__', '?')}: chunk_rwkv6(w=log_w, scale=1.0), chunk 64"


# --- accuracy ---------------------------------------------------------------------------------


def accuracy(impls, shape, dtype, logw_dtype, decay) -> dict:
    """Relative errors of y, final state and all gradients against the float32 chunked form
    (autograd) on the same rounded inputs."""
    wkv6_chunked = load_ops()[0]
    xs, s0 = make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype, seed=1, decay=decay)
    ref_in = [x.float().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
    y_ref, s_ref = wkv6_chunked(*ref_in)
    gy, gs = torch.randn_like(y_ref), torch.randn_like(s_ref)
    ref_grads = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), ref_in)
    out = {}
    for name, fn in impls.items():
        try:
            leaves = [x.detach().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
            y, s = fn(leaves[:5], leaves[5])
            grads = torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), leaves, allow_unused=True)
            errs = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
            for n, g, g_ref in zip(NAMES, grads, ref_grads):
                errs["d" + n] = float("nan") if g is None else rel_err(g, g_ref)
            errs["finite"] = bool(torch.isfinite(y).all() and all(g is None or torch.isfinite(g).all() for g in grads))
            out[name] = errs
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


# --- sweep ------------------------------------------------------------------------------------


def warm(configs, argv_dtype: list[str]) -> None:
    """Compile every config's kernels in parallel processes (a small forward + backward
    each): Triton caches the binaries on disk, so the timing loop only loads them."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, "--warm-config", json.dumps(c), *argv_dtype]) for c in configs]
    for pr in procs:
        pr.wait()


def warm_one(cfg: dict, shape, dtype, logw_dtype) -> None:
    kernels = load_ops()[1]
    xs, s0 = make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
    xs = [x.requires_grad_() for x in xs]
    y, s = kernels.wkv6_triton(*xs, s0.requires_grad_(), **cfg)
    torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
    with torch.no_grad():
        kernels.wkv6_triton(*xs, s0, **cfg)
    torch.cuda.synchronize()


def sweep(shape, dtype, logw_dtype, configs) -> list[dict]:
    """Each config: forward and forward+backward times, and the time of every kernel."""
    kernels = load_ops()[1]
    xs, s0 = make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
    rows = []
    for cfg in configs:
        row = dict(cfg)
        fn = lambda x, s, cfg=cfg: kernels.wkv6_triton(*x, s, **cfg)  # noqa: E731
        try:
            row["fwd_ms"] = time_forward(fn, xs, s0)
            row["fwdbwd_ms"] = time_forward_backward(fn, xs, s0)
            row["kernels_ms"] = {k: round(v, 4) for k, v in kernel_times(fn, xs, s0).items() if v > 0.005}
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print("  ", json.dumps(row), flush=True)
    return rows


def sweep_configs(quick: bool):
    """Chunk size (the stored states) and block_t with the chunk kernels' blocks and warps; then
    the scans' tile and warps at the default chunk (the knobs are largely independent: read the
    per-kernel times)."""
    configs = []
    for C in (32, 64, 128):
        for bt in (16, 32):
            for bv, w in ((64, 8), (64, 4), (32, 8), (32, 4)):
                if quick and (C, bt, bv, w) not in {(64, 16, 64, 8), (64, 16, 32, 8), (64, 16, 64, 4), (32, 16, 64, 8),
                                                    (128, 16, 64, 8), (64, 32, 64, 8), (128, 32, 64, 8)}:
                    continue
                configs.append(dict(chunk_size=C, block_t=bt, block_v=bv, num_warps=w, bwd_block_v=bv,
                                    bwd_num_warps=w))
    for sb, sw in ((16, 4), (32, 8), (64, 8)):
        configs.append(dict(scan_block=sb, scan_num_warps=sw))
    return configs


# --- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                   help="B,T,H,N;B,T,H,N;... (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--logw-fp32", action="store_true", help="log_w in float32 (as rwkvkit's layer passes it)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--block-t", type=int, default=None)
    p.add_argument("--block-v", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--bwd-block-v", type=int, default=None)
    p.add_argument("--bwd-num-warps", type=int, default=None)
    p.add_argument("--scan-block", type=int, default=None)
    p.add_argument("--scan-num-warps", type=int, default=None)
    p.add_argument("--precision", default=None, choices=["ieee", "tf32", "tf32x3"])
    p.add_argument("--profile", action="store_true", help="print the time of every kernel (ours, fla) at each shape")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--sweep", action="store_true", help="sweep kernel configs at the first shape, then exit")
    p.add_argument("--sweep-full", action="store_true", help="with --sweep: every config, not a short list")
    p.add_argument("--warm-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_wkv6: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    logw_dtype = torch.float32 if args.logw_fp32 else dtype
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    cfg = {k: v for k, v in dict(
        chunk_size=args.chunk_size, block_t=args.block_t, block_v=args.block_v, num_warps=args.num_warps,
        bwd_block_v=args.bwd_block_v, bwd_num_warps=args.bwd_num_warps, scan_block=args.scan_block,
        scan_num_warps=args.scan_num_warps, precision=args.precision).items() if v is not None}

    props = torch.cuda.get_device_properties(0)
    report = {
        "op": "wkv6", "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "dtype": args.dtype,
        "logw_dtype": str(logw_dtype).replace("torch.", ""), "ours_config": cfg,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"# WKV-6 on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))

    if args.warm_config:
        warm_one(json.loads(args.warm_config), (1, 512, 4, shapes[0][3]), dtype, logw_dtype)
        return 0
    if args.sweep:
        configs = sweep_configs(quick=not args.sweep_full)
        t0 = time.perf_counter()
        warm(configs, ["--dtype", args.dtype] + (["--logw-fp32"] if args.logw_fp32 else []))
        print(f"# compiled {len(configs)} configs in parallel in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"# sweep at {shapes[0]}: {len(configs)} configs")
        report["sweep_shape"] = shapes[0]
        report["sweep"] = sweep(shapes[0], dtype, logw_dtype, configs)
        for pas in ("fwd_ms", "fwdbwd_ms"):
            ok = sorted((r for r in report["sweep"] if pas in r), key=lambda r: r[pas])
            print(f"# best {pas}:", *(f"\n   {r[pas]:.3f} ms  {r}" for r in ok[:3]))
        save()
        return 0

    bw = measure_bandwidth()
    report["bandwidth_GBps"] = bw / 1e9
    print(f"# measured copy bandwidth: {bw / 1e9:.0f} GB/s")

    impls = {"ours": ours_fn(cfg)}
    fla, fla_note = ({}, "skipped (--no-fla)") if args.no_fla else fla_fns()
    impls.update(fla)
    report["fla"] = fla_note
    print(f"# {fla_note}")

    rows = []
    report["results"] = rows
    for shape in shapes:
        B, T, H, N = shape
        xs, s0 = make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
        fb = forward_bytes(xs, s0, dtype)
        names = dict(impls)
        if B * T * H <= CHUNKED_MAX_TOKENS:
            names["chunked"] = chunked_fn()
        for name, fn in names.items():
            row = {"shape": shape, "impl": name}
            for pas, timer in (("fwd_ms", time_forward), ("fwdbwd_ms", time_forward_backward)):
                try:
                    row[pas] = timer(fn, xs, s0)
                except Exception as e:  # noqa: BLE001
                    row[pas + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc(limit=2)
                torch.cuda.empty_cache()
            if args.profile:
                try:
                    row["kernels_ms"] = {k: round(v, 4) for k, v in kernel_times(fn, xs, s0).items() if v > 0.005}
                    print(f"# {name} {shape} kernels (ms per fwd+bwd):", json.dumps(row["kernels_ms"]))
                except Exception as e:  # noqa: BLE001
                    row["kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["fwd_floor_ms"] = fb / bw * 1e3
            row["fwd_bytes"] = fb
            row["fwdbwd_floor_ms"] = (fb + backward_bytes(xs, s0)) / bw * 1e3
            rows.append(row)
            save()
        del xs, s0
        torch.cuda.empty_cache()

    # table
    print(f"\n{'shape (B,T,H,N)':22s} {'impl':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd floor':>10s}"
          f" {'ours/floor':>10s} {'impl/ours fwd':>14s} {'impl/ours f+b':>14s}")
    for shape in shapes:
        mine = next((r for r in rows if r["shape"] == shape and r["impl"] == "ours"), {})
        for r in (r for r in rows if r["shape"] == shape):
            def ratio(key):
                return f"{r[key] / mine[key]:.2f}" if key in r and key in mine else "-"

            def ms(key):
                return f"{r[key]:.3f}" if key in r else "error"

            print(f"{str(shape):22s} {r['impl']:10s} {ms('fwd_ms'):>9s} {ms('fwdbwd_ms'):>11s} "
                  f"{r['fwd_floor_ms']:>10.3f} {(mine.get('fwd_ms', float('nan')) / r['fwd_floor_ms']):>10.2f} "
                  f"{ratio('fwd_ms'):>14s} {ratio('fwdbwd_ms'):>14s}")

    if not args.no_accuracy:
        report["accuracy_shape"] = ACCURACY_SHAPE
        report["accuracy"] = {}
        for decay in ("realistic", "mixed"):
            acc = accuracy(dict(impls), ACCURACY_SHAPE, dtype, logw_dtype, decay)
            report["accuracy"][decay] = acc
            print(f"\n# relative error vs float32 chunked form at {ACCURACY_SHAPE}, {args.dtype} inputs, "
                  f"{decay} decays")
            for name, errs in acc.items():
                print(f"  {name:10s} " + "  ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in errs.items()))
    save()
    if args.out:
        print(f"\n# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
