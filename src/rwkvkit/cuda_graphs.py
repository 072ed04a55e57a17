"""Decoding through CUDA graphs: ``model.step_`` captured once, replayed for every token.

On a GPU, one decoding step of a small model at a small batch is bound by launching its
kernels, not by running them: an RWKV-7 L12 step launches ~700 small kernels, each costing
microseconds of Python, dispatcher and driver time, while the weights it reads take ~0.1 ms
at the card's memory bandwidth. A CUDA graph records the step's kernels once and launches
them all again with one call. ``step_`` is written for this: it updates the state where it
lies (so the state's tensors are the graph's static buffers), its shapes depend only on the
batch size, and it never reads the device back nor branches on tensor values.

Two levels:

* :class:`GraphedStep`: ``model.step_(tokens, state)`` captured on one state's tensors::

      graph = GraphedStep(model, state)     # warm-up and capture; ``state`` is not advanced
      logits = graph.step_(tokens, state)   # the same numbers as model.step_(tokens, state)

  ``logits`` is the graph's static output: the next replay overwrites it.
* :class:`GraphDecoder`: what generation uses. It takes any state of any batch size: the
  rows are copied into a graph whose batch is the next power of two (the padding rows decode
  token 0 and are ignored), and when rows leave the batch (finished sequences) a smaller
  graph takes over once the batch falls to half. Where graphs do not apply (the CPU, models
  whose state is a growing cache, int8 layers) it runs ``model.step_`` itself. Graphs of
  batches up to :data:`CACHED_BATCH_MAX` are kept per model between calls, so repeated
  ``generate`` calls capture once.

PyTorch's rules for capture, and how they are met: warm-up iterations run on a side stream
before capture (cuBLAS handles and workspaces, Triton compilation); the captured region
reads and writes only tensors that outlive the graph (weights, the token buffer, the state;
intermediates come from the graph's private memory pool); nothing in ``step_`` synchronises
with the host. A graph reads the weights where they were at capture: in-place updates (an
optimizer step, ``load_state_dict``) are seen, but a parameter replaced by a new tensor
(``model.to(dtype)``) is not, so capture again after that (generation checks this itself).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Sequence

import torch
from torch import nn

from .errors import CUDAGraphError, InputError, StateError
from .models.recurrent import RWKVModel
from .quantize import Int8Linear
from .state import ModelState, RecurrentState

__all__ = [
    "CACHED_BATCH_MAX",
    "GraphDecoder",
    "GraphedForward",
    "GraphedStep",
    "clear_cache",
    "graph_unsupported_reason",
    "graphed_prefill",
    "prefill_pieces",
]

CACHED_BATCH_MAX = 8
"""Graphs of batches up to this size are kept per model after a generation ends."""

WARMUP_STEPS = 3
"""Eager steps on a side stream before capture (PyTorch's examples use 3)."""


def graph_unsupported_reason(model: nn.Module) -> str | None:
    """None when ``model.step_`` can be captured as a CUDA graph; otherwise why not."""
    if not isinstance(model, RWKVModel):
        arch = getattr(model, "arch", type(model).__name__)
        return f"{arch}: its state is a growing cache, so each step allocates new tensors"
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8 layers (quantize='int8' is a CPU feature; on CUDA they run eagerly)"
    if model.device.type != "cuda":
        return f"the model is on {model.device}, not a CUDA device"
    return None


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*model.parameters(), *model.buffers()) if t is not None]


def _fingerprint(model: nn.Module) -> tuple:
    """Where the weights lie (address, dtype, shape) and the WKV backend: a graph captured
    under another fingerprint would read stale or freed memory."""
    layout = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in _weights(model))
    return layout, os.environ.get("RWKVKIT_WKV_BACKEND", "auto")


def _as_tokens(tokens: torch.Tensor | Sequence[int], batch_size: int) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(list(tokens), dtype=torch.long)
    if tokens.dim() != 1 or tokens.shape[0] != batch_size or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(f"tokens must be integer ids of shape [{batch_size}], got {tokens.dtype} {tuple(tokens.shape)}")
    return tokens


class GraphedStep:
    """``model.step_(tokens, state)`` captured as one CUDA graph on the tensors of ``state``.

    Construction runs one eager step on a copy of ``state`` (bad shapes, dtypes or devices
    fail there, as in ``model.step_``) and ``WARMUP_STEPS`` more on a side stream, then
    captures one step on ``state`` itself (capture runs nothing, so ``state`` is not
    advanced); ``pool`` is a memory pool to share with other graphs
    (``torch.cuda.graph_pool_handle()``; default: the graph's own). Afterwards :meth:`step_` copies the tokens into the static buffer
    ``self.tokens`` and replays: ``state`` advances in place and the logits land in
    ``self.logits`` [B, V] float32, the same tensor every time (copy it to keep it past the
    next step). The replayed numbers equal eager ``model.step_``'s: the same kernels run on
    the same inputs.

    The graph is bound to ``state``'s tensors: another state (or a field replaced by a new
    tensor) is a :class:`~rwkvkit.errors.StateError`; copy a state into ``self.state`` to
    continue from it (``self.state.wkv.copy_(other.wkv)``, ...), or capture a new graph.
    """

    def __init__(self, model: nn.Module, state: RecurrentState, *, pool=None) -> None:
        reason = graph_unsupported_reason(model)
        if reason is not None:
            raise CUDAGraphError(f"cannot capture {type(model).__name__}.step_ as a CUDA graph: {reason}")
        if not isinstance(state, RecurrentState):
            raise StateError(f"GraphedStep: state must be a RecurrentState, got {type(state).__name__}")
        device = model.device
        self.batch_size = state.batch_size
        self.state = state
        self.fingerprint = _fingerprint(model)
        # The graph reads these by address: keep them alive as long as the graph, not the
        # module (a cache keyed weakly by the model must not keep the model alive).
        self._weights = _weights(model)
        self._fields = dict(state.tensor_fields())
        self.tokens = torch.zeros(self.batch_size, dtype=torch.long, device=device)
        with torch.cuda.device(device):
            scratch = state.clone()
            model.step_(self.tokens, scratch)  # shape, dtype and device errors surface here, eagerly
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    model.step_(self.tokens, scratch)
            torch.cuda.current_stream(device).wait_stream(side)
            del scratch
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = model.step_(self.tokens, state)

    def replay(self) -> torch.Tensor:
        """Run the captured step on whatever ``self.tokens`` and ``self.state`` hold now;
        returns ``self.logits``."""
        self.graph.replay()
        return self.logits

    def step_(self, tokens: torch.Tensor | Sequence[int], state: RecurrentState) -> torch.Tensor:
        """The captured ``model.step_(tokens, state)``: ``tokens`` [B] (a tensor on any
        device, or ids), ``state`` the one the graph was captured on. Returns ``self.logits``."""
        if state is not self.state:
            raise StateError("GraphedStep.step_: this graph was captured on another state object; capture a "
                             "GraphedStep for this state, or copy it into graph.state")
        for name, t in self._fields.items():
            if getattr(state, name) is not t:
                raise StateError(f"GraphedStep.step_: state.{name} was replaced by a new tensor since capture; "
                                 "the graph still reads the old one (update it in place)")
        self.tokens.copy_(_as_tokens(tokens, self.batch_size))
        return self.replay()


# -- the per-model cache ---------------------------------------------------------------------
_lock = threading.Lock()
_cache: "weakref.WeakKeyDictionary[nn.Module, dict[int, GraphedStep]]" = weakref.WeakKeyDictionary()


def _acquire(model: nn.Module, batch_size: int) -> GraphedStep:
    """A graph of ``batch_size`` rows on a state of its own, used by no one else: from the
    cache when one there still fits the model's weights, else captured now."""
    with _lock:
        graph = _cache.get(model, {}).pop(batch_size, None)
    if graph is not None and graph.fingerprint == _fingerprint(model):
        return graph
    return GraphedStep(model, model.init_state(batch_size))


def _release(model: nn.Module, graph: GraphedStep) -> None:
    if graph.batch_size > CACHED_BATCH_MAX:
        return
    with _lock:
        _cache.setdefault(model, {})[graph.batch_size] = graph


def clear_cache(model: nn.Module | None = None) -> None:
    """Drop the graphs kept for ``model`` (None: for every model), decoding and prefill,
    freeing their memory."""
    with _lock:
        if model is None:
            _cache.clear()
            _prefill_cache.clear()
        else:
            _cache.pop(model, None)
            _prefill_cache.pop(model, None)


def _bucket(batch_size: int) -> int:
    return 1 << (batch_size - 1).bit_length()


class GraphDecoder:
    """Decoding steps for a generation loop: :meth:`step` feeds one token per row and
    returns ``(logits [B, V], state)``, through a CUDA graph where the model allows one
    (``cuda_graphs=True`` and :func:`graph_unsupported_reason` is None), else through
    ``model.step_`` (``forward`` for models without it).

    With graphs, the state handed back lives in the graph's buffers (a view of its first B
    rows) and the logits in its static output: both change at the next step. Pass that state
    back unchanged to continue (nothing is copied); any other state is copied in first. Read
    or copy what you keep (``state.select``, ``clone``, indexing the logits) before the
    next step, and call :meth:`close` at the end (or use ``with``), which returns the graph to
    the model's cache.
    """

    def __init__(self, model: nn.Module, *, cuda_graphs: bool = True) -> None:
        self.model = model
        self.uses_graphs = bool(cuda_graphs) and graph_unsupported_reason(model) is None
        self._graph: GraphedStep | None = None
        self._view: ModelState | None = None

    def __enter__(self) -> "GraphDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, tokens: Sequence[int], state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """Feed ``tokens`` (one id per row of ``state``); returns the logits and the state
        after them (with graphs: views of the graph's buffers; without: ``state`` itself,
        advanced in place, or the new state of a model without ``step_``)."""
        if not self.uses_graphs:
            return self._eager(tokens, state)
        b = len(tokens)
        if state is not self._view:
            self._load(state, b)
        graph = self._graph
        assert graph is not None
        graph.tokens[:b].copy_(_as_tokens(tokens, b))
        logits = graph.replay()
        return (logits if b == graph.batch_size else logits[:b]), self._view

    def _eager(self, tokens: Sequence[int], state: ModelState) -> tuple[torch.Tensor, ModelState]:
        batch = torch.as_tensor(list(tokens), dtype=torch.long)
        step = getattr(self.model, "step_", None)
        with torch.no_grad():
            if step is not None:
                return step(batch, state), state
            logits, state = self.model(batch[:, None], state, last_only=True)
        return logits[:, -1], state

    def _load(self, state: ModelState, b: int) -> None:
        """Copy ``state`` (b rows) into a graph of the right size, padding rows zeroed."""
        if state.batch_size != b:
            raise StateError(f"GraphDecoder.step: {b} token(s) for a state of batch size {state.batch_size}")
        size = _bucket(b)
        old, graph = self._graph, self._graph
        if graph is None or graph.batch_size != size:
            graph = _acquire(self.model, size)
        static = graph.state
        for name, dst in static.tensor_fields().items():
            src, axis = getattr(state, name, None), static.batch_axis(name)
            if not isinstance(src, torch.Tensor) or static._shape_without(name, src.shape) != static._shape_without(name, dst.shape):
                what = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
                raise StateError(f"GraphDecoder.step: state.{name} is {what}, expected {tuple(dst.shape)} "
                                 f"with {b} row(s) on axis {axis}")
            dst.narrow(axis, 0, b).copy_(src)
            dst.narrow(axis, b, size - b).zero_()
        graph.tokens[b:].zero_()
        if old is not None and old is not graph:  # after the copy: ``state`` may have been a view of it
            _release(self.model, old)
        self._graph = graph
        self._view = static if b == size else static._map(lambda t, axis: t.narrow(axis, 0, b))

    def close(self) -> None:
        """Give the graph back to the model's cache (the decoder can go on: the next step
        captures or takes one again)."""
        if self._graph is not None:
            _release(self.model, self._graph)
        self._graph, self._view = None, None


# -- prefill ------------------------------------------------------------------------------------
MAX_REMAINDER_PIECES = 4
"""A prompt's tail shorter than a chunk is fed through graphs of power-of-two lengths (100
tokens: 64 + 32 + 4) when that takes at most this many pieces, else in one eager call.
Measured on an H200 (RWKV-7 bf16, batch 1): a replay costs a fixed ~2.2 ms at L12 D768 (the
GPU time of its ~900 kernels; 4.8 ms at L24 D2048) plus ~1.8 us a token (11 us at L24), an
eager call up to a chunk ~20 ms (~50 ms at L24) of host time: six pieces came out even with
one eager call at L24, four win at both sizes."""


class GraphedForward:
    """``model(tokens, state, last_only=True)`` for one batch size and prompt length,
    captured as one CUDA graph: the prefill of a chunk with one launch instead of ~900.

    ``self.tokens`` [B, T] and ``self.state`` are its static inputs, ``self.logits`` [B, V]
    and ``self.new_state`` its static outputs (the next replay overwrites them; so may the
    replay of another graph sharing its ``pool``). Nothing is range-checked inside the
    graph: :meth:`run` takes ids the caller has checked (``model.check_tokens``).
    """

    def __init__(self, model: nn.Module, batch_size: int, length: int, *, pool=None) -> None:
        reason = graph_unsupported_reason(model)
        if reason is not None:
            raise CUDAGraphError(f"cannot capture {type(model).__name__}.forward as a CUDA graph: {reason}")
        device = model.device
        self.batch_size, self.length = batch_size, length
        self.fingerprint = _fingerprint(model)
        self._weights = _weights(model)
        self.tokens = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        self.state = model.init_state(batch_size)
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS workspaces
                model(self.tokens, self.state, last_only=True)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                logits, self.new_state = model(self.tokens, self.state, last_only=True)
                self.logits = logits[:, -1]

    def run(self, tokens: torch.Tensor, state: RecurrentState | None) -> tuple[torch.Tensor, RecurrentState]:
        """Copy ``tokens`` [B, T] (checked ids) and ``state`` (None: the initial, zero state)
        in, replay; returns the static ``(logits, new_state)``."""
        self.tokens.copy_(tokens)
        for name, t in self.state.tensor_fields().items():
            if state is None:
                t.zero_()
            else:
                t.copy_(getattr(state, name))
        self.graph.replay()
        return self.logits, self.new_state


def prefill_pieces(length: int, chunk_len: int) -> list[int]:
    """The forward calls a prompt of ``length`` tokens is fed in: whole chunks, then the rest
    split into powers of two (largest first) when that is at most
    :data:`MAX_REMAINDER_PIECES` pieces, else as one piece."""
    pieces = [chunk_len] * (length // chunk_len)
    rest = length % chunk_len
    bits = [1 << i for i in reversed(range(rest.bit_length())) if rest >> i & 1]
    return pieces + (bits if len(bits) <= MAX_REMAINDER_PIECES else [rest] if rest else [])


class _PrefillGraphs:
    """One model's prefill graphs: by (batch, length), one memory pool per batch size, and
    how often each (batch, length) piece was asked for (a graph is captured on its second
    use, so that one-off prompt lengths do not pay for a capture). ``lock`` is held for a
    whole prefill: graphs share their static buffers and pool, so one prefill replays them at
    a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.graphs: dict[tuple[int, int], GraphedForward] = {}
        self.pools: dict[int, object] = {}
        self.uses: dict[tuple[int, int], int] = {}

    def get(self, model: nn.Module, fingerprint: tuple, batch_size: int, length: int) -> GraphedForward | None:
        key = (batch_size, length)
        graph = self.graphs.get(key)
        if graph is not None and graph.fingerprint == fingerprint:
            return graph
        self.uses[key] = self.uses.get(key, 0) + 1
        if graph is None and self.uses[key] < 2:
            return None
        pool = self.pools.setdefault(batch_size, torch.cuda.graph_pool_handle())
        graph = self.graphs[key] = GraphedForward(model, batch_size, length, pool=pool)
        return graph


_prefill_cache: "weakref.WeakKeyDictionary[nn.Module, _PrefillGraphs]" = weakref.WeakKeyDictionary()


def graphed_prefill(
    model: nn.Module, tokens: torch.Tensor, state: ModelState | None, chunk_len: int
) -> tuple[torch.Tensor, RecurrentState] | None:
    """Feed ``tokens`` [B, T] after ``state`` (None: the initial state) in the pieces of
    :func:`prefill_pieces`, each through its CUDA graph where it has one, else eagerly; a
    tail whose pieces are not all graphed yet goes in one eager call (as without graphs).
    Graphs are kept per model for pieces of ``chunk_len`` and power-of-two lengths, captured
    on a length's second use. Returns ``(logits [B, V], new state)``, both new tensors, or None
    where prefill graphs do not apply (see :func:`graph_unsupported_reason`; batches above
    :data:`CACHED_BATCH_MAX`, which are bound by the GPU's work rather than by launching
    it). The numbers are those of ``model.forward`` over the same pieces."""
    if tokens.shape[0] > CACHED_BATCH_MAX or graph_unsupported_reason(model) is not None:
        return None
    tokens = model.check_tokens(tokens)
    B, T = tokens.shape
    if state is not None:
        state = model.check_state(state, B)
    fingerprint = _fingerprint(model)
    with _lock:
        graphs = _prefill_cache.get(model)
        if graphs is None:
            graphs = _prefill_cache[model] = _PrefillGraphs()
    pieces = prefill_pieces(T, chunk_len)
    whole = T // chunk_len
    logits, start = None, 0
    with graphs.lock, torch.no_grad():
        plan = [(n, graphs.get(model, fingerprint, B, n)) for n in pieces[:whole]]
        tail = [(n, graphs.get(model, fingerprint, B, n) if n & (n - 1) == 0 else None) for n in pieces[whole:]]
        if any(graph is None for _, graph in tail):  # a length's first use: the rest in one eager call
            tail = [(T - whole * chunk_len, None)] if tail else []
        for n, graph in plan + tail:
            piece = tokens[:, start : start + n]
            start += n
            if graph is None:
                logits, state = model(piece, state, last_only=True)
                logits = logits[:, -1]
            else:
                logits, state = graph.run(piece, state)
        assert logits is not None and state is not None
        return logits.clone(), state.clone()  # before another prefill replays these graphs
