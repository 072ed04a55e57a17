"""RWKV-7 WKV in Triton: chunked forward and backward kernels and their autograd Function.

Per head, with the state S [value, key] and w = exp(log_w):
    S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t.

Chunk formula (the one ``ops/chunked.py`` uses). Inside a chunk of L steps, with S0 the state
entering it, Lam_t = sum_{u<=t} log w_u (inclusive), Lam'_t = Lam_t - log w_t, Lam_L the
last row, and row-vector inputs stacked as [L, N] matrices:
    aq = a e^{Lam'}, rq = r e^{Lam}, ki = k e^{-Lam}, bi = b e^{-Lam},
    ke = k e^{Lam_L - Lam}, be = b e^{Lam_L - Lam}, gL = e^{Lam_L}
    A_ab = tril_strict(aq bi^T), A_ak = tril_strict(aq ki^T), A_rb = tril(rq bi^T), A_rk = tril(rq ki^T)
    X  = aq S0^T + A_ak V,          SA = (I - A_ab)^{-1} X       (row t: S_{t-1} a_t)
    Y  = rq S0^T + A_rk V + A_rb SA
    S_L = S0 diag(gL) + V^T ke + SA^T be
The factorised decays e^{Lam_t} e^{-Lam_s} rely on RWKV-7's bound log w >= -e^{-0.5}: over a
chunk of 64 steps e^{-Lam} stays below e^{38.8} ~ 7e16, far inside float32's range (inputs
below the bound are not checked; chunks up to 64 are allowed).

(I - A_ab)^{-1} is built exactly by block doubling, never by a Neumann series (whose powers
of A_ab blow up when consecutive keys repeat): if D^{-1} is the inverse of the block diagonal
with blocks of size s and C holds the sub-diagonal s-blocks inside each 2s-block, then
(D - C)^{-1} = D^{-1} + D^{-1} C D^{-1} (D^{-1}C is nilpotent of degree 2). log2(L) levels
of two [L, L] products; every intermediate is a block of the true inverse, so stays bounded.

Backward of one chunk, given dY and dS_L (the gradient of the state leaving it):
    dSA = be dS_L^T + A_rb^T dY,        dX = (I - A_ab)^{-T} dSA
    dV  = ke dS_L^T + A_rk^T dY + A_ak^T dX
    dA_rk = tril(dY V^T), dA_rb = tril(dY SA^T), dA_ab = tril_strict(dX SA^T), dA_ak = tril_strict(dX V^T)
    drq = dY S0 + dA_rb bi + dA_rk ki,      daq = dX S0 + dA_ab bi + dA_ak ki
    dbi = dA_ab^T aq + dA_rb^T rq,          dki = dA_ak^T aq + dA_rk^T rq
    dke = V dS_L,  dbe = SA dS_L,  dgL = colsum(dS_L * S0)
    dS0 = dS_L diag(gL) + dY^T rq + dX^T aq                       (carried to the previous chunk)
and through the scalings (x_q = x e^{...}):
    dr = drq e^{Lam}, da = daq e^{Lam'}, dk = dki e^{-Lam} + dke e^{Lam_L-Lam}, db likewise
    dLam = drq rq - dki ki - dbi bi - dke ke - dbe be,  dLam' = daq aq,
    dLam_L = colsum(dke ke + dbe be) + dgL gL
    dlog_w_s = sum_{t>=s} dLam_t + sum_{t>s} dLam'_t + dLam_L   (a reverse cumsum in the chunk)
Each formula was checked against float64 autograd through the step reference.

Kernels. Rows of the state (the value index) evolve independently once the key-side
matrices are known, so a program owns one (batch, head) and a block of ``block_v`` value
rows, keeps its [block_v, N] slice of the state in registers in float32, and walks the
chunks in order. The key-side work of a chunk (cumsums, A matrices, the inverse) is
recomputed by every value block and in the backward: it costs FLOPs but no memory traffic.
The forward stores the state entering every chunk (float32, [B, H, T/L, N, N]) when a
gradient is needed, so the backward never re-runs the scan: N*N*4/L bytes per token and
head (1 KiB at N=64, L=16; 256 B at L=64), against 768 B for the six bf16 inputs autograd
keeps anyway. Backward, two modes: "fused" walks the chunks in reverse in one kernel,
carrying dS in registers; "split" runs a lean reverse scan of dS alone (storing dS_L per
chunk, float32), then a kernel over all chunks in parallel for the input gradients (more
memory traffic, far more parallelism, fewer registers per program). Key-side input
gradients summed over value blocks go through a float32 [NV, ...] buffer when there is more
than one block.

Matmul precision: "ieee" (exact float32, CUDA cores), "tf32" (tensor cores; ~4e-4 relative
error) or "tf32x3" (tensor cores, ~float32 accuracy at 3x the MMA work). Default: ieee for
float32 inputs, tf32 for bf16/fp16 inputs. Accumulation is float32 everywhere.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
SUPPORTED_CHUNKS = (16, 32, 64)
PRECISIONS = ("ieee", "tf32", "tf32x3")
BWD_MODES = ("fused", "split")
DEFAULT_CHUNK = 16


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _unit_lower_inverse(A, offs_t, L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^{-1} for a strictly lower [L, L] tile A, by block doubling (see module doc)."""
    rows = offs_t[:, None]
    cols = offs_t[None, :]
    # level 0 (blocks of 1 -> 2): D^{-1} = I, so the inverse is I + C
    Ti = tl.where(rows == cols, 1.0, 0.0) + tl.where((rows // 2 == cols // 2) & (rows != cols), A, 0.0)
    for lvl in tl.static_range(1, LOG2L):
        # blocks of 2^lvl -> 2^(lvl+1): C = the sub-diagonal 2^lvl-blocks inside each 2^(lvl+1)-block
        C = tl.where(((rows >> (lvl + 1)) == (cols >> (lvl + 1))) & ((rows >> lvl) != (cols >> lvl)), A, 0.0)
        Ti = Ti + tl.dot(tl.dot(Ti, C, input_precision=PREC), Ti, input_precision=PREC)
    return Ti


@triton.jit
def _chunk_keyside(r, lw, k, a, b, offs_t, L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr):
    """Everything in a chunk that does not depend on the state or on v."""
    lam = tl.cumsum(lw, axis=0)  # Lam_t, inclusive
    lamp = lam - lw  # Lam'_t = Lam_{t-1}
    lam_last = tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0)  # Lam_L  [N]
    g = tl.exp(lam)
    gp = tl.exp(lamp)
    gi = tl.exp(-lam)
    ge = tl.exp(lam_last[None, :] - lam)
    gL = tl.exp(lam_last)
    aq = a * gp
    rq = r * g
    ki = k * gi
    bi = b * gi
    ke = k * ge
    be = b * ge
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]
    A_ab = tl.where(strict, tl.dot(aq, tl.trans(bi), input_precision=PREC), 0.0)
    A_ak = tl.where(strict, tl.dot(aq, tl.trans(ki), input_precision=PREC), 0.0)
    A_rb = tl.where(incl, tl.dot(rq, tl.trans(bi), input_precision=PREC), 0.0)
    A_rk = tl.where(incl, tl.dot(rq, tl.trans(ki), input_precision=PREC), 0.0)
    Ti = _unit_lower_inverse(A_ab, offs_t, L, LOG2L, PREC)
    return g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk, Ti


@triton.jit(do_not_specialize=["T", "H"])  # one compile for every T and H
def _wkv7_fwd_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [B, T, H, N]
    s0_ptr,  # [B, H, N, N] float32 (unused unless HAS_S0)
    y_ptr,  # [B, T, H, N]
    sT_ptr,  # [B, H, N, N] float32
    states_ptr,  # [B, H, NC, N, N] float32 (unused unless SAVE_STATES)
    T, H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr,
    HAS_S0: tl.constexpr, SAVE_STATES: tl.constexpr, PREC: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    NC = tl.cdiv(T, L)
    stride_t = H * N
    tok0 = i_b * T * stride_t + i_h * N
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = offs_v[:, None] * N + offs_k[None, :]  # [BV, N] slice of a [N, N] state

    if HAS_S0:
        S = tl.load(s0_ptr + i_bh * N * N + s_offs).to(tl.float32)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)

    # The chunk loop is sequential: the next chunk's inputs are loaded one iteration ahead so
    # that their latency hides behind this chunk's matmuls.
    tmask = (offs_t < T)[:, None]
    row = tok0 + offs_t.to(tl.int64)[:, None] * stride_t
    r_n = tl.load(r_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    lw_n = tl.load(lw_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    k_n = tl.load(k_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    a_n = tl.load(a_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    b_n = tl.load(b_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    v_n = tl.load(v_ptr + row + offs_v[None, :], mask=tmask, other=0.0)
    for c in range(NC):
        r = r_n.to(tl.float32)
        lw = lw_n.to(tl.float32)
        k = k_n.to(tl.float32)
        a = a_n.to(tl.float32)
        b = b_n.to(tl.float32)
        v = v_n.to(tl.float32)
        pv = row + offs_v[None, :]
        ymask = tmask
        t = (c + 1) * L + offs_t
        tmask = (t < T)[:, None]  # all false past the last chunk: no memory access
        row = tok0 + t.to(tl.int64)[:, None] * stride_t
        r_n = tl.load(r_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        lw_n = tl.load(lw_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        k_n = tl.load(k_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        a_n = tl.load(a_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        b_n = tl.load(b_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        v_n = tl.load(v_ptr + row + offs_v[None, :], mask=tmask, other=0.0)
        if SAVE_STATES:
            tl.store(states_ptr + (i_bh * NC + c) * N * N + s_offs, S)

        g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk, Ti = _chunk_keyside(
            r, lw, k, a, b, offs_t, L, LOG2L, PREC
        )
        X = tl.dot(aq, tl.trans(S), input_precision=PREC) + tl.dot(A_ak, v, input_precision=PREC)
        SA = tl.dot(Ti, X, input_precision=PREC)  # [L, BV]: row t = S_{t-1} a_t
        Y = tl.dot(rq, tl.trans(S), input_precision=PREC)
        Y += tl.dot(A_rk, v, input_precision=PREC)
        Y += tl.dot(A_rb, SA, input_precision=PREC)
        tl.store(y_ptr + pv, Y.to(y_ptr.dtype.element_ty), mask=ymask)
        S = S * gL[None, :]
        S += tl.dot(tl.trans(v), ke, input_precision=PREC)
        S += tl.dot(tl.trans(SA), be, input_precision=PREC)

    tl.store(sT_ptr + i_bh * N * N + s_offs, S)


@triton.jit
def _chunk_grads(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr,
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
    pk, pv, part, tmask, S, dS, offs_t,
    L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr, UPDATE_DS: tl.constexpr,
):
    """Backward of one chunk for one value block: from S = S0 and dS = dS_L ([BV, N] slices),
    store dv and this block's share of dr, dlog_w, dk, da, db; return dS0 if UPDATE_DS."""
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pv, mask=tmask, other=0.0).to(tl.float32)
    dY = tl.load(dy_ptr + pv, mask=tmask, other=0.0).to(tl.float32)
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]

    g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk, Ti = _chunk_keyside(
        r, lw, k, a, b, offs_t, L, LOG2L, PREC
    )
    X = tl.dot(aq, tl.trans(S), input_precision=PREC) + tl.dot(A_ak, v, input_precision=PREC)
    SA = tl.dot(Ti, X, input_precision=PREC)

    dSA = tl.dot(be, tl.trans(dS), input_precision=PREC) + tl.dot(tl.trans(A_rb), dY, input_precision=PREC)
    dX = tl.dot(tl.trans(Ti), dSA, input_precision=PREC)
    drq = tl.dot(dY, S, input_precision=PREC)  # [L, N]
    daq = tl.dot(dX, S, input_precision=PREC)
    dgL = tl.sum(dS * S, axis=0)  # [N]

    dv = tl.dot(ke, tl.trans(dS), input_precision=PREC)
    dv += tl.dot(tl.trans(A_rk), dY, input_precision=PREC)
    dv += tl.dot(tl.trans(A_ak), dX, input_precision=PREC)
    tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=tmask)

    dke = tl.dot(v, dS, input_precision=PREC)
    dbe = tl.dot(SA, dS, input_precision=PREC)
    dlam_last = tl.sum(dke * ke + dbe * be, axis=0) + dgL * gL
    if UPDATE_DS:
        dS = dS * gL[None, :]
        dS += tl.dot(tl.trans(dY), rq, input_precision=PREC)
        dS += tl.dot(tl.trans(dX), aq, input_precision=PREC)

    dA_rk = tl.where(incl, tl.dot(dY, tl.trans(v), input_precision=PREC), 0.0)
    dA_rb = tl.where(incl, tl.dot(dY, tl.trans(SA), input_precision=PREC), 0.0)
    dA_ab = tl.where(strict, tl.dot(dX, tl.trans(SA), input_precision=PREC), 0.0)
    dA_ak = tl.where(strict, tl.dot(dX, tl.trans(v), input_precision=PREC), 0.0)
    daq += tl.dot(dA_ab, bi, input_precision=PREC)
    daq += tl.dot(dA_ak, ki, input_precision=PREC)
    drq += tl.dot(dA_rb, bi, input_precision=PREC)
    drq += tl.dot(dA_rk, ki, input_precision=PREC)
    dbi = tl.dot(tl.trans(dA_ab), aq, input_precision=PREC) + tl.dot(tl.trans(dA_rb), rq, input_precision=PREC)
    dki = tl.dot(tl.trans(dA_ak), aq, input_precision=PREC) + tl.dot(tl.trans(dA_rk), rq, input_precision=PREC)

    dr = drq * g
    da = daq * gp
    dk = dki * gi + dke * ge
    db = dbi * gi + dbe * ge
    # dLam = drq rq - dki ki - dke ke - dbi bi - dbe be = dr r - dk k - db b;  dLam' = da a.
    # The raw inputs are reloaded (cache hits) rather than kept live across the matmuls.
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    dlamp = da * a
    dlw = tl.cumsum(dr * r - dk * k - db * b + dlamp, axis=0, reverse=True) - dlamp + dlam_last[None, :]
    tl.store(dr_ptr + part + pk, dr.to(dr_ptr.dtype.element_ty), mask=tmask)
    tl.store(dlw_ptr + part + pk, dlw.to(dlw_ptr.dtype.element_ty), mask=tmask)
    tl.store(dk_ptr + part + pk, dk.to(dk_ptr.dtype.element_ty), mask=tmask)
    tl.store(da_ptr + part + pk, da.to(da_ptr.dtype.element_ty), mask=tmask)
    tl.store(db_ptr + part + pk, db.to(db_ptr.dtype.element_ty), mask=tmask)
    return dS


@triton.jit(do_not_specialize=["T", "H", "part_stride"])  # one compile for every T and H
def _wkv7_bwd_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [B, T, H, N]
    states_ptr,  # [B, H, NC, N, N] float32: the state entering each chunk
    dy_ptr,  # [B, T, H, N]
    dsT_ptr,  # [B, H, N, N] float32 (unused unless HAS_DST)
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr,  # [NV, B, T, H, N]: partial sums over value blocks
    dv_ptr,  # [B, T, H, N]
    ds0_ptr,  # [B, H, N, N] float32
    T, H, part_stride,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr,
    HAS_DST: tl.constexpr, PREC: tl.constexpr,
):
    """Fused backward: one program per (batch*head, value block) walks the chunks in reverse,
    carrying dS in registers and writing every gradient."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    NC = tl.cdiv(T, L)
    stride_t = H * N
    tok0 = i_b * T * stride_t + i_h * N
    part = i_v.to(tl.int64) * part_stride
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = offs_v[:, None] * N + offs_k[None, :]

    if HAS_DST:
        dS = tl.load(dsT_ptr + i_bh * N * N + s_offs).to(tl.float32)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)

    for cc in range(NC):
        c = NC - 1 - cc
        t = c * L + offs_t
        row = tok0 + t.to(tl.int64)[:, None] * stride_t
        S = tl.load(states_ptr + (i_bh * NC + c) * N * N + s_offs)
        dS = _chunk_grads(
            r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
            row + offs_k[None, :], row + offs_v[None, :], part, (t < T)[:, None], S, dS, offs_t,
            L, LOG2L, PREC, True,
        )

    tl.store(ds0_ptr + i_bh * N * N + s_offs, dS)


@triton.jit(do_not_specialize=["T", "H"])  # one compile for every T and H
def _wkv7_bwd_state_kernel(
    r_ptr, lw_ptr, a_ptr, b_ptr, dy_ptr,  # [B, T, H, N]
    dsT_ptr,  # [B, H, N, N] float32 (unused unless HAS_DST)
    dstates_ptr,  # [B, H, NC, N, N] float32 out: dS_L, the gradient of the state leaving each chunk
    ds0_ptr,  # [B, H, N, N] float32
    T, H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr,
    HAS_DST: tl.constexpr, PREC: tl.constexpr,
):
    """Split backward, pass 1: only the reverse scan of dS (needs neither k nor v),
    dS0 = dS_L diag(gL) + dY^T rq + dX^T aq with dX = (I - A_ab)^{-T} (be dS_L^T + A_rb^T dY)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    NC = tl.cdiv(T, L)
    stride_t = H * N
    tok0 = i_b * T * stride_t + i_h * N
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = offs_v[:, None] * N + offs_k[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]

    if HAS_DST:
        dS = tl.load(dsT_ptr + i_bh * N * N + s_offs).to(tl.float32)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)

    # inputs prefetched one chunk ahead (in reverse order), as in the forward
    t = (NC - 1) * L + offs_t
    tmask = (t < T)[:, None]
    row = tok0 + t.to(tl.int64)[:, None] * stride_t
    r_n = tl.load(r_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    lw_n = tl.load(lw_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    a_n = tl.load(a_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    b_n = tl.load(b_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    dy_n = tl.load(dy_ptr + row + offs_v[None, :], mask=tmask, other=0.0)
    for cc in range(NC):
        c = NC - 1 - cc
        tl.store(dstates_ptr + (i_bh * NC + c) * N * N + s_offs, dS)
        r = r_n.to(tl.float32)
        lw = lw_n.to(tl.float32)
        a = a_n.to(tl.float32)
        b = b_n.to(tl.float32)
        dY = dy_n.to(tl.float32)
        t = (c - 1) * L + offs_t
        tmask = ((t >= 0) & (t < T))[:, None]  # all false before the first chunk
        row = tok0 + t.to(tl.int64)[:, None] * stride_t
        r_n = tl.load(r_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        lw_n = tl.load(lw_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        a_n = tl.load(a_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        b_n = tl.load(b_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
        dy_n = tl.load(dy_ptr + row + offs_v[None, :], mask=tmask, other=0.0)
        lam = tl.cumsum(lw, axis=0)
        lam_last = tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0)
        aq = a * tl.exp(lam - lw)
        rq = r * tl.exp(lam)
        bi = b * tl.exp(-lam)
        be = b * tl.exp(lam_last[None, :] - lam)
        A_ab = tl.where(strict, tl.dot(aq, tl.trans(bi), input_precision=PREC), 0.0)
        A_rb = tl.where(incl, tl.dot(rq, tl.trans(bi), input_precision=PREC), 0.0)
        Ti = _unit_lower_inverse(A_ab, offs_t, L, LOG2L, PREC)
        dSA = tl.dot(be, tl.trans(dS), input_precision=PREC) + tl.dot(tl.trans(A_rb), dY, input_precision=PREC)
        dX = tl.dot(tl.trans(Ti), dSA, input_precision=PREC)
        dS = dS * tl.exp(lam_last)[None, :]
        dS += tl.dot(tl.trans(dY), rq, input_precision=PREC)
        dS += tl.dot(tl.trans(dX), aq, input_precision=PREC)

    tl.store(ds0_ptr + i_bh * N * N + s_offs, dS)


@triton.jit(do_not_specialize=["T", "H", "part_stride"])  # one compile for every T and H
def _wkv7_bwd_chunks_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [B, T, H, N]
    states_ptr, dstates_ptr,  # [B, H, NC, N, N] float32
    dy_ptr,  # [B, T, H, N]
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr,  # [NV, B, T, H, N]
    dv_ptr,  # [B, T, H, N]
    T, H, part_stride,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Split backward, pass 2: every (chunk, batch*head, value block) in parallel."""
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    NC = tl.cdiv(T, L)
    stride_t = H * N
    tok0 = i_b * T * stride_t + i_h * N
    part = i_v.to(tl.int64) * part_stride
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = (i_bh * NC + c) * N * N + offs_v[:, None] * N + offs_k[None, :]
    t = c * L + offs_t
    row = tok0 + t.to(tl.int64)[:, None] * stride_t
    S = tl.load(states_ptr + s_offs)
    dS = tl.load(dstates_ptr + s_offs)
    _chunk_grads(
        r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
        row + offs_k[None, :], row + offs_v[None, :], part, (t < T)[:, None], S, dS, offs_t,
        L, LOG2L, PREC, False,
    )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _auto_block_v(n_programs: int, N: int, L: int, device: torch.device, budget: int = 1 << 17) -> int:
    """The widest value block with block_v * N * L <= budget (shared memory: compiled for
    sm_90, the forward and the split backward fit 227 KB up to 2^17, the fused backward up to
    2^16) that still gives about two programs per SM."""
    bv = N
    while bv > 16 and bv * N * L > budget:
        bv //= 2
    if device.type != "cuda":
        return bv
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    while bv > 16 and n_programs * (N // bv) < 2 * sms:
        bv //= 2
    return bv


def _auto_warps(block_v: int, N: int) -> int:
    return 8 if block_v * N >= 2048 else 4


def _check_config(N: int, chunk_size: int, block_v: int, precision: str) -> None:
    if N not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"wkv7_triton: head size {N} not supported (supported: {SUPPORTED_HEAD_SIZES})")
    if chunk_size not in SUPPORTED_CHUNKS:
        raise ValueError(f"wkv7_triton: chunk_size must be one of {SUPPORTED_CHUNKS}, got {chunk_size}")
    if block_v < 16 or block_v > N or N % block_v:
        raise ValueError(f"wkv7_triton: block_v must divide the head size {N} and be >= 16, got {block_v}")
    if precision not in PRECISIONS:
        raise ValueError(f"wkv7_triton: precision must be one of {PRECISIONS}, got {precision!r}")


def wkv7_forward(
    r, log_w, k, v, a, b, state, *, chunk_size: int, block_v: int | None, num_warps: int | None,
    precision: str, out_dtype: torch.dtype, save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel on contiguous inputs. Returns ``(y, final state, states)``,
    ``states`` ([B, H, T/L, N, N] float32, the state entering each chunk) when ``save_states``."""
    B, T, H, N = r.shape
    bv = block_v or _auto_block_v(B * H, N, chunk_size, r.device)
    _check_config(N, chunk_size, bv, precision)
    nc = triton.cdiv(T, chunk_size)
    y = _empty((B, T, H, N), out_dtype, r.device)
    sT = _empty((B, H, N, N), torch.float32, r.device)
    states = _empty((B, H, nc, N, N), torch.float32, r.device) if save_states else sT
    s0 = state if state is not None else sT
    grid = (B * H, N // bv)
    _wkv7_fwd_kernel[grid](
        r, log_w, k, v, a, b, s0, y, sT, states, T, H,
        N=N, L=chunk_size, LOG2L=int(math.log2(chunk_size)), BV=bv,
        HAS_S0=state is not None, SAVE_STATES=save_states, PREC=precision,
        num_warps=num_warps or _auto_warps(bv, N),
    )
    return y, sT, (states if save_states else None)


def wkv7_backward(
    r, log_w, k, v, a, b, states, dy, dsT, *, chunk_size: int, block_v: int | None,
    num_warps: int | None, precision: str, mode: str = "split",
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels. ``mode`` "fused": one sequential kernel; "split": a lean
    sequential scan of dS (storing dS per chunk, float32) then all chunks in parallel.
    Returns ``(dr, dlog_w, dk, dv, da, db, dstate0)``, the input gradients in their inputs'
    dtypes and dstate0 in float32."""
    B, T, H, N = r.shape
    if mode not in BWD_MODES:
        raise ValueError(f"wkv7_triton: bwd_mode must be one of {BWD_MODES}, got {mode!r}")
    bv = block_v or _auto_block_v(B * H, N, chunk_size, r.device, budget=1 << (16 if mode == "fused" else 17))
    _check_config(N, chunk_size, bv, precision)
    nv = N // bv
    nc = triton.cdiv(T, chunk_size)
    inputs = (r, log_w, k, a, b)
    if nv == 1:
        parts = [_empty((1, B, T, H, N), x.dtype, r.device) for x in inputs]
    else:
        parts = [_empty((nv, B, T, H, N), torch.float32, r.device) for _ in inputs]
    dv = _empty((B, T, H, N), v.dtype, r.device)
    ds0 = _empty((B, H, N, N), torch.float32, r.device)
    dr, dlw, dk, da, db = parts
    meta = dict(N=N, L=chunk_size, LOG2L=int(math.log2(chunk_size)), BV=bv, PREC=precision)
    warps = num_warps or _auto_warps(bv, N)
    if mode == "fused":
        _wkv7_bwd_kernel[(B * H, nv)](
            r, log_w, k, v, a, b, states, dy, dsT if dsT is not None else ds0,
            dr, dlw, dk, da, db, dv, ds0, T, H, B * T * H * N,
            HAS_DST=dsT is not None, num_warps=warps, **meta,
        )
    else:
        dstates = _empty((B, H, nc, N, N), torch.float32, r.device)
        _wkv7_bwd_state_kernel[(B * H, nv)](
            r, log_w, a, b, dy, dsT if dsT is not None else ds0, dstates, ds0, T, H,
            HAS_DST=dsT is not None, num_warps=warps, **meta,
        )
        _wkv7_bwd_chunks_kernel[(nc, B * H, nv)](
            r, log_w, k, v, a, b, states, dstates, dy, dr, dlw, dk, da, db, dv, T, H, B * T * H * N,
            num_warps=warps, **meta,
        )
    grads = [p[0] if nv == 1 else p.sum(0).to(x.dtype) for p, x in zip(parts, inputs)]
    dr, dlw, dk, da, db = grads
    return dr, dlw, dk, dv, da, db, ds0


# --------------------------------------------------------------------------------------------
# Autograd and the public function
# --------------------------------------------------------------------------------------------


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, state, cfg, out_dtype):
        save = any(ctx.needs_input_grad[:7])  # (grad mode is off inside forward)
        y, sT, states = wkv7_forward(
            r, log_w, k, v, a, b, state, chunk_size=cfg["chunk_size"], block_v=cfg["block_v"],
            num_warps=cfg["num_warps"], precision=cfg["precision"], out_dtype=out_dtype, save_states=save,
        )
        if save:
            ctx.save_for_backward(r, log_w, k, v, a, b, states)
            ctx.cfg = cfg
            ctx.has_state = state is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, log_w, k, v, a, b, states = ctx.saved_tensors
        cfg = ctx.cfg
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dlw, dk, dv, da, db, ds0 = wkv7_backward(
            r, log_w, k, v, a, b, states, dy, dsT, chunk_size=cfg["chunk_size"], block_v=cfg["bwd_block_v"],
            num_warps=cfg["bwd_num_warps"], precision=cfg["precision"], mode=cfg["bwd_mode"],
        )
        ds0 = ds0 if ctx.has_state else None
        return dr, dlw, dk, dv, da, db, ds0, None, None


def wkv7_triton(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    block_v: int | None = None,
    num_warps: int | None = None,
    bwd_block_v: int | None = None,
    bwd_num_warps: int | None = None,
    bwd_mode: str = "split",
    precision: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV with Triton kernels (forward and backward).

    Args: ``r, log_w, k, v, a, b`` [B, T, H, N] in float32, bfloat16 or float16 (``log_w``,
    the log-decay, may have its own dtype, e.g. float32; it must lie in [-exp(-0.5), 0],
    RWKV-7's bound, which the chunk formula relies on and which is not checked); ``state``
    [B, H, N(value), N(key)] or None for zeros. N in 16/32/64/128.
    Tuning (None = automatic): ``chunk_size`` (16/32/64), ``block_v`` (value rows per
    program), ``num_warps``, the same two for the backward, ``bwd_mode`` ("fused" or
    "split", see ``wkv7_backward``) and ``precision`` of the matmul inputs ("ieee", "tf32",
    "tf32x3"; None: ieee for float32 inputs, else tf32).
    Returns ``(y [B, T, H, N] in out_dtype (default r.dtype), final state float32)``.
    """
    if not (r.shape == log_w.shape == k.shape == v.shape == a.shape == b.shape) or r.dim() != 4:
        raise ValueError(
            "wkv7_triton: r, log_w, k, v, a, b must share one [B, T, H, N] shape, got "
            f"{[tuple(x.shape) for x in (r, log_w, k, v, a, b)]}"
        )
    B, T, H, N = r.shape
    for name, x in zip(("r", "log_w", "k", "v", "a", "b"), (r, log_w, k, v, a, b)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"wkv7_triton: {name} has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv7_triton: state must be [{B}, {H}, {N}, {N}], got {tuple(state.shape)}")
    if precision is None:
        precision = "ieee" if r.dtype == torch.float32 else "tf32"
    out_dtype = out_dtype or r.dtype
    if T == 0:
        s = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device) if state is None else state.float()
        return r.new_zeros(B, 0, H, N, dtype=out_dtype), s
    cfg = dict(
        chunk_size=chunk_size, block_v=block_v, num_warps=num_warps,
        bwd_block_v=bwd_block_v, bwd_num_warps=bwd_num_warps, bwd_mode=bwd_mode,
        precision=precision,
    )
    xs = [x.contiguous() for x in (r, log_w, k, v, a, b)]
    s0 = None if state is None else state.float().contiguous()
    return _WKV7Function.apply(*xs, s0, cfg, out_dtype)
