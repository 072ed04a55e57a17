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

Scan form. Substituting SA = W S0^T + U, with W = (I - A_ab)^{-1} aq and
U = (I - A_ab)^{-1} A_ak V (neither depends on the state), the chunk's state update becomes
    S_L = S0 diag(gL) + S0 M + D,     M = W^T be [key, key],  D = V^T ke + U^T be [value, key]
and the gradient of the state entering the chunk
    dS0 = dS_L diag(gL) + dS_L M^T + E,     E = dY^T Q,  Q = rq + A_rb W.
So the only sequential work is a lean scan with one [value, key] x [key, key] product per
chunk; everything else is parallel over chunks.

Kernels (every one works on a table of chunks, so packed variable-length batches and dense
[B, T] batches are one code path; a chunk never crosses a sequence boundary):
    forward:  _prep (per chunk: gL, M, D) -> _scan (per sequence, head: the state entering
              every chunk, and the final state) -> _out (per chunk: y from its entering state)
    backward: _bwd_prep (per chunk: E) -> _scan in reverse (dS leaving every chunk, dS of the
              initial state) -> _bwd_chunks (per chunk: every input gradient)
and _recurrent, the step-by-step form for decoding (small T, no gradient), which may update
the state in place. The scan keeps the diagonal part exact (S * gL) and takes the product
with M in its own precision. The state entering every chunk is stored in float32
([chunks, H, N, N]); M and gL are kept for the backward, so neither scan is run twice.
Key-side input gradients summed over value blocks go through a float32 [NV, ...] buffer when
there is more than one block.

Matmul precision: "ieee" (exact float32, CUDA cores), "tf32" (tensor cores; ~4e-4 relative
error) or "tf32x3" (tensor cores, ~float32 accuracy at 3x the MMA work). Default: ieee for
float32 inputs, tf32 for bf16/fp16 inputs. Accumulation is float32 everywhere.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .chunk_table import ChunkTable, dense_table, varlen_table

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
SUPPORTED_CHUNKS = (16, 32, 64)
PRECISIONS = ("ieee", "tf32", "tf32x3")
# Chosen by the sweep (benchmarks/NOTES.md, H200): chunk 16 when a gradient is needed (the
# backward's per-chunk kernel dominates and prefers small tiles), 32 for inference.
DEFAULT_CHUNK_TRAIN = 16
DEFAULT_CHUNK_INFER = 32
IMPLS = ("stored", "recompute")
# impl "stored" at head size 16 hit an illegal memory access on an H100 (Triton 3.6; not yet
# understood) and at 128 its [L, 128] tiles spill: those sizes take "recompute"
STORED_HEAD_SIZES = (32, 64)
DEFAULT_CHUNK_STORED = 64
RECURRENT_MAX_T = 16  # the dispatcher decodes up to this many tokens step by step


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


@triton.jit
def _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N: tl.constexpr, L: tl.constexpr):
    """Chunk ``c`` of head ``h``: its rows' offsets in the flat [tokens, H, N] layout and the
    mask of the rows inside its sequence (a chunk never crosses a sequence boundary)."""
    seq = tl.load(chunk_seq_ptr + c)
    start = tl.load(cu_ptr + seq) + (c - tl.load(chunk_cu_ptr + seq)) * L
    t = start + offs_t
    return (t.to(tl.int64) * H + h) * N, (t < tl.load(cu_ptr + seq + 1))[:, None]


@triton.jit(do_not_specialize=["H"])
def _prep_kernel(
    lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # chunk tables (int32)
    gl_ptr,  # [chunks, H, N] float32 out
    m_ptr, d_ptr,  # [chunks, H, N, N] float32 out
    H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk: gL, M = W^T be and this value block's rows of D = V^T ke + U^T be."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    row, tmask = _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N, L)
    pk = row[:, None] + offs_k[None, :]
    lw = tl.load(lw_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row[:, None] + offs_v[None, :], mask=tmask, other=0.0).to(tl.float32)

    lam = tl.cumsum(lw, axis=0)
    lam_last = tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0)
    aq = a * tl.exp(lam - lw)
    gi = tl.exp(-lam)
    ge = tl.exp(lam_last[None, :] - lam)
    strict = offs_t[:, None] > offs_t[None, :]
    A_ab = tl.where(strict, tl.dot(aq, tl.trans(b * gi), input_precision=PREC), 0.0)
    A_ak = tl.where(strict, tl.dot(aq, tl.trans(k * gi), input_precision=PREC), 0.0)
    Ti = _unit_lower_inverse(A_ab, offs_t, L, LOG2L, PREC)
    be = b * ge
    U = tl.dot(Ti, tl.dot(A_ak, v, input_precision=PREC), input_precision=PREC)  # [L, BV]
    D = tl.dot(tl.trans(v), k * ge, input_precision=PREC) + tl.dot(tl.trans(U), be, input_precision=PREC)
    base = (c.to(tl.int64) * H + h) * N
    tl.store(d_ptr + base * N + offs_v[:, None] * N + offs_k[None, :], D)
    if i_v == 0:
        W = tl.dot(Ti, aq, input_precision=PREC)  # [L, N]
        M = tl.dot(tl.trans(W), be, input_precision=PREC)  # [N, N]
        tl.store(m_ptr + base * N + offs_k[:, None] * N + offs_k[None, :], M)
        tl.store(gl_ptr + base + offs_k, tl.exp(lam_last))


@triton.jit(do_not_specialize=["H", "n_chunks"])
def _scan_kernel(
    s0_ptr,  # [seqs, H, N, N] float32 (unused unless HAS_S0)
    gl_ptr,  # [chunks, H, N] float32
    m_ptr, d_ptr,  # [chunks, H, N, N] float32
    states_ptr,  # [chunks, H, N, N] float32 out: the carried matrix before each chunk's update
    sT_ptr,  # [seqs, H, N, N] float32 out
    chunk_cu_ptr,
    H, n_chunks,
    N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, REVERSE: tl.constexpr, PREC: tl.constexpr,
):
    """The sequential part. Forward: S <- S diag(gL) + S M + D over the chunks in order, storing
    the state entering each. REVERSE: dS <- dS diag(gL) + dS M^T + E over the chunks backwards,
    storing the gradient of the state leaving each (``d_ptr`` holds E)."""
    i_sh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    seq = i_sh // H
    h = i_sh % H
    c0 = tl.load(chunk_cu_ptr + seq)
    nc = tl.load(chunk_cu_ptr + seq + 1) - c0
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = offs_v[:, None] * N + offs_k[None, :]
    if REVERSE:
        m_offs = offs_k[None, :] * N + offs_k[:, None]  # M^T
    else:
        m_offs = offs_k[:, None] * N + offs_k[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + i_sh * N * N + s_offs)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)

    # the next chunk's matrices are loaded one iteration ahead (their latency hides behind
    # this chunk's product)
    if REVERSE:
        c = c0 + nc - 1
    else:
        c = c0
    # (clamped into the table: the prefetch past the last chunk loads a valid, unused one)
    base = tl.minimum(tl.maximum(c, 0), n_chunks - 1).to(tl.int64) * H + h
    gl_n = tl.load(gl_ptr + base * N + offs_k)
    m_n = tl.load(m_ptr + base * N * N + m_offs)
    d_n = tl.load(d_ptr + base * N * N + s_offs)
    for j in range(nc):
        tl.store(states_ptr + base * N * N + s_offs, S)
        gl = gl_n
        M = m_n
        D = d_n
        if REVERSE:
            c = c0 + nc - 2 - j
        else:
            c = c0 + j + 1
        base_n = tl.minimum(tl.maximum(c, 0), n_chunks - 1).to(tl.int64) * H + h
        gl_n = tl.load(gl_ptr + base_n * N + offs_k)
        m_n = tl.load(m_ptr + base_n * N * N + m_offs)
        d_n = tl.load(d_ptr + base_n * N * N + s_offs)
        S = S * gl[None, :] + tl.dot(S, M, input_precision=PREC) + D
        base = base_n
    tl.store(sT_ptr + i_sh * N * N + s_offs, S)


@triton.jit(do_not_specialize=["H"])
def _out_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    states_ptr,  # [chunks, H, N, N] float32: the state entering each chunk
    y_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and value block: Y = rq S0^T + A_rk V + A_rb SA, SA = (I - A_ab)^{-1}(aq S0^T + A_ak V)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    row, tmask = _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N, L)
    pk = row[:, None] + offs_k[None, :]
    pv = row[:, None] + offs_v[None, :]
    S = tl.load(states_ptr + (c.to(tl.int64) * H + h) * N * N + offs_v[:, None] * N + offs_k[None, :])
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + pv, mask=tmask, other=0.0).to(tl.float32)
    g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk, Ti = _chunk_keyside(
        r, lw, k, a, b, offs_t, L, LOG2L, PREC
    )
    X = tl.dot(aq, tl.trans(S), input_precision=PREC) + tl.dot(A_ak, v, input_precision=PREC)
    SA = tl.dot(Ti, X, input_precision=PREC)
    Y = tl.dot(rq, tl.trans(S), input_precision=PREC)
    Y += tl.dot(A_rk, v, input_precision=PREC)
    Y += tl.dot(A_rb, SA, input_precision=PREC)
    tl.store(y_ptr + pv, Y.to(y_ptr.dtype.element_ty), mask=tmask)


@triton.jit(do_not_specialize=["H"])
def _bwd_prep_kernel(
    r_ptr, lw_ptr, a_ptr, b_ptr, dy_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    e_ptr,  # [chunks, H, N, N] float32 out
    H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and value block: E = dY^T Q with Q = rq + A_rb (I - A_ab)^{-1} aq."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    row, tmask = _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N, L)
    pk = row[:, None] + offs_k[None, :]
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    dY = tl.load(dy_ptr + row[:, None] + offs_v[None, :], mask=tmask, other=0.0).to(tl.float32)
    lam = tl.cumsum(lw, axis=0)
    aq = a * tl.exp(lam - lw)
    rq = r * tl.exp(lam)
    bi = b * tl.exp(-lam)
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]
    A_ab = tl.where(strict, tl.dot(aq, tl.trans(bi), input_precision=PREC), 0.0)
    A_rb = tl.where(incl, tl.dot(rq, tl.trans(bi), input_precision=PREC), 0.0)
    Ti = _unit_lower_inverse(A_ab, offs_t, L, LOG2L, PREC)
    W = tl.dot(Ti, aq, input_precision=PREC)
    Q = rq + tl.dot(A_rb, W, input_precision=PREC)
    E = tl.dot(tl.trans(dY), Q, input_precision=PREC)  # [BV, N]
    tl.store(e_ptr + (c.to(tl.int64) * H + h) * N * N + offs_v[:, None] * N + offs_k[None, :], E)


@triton.jit
def _chunk_grads(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr,
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
    pk, pv, part, tmask, S, dS, offs_t,
    L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of one chunk for one value block: from S = S0 and dS = dS_L ([BV, N] slices),
    store dv and this block's share of dr, dlog_w, dk, da, db."""
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


@triton.jit(do_not_specialize=["H", "part_stride"])
def _bwd_chunks_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    states_ptr, dstates_ptr,  # [chunks, H, N, N] float32
    dy_ptr,  # [tokens, H, N]
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr,  # [NV, tokens, H, N]: partial sums over value blocks
    dv_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H, part_stride,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Every (chunk, head, value block) in parallel: all input gradients of the chunk."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    part = i_v.to(tl.int64) * part_stride
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    row, tmask = _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N, L)
    s_offs = (c.to(tl.int64) * H + h) * N * N + offs_v[:, None] * N + offs_k[None, :]
    S = tl.load(states_ptr + s_offs)
    dS = tl.load(dstates_ptr + s_offs)
    _chunk_grads(
        r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
        row[:, None] + offs_k[None, :], row[:, None] + offs_v[None, :], part, tmask, S, dS, offs_t,
        L, LOG2L, PREC,
    )


# --------------------------------------------------------------------------------------------
# "stored" kernels: the key side is built once per chunk (by _sprep) and what the later passes
# need is kept in float32 scratch laid out per chunk ([chunks, H, L, N] / [chunks, H, L, L]), so
# that every later kernel is a handful of whole-chunk products (no inverse, no A_ab).
#   forward:  _sprep (gL, M, D; Q, Y0; and for the backward Ti, W, U) -> _scan -> _sout (Y = Q S0^T + Y0)
#   backward: _se (E = dY^T Q) -> _scan reversed -> _sbwd_value (dX, dv) -> _sbwd_key (dr, dlog_w, dk, da, db)
# Q = rq + A_rb W and Y0 = A_rk V + A_rb U, so Y = rq S0^T + A_rk V + A_rb (W S0^T + U) as above.
# --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L: tl.constexpr):
    """First token of chunk ``c`` and the end of its sequence (a chunk never crosses it)."""
    seq = tl.load(chunk_seq_ptr + c)
    return tl.load(cu_ptr + seq) + (c - tl.load(chunk_cu_ptr + seq)) * L, tl.load(cu_ptr + seq + 1)


@triton.jit
def _rows(ptr, start, end, h, H, N: tl.constexpr, L: tl.constexpr, C0, BC: tl.constexpr):
    """Pointers to the [L, BC] rows start.. (columns C0..) of head h of a [tokens, H, N] tensor
    and the mask of the rows before ``end``: a scalar 64-bit base plus 32-bit tile offsets."""
    offs_t = tl.arange(0, L)
    base = ptr + (start.to(tl.int64) * H + h) * N + C0
    return base + (offs_t[:, None] * (H * N) + tl.arange(0, BC)[None, :]), (start + offs_t < end)[:, None]


@triton.jit
def _load_rows(ptr, start, end, h, H, N: tl.constexpr, L: tl.constexpr):
    p, m = _rows(ptr, start, end, h, H, N, L, 0, N)
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, start, end, h, H, N: tl.constexpr, L: tl.constexpr):
    p, m = _rows(ptr, start, end, h, H, N, L, 0, N)
    tl.store(p, x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _after(x):
    """An int32 zero computed from the tile ``x``. Added to a pointer, it keeps the loads through
    that pointer from being issued before ``x`` exists: the compiler otherwise issues every
    load of a kernel up front, and all those tiles are then live at once and spill. (On the GPU
    a NaN or inf converts to 0 too; the interpreter never sees one here.)"""
    return (tl.sum(tl.sum(x, axis=1), axis=0) * 0.0).to(tl.int32)


@triton.jit
def _scaled_cols(ptr, e, start, end, h, H, N: tl.constexpr, L: tl.constexpr, C0, BC: tl.constexpr):
    """The [L, BC] rows of a [tokens, H, N] input (columns C0..) times exp(e), in float32."""
    p, m = _rows(ptr, start, end, h, H, N, L, C0, BC)
    return tl.load(p, mask=m, other=0.0).to(tl.float32) * tl.exp(e)


@triton.jit
def _block(ptr, ch, R: tl.constexpr, C: tl.constexpr, R0, BR: tl.constexpr, C0, BC: tl.constexpr):
    """Pointers to the [BR, BC] block at (R0, C0) of the [R, C] float32 scratch tile of
    chunk-head ``ch`` in a [chunks, H, R, C] tensor."""
    base = ptr + ch * (R * C) + R0 * C + C0
    return base + (tl.arange(0, BR)[:, None] * C + tl.arange(0, BC)[None, :])


@triton.jit
def _tile(ptr, ch, R: tl.constexpr, C: tl.constexpr):
    """Pointers to the whole [R, C] scratch tile of chunk-head ``ch``."""
    return _block(ptr, ch, R, C, 0, R, 0, C)


@triton.jit
def _chunk_inverse(lw_ptr, a_ptr, b_ptr, t0, t1, h, H, N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr,
                   PREC: tl.constexpr):
    """(I - A_ab)^{-1} of the chunk starting at token t0, A_ab = tril_strict(aq bi^T)."""
    offs_t = tl.arange(0, L)
    lw = _load_rows(lw_ptr, t0, t1, h, H, N, L)
    lam = tl.cumsum(lw, axis=0)
    A_ab = tl.dot(
        _load_rows(a_ptr, t0, t1, h, H, N, L) * tl.exp(lam - lw),
        tl.trans(_load_rows(b_ptr, t0, t1, h, H, N, L) * tl.exp(-lam)), input_precision=PREC,
    )
    return _unit_lower_inverse(tl.where(offs_t[:, None] > offs_t[None, :], A_ab, 0.0), offs_t, L, LOG2L, PREC)


@triton.jit(do_not_specialize=["H"])
def _sinv_kernel(
    lw_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    ti_ptr,  # [chunks, H, L, L] out
    H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr,
):
    """(I - A_ab)^{-1} per chunk and head, for _sprep_kernel with SPLIT_INV."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)
    Ti = _chunk_inverse(lw_ptr, a_ptr, b_ptr, t0, t1, h, H, N, L, LOG2L, PREC)
    tl.store(_tile(ti_ptr, c.to(tl.int64) * H + h, L, L), Ti)


@triton.jit
def _chunk_qy(r_ptr, lw_ptr, k_ptr, v_ptr, b_ptr, w_ptr, u_ptr, q_ptr, y0_ptr, t0, t1, h, H, ch,
              N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr):
    """Q = rq + A_rb W and Y0 = A_rb U + A_rk V of one chunk and head (W, U from the scratch)."""
    offs_t = tl.arange(0, L)
    incl = offs_t[:, None] >= offs_t[None, :]
    lam = tl.cumsum(_load_rows(lw_ptr, t0, t1, h, H, N, L), axis=0)
    rq = _scaled_cols(r_ptr, lam, t0, t1, h, H, N, L, 0, N)
    A_rb = tl.where(incl, tl.dot(rq, tl.trans(_scaled_cols(b_ptr, -lam, t0, t1, h, H, N, L, 0, N)), input_precision=PREC), 0.0)
    tl.store(_tile(q_ptr, ch, L, N), rq + tl.dot(A_rb, tl.load(_tile(w_ptr, ch, L, N)), input_precision=PREC))
    Y0 = tl.dot(A_rb, tl.load(_tile(u_ptr, ch, L, N)), input_precision=PREC)
    z = _after(Y0)
    A_rk = tl.where(incl, tl.dot(rq, tl.trans(_scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N)), input_precision=PREC), 0.0)
    Y0 += tl.dot(A_rk, _load_rows(v_ptr + z, t0, t1, h, H, N, L), input_precision=PREC)
    tl.store(_tile(y0_ptr, ch, L, N), Y0)


@triton.jit(do_not_specialize=["H"])
def _sqy_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, b_ptr,  # [tokens, H, N]
    w_ptr, u_ptr,  # [chunks, H, L, N] float32
    q_ptr, y0_ptr,  # [chunks, H, L, N] float32 out
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H,
    N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
):
    """Q and Y0 per chunk and head, for _sprep_kernel with SPLIT_QY."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)
    _chunk_qy(r_ptr, lw_ptr, k_ptr, v_ptr, b_ptr, w_ptr, u_ptr, q_ptr, y0_ptr, t0, t1, h, H,
              c.to(tl.int64) * H + h, N, L, PREC)


@triton.jit(do_not_specialize=["H"])
def _sprep_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    gl_ptr,  # [chunks, H, N] out
    m_ptr, d_ptr,  # [chunks, H, N, N] out
    q_ptr, y0_ptr, w_ptr, u_ptr,  # [chunks, H, L, N] out
    ti_ptr,  # [chunks, H, L, L]: out with STORE_BWD, in with SPLIT_INV
    H,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr, STORE_BWD: tl.constexpr,
    SPLIT_INV: tl.constexpr, SPLIT_QY: tl.constexpr,
):
    """Per chunk and head, the whole key side: gL, W, U, M = W^T be, D = V^T ke + U^T be, and
    unless SPLIT_QY (then _sqy_kernel does) Q, Y0 (the inputs are reloaded, cache hits,
    rather than kept live across the kernel)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    ch = c.to(tl.int64) * H + h
    offs_t = tl.arange(0, L)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)
    strict = offs_t[:, None] > offs_t[None, :]

    if SPLIT_INV:  # (I - A_ab)^{-1} made by _sinv_kernel
        Ti = tl.load(_tile(ti_ptr, ch, L, L))
    else:
        Ti = _chunk_inverse(lw_ptr, a_ptr, b_ptr, t0, t1, h, H, N, L, LOG2L, PREC)
    z = _after(Ti)  # (each step's loads wait for the step before: ``_after``)
    lw = _load_rows(lw_ptr + z, t0, t1, h, H, N, L)
    lam = tl.cumsum(lw, axis=0)
    aq = _load_rows(a_ptr + z, t0, t1, h, H, N, L) * tl.exp(lam - lw)
    A_ak = tl.dot(aq, tl.trans(_scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N)), input_precision=PREC)
    tl.store(_tile(w_ptr, ch, L, N), tl.dot(Ti, aq, input_precision=PREC))  # W [L, N]
    # (big tiles go to the scratch as soon as they are made and are read back where needed)
    z = _after(A_ak)
    p, m = _rows(v_ptr + z, t0, t1, h, H, N, L, 0, N)
    U = tl.dot(Ti, tl.dot(tl.where(strict, A_ak, 0.0), tl.load(p, mask=m, other=0.0).to(tl.float32), input_precision=PREC), input_precision=PREC)
    tl.store(_tile(u_ptr, ch, L, N), U)
    if STORE_BWD and not SPLIT_INV:
        tl.store(_tile(ti_ptr, ch, L, L), Ti)
    # M = W^T be, D = U^T be + V^T ke
    z = _after(U)
    lam_last = tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0)
    gL = tl.exp(lam_last)
    be = _scaled_cols(b_ptr + z, lam_last[None, :] - lam, t0, t1, h, H, N, L, 0, N)
    D = tl.dot(tl.trans(U), be, input_precision=PREC)
    tl.store(_tile(m_ptr, ch, N, N), tl.dot(tl.trans(tl.load(_tile(w_ptr + z, ch, L, N))), be, input_precision=PREC))
    z = _after(D)
    ke = _scaled_cols(k_ptr + z, lam_last[None, :] - lam, t0, t1, h, H, N, L, 0, N)
    D += tl.dot(tl.trans(_load_rows(v_ptr + z, t0, t1, h, H, N, L)), ke, input_precision=PREC)
    tl.store(_tile(d_ptr, ch, N, N), D)
    if not SPLIT_QY:
        _chunk_qy(r_ptr, lw_ptr, k_ptr, v_ptr, b_ptr, w_ptr + _after(D), u_ptr, q_ptr, y0_ptr, t0, t1, h, H, ch, N, L, PREC)
    tl.store(gl_ptr + ch * N + tl.arange(0, N), gL)


@triton.jit(do_not_specialize=["H"])
def _sout_kernel(
    q_ptr, y0_ptr,  # [chunks, H, L, N] float32
    states_ptr,  # [chunks, H, N, N] float32
    y_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H,
    N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Y = Q S0^T + Y0 for one chunk, head and value block."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    ch = c.to(tl.int64) * H + h
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)
    S = tl.load(_block(states_ptr, ch, N, N, i_v * BV, BV, 0, N))
    Y = tl.dot(tl.load(_tile(q_ptr, ch, L, N)), tl.trans(S), input_precision=PREC)
    Y += tl.load(_block(y0_ptr, ch, L, N, 0, L, i_v * BV, BV))
    p, m = _rows(y_ptr, t0, t1, h, H, N, L, i_v * BV, BV)
    tl.store(p, Y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["H"])
def _se_kernel(
    q_ptr,  # [chunks, H, L, N] float32
    dy_ptr,  # [tokens, H, N]
    e_ptr,  # [chunks, H, N, N] float32 out
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H,
    N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """E = dY^T Q for one chunk, head and value block."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    ch = c.to(tl.int64) * H + h
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)
    p, m = _rows(dy_ptr, t0, t1, h, H, N, L, i_v * BV, BV)
    dY = tl.load(p, mask=m, other=0.0).to(tl.float32)
    E = tl.dot(tl.trans(dY), tl.load(_tile(q_ptr, ch, L, N)), input_precision=PREC)
    tl.store(_block(e_ptr, ch, N, N, i_v * BV, BV, 0, N), E)


@triton.jit(do_not_specialize=["H"])
def _sbwd_value_kernel(
    r_ptr, lw_ptr, k_ptr, a_ptr, b_ptr, dy_ptr,  # [tokens, H, N]
    dstates_ptr,  # [chunks, H, N, N] float32: dS leaving each chunk
    ti_ptr,  # [chunks, H, L, L] float32
    dx_ptr,  # [chunks, H, L, N] float32 out
    dv_ptr,  # [tokens, H, N] out
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H,
    N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
):
    """dSA = be dS^T + A_rb^T dY, dX = Ti^T dSA, dv = ke dS^T + A_rk^T dY + A_ak^T dX."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    ch = c.to(tl.int64) * H + h
    offs_t = tl.arange(0, L)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]

    lw = _load_rows(lw_ptr, t0, t1, h, H, N, L)
    lam = tl.cumsum(lw, axis=0)
    gL = tl.exp(tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0))
    dS = tl.load(_tile(dstates_ptr, ch, N, N))
    # dSA = be dS^T + A_rb^T dY, dX = Ti^T dSA (each step's loads wait for the step before)
    bi = _scaled_cols(b_ptr, -lam, t0, t1, h, H, N, L, 0, N)
    dSA = tl.dot(bi * gL[None, :], tl.trans(dS), input_precision=PREC)
    z = _after(dSA)
    rq = _scaled_cols(r_ptr + z, lam, t0, t1, h, H, N, L, 0, N)
    A_rb = tl.where(incl, tl.dot(rq, tl.trans(bi), input_precision=PREC), 0.0)
    p, m = _rows(dy_ptr + z, t0, t1, h, H, N, L, 0, N)
    dY = tl.load(p, mask=m, other=0.0)  # in its own dtype while live
    dSA += tl.dot(tl.trans(A_rb), dY.to(tl.float32), input_precision=PREC)
    z = _after(dSA)
    dX = tl.dot(tl.trans(tl.load(_tile(ti_ptr + z, ch, L, L))), dSA, input_precision=PREC)
    tl.store(_tile(dx_ptr, ch, L, N), dX)
    # dv = ke dS^T + A_rk^T dY + A_ak^T dX
    z = _after(dX)
    ki = _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N)
    dv = tl.dot(ki * gL[None, :], tl.trans(dS), input_precision=PREC)
    dv += tl.dot(tl.trans(tl.where(incl, tl.dot(rq, tl.trans(ki), input_precision=PREC), 0.0)), dY.to(tl.float32), input_precision=PREC)
    aq = _load_rows(a_ptr + z, t0, t1, h, H, N, L) * tl.exp(lam - lw)
    dv += tl.dot(tl.trans(tl.where(strict, tl.dot(aq, tl.trans(ki), input_precision=PREC), 0.0)), dX, input_precision=PREC)
    _store_rows(dv_ptr, dv, t0, t1, h, H, N, L)


@triton.jit(do_not_specialize=["H"])
def _sbwd_key_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr,  # [tokens, H, N]
    states_ptr, dstates_ptr,  # [chunks, H, N, N] float32
    w_ptr, u_ptr, dx_ptr,  # [chunks, H, L, N] float32
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr,  # [tokens, H, N] out
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H,
    N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
):
    """Every gradient on the key side in one program per chunk and head: SA = W S0^T + U, dke,
    dbe, then the r side (dA_rk = dY V^T, dA_rb = dY SA^T: drq and their share of dki, dbi) and
    the a side (dA_ak = dX V^T, dA_ab = dX SA^T: daq and theirs), and through the scalings dr,
    dlog_w, dk, da, db. (Each step's loads wait for the step before: ``_after``.)"""
    c = tl.program_id(0)
    h = tl.program_id(1)
    ch = c.to(tl.int64) * H + h
    offs_t = tl.arange(0, L)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)

    lam = tl.cumsum(_load_rows(lw_ptr, t0, t1, h, H, N, L), axis=0)
    gL = tl.exp(tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0))
    S = tl.load(_tile(states_ptr, ch, N, N))  # [V, K]
    dS = tl.load(_tile(dstates_ptr, ch, N, N))
    dlam_last = tl.sum(dS * S, axis=0) * gL  # dgL gL; + colsum(dke ke + dbe be) below
    z = _after(dS)
    SA = tl.dot(tl.load(_tile(w_ptr + z, ch, L, N)), tl.trans(S), input_precision=PREC)
    SA += tl.load(_tile(u_ptr + z, ch, L, N))  # [L, V]
    z = _after(SA)
    p, m = _rows(v_ptr + z, t0, t1, h, H, N, L, 0, N)
    v = tl.load(p, mask=m, other=0.0)  # in its own dtype while live
    # dk and db are accumulated as dk / gi = dke gL + dki and db / gi = dbe gL + dbi
    dk = tl.dot(v.to(tl.float32), dS, input_precision=PREC) * gL[None, :]
    db = tl.dot(SA, dS, input_precision=PREC) * gL[None, :]
    z = _after(db)
    dlam_last += tl.sum(dk * _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), axis=0)
    dlam_last += tl.sum(db * _scaled_cols(b_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), axis=0)

    # the r side
    incl = offs_t[:, None] >= offs_t[None, :]
    dY = _load_rows(dy_ptr + z, t0, t1, h, H, N, L)
    drq = tl.dot(dY, S, input_precision=PREC)
    dA_rb = tl.where(incl, tl.dot(dY, tl.trans(SA), input_precision=PREC), 0.0)
    dA_rk = tl.where(incl, tl.dot(dY, tl.trans(v.to(tl.float32)), input_precision=PREC), 0.0)
    z = _after(dA_rk)
    drq += tl.dot(dA_rb, _scaled_cols(b_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    drq += tl.dot(dA_rk, _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    g = tl.exp(lam)
    _store_rows(dr_ptr, drq * g, t0, t1, h, H, N, L)
    rq = _load_rows(r_ptr + z, t0, t1, h, H, N, L) * g
    dlam = drq * rq  # dLam = dr r - dk k - db b (+ dLam' = da a, separately)
    db += tl.dot(tl.trans(dA_rb), rq, input_precision=PREC)
    dk += tl.dot(tl.trans(dA_rk), rq, input_precision=PREC)

    # the a side
    z = _after(dk)
    dX = tl.load(_tile(dx_ptr + z, ch, L, N))
    strict = offs_t[:, None] > offs_t[None, :]
    daq = tl.dot(dX, tl.load(_tile(states_ptr + z, ch, N, N)), input_precision=PREC)
    dA_ab = tl.where(strict, tl.dot(dX, tl.trans(SA), input_precision=PREC), 0.0)
    dA_ak = tl.where(strict, tl.dot(dX, tl.trans(v.to(tl.float32)), input_precision=PREC), 0.0)
    z = _after(dA_ak)
    daq += tl.dot(dA_ab, _scaled_cols(b_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    daq += tl.dot(dA_ak, _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    gp = tl.exp(lam - _load_rows(lw_ptr + z, t0, t1, h, H, N, L))
    _store_rows(da_ptr, daq * gp, t0, t1, h, H, N, L)
    aq = _load_rows(a_ptr + z, t0, t1, h, H, N, L) * gp
    dlamp = daq * aq  # dLam' = da a
    db += tl.dot(tl.trans(dA_ab), aq, input_precision=PREC)
    dk += tl.dot(tl.trans(dA_ak), aq, input_precision=PREC)
    gi = tl.exp(-lam)
    dk *= gi
    db *= gi
    _store_rows(dk_ptr, dk, t0, t1, h, H, N, L)
    _store_rows(db_ptr, db, t0, t1, h, H, N, L)
    z = _after(db)
    dlam -= dk * _load_rows(k_ptr + z, t0, t1, h, H, N, L) + db * _load_rows(b_ptr + z, t0, t1, h, H, N, L)
    dlw = tl.cumsum(dlam + dlamp, axis=0, reverse=True) - dlamp + dlam_last[None, :]
    _store_rows(dlw_ptr, dlw, t0, t1, h, H, N, L)


@triton.jit(do_not_specialize=["H", "acc_stride"])
def _sbwd_r_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, b_ptr, dy_ptr,  # [tokens, H, N]
    states_ptr, dstates_ptr,  # [chunks, H, N, N] float32
    w_ptr, u_ptr,  # [chunks, H, L, N] float32
    dr_ptr,  # [tokens, H, N] out
    acc_ptr,  # [3, chunks, H, L, N] float32 out: dk / gi and db / gi so far, dLam so far
    dll_ptr,  # [chunks, H, N] float32 out: dLam_L
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H, acc_stride,
    N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
):
    """The key side's first half: dke, dbe and the r side (dA_rk = dY V^T, dA_rb = dY SA^T,
    SA = W S0^T + U): dr, and dk / gi = dke gL + dA_rk^T rq, db / gi = dbe gL + dA_rb^T rq,
    dLam = dr r and dLam_L for ``_sbwd_a_kernel`` (float32 scratch)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    ch = c.to(tl.int64) * H + h
    offs_t = tl.arange(0, L)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)

    lam = tl.cumsum(_load_rows(lw_ptr, t0, t1, h, H, N, L), axis=0)
    gL = tl.exp(tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0))
    S = tl.load(_tile(states_ptr, ch, N, N))  # [V, K]
    dS = tl.load(_tile(dstates_ptr, ch, N, N))
    dll = tl.sum(dS * S, axis=0) * gL  # dgL gL; + colsum(dke ke + dbe be) below
    z = _after(dS)
    SA = tl.dot(tl.load(_tile(w_ptr + z, ch, L, N)), tl.trans(S), input_precision=PREC)
    SA += tl.load(_tile(u_ptr + z, ch, L, N))
    z = _after(SA)
    p, m = _rows(v_ptr + z, t0, t1, h, H, N, L, 0, N)
    v = tl.load(p, mask=m, other=0.0)  # in its own dtype while live
    dk = tl.dot(v.to(tl.float32), dS, input_precision=PREC) * gL[None, :]  # dke gL
    tl.store(_tile(acc_ptr, ch, L, N), dk)
    dll += tl.sum(dk * _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), axis=0)
    db = tl.dot(SA, dS, input_precision=PREC) * gL[None, :]  # dbe gL
    tl.store(_tile(acc_ptr + acc_stride, ch, L, N), db)
    z = _after(db)
    dll += tl.sum(db * _scaled_cols(b_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), axis=0)
    tl.store(dll_ptr + ch * N + tl.arange(0, N), dll)

    incl = offs_t[:, None] >= offs_t[None, :]
    dY = _load_rows(dy_ptr + z, t0, t1, h, H, N, L)
    drq = tl.dot(dY, S, input_precision=PREC)
    dA_rb = tl.where(incl, tl.dot(dY, tl.trans(SA), input_precision=PREC), 0.0)
    dA_rk = tl.where(incl, tl.dot(dY, tl.trans(v.to(tl.float32)), input_precision=PREC), 0.0)
    z = _after(dA_rk)
    drq += tl.dot(dA_rb, _scaled_cols(b_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    drq += tl.dot(dA_rk, _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    g = tl.exp(lam)
    _store_rows(dr_ptr, drq * g, t0, t1, h, H, N, L)
    rq = _load_rows(r_ptr + z, t0, t1, h, H, N, L) * g
    tl.store(_tile(acc_ptr + 2 * acc_stride, ch, L, N), drq * rq)  # dLam: dr r
    z = _after(rq)
    db = tl.load(_tile(acc_ptr + acc_stride + z, ch, L, N)) + tl.dot(tl.trans(dA_rb), rq, input_precision=PREC)
    tl.store(_tile(acc_ptr + acc_stride, ch, L, N), db)
    dk = tl.load(_tile(acc_ptr + z, ch, L, N)) + tl.dot(tl.trans(dA_rk), rq, input_precision=PREC)
    tl.store(_tile(acc_ptr, ch, L, N), dk)


@triton.jit(do_not_specialize=["H", "acc_stride"])
def _sbwd_a_kernel(
    lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    states_ptr,  # [chunks, H, N, N] float32
    w_ptr, u_ptr, dx_ptr,  # [chunks, H, L, N] float32
    acc_ptr,  # [3, chunks, H, L, N] float32, from _sbwd_r_kernel
    dll_ptr,  # [chunks, H, N] float32, from _sbwd_r_kernel
    dlw_ptr, dk_ptr, da_ptr, db_ptr,  # [tokens, H, N] out
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H, acc_stride,
    N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr,
):
    """The key side's second half: the a side (dA_ak = dX V^T, dA_ab = dX SA^T): da, then dk,
    db and dlog_w with the first half's sums. (Each step's loads wait for the step before:
    ``_after``.)"""
    c = tl.program_id(0)
    h = tl.program_id(1)
    ch = c.to(tl.int64) * H + h
    offs_t = tl.arange(0, L)
    t0, t1 = _chunk_span(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, L)

    S = tl.load(_tile(states_ptr, ch, N, N))  # [V, K]
    SA = tl.dot(tl.load(_tile(w_ptr, ch, L, N)), tl.trans(S), input_precision=PREC) + tl.load(_tile(u_ptr, ch, L, N))
    dX = tl.load(_tile(dx_ptr + _after(SA), ch, L, N))
    daq = tl.dot(dX, S, input_precision=PREC)
    strict = offs_t[:, None] > offs_t[None, :]
    dA_ab = tl.where(strict, tl.dot(dX, tl.trans(SA), input_precision=PREC), 0.0)
    z = _after(dA_ab)
    dA_ak = tl.where(strict, tl.dot(dX, tl.trans(_load_rows(v_ptr + z, t0, t1, h, H, N, L)), input_precision=PREC), 0.0)
    z = _after(dA_ak)
    lw = _load_rows(lw_ptr + z, t0, t1, h, H, N, L)
    lam = tl.cumsum(lw, axis=0)
    daq += tl.dot(dA_ab, _scaled_cols(b_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    daq += tl.dot(dA_ak, _scaled_cols(k_ptr + z, -lam, t0, t1, h, H, N, L, 0, N), input_precision=PREC)
    gp = tl.exp(lam - lw)
    _store_rows(da_ptr, daq * gp, t0, t1, h, H, N, L)
    aq = _load_rows(a_ptr + z, t0, t1, h, H, N, L) * gp
    dlamp = daq * aq  # dLam' = da a
    z = _after(dlamp)
    gi = tl.exp(-lam)
    db = (tl.load(_tile(acc_ptr + acc_stride + z, ch, L, N)) + tl.dot(tl.trans(dA_ab), aq, input_precision=PREC)) * gi
    _store_rows(db_ptr, db, t0, t1, h, H, N, L)
    dk = (tl.load(_tile(acc_ptr + z, ch, L, N)) + tl.dot(tl.trans(dA_ak), aq, input_precision=PREC)) * gi
    _store_rows(dk_ptr, dk, t0, t1, h, H, N, L)
    # dLam = dr r - dk k - db b
    z = _after(dk)
    dlam = tl.load(_tile(acc_ptr + 2 * acc_stride + z, ch, L, N))
    dlam -= dk * _load_rows(k_ptr + z, t0, t1, h, H, N, L) + db * _load_rows(b_ptr + z, t0, t1, h, H, N, L)
    dll = tl.load(dll_ptr + ch * N + tl.arange(0, N))
    dlw = tl.cumsum(dlam + dlamp, axis=0, reverse=True) - dlamp + dll[None, :]
    _store_rows(dlw_ptr, dlw, t0, t1, h, H, N, L)


@triton.jit(do_not_specialize=["T", "H"])
def _recurrent_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [B, T, H, N]
    s0_ptr,  # [B, H, N, N] float32 (unused unless HAS_S0)
    y_ptr,  # [B, T, H, N]
    sT_ptr,  # [B, H, N, N] float32 (may be s0_ptr: the update is then in place)
    T, H,
    N: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
):
    """Step by step, as the reference: S <- S diag(w) + (S a) b^T + v k^T, y = S r."""
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
    for t in range(T):
        row = ((i_b * T + t) * H + h) * N
        r = tl.load(r_ptr + row + offs_k).to(tl.float32)
        w = tl.exp(tl.load(lw_ptr + row + offs_k).to(tl.float32))
        k = tl.load(k_ptr + row + offs_k).to(tl.float32)
        a = tl.load(a_ptr + row + offs_k).to(tl.float32)
        b = tl.load(b_ptr + row + offs_k).to(tl.float32)
        v = tl.load(v_ptr + row + offs_v).to(tl.float32)
        sa = tl.sum(S * a[None, :], axis=1)
        S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
        tl.store(y_ptr + row + offs_v, tl.sum(S * r[None, :], axis=1).to(y_ptr.dtype.element_ty))
    tl.store(sT_ptr + s_offs, S)


@triton.jit(do_not_specialize=["H"])
def _timemix_step_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, g_ptr,  # [B, C] (C = H N)
    gate_ptr, vf_ptr,  # [B, C] (unused unless HAS_GATE)
    kk_w_ptr, ka_w_ptr, lnw_ptr, lnb_ptr,  # [C]
    rk_ptr,  # [H, N]
    s_ptr,  # [B, H, N, N] float32, updated in place
    out_ptr,  # [B, C]
    H, eps,
    N: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """One decoding step of an RWKV-7 time-mix from the projections to the input of its output
    matrix, one head per program (see ``wkv7_timemix_step_``)."""
    i_bh = tl.program_id(0).to(tl.int64)
    h = i_bh % H
    offs = tl.arange(0, N)
    row = i_bh * N + offs  # [B, C] rows: b C + h N = (b H + h) N
    ch = h * N + offs
    r = tl.load(r_ptr + row).to(tl.float32)
    k = tl.load(k_ptr + row).to(tl.float32)
    v = tl.load(v_ptr + row).to(tl.float32)
    a = tl.load(a_ptr + row).to(tl.float32)
    w = tl.exp(tl.load(lw_ptr + row).to(tl.float32))
    if HAS_GATE:  # value residual: lerp(v, v_first, gate)
        vf = tl.load(vf_ptr + row).to(tl.float32)
        v = v + tl.load(gate_ptr + row).to(tl.float32) * (vf - v)
    kk = k * tl.load(kk_w_ptr + ch).to(tl.float32)
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=0)), 1e-12)
    ka = tl.load(ka_w_ptr + ch).to(tl.float32)
    k = k * (1.0 - ka + a * ka)
    # S <- S diag(w) + (S (-kk)) (kk a)^T + v k^T; y = S r  (S [value, key])
    s_offs = i_bh * N * N + offs[:, None] * N + offs[None, :]
    S = tl.load(s_ptr + s_offs)
    sa = tl.sum(S * (-kk)[None, :], axis=1)
    S = S * w[None, :] + sa[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
    tl.store(s_ptr + s_offs, S)
    y = tl.sum(S * r[None, :], axis=1)
    # GroupNorm over the head, then the bonus (r . (r_k k)) v, then the gate g
    mean = tl.sum(y, axis=0) / N
    d = y - mean
    y = d / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    y = y * tl.load(lnw_ptr + ch).to(tl.float32) + tl.load(lnb_ptr + ch).to(tl.float32)
    y += tl.sum(r * tl.load(rk_ptr + ch).to(tl.float32) * k, axis=0) * v
    y *= tl.load(g_ptr + row).to(tl.float32)
    tl.store(out_ptr + row, y.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_block_v(
    n_programs: int, N: int, L: int, device: torch.device, budget: int = 1 << 17, min_waves: float = 2
) -> int:
    """The widest value block with block_v * N * L <= budget (shared memory) that still gives
    ``min_waves`` programs per SM (the sweep: full-width blocks win while there are enough
    programs; narrower ones pay for partial sums and repeated key-side work)."""
    bv = N
    while bv > 16 and bv * N * L > budget:
        bv //= 2
    while bv > 16 and n_programs * (N // bv) < min_waves * _sms(device):
        bv //= 2
    return bv


def _auto_warps(block_v: int, N: int) -> int:
    return 4  # the sweep: 4 warps beat 8 in every kernel at every chunk size


def _check_config(N: int, chunk_size: int | None, block_v: int | None, precision: str, impl: str | None = None) -> None:
    """Tuning arguments (the head size is checked with the inputs; None: not checked)."""
    if chunk_size is not None and chunk_size not in SUPPORTED_CHUNKS:
        raise ValueError(f"wkv7_triton: chunk_size must be one of {SUPPORTED_CHUNKS}, got {chunk_size}")
    if block_v is not None and (block_v < 16 or block_v > N or N % block_v):
        raise ValueError(f"wkv7_triton: block_v must divide the head size {N} and be >= 16, got {block_v}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"wkv7_triton: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "stored" and N not in STORED_HEAD_SIZES:
        raise ValueError(f"wkv7_triton: impl 'stored' needs a head size in {STORED_HEAD_SIZES}, got {N}")
    if precision not in PRECISIONS:
        raise ValueError(f"wkv7_triton: precision must be one of {PRECISIONS}, got {precision!r}")


def _scan(s0, gl, m, d, table: ChunkTable, H: int, N: int, *, reverse: bool, block_v, num_warps, precision):
    """Run the scan; returns (per-chunk carried matrices, final matrix) in float32."""
    bv = block_v or _auto_block_v(table.n_seqs * H, N, 0, gl.device, min_waves=0.5)
    _check_config(N, None, bv, precision)
    out = _empty((table.n_chunks, H, N, N), torch.float32, gl.device)
    fin = _empty((table.n_seqs, H, N, N), torch.float32, gl.device)
    _scan_kernel[(table.n_seqs * H, N // bv)](
        s0 if s0 is not None else fin, gl, m, d, out, fin, table.chunk_cu, H, table.n_chunks,
        N=N, BV=bv, HAS_S0=s0 is not None, REVERSE=reverse, PREC=precision,
        num_warps=num_warps or 4,
    )
    return out, fin


def wkv7_forward(
    r, log_w, k, v, a, b, state, table: ChunkTable, cfg: dict, out_dtype: torch.dtype, need_bwd: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Launch the forward kernels on contiguous [B, T, H, N] inputs laid out as ``table``
    says. Returns ``(y, final states [S, H, N, N], what the backward needs)`` (the last empty
    unless ``need_bwd``)."""
    H, N = r.shape[-2:]
    L, prec = cfg["chunk_size"], cfg["precision"]
    nc = table.n_chunks
    tabs = (table.cu, table.chunk_cu, table.chunk_seq)
    gl = _empty((nc, H, N), torch.float32, r.device)
    m = _empty((nc, H, N, N), torch.float32, r.device)
    d = _empty((nc, H, N, N), torch.float32, r.device)
    scan = dict(block_v=cfg["scan_block_v"], num_warps=cfg["scan_num_warps"], precision=cfg["scan_precision"])
    y = _empty(r.shape, out_dtype, r.device)
    if cfg["impl"] == "stored":
        _check_config(N, L, None, prec)
        q = _empty((nc, H, L, N), torch.float32, r.device)
        y0 = _empty((nc, H, L, N), torch.float32, r.device)
        w = _empty((nc, H, L, N), torch.float32, r.device)
        u = _empty((nc, H, L, N), torch.float32, r.device)
        split_inv = cfg["split_inverse"]
        ti = _empty((nc, H, L, L), torch.float32, r.device) if need_bwd or split_inv else q
        log2l = int(math.log2(L))
        if split_inv:
            _sinv_kernel[(nc, H)](log_w, a, b, *tabs, ti, H, N=N, L=L, LOG2L=log2l, PREC=prec, num_warps=4)
        _sprep_kernel[(nc, H)](
            r, log_w, k, v, a, b, *tabs, gl, m, d, q, y0, w, u, ti, H,
            N=N, L=L, LOG2L=log2l, PREC=prec, STORE_BWD=need_bwd, SPLIT_INV=split_inv, SPLIT_QY=cfg["split_qy"],
            num_warps=cfg["num_warps"] or 4,
        )
        if cfg["split_qy"]:
            _sqy_kernel[(nc, H)](r, log_w, k, v, b, w, u, q, y0, *tabs, H, N=N, L=L, PREC=prec, num_warps=4)
        states, sT = _scan(state, gl, m, d, table, H, N, reverse=False, **scan)
        bv = cfg["block_v"] or N
        _check_config(N, None, bv, prec)
        _sout_kernel[(nc, H, N // bv)](q, y0, states, y, *tabs, H, N=N, L=L, BV=bv, PREC=prec, num_warps=4)
        return y, sT, ((states, m, gl, q, w, u, ti) if need_bwd else ())
    bv = cfg["block_v"] or _auto_block_v(nc * H, N, L, r.device)
    _check_config(N, L, bv, prec)
    meta = dict(N=N, L=L, LOG2L=int(math.log2(L)), BV=bv, PREC=prec, num_warps=cfg["num_warps"] or _auto_warps(bv, N))
    grid = (nc, H, N // bv)
    _prep_kernel[grid](log_w, k, v, a, b, *tabs, gl, m, d, H, **meta)
    states, sT = _scan(state, gl, m, d, table, H, N, reverse=False, **scan)
    _out_kernel[grid](r, log_w, k, v, a, b, states, y, *tabs, H, **meta)
    return y, sT, ((states, m, gl) if need_bwd else ())


def wkv7_backward(
    r, log_w, k, v, a, b, saved, dy, dsT, table: ChunkTable, cfg: dict
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels (``saved``: what ``wkv7_forward`` returned for it). Returns
    ``(dr, dlog_w, dk, dv, da, db, dstate0)``, the input gradients in their inputs' dtypes and
    dstate0 [S, H, N, N] in float32."""
    H, N = r.shape[-2:]
    L, prec = cfg["chunk_size"], cfg["precision"]
    nc = table.n_chunks
    tabs = (table.cu, table.chunk_cu, table.chunk_seq)
    scan = dict(block_v=cfg["scan_block_v"], num_warps=cfg["scan_num_warps"], precision=cfg["scan_precision"])
    e = _empty((nc, H, N, N), torch.float32, r.device)
    if cfg["impl"] == "stored":
        states, m, gl, q, w, u, ti = saved
        bv = cfg["bwd_block_v"] or N
        _check_config(N, L, bv, prec)
        _se_kernel[(nc, H, N // bv)](q, dy, e, *tabs, H, N=N, L=L, BV=bv, PREC=prec, num_warps=4)
        dstates, ds0 = _scan(dsT, gl, m, e, table, H, N, reverse=True, **scan)
        dx = _empty((nc, H, L, N), torch.float32, r.device)
        dv = _empty(r.shape, v.dtype, r.device)
        _sbwd_value_kernel[(nc, H)](
            r, log_w, k, a, b, dy, dstates, ti, dx, dv, *tabs, H, N=N, L=L, PREC=prec,
            num_warps=cfg["bwd_num_warps"] or 4,
        )
        dr, dlw, dk, da, db = (_empty(x.shape, x.dtype, x.device) for x in (r, log_w, k, a, b))
        meta = dict(N=N, L=L, PREC=prec, num_warps=cfg["bwd_key_num_warps"] or 8)
        if cfg["bwd_key_split"]:  # the key side in two kernels, sums passed in scratch
            acc = _empty((3, nc, H, L, N), torch.float32, r.device)
            dll = _empty((nc, H, N), torch.float32, r.device)
            stride = nc * H * L * N
            _sbwd_r_kernel[(nc, H)](
                r, log_w, k, v, b, dy, states, dstates, w, u, dr, acc, dll, *tabs, H, stride, **meta
            )
            _sbwd_a_kernel[(nc, H)](
                log_w, k, v, a, b, states, w, u, dx, acc, dll, dlw, dk, da, db, *tabs, H, stride, **meta
            )
        else:
            _sbwd_key_kernel[(nc, H)](
                r, log_w, k, v, a, b, dy, states, dstates, w, u, dx, dr, dlw, dk, da, db, *tabs, H, **meta
            )
        return dr, dlw, dk, dv, da, db, ds0
    states, m, gl = saved
    bv = cfg["bwd_block_v"] or _auto_block_v(nc * H, N, L, r.device)
    _check_config(N, L, bv, prec)
    nv = N // bv
    meta = dict(
        N=N, L=L, LOG2L=int(math.log2(L)), BV=bv, PREC=prec, num_warps=cfg["bwd_num_warps"] or _auto_warps(bv, N)
    )
    grid = (nc, H, nv)
    _bwd_prep_kernel[grid](r, log_w, a, b, dy, *tabs, e, H, **meta)
    dstates, ds0 = _scan(dsT, gl, m, e, table, H, N, reverse=True, **scan)
    inputs = (r, log_w, k, a, b)
    if nv == 1:
        parts = [_empty((1, *r.shape), x.dtype, r.device) for x in inputs]
    else:
        parts = [_empty((nv, *r.shape), torch.float32, r.device) for _ in inputs]
    dv = _empty(r.shape, v.dtype, r.device)
    _bwd_chunks_kernel[grid](
        r, log_w, k, v, a, b, states, dstates, dy, *parts, dv, *tabs, H, r.numel(), **meta
    )
    dr, dlw, dk, da, db = (p[0] if nv == 1 else p.sum(0).to(x.dtype) for p, x in zip(parts, inputs))
    return dr, dlw, dk, dv, da, db, ds0


# --------------------------------------------------------------------------------------------
# Autograd and the public functions
# --------------------------------------------------------------------------------------------


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, state, table, cfg, out_dtype):
        need_bwd = any(ctx.needs_input_grad[:7])  # (grad mode is off inside forward)
        y, sT, saved = wkv7_forward(r, log_w, k, v, a, b, state, table, cfg, out_dtype, need_bwd)
        if need_bwd:
            ctx.save_for_backward(r, log_w, k, v, a, b, *saved)
            ctx.table, ctx.cfg, ctx.has_state = table, cfg, state is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, log_w, k, v, a, b, *saved = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dlw, dk, dv, da, db, ds0 = wkv7_backward(r, log_w, k, v, a, b, saved, dy, dsT, ctx.table, ctx.cfg)
        return dr, dlw, dk, dv, da, db, (ds0 if ctx.has_state else None), None, None, None


def _check_inputs(fn: str, xs, state, n_seqs: int) -> None:
    r = xs[0]
    if r.dim() != 4 or any(x.shape != r.shape for x in xs):
        raise ValueError(
            f"{fn}: r, log_w, k, v, a, b must share one [B, T, H, N] shape, got {[tuple(x.shape) for x in xs]}"
        )
    for name, x in zip(("r", "log_w", "k", "v", "a", "b"), xs):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{fn}: {name} has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    _, _, H, N = r.shape
    if N not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"{fn}: head size {N} not supported (supported: {SUPPORTED_HEAD_SIZES})")
    if state is not None and state.shape != (n_seqs, H, N, N):
        raise ValueError(f"{fn}: state must be [{n_seqs}, {H}, {N}, {N}], got {tuple(state.shape)}")


def wkv7_triton(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    bwd_block_v: int | None = None,
    bwd_num_warps: int | None = None,
    bwd_key_split: bool = True,
    split_inverse: bool = False,
    split_qy: bool = False,
    bwd_key_num_warps: int | None = None,
    scan_block_v: int | None = None,
    scan_num_warps: int | None = None,
    precision: str | None = None,
    scan_precision: str | None = None,
    impl: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV with Triton kernels (forward and backward).

    Args: ``r, log_w, k, v, a, b`` [B, T, H, N] in float32, bfloat16 or float16 (``log_w``,
    the log-decay, may have its own dtype, e.g. float32; it must lie in [-exp(-0.5), 0],
    RWKV-7's bound, which the chunk formula relies on and which is not checked); ``state``
    [B, H, N(value), N(key)] or None for zeros. N in 16/32/64/128.
    ``cu_seqlens``: packed variable-length sequences: B == 1, sequence i is tokens
    ``cu_seqlens[i]:cu_seqlens[i+1]``, ``state`` and the final state are [S, H, N, N].
    Tuning (None = automatic): ``chunk_size`` (16/32/64; 16 when a gradient is needed, else
    32); ``block_v`` and ``num_warps`` of the
    parallel forward kernels, the same for the backward (``bwd_``) and for the sequential scan
    (``scan_``); ``precision`` of the matmul inputs ("ieee", "tf32", "tf32x3"; None: ieee for
    float32 inputs, else tf32) and ``scan_precision`` (None: as ``precision``).
    Returns ``(y [B, T, H, N] in out_dtype (default r.dtype), final state float32)``.
    """
    xs = (r, log_w, k, v, a, b)
    if cu_seqlens is not None and r.dim() == 4 and r.shape[0] != 1:
        raise ValueError(f"wkv7_triton: with cu_seqlens the inputs are packed as [1, T, H, N], got {tuple(r.shape)}")
    n_seqs = r.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    _check_inputs("wkv7_triton", xs, state, n_seqs)
    B, T, H, N = r.shape
    if precision is None:
        precision = "ieee" if r.dtype == torch.float32 else "tf32"
    if impl is None:  # "stored" for the tensor-core path at the head sizes it takes
        impl = "stored" if precision != "ieee" and N in STORED_HEAD_SIZES else "recompute"
    if chunk_size is None:
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*xs, state) if x is not None)
        chunk_size = DEFAULT_CHUNK_STORED if impl == "stored" else DEFAULT_CHUNK_TRAIN if grad else DEFAULT_CHUNK_INFER
    scan_precision = scan_precision or precision
    _check_config(N, chunk_size, None, precision, impl)
    _check_config(N, None, None, scan_precision)
    out_dtype = out_dtype or r.dtype
    if T == 0 or n_seqs == 0:
        s = torch.zeros(n_seqs, H, N, N, dtype=torch.float32, device=r.device) if state is None else state.float()
        return r.new_zeros(B, T, H, N, dtype=out_dtype), s
    if cu_seqlens is None:
        table = dense_table(B, T, chunk_size, r.device)
    else:
        table = varlen_table(cu_seqlens, chunk_size, T)
    cfg = dict(
        chunk_size=chunk_size, block_v=block_v, num_warps=num_warps, bwd_block_v=bwd_block_v,
        bwd_num_warps=bwd_num_warps, bwd_key_split=bwd_key_split, bwd_key_num_warps=bwd_key_num_warps,
        split_inverse=split_inverse, split_qy=split_qy, scan_block_v=scan_block_v, scan_num_warps=scan_num_warps,
        precision=precision, scan_precision=scan_precision, impl=impl,
    )
    xs = [x.contiguous() for x in xs]
    s0 = None if state is None else state.float().contiguous()
    return _WKV7Function.apply(*xs, s0, table, cfg, out_dtype)


@torch.no_grad()
def wkv7_recurrent(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV step by step in one kernel, for decoding (a few tokens, no gradient).

    Same arguments as ``wkv7_triton``; with ``inplace`` the float32 contiguous ``state`` is
    updated in place and returned. Returns ``(y in out_dtype (default r.dtype), final state)``.
    """
    xs = (r, log_w, k, v, a, b)
    _check_inputs("wkv7_recurrent", xs, state, r.shape[0])
    B, T, H, N = r.shape
    if inplace and (state is None or state.dtype != torch.float32 or not state.is_contiguous()):
        raise ValueError("wkv7_recurrent: inplace needs a contiguous float32 state")
    xs = [x.contiguous() for x in xs]
    s0 = None if state is None else state.float().contiguous()
    sT = state if inplace else _empty((B, H, N, N), torch.float32, r.device)
    y = _empty((B, T, H, N), out_dtype or r.dtype, r.device)
    bv = min(N, 32)
    _recurrent_kernel[(B * H, N // bv)](
        *xs, s0 if s0 is not None else sT, y, sT, T, H, N=N, BV=bv, HAS_S0=s0 is not None, num_warps=4 if N * bv >= 2048 else 2,
    )
    return y, sT


def wkv7_timemix_step_(r, log_w, k, v, a, g, gate, v_first, k_k, k_a, r_k, ln_weight, ln_bias, eps: float,
                       state: torch.Tensor) -> torch.Tensor:
    """``rwkvkit.ops.wkv7_timemix_step_`` in one kernel (one program per row and head); every
    tensor on one CUDA device, [B, C] inputs contiguous, ``state`` float32 contiguous."""
    B, H, N, _ = state.shape
    out = _empty((B, H * N), r.dtype, r.device)
    has_gate = gate is not None
    _timemix_step_kernel[(B * H,)](
        r, log_w, k, v, a, g, gate if has_gate else r, v_first if has_gate else r,
        k_k, k_a, ln_weight, ln_bias, r_k, state, out, H, float(eps),
        N=N, HAS_GATE=has_gate, num_warps=4 if N >= 64 else 2,
    )
    return out
