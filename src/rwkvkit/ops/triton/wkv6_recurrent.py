"""RWKV-5.2 / RWKV-6 WKV step by step in one Triton kernel: decoding (T = 1 and a few tokens,
no gradient), as ``wkv7_recurrent`` is for RWKV-7.

Per head, with the state S [value, key], w = exp(log_w) and the bonus u, for t = 1..T:
    y_t = S r_t + (sum_j r_t[j] u[j] k_t[j]) v_t,    S <- S diag(w_t) + v_t k_t^T
(``ops.reference.wkv6_step``). One program per (batch*head, value block) keeps its [BV, N]
rows of S in registers for all T steps, so the state is read and written once per call
whatever T is; the chunked kernels (``wkv6.py``) would write a state per chunk and run four
kernels. Everything is float32 inside; ``log_w`` is read through its strides (RWKV-5.2's
per-head decay as a stride-0 view over B and T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .wkv6 import _lw_strides, check_inputs, check_state


@triton.jit(do_not_specialize=["T", "H"])  # one compile for every T and H
def _wkv6_recurrent_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr,  # [B, T, H, N]; log w through its strides
    u_ptr,  # [H, N]
    s0_ptr,  # [B, H, N, N] float32 (unused unless HAS_S0)
    y_ptr,  # [B, T, H, N]
    sT_ptr,  # [B, H, N, N] float32 (may be s0_ptr: the update is then in place)
    T, H, lw_sb, lw_st, lw_sh,
    N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    h = i_bh % H
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = i_bh * N * N + offs_v[:, None] * N + offs_k[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + s_offs)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    u = tl.load(u_ptr + h * N + offs_k).to(tl.float32)
    lw_row = i_b * lw_sb + h * lw_sh
    for t in range(T):
        row = ((i_b * T + t) * H + h) * N
        r = tl.load(r_ptr + row + offs_k).to(tl.float32)
        k = tl.load(k_ptr + row + offs_k).to(tl.float32)
        v = tl.load(v_ptr + row + offs_v).to(tl.float32)
        w = tl.exp(tl.load(lw_ptr + lw_row + t * lw_st + offs_k).to(tl.float32))
        y = tl.sum(S * r[None, :], axis=1) + tl.sum(r * u * k) * v
        tl.store(y_ptr + row + offs_v, y.to(y_ptr.dtype.element_ty))
        S = S * w[None, :] + v[:, None] * k[None, :]
    tl.store(sT_ptr + s_offs, S)


@torch.no_grad()
def wkv6_recurrent(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2 / RWKV-6 WKV step by step in one kernel, for decoding (a few tokens, no
    gradient).

    Same arguments as ``wkv6_triton`` (``r, log_w, k, v`` [B, T, H, N], ``log_w`` through
    its strides with a unit last one, ``u`` [H, N], ``state`` [B, H, N, N] or None for
    zeros); with ``inplace`` the float32 contiguous ``state`` is updated in place and
    returned. Returns ``(y in out_dtype (default r.dtype), final state float32)``.
    """
    B, T, H, N = check_inputs("wkv6_recurrent", r, log_w, k, v, u)
    check_state("wkv6_recurrent", state, B, H, N)
    if inplace and (state is None or state.dtype != torch.float32 or not state.is_contiguous()):
        raise ValueError("wkv6_recurrent: inplace needs a contiguous float32 state")
    r, k, v, u = (x.contiguous() for x in (r, k, v, u))
    if log_w.stride(-1) != 1:
        log_w = log_w.contiguous()
    s0 = None if state is None else state.float().contiguous()
    sT = state if inplace else torch.empty((B, H, N, N), dtype=torch.float32, device=r.device)
    y = torch.empty((B, T, H, N), dtype=out_dtype or r.dtype, device=r.device)
    bv = min(N, 32)
    _wkv6_recurrent_kernel[(B * H, N // bv)](
        r, log_w, k, v, u, s0 if s0 is not None else sT, y, sT, T, H, *_lw_strides(log_w),
        N=N, BV=bv, HAS_S0=s0 is not None, num_warps=4 if N * bv >= 2048 else 2,
    )
    return y, sT
