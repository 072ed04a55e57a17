"""WKV-7 Triton kernels: outputs, final state and every gradient against the float64 step
reference (and the float32 chunked form at a large shape).

Runs on CUDA. Without CUDA or without triton the module skips, except that with
RWKVKIT_TRITON_INTERPRET=1 a small set runs on CPU under the Triton interpreter (tiny shapes:
the interpreter is slow).
"""

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("RWKVKIT_TRITON_INTERPRET") == "1"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernels are defined

pytest.importorskip("triton")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA (or RWKVKIT_TRITON_INTERPRET=1 for the interpreter subset)", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from test_ops import wkv7_inputs  # noqa: E402

from rwkvkit.ops import wkv7_chunked, wkv7_reference  # noqa: E402
from rwkvkit.ops.triton import wkv7 as kernels  # noqa: E402
from rwkvkit.ops.triton import wkv7_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
gpu_only = pytest.mark.skipif(INTERPRET, reason="GPU only (too slow under the interpreter)")
NAMES = ["r", "log_w", "k", "v", "a", "b", "state"]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


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


def run_and_compare(x, *, dtype, logw_dtype=None, with_state=True, tol=None, **kw):
    """Run the kernel (forward + backward with random output gradients) on ``x`` rounded to
    ``dtype`` and compare y, the final state and all gradients with float64 autograd through
    the step reference on the same rounded inputs."""
    *inp, s0 = x
    dtypes = [dtype] * 6
    if logw_dtype is not None:
        dtypes[1] = logw_dtype
    ours = [t.to(DEVICE, dt).requires_grad_() for t, dt in zip(inp, dtypes)]
    if with_state:
        ours.append(s0.to(DEVICE).requires_grad_())
    y, s = wkv7_triton(*ours, **kw)
    assert y.dtype == kw.get("out_dtype", dtype) and s.dtype == torch.float32
    gy, gs = torch.randn(y.shape), torch.randn(s.shape)
    got = torch.autograd.grad((y.float() * gy.to(DEVICE)).sum() + (s * gs.to(DEVICE)).sum(), ours)

    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours]
    y_ref, s_ref = wkv7_reference(*ref_in)
    ref = torch.autograd.grad((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum(), ref_in)

    tol = tol or TOL[dtype]
    errors = {"y": rel_err(y, y_ref), "final state": rel_err(s, s_ref)}
    for name, g, g_ref, t in zip(NAMES, got, ref, ours):
        assert g.dtype == t.dtype, f"grad {name} has dtype {g.dtype}, input {t.dtype}"
        errors["d" + name] = rel_err(g, g_ref)
    for name, out in [("y", y), ("final state", s)] + list(zip(NAMES, got)):
        assert torch.isfinite(out).all(), f"{name} has NaN/inf"
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errors})"
    return errors


# --- interpreter-sized tests (also run on GPU) ----------------------------------------------


@pytest.mark.parametrize("T", [1, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bwd_mode", ["fused", "split"])
def test_small_matches_reference(seed, T, dtype, bwd_mode):
    run_and_compare(make_inputs(1, T, 2, 16), dtype=dtype, chunk_size=16, bwd_mode=bwd_mode)


def test_small_chunk32_value_blocks_no_state(seed):
    """Two value blocks (N=32, block_v=16), chunk 32 > T, no initial state."""
    run_and_compare(make_inputs(1, 23, 1, 32), dtype=torch.float32, chunk_size=32, block_v=16, with_state=False)


@pytest.mark.parametrize("decay", ["tiny", "at_clamp"])
def test_small_decay_extremes(seed, decay):
    run_and_compare(make_inputs(1, 33, 1, 16, decay=decay), dtype=torch.float32, chunk_size=16)


def test_small_mixed_dtypes(seed):
    """As the RWKV-7 layer calls it: bf16 r/k/v/a/b, float32 log_w, float32 state."""
    run_and_compare(make_inputs(2, 20, 1, 16), dtype=torch.bfloat16, logw_dtype=torch.float32, chunk_size=16)


def test_every_output_element_written(seed, monkeypatch):
    """Outputs and gradient buffers start as NaN: the kernels must overwrite every element."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned)
    run_and_compare(make_inputs(2, 19, 1, 32), dtype=torch.float32, chunk_size=16, block_v=16)
    run_and_compare(make_inputs(1, 21, 2, 16), dtype=torch.bfloat16, chunk_size=16)
    run_and_compare(make_inputs(1, 35, 1, 32), dtype=torch.float32, chunk_size=16, block_v=16, bwd_mode="split")


def test_only_one_output_used(seed):
    """Backward with only y or only the final state in the loss (the other gradient is None)."""
    *inp, s0 = make_inputs(1, 18, 1, 16)
    ours = [t.to(DEVICE).requires_grad_() for t in inp + [s0]]
    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours]
    for pick in (0, 1):
        out = wkv7_triton(*ours, chunk_size=16)[pick]
        out_ref = wkv7_reference(*ref_in)[pick]
        got = torch.autograd.grad(out.sum(), ours)
        ref = torch.autograd.grad(out_ref.sum(), ref_in, allow_unused=True, materialize_grads=True)
        for name, g, g_ref in zip(NAMES, got, ref):
            if name == "r" and pick == 1:  # the final state does not depend on r
                assert not g.any(), f"grad r should be zero, seed {seed}"
                continue
            assert rel_err(g, g_ref) < 1e-4, f"output {pick}, grad {name}, seed {seed}"


def test_state_not_modified_and_out_dtype(seed):
    *inp, s0 = make_inputs(1, 20, 1, 16)
    inp = [t.to(DEVICE) for t in inp]
    s0 = s0.to(DEVICE)
    before = s0.clone()
    wkv7_triton(*inp, s0, chunk_size=16)
    assert torch.equal(s0, before)
    y16, _ = wkv7_triton(*(t.bfloat16() for t in inp), s0, chunk_size=16, out_dtype=torch.float32)
    assert y16.dtype == torch.float32


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


# --- GPU tests ------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("T", [1, 15, 16, 33, 100, 256])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(seed, T, chunk_size, dtype):
    run_and_compare(make_inputs(2, T, 3, 64), dtype=dtype, chunk_size=chunk_size)


@gpu_only
@pytest.mark.parametrize("T", [15, 256])
def test_float16(seed, T):
    run_and_compare(make_inputs(2, T, 3, 64), dtype=torch.float16, chunk_size=32)


@gpu_only
@pytest.mark.parametrize("T", [17, 256])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_backward(seed, T, chunk_size, dtype):
    run_and_compare(make_inputs(2, T, 3, 64), dtype=dtype, chunk_size=chunk_size, bwd_mode="split")


@gpu_only
@pytest.mark.parametrize("decay", ["near_one", "tiny", "clamp", "at_clamp"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bwd_mode", ["fused", "split"])
def test_decay_extremes(seed, decay, chunk_size, dtype, bwd_mode):
    run_and_compare(make_inputs(2, 256, 2, 64, decay=decay), dtype=dtype, chunk_size=chunk_size, bwd_mode=bwd_mode)


@gpu_only
@pytest.mark.parametrize("N", [16, 32, 128])
def test_head_sizes(seed, N):
    run_and_compare(make_inputs(2, 77, 2, N), dtype=torch.float32, chunk_size=32)


@gpu_only
@pytest.mark.parametrize("block_v", [16, 32, 64])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_tuning_knobs(seed, block_v, num_warps):
    run_and_compare(
        make_inputs(2, 100, 3, 64), dtype=torch.bfloat16, logw_dtype=torch.float32, chunk_size=32,
        block_v=block_v, num_warps=num_warps, bwd_block_v={16: 64, 32: 32, 64: 16}[block_v], bwd_num_warps=num_warps,
    )


@gpu_only
@pytest.mark.parametrize("precision, tol", [("tf32", 3e-3), ("tf32x3", 1e-4)])
def test_tensor_core_precisions_fp32(seed, precision, tol):
    run_and_compare(make_inputs(2, 200, 2, 64), dtype=torch.float32, precision=precision, tol=tol)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shape_vs_chunked(seed, dtype):
    """B=2, T=4096, H=4, N=64 against the float32 PyTorch chunked form (autograd) on the same
    (rounded) inputs: outputs, final state and all gradients."""
    x = [t.cuda() for t in make_inputs(2, 4096, 4, 64)]
    *inp, s0 = x
    ours = [t.to(dtype).requires_grad_() for t in inp] + [s0.clone().requires_grad_()]
    ref_in = [t.detach().float().requires_grad_() for t in ours]
    y, s = wkv7_triton(*ours)
    y_ref, s_ref = wkv7_chunked(*ref_in)
    gy, gs = torch.randn_like(y_ref), torch.randn_like(s_ref)
    got = torch.autograd.grad((y.float() * gy).sum() + (s * gs).sum(), ours)
    ref = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), ref_in)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol, f"seed {seed}"
    for name, g, g_ref in zip(NAMES, got, ref):
        assert torch.isfinite(g).all(), f"grad {name} not finite, seed {seed}"
        assert rel_err(g, g_ref) < tol, f"grad {name}: {rel_err(g, g_ref):.2e}, seed {seed}"
