"""What the step-by-step (decoding) kernels of WKV-7 (``wkv7.py``) and WKV-6 (``wkv6.py``)
share: the block of the state a program keeps in registers for all its steps, and the launch's
buffers, grid and settings. One program per (batch*head, value block of BV rows)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def state_block(s0_ptr, H, N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
    """This program's batch row, head, key and value offsets, the offsets of its [BV, N] block
    of a [B, H, N, N] state, and that block of the initial state (zeros unless HAS_S0)."""
    i_bh = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, N)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    s_offs = i_bh * N * N + offs_v[:, None] * N + offs_k[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + s_offs)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    return i_bh // H, i_bh % H, offs_k, offs_v, s_offs, S


def launch(fn: str, state, inplace: bool, B: int, T: int, H: int, N: int, out_dtype, device, empty):
    """Buffers and launch settings of a decoding kernel: ``(s0, sT, y, grid, meta)`` with the
    float32 initial state (or None), the final state (``state`` itself with ``inplace``), the
    output [B, T, H, N] and the kernel's grid and keyword settings. ``empty(shape, dtype,
    device)`` allocates (the kernels' own, which tests can poison)."""
    if inplace and (state is None or state.dtype != torch.float32 or not state.is_contiguous()):
        raise ValueError(f"{fn}: inplace needs a contiguous float32 state")
    s0 = None if state is None else state.float().contiguous()
    sT = state if inplace else empty((B, H, N, N), torch.float32, device)
    y = empty((B, T, H, N), out_dtype, device)
    bv = min(N, 32)
    meta = dict(N=N, BV=bv, HAS_S0=s0 is not None, num_warps=4 if N * bv >= 2048 else 2)
    return s0, sT, y, (B * H, N // bv), meta
