"""Inference speed of a model: prefill and decode tokens/s, batched decoding, and the
memory-bandwidth bound on decoding.

Decoding one token reads every weight once (the embedding only one row) and the state;
at small batches that traffic, not arithmetic, sets the speed, so the bound is
``read bandwidth / bytes per token`` (measured, not a datasheet figure). On a GPU, decoding
is timed through a CUDA graph (:mod:`rwkvkit.cuda_graphs`, what generation uses) and eagerly,
for the ratio; prefill is compute-bound, so :func:`matmul_flops` and
:func:`prefill_flops_per_token` give its bound. ``rwkvkit bench`` prints :func:`measure` for
one model; ``benchmarks/bench_inference.py`` compares several set-ups and the reference
``rwkv`` package in one run.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cuda_graphs import GraphedStep, graph_unsupported_reason
from .generation import prefill
from .quantize import Int8Linear


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one) and
    the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def random_tokens(model: torch.nn.Module, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Token ids drawn uniformly from [1, vocab) (0 is end of text), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, tuple(shape), generator=g)


def time_prefill(model: torch.nn.Module, tokens: torch.Tensor, chunk_len: int | None = None, *,
                 cuda_graphs: bool = True) -> float:
    """Seconds to prefill ``tokens`` [B, T] from the initial state (only the last logits)
    through :func:`~rwkvkit.generation.prefill` (on a GPU through its CUDA graphs, which are
    captured on a length's second use: warm up twice)."""
    return seconds(lambda: prefill(model, tokens, chunk_len=chunk_len, cuda_graphs=cuda_graphs), model.device)


def start_decoding(model: torch.nn.Module, batch_size: int, prompt_len: int = 16, seed: int = 0):
    """A state after a random prompt of ``prompt_len`` tokens per row, ready for ``step_``."""
    _, state = prefill(model, random_tokens(model, (batch_size, prompt_len), seed))
    return state


def time_decode(model: torch.nn.Module, state, tokens: torch.Tensor, *, graph: GraphedStep | None = None) -> float:
    """Seconds to decode ``tokens`` [steps, B] one step at a time with ``model.step_``, or
    by replaying ``graph`` (a :class:`~rwkvkit.cuda_graphs.GraphedStep` captured on
    ``state``); ``state`` advances in place. The ids are fixed in advance and already on the
    device: sampling is not timed."""
    tokens = tokens.to(model.device)
    step = model.step_ if graph is None else graph.step_

    def run() -> None:
        for row in tokens:
            step(row, state)

    return seconds(run, model.device)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter and buffer once (int8
    layers: their int8 weights and scales; int8 RWKV-7 models: the low-rank matrices in the
    int8 copies their decoding step reads), the embedding one row."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            total += module.in_features * module.out_features + 4 * module.out_features
            continue
        products = module.int8_products() if hasattr(module, "int8_products") else None
        int8_copies = products.replaces if products is not None else ()
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None:
                continue
            if pname in int8_copies:
                total += t.numel()  # read as its int8 copy: one byte each (per-row scales negligible)
            elif name == "emb" and pname == "weight":
                total += t.shape[1] * t.element_size()
            else:
                total += t.numel() * t.element_size()
    return total


def prefill_flops_per_token(model: torch.nn.Module) -> int:
    """Multiply-add FLOPs per prompt token in the blocks' matrices (2 per weight; the head
    runs for the last token only, the WKV recurrence is not counted): what bounds prefill."""
    total = 0
    for name, module in model.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(module, Int8Linear):
            total += 2 * module.in_features * module.out_features
            continue
        for p in module.parameters(recurse=False):
            if p.dim() == 2 and min(p.shape) > 1:
                total += 2 * p.numel()
    return total


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 5) -> float:
    """FLOP/s of one large square matrix product in ``dtype`` on ``device`` (the median of
    ``repeats``): the compute ceiling that prefill is compared with."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else torch.Generator().manual_seed(0)
    a = torch.randn(size, size, device=device, generator=g).to(dtype)
    b = torch.randn(size, size, device=device, generator=g).to(dtype)
    a @ b
    times = [seconds(lambda: a @ b, device) for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times)


def read_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second at which the device reads a buffer much larger than its caches
    (the median of ``repeats`` sums over ``nbytes``)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    times = [seconds(x.sum, device) for _ in range(repeats)]
    return nbytes / statistics.median(times)


@dataclass
class BenchResult:
    """What :func:`measure` found for one model."""

    label: str
    prefill_len: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # batch size -> tokens/s
    decode_mode: str = "eager"  # how decode_tokens_per_s was measured: "eager" or "CUDA graph"
    decode_eager_tokens_per_s: dict[int, float] = field(default_factory=dict)  # with CUDA graphs: eager too
    weight_bytes: int = 0
    state_bytes: int = 0  # one row's state (read and written per token)
    bandwidth: float = 0.0  # bytes/s

    def bound(self, batch_size: int = 1) -> float:
        """Decoding tokens/s if only reading the weights (once per step) and the states
        counted: ``batch_size * bandwidth / bytes per step``."""
        per_step = self.weight_bytes + 2 * self.state_bytes * batch_size
        return batch_size * self.bandwidth / per_step if self.bandwidth else float("nan")


def measure(
    model: torch.nn.Module,
    *,
    label: str = "",
    prefill_len: int = 512,
    batch_sizes: Sequence[int] = (1,),
    steps: int = 32,
    repeats: int = 3,
    bandwidth: float | None = None,
    cuda_graphs: bool = True,
) -> BenchResult:
    """Prefill tokens/s at ``prefill_len`` (batch 1) and decode tokens/s at each batch size,
    each the median of ``repeats`` runs after warm-up runs. Where the model can run through
    CUDA graphs (and ``cuda_graphs``), prefill is timed through them, and decoding through
    them and eagerly."""
    device = model.device
    tokens = random_tokens(model, (1, prefill_len))
    for _ in range(2):  # the second call captures the prefill graphs
        time_prefill(model, tokens, cuda_graphs=cuda_graphs)
    t_prefill = statistics.median(time_prefill(model, tokens, cuda_graphs=cuda_graphs) for _ in range(repeats))
    result = BenchResult(
        label=label, prefill_len=prefill_len, prefill_tokens_per_s=prefill_len / t_prefill,
        weight_bytes=weight_bytes_per_token(model), state_bytes=model.state_nbytes(1),
        bandwidth=read_bandwidth(device) if bandwidth is None else bandwidth,
    )
    graphs = cuda_graphs and graph_unsupported_reason(model) is None
    if graphs:
        result.decode_mode = "CUDA graph"
    for B in batch_sizes:
        state = start_decoding(model, B)
        ids = random_tokens(model, (steps, B), seed=1).to(device)
        for graph in ([GraphedStep(model, state)] if graphs else []) + [None]:
            time_decode(model, state, ids[: max(1, steps // 4)], graph=graph)
            t = statistics.median(time_decode(model, state, ids, graph=graph) for _ in range(repeats))
            out = result.decode_tokens_per_s if graph is not None or not graphs else result.decode_eager_tokens_per_s
            out[B] = B * steps / t
    return result


def format_result(result: BenchResult) -> str:
    """A small text table of one :class:`BenchResult`."""
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    lines = [
        f"weights read per token  {mb(result.weight_bytes)} (+ state {mb(result.state_bytes)} read and written per row)",
        f"read bandwidth          {result.bandwidth / 1e9:.1f} GB/s -> decode bound at batch 1: {result.bound(1):.1f} tokens/s",
        f"prefill T={result.prefill_len:<6}       {result.prefill_tokens_per_s:,.1f} tokens/s",
    ]
    for B, tps in result.decode_tokens_per_s.items():
        share = tps / result.bound(B) if result.bandwidth else float("nan")
        line = f"decode batch {B:<4}       {tps:,.1f} tokens/s ({share:.0%} of the bandwidth bound {result.bound(B):,.1f})"
        eager = result.decode_eager_tokens_per_s.get(B)
        if eager:
            line += f", {result.decode_mode}; eager {eager:,.1f} ({tps / eager:.1f}x)"
        lines.append(line)
    return "\n".join(lines) + "\n"
