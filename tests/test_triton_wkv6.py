"""WKV-6 (RWKV-5.2 / RWKV-6) Triton kernels: outputs, final state and every gradient against
the float64 step reference (and the float32 chunked form at a large shape), with decays from
~1 (log w ~ -1e-6) down to 0 (log w = -1e4, -1e30, -inf).

Runs on CUDA. Without CUDA or without triton the module skips, except that with
RWKVKIT_TRITON_INTERPRET=1 a small set runs on CPU under the Triton interpreter (tiny shapes:
the interpreter is slow). The switch, the skips and the comparisons shared with the other
version's tests are in tests/triton_checks.py. On the GPU every distinct kernel configuration
compiles for 5-30 s, so almost every test uses the default configuration (chunk 64, block_t 16,
automatic blocks).
"""

import functools
import itertools

import math

import pytest
import torch
from triton_checks import (  # before the kernels: sets up the interpreter, or skips this module
    DEVICE,
    INTERPRET,
    TOL,
    compare_one_output_used,
    compare_with_chunked,
    compare_with_reference,
    gpu_only,
    poison_buffers,
    watch_memory_accesses,
)

from conftest import rel_err
from test_ops_wkv6 import wkv6_inputs

from rwkvkit.ops import wkv6, wkv6_chunked, wkv6_reference
from rwkvkit.ops.triton import wkv6 as kernels
from rwkvkit.ops.triton import wkv6_triton, wkv6_triton_supports

# head size of the small tests: tiny under the interpreter; on the GPU the size the GPU tests
# use, so that they share compiled kernels
NS = 16 if INTERPRET else 64
NVB = 32 if INTERPRET else 64  # head size of the tests with two value blocks everywhere:
VB = dict(block_v=NVB // 2, bwd_block_v=NVB // 2, scan_block=NVB // 2)
NAMES = ["r", "log_w", "k", "v", "u", "state"]
# the few non-default configurations the tests compile (GPU compile time)
SMALL_CHUNK = dict(chunk_size=16)  # many chunks at small T: the sequential scans
BLOCKS = dict(impl="blocks", bwd_impl="blocks")  # chunks walked in blocks of block_t rows
WIDE_BLOCK = dict(chunk_size=32, block_t=32, **BLOCKS)  # 32-row blocks: five levels
WHOLE_CHUNK = dict(chunk_size=64, block_t=64, **BLOCKS)  # one 64-row block per chunk: six levels, nothing carried
CHUNKS = dict(impl="chunks", bwd_impl="chunks")  # whole-chunk kernels, masked products for the sums (the
# default at chunks up to 64)


def make_inputs(B, T, H, N, *, decay="realistic"):
    """float32 CPU inputs [r, log_w, k, v, u, state]. Decays: those of test_ops_wkv6
    ("realistic", "near_zero": e^-20..e^-150 and some log w = -1e4, "near_one": log w ~ -1e-6,
    "mixed": realistic with sporadic -1e4), and "huge": near one with sporadic log w = -1e30 and
    -inf (a decay of exactly 0) in the same channels."""
    if decay == "huge":
        x = wkv6_inputs(B, T, H, N, decay="near_one")
        pick = torch.rand_like(x[1])
        x[1] = torch.where(pick < 0.05, torch.full_like(x[1], -1e30), x[1])
        x[1] = torch.where(pick > 0.97, torch.full_like(x[1], -float("inf")), x[1])
        return x
    return wkv6_inputs(B, T, H, N, decay=decay)


def run_and_compare(x, *, dtype, logw_dtype=None, **kw):
    """compare_with_reference: r, k, v in ``dtype``, log_w in ``logw_dtype`` (default
    ``dtype``), u float32 (as the models keep it)."""
    dtypes = [dtype, logw_dtype or dtype, dtype, dtype, torch.float32]
    return compare_with_reference(wkv6_triton, wkv6_reference, NAMES, x, dtypes, **kw)


# --- interpreter-sized tests (also run on GPU) ----------------------------------------------


@pytest.mark.parametrize("T", [1, 23, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_matches_reference(seed, T, dtype):
    """Default configuration (whole-chunk kernels), and chunks walked in blocks of 16: T = 70
    is two chunks of 64, the second partial."""
    run_and_compare(make_inputs(1, T, 2, NS), dtype=dtype)
    run_and_compare(make_inputs(1, T, 2, NS), dtype=dtype, **BLOCKS)


@pytest.mark.parametrize("decay", ["near_zero", "near_one", "mixed", "huge"])
def test_small_decay_extremes(seed, decay):
    run_and_compare(make_inputs(1, 70, 1, NS, decay=decay), dtype=torch.float32)


def test_small_many_chunks_no_state(seed):
    """Chunk 16: five chunks through the sequential scans, no initial state."""
    run_and_compare(make_inputs(2, 75, 1, NS, decay="mixed"), dtype=torch.float32, with_state=False, **SMALL_CHUNK)


def test_small_wide_blocks_value_blocks(seed):
    """Blocks of 32 rows (five levels) and two value blocks in every kernel."""
    run_and_compare(make_inputs(1, 45, 1, NVB, decay="mixed"), dtype=torch.float32, **VB, **WIDE_BLOCK)


def test_small_whole_chunk_blocks(seed):
    """Blocks as long as the chunk (64 rows, six levels): the state is never carried inside a
    chunk; T=150 ends in a partial chunk."""
    run_and_compare(make_inputs(1, 150, 1, NS, decay="mixed"), dtype=torch.float32, **WHOLE_CHUNK)


@pytest.mark.parametrize("decay", ["realistic", "near_zero", "huge"])
def test_small_chunks_impl(seed, decay):
    """impl / bwd_impl "chunks" (whole-chunk kernels, chunk 64, two key blocks): T=150 ends in a
    partial chunk; decays down to -1e30 and -inf."""
    run_and_compare(make_inputs(1, 150, 2, NVB, decay=decay), dtype=torch.float32, **CHUNKS,
                    block_k=NVB // 2, bwd_block_k=NVB // 2)


@pytest.mark.parametrize("lean", [False, True])
def test_small_chunks_impl_output_kernel_builds(seed, monkeypatch, lean):
    """Both builds of the forward's output kernel (_lean_out picks the lean one only at N = C =
    64 with one key and value block, so the interpreter's small heads never reach it unless
    told): bf16 and float32 log w, the forward alone and with the backward (A saved)."""
    monkeypatch.setattr(kernels, "_lean_out", lambda *a: lean)
    x = make_inputs(1, 150, 2, NVB, decay="huge")
    run_and_compare(x, dtype=torch.bfloat16, **CHUNKS)
    run_and_compare(x, dtype=torch.bfloat16, logw_dtype=torch.float32, **CHUNKS)
    r, lw, k, v, u, s0 = (t.to(DEVICE).bfloat16() for t in x)
    u.requires_grad_()
    with torch.no_grad():  # no A stored: the output kernel's other specialisation
        y0, _ = wkv6_triton(r, lw, k, v, u, s0, impl="chunks")
    y1, _ = wkv6_triton(r, lw, k, v, u, s0, impl="chunks")
    assert rel_err(y1.detach(), y0) < 1e-5


def test_small_chunks_impl_small_chunks(seed):
    """impl "chunks" at chunk 16 (four levels) and 32, bf16 inputs with a float32 log_w, two
    value blocks in the dv kernel; and without an initial state."""
    x = make_inputs(1, 45, 1, NVB, decay="mixed")
    run_and_compare(x, dtype=torch.bfloat16, logw_dtype=torch.float32, chunk_size=16, block_t=16, **CHUNKS,
                    bwd_block_v=NVB // 2)
    run_and_compare(x, dtype=torch.float32, with_state=False, chunk_size=32, **CHUNKS)


def test_small_chunks_forward_only_mixed_with_blocks(seed):
    """The two implementations mixed: "chunks" forward with the "blocks" backward and the
    reverse (they share the stored states)."""
    x = make_inputs(1, 70, 1, NS, decay="mixed")
    run_and_compare(x, dtype=torch.float32, impl="chunks", bwd_impl="blocks")
    run_and_compare(x, dtype=torch.float32, impl="blocks", bwd_impl="chunks")


def test_small_saved_a_only_with_grad(seed, monkeypatch):
    """The forward stores every chunk's A ([B, H, chunks, C, C]) only when a backward can
    follow: not under no_grad, even with u a parameter that requires a gradient (as in a model
    generating text), and the output is the same either way. Chunks of 32, so that A's shape
    differs from the chunk states' [B, H, chunks, N, N] at every head size the tests use."""
    r, lw, k, v, u, _ = (t.to(DEVICE) for t in make_inputs(1, 70, 1, NS))
    u.requires_grad_()
    shapes = []

    def recording(shape, dtype, device):
        shapes.append(tuple(shape))
        return torch.empty(shape, dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", recording)
    a_shape = (1, 1, 3, 32, 32)
    with torch.no_grad():
        y0, _ = wkv6_triton(r, lw, k, v, u, chunk_size=32)
    assert a_shape not in shapes
    y1, _ = wkv6_triton(r, lw, k, v, u, chunk_size=32)
    assert a_shape in shapes
    assert rel_err(y1.detach(), y0) < 1e-5


def test_small_mixed_dtypes(seed):
    """As the RWKV-6 layer calls it: bf16 r/k/v, float32 log_w, float32 u and state."""
    run_and_compare(make_inputs(2, 20, 1, NS), dtype=torch.bfloat16, logw_dtype=torch.float32)


@pytest.mark.parametrize("impl", ["blocks", "chunks"])
def test_rwkv5_constant_decay(seed, impl):
    """RWKV-5.2: one decay per (head, channel), passed as a stride-0 expand over B and T; its
    gradient reaches the [H, N] leaf through the expand."""
    B, T, H, N = 2, 40, 2, NS
    r, _, k, v, u, s0 = make_inputs(B, T, H, N)
    decay = (-torch.exp(-6 + 5 * torch.rand(H, N))).to(DEVICE).requires_grad_()
    xs = [t.to(DEVICE).requires_grad_() for t in (r, k, v, u, s0)]
    y, s = wkv6_triton(xs[0], decay.expand(B, T, H, N), *xs[1:], impl=impl, bwd_impl=impl)
    gy, gs = torch.randn(y.shape), torch.randn(s.shape)
    got = torch.autograd.grad((y * gy.to(DEVICE)).sum() + (s * gs.to(DEVICE)).sum(), [decay] + xs)

    ref_in = [t.detach().cpu().double().requires_grad_() for t in [decay] + xs]
    y_ref, s_ref = wkv6_reference(ref_in[1], ref_in[0].expand(B, T, H, N), *ref_in[2:])
    ref = torch.autograd.grad((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum(), ref_in)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4, f"seed {seed}"
    for name, g, g_ref in zip(["decay", "r", "k", "v", "u", "state"], got, ref):
        assert rel_err(g, g_ref) < 1e-4, f"grad {name}: {rel_err(g, g_ref):.2e}, seed {seed}"


def test_every_output_element_written(seed, monkeypatch):
    """Outputs and gradient buffers start as NaN: the kernels must overwrite every element."""
    poison_buffers(monkeypatch, kernels)
    run_and_compare(make_inputs(2, 19, 1, NS), dtype=torch.float32)
    run_and_compare(make_inputs(1, 35, 2, NS), dtype=torch.float32, **SMALL_CHUNK)
    run_and_compare(make_inputs(1, 45, 1, NVB), dtype=torch.float32, **VB, **WIDE_BLOCK)
    run_and_compare(make_inputs(2, 70, 1, NVB), dtype=torch.float32, **CHUNKS, block_v=NVB // 2,
                    bwd_block_v=NVB // 2, block_k=NVB // 2, bwd_block_k=NVB // 2)


@pytest.mark.skipif(not INTERPRET, reason="watches the interpreter's memory accesses")
def test_memory_accesses_in_bounds(seed, monkeypatch):
    """Every load and store that a mask lets through stays inside one of the launch's tensor
    arguments (on the GPU an access outside them is an illegal address or silent garbage). The
    scans prefetch one chunk past either end of the sequence; T = 37 also leaves a partial
    chunk and a partial block; log_w as a stride-0 view; packed sequences (cu_seqlens)."""
    watch_memory_accesses(monkeypatch, seed)
    run_and_compare(make_inputs(1, 37, 2, NS, decay="mixed"), dtype=torch.float32, **SMALL_CHUNK)
    run_and_compare(make_inputs(1, 37, 1, NVB), dtype=torch.bfloat16, logw_dtype=torch.float32, **VB)
    r, lw, k, v, u, s0 = make_inputs(2, 37, 2, NS)
    run_and_compare([r, lw[:1, :1].expand_as(lw), k, v, u, s0], dtype=torch.float32)
    run_and_compare([r, lw[:1, :1].expand_as(lw), k, v, u, s0], dtype=torch.float32, **CHUNKS, chunk_size=32)
    # packed sequences, an empty one first (the backward scan's prefetch before its first chunk)
    varlen_vs_reference([0, 37, 1, 20], 2, NS, chunk_size=16)
    varlen_vs_reference([0, 37, 1, 20], 1, NS, chunk_size=32, **BLOCKS)


def test_only_one_output_used(seed):
    """Backward with only y or only the final state in the loss (the other gradient is None)."""
    compare_one_output_used(wkv6_triton, wkv6_reference, NAMES, make_inputs(1, 18, 1, NS), not_in_state=("r", "u"))


def test_state_not_modified_and_out_dtype(seed):
    *inp, s0 = make_inputs(1, 20, 1, NS)
    inp = [t.to(DEVICE) for t in inp]
    s0 = s0.to(DEVICE)
    before = s0.clone()
    wkv6_triton(*inp, s0)
    assert torch.equal(s0, before)
    y16, _ = wkv6_triton(*(t.bfloat16() for t in inp[:4]), inp[4], s0, out_dtype=torch.float32)
    assert y16.dtype == torch.float32


def test_rejects_bad_arguments():
    x = [torch.zeros(1, 4, 1, 16, device=DEVICE) for _ in range(4)]
    u = torch.zeros(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6_triton(*x, u, chunk_size=8)
    with pytest.raises(ValueError, match="block_t"):
        wkv6_triton(*x, u, chunk_size=16, block_t=32)
    with pytest.raises(ValueError, match="impl"):
        wkv6_triton(*x, u, impl="fused")
    with pytest.raises(ValueError, match="chunks"):
        wkv6_triton(*x, u, chunk_size=128, bwd_impl="chunks")
    with pytest.raises(ValueError, match="head size"):
        wkv6_triton(*[torch.zeros(1, 4, 1, 24, device=DEVICE) for _ in range(4)], torch.zeros(1, 24, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        wkv6_triton(*[t.double() for t in x], u)
    with pytest.raises(ValueError, match="u must be"):
        wkv6_triton(*x, torch.zeros(16, device=DEVICE))
    with pytest.raises(ValueError, match="state"):
        wkv6_triton(*x, u, torch.zeros(1, 1, 8, 8, device=DEVICE))


def packed_inputs(lengths, H, N, *, decay="mixed"):
    """Per-sequence float32 CPU inputs packed as [1, sum(lengths), H, N] (one shared u, the
    initial states [S, H, N, N]) and the int32 offsets cu_seqlens."""
    xs = [make_inputs(1, n, H, N, decay=decay) for n in lengths]
    packed = [torch.cat([x[i] for x in xs], dim=1) for i in range(4)]
    s0 = torch.cat([x[5] for x in xs])
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    return [*packed, xs[0][4], s0], cu


def varlen_vs_reference(lengths, H, N, *, dtype=torch.float32, logw_dtype=None, with_state=True, tol=None,
                        decay="mixed", **kw):
    """Packed sequences (cu_seqlens) against the float64 reference run on each sequence alone:
    every sequence's outputs, final state, input gradients and initial-state gradient, and
    the gradient of the shared u (summed over the sequences); an empty sequence passes its
    state and the state's gradient through."""
    x, cu = packed_inputs(lengths, H, N, decay=decay)
    dtypes = [dtype, logw_dtype or dtype, dtype, dtype, torch.float32]
    ours = [t.to(DEVICE, dt).requires_grad_() for t, dt in zip(x[:5], dtypes)]
    if with_state:
        ours.append(x[5].to(DEVICE).requires_grad_())
    y, s = wkv6_triton(*ours, cu_seqlens=cu, **kw)
    assert y.shape == ours[0].shape and y.dtype == dtype and s.shape == (len(lengths), H, N, N)
    gy, gs = torch.randn(y.shape).to(y.dtype).float(), torch.randn(s.shape)
    got = torch.autograd.grad((y.float() * gy.to(DEVICE)).sum() + (s * gs.to(DEVICE)).sum(), ours)

    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours]
    ys, ss = [], []
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        s0 = ref_in[5][i : i + 1] if with_state else torch.zeros(1, H, N, N, dtype=torch.float64)
        if n == 0:
            ss.append(s0)
            continue
        y1, s1 = wkv6_reference(*[t[:, lo : lo + n] for t in ref_in[:4]], ref_in[4], s0)
        ys.append(y1)
        ss.append(s1)
    y_ref, s_ref = torch.cat(ys, dim=1), torch.cat(ss)
    ref = torch.autograd.grad((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum(), ref_in,
                              allow_unused=True, materialize_grads=True)

    tol = tol or TOL[dtype]
    errors = {"du": rel_err(got[4], ref[4])}
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        if with_state:
            errors[f"seq {i} dstate"] = rel_err(got[5][i], ref[5][i])
        if n == 0:
            assert torch.equal(s[i].cpu(), x[5][i] if with_state else torch.zeros(H, N, N)), f"empty sequence {i}"
            if with_state:
                assert torch.equal(got[5][i].cpu(), gs[i]), f"empty sequence {i}: its state's gradient"
            continue
        errors[f"seq {i} y"] = rel_err(y[:, lo : lo + n], y_ref[:, lo : lo + n])
        errors[f"seq {i} final state"] = rel_err(s[i], s_ref[i])
        for name, g, g_ref in zip(NAMES[:4], got, ref):
            errors[f"seq {i} d{name}"] = rel_err(g[:, lo : lo + n], g_ref[:, lo : lo + n])
    for name, t in [("y", y), ("final state", s)] + list(zip(NAMES, got)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errors})"


def test_varlen_matches_reference(seed):
    """Packed sequences of 5, 70 (a full chunk of 64 and a partial one), 1, 64 (exactly one
    chunk) and 0 tokens, with and without initial states."""
    varlen_vs_reference([5, 70, 1, 64, 0], 2, NS)
    varlen_vs_reference([5, 70, 1, 64, 0], 2, NS, with_state=False)


def test_varlen_bf16_small_chunks(seed):
    """bf16 r/k/v with a float32 log_w (as the RWKV-6 layer calls it), chunk 16 (a sequence
    of several chunks through the scans), an empty sequence first, two key blocks."""
    varlen_vs_reference([0, 37, 16, 3], 1, NVB, dtype=torch.bfloat16, logw_dtype=torch.float32, chunk_size=16,
                        block_k=NVB // 2, bwd_block_k=NVB // 2, bwd_block_v=NVB // 2)


def test_varlen_blocks_impl(seed):
    """The kernels walking a chunk in blocks of block_t rows (impl "blocks"), alone, mixed with
    the whole-chunk ones, and at chunk 128 (where they are the default)."""
    varlen_vs_reference([5, 70, 1, 0, 33], 1, NS, **BLOCKS)
    varlen_vs_reference([0, 37, 16, 3], 1, NVB, chunk_size=32, block_t=16, **BLOCKS, **VB)
    varlen_vs_reference([9, 70, 33], 1, NS, impl="chunks", bwd_impl="blocks")
    varlen_vs_reference([9, 70, 33], 1, NS, impl="blocks", bwd_impl="chunks", with_state=False)
    varlen_vs_reference([130, 0, 16, 3], 1, NS, chunk_size=128)


def test_varlen_every_output_element_written(seed, monkeypatch):
    poison_buffers(monkeypatch, kernels)
    varlen_vs_reference([19, 0, 40], 1, NS, chunk_size=16)
    varlen_vs_reference([19, 0, 40], 1, NVB, chunk_size=32, **BLOCKS, **VB)


def test_varlen_rwkv5_constant_decay(seed):
    """RWKV-5.2 with packed sequences: one [H, N] decay expanded to [1, T, H, N]; its gradient
    reaches the leaf through the expand."""
    lengths, H, N = [7, 0, 40], 2, NS
    x, cu = packed_inputs(lengths, H, N)
    decay = (-torch.exp(-6 + 5 * torch.rand(H, N))).to(DEVICE).requires_grad_()
    xs = [t.to(DEVICE).requires_grad_() for t in (x[0], x[2], x[3], x[4], x[5])]
    T = sum(lengths)
    y, s = wkv6_triton(xs[0], decay.expand(1, T, H, N), *xs[1:], cu_seqlens=cu)
    gy, gs = torch.randn(y.shape), torch.randn(s.shape)
    got = torch.autograd.grad((y * gy.to(DEVICE)).sum() + (s * gs.to(DEVICE)).sum(), [decay] + xs)

    ref_in = [t.detach().cpu().double().requires_grad_() for t in [decay] + xs]
    r, k, v, u, s0 = ref_in[1:]
    ys, ss = [], []
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        if n == 0:
            ss.append(s0[i : i + 1])
            continue
        y1, s1 = wkv6_reference(r[:, lo : lo + n], ref_in[0].expand(1, n, H, N), k[:, lo : lo + n],
                                v[:, lo : lo + n], u, s0[i : i + 1])
        ys.append(y1)
        ss.append(s1)
    y_ref, s_ref = torch.cat(ys, dim=1), torch.cat(ss)
    ref = torch.autograd.grad((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum(), ref_in)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4, f"seed {seed}"
    for name, g, g_ref in zip(["decay", "r", "k", "v", "u", "state"], got, ref):
        assert rel_err(g, g_ref) < 1e-4, f"grad {name}: {rel_err(g, g_ref):.2e}, seed {seed}"


def test_varlen_rejects_bad_offsets():
    x = [torch.zeros(1, 10, 1, 16, device=DEVICE) for _ in range(4)]
    u = torch.zeros(1, 16, device=DEVICE)
    cu = lambda *o: torch.tensor(o, dtype=torch.int32, device=DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        wkv6_triton(*x, u, cu_seqlens=cu(1, 4, 10))
    with pytest.raises(ValueError, match="cu_seqlens must end at the 10 packed tokens"):
        wkv6_triton(*x, u, cu_seqlens=cu(0, 6, 9))
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        wkv6_triton(*x, u, cu_seqlens=cu(0, 6, 4, 10))
    with pytest.raises(ValueError, match="packed as \\[1, T, H, N\\]"):
        wkv6_triton(*[torch.zeros(2, 5, 1, 16, device=DEVICE) for _ in range(4)], u, cu_seqlens=cu(0, 5))
    with pytest.raises(ValueError, match="state must be \\[2, 1, 16, 16\\]"):
        wkv6_triton(*x, u, torch.zeros(1, 1, 16, 16, device=DEVICE), cu_seqlens=cu(0, 4, 10))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        wkv6_triton(*x, u, cu_seqlens=cu(0, 4, 10).float())


def test_no_tokens_returns_a_new_state():
    """T = 0: y is empty and the final state equals the initial one without being it."""
    x = [torch.zeros(1, 0, 1, 16, device=DEVICE) for _ in range(4)]
    s0 = torch.randn(1, 1, 16, 16, device=DEVICE)
    y, s = wkv6_triton(*x, torch.zeros(1, 16, device=DEVICE), s0)
    assert y.shape == (1, 0, 1, 16) and torch.equal(s, s0) and s.data_ptr() != s0.data_ptr()


def test_supports():
    x = [torch.zeros(1, 4, 1, 16, device=DEVICE) for _ in range(4)]
    u = torch.zeros(1, 16, device=DEVICE)
    s = torch.zeros(1, 1, 16, 16, device=DEVICE)
    assert wkv6_triton_supports(*x, u, s) == (DEVICE == "cuda")
    assert not wkv6_triton_supports(*x, u, s.double())
    assert not wkv6_triton_supports(*x, u[0], s)


# --- GPU tests ------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("T", [1, 15, 64, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(seed, T, dtype):
    run_and_compare(make_inputs(2, T, 3, 64), dtype=dtype)


@gpu_only
@pytest.mark.parametrize("decay", ["realistic", "near_zero", "near_one", "mixed", "huge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_extremes(seed, decay, dtype):
    run_and_compare(make_inputs(2, 256, 2, 64, decay=decay), dtype=dtype, logw_dtype=torch.float32)


@gpu_only
@pytest.mark.parametrize("cfg", [SMALL_CHUNK, WIDE_BLOCK, WHOLE_CHUNK, dict(chunk_size=128), BLOCKS, CHUNKS,
                                 dict(CHUNKS, chunk_size=32), dict(CHUNKS, num_warps=8, bwd_num_warps=4),
                                 dict(CHUNKS, block_k=32, bwd_block_k=16)],
                         ids=["c16", "c32b32", "c64b64", "c128", "blocks", "chunks", "chunks_c32", "chunks_w8_4",
                              "chunks_k32_16"])
@pytest.mark.parametrize("decay", ["realistic", "mixed"])
def test_other_chunk_sizes(seed, cfg, decay):
    run_and_compare(make_inputs(2, 300, 2, 64, decay=decay), dtype=torch.float32, **cfg)


@gpu_only
@pytest.mark.parametrize("T", [15, 64, 300])
@pytest.mark.parametrize("decay", ["realistic", "near_zero", "huge"])
def test_chunks_impl_bf16(seed, T, decay):
    """impl "chunks" as the RWKV-6 layer calls it (bf16 r/k/v, float32 log_w): tf32 products,
    the exponent sums split into two tf32 products."""
    run_and_compare(make_inputs(2, T, 3, 64, decay=decay), dtype=torch.bfloat16, logw_dtype=torch.float32, **CHUNKS)


@gpu_only
@pytest.mark.parametrize("N", [16, 32, 128])
def test_chunks_impl_head_sizes(seed, N):
    run_and_compare(make_inputs(2, 77, 2, N, decay="mixed"), dtype=torch.float32, **CHUNKS)


@gpu_only
@pytest.mark.parametrize("precision, tol", [("tf32", 3e-3), ("tf32x3", 1e-4)])
def test_chunks_impl_precisions_fp32(seed, precision, tol):
    run_and_compare(make_inputs(2, 200, 2, 64, decay="mixed"), dtype=torch.float32, precision=precision, tol=tol,
                    **CHUNKS)


def test_log_w_sum_precision_rule():
    """One product for the exponents' sums where log w is exact in tf32 (bfloat16, float16) and
    for a float32 log w at tf32 (rounded to tf32 as loaded); the two-part split at tf32x3; ieee
    stays ieee."""
    lw = {d: torch.zeros(1, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16)}
    assert kernels._lw_precision(lw[torch.bfloat16], "tf32") == "one"
    assert kernels._lw_precision(lw[torch.float16], "tf32x3") == "one"
    assert kernels._lw_precision(lw[torch.float32], "tf32") == "round"
    assert kernels._lw_precision(lw[torch.float32], "tf32x3") == "tf32x3"
    assert kernels._lw_precision(lw[torch.bfloat16], "ieee") == "ieee"


def tf32_nearest(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 11 significant bits (tf32), ties to even, through float64 frexp."""
    m, e = torch.frexp(x.double())
    return torch.ldexp(torch.round(m * 2048) / 2048, e).float()  # torch.round: ties to even


@pytest.mark.parametrize("lwp", ["round", "one"])
def test_log_w_rounded_to_tf32_as_loaded(lwp):
    """LWP "round": the kernels load a float32 log w rounded to the nearest tf32 value, ties to
    even (random values, exact ties either way, bfloat16 values kept, -inf as -1e30 rounded);
    "one" loads it as it is."""
    import triton
    import triton.language as tl

    @triton.jit
    def load(lw_ptr, out_ptr, LWP: tl.constexpr):
        t = tl.arange(0, 16)
        offs = tl.arange(0, 16)
        tl.store(out_ptr + t[:, None] * 16 + offs[None, :],
                 kernels._load_lw_chunk(lw_ptr, 0, t, (t < 16)[:, None], 16, offs, LWP))

    lw = -torch.exp(torch.randn(256) * 4)
    ties = torch.tensor([0x3F801000, 0x3F803000, 0xBF801000, 0xBF803000, 0x3F800FFF, 0x3F801001], dtype=torch.int64)
    lw[:6] = ties.to(torch.int32).view(torch.float32)  # 1 + 2^-11 (down), 1 + 3 * 2^-11 (up), negated; off-tie
    lw[6] = -float("inf")
    lw[7:12] = torch.tensor([0.0, -1e-30, -1e4, -3.0, -1.5]).to(torch.bfloat16).float()
    out = torch.empty(256)
    x, o = lw.to(DEVICE), out.to(DEVICE)
    load[(1,)](x, o, LWP=lwp)
    want = torch.maximum(lw, torch.tensor(-1e30))
    if lwp == "round":
        want = tf32_nearest(want)
        assert torch.equal(want[:6].view(torch.int32) & 0x1FFF, torch.zeros(6, dtype=torch.int32))
        assert torch.equal(want[7:12], lw[7:12])
    assert torch.equal(o.cpu(), want)


@pytest.mark.parametrize("L", [16, 64])
def test_mask_table_sums(L):
    """The kernels' table of 0/1 matrices, applied to random x, gives the exclusive prefix and
    suffix sums over each aligned block of 2^lvl rows (kind 0, 1), pre_h on the right halves and
    suf_h on the left halves of each 2h-block (kind 2), and the transposes the gradients use."""
    table = kernels._mask_table(L, torch.device("cpu"))
    assert table.shape == (int(math.log2(L)) + 1, 3, 2, L, L)
    x = torch.randn(L, 3, dtype=torch.float64)
    for lvl in range(table.shape[0]):
        h = 1 << lvl
        blocks = x.view(L // h, h, 3)
        incl = blocks.cumsum(1)
        pre = (incl - blocks).reshape(L, 3)  # sum before t in its block
        suf = (blocks.sum(1, keepdim=True) - incl).reshape(L, 3)  # sum after t in its block
        right = ((torch.arange(L) >> lvl) & 1 == 1)[:, None]
        for kind, want in enumerate([pre, suf, torch.where(right, pre, suf)]):
            m = table[lvl, kind].double()
            torch.testing.assert_close(m[0] @ x, want)
            torch.testing.assert_close(m[1], m[0].T)


def test_bf16_operands_rule():
    """The update and dv kernels take bfloat16 v / dY as stored (their float32 operand split in
    two bfloat16 parts) only for bfloat16 inputs at tf32 and 4 warps; a bfloat16 log w is then
    summed by a bfloat16 product against the bfloat16 mask table."""
    x = {d: torch.zeros(1, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16)}
    assert kernels._bf16_ops(x[torch.bfloat16], "tf32", 4)
    assert not kernels._bf16_ops(x[torch.bfloat16], "tf32", 8)
    assert not kernels._bf16_ops(x[torch.bfloat16], "tf32x3", 4)
    assert not kernels._bf16_ops(x[torch.float16], "tf32", 4)
    assert not kernels._bf16_ops(x[torch.float32], "tf32", 4)
    assert kernels._lw_precision(x[torch.bfloat16], "tf32", bf16=True) == "bf16"
    assert kernels._lw_precision(x[torch.float16], "tf32", bf16=True) == "one"
    assert kernels._lw_precision(x[torch.float32], "tf32", bf16=True) == "round_bf16"
    assert kernels._lw_precision(x[torch.bfloat16], "ieee", bf16=True) == "ieee"
    assert kernels._mask_table(16, torch.device("cpu"), "bf16").dtype == torch.bfloat16
    assert kernels._mask_table(16, torch.device("cpu"), "round_bf16").dtype == torch.bfloat16
    assert torch.equal(kernels._mask_table(16, torch.device("cpu"), "bf16").float(),
                       kernels._mask_table(16, torch.device("cpu")))


@pytest.mark.parametrize("x_left", [False, True])
def test_split_dot_keeps_16_bits(seed, x_left):
    """_split_dot: a bfloat16 operand times a float32 one split in two bfloat16 parts, against
    float64 (random signs, a spread of magnitudes): within 16 mantissa bits of the float32
    operand (tf32 keeps 10: ~3e-4 here, bfloat16's 8 alone: ~3e-3; the split at most 5.7e-6
    over 200 seeds in float64)."""
    import triton
    import triton.language as tl

    @triton.jit
    def run(b_ptr, x_ptr, o_ptr, X_LEFT: tl.constexpr):
        i = tl.arange(0, 32)
        offs = i[:, None] * 32 + i[None, :]
        tl.store(o_ptr + offs, kernels._split_dot(tl.load(b_ptr + offs), tl.load(x_ptr + offs), X_LEFT))

    g = torch.Generator().manual_seed(seed)
    b = torch.randn(32, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(32, 32, generator=g) * torch.exp(torch.randn(32, 32, generator=g) * 2)
    out = torch.empty(32, 32, device=DEVICE)
    run[(1,)](b.to(DEVICE), x.to(DEVICE), out, X_LEFT=x_left)
    want = x.double() @ b.double() if x_left else b.double() @ x.double()
    assert rel_err(out, want) < 3e-5


@pytest.mark.parametrize("lw_dtype", [torch.bfloat16, torch.float32])
def test_bf16_operands_keep_16_bits_end_to_end(seed, lw_dtype):
    """Through the kernels with bfloat16 inputs at tf32: the final state of one chunk (the
    update kernel: V^T (k e^{Q})) and dv from the forward's saved A with no state gradient (the
    dv kernel: A^T dY) against float64 on the same values, within the 16-bit split (tf32
    operands give ~3e-4, bfloat16 alone ~3e-3). A float32 log w, which the kernels round to
    tf32 as loaded, is given to the reference rounded the same way: its exponents' sums (two
    bfloat16 products in the update kernel) are exact."""
    r, lw, k, v, u, _ = (t.to(DEVICE) for t in make_inputs(1, 64, 2, NS))
    r, k, v = (t.to(torch.bfloat16) for t in (r, k, v))
    lw = lw.to(torch.bfloat16) if lw_dtype == torch.bfloat16 else tf32_nearest(lw.cpu()).to(DEVICE)
    cfg = dict(chunk_size=64, block_t=16, block_v=None, num_warps=None, scan_block=None, scan_num_warps=None,
               precision="tf32", impl="chunks")
    y, sT, states, amat = kernels.wkv6_forward(r, lw, k, v, u, None, out_dtype=torch.bfloat16, save_a=True, **cfg)
    _, s_ref = wkv6_reference(*(t.cpu().double() for t in (r, lw, k, v, u)))
    assert rel_err(sT, s_ref) < 5e-5
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16)
    dv = kernels.wkv6_backward(r, lw, k, v.float(), u, states, dy, None, amat=amat, **cfg)[3]  # dv in v's dtype
    a = torch.tril(amat[0].double().cpu())  # [H, 1, C, C]: A[t, s], s <= t (the blocks above are not stored)
    want = torch.einsum("hts,thn->shn", a[:, 0], dy[0].double().cpu())
    assert dv.dtype == torch.float32 and rel_err(dv[0], want) < 5e-5


@gpu_only
@pytest.mark.parametrize("decay", ["realistic", "mixed"])
def test_bfloat16_log_w_summed_in_one_product(seed, decay):
    """A bfloat16 log w is exact in tf32 (one tensor-core product for the exponents' sums), and
    a float32 log w rounded to tf32 as it is loaded keeps bfloat16 values as they are: the same
    log w values as float32 or as bfloat16 give the same outputs and gradients (float32 r, k, v
    at precision tf32, so that nothing else differs)."""
    r, lw, k, v, u, s0 = make_inputs(2, 200, 2, 64, decay=decay)
    lw = lw.to(torch.bfloat16).float()
    outs = []
    for lw_dtype in (torch.float32, torch.bfloat16):
        xs = [t.to(DEVICE).requires_grad_() for t in (r, k, v, u, s0)]
        lw_in = lw.to(DEVICE, lw_dtype).requires_grad_()
        y, s = wkv6_triton(xs[0], lw_in, *xs[1:], precision="tf32")
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        grads = torch.autograd.grad((y * gy).sum() + s.sum(), [lw_in] + xs)
        outs.append([y, s, *grads])
    for name, a, b in zip(["y", "state", "dlog_w", "dr", "dk", "dv", "du", "dstate"], *outs):
        tol = 1e-2 if name == "dlog_w" else 1e-5  # dlog_w in log w's dtype
        assert rel_err(b.float(), a.float()) < tol, name


@gpu_only
def test_chunks_impl_large_shape_vs_chunked(seed):
    x = make_inputs(2, 4096, 4, 64, decay="mixed")
    compare_with_chunked(functools.partial(wkv6_triton, **CHUNKS), wkv6_chunked, NAMES, x,
                         [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32])


@gpu_only
def test_no_state_bf16(seed):
    run_and_compare(make_inputs(2, 200, 3, 64), dtype=torch.bfloat16, logw_dtype=torch.float32, with_state=False)


@gpu_only
@pytest.mark.parametrize("T", [15, 256])
def test_float16(seed, T):
    run_and_compare(make_inputs(2, T, 3, 64), dtype=torch.float16, logw_dtype=torch.float32)


@gpu_only
@pytest.mark.parametrize("N", [32, 128])
def test_head_sizes(seed, N):
    run_and_compare(make_inputs(2, 77, 2, N, decay="mixed"), dtype=torch.float32, **BLOCKS)


@gpu_only
@pytest.mark.parametrize("knobs", [
    dict(block_v=32, num_warps=4, bwd_block_v=64, bwd_num_warps=8, scan_block=64, scan_num_warps=8),
    dict(block_v=16, num_warps=8, bwd_block_v=16, bwd_num_warps=4, scan_block=32, scan_num_warps=4),
], ids=["wide", "narrow"])
def test_tuning_knobs(seed, knobs):
    run_and_compare(make_inputs(2, 100, 3, 64), dtype=torch.bfloat16, logw_dtype=torch.float32, **knobs)


@gpu_only
@pytest.mark.parametrize("precision, tol", [("tf32", 3e-3), ("tf32x3", 1e-4)])
def test_tensor_core_precisions_fp32(seed, precision, tol):
    run_and_compare(make_inputs(2, 200, 2, 64, decay="mixed"), dtype=torch.float32, precision=precision, tol=tol)


@gpu_only
def test_rwkv5_constant_decay_gpu(seed):
    """RWKV-5.2 at a realistic shape: bf16 r/k/v, a float32 per-head decay expanded over B, T."""
    B, T, H, N = 2, 300, 3, 64
    r, _, k, v, u, s0 = make_inputs(B, T, H, N)
    lw = (-torch.exp(-6 + 5 * torch.rand(H, N))).expand(B, T, H, N)
    run_and_compare([r, lw, k, v, u, s0], dtype=torch.bfloat16, logw_dtype=torch.float32)


@gpu_only
def test_dispatcher_uses_triton_on_cuda(seed, monkeypatch):
    """ops.wkv6 on CUDA takes the Triton path (and RWKVKIT_WKV_BACKEND=torch the chunked form);
    both agree with the reference."""
    *x, s0 = [t.cuda() for t in make_inputs(2, 100, 2, 64)]
    calls = []
    real = kernels.wkv6_triton
    monkeypatch.setattr(kernels, "wkv6_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y, s = wkv6(*x, s0)
    assert calls, "the dispatcher did not call the Triton kernels"
    monkeypatch.setenv("RWKVKIT_WKV_BACKEND", "torch")
    y_t, s_t = wkv6(*x, s0)
    assert len(calls) == 1
    y_ref, s_ref = wkv6_reference(*[t.cpu() for t in x], s0.cpu())
    for out, ref in ((y, y_ref), (s, s_ref), (y_t, y_ref), (s_t, s_ref)):
        assert rel_err(out, ref) < 1e-4, f"seed {seed}"


@gpu_only
@pytest.mark.parametrize("cfg", [{}, BLOCKS], ids=["chunks", "blocks"])
def test_varlen_gpu_vs_dense(seed, cfg):
    """Packed sequences at a realistic size (bf16 r/k/v, float32 log_w, H=4, N=64, lengths
    with partial chunks, one token, an empty sequence, a long one) against one dense
    wkv6_triton call per sequence with the same settings (the scans' tile pinned: the automatic
    one depends on the number of sequences): outputs, final states and every gradient."""
    cfg = dict(cfg, scan_block=32)
    lengths, H, N = [300, 1, 0, 64, 1000, 129], 4, 64
    x, cu = packed_inputs(lengths, H, N)
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    ours = [t.to(DEVICE, dt).requires_grad_() for t, dt in zip(x, dtypes)]
    y, s = wkv6_triton(*ours, cu_seqlens=cu, **cfg)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    got = torch.autograd.grad((y.float() * gy.float()).sum() + (s * gs).sum(), ours)
    du = torch.zeros_like(got[4], dtype=torch.float32)
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        if n == 0:
            assert torch.equal(s[i], ours[5][i]) and torch.equal(got[5][i], gs[i]), f"empty sequence {i}"
            continue
        one = [t[:, lo : lo + n].detach().requires_grad_() for t in ours[:4]]
        one += [ours[4].detach().requires_grad_(), ours[5][i : i + 1].detach().requires_grad_()]
        y1, s1 = wkv6_triton(*one, **cfg)
        g1 = torch.autograd.grad((y1.float() * gy[:, lo : lo + n].float()).sum() + (s1 * gs[i : i + 1]).sum(), one)
        assert rel_err(y[:, lo : lo + n], y1) < 1e-5 and rel_err(s[i : i + 1], s1) < 1e-5, f"sequence {i}"
        for name, g, g_one in zip(NAMES[:4], got, g1):
            assert rel_err(g[:, lo : lo + n], g_one) < 1e-5, f"sequence {i}, grad {name}"
        assert rel_err(got[5][i : i + 1], g1[5]) < 1e-5, f"sequence {i}, grad state"
        du += g1[4].float()
    assert rel_err(got[4], du) < 1e-5, "grad u"


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shape_vs_chunked(seed, dtype):
    """B=2, T=4096, H=4, N=64 against the float32 PyTorch chunked form (autograd) on the same
    (rounded) inputs: outputs, final state and all gradients."""
    x = make_inputs(2, 4096, 4, 64, decay="mixed")
    compare_with_chunked(wkv6_triton, wkv6_chunked, NAMES, x, [dtype, torch.float32, dtype, dtype, torch.float32])
