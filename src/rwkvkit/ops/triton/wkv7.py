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
below the bound are not checked; chunks up to 64 are allowed, 64 without gradients only).

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
U = (I - A_ab)^{-1} A_ak V (neither depends on the state), a chunk is
    SA^T = S0 W^T + U^T,   Y = Q S0^T + P,   S_L = S0 diag(gL) + SA^T be + V^T ke,
    Q = rq + A_rb W [L, key],   P = A_rk V + A_rb U [L, value],
and the gradient of the state entering it
    dS0 = dS_L diag(gL) + (dS_L be^T) W + dY^T Q.
Everything but S0 and dS_L is per chunk and parallel: W, be, ke, Q, U, P ([L, N] each, built
once) are the factors of the chunk's rank-L update. The scans carry S (dS) through the chunks
with [N, N] x [N, L] and [N, L] x [L, N] products (four per chunk forward, y included; three
backward), and the forward scan writes y itself; nothing is an [N, N] per-chunk matrix except
the carried states the backward needs.

Kernels (every one works on a table of chunks, so packed variable-length batches and dense
[B, T] batches are one code path; a chunk never crosses a sequence boundary):
    forward:  _prep (per chunk: gL, W, be, ke, Q, U, P; with a gradient, (I - A_ab)^{-1}) ->
              _fwd_scan (per sequence, head, value block: y and the final state; with a
              gradient, also the state entering every chunk and SA)
    backward: _bwd_scan (per sequence, head, value block, chunks in reverse: the gradient of
              the state leaving every chunk and of the initial state) -> _bwd_chunks (per
              chunk: every input gradient, from the stored states, SA and inverse)
and _recurrent, the step-by-step form for decoding (small T, no gradient), which may update
the state in place. On long sequences the scans run in segments of consecutive chunks, each
beside the per-chunk kernels of the next segment on a second stream (``segments``;
``_overlap_pays`` says where that measured faster): the per-chunk kernels then take the
(sequence, place) pairs of one segment (SEG, ``chunk_of``) and the scans a range of places,
carrying the state from one launch to the next through their output buffer (the final state;
backward, the initial state's gradient). The scans keep the diagonal part exact (S * gL) and
take their products in their own precision. What the backward reads, per token and head: the state entering its chunk
and its gradient (N^2 / L each) in the saved dtype (bfloat16 by default with tf32 matmuls on
bfloat16 inputs: half the backward's largest traffic for 1-6 % more gradient error on an H200
against the float32 chunked form; else float32: fp16 inputs carry more mantissa bits than
bfloat16, and an H200 probe measured 22-33 % more error there), SA in float32 (N; in bfloat16
it doubled db's error), W, be, Q (N each, as prep stored them), the inverse (L) and gL (N / L).
Prep stores its factors (W, be, Q, ke; U and P where one program holds a whole row) with every
row divided by a power of two (its largest magnitude in [1, 2)) and the scales beside gL
(``_row_scales2``, ``_store_scaled``): in float16 where the scans' products are tf32 (float16
has tf32's 10 mantissa bits and rounds where tf32 truncates, so no accuracy is lost, while the
scale keeps float32's range), else in float32 (where the scaling is exact). Without a
gradient prep's factors are scratch for the forward scan and nothing else is written but y and
the final state. Key-side input gradients summed over value blocks go through a float32
[NV, ...] buffer when there is more than one block.

Matmul precision: "ieee" (exact float32, CUDA cores), "tf32" (tensor cores; ~4e-4 relative
error) or "tf32x3" (tensor cores, ~float32 accuracy at 3x the MMA work). Default: ieee for
float32 inputs, tf32 for bf16/fp16 inputs. Accumulation is float32 everywhere. Under tf32,
where the backward holds bfloat16 states, its products with them take bfloat16 operands
instead: exact where the other side is bfloat16 too (v, dY), and with a float32 side split
into two bfloat16 parts (16 mantissa bits, more than tf32's 10) in two more (_dot_bf16x2).
The chunk key side's exponentials are one ex2.approx.ftz each (fastmath.fast_exp: a factor
below 2^-126 is flushed to 0; H200, B=8, T=4096, H=32: forward+backward 5.66 -> 5.55 ms).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import segments
from .chunk_table import ChunkTable, chunk_of, dense_table, varlen_table
from .fastmath import fast_exp as _exp  # one ex2.approx.ftz on the GPU (fastmath.py)
from .recurrent import launch, state_block

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
SUPPORTED_CHUNKS = (16, 32, 64)
PRECISIONS = ("ieee", "tf32", "tf32x3")
# Chosen by the sweep (benchmarks/NOTES.md, H200): chunk 16 when a gradient is needed (the
# backward's per-chunk kernel dominates and prefers small tiles), 32 for inference.
DEFAULT_CHUNK_TRAIN = 16
DEFAULT_CHUNK_INFER = 32
MAX_CHUNK_TRAIN = 32  # chunk 64's backward kernel needed 237,568 B of shared memory on an H100 (N = 64, Triton 3.6)
RECURRENT_MAX_T = 16  # the dispatcher decodes up to this many tokens step by step
# the scans in segments alongside the per-chunk kernels (``segments``; where, see _overlap_pays):
OVERLAP_MIN_CHUNKS = 512  # sequences of this many chunks or more
OVERLAP_MIN_CHUNK_HEADS = 6144  # and this many (chunk, head) pairs in all
OVERLAP_SEGMENTS = 4  # (H200: 4 and 8 alike at 2, 16384, 32; 2 no better; 8 slower elsewhere)
# prep's register cap with a gradient at chunk 16 and tf32 products: four programs per SM instead
# of three, for a few spills (H200: prep 1.20 -> 1.12 ms at 8, 4096, 32, a cap of 96 1.16; at
# chunk 32 without a gradient a cap of 128 was slower on an H100, 2.38 -> 2.99 ms)
PREP_MAXNREG_TRAIN = 128
NUM_WARPS = 4  # every chunked kernel's default (the sweeps: 4 warps beat 8 everywhere, 2026-11-28 included)


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
def _chunk_keyside(r, lw, k, a, b, offs_t, L: tl.constexpr, PREC: tl.constexpr):
    """Everything in a chunk that does not depend on the state or on v, but A_ab."""
    lam = tl.cumsum(lw, axis=0)  # Lam_t, inclusive
    lamp = lam - lw  # Lam'_t = Lam_{t-1}
    lam_last = tl.sum(tl.where(offs_t[:, None] == L - 1, lam, 0.0), axis=0)  # Lam_L  [N]
    g = _exp(lam)
    gp = _exp(lamp)
    gi = _exp(-lam)
    ge = _exp(lam_last[None, :] - lam)
    gL = _exp(lam_last)
    aq = a * gp
    rq = r * g
    ki = k * gi
    bi = b * gi
    ke = k * ge
    be = b * ge
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]
    A_ak = tl.where(strict, tl.dot(aq, tl.trans(ki), input_precision=PREC), 0.0)
    A_rb = tl.where(incl, tl.dot(rq, tl.trans(bi), input_precision=PREC), 0.0)
    A_rk = tl.where(incl, tl.dot(rq, tl.trans(ki), input_precision=PREC), 0.0)
    return g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk


@triton.jit
def _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N: tl.constexpr, L: tl.constexpr):
    """Chunk ``c`` of head ``h``: its rows' offsets in the flat [tokens, H, N] layout and the
    mask of the rows inside its sequence (a chunk never crosses a sequence boundary)."""
    seq = tl.load(chunk_seq_ptr + c)
    start = tl.load(cu_ptr + seq) + (c - tl.load(chunk_cu_ptr + seq)) * L
    t = start + offs_t
    return (t.to(tl.int64) * H + h) * N, (t < tl.load(cu_ptr + seq + 1))[:, None]


@triton.jit
def _tile(ptr, base, i: tl.constexpr, F: tl.constexpr, offs_t, offs_n, L: tl.constexpr, N: tl.constexpr):
    """Rows ``offs_t``, columns ``offs_n`` of factor ``i`` of a [chunks, H, F, L, N] buffer
    (``base`` = chunk * H + head), as stored."""
    return tl.load(ptr + (base * F + i) * L * N + offs_t[:, None] * N + offs_n[None, :])


@triton.jit
def _row_scales2(x, y):
    """For every row of x and of y ([R, C] tiles), 2^floor(log2) of its largest magnitude (at
    least 2^-100), from the exponent bits: exact powers of two. One reduction for both."""
    m = tl.maximum(tl.max(tl.join(tl.abs(x), tl.abs(y)), axis=1), 1e-30)  # [R, 2]
    s = (m.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.split(s)


@triton.jit
def _store_scaled(ptr, offs, x, s, gs_ptr, base, i: tl.constexpr, offs_t, L: tl.constexpr, N: tl.constexpr):
    """Factor ``i`` of a chunk (x [L, N], whole rows) at ``ptr + offs`` in ptr's dtype, every row
    divided by its scale s (_row_scales2: its largest magnitude lands in [1, 2)), and s into gs
    (``_gs_size``). Exact in float32; in float16 it keeps float32's range (elements below their
    row's largest by 2^-14 or more lose bits as float16 subnormals)."""
    tl.store(ptr + offs, (x / s[:, None]).to(ptr.dtype.element_ty))
    tl.store(gs_ptr + base * _gs_size(L, N) + N + i * L + offs_t, s)


@triton.jit
def _row_scales(gs_ptr, base, i: tl.constexpr, offs_t, L: tl.constexpr, N: tl.constexpr):
    """The row scales of factor ``i`` (see ``_store_scaled``)."""
    return tl.load(gs_ptr + base * _gs_size(L, N) + N + i * L + offs_t)


@triton.jit
def _gs_size(L: tl.constexpr, N: tl.constexpr):
    """Floats per chunk-head of the gs buffer: gL [N], then the row scales of W, be, Q, ke, U, P."""
    return N + 6 * L


@triton.jit(do_not_specialize=["H", "seg_j0", "seg_len"])
def _prep_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # chunk tables (int32)
    gs_ptr,  # [chunks, H, N + 6 L] float32 out: gL, then the row scales of W, be, Q, ke, U, P
    kf_ptr,  # [chunks, H, 4, L, N] out (float16 or float32): W, be, Q, ke (key columns), rows scaled
    vf_ptr,  # [chunks, H, 2, L, N] out: U, P (value columns), rows scaled if VS (as kf), else float32
    ti_ptr,  # [chunks, H, L, L] float32 out (if STORE_TI): (I - A_ab)^{-1}
    H, seg_j0, seg_len,  # SEG: the segment's first chunk in each sequence, its chunks per sequence
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    STORE_TI: tl.constexpr, SEG: tl.constexpr, VS: tl.constexpr,
):
    """Per chunk, everything the scans need that does not depend on the state: gL, the key-side
    factors W, be, ke, Q and this value block's columns of U and P; with STORE_TI also the
    inverse (I - A_ab)^{-1} for the backward."""
    c, exists = chunk_of(tl.program_id(0), chunk_cu_ptr, seg_j0, seg_len, SEG)
    if not exists:
        return
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    row, tmask = _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N, L)
    pk = row[:, None] + offs_k[None, :]
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row[:, None] + offs_v[None, :], mask=tmask, other=0.0).to(tl.float32)
    g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk = _chunk_keyside(r, lw, k, a, b, offs_t, L, PREC)
    strict = offs_t[:, None] > offs_t[None, :]
    Ti = _unit_lower_inverse(
        tl.where(strict, tl.dot(aq, tl.trans(bi), input_precision=PREC), 0.0), offs_t, L, LOG2L, PREC
    )
    U = tl.dot(Ti, tl.dot(A_ak, v, input_precision=PREC), input_precision=PREC)  # [L, BV]
    P = tl.dot(A_rk, v, input_precision=PREC) + tl.dot(A_rb, U, input_precision=PREC)
    base = c.to(tl.int64) * H + h
    f_v = offs_t[:, None] * N + offs_v[None, :]
    f_k = offs_t[:, None] * N + offs_k[None, :]
    if VS:  # (whole rows: one value block)
        sU, sP = _row_scales2(U, P)
        _store_scaled(vf_ptr, base * 2 * L * N + f_v, U, sU, gs_ptr, base, 4, offs_t, L, N)
        _store_scaled(vf_ptr, (base * 2 + 1) * L * N + f_v, P, sP, gs_ptr, base, 5, offs_t, L, N)
    else:
        tl.store(vf_ptr + base * 2 * L * N + f_v, U)
        tl.store(vf_ptr + (base * 2 + 1) * L * N + f_v, P)
    if i_v == 0:
        W = tl.dot(Ti, aq, input_precision=PREC)  # [L, N]
        Q = rq + tl.dot(A_rb, W, input_precision=PREC)
        sW, sQ = _row_scales2(W, Q)
        sbe, ske = _row_scales2(be, ke)
        f = base * 4 * L * N + f_k
        _store_scaled(kf_ptr, f, W, sW, gs_ptr, base, 0, offs_t, L, N)
        _store_scaled(kf_ptr, f + L * N, be, sbe, gs_ptr, base, 1, offs_t, L, N)
        _store_scaled(kf_ptr, f + 2 * L * N, Q, sQ, gs_ptr, base, 2, offs_t, L, N)
        _store_scaled(kf_ptr, f + 3 * L * N, ke, ske, gs_ptr, base, 3, offs_t, L, N)
        tl.store(gs_ptr + base * _gs_size(L, N) + offs_k, gL)
        if STORE_TI:
            tl.store(ti_ptr + base * L * L + offs_t[:, None] * L + offs_t[None, :], Ti)


@triton.jit
def _scan_prologue(s0_ptr, cu_ptr, chunk_cu_ptr, H, N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                   HAS_S0: tl.constexpr):
    """One (sequence, head, value block) program of a scan: its chunks, rows and entering matrix."""
    i_sh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    seq = i_sh // H
    h = i_sh % H
    c0 = tl.load(chunk_cu_ptr + seq)
    nc = tl.load(chunk_cu_ptr + seq + 1) - c0
    t0 = tl.load(cu_ptr + seq)
    t1 = tl.load(cu_ptr + seq + 1)
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = offs_v[:, None] * N + offs_k[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + i_sh * N * N + s_offs)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    return i_sh, h, c0, nc, t0, t1, offs_t, offs_k, offs_v, s_offs, S


@triton.jit
def _scan_rows(t0, t1, j, nc, h, offs_t, offs_v, H, N: tl.constexpr, L: tl.constexpr):
    """Offsets ([L, BV]) and row mask of the ``j``-th chunk of a sequence (clamped into it, so a
    prefetch past either end reads nothing: an empty sequence masks every row)."""
    t = t0 + tl.maximum(tl.minimum(j, nc - 1), 0) * L + offs_t
    return (t.to(tl.int64) * H + h)[:, None] * N + offs_v[None, :], (t < t1)[:, None]


@triton.jit
def _fwd_step_inputs(gs_ptr, kf_ptr, vf_ptr, v_ptr, base, pv, tmask, offs_t, offs_k, offs_v, L: tl.constexpr,
                     N: tl.constexpr, VS: tl.constexpr):
    """What a forward scan step reads of one chunk: gL, the row scales of W, be, Q, ke, then
    W, be, Q, ke (as stored), U, P (float32) and V."""
    if VS:
        sU = _row_scales(gs_ptr, base, 4, offs_t, L, N)[:, None]
        sP = _row_scales(gs_ptr, base, 5, offs_t, L, N)[:, None]
    else:
        sU = 1.0
        sP = 1.0
    return (
        tl.load(gs_ptr + base * _gs_size(L, N) + offs_k),
        _row_scales(gs_ptr, base, 0, offs_t, L, N),
        _row_scales(gs_ptr, base, 1, offs_t, L, N),
        _row_scales(gs_ptr, base, 2, offs_t, L, N),
        _row_scales(gs_ptr, base, 3, offs_t, L, N),
        _tile(kf_ptr, base, 0, 4, offs_t, offs_k, L, N),
        _tile(kf_ptr, base, 1, 4, offs_t, offs_k, L, N),
        _tile(kf_ptr, base, 2, 4, offs_t, offs_k, L, N),
        _tile(kf_ptr, base, 3, 4, offs_t, offs_k, L, N),
        _tile(vf_ptr, base, 0, 2, offs_t, offs_v, L, N).to(tl.float32) * sU,
        _tile(vf_ptr, base, 1, 2, offs_t, offs_v, L, N).to(tl.float32) * sP,
        tl.load(v_ptr + pv, mask=tmask, other=0.0).to(tl.float32),
    )


@triton.jit
def _bwd_step_inputs(gs_ptr, kf_ptr, dy_ptr, base, pv, tmask, offs_t, offs_k, L: tl.constexpr, N: tl.constexpr):
    """What a backward scan step reads of one chunk: gL, the row scales of be W and of Q, W, be,
    Q (as stored) and dY."""
    return (
        tl.load(gs_ptr + base * _gs_size(L, N) + offs_k),
        _row_scales(gs_ptr, base, 0, offs_t, L, N) * _row_scales(gs_ptr, base, 1, offs_t, L, N),
        _row_scales(gs_ptr, base, 2, offs_t, L, N),
        _tile(kf_ptr, base, 0, 4, offs_t, offs_k, L, N),
        _tile(kf_ptr, base, 1, 4, offs_t, offs_k, L, N),
        _tile(kf_ptr, base, 2, 4, offs_t, offs_k, L, N),
        tl.load(dy_ptr + pv, mask=tmask, other=0.0).to(tl.float32),
    )


@triton.jit(do_not_specialize=["H", "n_chunks", "j_begin", "j_end"])
def _fwd_scan_kernel(
    s0_ptr,  # [seqs, H, N, N] float32 (unless HAS_S0 unused): the initial state, or after the first
    # segment the state so far (sT_ptr, read before this program overwrites it)
    gs_ptr, kf_ptr, vf_ptr,  # prep's outputs
    v_ptr,  # [tokens, H, N]
    y_ptr,  # [tokens, H, N] out
    states_ptr,  # [chunks, H, N, N] out (if STORE; float32 or bfloat16): the state entering each chunk
    sa_ptr,  # [chunks, H, L, N] float32 out (if STORE): SA = W S0^T + U, every chunk
    sT_ptr,  # [seqs, H, N, N] float32 out: the state leaving the segment
    cu_ptr, chunk_cu_ptr,
    H, n_chunks, j_begin, j_end,
    N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, STORE: tl.constexpr,
    PREC: tl.constexpr, VS: tl.constexpr,
):
    """The sequential part of the forward, over chunks j_begin .. j_end - 1 of one sequence in
    order (a segment of it; the next segment's launch takes sT_ptr as its s0_ptr):
    Y = Q S^T + P,  SA^T = S W^T + U^T,  S <- S diag(gL) + SA^T be + V^T ke.
    Every chunk's factors are loaded one iteration ahead (their latency hides behind the
    previous chunk's products)."""
    i_sh, h, c0, nc, t0, t1, offs_t, offs_k, offs_v, s_offs, S = _scan_prologue(
        s0_ptr, cu_ptr, chunk_cu_ptr, H, N, L, BV, HAS_S0
    )
    j_stop = tl.minimum(j_end, nc)
    base_n = tl.minimum(c0 + tl.minimum(j_begin, tl.maximum(nc - 1, 0)), n_chunks - 1).to(tl.int64) * H + h
    pv_n, tm_n = _scan_rows(t0, t1, j_begin, nc, h, offs_t, offs_v, H, N, L)
    gl_n, sW_n, sbe_n, sQ_n, ske_n, W_n, be_n, Q_n, ke_n, U_n, P_n, V_n = _fwd_step_inputs(
        gs_ptr, kf_ptr, vf_ptr, v_ptr, base_n, pv_n, tm_n, offs_t, offs_k, offs_v, L, N, VS
    )
    for j in range(j_begin, j_stop):
        base, pv, tmask = base_n, pv_n, tm_n
        gl, sW, sbe, sQ, ske, W, be, Q, ke, U, P, V = gl_n, sW_n, sbe_n, sQ_n, ske_n, W_n, be_n, Q_n, ke_n, U_n, P_n, V_n
        # the next chunk (the last iteration reloads this one: in bounds, unused)
        jn = tl.minimum(j + 1, j_stop - 1)
        base_n = (c0 + jn).to(tl.int64) * H + h
        pv_n, tm_n = _scan_rows(t0, t1, jn, nc, h, offs_t, offs_v, H, N, L)
        gl_n, sW_n, sbe_n, sQ_n, ske_n, W_n, be_n, Q_n, ke_n, U_n, P_n, V_n = _fwd_step_inputs(
            gs_ptr, kf_ptr, vf_ptr, v_ptr, base_n, pv_n, tm_n, offs_t, offs_k, offs_v, L, N, VS
        )

        # (the key-side factors as stored times their row scales: powers of two, so exact)
        X = tl.dot(S, tl.trans(W.to(tl.float32)), input_precision=PREC) * sW[None, :] + tl.trans(U)  # [BV, L] = SA^T
        # Y^T = S Q^T: S is the left operand here as in X (at a block of 64 both are warpgroup
        # MMAs; H200, this scan 0.91 -> 0.75 ms at 8, 4096, 32, where Q S^T had M = 16)
        Y = tl.trans(tl.dot(S, tl.trans(Q.to(tl.float32)), input_precision=PREC) * sQ[None, :] + tl.trans(P))  # [L, BV]
        if STORE:
            tl.store(states_ptr + base * N * N + s_offs, S.to(states_ptr.dtype.element_ty))
            tl.store(sa_ptr + base * L * N + offs_t[None, :] * N + offs_v[:, None], X)
        S = S * gl[None, :] + tl.dot(X * sbe[None, :], be.to(tl.float32), input_precision=PREC) + tl.dot(
            tl.trans(V * ske[:, None]), ke.to(tl.float32), input_precision=PREC)
        tl.store(y_ptr + pv, Y.to(y_ptr.dtype.element_ty), mask=tmask)
    tl.store(sT_ptr + i_sh * N * N + s_offs, S)


@triton.jit(do_not_specialize=["H", "n_chunks", "j_begin", "j_end"])
def _bwd_scan_kernel(
    ds_ptr,  # [seqs, H, N, N] float32 (unless HAS_S0 unused): the final state's gradient, or after the
    # first segment the gradient so far (ds0_ptr, read before this program overwrites it)
    gs_ptr, kf_ptr,  # prep's outputs
    dy_ptr,  # [tokens, H, N]
    dstates_ptr,  # [chunks, H, N, N] out (as the states): the gradient of the state leaving each chunk
    ds0_ptr,  # [seqs, H, N, N] float32 out: the gradient of the state entering the segment
    cu_ptr, chunk_cu_ptr,
    H, n_chunks, j_begin, j_end,
    N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
):
    """The sequential part of the backward, over chunks j_end - 1 .. j_begin of one sequence
    in reverse (a segment, as in the forward scan):
    dS <- dS diag(gL) + (dS be^T) W + dY^T Q (factors loaded one iteration ahead)."""
    i_sh, h, c0, nc, t0, t1, offs_t, offs_k, offs_v, s_offs, dS = _scan_prologue(
        ds_ptr, cu_ptr, chunk_cu_ptr, H, N, L, BV, HAS_S0
    )
    j_stop = tl.minimum(j_end, nc)
    jn = tl.maximum(j_stop - 1, 0)
    base_n = tl.minimum(c0 + jn, n_chunks - 1).to(tl.int64) * H + h  # (an empty last sequence)
    pv_n, tm_n = _scan_rows(t0, t1, jn, nc, h, offs_t, offs_v, H, N, L)
    gl_n, sbW_n, sQ_n, W_n, be_n, Q_n, dY_n = _bwd_step_inputs(
        gs_ptr, kf_ptr, dy_ptr, base_n, pv_n, tm_n, offs_t, offs_k, L, N
    )
    for i in range(j_stop - j_begin):
        base = base_n
        gl, sbW, sQ, W, be, Q, dY = gl_n, sbW_n, sQ_n, W_n, be_n, Q_n, dY_n
        jn = tl.maximum(j_stop - 2 - i, j_begin)
        base_n = (c0 + jn).to(tl.int64) * H + h
        pv_n, tm_n = _scan_rows(t0, t1, jn, nc, h, offs_t, offs_v, H, N, L)
        gl_n, sbW_n, sQ_n, W_n, be_n, Q_n, dY_n = _bwd_step_inputs(
            gs_ptr, kf_ptr, dy_ptr, base_n, pv_n, tm_n, offs_t, offs_k, L, N
        )

        tl.store(dstates_ptr + base * N * N + s_offs, dS.to(dstates_ptr.dtype.element_ty))
        Z = tl.dot(dS, tl.trans(be.to(tl.float32)), input_precision=PREC) * sbW[None, :]  # [BV, L]: dS be^T, W's scales
        dS = dS * gl[None, :] + tl.dot(Z, W.to(tl.float32), input_precision=PREC) + tl.dot(
            tl.trans(dY * sQ[:, None]), Q.to(tl.float32), input_precision=PREC)
    tl.store(ds0_ptr + i_sh * N * N + s_offs, dS)


@triton.jit
def _dot_bf16x2(x, yh):
    """x @ yh for float32 x and bfloat16 yh: x split into two bfloat16 parts (16 of its mantissa
    bits, where a tf32 operand keeps 10), two exact bfloat16 products with float32 sums. yh
    stays bfloat16 in registers, where a tf32 product needs a float32 copy."""
    xh = x.to(tl.bfloat16)
    return tl.dot((x - xh.to(tl.float32)).to(tl.bfloat16), yh, acc=tl.dot(xh, yh))


@triton.jit
def _chunk_grads(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr,
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
    pk, pv, part, tmask, S, dS, SA, Ti, offs_t,
    L: tl.constexpr, PREC: tl.constexpr, BF16_DOTS: tl.constexpr,
):
    """Backward of one chunk for one value block: from S = S0, dS = dS_L ([BV, N] slices),
    SA [L, BV] and Ti = (I - A_ab)^{-1}, store dv and this block's share of dr, dlog_w, dk, da, db."""
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    vh = tl.load(v_ptr + pv, mask=tmask, other=0.0)  # (in their own dtypes: see LOW below)
    dYh = tl.load(dy_ptr + pv, mask=tmask, other=0.0)
    v = vh.to(tl.float32)
    dY = dYh.to(tl.float32)
    strict = offs_t[:, None] > offs_t[None, :]
    incl = offs_t[:, None] >= offs_t[None, :]
    # LOW: the states were saved in bfloat16 and v, dY are bfloat16: their products dY S, V dS and
    # dY V^T take those operands as they are (exact products, float32 sums: the tf32 products'
    # numbers, at half the operand registers), and be dS^T and dX S take S, dS as they are with
    # the float32 side split in two bfloat16 parts (_dot_bf16x2: 16 bits where tf32 keeps 10; H200,
    # _bwd_chunks 3.34 -> 3.30 ms at 8, 4096, 32; the same for ke dS^T and SA dS was slower,
    # 3.42; SPLIT: only where they replace tf32 products, never ieee or tf32x3 ones). Not under the
    # Triton CPU interpreter (BF16_DOTS off), whose bfloat16 dot is wrong (Triton 3.9).
    LOW: tl.constexpr = BF16_DOTS and S.dtype == tl.bfloat16 and vh.dtype == tl.bfloat16 and dYh.dtype == tl.bfloat16
    SPLIT: tl.constexpr = LOW and PREC == "tf32"

    # S and dS are converted to float32 at each use, not once: one float32 copy kept live across
    # the whole chunk spilled more (offline sm_90, bfloat16 states: 344 -> 624 B of stack)
    g, gp, gi, ge, gL, aq, rq, ki, bi, ke, be, A_ak, A_rb, A_rk = _chunk_keyside(r, lw, k, a, b, offs_t, L, PREC)

    if SPLIT:
        dSA = _dot_bf16x2(be, tl.trans(dS))
    else:
        dSA = tl.dot(be, tl.trans(dS.to(tl.float32)), input_precision=PREC)
    dSA += tl.dot(tl.trans(A_rb), dY, input_precision=PREC)
    dX = tl.dot(tl.trans(Ti), dSA, input_precision=PREC)
    if LOW:
        drq = tl.dot(dYh, S)  # [L, N]
    else:
        drq = tl.dot(dY, S.to(tl.float32), input_precision=PREC)
    if SPLIT:
        daq = _dot_bf16x2(dX, S)
    else:
        daq = tl.dot(dX, S.to(tl.float32), input_precision=PREC)
    dgL = tl.sum(dS.to(tl.float32) * S.to(tl.float32), axis=0)  # [N]

    dv = tl.dot(ke, tl.trans(dS.to(tl.float32)), input_precision=PREC)
    dv += tl.dot(tl.trans(A_rk), dY, input_precision=PREC)
    dv += tl.dot(tl.trans(A_ak), dX, input_precision=PREC)
    tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=tmask)

    if LOW:
        dke = tl.dot(vh, dS)
    else:
        dke = tl.dot(v, dS.to(tl.float32), input_precision=PREC)
    dbe = tl.dot(SA, dS.to(tl.float32), input_precision=PREC)
    dlam_last = tl.sum(dke * ke + dbe * be, axis=0) + dgL * gL

    if LOW:
        dA_rk = tl.where(incl, tl.dot(dYh, tl.trans(vh)), 0.0)
    else:
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


@triton.jit(do_not_specialize=["H", "part_stride", "seg_j0", "seg_len"])
def _bwd_chunks_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr,  # [tokens, H, N]
    states_ptr, dstates_ptr,  # [chunks, H, N, N] float32 or bfloat16
    sa_ptr,  # [chunks, H, L, N] float32: the forward scan's SA
    ti_ptr,  # [chunks, H, L, L] float32: prep's (I - A_ab)^{-1}
    dy_ptr,  # [tokens, H, N]
    dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr,  # [NV, tokens, H, N]: partial sums over value blocks
    dv_ptr,  # [tokens, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,
    H, part_stride, seg_j0, seg_len,  # SEG: as _prep_kernel
    N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, BF16_DOTS: tl.constexpr,
    SEG: tl.constexpr,
):
    """Every (chunk, head, value block) in parallel: all input gradients of the chunk."""
    c, exists = chunk_of(tl.program_id(0), chunk_cu_ptr, seg_j0, seg_len, SEG)
    if not exists:
        return
    h = tl.program_id(1)
    i_v = tl.program_id(2)
    part = i_v.to(tl.int64) * part_stride
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    row, tmask = _chunk_rows(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, h, offs_t, H, N, L)
    base = c.to(tl.int64) * H + h
    s_offs = base * N * N + offs_v[:, None] * N + offs_k[None, :]
    S = tl.load(states_ptr + s_offs)  # (as saved: _chunk_grads converts where it needs float32)
    dS = tl.load(dstates_ptr + s_offs)
    SA = tl.load(sa_ptr + base * L * N + offs_t[:, None] * N + offs_v[None, :])
    Ti = tl.load(ti_ptr + base * L * L + offs_t[:, None] * L + offs_t[None, :])
    _chunk_grads(
        r_ptr, lw_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, dr_ptr, dlw_ptr, dk_ptr, da_ptr, db_ptr, dv_ptr,
        row[:, None] + offs_k[None, :], row[:, None] + offs_v[None, :], part, tmask, S, dS, SA, Ti, offs_t,
        L, PREC, BF16_DOTS,
    )


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
    i_b, h, offs_k, offs_v, s_offs, S = state_block(s0_ptr, H, N, BV, HAS_S0)
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


def _check_config(N: int, chunk_size: int | None, block_v: int | None, precision: str,
                  block_name: str = "block_v") -> None:
    """Tuning arguments (the head size is checked with the inputs; None: not checked; the error
    names the value block ``block_name``)."""
    if chunk_size is not None and chunk_size not in SUPPORTED_CHUNKS:
        raise ValueError(f"wkv7_triton: chunk_size must be one of {SUPPORTED_CHUNKS}, got {chunk_size}")
    if block_v is not None and (block_v < 16 or block_v > N or N % block_v):
        raise ValueError(f"wkv7_triton: {block_name} must divide the head size {N} and be >= 16, got {block_v}")
    if precision not in PRECISIONS:
        raise ValueError(f"wkv7_triton: precision must be one of {PRECISIONS}, got {precision!r}")


def _factor_dtype(precision: str) -> torch.dtype:
    """What prep's factors are kept in (rows scaled by powers of two, see _store_scaled): float16
    where the scans take tf32 products anyway (float16 has tf32's 10 mantissa bits and is
    rounded to nearest on the store, where Triton hands float32 operands to the tensor cores,
    which truncate them: no cvt.rna in the PTX of an offline sm_90 build; H200, the final
    state's error 3.9e-4 -> 2.8e-4), else float32."""
    return torch.float16 if precision == "tf32" else torch.float32


def _overlap_pays(table: ChunkTable, H: int, device: torch.device) -> bool:
    """Whether the scans should run in segments alongside the per-chunk kernels (``segments``):
    on CUDA, for long sequences (512 chunks or more, and 6144 chunk-heads in all: each segment
    costs host launches, ~50 us, that short work does not hide), where the sequence-heads are
    too few for the scans to fill the GPU (fewer than 1.4 per SM). H200 (docs/results/
    seg_*_h200_2026-11-28.json, seg_rule_h200_2026-11-28.json), one segment against four at the
    same scan block, forward+backward / forward alone (chunk 32): 2, 16384, 32 7.08 -> 6.62 /
    2.15 -> 2.05 ms (block 32); 1, 16384, 12 2.94 -> 2.74 / 0.91 -> 0.87 (block 16); slower at
    4, 4096, 12 (1.50 -> 2.40, block 32: 256 chunks) and at 256 sequence-heads (8, 4096, 32:
    6.05 -> 6.14 at block 64, forward alone 2.02 -> 2.06 at block 32)."""
    if device.type != "cuda" or table.max_chunks < OVERLAP_MIN_CHUNKS:
        return False
    return table.n_chunks * H >= OVERLAP_MIN_CHUNK_HEADS and table.n_seqs * H < 1.4 * _sms(device)


def _scan_plan(table: ChunkTable, H: int, N: int, cfg: dict, device, *, grad: bool, bwd: bool):
    """(value block, segments) of a scan: the forward's (bwd False) or the backward's. The
    settings where given (the backward's own, else the common ones); else in segments where
    ``_overlap_pays``, and the widest value block (at most 64 with a gradient, 32 without)
    that still gives about 0.7 programs per SM. (H200, docs/results/seg_rule_h200_2026-11-28.json,
    forward+backward / forward alone: at 256 sequence-heads block 64 6.05 ms against 32 6.43,
    but without a gradient 32 2.02 against 64 2.29; at 48 or 64 block 32 beat 16 (1.50 / 0.47 ms
    against 1.56 / 0.53 at 4, 4096, 12); at 12, 16 beat 32.)"""
    bv = (bwd and cfg["bwd_scan_block_v"]) or cfg["scan_block_v"]
    n = (bwd and cfg["bwd_scan_segments"]) or cfg["scan_segments"]
    if n is None:
        n = OVERLAP_SEGMENTS if _overlap_pays(table, H, device) else 1
    segs = segments.split(table.n_seqs, table.n_chunks, table.max_chunks, n)
    if bv is None:
        bv = min(_auto_block_v(table.n_seqs * H, N, 0, device, min_waves=0.7), 64 if grad else 32)
    return bv, segs  # (the settings were checked by wkv7_triton)


def _scan_warps(cfg: dict, block_v: int, grad: bool) -> int:
    # (H200, docs/results/scan_warps_h200_2026-11-28.json: with a gradient at chunk 16 and value
    # block 16, as 2, 16384, 32 had then, two warps took the scans from 1.90 / 1.22 ms to 1.66 / 1.17; at
    # block 64 they doubled the forward scan, and without a gradient (chunk 32) they doubled it too)
    return cfg["scan_num_warps"] or (2 if grad and block_v == 16 and cfg["chunk_size"] == 16 else NUM_WARPS)


def _seg_grid(table: ChunkTable, segs: list[tuple[int, int]], j0: int, j1: int) -> tuple[int, int, int, bool]:
    """(programs, first place, places per sequence, SEG) of a per-chunk launch over one segment:
    with one segment the table's chunks as they are, else every sequence's places j0 .. j1 - 1."""
    if len(segs) == 1:
        return table.n_chunks, 0, 0, False
    return table.n_seqs * (j1 - j0), j0, j1 - j0, True


def wkv7_forward(
    r, log_w, k, v, a, b, state, table: ChunkTable, cfg: dict, out_dtype: torch.dtype, *, store: bool
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernels on contiguous [B, T, H, N] inputs laid out as ``table``
    says. Returns ``(y, final states [S, H, N, N], saved)``; with ``store``, ``saved`` holds what
    the backward reads (the state entering each chunk, SA, gL, W/be/Q and (I - A_ab)^{-1}),
    else it is None."""
    H, N = r.shape[-2:]
    L, prec = cfg["chunk_size"], cfg["precision"]
    nc = table.n_chunks
    bv = cfg["block_v"] or _auto_block_v(nc * H, N, L, r.device)  # (settings checked by wkv7_triton)
    dev = r.device
    gs = _empty((nc, H, N + 6 * L), torch.float32, dev)  # (_gs_size)
    kf = _empty((nc, H, 4, L, N), _factor_dtype(cfg["scan_precision"]), dev)
    vs = bv == N  # (U's and P's rows scaled: whole in one program)
    vf = _empty((nc, H, 2, L, N), kf.dtype if vs else torch.float32, dev)
    ti = _empty((nc, H, L, L), torch.float32, dev) if store else gs
    tabs = (table.cu, table.chunk_cu, table.chunk_seq)
    sbv, segs = _scan_plan(table, H, N, cfg, dev, grad=store, bwd=False)
    states = _empty((nc, H, N, N), cfg["saved_dtype"], dev) if store else gs
    sa = _empty((nc, H, L, N), torch.float32, dev) if store else gs
    sT = _empty((table.n_seqs, H, N, N), torch.float32, dev)
    y = _empty(r.shape, out_dtype, dev)

    def prep(j0: int, j1: int) -> None:
        n, sj0, slen, seg = _seg_grid(table, segs, j0, j1)
        _prep_kernel[(n, H, N // bv)](
            r, log_w, k, v, a, b, *tabs, gs, kf, vf, ti, H, sj0, slen, N=N, L=L, LOG2L=int(math.log2(L)), BV=bv,
            PREC=prec, STORE_TI=store, SEG=seg, VS=vs, num_warps=cfg["num_warps"] or NUM_WARPS,
            **({"maxnreg": PREP_MAXNREG_TRAIN} if store and L == 16 and prec == "tf32" and r.is_cuda else {}),
        )

    def scan(j0: int, j1: int) -> None:  # (from the second segment on, the state comes from sT)
        s_in = sT if j0 > 0 or state is None else state
        _fwd_scan_kernel[(table.n_seqs * H, N // sbv)](
            s_in, gs, kf, vf, v, y, states, sa, sT, table.cu, table.chunk_cu, H, nc, j0, j1,
            N=N, L=L, BV=sbv, HAS_S0=j0 > 0 or state is not None, STORE=store, PREC=cfg["scan_precision"], VS=vs,
            num_warps=_scan_warps(cfg, sbv, store),
        )

    segments.pipeline(dev, segs, prep, scan, first_is_scan=False)
    return y, sT, ((states, sa, gs, kf, ti) if store else None)


def wkv7_backward(
    r, log_w, k, v, a, b, saved, dy, dsT, table: ChunkTable, cfg: dict
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels (``saved``: the forward's). Returns ``(dr, dlog_w, dk, dv, da,
    db, dstate0)``, the input gradients in their inputs' dtypes and dstate0 [S, H, N, N] in float32."""
    states, sa, gs, kf, ti = saved
    H, N = r.shape[-2:]
    L, prec = cfg["chunk_size"], cfg["precision"]
    nc = table.n_chunks
    bv = cfg["bwd_block_v"] or _auto_block_v(nc * H, N, L, r.device)
    nv = N // bv
    dev = r.device
    sbv, segs = _scan_plan(table, H, N, cfg, dev, grad=True, bwd=True)
    dstates = _empty((nc, H, N, N), states.dtype, dev)
    ds0 = _empty((table.n_seqs, H, N, N), torch.float32, dev)
    inputs = (r, log_w, k, a, b)
    if nv == 1:
        parts = [_empty((1, *r.shape), x.dtype, dev) for x in inputs]
    else:
        parts = [_empty((nv, *r.shape), torch.float32, dev) for _ in inputs]
    dv = _empty(r.shape, v.dtype, dev)
    tabs = (table.cu, table.chunk_cu, table.chunk_seq)

    def scan(j0: int, j1: int) -> None:  # (segments last to first; after the first launch dS comes from ds0)
        last = j1 == segs[-1][1]
        ds_in = dsT if last and dsT is not None else ds0
        _bwd_scan_kernel[(table.n_seqs * H, N // sbv)](
            ds_in, gs, kf, dy, dstates, ds0, table.cu, table.chunk_cu, H, nc, j0, j1,
            N=N, L=L, BV=sbv, HAS_S0=not last or dsT is not None, PREC=cfg["scan_precision"],
            num_warps=_scan_warps(cfg, sbv, True),
        )

    def chunks(j0: int, j1: int) -> None:
        n, sj0, slen, seg = _seg_grid(table, segs, j0, j1)
        _bwd_chunks_kernel[(n, H, nv)](
            r, log_w, k, v, a, b, states, dstates, sa, ti, dy, *parts, dv, *tabs, H, r.numel(), sj0, slen,
            N=N, L=L, BV=bv, PREC=prec, BF16_DOTS=r.is_cuda, SEG=seg, num_warps=cfg["bwd_num_warps"] or NUM_WARPS,
        )

    segments.pipeline(dev, segs[::-1], scan, chunks, first_is_scan=True)
    dr, dlw, dk, da, db = (p[0] if nv == 1 else p.sum(0).to(x.dtype) for p, x in zip(parts, inputs))
    return dr, dlw, dk, dv, da, db, ds0


# --------------------------------------------------------------------------------------------
# Autograd and the public functions
# --------------------------------------------------------------------------------------------


class _WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, state, table, cfg, out_dtype):
        # (grad mode is off inside forward, where a parameter, e.g. a tuned state, still counts as
        # needing a gradient: whether a backward can follow was decided in wkv7_triton)
        store = cfg["grad"] and any(ctx.needs_input_grad[:7])
        y, sT, saved = wkv7_forward(r, log_w, k, v, a, b, state, table, cfg, out_dtype, store=store)
        if store:
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
    scan_block_v: int | None = None,
    scan_num_warps: int | None = None,
    scan_segments: int | None = None,
    bwd_scan_block_v: int | None = None,
    bwd_scan_segments: int | None = None,
    precision: str | None = None,
    scan_precision: str | None = None,
    saved_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV with Triton kernels (forward and backward).

    Args: ``r, log_w, k, v, a, b`` [B, T, H, N] in float32, bfloat16 or float16 (``log_w``,
    the log-decay, may have its own dtype, e.g. float32; it must lie in [-exp(-0.5), 0],
    RWKV-7's bound, which the chunk formula relies on and which is not checked); ``state``
    [B, H, N(value), N(key)] or None for zeros. N in 16/32/64/128.
    ``cu_seqlens``: packed variable-length sequences: B == 1, sequence i is tokens
    ``cu_seqlens[i]:cu_seqlens[i+1]``, ``state`` and the final state are [S, H, N, N].
    Tuning (None = automatic): ``chunk_size`` (16/32/64, 64 without gradients only; 16 when a
    gradient is needed, else 32); ``block_v`` and ``num_warps`` of the
    forward's per-chunk kernel, the same for the backward's (``bwd_``) and for the two
    sequential scans (``scan_``: both scans; ``bwd_scan_block_v`` for the backward's alone);
    ``scan_segments`` (``bwd_scan_segments`` for the backward's alone), how many segments of
    consecutive chunks the scans run in, each overlapping the per-chunk kernels of the next
    (``segments``; the same numbers for every value; None: 4 on CUDA for long sequences where
    it measured faster, else 1; at most one per chunk, and always 1 for packed sequences whose
    chunk counts differ much); ``precision`` of the matmul inputs ("ieee", "tf32",
    "tf32x3"; None: ieee for float32 inputs, else tf32) and ``scan_precision`` (None: as
    ``precision``); ``saved_dtype``
    (torch.float32 or torch.bfloat16) of the per-chunk states and their gradients that the
    backward keeps (None: bfloat16 when ``precision`` is tf32 and ``r`` is bfloat16, which
    halves the backward's largest traffic; else float32).
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
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*xs, state) if x is not None)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_TRAIN if grad else DEFAULT_CHUNK_INFER
    elif grad and chunk_size > MAX_CHUNK_TRAIN:
        raise ValueError(
            f"wkv7_triton: chunk_size {chunk_size} is forward-only (its backward kernel does not fit in shared "
            f"memory); with gradients use one of {tuple(c for c in SUPPORTED_CHUNKS if c <= MAX_CHUNK_TRAIN)}"
        )
    scan_precision = scan_precision or precision
    if saved_dtype is None:
        saved_dtype = torch.bfloat16 if precision == "tf32" and r.dtype == torch.bfloat16 else torch.float32
    elif saved_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"wkv7_triton: saved_dtype must be torch.float32 or torch.bfloat16, got {saved_dtype}")
    _check_config(N, chunk_size, None, precision)
    _check_config(N, None, None, scan_precision)
    blocks = dict(block_v=block_v, bwd_block_v=bwd_block_v, scan_block_v=scan_block_v,
                  bwd_scan_block_v=bwd_scan_block_v)
    for name, bv in blocks.items():  # (here, so that a backward-only setting fails before the forward)
        _check_config(N, None, bv, precision, name)
    for name, n in (("scan_segments", scan_segments), ("bwd_scan_segments", bwd_scan_segments)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"wkv7_triton: {name} must be a positive int, got {n!r}")
    out_dtype = out_dtype or r.dtype
    if cu_seqlens is not None:  # (checks the offsets, also when there is nothing to compute)
        table = varlen_table(cu_seqlens, chunk_size, T, "wkv7_triton", r.device)
    if T == 0 or n_seqs == 0:
        s = torch.zeros(n_seqs, H, N, N, dtype=torch.float32, device=r.device) if state is None else state.float()
        return r.new_zeros(B, T, H, N, dtype=out_dtype), (s.clone() if s is state else s)
    if cu_seqlens is None:
        table = dense_table(B, T, chunk_size, r.device)
    cfg = dict(
        chunk_size=chunk_size, block_v=block_v, num_warps=num_warps, bwd_block_v=bwd_block_v,
        bwd_num_warps=bwd_num_warps, scan_block_v=scan_block_v, scan_num_warps=scan_num_warps,
        scan_segments=scan_segments, bwd_scan_block_v=bwd_scan_block_v, bwd_scan_segments=bwd_scan_segments,
        precision=precision, scan_precision=scan_precision, saved_dtype=saved_dtype, grad=grad,
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
    s0, sT, y, grid, meta = launch("wkv7_recurrent", state, inplace, B, T, H, N, out_dtype or r.dtype, r.device, _empty)
    _recurrent_kernel[grid](*[x.contiguous() for x in xs], s0 if s0 is not None else sT, y, sT, T, H, **meta)
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
