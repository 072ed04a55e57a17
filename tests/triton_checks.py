"""What the Triton WKV tests (test_triton_wkv7.py, test_triton_wkv6.py) share: where the
kernels run, the skips, and the checks of a kernel's outputs and gradients against a reference.

Import this before anything that defines the kernels (rwkvkit.ops.triton): importing it skips
the importing test module unless triton is installed and either CUDA is available or
RWKVKIT_TRITON_INTERPRET=1 asks for the interpreter subset. Then the kernels run on the CPU
under the Triton interpreter (tiny shapes: it is slow), and the tests marked ``gpu_only`` skip.
"""

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

DEVICE = "cpu" if INTERPRET else "cuda"
gpu_only = pytest.mark.skipif(INTERPRET, reason="GPU only (too slow under the interpreter)")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def compare_with_reference(kernel, reference, names, x, dtypes, *, with_state=True, tol=None, **kw):
    """Run ``kernel`` (forward + backward with random output gradients) on the float32 CPU
    inputs ``x`` (the initial state last) rounded to ``dtypes`` (one per input but the state,
    which stays float32) and compare y, the final state and all gradients with float64
    autograd through ``reference`` on the same rounded inputs. ``names``: the inputs' names,
    the state's last; ``kw`` goes to the kernel; ``tol`` defaults to TOL of the first dtype.
    Returns the relative errors."""
    *inp, s0 = x
    ours = [t.to(DEVICE, dt).requires_grad_() for t, dt in zip(inp, dtypes)]
    if with_state:
        ours.append(s0.to(DEVICE).requires_grad_())
    y, s = kernel(*ours, **kw)
    assert y.dtype == kw.get("out_dtype", dtypes[0]) and s.dtype == torch.float32
    # The output gradient reaches the kernel in y's dtype: give the reference that same
    # rounded gradient (a bf16-rounded dy against an exact one, e.g. in du = sum r k (dy . v)
    # over a single token, measured up to 1e-2 apart: the test's rounding, not the kernel's).
    gy, gs = torch.randn(y.shape).to(y.dtype).float(), torch.randn(s.shape)
    got = torch.autograd.grad((y.float() * gy.to(DEVICE)).sum() + (s * gs.to(DEVICE)).sum(), ours)

    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours]
    y_ref, s_ref = reference(*ref_in)
    ref = torch.autograd.grad((y_ref * gy.double()).sum() + (s_ref * gs.double()).sum(), ref_in)

    tol = tol or TOL[dtypes[0]]
    errors = {"y": rel_err(y, y_ref), "final state": rel_err(s, s_ref)}
    for name, g, g_ref, t in zip(names, got, ref, ours):
        assert g.dtype == t.dtype, f"grad {name} has dtype {g.dtype}, input {t.dtype}"
        errors["d" + name] = rel_err(g, g_ref)
    for name, out in [("y", y), ("final state", s)] + list(zip(names, got)):
        assert torch.isfinite(out).all(), f"{name} has NaN/inf"
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errors})"
    return errors


def compare_one_output_used(kernel, reference, names, x, *, not_in_state, **kw):
    """Backward with only y or only the final state in the loss (the other gradient is None),
    against the float64 reference; the gradients of the inputs named in ``not_in_state`` (the
    final state does not depend on them) must be zero when only the state is used."""
    ours = [t.to(DEVICE).requires_grad_() for t in x]
    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours]
    for pick in (0, 1):
        out = kernel(*ours, **kw)[pick]
        out_ref = reference(*ref_in)[pick]
        got = torch.autograd.grad(out.sum(), ours)
        ref = torch.autograd.grad(out_ref.sum(), ref_in, allow_unused=True, materialize_grads=True)
        for name, g, g_ref in zip(names, got, ref):
            if name in not_in_state and pick == 1:
                assert not g.any(), f"grad {name} should be zero"
                continue
            assert rel_err(g, g_ref) < 1e-4, f"output {pick}, grad {name}"


def compare_with_chunked(kernel, chunked, names, x, dtypes):
    """On CUDA, ``kernel`` against the float32 PyTorch chunked form (autograd) on the same
    inputs ``x`` rounded to ``dtypes`` (the state stays float32): outputs, final state and all
    gradients, within TOL of the first dtype."""
    *inp, s0 = [t.cuda() for t in x]
    ours = [t.to(dt).requires_grad_() for t, dt in zip(inp, dtypes)] + [s0.clone().requires_grad_()]
    ref_in = [t.detach().float().requires_grad_() for t in ours]
    y, s = kernel(*ours)
    y_ref, s_ref = chunked(*ref_in)
    gy, gs = torch.randn_like(y_ref), torch.randn_like(s_ref)
    got = torch.autograd.grad((y.float() * gy).sum() + (s * gs).sum(), ours)
    ref = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), ref_in)
    tol = TOL[dtypes[0]]
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol
    for name, g, g_ref in zip(names, got, ref):
        assert torch.isfinite(g).all(), f"grad {name} not finite"
        assert rel_err(g, g_ref) < tol, f"grad {name}: {rel_err(g, g_ref):.2e}"


def assert_segments_change_nothing(kernel, names, x, n_segments, *, cu_seqlens=None, **kw):
    """Outputs, final state and every gradient of ``kernel(*x)`` (float32 CPU inputs, the
    initial state last) with the scans in ``n_segments`` segments equal those of one segment,
    bit for bit."""
    outs = []
    for n in (1, n_segments):
        inp = [t.to(DEVICE).requires_grad_() for t in x]
        y, s = kernel(*inp, cu_seqlens=cu_seqlens, scan_segments=n, **kw)
        gen = torch.Generator().manual_seed(1)
        gy, gs = (torch.randn(t.shape, generator=gen).to(DEVICE) for t in (y, s))
        outs.append((y, s, *torch.autograd.grad((y * gy).sum() + (s * gs).sum(), inp)))
    for name, a, b in zip(["y", "final state"] + [f"d{n}" for n in names], *outs):
        assert torch.equal(a, b), f"{name} differs with {n_segments} segments ({kw})"


def watch_memory_accesses(monkeypatch, seed) -> None:
    """Under the interpreter, from now until the test ends: every load and store that a mask
    lets through must stay inside one of the launch's tensor arguments (on the GPU an access
    outside them is an illegal address or silent garbage); otherwise an AssertionError."""
    import numpy as np
    from triton.runtime import interpreter

    ranges = []
    real_init, real = interpreter.GridExecutor._init_args_hst, interpreter._interpreter

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = real_init(self, args_dev, kwargs)
        ranges.clear()
        for a in list(args_hst) + list(kwargs_hst.values()):
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        return args_hst, kwargs_hst

    def check(ptrs, mask, itemsize):
        p = np.broadcast_to(ptrs, np.shape(mask))[np.asarray(mask, dtype=bool)].astype(np.int64)
        ok = np.zeros(p.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (p >= lo) & (p + itemsize <= hi)
        assert ok.all(), f"{int((~ok).sum())} accesses outside the kernel's tensors, seed {seed}"

    class Checked:
        def load(self, ptrs, mask, other, dtype):
            check(ptrs, mask, np.dtype(dtype).itemsize)
            return real.load(ptrs, mask, other, dtype)

        def store(self, ptrs, value, mask):
            check(ptrs, mask, value.dtype.itemsize)
            return real.store(ptrs, value, mask)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", init_args)
    monkeypatch.setattr(interpreter, "_interpreter", Checked())


def assert_decoding_unchanged_by(monkeypatch, env: str, arch: str, n_layer: int) -> None:
    """A small float32 ``arch`` model decoding 6 tokens (model.step_, batch 2) gives the same
    logits and final WKV state with the environment switch ``env`` at "0" and at "1"."""
    from rwkvkit.config import ModelConfig
    from rwkvkit.models import model_class

    model = model_class(arch)(ModelConfig(arch=arch, n_layer=n_layer, n_embd=128, vocab_size=300, head_size=64))
    model = model.to(DEVICE).eval()
    tokens = torch.randint(0, 300, (6, 2), device=DEVICE)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv(env, flag)
        state = model.init_state(2)
        runs.append(([model.step_(t, state).clone() for t in tokens], state))
    (l0, s0), (l1, s1) = runs
    assert rel_err(torch.stack(l1), torch.stack(l0)) < 1e-5
    assert rel_err(s1.wkv, s0.wkv) < 1e-5


def poison_buffers(monkeypatch, kernels) -> None:
    """Make the kernels module's outputs and gradient buffers start as NaN (they are allocated
    by its ``_empty``), so that a test sees any element a kernel fails to write."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned)
