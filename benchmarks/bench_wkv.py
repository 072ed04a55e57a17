"""Benchmark the RWKV-7 WKV kernels on CUDA.

Times forward and forward+backward (triton.testing.do_bench, median) of
  ours     rwkvkit.ops.triton.wkv7_triton
  chunked  rwkvkit.ops.wkv7_chunked (PyTorch; small shapes only)
  fla      fla.ops.rwkv7.chunk_rwkv7, if importable, at its defaults ("fla") and as fla's
           RWKV-7 layer calls it ("fla-layer": chunk_size=64, safe_gate=True,
           lower_bound=-exp(-0.5)); scale=1.0 in both
on bf16 inputs, prints a table (ms, fla/ours) with the memory floor of the forward, the
relative errors of ours and fla against a float32 chunked reference at one moderate shape,
and writes everything as JSON to --out.

    python benchmarks/bench_wkv.py --out runs/bench_wkv.json
    python benchmarks/bench_wkv.py --sweep --out runs/sweep.json    # tune chunk/block_v/warps, per kernel
    python benchmarks/bench_wkv.py --wkv6 [...]    # WKV-6 (RWKV-5.2/6) instead: see bench_wkv6.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = [(8, 4096, 32, 64), (16, 1024, 12, 64), (2, 16384, 32, 64)]
ACCURACY_SHAPE = (2, 2048, 8, 64)
CHUNKED_MAX_TOKENS = 16 * 1024 * 12  # B*T*H up to which the PyTorch chunked form is timed
DECAY_BOUND = -math.exp(-0.5)


def make_inputs(B, T, H, N, *, dtype, logw_dtype, device="cuda", seed=0):
    """RWKV-7-like inputs: unit-norm kk per head, a = -kk, b = kk * sigmoid(...), log-decay
    in (-e^-0.5, 0). Returns ([r, log_w, k, v, a, b], state float32 [B, H, N, N])."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    log_w = DECAY_BOUND * torch.sigmoid(randn(B, T, H, N) * 2 - 1)
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    a_icl = torch.sigmoid(randn(B, T, H, N))
    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    k = k * (1 + (a_icl - 1) * 0.5)
    xs = [r, log_w, k, v, -kk, kk * a_icl]
    xs = [x.to(logw_dtype if i == 1 else dtype).contiguous() for i, x in enumerate(xs)]
    return xs, randn(B, H, N, N) * 0.1


def load_ops():
    """(wkv7_chunked, the Triton kernels module). Falls back to loading the op files alone
    when the package's own imports fail (a GPU box with torch and triton but without
    numpy/safetensors/tqdm): they need only torch and triton."""
    try:
        from rwkvkit.ops import wkv7_chunked
        from rwkvkit.ops.triton import wkv7 as kernels

        return wkv7_chunked, kernels
    except ImportError as e:
        import importlib.util

        print(f"# rwkvkit import failed ({e}); loading ops/chunked.py and ops/triton/wkv7.py alone")
        ops_dir = Path(__file__).resolve().parents[1] / "src" / "rwkvkit" / "ops"

        def load(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module

        chunked = load("bench_wkv7_chunked", ops_dir / "chunked.py")
        return chunked.wkv7_chunked, load("bench_wkv7_triton", ops_dir / "triton" / "wkv7.py")


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# --- implementations: each returns fn(xs, s0) -> (y, final state [B, H, V, K]) ----------------


def ours_fn(cfg):
    kernels = load_ops()[1]
    return lambda xs, s0: kernels.wkv7_triton(*xs, s0, **cfg)


def chunked_fn():
    wkv7_chunked = load_ops()[0]
    return lambda xs, s0: wkv7_chunked(*xs, s0)


def fla_fns():
    """{name: fn} for fla's chunk_rwkv7 (empty if fla is missing), and a note."""
    try:
        import fla
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # noqa: BLE001 - any import failure means "no fla"
        return {}, f"fla not importable: {type(e).__name__}: {e}"
    params = inspect.signature(chunk_rwkv7).parameters
    decay_arg = "log_w" if "log_w" in params else "w"  # old API: w = raw decay, log_w = log-decay
    layer_args = (("chunk_size", 64), ("safe_gate", True), ("lower_bound", DECAY_BOUND))
    layer_extra = {n: v for n, v in layer_args if n in params}

    def make(extra):
        def fn(xs, s0):
            r, lw, k, v, a, b = xs
            kw = dict(r=r, k=k, v=v, a=a, b=b, scale=1.0, output_final_state=True,
                      initial_state=None if s0 is None else s0.transpose(-1, -2).contiguous())
            kw[decay_arg] = lw
            o, s = chunk_rwkv7(**kw, **extra)[:2]
            return o, s.transpose(-1, -2)  # fla's state is [B, H, K, V]

        return fn

    fns = {"fla": make({})}
    if layer_extra:
        fns["fla-layer"] = make(layer_extra)
    note = f"fla {getattr(fla, '__version__', '?')}: decay passed as {decay_arg!r}; layer-style args {layer_extra}"
    return fns, note


# --- timing -----------------------------------------------------------------------------------


def bench(fn, **kw) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median", **kw)


def time_forward(fn, xs, s0) -> float:
    def run():
        with torch.no_grad():
            fn(xs, s0)

    return bench(run)


def time_forward_backward(fn, xs, s0) -> float:
    leaves = [x.detach().requires_grad_() for x in xs]
    s_leaf = s0.detach().requires_grad_()
    y, s = fn(leaves, s_leaf)
    dy, ds = torch.randn_like(y), torch.randn_like(s)

    def run():
        y, s = fn(leaves, s_leaf)
        torch.autograd.backward([y, s], [dy, ds])

    return bench(run, grad_to_none=leaves + [s_leaf])


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def forward_bytes(xs, s0, y_dtype) -> int:
    B, T, H, N = xs[0].shape
    inputs = sum(x.numel() * x.element_size() for x in xs)
    y = B * T * H * N * torch.tensor([], dtype=y_dtype).element_size()
    return inputs + y + 2 * s0.numel() * 4


def backward_bytes(xs, s0) -> int:
    """Minimal traffic of the backward alone: read the inputs and dy, write six gradients,
    read dS_T, write dS_0 (intermediate chunk states not counted)."""
    inputs = sum(x.numel() * x.element_size() for x in xs)
    dy = xs[3].numel() * xs[3].element_size()
    return 2 * inputs + dy + 2 * s0.numel() * 4


# --- accuracy ---------------------------------------------------------------------------------


def accuracy(impls, shape, dtype, logw_dtype) -> dict:
    """Relative errors of y, final state and all gradients against the float32 chunked form
    (autograd) on the same rounded inputs."""
    wkv7_chunked = load_ops()[0]
    xs, s0 = make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype, seed=1)
    names = ["r", "log_w", "k", "v", "a", "b", "state"]
    ref_in = [x.float().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
    y_ref, s_ref = wkv7_chunked(*ref_in)
    gy, gs = torch.randn_like(y_ref), torch.randn_like(s_ref)
    ref_grads = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), ref_in)
    out = {}
    for name, fn in impls.items():
        try:
            leaves = [x.detach().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
            y, s = fn(leaves[:6], leaves[6])
            grads = torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), leaves, allow_unused=True)
            errs = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
            for n, g, g_ref in zip(names, grads, ref_grads):
                errs["d" + n] = float("nan") if g is None else rel_err(g, g_ref)
            errs["finite"] = bool(torch.isfinite(y).all() and all(g is None or torch.isfinite(g).all() for g in grads))
            out[name] = errs
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


# --- sweep ------------------------------------------------------------------------------------


def kernel_times(fn, xs, s0, reps: int = 5) -> dict[str, float]:
    """Forward + backward under the profiler: mean CUDA time (ms) per call of each kernel."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [x.detach().requires_grad_() for x in xs]
    s_leaf = s0.detach().requires_grad_()

    def run():
        y, s = fn(leaves, s_leaf)
        torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out[ev.key[:60]] = t / 1e3 / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


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
    y, s = kernels.wkv7_triton(*xs, s0.requires_grad_(), **cfg)
    torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
    with torch.no_grad():
        kernels.wkv7_triton(*xs, s0, **cfg)
    torch.cuda.synchronize()


def sweep(shape, dtype, logw_dtype, configs) -> list[dict]:
    """Each config: forward and forward+backward times, and the time of every kernel."""
    kernels = load_ops()[1]
    xs, s0 = make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
    rows = []
    for cfg in configs:
        row = dict(cfg)
        fn = lambda x, s, cfg=cfg: kernels.wkv7_triton(*x, s, **cfg)  # noqa: E731
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
    """Parallel kernels: chunk size, value block and warps; the scan: its block, warps and
    precision (the knobs are independent: read the per-kernel times)."""
    configs = []
    for L in (16, 32, 64):
        for bv in (16, 32, 64):
            for w in (4, 8):
                if quick and (L, bv, w) not in {(16, 64, 4), (16, 32, 4), (16, 64, 8), (32, 64, 4), (32, 32, 4),
                                                (32, 64, 8), (64, 32, 8)}:
                    continue
                configs.append(dict(chunk_size=L, block_v=bv, num_warps=w, bwd_block_v=bv, bwd_num_warps=w))
    for sbv, sw, sp in ((16, 4, None), (32, 4, None), (64, 4, None), (32, 8, None), (32, 4, "tf32x3"), (32, 4, "ieee")):
        configs.append(dict(chunk_size=64, scan_block_v=sbv, scan_num_warps=sw, scan_precision=sp))
    return configs


# --- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--wkv6" in argv:  # the WKV-6 part: same structure and flags, in its own module
        argv.remove("--wkv6")
        import bench_wkv6

        return bench_wkv6.main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                   help="B,T,H,N;B,T,H,N;... (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--logw-fp32", action="store_true", help="log_w in float32 (as rwkvkit's layer passes it)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--block-v", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--bwd-block-v", type=int, default=None)
    p.add_argument("--bwd-num-warps", type=int, default=None)
    p.add_argument("--scan-block-v", type=int, default=None)
    p.add_argument("--scan-num-warps", type=int, default=None)
    p.add_argument("--precision", default=None, choices=["ieee", "tf32", "tf32x3"])
    p.add_argument("--scan-precision", default=None, choices=["ieee", "tf32", "tf32x3"])
    p.add_argument("--profile", action="store_true", help="print the time of every kernel (ours, fla) at each shape")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--sweep", action="store_true", help="sweep kernel configs at the first shape, then exit")
    p.add_argument("--sweep-full", action="store_true", help="with --sweep: every config, not a short list")
    p.add_argument("--warm-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_wkv: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    logw_dtype = torch.float32 if args.logw_fp32 else dtype
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    cfg = {k: v for k, v in dict(
        chunk_size=args.chunk_size, block_v=args.block_v, num_warps=args.num_warps, bwd_block_v=args.bwd_block_v,
        bwd_num_warps=args.bwd_num_warps, scan_block_v=args.scan_block_v, scan_num_warps=args.scan_num_warps,
        precision=args.precision, scan_precision=args.scan_precision).items() if v is not None}

    props = torch.cuda.get_device_properties(0)
    report = {
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "dtype": args.dtype,
        "logw_dtype": str(logw_dtype).replace("torch.", ""), "ours_config": cfg,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"# {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")

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
        acc_impls = dict(impls)
        report["accuracy_shape"] = ACCURACY_SHAPE
        report["accuracy"] = accuracy(acc_impls, ACCURACY_SHAPE, dtype, logw_dtype)
        print(f"\n# relative error vs float32 chunked form at {ACCURACY_SHAPE}, {args.dtype} inputs")
        for name, errs in report["accuracy"].items():
            print(f"  {name:10s} " + "  ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in errs.items()))
    save()
    if args.out:
        print(f"\n# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
