"""RWKV-5.2 / RWKV-6 WKV in Triton: chunked forward and backward kernels and their autograd Function.

Per head, with the state S [value, key], w = exp(log_w) and the bonus u:
    y_t = S_{t-1} r_t + (sum_j r_t[j] u[j] k_t[j]) v_t,    S_t = S_{t-1} diag(w_t) + v_t k_t^T.
RWKV-5.2 is the same with a decay that does not depend on t (pass log_w as a stride-0 view over
B and T: the kernels read it through its strides, nothing is materialised).

Chunk formula. Inside a block of L steps with S0 the state entering it, and row-vector inputs
stacked as [L, N] matrices, the decay between a write at s and a read at t > s is
e^{D(s, t)} with D(s, t) = sum_{s < q < t} log w_q (y_t reads the state before w_t acts), so
    Y   = (r e^{P}) S0^T + A V                       P_t = sum_{q < t} log w_q
    S_L = S0 diag(e^{Lam}) + V^T (k e^{Q})           Q_s = sum_{q > s} log w_q,  Lam = sum_q log w_q
    A[t, s] = sum_j r_t[j] k_s[j] e^{D_j(s, t)} (s < t),   A[t, t] = sum_j r_t[j] u[j] k_t[j],   0 above.
All sums run inside the block.

Stability. RWKV-6 decays reach w = exp(-exp(x)) with log w = -1e4 and below, so the WKV-7
factorisation e^{D(s,t)} = e^{Lam_{t-1}} e^{-Lam_s} overflows, and even the difference of two
cumulative sums Lam_{t-1} - Lam_s loses the small log-decays that follow a huge one (float32
spacing near 1e4 is 1e-3, a 1e-3 relative error in every later decay factor). Instead A is
split by levels, as the binary tree of ``ops/chunked.py``, flattened: every pair s < t of a
block lies in exactly one aligned sub-block of size 2h (h = 2^lvl, lvl = 0..log2(L)-1) with s in
its left half and t in its right half; with m the first row of the right half,
    D(s, t) = sum_{m <= q < t} log w_q + sum_{s < q < m} log w_q = pre_h[t] + suf_h[s],
pre_h the exclusive prefix sum inside t's aligned h-block, suf_h the exclusive suffix sum inside
s's aligned h-block. Hence
    A = diag(bonus) + sum_lvl M_lvl * ((r e^{pre_h}) (k e^{suf_h})^T)
with M_lvl the 0/1 mask of the pairs at that level (disjoint across levels): log2(L) full-tile
products [L, N] x [N, L], masked. Every factor is e^{(sum of log-decays <= 0)} <= 1, so nothing
overflows; an underflow to 0 only drops a term that is smaller still. Every exponent, P, Q,
pre_h, suf_h and Lam, is a sum of exactly the log-decays it spans, computed as a block-local
cumulative sum of the log-decays shifted by one row (loaded at t-1 / t+1), never as a
difference of two sums: a sum of same-sign terms has a relative error ~ log2(L) ulp, so a
decay factor e^{x} keeps a relative error ~ |x| * 1e-7, and |x| > 100 means the factor is 0
anyway. Decays near 1 (log w ~ -1e-6) are summed as they are; nothing computes 1 - w. One
exponential per level per element (a row uses pre_h if it sits in a right half, suf_h if in a
left half); level 0 needs none (D = 0).

Backward of one block, given dY and dS_L (the gradient of the state leaving it):
    dV  = A^T dY + (k e^{Q}) dS_L^T,    dA = tril(dY V^T),   bd_t = dA[t, t]
    dS0 = dS_L diag(e^{Lam}) + dY^T (r e^{P})                (carried to the previous block)
    drq = dY S0,  dke = V dS_L,  dLam = colsum(dS_L * S0) * e^{Lam}
    per level, with Rh = r e^{pre_h}, Kh = k e^{suf_h}, dAm = M_lvl * dA:
        dRh = dAm Kh,  dKh = dAm^T Rh
    dr = drq e^{P} + sum_lvl dRh e^{pre_h} + bd u k,      dk = dke e^{Q} + sum_lvl dKh e^{suf_h} + bd u r
    du = sum over t (and batch) of bd_t r_t k_t
and through the exponents (dX = the gradient of an exponent X: dP = drq r e^{P} etc.):
    dlog_w_q = sum_{t > q} dP_t + sum_{s < q} dQ_s + dLam
             + sum_lvl [ sum_{t > q, same h-block} dpre_h[t] + sum_{s < q, same h-block} dsuf_h[s] ]
(reverse / forward exclusive cumulative sums; h-block-local ones for the levels). These are
scans over (sum before, own value) pairs, not "inclusive minus own": after a huge decay a row's
own term can exceed the sum of the others by 1e9 (e^{P} = 1 on the first row, e^{-20} on the
next), and subtracting it back would leave its rounding error in place of the true, tiny sum.
Each formula was checked against float64 autograd through the step reference.

Kernels. The formula is used at two granularities: chunks of ``chunk_size`` C steps (64),
whose entering states are stored, and blocks of ``block_t`` steps (16) inside a chunk, where
the levels are computed (log2(16) = 4 levels of [16, N] x [N, 16] products: cheap, and few live
registers; ``block_t`` 32 or 64 trades more levels and wider tiles for fewer blocks in series,
64 with chunk 64 carrying nothing inside a chunk). Per direction:
  * the chunk states by a diagonal scan (forward: S <- S diag(e^{Lam}) + V^T (k e^{Q});
    backward: dS <- dS diag(e^{Lam}) + dY^T (r e^{P})). Every chunk's update term and e^{Lam}
    come from one kernel over all chunks in parallel (_wkv6_chunk_update_kernel, the exponent
    by a masked product as below), written where the chunk's state goes; since the recurrence
    is diagonal in the key index, the scan over the chunks is then elementwise
    (_wkv6_diag_scan_kernel, ``scan_block`` rows of one head's state per program, the next
    update loaded one chunk ahead), overwriting each update with the state entering (forward)
    / the gradient of the state leaving (backward) the chunk: float32 [B, H, T/C, N, N]
    (packed sequences: [1, H, chunks, N, N]). It replaced a sequential scan with one
    [b, C] x [C, b] product per chunk, latency-bound (H200, B=8, T=4096, H=32: 1.13 -> 1.04 ms
    for both directions; 1, 16384, 12: 1.15 -> 0.38). With bfloat16 inputs at tf32 the update
    takes v (dY) as stored and k e^{Q} (r e^{P}) split in two bfloat16 parts (_split_dot: 16
    mantissa bits, where tf32 keeps 10), and a bfloat16 log w is summed by one bfloat16 product:
    the kernel is bound by shared memory (ncu), and this halves its operands' bytes (0.57 ->
    0.45 ms for both directions; the final state's error 3.9e-4 -> 2.4e-6); a float32 log w,
    rounded to tf32 as loaded, is then summed by two bfloat16 products, as exact (0.62 -> 0.52);
  * a kernel over all chunks in parallel, grid (T/C, batch*head, N/block_v), whose program walks
    its chunk in blocks of block_t rows: forward, Y = (r e^{P}) S^T + A V block by block while
    the [block_v, N] state advances in registers; backward, the blocks in reverse with dS in
    registers, the state entering each block recomputed from the chunk's by a few state steps
    (no per-block state in memory), every input gradient. The key-side work (P, the levels, A) is
    recomputed by every value block; with more than one value block the key-side gradients go
    through float32 [NV, ...] partial sums.
So no kernel runs a long dependency chain per chunk (measured on WKV-7: the fused sequential
forward was latency-bound at ~7 us per chunk, 3.8 ms at B=8, T=4096, H=32), at the price of
writing and reading the chunk states: N*N*4/C bytes per token and head (256 B at N=64, C=64)
for every pass over them (forward: written once, read once; backward: read once, and dS
written and read once). Without gradients the states are still written: the output kernel
needs them. Compiled for sm_90 (Triton 3.9, offline) at the defaults (N=64, bf16, tf32): the
update kernel uses 164 registers, the scan 54, without spills; the forward output kernel 255 registers and 48 B
of stack, the backward chunk kernel (one value block, 8 warps) 255 registers and 304 B of
stack (88 B with block_v 32, but then the partial sums over value blocks cost more).

Whole-chunk kernels (impl / bwd_impl "chunks", the default where chunk_size <= 64: faster than
the block kernels at every setting of the H200 sweep, benchmarks/NOTES.md). One program per
chunk (and key or value block), with the chunk's own LOG2(C) levels on [C, C] tiles: nothing
carried, no state replay, no scans. Every exponent (P, Q, pre_h / suf_h) and every exclusive
sum of an exponent's gradient is a product with a 0/1 matrix (pre_h and suf_h in one matrix
per level, chosen by the row's half), so each output is still a sum of exactly the terms it
spans (a masked-out term adds an exact 0: log w is clamped at -1e30 to stay finite). With
tensor cores, a bfloat16 or float16 log w is exact in tf32: one product (H200, B=8, T=4096, H=32,
bf16: forward 1.55 -> 1.36 ms, forward + backward 6.10 -> 5.66); a float32 log w at precision
tf32 is rounded to the nearest tf32 value as it is loaded (relative 2^-11 at most, as every
other tf32 operand; float64 emulation: y +5.7e-5, d log w +8.6e-5 relative,
benchmarks/wkv6_logw_rounding.py), then one product, exact on the rounded values (H200, 8, 4096,
32, float32 log w: 5.95 -> 5.16 ms); at tf32x3 it is split into its tf32 head and the rest (two
products, ~2^-21 per term). Every exponential of these kernels is one ``ex2.approx.ftz`` (a
factor below 2^-126 is 0 for every sum it enters; tl.exp's subnormal handling cost 5
instructions for 2: 4.88 -> 4.68 ms at 8, 4096, 32, bf16). The sums of the exponents' gradients
are plain sums: one tf32 product at precision tf32 (each term rounded as in the kernels' other products: the
key-side kernel 3.25 -> 3.02 ms, dlog w's error 2.46e-3 -> 2.56e-3 against fla's 2.67e-3), split
at tf32x3. Everything key-side is separable in the key index, so the kernels work in blocks of
``block_k`` key channels: forward, Y = (r e^{P}) S0^T + A V with A summed over the key blocks;
when a backward follows, the forward also stores every chunk's A (float32 [C, C] per chunk and
head, kept for the backward like the chunk states; only its 16-row blocks on and below the
diagonal are written and read, 10 of 16 at C = 64: the output kernel 0.95 -> 0.91 ms at 8,
4096, 32), and the backward's dV = (k e^{Q}) dS^T + A^T dY takes it from there (_wkv6_bwd_values_kernel: one
product for A^T dY in place of the levels; H200, B=8, T=4096, H=32: the dV kernel 1.06 ->
0.54 ms, the forward's +0.03; with bfloat16 dY at tf32, A^T dY takes dY as stored and A split
in two bfloat16 parts, as the updates do: 0.41 -> 0.30 ms; without a saved A, e.g. after an
impl "blocks" forward, the output kernel rebuilds A^T). A second backward kernel, one program per (chunk, batch*head,
key block), gives dr, dk, dlog w, du, recomputing dA = dY V^T rather than passing it through
memory (passing it was timed: no faster): on the 16-row blocks once, and whole for each upper
level from v and dY loaded again (a [C, C] dA held from the start spilled; with bfloat16 v and
dY its products and the state's take bfloat16 operands, exact or split in two, so v and dY are
never widened: H200, B=8, T=4096, H=32, the key side 3.01 -> 2.61 ms). The 0/1 matrices of the
exponents' sums come from a small table in memory (_mask_table) rather than being built from
the indices in every program (the updates 0.62 -> 0.58 ms, dv 0.53 -> 0.42; with dv's Q a
[C, C] product again). The levels below 4 pair rows inside one
aligned block of 16 rows, so both kernels run them batched over those blocks ([C/16, 16, 16]
tiles, a 3-D ``tl.dot``) and only the levels from 4 up on [C, C] tiles: at C = 64 that is a
quarter of the level products' work for four of the six levels (H200: forward 2.01 -> 1.64 ms,
forward + backward 8.86 -> 7.49 at B=8, T=4096, H=32). In the key-side kernel the exponents
whose windows are whole 16-row blocks (P, Q and the levels from 4 up) and the sums of their
gradients are the block-local part (a masked product on [16, 16] tiles) plus the sums of the
window's other blocks (_wide_sum), not [C, C] masked products: still a sum of
exactly its terms, and 1504 -> 632 B of spills offline (sm_90, key block 32): 4.24 -> 3.43 ms
there (H200). The output kernel keeps the [C, C] products (the block sums made it slower, 2.12
-> 2.30 ms for y and dV). The key side's levels below 4 run transposed ([C/16, block_k, 16]: the
key side the left operand of each product, which is how an MMA result is laid out; as right
operands its tiles were re-laid out by shuffles at every level): 4,984 -> 4,528 instructions
offline, 2.46 -> 2.25 ms (H200, 8, 4096, 32); the upper levels' pair masks are built on the
16-row blocks' indices (the same masks, with the runtime level's index arithmetic folded): 2.25
-> 2.16 ms. The forward's output kernel has a lean build (_lean_out: N = C = 64, where it was
measured faster) for three programs per SM under a cap of 168 registers, its loops arranged to
spill little under it: 0.91 -> 0.88 ms with A saved, the forward alone 1.28 -> 1.19 ms (H200, 8,
4096, 32, bf16). See benchmarks/NOTES.md. The block kernels above
remain for chunks of 128 and as a second implementation the tests hold the first against.

Packed variable-length batches (``cu_seqlens``, both impls, every chunk size). The inputs are
[1, T, H, N] and sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]; the table of chunks
(``chunk_table.varlen_table``, shared with WKV-7) starts every sequence's chunks at its own
first token, so a chunk never straddles two sequences and each sequence's last chunk may be
partial (an empty sequence has none). The scans run one program per (sequence, head, tile)
over that sequence's chunks, from its own initial state, ending in its own final state
([S, H, N, N]); the states entering the chunks are stored [1, H, chunks, N, N] in table order.
The chunk kernels take chunk c of the table, look up its sequence and offset, and see that
sequence's length where the dense kernels see T: masks and exponent sums stop at its ends.
A constexpr VARLEN switch picks this indexing at the top of each kernel (``_chunk_at``,
``_sequence_at``); without ``cu_seqlens`` the kernels index [B, T] directly, as before, and
their loops are unchanged.

Matmul precision: "ieee" (exact float32), "tf32" (tensor cores; ~4e-4 relative error) or
"tf32x3". Default: ieee for float32 inputs, tf32 for bf16/fp16 inputs. The exponents, the
cumulative sums, the states and all accumulation are float32 everywhere.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .chunk_table import ChunkTable, varlen_table
from .fastmath import COMPILED
from .fastmath import fast_exp as _exp  # one ex2.approx.ftz on the GPU (fastmath.py)
from .recurrent import launch, state_block

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)
SUPPORTED_CHUNKS = (16, 32, 64, 128)
SUPPORTED_BLOCK_T = (16, 32, 64)
PRECISIONS = ("ieee", "tf32", "tf32x3")
IMPLS = ("blocks", "chunks")  # the chunk kernels: walking blocks of block_t rows, or whole chunks
CHUNKS_MAX = 64  # impl "chunks": [C, C] tiles, C <= 64
DEFAULT_CHUNK = 64
DEFAULT_BLOCK_T = 16
DEFAULT_IMPL = "blocks"  # the kernels' own default where a chunk is too long for "chunks"
# impl "chunks", from the H200 sweep (B8 T4096 H32 N64, bf16; benchmarks/NOTES.md): key channels per
# block of the output kernels (forward y, backward dv: 64 -> 1.4 ms each, 32 -> 2.0, 16 -> 2.9) and of
# the backward key-side kernel (32 -> 5.0 ms, 16 -> 7.2, 64 -> 12.8); 4 warps (8: 1.9-2.4x slower)
CHUNKS_BLOCK_K = 64
CHUNKS_KEYS_BLOCK_K = 32
CHUNKS_NUM_WARPS = 4
OUT_LEAN_MAXNREG = 168  # the forward's output kernel where _lean_out: three programs of 4 warps per SM
SUB_ROWS = 16  # the whole-chunk kernels' levels inside aligned blocks of 16 rows run batched on [16, 16] tiles
DEFAULT_NUM_WARPS = 4  # the "blocks" chunk kernels (H200 sweep: 8 warps 4.0 / 14.2 ms, 4 warps 3.0 / 11.75 ms)
BWD_BLOCK_T_MAX = 32  # the "blocks" backward at 64-row blocks needs 233-246 KB of shared memory (sm_90: 227 KB)


# --------------------------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _block_cumsum(x, ROWS: tl.constexpr, COLS: tl.constexpr, BLK: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive cumulative sum of x [ROWS, COLS] down the rows, restarting at every aligned block
    of BLK rows (reverse: from the block's last row up)."""
    if BLK == ROWS:
        out = tl.cumsum(x, axis=0, reverse=REVERSE)
    else:
        x3 = tl.reshape(x, (ROWS // BLK, BLK, COLS))
        out = tl.reshape(tl.cumsum(x3, axis=1, reverse=REVERSE), (ROWS, COLS))
    return out


@triton.jit
def _exclusive_combine(a1, b1, a2, b2):
    # (sum of a segment but its last element, its last element)
    return a1 + b1 + a2, b2


@triton.jit
def _block_exclusive_cumsum(x, ROWS: tl.constexpr, COLS: tl.constexpr, BLK: tl.constexpr, REVERSE: tl.constexpr):
    """Exclusive cumulative sum of x [ROWS, COLS] down the rows inside aligned blocks of BLK rows
    (reverse: the sum of the later rows of the block). A scan over (sum before, own value) pairs:
    a row's own value is never added and subtracted again, which would leave its rounding error
    in place of a sum of much smaller terms (the gradients of the exponents after a huge decay)."""
    if BLK == ROWS:
        out, _ = tl.associative_scan((tl.zeros_like(x), x), 0, _exclusive_combine, reverse=REVERSE)
    else:
        x3 = tl.reshape(x, (ROWS // BLK, BLK, COLS))
        out3, _ = tl.associative_scan((tl.zeros_like(x3), x3), 1, _exclusive_combine, reverse=REVERSE)
        out = tl.reshape(out3, (ROWS, COLS))
    return out


@triton.jit
def _pair_mask(offs_a, offs_b, LVL, A_IS_T: tl.constexpr):
    """Mask of the pairs (t, s) of level LVL: one aligned block of 2^(LVL+1) rows, s in its left
    half, t in its right half; t in ``offs_a`` and s in ``offs_b`` ([t, s]) or, if not A_IS_T,
    the transpose ([s, t] with s in offs_a)."""
    if A_IS_T:
        t = offs_a[:, None]
        s = offs_b[None, :]
    else:
        s = offs_a[:, None]
        t = offs_b[None, :]
    return ((t >> (LVL + 1)) == (s >> (LVL + 1))) & (((t >> LVL) & 1) == 1) & (((s >> LVL) & 1) == 0)


@triton.jit
def _level_decay(lwp, lwn, offs_t, LVL: tl.constexpr, L: tl.constexpr, N: tl.constexpr):
    """Level LVL >= 1 (blocks of h = 2^LVL rows): e^{pre_h} on rows in a right half, e^{suf_h} on
    rows in a left half ([L, N]). ``lwp``/``lwn``: log w shifted down/up by one row (0 outside
    the chunk), so block-local inclusive sums of them are the exclusive sums."""
    H_: tl.constexpr = 1 << LVL
    first = (offs_t & (H_ - 1)) == 0
    last = ((offs_t + 1) & (H_ - 1)) == 0
    pre = _block_cumsum(tl.where(first[:, None], 0.0, lwp), L, N, H_, False)
    suf = _block_cumsum(tl.where(last[:, None], 0.0, lwn), L, N, H_, True)
    right = ((offs_t >> LVL) & 1) == 1
    return tl.exp(tl.where(right[:, None], pre, suf))


@triton.jit
def _load_lw_shifted(lw_ptr, lw_base, t, offs_t, T, lw_st, offs_k, SHIFT: tl.constexpr, LEN: tl.constexpr):
    """log w at row t + SHIFT (SHIFT = -1: lwp, +1: lwn) for the rows t of a block of LEN rows
    (offs_t = position in the block), float32; 0 where that row lies outside the block or
    outside [0, T)."""
    if SHIFT < 0:
        m = (offs_t >= 1) & (t >= 1) & (t <= T)
    else:
        m = (offs_t < LEN - 1) & (t >= -1) & (t + 1 < T)
    p = lw_ptr + lw_base + (t.to(tl.int64) + SHIFT)[:, None] * lw_st + offs_k[None, :]
    return tl.load(p, mask=m[:, None], other=0.0).to(tl.float32)


@triton.jit
def _load_lw_row(lw_ptr, lw_base, t0, T, lw_st, offs_k):
    """log w at the single row t0, float32 [BK]; 0 outside [0, T)."""
    tt = offs_k * 0 + t0
    p = lw_ptr + lw_base + tt.to(tl.int64) * lw_st + offs_k
    return tl.load(p, mask=(tt >= 0) & (tt < T), other=0.0).to(tl.float32)


@triton.jit
def _intra_matrix(r, k, lwp, lwn, u, offs_t, BT: tl.constexpr, LOG2BT: tl.constexpr, N: tl.constexpr,
                  PREC: tl.constexpr):
    """A [BT, BT] of one block of BT rows: the bonus on the diagonal, the decayed r.k products
    below, one masked product per level (see the module docstring)."""
    t = offs_t[:, None]
    s = offs_t[None, :]
    A = tl.where(t == s, tl.sum(r * u[None, :] * k, axis=1)[:, None], 0.0)
    A += tl.where(_pair_mask(offs_t, offs_t, 0, True), tl.dot(r, tl.trans(k), input_precision=PREC), 0.0)
    for lvl in tl.static_range(1, LOG2BT):
        e = _level_decay(lwp, lwn, offs_t, lvl, BT, N)
        A += tl.where(_pair_mask(offs_t, offs_t, lvl, True), tl.dot(r * e, tl.trans(k * e), input_precision=PREC),
                      0.0)
    return A


@triton.jit
def _state_step(S, k, v, lwn, lw0, PREC: tl.constexpr):
    """The state after a block: S diag(e^{Lam}) + V^T (k e^{Q}); Lam = log w_0 + sum(lwn)
    (a sum of same-sign terms), Q = the reverse cumulative sum of lwn."""
    ke = k * tl.exp(tl.cumsum(lwn, axis=0, reverse=True))
    S = S * tl.exp(tl.sum(lwn, axis=0) + lw0)[None, :]
    return S + tl.dot(tl.trans(v), ke, input_precision=PREC)


@triton.jit
def _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks, lw_sb, lw_st, lw_sh,
              L: tl.constexpr, N: tl.constexpr, VARLEN: tl.constexpr):
    """Where the chunk of program (c, i_bh) of a chunk kernel lies. Dense: chunk c of
    sequence i_bh // H. VARLEN (packed [1, tokens, H, N], i_bh = the head): chunk c of the
    table, inside the sequence ``chunk_seq[c]``. Returns (the chunk's index inside its
    sequence, the sequence's length, the offset of its first token at this head, that of its
    log w, the chunks per (sequence, head) row of the state buffers (states at row i_bh * NC
    + c), the head)."""
    if VARLEN:
        seq = tl.load(chunk_seq_ptr + c)
        start = tl.load(cu_ptr + seq)
        T_seq = tl.load(cu_ptr + seq + 1) - start
        c_loc = c - tl.load(chunk_cu_ptr + seq)
        i_h = i_bh
        tok0 = start.to(tl.int64) * (H * N) + i_h * N
        lw_base = start.to(tl.int64) * lw_st + i_h * lw_sh
        NC = n_chunks
    else:
        T_seq = T
        c_loc = c
        i_b = i_bh // H
        i_h = i_bh % H
        tok0 = i_b * T * (H * N) + i_h * N
        lw_base = i_b * lw_sb + i_h * lw_sh
        NC = tl.cdiv(T, L)
    return c_loc, T_seq, tok0, lw_base, NC, i_h


@triton.jit
def _sequence_at(cu_ptr, chunk_cu_ptr, i_bh, T, H, n_chunks, lw_sb, lw_st, lw_sh,
                 L: tl.constexpr, N: tl.constexpr, VARLEN: tl.constexpr):
    """Where the sequence and head i_bh (= sequence * H + head) of a scan program lies: its
    length, the offset of its first token at this head, that of its log w, its chunk count,
    and the row of its first chunk in the state buffers (dense: [B, H, NC, ...]; VARLEN:
    [1, H, chunks, ...], the sequence's chunks from ``chunk_cu[seq]``)."""
    i_b = i_bh // H
    i_h = i_bh % H
    if VARLEN:
        start = tl.load(cu_ptr + i_b)
        T_seq = tl.load(cu_ptr + i_b + 1) - start
        tok0 = start.to(tl.int64) * (H * N) + i_h * N
        lw_base = start.to(tl.int64) * lw_st + i_h * lw_sh
        NC = tl.cdiv(T_seq, L)
        st0 = i_h * n_chunks + tl.load(chunk_cu_ptr + i_b)
    else:
        T_seq = T
        tok0 = i_b * T * (H * N) + i_h * N
        lw_base = i_b * lw_sb + i_h * lw_sh
        NC = tl.cdiv(T, L)
        st0 = i_bh * NC
    return T_seq, tok0, lw_base, NC, st0


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "H", "n_chunks"])  # one compile for every T and H
def _wkv6_fwd_out_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr,  # [B, T, H, N]; log w through its strides
    u_ptr,  # [H, N]
    states_ptr,  # [B, H, NC, N, N] float32: the state entering each chunk
    y_ptr,  # [B, T, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # VARLEN: the chunk table (int32; else unused)
    T, H, lw_sb, lw_st, lw_sh, n_chunks,
    N: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, LOG2BT: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, VARLEN: tl.constexpr,
):
    """Forward output, every (chunk, batch*head, value block) in parallel. A program walks its
    chunk in blocks of BT rows, carrying the [BV, N] state in registers:
    Y = (r e^{P}) S^T + A V, then S <- S diag(e^{Lam}) + V^T (k e^{Q})."""
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    c_loc, T, tok0, lw_base, NC, i_h = _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks,
                                                 lw_sb, lw_st, lw_sh, L, N, VARLEN)
    stride_t = H * N
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    u = tl.load(u_ptr + i_h * N + offs_k).to(tl.float32)
    S = tl.load(states_ptr + (i_bh * NC + c) * N * N + offs_v[:, None] * N + offs_k[None, :])

    n_blocks = tl.minimum(L // BT, tl.cdiv(T - c_loc * L, BT))
    for i in range(n_blocks):
        t0 = c_loc * L + i * BT
        t = t0 + offs_t
        tmask = (t < T)[:, None]
        row = tok0 + t.to(tl.int64)[:, None] * stride_t
        r = tl.load(r_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row + offs_v[None, :], mask=tmask, other=0.0).to(tl.float32)
        lwp = _load_lw_shifted(lw_ptr, lw_base, t, offs_t, T, lw_st, offs_k, -1, BT)
        lwn = _load_lw_shifted(lw_ptr, lw_base, t, offs_t, T, lw_st, offs_k, 1, BT)

        rq = r * tl.exp(tl.cumsum(lwp, axis=0))  # r_t e^{P_t}
        Y = tl.dot(rq, tl.trans(S), input_precision=PREC)
        A = _intra_matrix(r, k, lwp, lwn, u, offs_t, BT, LOG2BT, N, PREC)
        Y += tl.dot(A, v, input_precision=PREC)
        tl.store(y_ptr + row + offs_v[None, :], Y.to(y_ptr.dtype.element_ty), mask=tmask)
        # (unconditional: the update after the last block is unused; a loop-carried tensor
        # changed under a branch gave wrong outputs on sm_90 with triton 3.6)
        S = _state_step(S, k, v, lwn, _load_lw_row(lw_ptr, lw_base, t0, T, lw_st, offs_k), PREC)


@triton.jit(do_not_specialize=["T", "H", "n_chunks", "part_stride"])  # one compile for every T and H
def _wkv6_bwd_chunks_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr,  # [B, T, H, N]; log w through its strides
    u_ptr,  # [H, N]
    states_ptr, dstates_ptr,  # [B, H, NC, N, N] float32
    dy_ptr,  # [B, T, H, N]
    dr_ptr, dlw_ptr, dk_ptr,  # [NV, B, T, H, N]: partial sums over value blocks
    du_ptr,  # [NV, NC, B*H, N] float32: partial sums over value blocks and chunks
    dv_ptr,  # [B, T, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # VARLEN: the chunk table (int32; else unused)
    T, H, lw_sb, lw_st, lw_sh, n_chunks, part_stride,
    N: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, LOG2BT: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, VARLEN: tl.constexpr,
):
    """Backward of every (chunk, batch*head, value block) in parallel, from the state entering
    the chunk and the gradient of the state leaving it. A program walks its chunk's blocks of BT
    rows in reverse, carrying dS in registers; the state entering a block is recomputed from
    the chunk's (a few cheap state steps: no per-block state in memory)."""
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    n_bh = tl.num_programs(1)
    c_loc, T, tok0, lw_base, NC, i_h = _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks,
                                                 lw_sb, lw_st, lw_sh, L, N, VARLEN)
    stride_t = H * N
    part = i_v.to(tl.int64) * part_stride
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    s_offs = (i_bh * NC + c) * N * N + offs_v[:, None] * N + offs_k[None, :]
    u = tl.load(u_ptr + i_h * N + offs_k).to(tl.float32)
    S_c = tl.load(states_ptr + s_offs)
    dS = tl.load(dstates_ptr + s_offs)
    diag = offs_t[:, None] == offs_t[None, :]
    du = tl.zeros([N], dtype=tl.float32)

    n_blocks = tl.minimum(L // BT, tl.cdiv(T - c_loc * L, BT))
    for ii in range(n_blocks):
        i = n_blocks - 1 - ii
        # the state entering block i
        S = S_c
        for j in range(i):
            t = c_loc * L + j * BT + offs_t
            tmask = (t < T)[:, None]
            row = tok0 + t.to(tl.int64)[:, None] * stride_t
            k = tl.load(k_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row + offs_v[None, :], mask=tmask, other=0.0).to(tl.float32)
            lwn = _load_lw_shifted(lw_ptr, lw_base, t, offs_t, T, lw_st, offs_k, 1, BT)
            S = _state_step(S, k, v, lwn, _load_lw_row(lw_ptr, lw_base, c_loc * L + j * BT, T, lw_st, offs_k), PREC)

        t0 = c_loc * L + i * BT
        t = t0 + offs_t
        tmask = (t < T)[:, None]
        row = tok0 + t.to(tl.int64)[:, None] * stride_t
        pk = row + offs_k[None, :]
        pv = row + offs_v[None, :]
        r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + pv, mask=tmask, other=0.0).to(tl.float32)
        dY = tl.load(dy_ptr + pv, mask=tmask, other=0.0).to(tl.float32)
        lwp = _load_lw_shifted(lw_ptr, lw_base, t, offs_t, T, lw_st, offs_k, -1, BT)
        lwn = _load_lw_shifted(lw_ptr, lw_base, t, offs_t, T, lw_st, offs_k, 1, BT)
        lw0 = _load_lw_row(lw_ptr, lw_base, t0, T, lw_st, offs_k)

        # state and value side
        gP = tl.exp(tl.cumsum(lwp, axis=0))  # e^{P_t}
        gQ = tl.exp(tl.cumsum(lwn, axis=0, reverse=True))  # e^{Q_s}
        gLam = tl.exp(tl.sum(lwn, axis=0) + lw0)
        rq = r * gP
        ke = k * gQ
        dv = tl.dot(ke, tl.trans(dS), input_precision=PREC)  # [BT, BV]
        dA = tl.dot(dY, tl.trans(v), input_precision=PREC)  # [BT, BT] (only its lower triangle is used)
        drq = tl.dot(dY, S, input_precision=PREC)  # [BT, N]
        dke = tl.dot(v, dS, input_precision=PREC)  # [BT, N]
        dlam = tl.sum(dS * S, axis=0) * gLam  # [N]
        dS = dS * gLam[None, :] + tl.dot(tl.trans(dY), rq, input_precision=PREC)  # leaving block i - 1

        # dV is complete once A is known. A is computed in a pass of its own (the levels' decay
        # factors are recomputed below): fewer live tiles, fewer register spills on sm_90.
        A = _intra_matrix(r, k, lwp, lwn, u, offs_t, BT, LOG2BT, N, PREC)
        dv += tl.dot(tl.trans(A), dY, input_precision=PREC)
        tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=tmask)

        # bonus (the diagonal of A)
        bd = tl.sum(tl.where(diag, dA, 0.0), axis=1)  # [BT]
        ruk = bd[:, None] * u[None, :]
        dr = drq * gP + ruk * k
        dk = dke * gQ + ruk * r
        du += tl.sum(bd[:, None] * r * k, axis=0)

        # exponents P (reverse exclusive sums) and Q (forward exclusive sums); Lam (every row)
        dP = drq * rq
        dQ = dke * ke
        dlw = _block_exclusive_cumsum(dP, BT, N, BT, True) + _block_exclusive_cumsum(dQ, BT, N, BT, False)
        dlw += dlam[None, :]

        # level 0: no decay between the pairs
        m = _pair_mask(offs_t, offs_t, 0, True)
        dAm = tl.where(m, dA, 0.0)
        dr += tl.dot(dAm, k, input_precision=PREC)
        dk += tl.dot(tl.trans(dAm), r, input_precision=PREC)
        for lvl in tl.static_range(1, LOG2BT):
            e = _level_decay(lwp, lwn, offs_t, lvl, BT, N)
            Rh = r * e
            Kh = k * e
            m = _pair_mask(offs_t, offs_t, lvl, True)
            dAm = tl.where(m, dA, 0.0)
            dRh = tl.dot(dAm, Kh, input_precision=PREC)  # zero outside right-half rows
            dKh = tl.dot(tl.trans(dAm), Rh, input_precision=PREC)  # zero outside left-half rows
            dr += dRh * e
            dk += dKh * e
            dlw += _block_exclusive_cumsum(dRh * Rh, BT, N, 1 << lvl, True)  # d pre_h
            dlw += _block_exclusive_cumsum(dKh * Kh, BT, N, 1 << lvl, False)  # d suf_h

        tl.store(dr_ptr + part + pk, dr.to(dr_ptr.dtype.element_ty), mask=tmask)
        tl.store(dk_ptr + part + pk, dk.to(dk_ptr.dtype.element_ty), mask=tmask)
        tl.store(dlw_ptr + part + pk, dlw.to(dlw_ptr.dtype.element_ty), mask=tmask)

    tl.store(du_ptr + ((i_v * NC + c) * n_bh + i_bh) * N + offs_k, du)


# --------------------------------------------------------------------------------------------
# Whole-chunk kernels (impl="chunks"): one program per chunk, nothing carried, no scans
# --------------------------------------------------------------------------------------------


@triton.jit
def _mask_dot(m, x, PREC: tl.constexpr, X_LEFT: tl.constexpr = False):
    """m @ x for a 0/1 matrix m [L, L] and x [L, N] float32 (X_LEFT: x [N, L] @ m), to float32
    accuracy: every output is a sum of exactly the terms of x that m selects (the others add an
    exact 0, never a value added and subtracted again), so these products are the block-local
    (exclusive) cumulative sums of the module docstring, on tensor cores. PREC "tf32x3" (or
    "tf32"): x split into its tf32 head (the top 10 mantissa bits, exact in tf32) and the rest, two
    products; the 0/1 matrix is exact in tf32, so the relative error per term is ~2^-21 (x must be
    finite). "one": one tf32 product with float32 sums, exact where x is exact in tf32 (log w from
    bfloat16 or float16: at most 10 mantissa bits), else each term rounded to tf32 (~2^-11);
    "round" the same, for a log w that _load_lw_chunk rounded to tf32 (exact); "bf16": m and x
    bfloat16 (a bfloat16 log w as loaded, the bfloat16 table), one bfloat16 product with float32
    sums, exact as "one" is, with half the operand bytes; "round_bf16": m bfloat16 and x a log w
    rounded to tf32 (11 significant bits, so exactly the sum of two bfloat16 parts), two bfloat16
    products (_split_dot), exact as "round" is."""
    if PREC == "ieee":
        out = _dot_either(m, x, X_LEFT, "ieee", None)
    elif PREC == "bf16":
        out = _bdot(x, m) if X_LEFT else _bdot(m, x)
    elif PREC == "round_bf16":
        out = _split_dot(m, x, X_LEFT)
    elif PREC == "one" or PREC == "round":
        out = _dot_either(m, x, X_LEFT, "tf32", None)
    else:
        hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        out = _dot_either(m, hi, X_LEFT, "tf32", None)
        out = _dot_either(m, x - hi, X_LEFT, "tf32", out)
    return out


@triton.jit
def _dot_either(m, x, X_LEFT: tl.constexpr, PREC: tl.constexpr, acc):
    """m @ x, or x @ m if X_LEFT, plus acc (None: nothing)."""
    if X_LEFT:
        out = tl.dot(x, m, acc=acc, input_precision=PREC)
    else:
        out = tl.dot(m, x, acc=acc, input_precision=PREC)
    return out


@triton.jit
def _sub(x, L: tl.constexpr, SUB: tl.constexpr, C: tl.constexpr):
    """[L, C] -> [L / SUB, SUB, C]: the chunk's aligned blocks of SUB rows as a batch."""
    return tl.reshape(x, (L // SUB, SUB, C))


@triton.jit
def _mask_dot_sub(m, x3, L: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr, X_LEFT: tl.constexpr = False):
    """_mask_dot of the same 0/1 matrix m [SUB, SUB] with every block of x3 [L / SUB, SUB, C]
    (X_LEFT: x3 [L / SUB, C, SUB] @ m, every block)."""
    return _mask_dot(tl.broadcast_to(m[None, :, :], (L // SUB, SUB, SUB)), x3, PREC, X_LEFT)


@triton.jit
def _wide_prefix_blocks(offs_b, G, KIND: tl.constexpr):
    """Per block of SUB rows (offs_b: the chunk's NB blocks), whether an exponent of a window of
    2^G blocks is a prefix sum there (else a suffix sum): KIND 0 always, 1 never, 2 in the right
    half of the 2^(G+1)-block (pre_h / suf_h of a level, E_h of the module docstring)."""
    if KIND == 0:
        pref = offs_b >= 0
    elif KIND == 1:
        pref = offs_b < 0
    else:
        pref = ((offs_b >> G) & 1) == 1
    return pref


@triton.jit
def _wide_sum(x3, offs_s, offs_b, G, KIND: tl.constexpr, TRANS: tl.constexpr, PREC: tl.constexpr, masks_ptr,
              L: tl.constexpr, LOG2S: tl.constexpr):
    """The exponents of windows of 2^G whole blocks of SUB rows (P, Q over the chunk and the
    levels from LOG2S up), for the rows x3 [NB, SUB, BK] of log w: on a prefix block, the sum
    of log w over the rows of the window before t; on a suffix block, after t. Computed as the
    block-local exclusive sum (a masked product on [SUB, SUB] tiles, _mask_dot) plus the totals
    of the window's whole blocks before (after) t's block: still a sum of exactly the log-decays
    the exponent spans, all <= 0, in place of one [L, L] masked product per exponent (H200,
    B=8, T=4096, H=32: those cost about a quarter of the backward). TRANS: the transpose, for
    the gradient: x3 the gradient of the exponent on every row, and each row q gets the sum of
    x over the rows t whose window holds q; each a sum of exactly its terms, none added and
    subtracted again. The block-local masks come from the table (_mask)."""
    SUB: tl.constexpr = 1 << LOG2S
    NB: tl.constexpr = L // SUB
    pref = _wide_prefix_blocks(offs_b, G, KIND)
    # the block-local exclusive sums: rows j < i on prefix blocks, j > i on suffix blocks
    if KIND == 2:
        lt = _mask(masks_ptr, LOG2S, 0, False, offs_s, offs_s, L)
        gt = _mask(masks_ptr, LOG2S, 1, False, offs_s, offs_s, L)
        m3 = tl.where((pref != TRANS)[:, None, None], lt[None, :, :], gt[None, :, :])
    else:
        m3 = tl.broadcast_to(_mask(masks_ptr, LOG2S, KIND ^ TRANS, False, offs_s, offs_s, L)[None, :, :],
                             (NB, SUB, SUB))
    loc = _mask_dot(m3, x3, PREC)
    o = offs_b[:, None]  # the output's block
    m = offs_b[None, :]  # the summed block
    if TRANS:  # the summed block's rows are the t whose window holds the output's rows
        sel = tl.where(pref[None, :], m > o, m < o)
    else:
        sel = tl.where(pref[:, None], m < o, m > o)
    sel = sel & ((o >> G) == (m >> G))
    carry = tl.sum(tl.where(sel[:, :, None], tl.sum(x3, axis=1)[None, :, :], 0.0), axis=1)
    return loc + carry[:, None, :]


@triton.jit
def _dot_in(a, b, PREC: tl.constexpr, BF16_DOTS: tl.constexpr):
    """a @ b for inputs as stored: two bfloat16 operands on the tensor cores as they are (each
    product exact, float32 sums: what tf32 gives them), if BF16_DOTS (off under the Triton CPU
    interpreter, whose bfloat16 dot is wrong: Triton 3.9), else in float32 at PREC."""
    if BF16_DOTS and a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
        out = tl.dot(a, b)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return out


@triton.jit
def _bdot(a, b, acc=None):
    """a @ b (+ acc) for bfloat16 a and b on the tensor cores: every product exact, float32 sums.
    Under the Triton CPU interpreter, whose bfloat16 dot is wrong (Triton 3.9), the same
    products in float32 (exact there too), so the interpreter tests run this path."""
    if COMPILED:
        out = tl.dot(a, b, acc=acc)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return out


@triton.jit
def _split_dot(b, x, X_LEFT: tl.constexpr):
    """b @ x (X_LEFT: x @ b) for bfloat16 b and float32 x, x split into two bfloat16 parts (its
    top 16 mantissa bits, where a tf32 operand keeps 10): two exact bfloat16 products with
    float32 sums. Where b is an input as stored (v, dY), this moves half the shared-memory bytes
    of a tf32 product of the two (the update and dv kernels are bound by shared memory: ncu)."""
    xh = x.to(tl.bfloat16)
    xl = (x - xh.to(tl.float32)).to(tl.bfloat16)
    if X_LEFT:
        out = _bdot(xl, b, _bdot(xh, b))
    else:
        out = _bdot(b, xl, _bdot(b, xh))
    return out


@triton.jit
def _dot_split(ah, x):
    """ah @ x for bfloat16 ah and float32 x: x split into two bfloat16 parts (16 of its mantissa
    bits, where a tf32 operand keeps 10), two exact bfloat16 products with float32 sums. The key
    side's own copy of _split_dot (which it only calls on the GPU, BF16_DOTS): built through
    _split_dot its code moved (offline sm_90: 4,384 -> 4,400 instructions), and that was not
    timed."""
    xh = x.to(tl.bfloat16)
    return tl.dot(ah, (x - xh.to(tl.float32)).to(tl.bfloat16), acc=tl.dot(ah, xh))


@triton.jit
def _mask(masks_ptr, lvl, KIND: tl.constexpr, TRANS: tl.constexpr, offs_a, offs_b, L: tl.constexpr):
    """The 0/1 matrix of the exponent sums of level ``lvl``, KIND and TRANS (_mask_table), rows
    offs_a and columns offs_b of its [L, L] entry (offs in [0, SUB) give its top-left block, the
    same as every aligned diagonal block below level LOG2S). Loaded (cached) rather than built
    from the indices, which took ~5 integer instructions per element: offline (sm_90), the output
    kernel 3,680 -> 3,280 instructions and no more spills. (The pair masks of tl.where stay
    built: loaded, the key-side kernel had more instructions.)"""
    base = masks_ptr + ((lvl * 3 + KIND) * 2 + TRANS) * L * L
    return tl.load(base + offs_a[:, None] * L + offs_b[None, :])


@triton.jit
def _load_lw_chunk(lw_ptr, lw_base, t, tmask, lw_st, offs_k, LWP: tl.constexpr):
    """log w of a chunk's rows t [L, N], float32; 0 past T; -inf (and anything below -1e30)
    as -1e30: the same factor e^x = 0, and finite, as the masked products need. LWP "round"
    (and "round_bf16"): each value rounded to the nearest tf32 value (ties to even), which the one-product sums
    (_mask_dot) then add exactly; "bf16": a bfloat16 log w kept bfloat16 (-1e30 in bfloat16)."""
    p = lw_ptr + lw_base + t.to(tl.int64)[:, None] * lw_st + offs_k[None, :]
    lw = tl.maximum(tl.load(p, mask=tmask, other=0.0).to(tl.float32), -1e30)
    if LWP == "bf16":  # exact: bfloat16 values, and -1e30 rounded (the interpreter's bfloat16 maximum is wrong)
        lw = lw.to(tl.bfloat16)
    if LWP == "round" or LWP == "round_bf16":  # (a tf32 operand keeps the top 10 of float32's 23 mantissa bits)
        bits = lw.to(tl.uint32, bitcast=True)
        bits += 0xFFF + ((bits >> 13) & 1)
        lw = (bits & 0xFFFFE000).to(tl.float32, bitcast=True)
    return lw


@triton.jit
def _level_term(a3, b3, e3, offs_s, lvl, A_IS_T: tl.constexpr, PREC: tl.constexpr):
    """A level below LOG2S of _wkv6_chunk_out_kernel, batched over the blocks of SUB rows: its
    pairs' entries of (a e) (b e)^T, 0 elsewhere."""
    return tl.where(_pair_mask(offs_s, offs_s, lvl, A_IS_T)[None, :, :],
                    tl.dot(a3 * e3, tl.permute(b3 * e3, (0, 2, 1)), input_precision=PREC), 0.0)


@triton.jit
def _upper_level_term(a, b, lw, masks_ptr, pair_offs, pair_lvl, lvl, L: tl.constexpr, A_IS_T: tl.constexpr,
                      PREC: tl.constexpr, LWP: tl.constexpr):
    """A level from LOG2S up on [L, L] tiles; its pairs by _pair_mask(pair_offs, pair_offs,
    pair_lvl): the rows' indices at level lvl, or the blocks' at lvl - LOG2S (the same pairs)."""
    e = _exp(_mask_dot(_mask(masks_ptr, lvl, 2, False, tl.arange(0, L), tl.arange(0, L), L), lw, LWP))
    return tl.where(_pair_mask(pair_offs, pair_offs, pair_lvl, A_IS_T),
                    tl.dot(a * e, tl.trans(b * e), input_precision=PREC), 0.0)


@triton.jit(do_not_specialize=["T", "H", "n_chunks"])  # one compile for every T and H
def _wkv6_chunk_out_kernel(
    a_ptr, lw_ptr, b_ptr,  # forward: r, log w, k; backward: k, log w, r   [B, T, H, N]
    x_ptr,  # forward: v; backward: dY   [B, T, H, N]
    u_ptr,  # [H, N]
    s_ptr,  # [B, H, NC, N, N] float32: forward the state entering each chunk, backward dS leaving it
    out_ptr,  # forward: y; backward: dv   [B, T, H, N]
    amat_ptr,  # [B, H, NC, L, L] float32 out (STORE_A): A of every chunk
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # VARLEN: the chunk table (int32; else unused)
    masks_ptr,  # [LOG2L + 1, 3, 2, L, L] float32: _mask_table
    T, H, lw_sb, lw_st, lw_sh, n_chunks,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, LOG2S: tl.constexpr, BV: tl.constexpr,
    BK: tl.constexpr, BWD: tl.constexpr, PREC: tl.constexpr, LWP: tl.constexpr, VARLEN: tl.constexpr,
    STORE_A: tl.constexpr, LEAN: tl.constexpr = False,
):
    """One whole chunk per (chunk, batch*head, value block), nothing carried:
    forward  Y  = (r e^{P}) S0^T + A V,
    backward dV = (k e^{Q}) dS^T + A^T dY,
    A (A^T) summed over key blocks of BK channels, each block's part from its LOG2L levels, their
    exponents as masked products (_mask_dot), no scans. The levels below LOG2S pair rows inside
    one aligned block of SUB = 2^LOG2S rows: they (and the bonus) are batched over those blocks
    ([L/SUB, SUB, SUB] tiles, A3), the levels above take [L, L] tiles (A).
    STORE_A (forward): A is also stored, for the backward's _wkv6_bwd_values_kernel (which then
    reads it rather than rebuilding it). LEAN: the levels' loops built for a register cap
    (_lean_out)."""
    SUB: tl.constexpr = 1 << LOG2S
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    c_loc, T, tok0, lw_base, NC, i_h = _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks,
                                                 lw_sb, lw_st, lw_sh, L, N, VARLEN)
    stride_t = H * N
    offs_t = tl.arange(0, L)
    offs_s = tl.arange(0, SUB)
    offs_v = i_v * BV + tl.arange(0, BV)
    t = c_loc * L + offs_t
    tmask = (t < T)[:, None]
    row = tok0 + t.to(tl.int64)[:, None] * stride_t
    s_base = s_ptr + (i_bh * NC + c) * N * N + offs_v[:, None] * N

    A = tl.zeros([L, L], dtype=tl.float32)  # A [t, s] (forward) or A^T [s, t] (backward: a = k, b = r)
    A3 = tl.zeros([L // SUB, SUB, SUB], dtype=tl.float32)  # its blocks on the diagonal, levels < LOG2S
    out = tl.zeros([L, BV], dtype=tl.float32)
    for i_k in range(N // BK):
        offs_k = i_k * BK + tl.arange(0, BK)
        a = tl.load(a_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
        lw = _load_lw_chunk(lw_ptr, lw_base, t, tmask, lw_st, offs_k, LWP)
        u = tl.load(u_ptr + i_h * N + offs_k).to(tl.float32)
        a3 = _sub(a, L, SUB, BK)
        b3 = _sub(b, L, SUB, BK)
        lw3 = _sub(lw, L, SUB, BK)
        eye = (offs_s[:, None] == offs_s[None, :])[None, :, :]
        A3 += tl.where(eye, tl.sum(a3 * u[None, None, :] * b3, axis=2)[:, :, None], 0.0)
        A3 += tl.where(_pair_mask(offs_s, offs_s, 0, not BWD)[None, :, :],
                       tl.dot(a3, tl.permute(b3, (0, 2, 1)), input_precision=PREC), 0.0)
        if LEAN:
            # built for three programs per SM (the launch caps the registers at OUT_LEAN_MAXNREG):
            # the low levels a loop that is not software-pipelined (num_stages=1: without the mask
            # tiles' copies in flight the fast exponential no longer makes the compiler unroll it
            # and spill), the upper levels unrolled with their pairs on the blocks' indices (as a
            # loop Triton pipelined their mask loads over 3 stages: 80 KB of shared memory, which
            # left room for two programs). H200, 8, 4096, 32, bf16: 0.914 -> 0.883 ms with A saved,
            # forward alone 1.28 -> 1.19 ms; uncapped, these loops were slower (0.96 -> 1.02)
            for lvl in tl.range(1, LOG2S, num_stages=1):
                e3 = _exp(_mask_dot_sub(_mask(masks_ptr, lvl, 2, False, offs_s, offs_s, L), lw3, L, SUB, LWP))
                A3 += _level_term(a3, b3, e3, offs_s, lvl, not BWD, PREC)
            for lvl in tl.static_range(LOG2S, LOG2L):
                A += _upper_level_term(a, b, lw, masks_ptr, offs_t >> LOG2S, lvl - LOG2S, lvl, L, not BWD, PREC, LWP)
        else:
            for lvl in range(1, LOG2S):  # a loop, not unrolled: fewer live registers
                # tl.exp, not _exp: with _exp the compiler unrolled this loop and spilled (offline 128 B)
                e3 = tl.exp(_mask_dot_sub(_mask(masks_ptr, lvl, 2, False, offs_s, offs_s, L), lw3, L, SUB, LWP))
                A3 += _level_term(a3, b3, e3, offs_s, lvl, not BWD, PREC)
            for lvl in range(LOG2S, LOG2L):
                A += _upper_level_term(a, b, lw, masks_ptr, offs_t, lvl, lvl, L, not BWD, PREC, LWP)
        # forward: e^{P} (prefix, kind 0); backward: e^{Q} (suffix, kind 1) over the whole chunk
        g = _exp(_mask_dot(_mask(masks_ptr, LOG2L, 1 if BWD else 0, False, offs_t, offs_t, L), lw, LWP))
        S = tl.load(s_base + offs_k[None, :])  # [BV, BK]
        out = tl.dot(a * g, tl.trans(S), acc=out, input_precision=PREC)
    x = tl.load(x_ptr + row + offs_v[None, :], mask=tmask, other=0.0).to(tl.float32)
    out += tl.reshape(tl.dot(A3, _sub(x, L, SUB, BV), input_precision=PREC), (L, BV))
    if LOG2L > LOG2S:
        out = tl.dot(A, x, acc=out, input_precision=PREC)
    if STORE_A:  # the diagonal blocks from A3, the rest from A (zero there)
        if i_v == 0:
            a_base = amat_ptr + (i_bh * NC + c) * L * L
            bt = (tl.arange(0, L // SUB) * SUB)[:, None, None]
            tl.store(a_base + (bt + offs_s[None, :, None]) * L + bt + offs_s[None, None, :], A3)
            if LOG2L > LOG2S:
                below = (offs_t[:, None] >> LOG2S) > (offs_t[None, :] >> LOG2S)  # A's blocks above are 0: not stored
                tl.store(a_base + offs_t[:, None] * L + offs_t[None, :], A, mask=below)
    tl.store(out_ptr + row + offs_v[None, :], out.to(out_ptr.dtype.element_ty), mask=tmask)


@triton.jit(do_not_specialize=["T", "H", "n_chunks"])  # one compile for every T and H
def _wkv6_bwd_values_kernel(
    lw_ptr, k_ptr, dy_ptr,  # [B, T, H, N]; log w through its strides
    amat_ptr,  # [B, H, NC, L, L] float32: the forward's A of every chunk
    dstates_ptr,  # [B, H, NC, N, N] float32: the gradient of the state leaving each chunk
    dv_ptr,  # [B, T, H, N]
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # VARLEN: the chunk table (int32; else unused)
    masks_ptr,  # [LOG2L + 1, 3, 2, L, L] float32 (LWP "bf16", "round_bf16": bfloat16): _mask_table
    T, H, lw_sb, lw_st, lw_sh, n_chunks,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, LOG2S: tl.constexpr, BV: tl.constexpr,
    BK: tl.constexpr, PREC: tl.constexpr, LWP: tl.constexpr, VARLEN: tl.constexpr, BF16_OPS: tl.constexpr,
):
    """dV = A^T dY + (k e^{Q}) dS^T of one chunk and BV value channels with the forward's A
    (one product in place of rebuilding A from its levels, as _wkv6_chunk_out_kernel does when
    there is no saved A); Q by a masked product (offline sm_90: 1,656 -> 1,120 instructions and
    155 -> 128 registers against block sums, _wide_sum). BF16_OPS (bfloat16 dY, at tf32): A^T dY
    with dY as stored and A split in two bfloat16 parts (_split_dot)."""
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    c_loc, T, tok0, lw_base, NC, i_h = _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks,
                                                 lw_sb, lw_st, lw_sh, L, N, VARLEN)
    offs_t = tl.arange(0, L)
    offs_v = i_v * BV + tl.arange(0, BV)
    t = c_loc * L + offs_t
    tmask = (t < T)[:, None]
    row = tok0 + t.to(tl.int64)[:, None] * (H * N)
    slot = i_bh * NC + c
    dY = tl.load(dy_ptr + row + offs_v[None, :], mask=tmask, other=0.0)
    # [s, t]: A's blocks of 2^LOG2S rows above the diagonal are 0 and not stored by the forward,
    # so not read. The mask is constant over each block's rows, so the copies stay vectorised (an
    # elementwise t >= s mask made them scalar: this kernel 0.41 -> 0.43 ms at 8, 4096, 32, H200;
    # with this one 0.41, and the forward's output kernel 0.95 -> 0.91 for the 6 blocks not stored)
    At = tl.load(amat_ptr + slot * L * L + offs_t[None, :] * L + offs_t[:, None],
                 mask=(offs_t[None, :] // (1 << LOG2S)) >= (offs_t[:, None] // (1 << LOG2S)), other=0.0)
    if BF16_OPS:
        dv = _split_dot(dY, At, X_LEFT=True)
    else:
        dv = tl.dot(At, dY.to(tl.float32), input_precision=PREC)
    for i_k in range(N // BK):
        offs_k = i_k * BK + tl.arange(0, BK)
        k = tl.load(k_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
        gq = _exp(_mask_dot(_mask(masks_ptr, LOG2L, 1, False, offs_t, offs_t, L),
                              _load_lw_chunk(lw_ptr, lw_base, t, tmask, lw_st, offs_k, LWP), LWP))  # e^{Q}
        dS = tl.load(dstates_ptr + slot * N * N + offs_v[:, None] * N + offs_k[None, :])  # [BV, BK]
        dv = tl.dot(k * gq, tl.trans(dS), acc=dv, input_precision=PREC)
    tl.store(dv_ptr + row + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty), mask=tmask)


@triton.jit(do_not_specialize=["T", "H", "n_chunks"])  # one compile for every T and H
def _wkv6_bwd_keys_kernel(
    r_ptr, lw_ptr, k_ptr, v_ptr,  # [B, T, H, N]; log w through its strides
    u_ptr,  # [H, N]
    states_ptr, dstates_ptr,  # [B, H, NC, N, N] float32
    glam_ptr,  # [B, H, NC, N] float32: e^{Lam} of every chunk (from _chunk_states)
    dy_ptr,  # [B, T, H, N]
    dr_ptr, dlw_ptr, dk_ptr,  # [B, T, H, N]
    du_ptr,  # [NC, B*H, N] float32: partial sums over chunks
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # VARLEN: the chunk table (int32; else unused)
    masks_ptr,  # [LOG2L + 1, 3, 2, L, L] float32: _mask_table
    T, H, lw_sb, lw_st, lw_sh, n_chunks,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, LOG2S: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, LWP: tl.constexpr, GP: tl.constexpr, VARLEN: tl.constexpr, BF16_DOTS: tl.constexpr,
):
    """Key-side gradients (dr, dk, dlog w, du) of one whole chunk and BK key channels (they
    are separable in the key index), from the state entering the chunk and the gradient of the
    state leaving it; dA = dY V^T recomputed (on the blocks of SUB rows once, and whole for each
    level from LOG2S up), the exponents and the exclusive sums of their gradients as masked
    products (_mask_dot); the levels below LOG2S batched over the aligned blocks of SUB rows, as
    in _wkv6_chunk_out_kernel; dLam from the scan's e^{Lam} (glam_ptr). LWP: the precision of the
    exponents' sums of log w (_lw_precision); GP: that of the sums of their gradients ("one"
    product at precision tf32: each term rounded to tf32 as in the kernels' other products; split
    at tf32x3). BF16_DOTS: bfloat16 v and dY stay bfloat16 in the products that take them (see
    below; on the GPU only, at 4 warps)."""
    SUB: tl.constexpr = 1 << LOG2S
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_k = tl.program_id(2)
    n_bh = tl.num_programs(1)
    c_loc, T, tok0, lw_base, NC, i_h = _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks,
                                                 lw_sb, lw_st, lw_sh, L, N, VARLEN)
    stride_t = H * N
    offs_t = tl.arange(0, L)
    offs_n = tl.arange(0, N)
    offs_s = tl.arange(0, SUB)
    offs_b = tl.arange(0, L // SUB)  # the chunk's blocks of SUB rows
    offs_k = i_k * BK + tl.arange(0, BK)
    t = c_loc * L + offs_t
    tmask = (t < T)[:, None]
    row = tok0 + t.to(tl.int64)[:, None] * stride_t
    pk = row + offs_k[None, :]
    r = tl.load(r_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pk, mask=tmask, other=0.0).to(tl.float32)
    lw = _load_lw_chunk(lw_ptr, lw_base, t, tmask, lw_st, offs_k, LWP)
    v = tl.load(v_ptr + row + offs_n[None, :], mask=tmask, other=0.0)  # [L, N] (all values), as stored
    dY = tl.load(dy_ptr + row + offs_n[None, :], mask=tmask, other=0.0)
    u = tl.load(u_ptr + i_h * N + offs_k).to(tl.float32)
    s_offs = (i_bh * NC + c) * N * N + offs_n[:, None] * N + offs_k[None, :]  # [N (value), BK]

    # everything that reads v and dY first (fewer live registers): dA on the blocks of SUB rows
    # (float32: a 3-D bfloat16 product crashed the GPU in the seventh session), drq = dY S0,
    # dke = V dS. With bfloat16 v and dY at tf32 the state's products take bfloat16 operands: S0
    # (dS) split into two bfloat16 parts, 16 of its mantissa bits where tf32 keeps 10, v and dY
    # never converted to float32 (fewer registers: H200, 8, 4096, 32, the key side 3.01 -> 2.61 ms
    # with dA's reloads below, the bonus from dA3 and e^{Lam} from _chunk_states)
    dA3 = tl.dot(_sub(dY, L, SUB, N).to(tl.float32), tl.permute(_sub(v, L, SUB, N), (0, 2, 1)).to(tl.float32),
                 input_precision=PREC)
    S0 = tl.load(states_ptr + s_offs)
    dS = tl.load(dstates_ptr + s_offs)
    if BF16_DOTS and dY.dtype == tl.bfloat16 and v.dtype == tl.bfloat16 and PREC == "tf32":
        dr = _dot_split(dY, S0)
        dk = _dot_split(v, dS)
    else:
        dr = tl.dot(dY.to(tl.float32), S0, input_precision=PREC)
        dk = tl.dot(v.to(tl.float32), dS, input_precision=PREC)
    dlam = tl.sum(dS * S0, axis=0) * tl.load(glam_ptr + (i_bh * NC + c) * N + offs_k)  # e^{Lam}: the scan's

    # state side: P, Q over the chunk
    lw3 = _sub(lw, L, SUB, BK)
    G: tl.constexpr = LOG2L - LOG2S  # P and Q span the chunk's 2^G blocks
    dr *= _exp(tl.reshape(_wide_sum(lw3, offs_s, offs_b, G, 0, False, LWP, masks_ptr, L, LOG2S), (L, BK)))  # e^{P}
    dk *= _exp(tl.reshape(_wide_sum(lw3, offs_s, offs_b, G, 1, False, LWP, masks_ptr, L, LOG2S), (L, BK)))  # e^{Q}
    # d log w: the reverse exclusive sums of dP = drq r e^{P}, the forward ones of dQ = dke k e^{Q},
    # dLam on every row
    dlw3 = _wide_sum(_sub(dr * r, L, SUB, BK), offs_s, offs_b, G, 0, True, GP, masks_ptr, L, LOG2S)
    dlw3 += _wide_sum(_sub(dk * k, L, SUB, BK), offs_s, offs_b, G, 1, True, GP, masks_ptr, L, LOG2S)
    dlw3 += dlam[None, None, :]

    # the levels from LOG2S up, on [L, L] tiles
    if LOG2L > LOG2S:
        for lvl in range(LOG2S, LOG2L):
            e = _exp(tl.reshape(_wide_sum(lw3, offs_s, offs_b, lvl - LOG2S, 2, False, LWP, masks_ptr, L, LOG2S),
                                  (L, BK)))
            Rh = r * e
            Kh = k * e
            # dA = dY V^T for each level from v and dY loaded again (cached; bfloat16 products if
            # they are bfloat16, exact): a [L, L] dA kept live from the start spilled more
            dYl = tl.load(dy_ptr + row + offs_n[None, :], mask=tmask, other=0.0)
            vl = tl.load(v_ptr + row + offs_n[None, :], mask=tmask, other=0.0)
            dA = _dot_in(dYl, tl.trans(vl), PREC, BF16_DOTS)
            # the level's pairs on the blocks of SUB rows (lvl >= LOG2S: the same mask): a row's
            # block is then fixed by its warp and a column's by its register, so the compiler
            # folds the per-element index arithmetic of the runtime level; offline (sm_90, key
            # block 32) 4,528 -> 4,360 instructions (5,398 -> 5,109 run, the loop twice), stack
            # 384 -> 312 B; float32 log w 4,712 -> 4,544, 472 -> 424 B. H200, 8, 4096, 32: the key
            # side 2.246 -> 2.156 ms (float32 log w 2.362 -> 2.316)
            dAm = tl.where(_pair_mask(offs_t >> LOG2S, offs_t >> LOG2S, lvl - LOG2S, True), dA, 0.0)
            dRh = tl.dot(dAm, Kh, input_precision=PREC)
            dKh = tl.dot(tl.trans(dAm), Rh, input_precision=PREC)
            dr += dRh * e
            dk += dKh * e
            dlw3 += _wide_sum(_sub(dRh * Rh + dKh * Kh, L, SUB, BK), offs_s, offs_b, lvl - LOG2S, 2, True, GP,
                              masks_ptr, L, LOG2S)

    # the bonus: bd, the diagonal of dA
    bd = tl.reshape(tl.sum(tl.where((offs_s[:, None] == offs_s[None, :])[None, :, :], dA3, 0.0), axis=2), (L,))
    ruk = bd[:, None] * u[None, :]
    dr += ruk * k
    dk += ruk * r
    du = tl.sum(bd[:, None] * r * k, axis=0)

    # the levels below LOG2S, batched over the aligned blocks of SUB rows; level 0 has no decay.
    # Transposed, [L / SUB, BK, SUB] (key channel, row): every level's products take the key side
    # (Rh, Kh, the dlog w terms) as their left operand, which an MMA result is already laid out
    # for, and the 0/1 matrices (the table's transposes) and dA on the right; as [SUB, BK] right
    # operands Rh, Kh and the dlog w terms were re-laid out by shuffles at every level. The same
    # sums of exactly their terms. Offline (sm_90, key block 32): 4,984 -> 4,568 instructions,
    # 554 -> 458 shuffles, stack 360 -> 384 B. dr and dk enter as the accumulators of level 0 and
    # leave transposed back once (4,528 instructions: one re-layout each, not one plus an add).
    r3t = tl.permute(_sub(r, L, SUB, BK), (0, 2, 1))
    k3t = tl.permute(_sub(k, L, SUB, BK), (0, 2, 1))
    lw3t = tl.permute(lw3, (0, 2, 1))
    dlw3t = tl.permute(dlw3, (0, 2, 1))
    dAm3 = tl.where(_pair_mask(offs_s, offs_s, 0, True)[None, :, :], dA3, 0.0)
    dr3t = tl.dot(k3t, tl.permute(dAm3, (0, 2, 1)), acc=tl.permute(_sub(dr, L, SUB, BK), (0, 2, 1)),
                  input_precision=PREC)
    dk3t = tl.dot(r3t, dAm3, acc=tl.permute(_sub(dk, L, SUB, BK), (0, 2, 1)), input_precision=PREC)
    for lvl in tl.static_range(1, LOG2S):  # unrolled (H200: 3.02 -> 2.98 ms); the levels above stay a loop
        e3t = _exp(_mask_dot_sub(_mask(masks_ptr, lvl, 2, True, offs_s, offs_s, L), lw3t, L, SUB, LWP, True))
        Rh3t = r3t * e3t
        Kh3t = k3t * e3t
        dAm3 = tl.where(_pair_mask(offs_s, offs_s, lvl, True)[None, :, :], dA3, 0.0)
        dRh3t = tl.dot(Kh3t, tl.permute(dAm3, (0, 2, 1)), input_precision=PREC)  # zero outside right-half rows
        dKh3t = tl.dot(Rh3t, dAm3, input_precision=PREC)  # zero outside left-half rows
        dr3t += dRh3t * e3t
        dk3t += dKh3t * e3t
        # d pre_h on right-half rows, d suf_h on left-half rows, summed back over log w
        dlw3t += _mask_dot_sub(_mask(masks_ptr, lvl, 2, False, offs_s, offs_s, L), dRh3t * Rh3t + dKh3t * Kh3t,
                               L, SUB, GP, True)
    dr = tl.reshape(tl.permute(dr3t, (0, 2, 1)), (L, BK))
    dk = tl.reshape(tl.permute(dk3t, (0, 2, 1)), (L, BK))
    dlw3 = tl.permute(dlw3t, (0, 2, 1))

    tl.store(dr_ptr + pk, dr.to(dr_ptr.dtype.element_ty), mask=tmask)
    tl.store(dk_ptr + pk, dk.to(dk_ptr.dtype.element_ty), mask=tmask)
    tl.store(dlw_ptr + pk, tl.reshape(dlw3, (L, BK)).to(dlw_ptr.dtype.element_ty), mask=tmask)
    tl.store(du_ptr + (c * n_bh + i_bh) * N + offs_k, du)


# --------------------------------------------------------------------------------------------
# The chunk states by a diagonal scan: the chunks' updates in parallel, then an elementwise scan
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "H", "n_chunks"])  # one compile for every T and H
def _wkv6_chunk_update_kernel(
    a_ptr, lw_ptr, x_ptr,  # forward: k, log w, v; backward: r, log w, dY   [B, T, H, N]
    u_ptr,  # [B, H, NC, N, N] float32 out: the chunk's update [value, key]
    g_ptr,  # [B, H, NC, N] float32 out: e^{Lam}, the chunk's decay per key channel
    cu_ptr, chunk_cu_ptr, chunk_seq_ptr,  # VARLEN: the chunk table (int32; else unused)
    masks_ptr,  # [LOG2L + 1, 3, 2, L, L] float32 (LWP "bf16", "round_bf16": bfloat16): _mask_table
    T, H, lw_sb, lw_st, lw_sh, n_chunks,
    N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr, BWD: tl.constexpr, PREC: tl.constexpr,
    LWP: tl.constexpr, VARLEN: tl.constexpr, BF16_OPS: tl.constexpr,
):
    """One chunk's term of the state recurrence, all chunks in parallel: forward
    V^T (k e^{Q}) (S_next = S diag(e^{Lam}) + this), backward dY^T (r e^{P}) (dS_prev = dS
    diag(e^{Lam}) + this); the exponent by a masked product, as in _wkv6_chunk_out_kernel.
    BF16_OPS (bfloat16 v or dY, at tf32): that x as stored and k e^{Q} (r e^{P}) split in two
    bfloat16 parts (_split_dot)."""
    c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    c_loc, T, tok0, lw_base, NC, i_h = _chunk_at(cu_ptr, chunk_cu_ptr, chunk_seq_ptr, c, i_bh, T, H, n_chunks,
                                                 lw_sb, lw_st, lw_sh, L, N, VARLEN)
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, N)
    t = c_loc * L + offs_t
    tmask = (t < T)[:, None]
    row = tok0 + t.to(tl.int64)[:, None] * (H * N)
    a = tl.load(a_ptr + row + offs_k[None, :], mask=tmask, other=0.0).to(tl.float32)
    lw = _load_lw_chunk(lw_ptr, lw_base, t, tmask, lw_st, offs_k, LWP)
    a *= _exp(_mask_dot(_mask(masks_ptr, LOG2L, 0 if BWD else 1, False, offs_t, offs_t, L), lw, LWP))
    x = tl.load(x_ptr + row + offs_k[None, :], mask=tmask, other=0.0)
    if BF16_OPS:
        upd = _split_dot(tl.trans(x), a, X_LEFT=False)
    else:
        upd = tl.dot(tl.trans(x.to(tl.float32)), a, input_precision=PREC)
    slot = i_bh * NC + c
    tl.store(u_ptr + slot * N * N + offs_k[:, None] * N + offs_k[None, :], upd)
    tl.store(g_ptr + slot * N + offs_k, _exp(tl.sum(lw.to(tl.float32), axis=0)))  # Lam: same-sign terms


@triton.jit(do_not_specialize=["T", "H", "n_chunks"])  # one compile for every T and H
def _wkv6_diag_scan_kernel(
    st_ptr,  # [B, H, NC, N, N] float32: in, the chunks' updates; out, the forward's state entering each
    # chunk (REVERSE: the gradient of the state leaving it)
    g_ptr,  # [B, H, NC, N] float32: e^{Lam} per chunk
    s0_ptr,  # [S, H, N, N] float32: the initial state (REVERSE: the final state's gradient); unused unless HAS_S0
    sT_ptr,  # [S, H, N, N] float32 out: the final state (REVERSE: the initial state's gradient)
    cu_ptr, chunk_cu_ptr,  # VARLEN: the chunk table (int32; else unused)
    T, H, n_chunks,
    N: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, HAS_S0: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """S <- S diag(e^{Lam_c}) + U_c over the chunks of one sequence and head, elementwise on BLOCK
    entries (whole rows) of the [N, N] state per program (the update is diagonal in the key
    index), storing the state before each update in place of that update; the next chunk's
    update is loaded one step ahead."""
    i_bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col = offs % N
    _, _, _, NC, st0 = _sequence_at(cu_ptr, chunk_cu_ptr, i_bh, T, H, n_chunks, 0, 0, 0, L, N, VARLEN)
    st0 = st0.to(tl.int64)
    if HAS_S0:
        S = tl.load(s0_ptr + i_bh * N * N + offs)
    else:
        S = tl.zeros([BLOCK], dtype=tl.float32)
    first = NC - 1 if REVERSE else 0
    ok = (offs * 0 + NC) > 0  # an empty sequence (VARLEN): nothing to load
    u_n = tl.load(st_ptr + (st0 + first) * N * N + offs, mask=ok, other=0.0)
    g_n = tl.load(g_ptr + (st0 + first) * N + col, mask=ok, other=0.0)
    for cc in range(NC):
        c = NC - 1 - cc if REVERSE else cc
        u = u_n
        g = g_n
        nxt = c - 1 if REVERSE else c + 1
        ok = (offs * 0 + cc + 1) < NC
        u_n = tl.load(st_ptr + (st0 + nxt) * N * N + offs, mask=ok, other=0.0)
        g_n = tl.load(g_ptr + (st0 + nxt) * N + col, mask=ok, other=0.0)
        tl.store(st_ptr + (st0 + c) * N * N + offs, S)
        S = S * g + u
    tl.store(sT_ptr + i_bh * N * N + offs, S)


def _auto_scan_block(n_heads: int, N: int, device: torch.device) -> int:
    """Rows of the state per program of the elementwise scan: the most (up to 1024 entries)
    that still give four programs per SM, down to 256 entries."""
    b = max(1, min(N, 1024 // N))
    if device.type != "cuda":
        return b
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    while b * N > 256 and n_heads * (N // b) < 4 * sms:
        b //= 2
    return b


def _chunk_states(a, log_w, x, s0, states, *, L: int, n_seqs: int, tabs, vl: dict, precision: str,
                  scan_block: int, scan_num_warps: int | None, bwd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``states`` [B, H, chunks, N, N] with the state entering every chunk (bwd: the
    gradient of the state leaving it; a, x = r, dY, else k, v) and return the final state (bwd:
    the initial state's gradient) and every chunk's decay e^{Lam} [B, H, chunks, N], from ``s0``
    (None: zeros): the chunks' updates in parallel
    (_wkv6_chunk_update_kernel), then the elementwise scan (_wkv6_diag_scan_kernel), ``scan_block``
    rows of the state per program."""
    B, T, H, N = a.shape
    nc = states.shape[2]
    g = _empty((B, H, nc, N), torch.float32, a.device)
    # (H200, B=8, T=4096, H=32: value blocks of 32 or 8 warps were slower, NOTES)
    warps = 4 if L * N <= 4096 else 8
    ops = _bf16_ops(x, precision, warps)
    lwp = _lw_precision(log_w, precision, bf16=ops)
    _wkv6_chunk_update_kernel[(nc, B * H)](
        a, log_w, x, states, g, *tabs, _mask_table(L, a.device, lwp), T, H, *_lw_strides(log_w),
        N=N, L=L, LOG2L=int(math.log2(L)), BWD=bwd, PREC=precision, LWP=lwp, BF16_OPS=ops,
        num_warps=warps, **vl,
    )
    sT = _empty((n_seqs, H, N, N), torch.float32, a.device)
    _wkv6_diag_scan_kernel[(n_seqs * H, N // scan_block)](
        states, g, s0 if s0 is not None else sT, sT, *tabs[:2], T, H, vl["n_chunks"],
        N=N, L=L, BLOCK=scan_block * N, HAS_S0=s0 is not None, REVERSE=bwd, VARLEN=vl["VARLEN"],
        num_warps=scan_num_warps or 4,
    )
    return sT, g


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


_MASK_TABLES: dict = {}


def _mask_table(L: int, device: torch.device, lwp: str = "") -> torch.Tensor:
    """The 0/1 matrices of the exponent sums the chunk kernels load (_mask), float32 (bfloat16
    for the kernels' LWP "bf16" and "round_bf16") [log2(L) + 1, 3, 2, L, L], made once per chunk
    size, dtype and device. Entry [lvl, kind, 0] at row t, column q is 1 where q lies in t's
    aligned block of 2^lvl rows and, kind 0: q < t (an exclusive prefix sum), 1: q > t (an
    exclusive suffix sum), 2: q < t if t is in the right half of its
    2^(lvl+1)-block, else q > t (E_h of the module docstring: pre_h on right-half rows, suf_h on
    left-half rows); [lvl, kind, 1] is its transpose (the sums of the exponents' gradients).
    Multiplied into log w by _mask_dot, row t gets the sum of exactly the log w its exponent
    spans."""
    dtype = torch.bfloat16 if lwp in ("bf16", "round_bf16") else torch.float32
    key = (L, str(device), dtype)
    if key not in _MASK_TABLES:
        i = torch.arange(L)
        t, q = i[:, None], i[None, :]  # row, column
        out = torch.zeros(int(math.log2(L)) + 1, 3, 2, L, L)
        for lvl in range(out.shape[0]):
            same = (t >> lvl) == (q >> lvl)
            right = ((t >> lvl) & 1) == 1
            kinds = [same & (q < t), same & (q > t), same & torch.where(right, q < t, q > t)]
            for kind, m in enumerate(kinds):
                out[lvl, kind, 0] = m.float()
                out[lvl, kind, 1] = m.float().T
        _MASK_TABLES[key] = out.to(device, dtype)
    return _MASK_TABLES[key]


def _lean_out(N: int, L: int, bv: int, bk: int, lwp: str, save_a: bool, num_warps: int | None) -> bool:
    """Whether the forward's output kernel is built lean, for OUT_LEAN_MAXNREG registers (three
    programs of 4 warps per SM in place of two): where it was measured faster (H200, N = C = 64,
    one key and one value block; bfloat16 log w, or no A saved). With A saved and a float32 log w
    (rounded to tf32 as it is loaded) the cap spilled more and the kernel went 0.92 -> 0.95 ms."""
    return (N == L == bv == bk == 64 and num_warps in (None, CHUNKS_NUM_WARPS)
            and not (save_a and lwp == "round"))


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _auto_block_v(N: int, bt: int, budget: int) -> int:
    """The widest value block of the chunk kernels with block_v * N * block_t <= budget (their
    grids already have T/C * B * H programs: no need to split for parallelism; in the backward
    more than one value block costs float32 partial sums of dr, dk, dlog_w, ~3 KB per token and
    head at N=64, far more than the register spills of the single block)."""
    bv = N
    while bv > 16 and bv * N * bt > budget:
        bv //= 2
    return bv


def _check_config(N: int, chunk_size: int, block_t: int, precision: str, impl: str = DEFAULT_IMPL,
                  scan_block: int | None = None, **blocks: int) -> None:
    if impl not in IMPLS:
        raise ValueError(f"wkv6_triton: impl / bwd_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "chunks" and chunk_size > CHUNKS_MAX:
        raise ValueError(f"wkv6_triton: impl 'chunks' needs chunk_size <= {CHUNKS_MAX}, got {chunk_size}")
    if N not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"wkv6_triton: head size {N} not supported (supported: {SUPPORTED_HEAD_SIZES})")
    if chunk_size not in SUPPORTED_CHUNKS:
        raise ValueError(f"wkv6_triton: chunk_size must be one of {SUPPORTED_CHUNKS}, got {chunk_size}")
    if block_t not in SUPPORTED_BLOCK_T or block_t > chunk_size:
        raise ValueError(
            f"wkv6_triton: block_t must be one of {SUPPORTED_BLOCK_T} and <= chunk_size, got {block_t}"
        )
    if scan_block is not None and (scan_block < 1 or scan_block > N or N % scan_block):
        raise ValueError(f"wkv6_triton: scan_block (rows of the state per scan program) must divide the head "
                         f"size {N}, got {scan_block}")
    for name, b in blocks.items():
        if b < 16 or b > N or N % b:
            raise ValueError(f"wkv6_triton: {name} must divide the head size {N} and be >= 16, got {b}")
    if precision not in PRECISIONS:
        raise ValueError(f"wkv6_triton: precision must be one of {PRECISIONS}, got {precision!r}")


def _lw_precision(log_w: torch.Tensor, precision: str, bf16: bool = False) -> str:
    """The precision of the masked products that sum log w (the exponents): "one" (one tf32
    product, exact) when log w is bfloat16 or float16, whose values tf32 holds exactly, unless
    ``precision`` is "ieee"; "bf16" for a bfloat16 log w in a kernel with ``bf16`` operands
    (_bf16_ops): one bfloat16 product, as exact; a float32 log w at tf32: "round", each value
    rounded to the nearest tf32 value as it is loaded, then one exact product (a relative error
    of at most 2^-11 per term, as every other tf32 operand has), and in a kernel with ``bf16``
    operands "round_bf16", the same rounding then two exact bfloat16 products against the
    bfloat16 table; else ``precision`` (tf32x3: the two-part split of _mask_dot; ieee)."""
    if bf16 and precision != "ieee" and log_w.dtype == torch.bfloat16:
        return "bf16"
    if precision != "ieee" and log_w.dtype in (torch.bfloat16, torch.float16):
        return "one"
    if precision == "tf32":
        return "round_bf16" if bf16 else "round"
    return precision


def _bf16_ops(x: torch.Tensor, precision: str, num_warps: int) -> bool:
    """Whether the update and dv kernels take x (v, dY) in bfloat16 as stored, with their float32
    operand split in two bfloat16 parts (_split_dot): a bfloat16 x at tf32 (16 mantissa bits of
    the split operand, more than tf32's 10), at 4 warps (the key side's bfloat16 products hit an
    illegal address at 8 warps with Triton 3.6: NOTES, tenth session)."""
    return x.dtype == torch.bfloat16 and precision == "tf32" and num_warps == 4


def _layout(r: torch.Tensor, L: int, table: ChunkTable | None) -> tuple[int, int, tuple, dict]:
    """(sequences, chunks, the table's three pointers, the kernels' VARLEN and n_chunks) of
    a dense batch (table None: the kernels index [B, T] directly, the pointers are unused
    stand-ins) or of packed sequences (B == 1)."""
    if table is None:
        nc = triton.cdiv(r.shape[1], L)
        return r.shape[0], nc, (r, r, r), dict(n_chunks=nc, VARLEN=False)
    tabs = (table.cu, table.chunk_cu, table.chunk_seq)
    return table.n_seqs, table.n_chunks, tabs, dict(n_chunks=table.n_chunks, VARLEN=True)


def _log2_sub(L: int) -> int:
    """log2 of the row blocks the whole-chunk kernels batch their lower levels over (16, the
    smallest tensor-core tile, or the chunk if shorter)."""
    return int(math.log2(min(L, SUB_ROWS)))


def _lw_strides(log_w: torch.Tensor) -> tuple[int, int, int]:
    sb, st, sh, sn = log_w.stride()
    assert sn == 1, "log_w must be contiguous in its last dimension"
    return sb, st, sh


def wkv6_forward(
    r, log_w, k, v, u, state, *, chunk_size: int, block_t: int, block_v: int | None, num_warps: int | None,
    scan_block: int | None, scan_num_warps: int | None, precision: str, out_dtype: torch.dtype,
    impl: str = DEFAULT_IMPL, block_k: int | None = None, table: ChunkTable | None = None, save_a: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernels (r, k, v, u contiguous; log_w with a unit last stride; with
    a ``table``, packed sequences: B == 1, state [S, H, N, N]). Returns ``(y, final state,
    states, amat)``, ``states`` [B, H, chunks, N, N] float32 the state entering each chunk (the
    backward's input), ``amat`` [B, H, chunks, C, C] float32 every chunk's A (impl "chunks" with
    ``save_a``, for the backward's dv; else None)."""
    B, T, H, N = r.shape
    L = chunk_size
    S, nc, tabs, vl = _layout(r, L, table)
    bv = block_v or (N if impl == "chunks" else _auto_block_v(N, block_t, 1 << 16))
    sb = scan_block or _auto_scan_block(S * H, N, r.device)
    bk = block_k or min(N, CHUNKS_BLOCK_K)
    _check_config(N, L, block_t, precision, impl, scan_block=sb, block_v=bv, block_k=bk)
    y = _empty((B, T, H, N), out_dtype, r.device)
    states = _empty((B, H, nc, N, N), torch.float32, r.device)
    sT, _ = _chunk_states(k, log_w, v, state, states, L=L, n_seqs=S, tabs=tabs, vl=vl, precision=precision,
                          scan_block=sb, scan_num_warps=scan_num_warps, bwd=False)
    amat = None
    if impl == "chunks":
        amat = _empty((B, H, nc, L, L), torch.float32, r.device) if save_a else None
        lwp = _lw_precision(log_w, precision)
        lean = _lean_out(N, L, bv, bk, lwp, save_a, num_warps)
        _wkv6_chunk_out_kernel[(nc, B * H, N // bv)](
            r, log_w, k, v, u, states, y, y if amat is None else amat, *tabs, _mask_table(L, r.device), T, H,
            *_lw_strides(log_w),
            N=N, L=L, LOG2L=int(math.log2(L)), LOG2S=_log2_sub(L), BV=bv, BK=bk, BWD=False, PREC=precision,
            LWP=lwp, STORE_A=amat is not None, LEAN=lean, num_warps=num_warps or CHUNKS_NUM_WARPS, **vl,
            **({"maxnreg": OUT_LEAN_MAXNREG} if lean and r.is_cuda else {}),
        )
    else:
        _wkv6_fwd_out_kernel[(nc, B * H, N // bv)](
            r, log_w, k, v, u, states, y, *tabs, T, H, *_lw_strides(log_w),
            N=N, L=L, BT=block_t, LOG2BT=int(math.log2(block_t)), BV=bv, PREC=precision,
            num_warps=num_warps or DEFAULT_NUM_WARPS, **vl,
        )
    return y, sT, states, amat


def wkv6_backward(
    r, log_w, k, v, u, states, dy, dsT, *, chunk_size: int, block_t: int, block_v: int | None,
    num_warps: int | None, scan_block: int | None, scan_num_warps: int | None, precision: str,
    impl: str = DEFAULT_IMPL, block_k: int | None = None, out_block_k: int | None = None,
    table: ChunkTable | None = None, amat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels: the reverse diagonal scan of dS (storing dS per chunk, float32), then
    all chunks in parallel (impl "blocks": one kernel; "chunks": dv in one kernel, from the forward's
    ``amat`` when given, the key-side gradients in another, in blocks of ``out_block_k`` and
    ``block_k`` key channels). Returns ``(dr, dlog_w, dk, dv, du, dstate0)``: the input gradients
    in their inputs' dtypes (dlog_w dense [B, T, H, N]), dstate0 in float32 ([S, H, N, N] with a
    ``table`` of packed sequences)."""
    B, T, H, N = r.shape
    L = chunk_size
    S, nc, tabs, vl = _layout(r, L, table)
    block_t = min(block_t, BWD_BLOCK_T_MAX)
    bv = block_v or (N if impl == "chunks" else _auto_block_v(N, block_t, 1 << 16))  # N=64: one value block
    sb = scan_block or _auto_scan_block(S * H, N, r.device)
    bk = out_block_k or min(N, CHUNKS_BLOCK_K)
    _check_config(N, L, block_t, precision, impl, scan_block=sb, block_v=bv, block_k=bk)
    nv = N // bv
    if impl == "chunks":
        dr, dlw, dk = (_empty((B, T, H, N), x.dtype, r.device) for x in (r, log_w, k))
        du_part = _empty((nc, B * H, N), torch.float32, r.device)
        dv = _empty((B, T, H, N), v.dtype, r.device)
        dstates = _empty((B, H, nc, N, N), torch.float32, r.device)
        ds0, glam = _chunk_states(r, log_w, dy, dsT, dstates, L=L, n_seqs=S, tabs=tabs, vl=vl,
                                  precision=precision, scan_block=sb, scan_num_warps=scan_num_warps, bwd=True)
        lws = _lw_strides(log_w)
        if amat is None:
            _wkv6_chunk_out_kernel[(nc, B * H, nv)](
                k, log_w, r, dy, u, dstates, dv, dv, *tabs, _mask_table(L, r.device), T, H, *lws,
                N=N, L=L, LOG2L=int(math.log2(L)), LOG2S=_log2_sub(L), BV=bv, BK=bk, BWD=True, PREC=precision,
                LWP=_lw_precision(log_w, precision),
                STORE_A=False, num_warps=num_warps or CHUNKS_NUM_WARPS, **vl,
            )
        else:
            warps = num_warps or CHUNKS_NUM_WARPS
            ops = _bf16_ops(dy, precision, warps)
            lwp = _lw_precision(log_w, precision, bf16=ops)
            _wkv6_bwd_values_kernel[(nc, B * H, nv)](
                log_w, k, dy, amat, dstates, dv, *tabs, _mask_table(L, r.device, lwp), T, H, *lws,
                N=N, L=L, LOG2L=int(math.log2(L)), LOG2S=_log2_sub(L), BV=bv, BK=bk, PREC=precision,
                LWP=lwp, BF16_OPS=ops, num_warps=warps, **vl,
            )
        bk = block_k or min(N, CHUNKS_KEYS_BLOCK_K)
        _check_config(N, L, block_t, precision, impl, block_k=bk)
        warps = num_warps or CHUNKS_NUM_WARPS
        _wkv6_bwd_keys_kernel[(nc, B * H, N // bk)](
            r, log_w, k, v, u, states, dstates, glam, dy, dr, dlw, dk, du_part, *tabs, _mask_table(L, r.device), T, H,
            *lws,
            N=N, L=L, LOG2L=int(math.log2(L)), LOG2S=_log2_sub(L), BK=bk, PREC=precision,
            LWP=_lw_precision(log_w, precision), GP="one" if precision == "tf32" else precision,
            # bfloat16 products on the GPU at 4 warps only: at 8, with the state's products split in
            # two bfloat16 ones, Triton 3.6 (H200) made a kernel that hit an illegal address (the
            # 8-warp knob test; dA in bfloat16 alone passed; benchmarks/NOTES.md, tenth session)
            BF16_DOTS=r.is_cuda and warps == 4, num_warps=warps, **vl,
        )
        # du summed over the chunks, then the batch: two reductions with many outputs (one over both,
        # 2,048 outputs of 512 terms at 8, 4096, 32, took 20 us on the H200; these two 9 us)
        du = du_part.view(nc, B * H * N).sum(0).view(B, H, N).sum(0)
        return dr, dlw, dk, dv, du.to(u.dtype), ds0
    inputs = (r, log_w, k)
    if nv == 1:
        parts = [_empty((1, B, T, H, N), x.dtype, r.device) for x in inputs]
    else:
        parts = [_empty((nv, B, T, H, N), torch.float32, r.device) for _ in inputs]
    du_part = _empty((nv, nc, B * H, N), torch.float32, r.device)
    dv = _empty((B, T, H, N), v.dtype, r.device)
    dstates = _empty((B, H, nc, N, N), torch.float32, r.device)
    ds0, _ = _chunk_states(r, log_w, dy, dsT, dstates, L=L, n_seqs=S, tabs=tabs, vl=vl, precision=precision,
                           scan_block=sb, scan_num_warps=scan_num_warps, bwd=True)
    _wkv6_bwd_chunks_kernel[(nc, B * H, nv)](
        r, log_w, k, v, u, states, dstates, dy, *parts, du_part, dv, *tabs, T, H, *_lw_strides(log_w),
        vl["n_chunks"], B * T * H * N, N=N, L=L, BT=block_t, LOG2BT=int(math.log2(block_t)), BV=bv,
        PREC=precision, num_warps=num_warps or DEFAULT_NUM_WARPS, VARLEN=vl["VARLEN"],
    )
    dr, dlw, dk = (p[0] if nv == 1 else p.sum(0).to(x.dtype) for p, x in zip(parts, inputs))
    du = du_part.view(nv * nc, B, H, N).sum((0, 1)).to(u.dtype)
    return dr, dlw, dk, dv, du, ds0


# --------------------------------------------------------------------------------------------
# Autograd and the public function
# --------------------------------------------------------------------------------------------


class _WKV6Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, u, state, fwd_cfg, bwd_cfg, out_dtype):
        y, sT, states, amat = wkv6_forward(r, log_w, k, v, u, state, out_dtype=out_dtype, **fwd_cfg)
        if any(ctx.needs_input_grad[:6]):
            ctx.save_for_backward(r, log_w, k, v, u, states, amat)
            ctx.bwd_cfg = bwd_cfg
            ctx.has_state = state is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, log_w, k, v, u, states, amat = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dlw, dk, dv, du, ds0 = wkv6_backward(r, log_w, k, v, u, states, dy, dsT, amat=amat, **ctx.bwd_cfg)
        return dr, dlw, dk, dv, du, (ds0 if ctx.has_state else None), None, None, None


def check_inputs(fn: str, r, log_w, k, v, u) -> tuple[int, int, int, int]:
    """The shapes, head size and dtypes every WKV-6 kernel entry point needs (``fn`` names it
    in the error); returns (B, T, H, N)."""
    if not (r.shape == log_w.shape == k.shape == v.shape) or r.dim() != 4:
        raise ValueError(
            f"{fn}: r, log_w, k, v must share one [B, T, H, N] shape, got {[tuple(x.shape) for x in (r, log_w, k, v)]}"
        )
    B, T, H, N = r.shape
    if N not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"{fn}: head size {N} not supported (supported: {SUPPORTED_HEAD_SIZES})")
    for name, x in zip(("r", "log_w", "k", "v", "u"), (r, log_w, k, v, u)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{fn}: {name} has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    if u.shape != (H, N):
        raise ValueError(f"{fn}: u must be [{H}, {N}], got {tuple(u.shape)}")
    return B, T, H, N


def check_state(fn: str, state: torch.Tensor | None, S: int, H: int, N: int) -> None:
    if state is not None and state.shape != (S, H, N, N):
        raise ValueError(f"{fn}: state must be [{S}, {H}, {N}, {N}], got {tuple(state.shape)}")


def wkv6_triton(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    block_t: int = DEFAULT_BLOCK_T,
    block_v: int | None = None,
    num_warps: int | None = None,
    bwd_block_v: int | None = None,
    bwd_num_warps: int | None = None,
    scan_block: int | None = None,
    scan_num_warps: int | None = None,
    precision: str | None = None,
    out_dtype: torch.dtype | None = None,
    impl: str | None = None,
    bwd_impl: str | None = None,
    block_k: int | None = None,
    bwd_block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2 / RWKV-6 WKV with Triton kernels (forward and backward).

    Args: ``r, log_w, k, v`` [B, T, H, N] in float32, bfloat16 or float16 (``log_w``, the
    log-decay, <= 0 and of any magnitude, may have its own dtype, e.g. float32, and any strides
    with a unit last one: RWKV-5.2's per-head decay is passed as a stride-0 ``expand`` over B
    and T); ``u`` the bonus [H, N]; ``state`` [B, H, N(value), N(key)] or None for zeros.
    N in 16/32/64/128. Any T (the last chunk is masked).
    ``cu_seqlens``: packed variable-length sequences: the inputs are [1, T, H, N] (log_w too,
    possibly a stride-0 expand), sequence i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (an
    integer tensor of S + 1 offsets rising from 0 to T; empty sequences allowed), ``state``
    and the final state are [S, H, N, N]. Each sequence's chunks start at its own first token,
    so no chunk straddles two sequences; every impl and chunk size works. The offsets are read
    on the host (one synchronisation per call).
    Tuning (None = automatic): ``chunk_size`` (16/32/64/128: the stored chunk states) and
    ``block_t`` (16/32/64, at most ``chunk_size``: the rows a chunk kernel handles at once,
    64 = the whole chunk with nothing carried inside it; see the module docstring),
    ``block_v`` / ``num_warps`` of the forward output kernel, the same two of the backward
    chunk kernel(s), ``scan_block`` (rows of the [N, N] state per program of the two elementwise
    scans over the chunks; default: up to 1024 entries, fewer for few heads) and their
    ``scan_num_warps``, and the ``precision`` of the matmul inputs ("ieee", "tf32", "tf32x3";
    None: ieee for float32 inputs, else tf32). The backward walks blocks of at most 32 rows.
    ``impl`` / ``bwd_impl`` (forward / backward chunk kernels): "blocks" walks a chunk in
    blocks of ``block_t`` rows; "chunks" takes a whole chunk (``chunk_size`` <= 64) at once with
    [C, C] tiles and no scans (block_t unused), the backward split in two kernels (see
    "Whole-chunk kernels" in the module docstring); None: "chunks" where the chunk allows it
    (faster on an H200: 2.0 / 9.3 ms against 2.8 / 11.4 at B8 T4096 H32), else "blocks".
    "chunks" works on blocks of key channels: ``block_k`` in the output kernels (forward y,
    backward dv; default min(N, 64)), ``bwd_block_k`` in the backward key-side kernel
    (default min(N, 32)).
    Memory kept for the backward (grad mode on and an input requiring grad): the inputs, the state entering
    every chunk (float32 [B, H, T/C, N, N]) and, with "chunks" both ways, every chunk's A
    (float32 [B, H, T/C, C, C]; at N = C = 64 each is 256 bytes per token and head).
    Returns ``(y [B, T, H, N] in out_dtype (default r.dtype), final state float32)``.
    """
    B, T, H, N = check_inputs("wkv6_triton", r, log_w, k, v, u)
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"wkv6_triton: with cu_seqlens the inputs are packed as [1, T, H, N], got {tuple(r.shape)}")
    table = None if cu_seqlens is None else varlen_table(cu_seqlens, chunk_size, T, "wkv6_triton", r.device)
    S = B if table is None else table.n_seqs
    check_state("wkv6_triton", state, S, H, N)
    if precision is None:
        precision = "ieee" if r.dtype == torch.float32 else "tf32"
    out_dtype = out_dtype or r.dtype
    auto_impl = "chunks" if chunk_size <= CHUNKS_MAX else DEFAULT_IMPL
    impl, bwd_impl = impl or auto_impl, bwd_impl or auto_impl
    for i in (impl, bwd_impl):  # (the backward's settings checked before a forward without it)
        _check_config(N, chunk_size, block_t, precision, i)
    if T == 0:  # (a new tensor, never the caller's state)
        s = torch.zeros(S, H, N, N, dtype=torch.float32, device=r.device) if state is None else state.float()
        return r.new_zeros(B, 0, H, N, dtype=out_dtype), (s.clone() if s is state else s)
    common = dict(
        chunk_size=chunk_size, block_t=block_t, scan_block=scan_block, scan_num_warps=scan_num_warps,
        precision=precision, table=table,
    )
    # A is stored for the backward only when one can follow: grad mode on (it is off inside the
    # autograd Function's forward, where a parameter such as u still counts as needing a gradient)
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, log_w, k, v, u, state))
    fwd_cfg = dict(common, block_v=block_v, num_warps=num_warps, impl=impl, block_k=block_k,
                   save_a=grad and impl == bwd_impl == "chunks")
    bwd_cfg = dict(common, block_v=bwd_block_v, num_warps=bwd_num_warps, impl=bwd_impl, block_k=bwd_block_k,
                   out_block_k=block_k)
    r, k, v, u = (x.contiguous() for x in (r, k, v, u))
    if log_w.stride(-1) != 1:
        log_w = log_w.contiguous()
    s0 = None if state is None else state.float().contiguous()
    return _WKV6Function.apply(r, log_w, k, v, u, s0, fwd_cfg, bwd_cfg, out_dtype)


# --------------------------------------------------------------------------------------------
# Decoding: RWKV-5.2 / RWKV-6 WKV step by step in one Triton kernel (T = 1 and a few tokens,
# no gradient), as ``wkv7_recurrent`` is for RWKV-7.
#
# Per head, with the state S [value, key], w = exp(log_w) and the bonus u, for t = 1..T:
#     y_t = S r_t + (sum_j r_t[j] u[j] k_t[j]) v_t,    S <- S diag(w_t) + v_t k_t^T
# (``ops.reference.wkv6_step``). One program per (batch*head, value block) keeps its [BV, N]
# rows of S in registers for all T steps, so the state is read and written once per call
# whatever T is; the chunked kernels above would write a state per chunk and run four kernels.
# Everything is float32 inside; ``log_w`` is read through its strides (RWKV-5.2's per-head decay
# as a stride-0 view over B and T).
# --------------------------------------------------------------------------------------------


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
    i_b, h, offs_k, offs_v, s_offs, S = state_block(s0_ptr, H, N, BV, HAS_S0)
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
    s0, sT, y, grid, meta = launch("wkv6_recurrent", state, inplace, B, T, H, N, out_dtype or r.dtype, r.device, _empty)
    r, k, v, u = (x.contiguous() for x in (r, k, v, u))
    if log_w.stride(-1) != 1:
        log_w = log_w.contiguous()
    _wkv6_recurrent_kernel[grid](
        r, log_w, k, v, u, s0 if s0 is not None else sT, y, sT, T, H, *_lw_strides(log_w), **meta
    )
    return y, sT
