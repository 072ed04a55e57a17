"""Benchmark the WKV kernels on CUDA: WKV-7 (RWKV-7; the default) or, with --op wkv6, WKV-6
(RWKV-5.2 / RWKV-6).

Times forward and forward+backward (triton.testing.do_bench, median) of
  ours     rwkvkit.ops.triton.<op>_triton (wkv7_triton, wkv6_triton)
  chunked  rwkvkit.ops.<op>_chunked (PyTorch; small shapes only)
  fla      fla's chunk_rwkv7 / chunk_rwkv6, if importable, with scale=1.0 (see the op's notes
           at the end of --help)
on bf16 inputs, prints a table (ms, impl/ours) with the memory floor of the forward, the
relative errors of ours and fla against a float32 chunked reference at one moderate shape,
and writes everything as JSON to --out.

    python benchmarks/bench_wkv.py --out runs/bench_wkv.json
    python benchmarks/bench_wkv.py --sweep --out runs/sweep.json    # tune the kernel settings, per kernel
    python benchmarks/bench_wkv.py --op wkv6 --sweep --sweep-only chunks   # a subset of the sweep
    python benchmarks/bench_wkv.py --op wkv6 [...]    # WKV-6 (also: --wkv6, or bench_wkv6.py)
    python benchmarks/bench_wkv.py --op wkv6 --help   # the WKV-6 kernel settings

Each op (WKV7 and WKV6 below) states only what differs between them: its inputs, fla's
call(s), the kernel settings and their sweep list; the driver (timing, table, JSON, accuracy,
sweep) serves both.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import json
import math
import platform
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ACCURACY_SHAPE = (2, 2048, 8, 64)
CHUNKED_MAX_TOKENS = 16 * 1024 * 12  # B*T*H up to which the PyTorch chunked form is timed
PRECISIONS = ("ieee", "tf32", "tf32x3")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class WkvOp:
    """What differs between the benchmarks of two recurrences. Every implementation is a
    function fn(xs, s0) -> (y, final state [B, H, V, K]) of make_inputs' tensors."""

    name: str  # "wkv7": timed as rwkvkit.ops.triton.wkv7.wkv7_triton, checked against rwkvkit.ops.wkv7_chunked
    title: str  # "WKV-7", for the printed header
    notes: str  # what the inputs and fla's calls are (the end of --help)
    shapes: tuple[tuple[int, int, int, int], ...]  # default --shapes (B, T, H, N)
    input_names: tuple[str, ...]  # make_inputs' tensors in order, then "state"
    make_inputs: Callable  # (B, T, H, N, *, dtype, logw_dtype, seed=0, [decay]) -> ([r, log_w, ...], state)
    fla: Callable[[], tuple[dict, str]]  # () -> ({name: fn} for fla, empty without it; a note)
    settings: dict  # keyword of <name>_triton -> int, or a tuple of its choices: one flag each
    sweep_configs: Callable[[bool], list[dict]]  # quick -> the configurations --sweep times
    accuracy_decays: tuple[str, ...] = ()  # if set, the accuracy is reported per make_inputs(decay=...)


def rounded(xs: list, dtype, logw_dtype) -> list:
    """The inputs in ``dtype``, log_w (the second) in ``logw_dtype``, contiguous."""
    return [x.to(logw_dtype if i == 1 else dtype).contiguous() for i, x in enumerate(xs)]


def import_fla(module: str, name: str):
    """(fla.ops.<module>.<name>, "fla <version>"), or (None, why fla is not importable)."""
    try:
        import fla

        return getattr(importlib.import_module(f"fla.ops.{module}"), name), f"fla {getattr(fla, '__version__', '?')}"
    except Exception as e:  # noqa: BLE001 - any import failure means "no fla"
        return None, f"fla not importable: {type(e).__name__}: {e}"


# --- WKV-7 ------------------------------------------------------------------------------------

DECAY_BOUND = -math.exp(-0.5)


def wkv7_inputs(B, T, H, N, *, dtype, logw_dtype, device="cuda", seed=0):
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
    return rounded([r, log_w, k, v, -kk, kk * a_icl], dtype, logw_dtype), randn(B, H, N, N) * 0.1


def wkv7_fla():
    """fla's chunk_rwkv7 at its defaults ("fla") and as its RWKV-7 layer calls it ("fla-layer")."""
    chunk_rwkv7, fla_version = import_fla("rwkv7", "chunk_rwkv7")
    if chunk_rwkv7 is None:
        return {}, fla_version
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
    note = f"{fla_version}: decay passed as {decay_arg!r}; layer-style args {layer_extra}"
    return fns, note


def wkv7_sweep_configs(quick: bool) -> list[dict]:
    """Parallel kernels: chunk size, value block and warps; the scan: its block, warps and
    precision (the knobs are independent: read the per-kernel times)."""
    configs = []
    for L in (16, 32, 64):
        for bv in (16, 32, 64):
            for w in (4, 8):
                if quick and (L, bv, w) not in {(16, 64, 4), (16, 32, 4), (16, 64, 8), (32, 64, 4), (32, 32, 4),
                                                (32, 64, 8)}:
                    continue
                configs.append(dict(chunk_size=L, block_v=bv, num_warps=w, bwd_block_v=bv, bwd_num_warps=w))
    # the scans (the first row: the defaults); chunk 64 is forward-only (its backward kernel does
    # not fit in shared memory at N = 64): its rows time the forward alone
    for L, sbv, sw, sp in ((16, 64, 4, None), (16, 32, 4, None), (16, 16, 4, None), (16, 64, 8, None),
                           (16, 32, 8, None), (16, 64, 4, "tf32x3"), (32, 64, 4, None), (32, 32, 4, None),
                           (32, 16, 4, None), (64, 64, 4, None), (64, 32, 4, None)):
        configs.append(dict(chunk_size=L, scan_block_v=sbv, scan_num_warps=sw, scan_precision=sp))
    return configs


WKV7 = WkvOp(
    name="wkv7",
    title="WKV-7",
    notes="WKV-7: RWKV-7-like inputs (unit-norm kk per head, a = -kk, b = kk * sigmoid(...), "
          "log-decay in (-e^-0.5, 0)); fla.ops.rwkv7.chunk_rwkv7 at its defaults (\"fla\") and as "
          "fla's RWKV-7 layer calls it (\"fla-layer\": chunk_size=64, safe_gate=True, "
          "lower_bound=-exp(-0.5)); scale=1.0 in both.",
    shapes=((8, 4096, 32, 64), (16, 1024, 12, 64), (2, 16384, 32, 64)),
    input_names=("r", "log_w", "k", "v", "a", "b", "state"),
    make_inputs=wkv7_inputs,
    fla=wkv7_fla,
    settings=dict(chunk_size=int, block_v=int, num_warps=int, bwd_block_v=int, bwd_num_warps=int,
                  scan_block_v=int, scan_num_warps=int, scan_segments=int, bwd_scan_block_v=int,
                  bwd_scan_segments=int, precision=PRECISIONS, scan_precision=PRECISIONS,
                  saved_dtype=("float32", "bfloat16")),
    sweep_configs=wkv7_sweep_configs,
)


# --- WKV-6 ------------------------------------------------------------------------------------


def wkv6_inputs(B, T, H, N, *, dtype, logw_dtype, device="cuda", seed=0, decay="realistic"):
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
    return rounded([r, log_w, k, v, u], dtype, logw_dtype), randn(B, H, N, N) * 0.1


def wkv6_fla():
    """fla's chunk_rwkv6 at its defaults (chunk 64)."""
    chunk_rwkv6, fla_version = import_fla("rwkv6", "chunk_rwkv6")
    if chunk_rwkv6 is None:
        return {}, fla_version

    def fn(xs, s0):
        r, lw, k, v, u = xs
        o, s = chunk_rwkv6(
            r=r, k=k, v=v, w=lw, u=u, scale=1.0, output_final_state=True,
            initial_state=None if s0 is None else s0.transpose(-1, -2).contiguous(),
        )
        return o, s.transpose(-1, -2)  # fla's state is [B, H, K, V]

    return {"fla": fn}, f"{fla_version}: chunk_rwkv6(w=log_w, scale=1.0), chunk 64"


def wkv6_sweep_configs(quick: bool) -> list[dict]:
    """impl "blocks": chunk size (the stored states) and block_t with the chunk kernels' blocks
    and warps (the backward walks at most 32-row blocks); impl "chunks" (whole-chunk kernels,
    forward and backward, the default at chunks up to 64; then each with the other's "blocks")
    with its key block and warps; then the elementwise scans' rows of the state per program and
    warps at the default chunk (the knobs are largely independent: read the per-kernel times)."""
    configs = []
    for C in (32, 64, 128):
        for bt in (16, 32, 64):
            for bv, w in ((64, 8), (64, 4), (32, 8), (32, 4), (16, 8)):
                if bt > C or quick and (C, bt, bv, w) not in {
                        (64, 16, 64, 8), (64, 16, 64, 4), (64, 16, 32, 4), (32, 16, 64, 4), (128, 16, 64, 4),
                        (64, 32, 64, 4), (64, 64, 32, 4)}:
                    continue
                configs.append(dict(chunk_size=C, impl="blocks", bwd_impl="blocks", block_t=bt, block_v=bv,
                                    num_warps=w, bwd_block_v=bv, bwd_num_warps=w))
    for C in (32, 64):
        for bk in (16, 32, 64):
            for w in (4, 8):
                if quick and (C, bk) not in {(64, 32), (64, 16), (64, 64), (32, 32)}:
                    continue
                configs.append(dict(chunk_size=C, impl="chunks", bwd_impl="chunks", block_k=bk, bwd_block_k=bk,
                                    num_warps=w, bwd_num_warps=w))
    configs.append(dict(impl="chunks", bwd_impl="blocks"))  # forward "chunks", the backward "blocks"
    configs.append(dict(impl="blocks", bwd_impl="chunks"))  # the reverse
    for sb, sw in ((4, 4), (8, 4), (32, 4), (16, 8)):
        configs.append(dict(scan_block=sb, scan_num_warps=sw))
    return configs


WKV6 = WkvOp(
    name="wkv6",
    title="WKV-6",
    notes="WKV-6: RWKV-6-like decays (log w = -exp(time_decay + lora), time_decay in [-6, -1]); "
          "fla.ops.rwkv6.chunk_rwkv6 at its defaults (chunk 64), scale=1.0. The accuracy is "
          "measured twice, with realistic decays and with sporadic log w = -1e4 (\"mixed\"): "
          "the JSON's accuracy is keyed by these first.",
    shapes=((8, 4096, 32, 64), (16, 1024, 12, 64)),
    input_names=("r", "log_w", "k", "v", "u", "state"),
    make_inputs=wkv6_inputs,
    fla=wkv6_fla,
    settings=dict(chunk_size=int, block_t=int, block_v=int, num_warps=int, bwd_block_v=int, bwd_num_warps=int,
                  scan_block=int, scan_num_warps=int, precision=PRECISIONS, impl=("blocks", "chunks"),
                  bwd_impl=("blocks", "chunks"), block_k=int, bwd_block_k=int),
    sweep_configs=wkv6_sweep_configs,
    accuracy_decays=("realistic", "mixed"),
)

OPS = {op.name: op for op in (WKV7, WKV6)}


# --- our implementations ----------------------------------------------------------------------


@functools.cache
def load_ops(name: str):
    """(<name>_chunked, <name>_triton) of the op. Falls back to loading the op files alone
    when the package's own imports fail (a GPU box with torch and triton but without
    numpy/safetensors/tqdm): they need only torch and triton."""
    try:
        import rwkvkit.ops

        kernels = importlib.import_module(f"rwkvkit.ops.triton.{name}")
        return getattr(rwkvkit.ops, f"{name}_chunked"), getattr(kernels, f"{name}_triton")
    except ImportError as e:
        print(f"# rwkvkit import failed ({e}); loading ops/chunked.py and ops/triton/{name}.py alone")
        ops_dir = Path(__file__).resolve().parents[1] / "src" / "rwkvkit" / "ops"

        def load(module_name, path):
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            return module

        chunked = load(f"bench_{name}_chunked", ops_dir / "chunked.py")
        kernels = load(f"bench_{name}_triton", ops_dir / "triton" / f"{name}.py")
        return getattr(chunked, f"{name}_chunked"), getattr(kernels, f"{name}_triton")


def ours_fn(op: WkvOp, cfg: dict):
    kernel = load_ops(op.name)[1]
    kw = {k: getattr(torch, v) if k.endswith("_dtype") and isinstance(v, str) else v  # "bfloat16" -> torch.bfloat16
          for k, v in cfg.items()}
    return lambda xs, s0: kernel(*xs, s0, **kw)


def chunked_fn(op: WkvOp):
    chunked = load_ops(op.name)[0]
    return lambda xs, s0: chunked(*xs, s0)


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


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
    """Minimal traffic of the backward alone: read the inputs and dy, write a gradient of each
    input, read dS_T, write dS_0 (intermediate chunk states not counted)."""
    inputs = sum(x.numel() * x.element_size() for x in xs)
    dy = xs[3].numel() * xs[3].element_size()
    return 2 * inputs + dy + 2 * s0.numel() * 4


def kernel_times(fn, xs, s0, reps: int = 5) -> dict[str, float]:
    """Forward + backward under the profiler: mean CUDA time (ms) per call of each kernel."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [x.detach().requires_grad_() for x in xs]
    s_leaf = s0.detach().requires_grad_()

    def run():
        for x in leaves + [s_leaf]:  # (as the timings: no accumulation into earlier gradients)
            x.grad = None
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


def time_shapes(op: WkvOp, impls: dict, shapes, dtype, logw_dtype, bw: float, *, profile: bool):
    """Yields a row per (shape, implementation) as it is measured: forward and forward+backward
    ms, the floors, and with ``profile`` the time of every kernel."""
    for shape in shapes:
        B, T, H, N = shape
        xs, s0 = op.make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
        fb = forward_bytes(xs, s0, dtype)
        names = dict(impls)
        if B * T * H <= CHUNKED_MAX_TOKENS:
            names["chunked"] = chunked_fn(op)
        for name, fn in names.items():
            row = {"shape": shape, "impl": name}
            for pas, timer in (("fwd_ms", time_forward), ("fwdbwd_ms", time_forward_backward)):
                try:
                    row[pas] = timer(fn, xs, s0)
                except Exception as e:  # noqa: BLE001
                    row[pas + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc(limit=2)
                torch.cuda.empty_cache()
            if profile:
                try:
                    row["kernels_ms"] = {k: round(v, 4) for k, v in kernel_times(fn, xs, s0).items() if v > 0.005}
                    print(f"# {name} {shape} kernels (ms per fwd+bwd):", json.dumps(row["kernels_ms"]))
                except Exception as e:  # noqa: BLE001
                    row["kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["fwd_floor_ms"] = fb / bw * 1e3
            row["fwd_bytes"] = fb
            row["fwdbwd_floor_ms"] = (fb + backward_bytes(xs, s0)) / bw * 1e3
            yield row
        del xs, s0
        torch.cuda.empty_cache()


def print_table(rows: list[dict], shapes) -> None:
    """One line per (shape, implementation); with --profile also the ratio of the kernels' own
    times per forward+backward (summed), which host overheads between launches do not enter."""
    profiled = any("kernels_ms" in r for r in rows)
    print(f"\n{'shape (B,T,H,N)':22s} {'impl':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd floor':>10s}"
          f" {'ours/floor':>10s} {'impl/ours fwd':>14s} {'impl/ours f+b':>14s}"
          + (f" {'kernels f+b':>12s} {'impl/ours kern':>15s}" if profiled else ""))
    def with_sum(row: dict) -> dict:  # a copy: the rows go to the JSON as measured
        return {**row, "kernels_sum_ms": sum(row["kernels_ms"].values())} if "kernels_ms" in row else row

    for shape in shapes:
        mine = with_sum(next((r for r in rows if r["shape"] == shape and r["impl"] == "ours"), {}))
        for r in (with_sum(r) for r in rows if r["shape"] == shape):

            def ratio(key):
                return f"{r[key] / mine[key]:.2f}" if key in r and key in mine else "-"

            def ms(key):
                return f"{r[key]:.3f}" if key in r else "error"

            line = (f"{str(shape):22s} {r['impl']:10s} {ms('fwd_ms'):>9s} {ms('fwdbwd_ms'):>11s} "
                    f"{r['fwd_floor_ms']:>10.3f} {(mine.get('fwd_ms', float('nan')) / r['fwd_floor_ms']):>10.2f} "
                    f"{ratio('fwd_ms'):>14s} {ratio('fwdbwd_ms'):>14s}")
            if profiled:
                line += f" {ms('kernels_sum_ms') if 'kernels_sum_ms' in r else '-':>12s} {ratio('kernels_sum_ms'):>15s}"
            print(line)


# --- accuracy ---------------------------------------------------------------------------------


def accuracy(op: WkvOp, impls: dict, shape, dtype, logw_dtype, **input_kw) -> dict:
    """Relative errors of y, final state and all gradients against the float32 chunked form
    (autograd) on the same rounded inputs."""
    chunked = load_ops(op.name)[0]
    xs, s0 = op.make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype, seed=1, **input_kw)
    ref_in = [x.float().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
    y_ref, s_ref = chunked(*ref_in)
    gy, gs = torch.randn_like(y_ref), torch.randn_like(s_ref)
    ref_grads = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), ref_in)
    out = {}
    for name, fn in impls.items():
        try:
            leaves = [x.detach().requires_grad_() for x in xs] + [s0.clone().requires_grad_()]
            y, s = fn(leaves[:-1], leaves[-1])
            grads = torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), leaves, allow_unused=True)
            errs = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)}
            for n, g, g_ref in zip(op.input_names, grads, ref_grads):
                errs["d" + n] = float("nan") if g is None else rel_err(g, g_ref)
            errs["finite"] = bool(torch.isfinite(y).all() and all(g is None or torch.isfinite(g).all() for g in grads))
            out[name] = errs
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def report_accuracy(op: WkvOp, impls: dict, dtype_name: str, dtype, logw_dtype, report: dict) -> None:
    """report["accuracy"]: {impl: errors}, or {decay: {impl: errors}} for an op with
    accuracy_decays; printed as it goes."""
    report["accuracy_shape"] = ACCURACY_SHAPE
    for decay in op.accuracy_decays or (None,):
        input_kw = {} if decay is None else {"decay": decay}
        acc = accuracy(op, dict(impls), ACCURACY_SHAPE, dtype, logw_dtype, **input_kw)
        if decay is None:
            report["accuracy"] = acc
        else:
            report.setdefault("accuracy", {})[decay] = acc
        print(f"\n# relative error vs float32 chunked form at {ACCURACY_SHAPE}, {dtype_name} inputs"
              + ("" if decay is None else f", {decay} decays"))
        for name, errs in acc.items():
            print(f"  {name:10s} " + "  ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in errs.items()))


# --- sweep ------------------------------------------------------------------------------------


def warm(op: WkvOp, configs, argv: list[str]) -> None:
    """Compile every config's kernels in parallel processes (a small forward + backward
    each): Triton caches the binaries on disk, so the timing loop only loads them."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, "--op", op.name, "--warm-config", json.dumps(c), *argv])
             for c in configs]
    for pr in procs:
        pr.wait()


def warm_one(op: WkvOp, cfg: dict, shape, dtype, logw_dtype) -> None:
    fn = ours_fn(op, cfg)
    xs, s0 = op.make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
    with torch.no_grad():  # (first: a forward-only config still compiles its forward)
        fn(xs, s0)
    xs = [x.requires_grad_() for x in xs]
    y, s = fn(xs, s0.requires_grad_())
    torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
    torch.cuda.synchronize()


def sweep(op: WkvOp, shape, dtype, logw_dtype, configs) -> list[dict]:
    """Each config: forward and forward+backward times, and the time of every kernel."""
    xs, s0 = op.make_inputs(*shape, dtype=dtype, logw_dtype=logw_dtype)
    rows = []
    for cfg in configs:
        row = dict(cfg)
        fn = ours_fn(op, cfg)
        try:
            row["fwd_ms"] = time_forward(fn, xs, s0)
            row["fwdbwd_ms"] = time_forward_backward(fn, xs, s0)
            row["kernels_ms"] = {k: round(v, 4) for k, v in kernel_times(fn, xs, s0).items() if v > 0.005}
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print("  ", json.dumps(row), flush=True)
    return rows


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[WkvOp, argparse.Namespace]:
    """The op first (--op, or --wkv6), then the flags, with that op's kernel settings."""
    op_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    op_parser.add_argument("--op", choices=list(OPS), default="wkv7",
                           help="the recurrence: wkv7 (RWKV-7) or wkv6 (RWKV-5.2/6); its kernel settings "
                                "are listed when --help follows it (default: %(default)s)")
    op_parser.add_argument("--wkv6", action="store_true", help="the same as --op wkv6")
    known, _ = op_parser.parse_known_args(argv)
    op = OPS["wkv6" if known.wkv6 else known.op]

    p = argparse.ArgumentParser(description=__doc__, epilog=textwrap.fill(op.notes, 92), parents=[op_parser],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in op.shapes),
                   help="B,T,H,N;B,T,H,N;... (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--logw-fp32", action="store_true", help="log_w in float32 (as rwkvkit's layer passes it)")
    settings = p.add_argument_group(f"{op.title} kernel settings (keywords of {op.name}_triton; default: its own)")
    for name, kind in op.settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(kind, tuple):
            settings.add_argument(flag, default=None, choices=kind)
        else:
            settings.add_argument(flag, type=kind, default=None)
    p.add_argument("--profile", action="store_true", help="print the time of every kernel (ours, fla) at each shape")
    p.add_argument("--also", metavar="JSON", action="append", default=[],
                   help="also time ours with these settings over the others, as its own row "
                        "(e.g. --also '{\"saved_dtype\": \"float32\"}'; repeatable; not with --sweep)")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--sweep", action="store_true", help="sweep kernel configs at the first shape, then exit")
    p.add_argument("--sweep-full", action="store_true", help="with --sweep: every config, not a short list")
    p.add_argument("--sweep-only", metavar="TEXT[,TEXT]",
                   help="with --sweep: only the configs whose JSON contains one of these strings "
                        "(e.g. --op wkv6 --sweep-only chunks: the whole-chunk kernels' rows)")
    p.add_argument("--warm-config", help=argparse.SUPPRESS)
    return op, p.parse_args(argv)


def main(argv=None) -> int:
    op, args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available():
        print(f"bench_wkv ({op.name}): needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    dtype = DTYPES[args.dtype]
    logw_dtype = torch.float32 if args.logw_fp32 else dtype
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    cfg = {k: getattr(args, k) for k in op.settings if getattr(args, k) is not None}

    props = torch.cuda.get_device_properties(0)
    report = {
        "op": op.name, "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "dtype": args.dtype,
        "logw_dtype": str(logw_dtype).replace("torch.", ""), "ours_config": cfg,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"# {op.title} on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))

    if args.warm_config:
        warm_one(op, json.loads(args.warm_config), (1, 512, 4, shapes[0][3]), dtype, logw_dtype)
        return 0
    if args.sweep and args.also:
        print("bench_wkv: --also does not combine with --sweep", file=sys.stderr)
        return 2
    if args.sweep:
        configs = op.sweep_configs(not args.sweep_full)
        if args.sweep_only:
            keep = [t for t in args.sweep_only.split(",") if t]
            configs = [c for c in configs if any(t in json.dumps(c) for t in keep)]
        t0 = time.perf_counter()
        warm(op, configs, ["--dtype", args.dtype, "--shapes", ",".join(map(str, shapes[0]))]
             + (["--logw-fp32"] if args.logw_fp32 else []))
        print(f"# compiled {len(configs)} configs in parallel in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"# sweep at {shapes[0]}: {len(configs)} configs")
        report["sweep_shape"] = shapes[0]
        report["sweep"] = sweep(op, shapes[0], dtype, logw_dtype, configs)
        for pas in ("fwd_ms", "fwdbwd_ms"):
            ok = sorted((r for r in report["sweep"] if pas in r), key=lambda r: r[pas])
            print(f"# best {pas}:", *(f"\n   {r[pas]:.3f} ms  {r}" for r in ok[:3]))
        save()
        return 0

    bw = measure_bandwidth()
    report["bandwidth_GBps"] = bw / 1e9
    print(f"# measured copy bandwidth: {bw / 1e9:.0f} GB/s")

    impls = {"ours": ours_fn(op, cfg)}
    for i, extra in enumerate(args.also):
        impls[f"ours+{i + 1}"] = ours_fn(op, {**cfg, **json.loads(extra)})
    report["also"] = args.also
    fla, fla_note = ({}, "skipped (--no-fla)") if args.no_fla else op.fla()
    impls.update(fla)
    report["fla"] = fla_note
    print(f"# {fla_note}")

    rows = report["results"] = []
    for row in time_shapes(op, impls, shapes, dtype, logw_dtype, bw, profile=args.profile):
        rows.append(row)
        save()
    print_table(rows, shapes)
    if not args.no_accuracy:
        report_accuracy(op, impls, args.dtype, dtype, logw_dtype, report)
    save()
    if args.out:
        print(f"\n# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
