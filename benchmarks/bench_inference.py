"""Inference speed: rwkvkit against the reference ``rwkv`` package, same checkpoint, one run.

    python benchmarks/bench_inference.py                     # random RWKV-7 L12 D768 V65536, CPU
    python benchmarks/bench_inference.py --layers 4 --width 256 --vocab 8192   # a smaller one
    python benchmarks/bench_inference.py --model RWKV-x070-World-0.1B-...pth
    python benchmarks/bench_inference.py --floor             # this machine's GEMM/GEMV/bandwidth
    python benchmarks/bench_inference.py --long 100000       # peak memory of a 100k-token prefill
    python benchmarks/bench_inference.py --device cuda       # the GPU table

CPU: ours with float32, bfloat16 and int8 weights (``load_model(dtype=..., quantize=...)``)
against the reference at ``cpu fp32`` with RWKV_JIT_ON=1. GPU: ours with bf16 and fp16
weights, decoding through a CUDA graph (what generation uses) and eagerly, against the
reference at ``cuda fp16`` with RWKV_CUDA_ON=1 (its CUDA kernel, built with nvcc and ninja at
import; without it if that fails, which the label says). Prefill tokens/s at T=--prefill
(batch 1, last logits only) and decode tokens/s at batch 1 (one token per call; ours through
``model.step_`` or its CUDA graph), each the median of --repeats runs taken in turns
(reference, ours, ours, ..., reference, ...) so that a change of load on a shared machine
hits every system alike; then our batched decoding throughput against the memory-bandwidth
bound (measured read bandwidth / bytes per step), and on a GPU prefill throughput at larger
shapes against the matrix-product ceiling (measured). Ratios are ours / reference from this
run. ``--out FILE`` writes everything as JSON.

The random checkpoint comes from ``tests/official_files.py`` (official keys and shapes, bf16
storage like the released files) and is written to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from rwkvkit import load_model  # noqa: E402
from rwkvkit.benchmark import (  # noqa: E402
    device_name, matmul_flops, prefill_flops_per_token, read_bandwidth, seconds, start_decoding, time_decode,
    time_prefill, weight_bytes_per_token,
)
from rwkvkit.cuda_graphs import GraphedStep  # noqa: E402

LORA = {768: (64, 64, 32, 128), 256: (32, 32, 32, 64)}


def make_checkpoint(directory: Path, layers: int, width: int, vocab: int) -> Path:
    from official_files import make_rwkv7_state_dict

    lora = LORA.get(width, (32, 32, 32, 64))
    sd = make_rwkv7_state_dict(n_layer=layers, n_embd=width, head_size=64, vocab_size=vocab, lora=lora,
                               dtype=torch.bfloat16)
    path = directory / f"rwkv7-L{layers}-D{width}-V{vocab}.pth"
    torch.save(sd, path)
    return path


# -- the systems under test -------------------------------------------------------------------
@contextlib.contextmanager
def fused_step(on: bool):
    """RWKVKIT_FUSED_STEP (the one-kernel RWKV-7 time-mix step on CUDA) set for the block."""
    old = os.environ.get("RWKVKIT_FUSED_STEP")
    os.environ["RWKVKIT_FUSED_STEP"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["RWKVKIT_FUSED_STEP"]
        else:
            os.environ["RWKVKIT_FUSED_STEP"] = old


class Ours:
    """One of our set-ups: a loaded model, decoding eagerly or through a CUDA graph
    (``graphs``), with or without the fused time-mix step (``fused``); ``prefill`` says
    whether its prefill is timed (twins of one model prefill alike, so only one of them is)."""

    def __init__(self, label: str, model: torch.nn.Module, *, graphs: bool = False, prefill: bool = True,
                 fused: bool = True) -> None:
        self.label, self.model, self.graphs, self.prefill, self.fused = label, model, graphs, prefill, fused
        self.device = model.device

    def prefill_seconds(self, tokens: torch.Tensor) -> float:
        return time_prefill(self.model, tokens if tokens.dim() == 2 else tokens[None], cuda_graphs=self.graphs)

    def decode_setup(self, batch_size: int = 1):
        state = start_decoding(self.model, batch_size)
        with fused_step(self.fused):  # a graph keeps the kernels it was captured with
            return state, (GraphedStep(self.model, state) if self.graphs else None)

    def decode_seconds(self, setup, tokens: torch.Tensor) -> float:
        state, graph = setup
        with fused_step(self.fused):
            return time_decode(self.model, state, tokens[:, None] if tokens.dim() == 1 else tokens, graph=graph)


class Reference:
    """The ``rwkv`` package in this process (its switches are read at import)."""

    def __init__(self, path: Path, device: str) -> None:
        os.environ["RWKV_V7_ON"] = "1"
        os.environ["RWKV_JIT_ON"] = "1"
        cuda = device.startswith("cuda")
        self.label = "reference (rwkv 0.8.32, " + ("cuda fp16" if cuda else "cpu fp32") + ")"
        self.device = torch.device(device)
        self.kernel = False
        self.prefill = True
        # The package turns on TF32 matrix products and cuDNN autotuning for the whole
        # process when it is imported; ours are put back afterwards.
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        for cuda_kernel in ([True, False] if cuda else [False]):
            os.environ["RWKV_CUDA_ON"] = "1" if cuda_kernel else "0"
            for name in [m for m in sys.modules if m == "rwkv.model"]:
                del sys.modules[name]
            try:
                from rwkv.model import RWKV

                self.model = RWKV(model=str(path)[: -len(".pth")], strategy="cuda fp16" if cuda else "cpu fp32")
                self.kernel = cuda_kernel
                break
            except Exception as exc:  # noqa: BLE001 - the CUDA kernel may not compile here
                if not cuda_kernel:
                    raise
                print(f"# reference CUDA kernel unavailable ({type(exc).__name__}: {str(exc)[:120]}); using RWKV_CUDA_ON=0")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
        if cuda:
            self.label += ", CUDA kernel" if self.kernel else ", no CUDA kernel"

    def prefill_seconds(self, tokens: torch.Tensor) -> float:
        ids = tokens.tolist()
        return seconds(lambda: self.model.forward(ids, None), self.device)

    def decode_setup(self, batch_size: int = 1):
        _, state = self.model.forward(list(range(1, 17)), None)
        return [state]

    def decode_seconds(self, holder, tokens: torch.Tensor) -> float:
        ids = tokens.tolist()

        def run() -> None:
            for t in ids:
                _, holder[0] = self.model.forward([t], holder[0])

        return seconds(run, self.device)


# -- measurements -----------------------------------------------------------------------------
def in_turns(systems, make_run, repeats: int) -> dict[str, float]:
    """Median seconds per system; every round runs each system once, in turn."""
    runs = {s.label: make_run(s) for s in systems}
    for run in runs.values():
        run()  # warm-up (JIT, allocator, caches)
        run()  # prefill graphs are captured on a length's second use
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            times[label].append(run())
    return {label: statistics.median(ts) for label, ts in times.items()}


def compare(systems, args) -> dict:
    prompt = torch.randint(1, args.vocab_size, (args.prefill,), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(1, args.vocab_size, (args.steps,), generator=torch.Generator().manual_seed(1))
    timed = [s for s in systems if s.prefill]
    prefill = in_turns(timed, lambda s: (lambda: s.prefill_seconds(prompt)), args.repeats)

    def decode_run(s):
        state = s.decode_setup()
        return lambda: s.decode_seconds(state, steps)

    decode = in_turns(systems, decode_run, args.repeats)
    return {
        s.label: {"prefill_tokens_per_s": args.prefill / prefill[s.label] if s.label in prefill else None,
                  "decode_tokens_per_s": args.steps / decode[s.label]}
        for s in systems
    }


def batched(ours: list[Ours], batch_sizes: list[int], args) -> dict:
    out = {}
    for system in ours:
        row = {}
        for B in batch_sizes:
            setup = system.decode_setup(B)
            # A CPU step grows with the batch; a GPU step hardly does at small batches.
            steps = args.steps if system.device.type == "cuda" else max(4, args.steps * 4 // max(B, 4))
            ids = torch.randint(1, args.vocab_size, (steps, B), generator=torch.Generator().manual_seed(2))
            system.decode_seconds(setup, ids[:2])
            t = statistics.median(system.decode_seconds(setup, ids) for _ in range(args.repeats))
            row[B] = B * steps / t
            del setup
        out[system.label] = row
    return out


def prefill_shapes(ours: list[Ours], shapes: list[tuple[int, int]], args) -> dict:
    """Prefill tokens/s at each (batch, length), through ``generation.prefill`` (its default
    chunks, last logits only), with CUDA graphs or eagerly as the system says."""
    out = {}
    for system in ours:
        row = {}
        for B, T in shapes:
            tokens = torch.randint(1, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
            for _ in range(2):  # the second call captures the prefill graphs
                system.prefill_seconds(tokens)
            t = statistics.median(system.prefill_seconds(tokens) for _ in range(args.repeats))
            row[f"{B}x{T}"] = B * T / t
        out[system.label] = row
    return out


def floor(args) -> dict:
    """GEMM GFLOP/s at prefill shapes, cold GEMV Gparam/s (weights streamed from memory, as in
    decoding), read bandwidth; and the decode tokens/s they predict for the checkpoint size."""
    from rwkvkit.quantize import Int8Linear

    C, L, V = args.width, args.layers, args.vocab_size
    shapes = [(C, C)] * 4 + [(4 * C, C), (C, 4 * C)]
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(n, k, generator=g) * k**-0.5 for _ in range(L) for n, k in shapes]
    params = sum(m.numel() for m in mats)
    result = {"read_bandwidth_GBps": read_bandwidth(torch.device("cpu")) / 1e9, "gemm_GFLOPs": {}, "gemv_Gparams": {}}

    def linear_for(kind):
        if kind == "int8":
            layers = []
            for m in mats:
                lin = torch.nn.Linear(m.shape[1], m.shape[0], bias=False)
                lin.weight.data = m
                layers.append(Int8Linear.from_linear(lin))
            return [(lambda x, layer=layer: layer(x)) for layer in layers], torch.float32
        dt = torch.float32 if kind == "fp32" else torch.bfloat16
        ws = [m.to(dt) for m in mats]
        return [(lambda x, w=w: torch.nn.functional.linear(x, w)) for w in ws], dt

    for kind in ("fp32", "bf16", "int8"):
        fns, dt = linear_for(kind)
        for M, key, store in ((1, "gemv", "gemv_Gparams"), (args.prefill, "gemm", "gemm_GFLOPs")):
            xs = [torch.randn(M, m.shape[1]).to(dt) for m in mats]

            def run():
                for fn, x in zip(fns, xs):
                    fn(x)

            run()
            t = statistics.median(seconds(run, torch.device("cpu")) for _ in range(args.repeats))
            result[store][kind] = params / t / 1e9 if M == 1 else 2 * params * M / t / 1e9
    # Decoding reads the matrices above, the head (C x V) and the low-rank matrices, which
    # stay float32 under int8 (4 bytes where the matrices take 1), bf16 under bf16.
    lora = L * C * 2 * sum(LORA.get(C, (32, 32, 32, 64)))
    lora_weight = {"fp32": 1, "bf16": 1, "int8": 4}
    result["predicted_decode_tokens_per_s"] = {
        kind: 1e9 * rate / (params + C * V + lora * lora_weight[kind]) for kind, rate in result["gemv_Gparams"].items()
    }
    return result


def long_prefill(args) -> dict:
    """Peak resident memory of prefilling --long tokens on a small model (L4 D256 V8192),
    against prefilling one chunk, each in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), 4, 256, 8192)
        for n in (args.chunk, args.long):
            code = f"""
import resource, sys, time, torch
sys.path.insert(0, {str(ROOT / 'src')!r})
torch.set_num_threads({torch.get_num_threads()})
from rwkvkit import load_model
from rwkvkit.generation import prefill
model = load_model({str(path)!r})
prefill(model, [1] * {args.chunk}, chunk_len={args.chunk})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = torch.randint(1, 8192, (1, {n}))
t = time.perf_counter()
prefill(model, tokens, chunk_len={args.chunk})
t = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak, t)
"""
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            base, peak, t = res.stdout.split()
            unit = 1 if sys.platform == "darwin" else 1024
            out[n] = {"peak_rss_MB": int(peak) * unit / 1e6, "growth_MB": (int(peak) - int(base)) * unit / 1e6,
                      "tokens_per_s": n / float(t)}
    return out


# -- output -----------------------------------------------------------------------------------
def print_comparison(res: dict, ref_label: str | None, args) -> None:
    ref = res.get(ref_label) if ref_label else None

    def ratio(r, key):
        return f"{r[key] / ref[key]:.2f}" if ref and r[key] and ref[key] else "-"

    print(f"\n| system | prefill T={args.prefill} tokens/s | x ref | decode batch 1 tokens/s | x ref |")
    print("|---|---|---|---|---|")
    for label, r in res.items():
        prefill = f"{r['prefill_tokens_per_s']:,.1f}" if r["prefill_tokens_per_s"] else "(as above)"
        print(f"| {label} | {prefill} | {ratio(r, 'prefill_tokens_per_s')} "
              f"| {r['decode_tokens_per_s']:,.1f} | {ratio(r, 'decode_tokens_per_s')} |")


def decode_bound(batch: int, weight_bytes: int, state_bytes: int, bandwidth: float) -> float:
    """Tokens/s if a step only read the weights once and read and wrote each row's state."""
    return batch * bandwidth / (weight_bytes + 2 * state_bytes * batch)


def print_batched(res: dict, sizes_bytes: dict, bandwidth: float) -> None:
    sizes = list(next(iter(res.values())))
    print("\n| ours: decode tokens/s (share of the bandwidth bound) at batch | " + " | ".join(str(b) for b in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for label, row in res.items():
        w, st = sizes_bytes[label]
        print(f"| {label} | " + " | ".join(f"{row[b]:,.0f} ({row[b] / decode_bound(b, w, st, bandwidth):.0%})" for b in sizes) + " |")
    for label, (w, st) in sizes_bytes.items():
        if "eager" not in label:
            print(f"| bound, {label.split(',')[0]} ({w / 1e6:,.0f} MB weights, {st / 1e6:.1f} MB state/row) | "
                  + " | ".join(f"{decode_bound(b, w, st, bandwidth):,.0f}" for b in sizes) + " |")
    graphs = [label for label in res if "CUDA graph" in label]
    for label in graphs:
        eager = label.replace("CUDA graph", "eager")
        if eager in res:
            print(f"| {label.split(',')[0]}: graph / eager | " + " | ".join(f"{res[label][b] / res[eager][b]:.1f}x" for b in sizes) + " |")


def print_prefill(res: dict, flops_per_token: int, ceiling: dict) -> None:
    shapes = list(next(iter(res.values())))
    print("\n| ours: prefill tokens/s (share of the matrix-product ceiling) at batch x length | " + " | ".join(shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for label, row in res.items():
        peak = ceiling[label.split(",")[0]]
        print(f"| {label} | " + " | ".join(f"{row[s]:,.0f} ({row[s] * flops_per_token / peak:.0%})" for s in shapes) + " |")
    print(f"({flops_per_token / 1e6:,.0f} MFLOP per token in the block matrices; ceilings: "
          + ", ".join(f"{k} {v / 1e12:,.0f} TFLOP/s" for k, v in ceiling.items()) + ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="an RWKV-7 .pth (default: a random one)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--prefill", type=int, default=512, help="prompt length (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="decoded tokens per run (default: 32 on CPU, 64 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure, median (default: 5 on CPU, 3 on CUDA)")
    p.add_argument("--batch", default=None, help="batch sizes for our batched decoding "
                   "(default: 1,2,4,8,16,32,64 on CPU; 1,2,4,...,256 on CUDA)")
    p.add_argument("--prefill-shapes", default="1x512,1x1000,1x4096,8x4096",
                   help="CUDA: prefill throughput at these batch x length shapes (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="skip the rwkv package")
    p.add_argument("--floor", action="store_true", help="only measure GEMM/GEMV/bandwidth (CPU)")
    p.add_argument("--long", type=int, default=0, metavar="T", help="only measure a T-token prefill's peak memory")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk length for --long (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_inference: --device cuda but CUDA is not available")
    gpu = device.type == "cuda"
    args.steps = args.steps or (64 if gpu else 32)
    args.repeats = args.repeats or (3 if gpu else 5)
    report = {"device": device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "argv": sys.argv[1:]}
    print(f"# {report['device']}, torch {torch.__version__}, {report['date']}")

    args.vocab_size = args.vocab
    if args.floor:
        report["floor"] = floor(args)
        print(json.dumps(report["floor"], indent=2))
    elif args.long:
        report["long"] = long_prefill(args)
        for n, r in report["long"].items():
            print(f"prefill {n:>8} tokens (chunks of {args.chunk}): peak RSS {r['peak_rss_MB']:,.0f} MB, "
                  f"growth over one chunk {r['growth_MB']:,.1f} MB, {r['tokens_per_s']:,.0f} tokens/s")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.model or make_checkpoint(Path(tmp), args.layers, args.width, args.vocab)
            if gpu:
                ours = []
                for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                    model = load_model(path, device="cuda", dtype=dtype)
                    ours += [Ours(f"ours {name}, CUDA graph", model, graphs=True),
                             Ours(f"ours {name}, eager", model, prefill=dtype == torch.bfloat16)]
                    if dtype == torch.bfloat16 and model.arch == "rwkv7":  # RWKVKIT_FUSED_STEP=0: without it
                        ours.append(Ours("ours bf16, CUDA graph, unfused step", model, graphs=True, prefill=False,
                                         fused=False))
                default_batches = ",".join(str(2**i) for i in range(9))
            else:
                ours = [Ours("ours fp32", load_model(path)), Ours("ours bf16", load_model(path, dtype=torch.bfloat16)),
                        Ours("ours int8", load_model(path, quantize="int8"))]
                default_batches = "1,2,4,8,16,32,64"
            args.vocab_size = ours[0].model.config.vocab_size
            cfg = ours[0].model.config
            report["model"] = f"{cfg.arch} L{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size}" + (f" ({args.model})" if args.model else " (random)")
            print(f"# model {report['model']}, prefill T={args.prefill}, {args.steps} decode steps, median of {args.repeats}")
            systems = list(ours)
            if not args.no_reference:
                systems.insert(0, Reference(path, args.device))
            report["compare"] = compare(systems, args)
            print_comparison(report["compare"], None if args.no_reference else systems[0].label, args)
            bandwidth = read_bandwidth(device)
            sizes_bytes = {o.label: (weight_bytes_per_token(o.model), o.model.state_nbytes(1)) for o in ours}
            batch_sizes = [int(b) for b in (args.batch or default_batches).split(",")]
            report["batched"] = batched(ours, batch_sizes, args)
            report["bandwidth_GBps"] = bandwidth / 1e9
            report["weight_and_state_bytes"] = sizes_bytes
            report["decode_bound_tokens_per_s"] = {
                label: {b: decode_bound(b, w, st, bandwidth) for b in batch_sizes} for label, (w, st) in sizes_bytes.items()
            }
            print(f"\nread bandwidth {bandwidth / 1e9:,.0f} GB/s; the decode bound is batch x bandwidth / "
                  "(weights + every row's state read and written)")
            print_batched(report["batched"], sizes_bytes, bandwidth)
            if gpu:
                shapes = [tuple(int(n) for n in s.split("x")) for s in args.prefill_shapes.split(",") if s]
                timed = [o for o in ours if o.prefill]
                report["prefill"] = prefill_shapes(timed, shapes, args)
                flops = prefill_flops_per_token(ours[0].model)
                ceiling = {o.label.split(",")[0]: matmul_flops(device, o.model.dtype) for o in timed}
                report["prefill_flops_per_token"] = flops
                report["matmul_flops"] = ceiling
                print_prefill(report["prefill"], flops, ceiling)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
