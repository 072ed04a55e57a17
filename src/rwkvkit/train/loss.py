"""The language-model loss from hidden states, and the exact loss of a long token stream.

:func:`chunked_cross_entropy` computes ``sum of cross_entropy(h @ W^T, targets)`` a chunk of
rows at a time, so the [B, T, V] logits never exist at once. With autograd it is a fused
function: each chunk's gradient (softmax - one-hot, plus the optional L2Wrap term) is turned
into the gradients of ``h`` and ``W`` during the forward pass and the logits are dropped, so
training memory holds only [chunk, V] logits; backward just scales the stored gradients.

:func:`evaluate_loss` scores a token stream exactly the RWKV way: windows of ``ctx_len``
tokens, carrying the recurrent state from window to window, so every token is predicted from
the whole stream before it, with no overlap recomputed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["EvalResult", "chunked_cross_entropy", "default_chunk", "evaluate_loss"]


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of logits has about 2**26 entries (256 MB in fp32)."""
    return max(1, (1 << 26) // max(1, vocab_size))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # As LanguageModel.forward: the product in the weights' dtype, then up-cast.
    return F.linear(h, weight).to(acc)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    nll = torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None])[:, 0]
    return torch.where(valid, nll, torch.zeros_like(nll)).sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, ignore_index: int, l2wrap: float) -> torch.Tensor:
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for lo in range(0, h.shape[0], chunk):
            hc, tc = h[lo : lo + chunk], targets[lo : lo + chunk]
            valid = tc != ignore_index
            logits = _chunk_logits(hc, weight, acc)
            total += _chunk_loss(logits, tc, valid)
            g = torch.softmax(logits, -1)  # d(sum nll)/d logits = softmax - one_hot
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, torch.where(valid, tc, torch.zeros_like(tc))] -= 1.0
            if l2wrap:
                # L2Wrap (official): push the largest logit of each token toward 0.
                top, arg = logits.max(-1)
                g[rows, arg] += l2wrap * top
            g *= valid[:, None].to(g.dtype)
            del logits
            gc = g.to(weight.dtype)
            if need_h:
                grad_h[lo : lo + chunk] = gc @ weight  # type: ignore[index]
            if need_w:
                grad_w += (gc.t() @ hc).to(acc)  # type: ignore[operator]
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = gw = None
        if need_h:
            g = saved.pop(0)
            gh = (g * grad_out.to(g.dtype)).to(g.dtype)
        if need_w:
            g = saved.pop(0)
            gw = (g * grad_out.to(g.dtype)).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int | None = None,
    ignore_index: int = -100,
    l2wrap: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of ``logits = hidden @ head_weight.T`` against ``targets``,
    computed ``chunk`` rows at a time; returns ``(loss_sum, count)``.

    Args:
        hidden: [B, T, C] or [N, C] (e.g. ``model.hidden(tokens)[0]``).
        head_weight: [V, C] (``model.head.weight``).
        targets: [B, T] or [N] ids; ``ignore_index`` entries are not counted.
        chunk: rows per chunk (default :func:`default_chunk` of V).
        l2wrap: the L2Wrap coefficient (official training: 1e-4). It adds
            ``l2wrap * max_logit`` to the gradient of each counted token's largest logit and
            leaves the loss value unchanged; with ``loss_sum / count`` as the loss this is the
            official ``1e-4 / (B*T)`` factor.

    ``loss_sum`` is a 0-d tensor (float64 for float64 inputs, else float32) that carries
    gradients to ``hidden`` and ``head_weight``; the logits are made in the weights' dtype and
    up-cast, as ``model.forward`` does. ``loss_sum / count`` is the mean loss
    (``F.cross_entropy``'s default reduction).
    """
    if hidden.shape[-1] != head_weight.shape[-1] or head_weight.dim() != 2:
        raise InputError(f"hidden [..., {hidden.shape[-1]}] does not match head weight {tuple(head_weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise InputError(f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(device=h.device, dtype=torch.long)
    chunk = chunk or default_chunk(head_weight.shape[0])
    count = int((t != ignore_index).sum())
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        loss = _FusedLinearCrossEntropy.apply(h, head_weight, t, chunk, ignore_index, float(l2wrap))
        return loss, count
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=h.device)
    for lo in range(0, h.shape[0], chunk):
        tc = t[lo : lo + chunk]
        total += _chunk_loss(_chunk_logits(h[lo : lo + chunk], head_weight, acc), tc, tc != ignore_index)
    return total, count


# ------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Mean cross-entropy (nats per token) over ``tokens`` scored tokens."""

    loss: float
    tokens: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.inf


def _row_bounds(n: int, rows: int, doc_offsets: np.ndarray | None) -> list[tuple[int, int]]:
    """Cut ``[0, n)`` into at most ``rows`` parts, at document starts where there are any."""
    if rows <= 1 or n <= 1:
        return [(0, n)]
    cuts = set()
    candidates = None
    if doc_offsets is not None and len(doc_offsets) > 1:
        candidates = np.asarray(doc_offsets[1:], dtype=np.int64)
        candidates = candidates[candidates < n]
    for k in range(1, rows):
        ideal = k * n // rows
        if candidates is not None and candidates.size:
            j = int(np.searchsorted(candidates, ideal))
            near = [candidates[i] for i in (j - 1, j) if 0 <= i < candidates.size]
            ideal = int(min(near, key=lambda c: abs(int(c) - ideal)))
        if 0 < ideal < n:
            cuts.add(ideal)
    edges = [0, *sorted(cuts), n]
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def evaluate_loss(
    model: Any,
    tokens: Any,
    *,
    doc_offsets: Sequence[int] | np.ndarray | None = None,
    ctx_len: int = 1024,
    batch_size: int = 1,
    max_tokens: int | None = None,
    eot_id: int = 0,
    chunk: int | None = None,
    progress: bool | None = False,
    fresh_state: bool = False,
) -> EvalResult:
    """Mean cross-entropy of ``model`` over a token stream, scored exactly.

    The stream is ``tokens`` (a 1-D array of ids, e.g. ``TokenData.tokens``; documents each
    followed by token 0) cut to its first ``max_tokens``; the model reads token ``eot_id``
    first, so every token of the stream is a target (``n`` targets for ``n`` tokens), each
    predicted from everything before it. The stream is fed in windows of ``ctx_len`` tokens
    with the recurrent state carried across, which equals one forward pass over the whole
    stream.

    With ``batch_size`` > 1 the stream is cut into that many parts, at document starts where
    possible, and the parts run side by side; each starts like the stream does (token
    ``eot_id`` as input, the model's initial state), so the result is the exact score of those
    parts scored separately (it differs from ``batch_size=1`` only by the state lost at the
    cuts).

    ``fresh_state``: every window of ``ctx_len`` targets starts from the initial state (its
    inputs are the ``ctx_len`` tokens before each target, as in a training sample) instead of
    carrying the state over; for models whose state is a growing cache.
    """
    from tqdm.auto import tqdm

    if ctx_len < 1 or batch_size < 1:
        raise InputError(f"ctx_len and batch_size must be >= 1, got {ctx_len} and {batch_size}")
    n = int(len(tokens))
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        n = min(n, max_tokens)
    if n == 0:
        raise InputError("no tokens to evaluate")
    offsets = None if doc_offsets is None else np.asarray(doc_offsets, dtype=np.int64)
    bounds = _row_bounds(n, batch_size, offsets)
    B = len(bounds)
    longest = max(b - a for a, b in bounds)
    device = model.device
    weight = model.head.weight
    state = model.init_state(B)
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="tok", unit_scale=True, desc="eval", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    try:
        for w in range(0, longest, ctx_len):
            T = min(ctx_len, longest - w)
            x = np.full((B, T), eot_id, np.int64)
            y = np.full((B, T), -100, np.int64)
            for r, (a, b) in enumerate(bounds):
                lo, hi = a + w, min(a + w + T, b)  # targets tokens[lo:hi]
                if lo >= hi:
                    continue
                y[r, : hi - lo] = tokens[lo:hi]
                src_lo = max(lo - 1, a)  # the input before a part's first target is eot_id
                x[r, src_lo - (lo - 1) : hi - lo] = tokens[src_lo : hi - 1]
            xt = torch.from_numpy(x).to(device)
            yt = torch.from_numpy(y).to(device)
            if fresh_state:
                state = model.init_state(B)
            h, state = model.hidden(xt, state)
            loss_sum, c = chunked_cross_entropy(h, weight, yt, chunk=chunk)
            total += float(loss_sum)
            count += c
            bar.update(c)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return EvalResult(loss=total / count, tokens=count, seconds=seconds)
