"""Softmax attention shared by GoldFinch's GOLD layers and the Llama baseline.

Queries are always the *last* ``Tq`` positions of a sequence of ``total`` tokens, keys any
contiguous range of it, so one mask serves training (Tq == Tk), prompts continued in pieces
(Tq < Tk) and decoding (Tq == 1): query i sits at position ``total - Tq + i`` and sees the
keys at positions <= its own (the "bottom-right" causal mask). PyTorch's ``is_causal=True``
is the top-left one, right only when Tq == Tk, so it is used only then.

Keys that are rebuilt chunk by chunk (GoldFinch decoding) are attended one chunk at a time
with ``scaled_dot_product_attention``; the chunks' results are merged exactly by their
log-sum-exp, so memory stays bounded by the chunk, not the context.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def check_rope_base(base: object, head_size: int) -> None:
    """The ``rope_base`` option of a config: a number >= 0 (0: no RoPE), with an even head
    size when RoPE is on; a :class:`ConfigError` otherwise."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base < 0:
        raise ConfigError(f"config: rope_base must be a number >= 0 (0: no RoPE), got {base!r}")
    if base and head_size % 2:
        raise ConfigError(f"config: RoPE needs an even head_size, got {head_size}")


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` [B, H, T, D] at integer ``positions`` [T].

    Channel pairs (2i, 2i+1) turn by ``position * base^(-2i/D)`` (the official GoldFinch /
    Llama baseline's pairing). Computed in float32 or better, returned in ``x``'s dtype.
    """
    D = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    angle = positions.to(torch.float64).unsqueeze(-1) * freq  # [T, D/2]
    cos, sin = angle.cos().to(dt), angle.sin().to(dt)
    xf = x.to(dt)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


def bottom_right_mask(n_q: int, key_start: int, n_k: int, total: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [n_q, n_k] (True: may attend) for the last ``n_q`` of ``total`` positions
    as queries and keys at positions ``key_start .. key_start + n_k - 1``; None when every
    key is visible to every query."""
    first_query = total - n_q
    if key_start + n_k - 1 <= first_query:
        return None
    q_pos = torch.arange(first_query, total, device=device).unsqueeze(1)
    k_pos = torch.arange(key_start, key_start + n_k, device=device).unsqueeze(0)
    return k_pos <= q_pos


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of the last ``Tq`` positions (``q`` [B, H, Tq, D]) over all ``Tk`` keys
    (``k``, ``v`` [B, H, Tk, D], positions 0 .. Tk-1), bottom-right causal."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = bottom_right_mask(Tq, 0, Tk, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def chunked_causal_attention(
    q: torch.Tensor, chunks: Iterable[tuple[torch.Tensor, torch.Tensor, int]], total: int, n_chunks: int
) -> torch.Tensor:
    """:func:`causal_attention` over keys given in ``n_chunks`` pieces ``(k, v, start)``
    that cover positions 0 .. total-1 in order; exact.

    Every query must see the first key of every chunk (the caller keeps the queries'
    positions inside the last chunk), so no row of a chunk is fully masked.
    """
    if n_chunks == 1:
        (k, v, start), = chunks
        if start != 0 or k.shape[-2] != total:
            raise ValueError("a single chunk must hold every key")
        return causal_attention(q, k, v)
    Tq = q.shape[-2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = lse = None
    for k, v, start in chunks:
        mask = bottom_right_mask(Tq, start, k.shape[-2], total, q.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(acc)
        s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        l_c = torch.logsumexp(s, dim=-1, keepdim=True)  # [B, H, Tq, 1]
        if out is None:
            out, lse = o, l_c
        else:
            new = torch.logaddexp(lse, l_c)
            out = out * (lse - new).exp() + o * (l_c - new).exp()
            lse = new
    assert out is not None
    return out.to(q.dtype)
