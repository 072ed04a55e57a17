"""WKV-7 Triton kernels: outputs, final state and every gradient against the float64 step
reference (and the float32 chunked form at a large shape).

Runs on CUDA. Without CUDA or without triton the module skips, except that with
RWKVKIT_TRITON_INTERPRET=1 a small set runs on CPU under the Triton interpreter (tiny shapes:
the interpreter is slow). The switch, the skips and the comparisons shared with the other
version's tests are in tests/triton_checks.py.
"""

import itertools
import math

import pytest
import torch
from triton_checks import (  # before the kernels: sets up the interpreter, or skips this module
    DEVICE,
    INTERPRET,
    assert_decoding_unchanged_by,
    assert_segments_change_nothing,
    compare_one_output_used,
    compare_with_chunked,
    compare_with_reference,
    gpu_only,
    poison_buffers,
    watch_memory_accesses,
)

import triton  # (after triton_checks: installed, or the module was skipped)
import triton.language as tl

from conftest import rel_err
from test_ops import wkv7_inputs

from rwkvkit.ops import wkv7_chunked, wkv7_reference
from rwkvkit.ops.triton import wkv7 as kernels
from rwkvkit.ops.triton import wkv7_triton
from rwkvkit.ops.triton.wkv7 import wkv7_recurrent

NAMES = ["r", "log_w", "k", "v", "a", "b", "state"]


def make_inputs(B, T, H, N, *, decay="realistic"):
    """float32 CPU inputs [r, log_w, k, v, a, b, state]; decays also exactly at the ends."""
    if decay == "at_clamp":
        x = wkv7_inputs(B, T, H, N)
        x[1] = torch.full_like(x[1], -math.exp(-0.5))
        return x
    if decay == "tiny":
        x = wkv7_inputs(B, T, H, N)
        x[1] = -1e-6 * torch.rand_like(x[1])
        return x
    return wkv7_inputs(B, T, H, N, decay=decay)


def run_and_compare(x, *, dtype, logw_dtype=None, **kw):
    """compare_with_reference: every input in ``dtype`` (log_w in ``logw_dtype`` if given)."""
    dtypes = [dtype, logw_dtype or dtype] + [dtype] * 4
    return compare_with_reference(wkv7_triton, wkv7_reference, NAMES, x, dtypes, **kw)


# --- interpreter-sized tests (also run on GPU) ----------------------------------------------


@pytest.mark.parametrize("T", [1, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_matches_reference(seed, T, dtype):
    run_and_compare(make_inputs(1, T, 2, 16), dtype=dtype, chunk_size=16)


def test_small_chunk32_value_blocks_no_state(seed):
    """Two value blocks (N=32, block_v=16) in every kernel, chunk 32 > T, no initial state."""
    run_and_compare(
        make_inputs(1, 23, 1, 32), dtype=torch.float32, chunk_size=32, block_v=16, bwd_block_v=16,
        scan_block_v=16, with_state=False,
    )


@pytest.mark.parametrize("decay", ["tiny", "at_clamp"])
def test_small_decay_extremes(seed, decay):
    run_and_compare(make_inputs(1, 33, 1, 16, decay=decay), dtype=torch.float32, chunk_size=16)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
@pytest.mark.parametrize("block_v", [None, 16])
def test_small_factor_range(seed, scale, block_v):
    """r, k, v (and the state as k v) far from 1 in bf16: the factors the scans read are kept
    in float16 with tf32 products, whose range alone would overflow (1e6) or lose bits (1e-6).
    The tolerance is twice bf16's (dlog_w's error reached 1.04e-2 at 1e-6 with float32 factors
    too). With two value blocks in prep, U and P stay float32."""
    x = make_inputs(1, 37, 2, 32)
    for i in (0, 2, 3):
        x[i] = x[i] * scale
    x[6] = x[6] * scale**2
    run_and_compare(x, dtype=torch.bfloat16, chunk_size=16, block_v=block_v, tol=2e-2)


def test_small_mixed_dtypes(seed):
    """As the RWKV-7 layer calls it: bf16 r/k/v/a/b, float32 log_w, float32 state."""
    run_and_compare(make_inputs(2, 20, 1, 16), dtype=torch.bfloat16, logw_dtype=torch.float32, chunk_size=16)


def test_every_output_element_written(seed, monkeypatch):
    """Outputs and gradient buffers start as NaN: the kernels must overwrite every element."""
    poison_buffers(monkeypatch, kernels)
    run_and_compare(make_inputs(2, 19, 1, 32), dtype=torch.float32, chunk_size=16, block_v=16, bwd_block_v=16)
    run_and_compare(make_inputs(1, 21, 2, 16), dtype=torch.bfloat16, chunk_size=16)


def test_only_one_output_used(seed):
    """Backward with only y or only the final state in the loss (the other gradient is None)."""
    compare_one_output_used(wkv7_triton, wkv7_reference, NAMES, make_inputs(1, 18, 1, 16), not_in_state=("r",),
                            chunk_size=16)


def test_state_not_modified_and_out_dtype(seed):
    *inp, s0 = make_inputs(1, 20, 1, 16)
    inp = [t.to(DEVICE) for t in inp]
    s0 = s0.to(DEVICE)
    before = s0.clone()
    wkv7_triton(*inp, s0, chunk_size=16)
    assert torch.equal(s0, before)
    y16, _ = wkv7_triton(*(t.bfloat16() for t in inp), s0, chunk_size=16, out_dtype=torch.float32)
    assert y16.dtype == torch.float32


def varlen_case(lengths, H, N, *, dtype, chunk_size=None, rtol=1e-4, **kernel_kw):
    """Packed sequences (cu_seqlens) against each sequence run alone, forward and backward."""
    xs = [make_inputs(1, n, H, N) for n in lengths]
    packed = [torch.cat([x[i] for x in xs], dim=1).to(DEVICE, dtype).requires_grad_() for i in range(6)]
    s0 = torch.cat([x[6] for x in xs]).to(DEVICE).requires_grad_()
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device=DEVICE, dtype=torch.int32)
    kw = dict(kernel_kw) if chunk_size is None else {"chunk_size": chunk_size, **kernel_kw}
    y, s = wkv7_triton(*packed, s0, cu_seqlens=cu, **kw)
    assert y.shape == packed[0].shape and s.shape == s0.shape
    gy, gs = torch.randn_like(y, dtype=torch.float32), torch.randn_like(s)
    got = torch.autograd.grad((y.float() * gy).sum() + (s * gs).sum(), packed + [s0])
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        if n == 0:  # an empty sequence passes its state (and the state's gradient) through
            assert torch.equal(s[i], s0[i]) and torch.equal(got[6][i], gs[i]), f"empty sequence {i}"
            continue
        one = [x[:, lo : lo + n].detach().requires_grad_() for x in packed] + [s0[i : i + 1].detach().requires_grad_()]
        y1, s1 = wkv7_triton(*one, **kw)
        g1 = torch.autograd.grad((y1.float() * gy[:, lo : lo + n]).sum() + (s1 * gs[i : i + 1]).sum(), one)
        assert rel_err(y[:, lo : lo + n], y1) < rtol and rel_err(s[i : i + 1], s1) < rtol, f"sequence {i}"
        for name, g, g_one in zip(NAMES[:6], got[:6], g1[:6]):
            assert rel_err(g[:, lo : lo + n], g_one) < rtol, f"sequence {i}, grad {name}"
        assert rel_err(got[6][i : i + 1], g1[6]) < rtol, f"sequence {i}, grad state"


def test_varlen_matches_one_by_one(seed):
    """Lengths not multiples of the chunk, one of a single token, one empty (also last)."""
    varlen_case([5, 0, 21, 1, 16], 1, 16, dtype=torch.float32, chunk_size=16)
    varlen_case([3, 17, 0], 1, 16, dtype=torch.float32, chunk_size=16, scan_block_v=16, bwd_block_v=16)


def packed(lengths, H, N):
    """Per-sequence inputs packed as [1, sum(lengths), H, N] (states [S, H, N, N]) and cu_seqlens."""
    xs = [make_inputs(1, n, H, N) for n in lengths]
    x = [torch.cat([t[i] for t in xs], dim=1) for i in range(6)] + [torch.cat([t[6] for t in xs])]
    return x, torch.tensor([0] + list(itertools.accumulate(lengths)), device=DEVICE, dtype=torch.int32)


def test_segmented_scans_match(seed):
    """Scans in segments (each overlapping the per-chunk kernels of the next on CUDA): uneven
    segments, a dense batch and packed sequences where one ends a chunk early (its program in
    the last segment has no chunk), the same numbers as one launch."""
    assert_segments_change_nothing(wkv7_triton, NAMES, make_inputs(2, 70, 1, 16), 2, chunk_size=16)
    assert_segments_change_nothing(wkv7_triton, NAMES, make_inputs(1, 40, 2, 16), 3, chunk_size=16,
                                   scan_block_v=16, bwd_block_v=16)
    x, cu = packed([33, 20], 1, 16)
    assert_segments_change_nothing(wkv7_triton, NAMES, x, 3, cu_seqlens=cu, chunk_size=16)
    x, cu = packed([48, 48, 48, 48, 0], 1, 16)  # even enough to segment, an empty sequence last
    assert_segments_change_nothing(wkv7_triton, NAMES, x, 2, cu_seqlens=cu, chunk_size=16)
    cfg = dict(scan_block_v=None, scan_segments=4, bwd_scan_block_v=None, bwd_scan_segments=None,
               scan_precision="ieee")
    table = kernels.varlen_table(torch.tensor([0, 100, 110]), 16, 110)  # 7 and 1 chunks: too uneven
    assert kernels._scan_plan(table, 1, 16, cfg, torch.device("cpu"), grad=True, bwd=False)[1] == [(0, 7)]
    dense = kernels.dense_table(2, 100, 16, torch.device("cpu"))
    cfg.update(bwd_scan_segments=3)
    assert kernels._scan_plan(dense, 1, 64, cfg, torch.device("cpu"), grad=True, bwd=True)[1] == [
        (0, 3), (3, 6), (6, 7)]


@pytest.mark.skipif(not INTERPRET, reason="watches the interpreter's memory accesses")
def test_memory_accesses_in_bounds(seed, monkeypatch):
    """Every masked-in load and store stays inside the launch's tensors: the scans prefetch
    one chunk ahead, clamped into the sequence, also where a segment starts or ends inside a
    sequence, past a short sequence's end, or at an empty last sequence."""
    watch_memory_accesses(monkeypatch, seed)
    run_and_compare(make_inputs(1, 37, 2, 16), dtype=torch.float32, chunk_size=16)
    x, cu = packed([48, 48, 48, 40, 0], 1, 16)
    assert_segments_change_nothing(wkv7_triton, NAMES, x, 2, cu_seqlens=cu, chunk_size=16)
    x, cu = packed([48, 48, 48, 48, 0], 1, 16)
    assert_segments_change_nothing(wkv7_triton, NAMES, x, 3, cu_seqlens=cu, chunk_size=16)


def test_automatic_scan_settings(monkeypatch):
    """The automatic scan settings (from the H200 measurements in ``_overlap_pays`` and
    ``_scan_plan``; 8, 16384, 32 was not measured): segments for long sequences with enough work
    where the sequence-heads are too few to fill the GPU; the value block from the sequence-heads."""
    monkeypatch.setattr(kernels, "_sms", lambda device: 132)
    cuda = torch.device("cuda")
    cfg = dict(scan_block_v=None, scan_segments=None, bwd_scan_block_v=None, bwd_scan_segments=None,
               scan_precision="tf32")

    def plan(B, T, H, grad):
        L = 16 if grad else 32
        nc = -(-T // L)
        table = kernels.ChunkTable(None, None, None, B, B * nc, nc)
        bv, segs = kernels._scan_plan(table, H, 64, cfg, cuda, grad=grad, bwd=False)
        return bv, len(segs)

    assert plan(2, 16384, 32, True) == (32, 4) and plan(2, 16384, 32, False) == (32, 4)
    assert plan(1, 16384, 12, True) == (16, 4) and plan(1, 16384, 12, False) == (16, 4)
    assert plan(1, 8192, 12, False) == (16, 1)  # (256 chunks)
    assert plan(8, 4096, 32, True) == (64, 1) and plan(8, 4096, 32, False) == (32, 1)
    assert plan(4, 4096, 12, True) == (32, 1) and plan(4, 4096, 12, False) == (32, 1)
    assert plan(8, 16384, 32, True) == (64, 1) and plan(8, 16384, 32, False) == (32, 1)
    assert plan(1, 32768, 4, True) == (16, 4) and plan(1, 16384, 4, True) == (16, 1)  # (4096 chunk-heads)
    table = kernels.ChunkTable(None, None, None, 2, 2048, 1024)
    assert not kernels._overlap_pays(table, 32, torch.device("cpu"))


def test_varlen_rejects_bad_offsets():
    x = [torch.zeros(1, 10, 1, 16, device=DEVICE) for _ in range(6)]
    with pytest.raises(ValueError, match="cu_seqlens"):
        wkv7_triton(*x, cu_seqlens=torch.tensor([0, 6, 4, 10], device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        wkv7_triton(*x, cu_seqlens=torch.tensor([0, 6, 9], device=DEVICE))
    with pytest.raises(ValueError, match="packed"):
        wkv7_triton(*[torch.zeros(2, 5, 1, 16, device=DEVICE) for _ in range(6)], cu_seqlens=torch.tensor([0, 5]))
    # checked also when there is nothing to compute (no sequences, or no tokens)
    with pytest.raises(ValueError, match="cu_seqlens"):
        wkv7_triton(*x, cu_seqlens=torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        wkv7_triton(*[t[:, :0] for t in x], cu_seqlens=torch.tensor([0, 4], device=DEVICE))


def test_no_tokens_returns_a_new_state():
    """T = 0: y is empty and the final state equals the initial one without being it."""
    x = [torch.zeros(1, 0, 1, 16, device=DEVICE) for _ in range(6)]
    s0 = torch.randn(1, 1, 16, 16, device=DEVICE)
    y, s = wkv7_triton(*x, s0)
    assert y.shape == (1, 0, 1, 16) and torch.equal(s, s0) and s.data_ptr() != s0.data_ptr()
    y, s = wkv7_triton(*x, cu_seqlens=torch.tensor([0, 0], device=DEVICE))
    assert torch.equal(s, torch.zeros(1, 1, 16, 16, device=DEVICE))


@pytest.mark.parametrize("T", [1, 3])
def test_recurrent_matches_reference(seed, T):
    """The decoding kernel: a new state, or the given one updated in place."""
    *inp, s0 = make_inputs(2, T, 2, 32)
    y_ref, s_ref = wkv7_reference(*[t.double() for t in inp], s0.double())
    y_bf, s_bf = wkv7_reference(*[t.bfloat16().double() for t in inp], s0.double())
    inp = [t.to(DEVICE) for t in inp]
    state = s0.clone().to(DEVICE)
    y, s = wkv7_recurrent(*inp, state)
    assert s is not state and torch.equal(state, s0.to(DEVICE))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    y2, s2 = wkv7_recurrent(*[t.bfloat16() for t in inp], state, inplace=True, out_dtype=torch.float32)
    assert s2 is state and y2.dtype == torch.float32
    assert rel_err(y2, y_bf) < 1e-5 and rel_err(state, s_bf) < 1e-5
    with pytest.raises(ValueError, match="inplace"):
        wkv7_recurrent(*inp, state.double(), inplace=True)


def timemix_step_inputs(B, H, N, gate, dtype):
    """Arguments of ``ops.wkv7_timemix_step_`` (float32 CPU, the [B, C] ones then rounded to
    ``dtype`` and back), realistic ranges."""
    C = H * N
    rows = {"r": torch.randn(B, C), "k": torch.randn(B, C), "v": torch.randn(B, C),
            "a": torch.rand(B, C), "g": torch.randn(B, C) * 0.5,
            "gate": torch.rand(B, C) if gate else None, "v_first": torch.randn(B, C) if gate else None}
    rows = {n: None if t is None else t.to(dtype).float() for n, t in rows.items()}
    log_w = -math.exp(-0.5) * torch.rand(B, C)
    params = dict(k_k=0.85 + 0.1 * torch.rand(C), k_a=1 + 0.1 * torch.randn(C), r_k=0.3 * torch.randn(H, N),
                  ln_weight=1 + 0.1 * torch.randn(C), ln_bias=0.1 * torch.randn(C))
    state = 0.3 * torch.randn(B, H, N, N)
    return rows, log_w, params, state


def call_timemix_step(fn, rows, log_w, params, state, eps=64e-5):
    return fn(rows["r"], log_w, rows["k"], rows["v"], rows["a"], rows["g"], rows["gate"], rows["v_first"],
              params["k_k"], params["k_a"], params["r_k"], params["ln_weight"], params["ln_bias"], eps, state)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timemix_step_kernel_matches_ops(seed, gate, dtype):
    """The fused decoding step of an RWKV-7 time-mix against the PyTorch ops in float64."""
    from rwkvkit import ops
    from rwkvkit.ops.triton import wkv7_timemix_step_

    rows, log_w, params, s0 = timemix_step_inputs(3, 2, 32, gate, dtype)
    state_ref = s0.double()
    out_ref = call_timemix_step(ops.wkv7_timemix_step_, {n: None if t is None else t.double() for n, t in rows.items()},
                                log_w.double(), {n: t.double() for n, t in params.items()}, state_ref)
    state = s0.to(DEVICE)
    out = call_timemix_step(wkv7_timemix_step_, {n: None if t is None else t.to(DEVICE, dtype) for n, t in rows.items()},
                            log_w.to(DEVICE), {n: t.to(DEVICE) for n, t in params.items()}, state)
    assert out.dtype == dtype and out.shape == (3, 64)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    assert rel_err(out, out_ref) < tol
    assert rel_err(state, state_ref) < 1e-5  # the state stays float32 (inputs rounded alike)


@gpu_only
def test_model_step_with_fused_kernel(seed, monkeypatch):
    """RWKV-7 decoding with RWKVKIT_FUSED_STEP=1 equals the unfused step (float32 model)."""
    assert_decoding_unchanged_by(monkeypatch, "RWKVKIT_FUSED_STEP", "rwkv7", 3)


def test_rejects_bad_arguments():
    x = [torch.zeros(1, 4, 1, 16, device=DEVICE) for _ in range(6)]
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7_triton(*x, chunk_size=8)
    with pytest.raises(ValueError, match="head size"):
        wkv7_triton(*[torch.zeros(1, 4, 1, 24, device=DEVICE) for _ in range(6)])
    with pytest.raises(ValueError, match="dtype"):
        wkv7_triton(*[t.double() for t in x])
    with pytest.raises(ValueError, match="state"):
        wkv7_triton(*x, torch.zeros(1, 1, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="forward-only"):
        wkv7_triton(*[t.clone().requires_grad_() for t in x], chunk_size=64)
    with pytest.raises(ValueError, match="saved_dtype"):
        wkv7_triton(*x, saved_dtype=torch.float16)
    with pytest.raises(ValueError, match="bwd_scan_block_v"):  # (a backward-only setting, checked up front)
        wkv7_triton(*x, bwd_scan_block_v=8)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="scan_segments"):
            wkv7_triton(*x, scan_segments=bad)


def test_saved_dtype(seed):
    """What the backward keeps: the per-chunk states (and, as the same dtype, their gradients;
    SA stays float32) in bfloat16 by default with tf32 matmuls on bfloat16 inputs, float32
    otherwise (float16 inputs included) or when asked; the gradients stay within the bfloat16
    tolerance of the float64 reference either way."""
    x = [t.to(DEVICE).requires_grad_() for t in make_inputs(1, 20, 1, 16)]
    cases = [
        (torch.bfloat16, {}, torch.bfloat16),
        (torch.bfloat16, {"saved_dtype": torch.float32}, torch.float32),
        (torch.bfloat16, {"precision": "ieee"}, torch.float32),
        (torch.float16, {}, torch.float32),
        (torch.float32, {}, torch.float32),
        (torch.float32, {"saved_dtype": torch.bfloat16}, torch.bfloat16),
    ]
    for dtype, kw, want in cases:
        y, _ = wkv7_triton(*(t.to(dtype) for t in x[:6]), x[6], chunk_size=16, **kw)
        states = y.grad_fn.saved_tensors[6]  # after r, log_w, k, v, a, b
        assert states.shape == (2, 1, 16, 16) and states.dtype == want, (dtype, kw, states.dtype)
    run_and_compare(make_inputs(1, 40, 2, 16), dtype=torch.float32, chunk_size=16, saved_dtype=torch.bfloat16,
                    tol=1e-2)


@pytest.mark.parametrize("T", [70, 128])
def test_small_chunk64_forward_only(seed, T):
    """Chunk 64 without gradients (as prefill may call it): y and the final state."""
    *x, s0 = make_inputs(1, T, 2, 16)
    with torch.no_grad():
        y, s = wkv7_triton(*(t.to(DEVICE) for t in x), s0.to(DEVICE), chunk_size=64)
    y_ref, s_ref = wkv7_reference(*(t.double() for t in x), s0.double())
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


# --- GPU tests ------------------------------------------------------------------------------
# Every distinct (dtype, chunk, block, precision, ...) combination compiles the six kernels
# anew (seconds each), so most tests share the default configuration.


@gpu_only
@pytest.mark.parametrize("T", [1, 15, 64, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(seed, T, dtype):
    run_and_compare(make_inputs(2, T, 3, 64), dtype=dtype)


@gpu_only
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_other_chunk_sizes(seed, chunk_size):
    run_and_compare(make_inputs(2, 100, 3, 64), dtype=torch.float32, chunk_size=chunk_size)


@gpu_only
def test_float16(seed):
    run_and_compare(make_inputs(2, 130, 3, 64), dtype=torch.float16)


@gpu_only
@pytest.mark.parametrize("decay", ["near_one", "tiny", "clamp", "at_clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_extremes(seed, decay, dtype):
    run_and_compare(make_inputs(2, 256, 2, 64, decay=decay), dtype=dtype)


@gpu_only
@pytest.mark.parametrize("N", [16, 32, 128])
def test_head_sizes(seed, N):
    run_and_compare(make_inputs(2, 77, 2, N), dtype=torch.float32)


@gpu_only
def test_mixed_dtypes_and_value_blocks(seed):
    """bf16 inputs with float32 log_w (as the layer calls it), split into value blocks."""
    run_and_compare(
        make_inputs(2, 100, 3, 64), dtype=torch.bfloat16, logw_dtype=torch.float32,
        block_v=32, bwd_block_v=32, scan_block_v=16,
    )


@gpu_only
@pytest.mark.parametrize("precision, tol", [("tf32", 6e-3), ("tf32x3", 1e-4)])
def test_tensor_core_precisions_fp32(seed, precision, tol):
    run_and_compare(make_inputs(2, 200, 2, 64), dtype=torch.float32, precision=precision, tol=tol)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_defaults_partial_chunk(seed, dtype):
    """The default settings, a partial chunk, float32 log_w; packed, with an empty sequence last."""
    run_and_compare(make_inputs(2, 100, 3, 64), dtype=dtype, logw_dtype=torch.float32)
    varlen_case([100, 1, 0, 64, 300, 0], 3, 64, dtype=dtype, rtol=1e-5)


@gpu_only
def test_varlen_gpu(seed):
    varlen_case([100, 1, 0, 64, 300], 3, 64, dtype=torch.bfloat16, rtol=1e-5)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shape_vs_chunked(seed, dtype):
    """B=2, T=4096, H=4, N=64 against the float32 PyTorch chunked form (autograd) on the same
    (rounded) inputs: outputs, final state and all gradients."""
    compare_with_chunked(wkv7_triton, wkv7_chunked, NAMES, make_inputs(2, 4096, 4, 64), [dtype] * 6)


@gpu_only
def test_dispatcher_uses_kernels(seed):
    """ops.wkv7 on CUDA: the chunked kernels with gradients, the decoding kernel without, and
    the in-place step; all against the float64 reference."""
    from rwkvkit import ops

    *inp, s0 = make_inputs(1, 5, 2, 64)
    y_ref, s_ref = wkv7_reference(*[t.double() for t in inp], s0.double())
    inp = [t.cuda() for t in inp]
    s = s0.cuda()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y, s1 = ops.wkv7(*[t.requires_grad_(grad) for t in inp], s)
        assert rel_err(y, y_ref) < 1e-5 and rel_err(s1, s_ref) < 1e-5
    state = s.clone()
    for t in range(5):
        y_t = ops.wkv7_(*[x[:, t].detach() for x in inp], state)
        assert rel_err(y_t, y_ref[:, t]) < 1e-5
    assert rel_err(state, s_ref) < 1e-5


@triton.jit
def _dot_bf16x2_probe(x_ptr, y_ptr, o_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    offs_m = tl.arange(0, M)
    offs_k = tl.arange(0, K)
    offs_n = tl.arange(0, N)
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :])
    y = tl.load(y_ptr + offs_k[:, None] * N + offs_n[None, :])
    tl.store(o_ptr + offs_m[:, None] * N + offs_n[None, :], kernels._dot_bf16x2(x, y))


@gpu_only
def test_dot_bf16x2_keeps_16_bits(seed):
    """The backward's split products (float32 x as two bfloat16 parts times bfloat16 y) against
    float64: about 2^-16 relative, where x as one bfloat16 (2^-9) or tf32 (2^-11) would fail."""
    x = torch.randn(16, 64, device="cuda")
    y = torch.randn(64, 64, device="cuda").bfloat16()
    out = torch.empty(16, 64, device="cuda")
    _dot_bf16x2_probe[(1,)](x, y, out, M=16, K=64, N=64)
    ref = x.double() @ y.double()
    assert rel_err(out, ref) < 5e-5
    assert rel_err(x.bfloat16().double() @ y.double(), ref) > 5e-4  # (what one part would give)
