"""WKV-7: the chunked-parallel form against the float64 step-by-step reference."""

import math

import pytest
import torch

from conftest import rel_err
from rwkvkit.ops import wkv7, wkv7_, wkv7_chunked, wkv7_reference, wkv7_step


def wkv7_inputs(B, T, H, N, *, decay="realistic", dtype=torch.float32, gen=None):
    """Inputs as an RWKV-7 layer makes them: kk unit-norm per head, a in (0, 1)."""
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if decay == "realistic":
        z = randn(B, T, H, N) * 2.0 - 1.0
    elif decay == "near_one":  # sigmoid(z) ~ 0: decay ~ 1, the long-memory end
        z = randn(B, T, H, N) - 12.0
    elif decay == "clamp":  # sigmoid(z) ~ 1: decay at its lower bound exp(-e^-0.5)
        z = randn(B, T, H, N) + 12.0
    else:
        raise ValueError(decay)
    log_w = -math.exp(-0.5) * torch.sigmoid(z)
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    a_icl = torch.sigmoid(randn(B, T, H, N))
    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    k = k * (1 + (a_icl - 1) * 0.5)
    state = randn(B, H, N, N)
    return [x.to(dtype) for x in (r, log_w, k, v, -kk, kk * a_icl, state)]


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 100])
@pytest.mark.parametrize("chunk_size", [8, 16, 32])
@pytest.mark.parametrize("scan", ["state", "matrices"])
def test_chunked_matches_reference(seed, T, chunk_size, scan):
    *x, s0 = wkv7_inputs(2, T, 2, 32)
    y_ref, s_ref = wkv7_reference(*x, s0)
    y, s = wkv7_chunked(*x, s0, chunk_size=chunk_size, scan=scan)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5, f"seed {seed}"
    assert rel_err(s, s_ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("decay", ["realistic", "near_one", "clamp"])
def test_chunked_long_sequence(seed, decay):
    """T = 4096 with head size 64: float32 chunked form within 1e-5 of float64."""
    *x, s0 = wkv7_inputs(1, 4096, 1, 64, decay=decay)
    y_ref, s_ref = wkv7_reference(*x, s0)
    y, s = wkv7_chunked(*x, s0)
    assert rel_err(y, y_ref) < 1e-5, f"seed {seed}"
    assert rel_err(s, s_ref) < 1e-5, f"seed {seed}"


def test_chunked_zero_initial_state(seed):
    *x, _ = wkv7_inputs(1, 40, 2, 16)
    y_ref, s_ref = wkv7_reference(*x, None)
    y, s = wkv7_chunked(*x, None)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_float64_inputs_compute_in_float64(seed):
    *x, s0 = wkv7_inputs(1, 50, 2, 16, dtype=torch.float64)
    y_ref, s_ref = wkv7_reference(*x, s0)
    y, s = wkv7_chunked(*x, s0)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_dispatcher_step_and_chunked_agree(seed):
    *x, s0 = wkv7_inputs(3, 9, 2, 16)
    y_all, s_all = wkv7(*x, s0)
    s, ys = s0, []
    for t in range(9):
        y, s = wkv7(*(z[:, t : t + 1] for z in x), s)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_all) < 1e-5 and rel_err(s, s_all) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_inplace_step_matches_reference(seed, dtype, tol):
    """The in-place decoding step (``wkv7_``, on the CPU ``inplace.wkv7_step_``) against the
    float64 reference step, token after token, with the state updated where it lies."""
    *x, s0 = wkv7_inputs(2, 12, 3, 16, dtype=dtype)
    ref = s0.double()
    live = s0.clone()
    ptr = live.data_ptr()
    for t in range(12):
        y_ref, ref = wkv7_step(*(z[:, t].double() for z in x), ref)
        y = wkv7_(*(z[:, t] for z in x), live)
        assert y.dtype == dtype and live.data_ptr() == ptr
        assert rel_err(y, y_ref) < tol, f"token {t}, seed {seed}"
    assert rel_err(live, ref) < tol, f"seed {seed}"


def test_state_not_modified(seed):
    *x, s0 = wkv7_inputs(1, 20, 1, 16)
    before = s0.clone()
    wkv7(*x, s0)
    wkv7(*(z[:, :1] for z in x), s0)
    assert torch.equal(s0, before)


@pytest.mark.parametrize("scan", ["state", "matrices"])
def test_gradients_match_reference(seed, scan):
    """Autograd through the chunked form equals autograd through the step loop (float64),
    for every input and the initial state."""
    x = [t.double().requires_grad_() for t in wkv7_inputs(1, 37, 2, 8)]
    gy = torch.randn(1, 37, 2, 8, dtype=torch.float64)
    gs = torch.randn(1, 2, 8, 8, dtype=torch.float64)

    def grads(fn):
        y, s = fn(*x)
        loss = (y * gy).sum() + (s * gs).sum()
        return torch.autograd.grad(loss, x)

    ref = grads(lambda *a: wkv7_reference(*a))
    got = grads(lambda *a: wkv7_chunked(*a, chunk_size=16, scan=scan))
    names = ["r", "log_w", "k", "v", "a", "b", "state"]
    for name, g, g_ref in zip(names, got, ref):
        assert rel_err(g, g_ref) < 1e-10, f"grad {name}, seed {seed}"


def test_float32_gradients_close_to_float64(seed):
    x32 = [t.requires_grad_() for t in wkv7_inputs(1, 200, 1, 32)]
    x64 = [t.detach().double().requires_grad_() for t in x32]
    gy = torch.randn(1, 200, 1, 32)
    y32, _ = wkv7_chunked(*x32)
    y64, _ = wkv7_reference(*x64)
    g32 = torch.autograd.grad((y32 * gy).sum(), x32)
    g64 = torch.autograd.grad((y64 * gy.double()).sum(), x64)
    for g, g_ref in zip(g32, g64):
        assert rel_err(g, g_ref) < 1e-4, f"seed {seed}"


def test_chunked_no_tokens_returns_a_new_state():
    """T = 0 (both chunked forms): the final state equals the initial one without being it."""
    from rwkvkit.ops import wkv6_chunked

    x = [torch.zeros(1, 0, 2, 8) for _ in range(6)]
    s0 = torch.randn(1, 2, 8, 8)
    for y, s in (wkv7_chunked(*x, s0), wkv6_chunked(*x[:4], torch.zeros(2, 8), s0)):
        assert y.shape == (1, 0, 2, 8) and torch.equal(s, s0) and s.data_ptr() != s0.data_ptr()


def test_dispatchers_name_bad_shapes():
    """wkv7 and wkv6 check what they are given: one [B, T, H, N] shape for the inputs, a
    floating-point [B, H, N, N] state (no broadcasting of a batch-1 state), u [H, N]."""
    from rwkvkit.errors import InputError
    from rwkvkit.ops import wkv6

    *x, s0 = wkv7_inputs(2, 5, 2, 16)
    with pytest.raises(InputError, match=r"wkv7: r, log_w, k, v, a, b must share one \[B, T, H, N\] shape"):
        wkv7(x[0], x[1], x[2][:, :3], *x[3:], s0)
    for state in (s0[:1], s0[0], s0.long()):
        with pytest.raises(InputError, match=r"wkv7: state must be a floating-point \[2, 2, 16, 16\] tensor"):
            wkv7(*x, state)
    r, lw, k, v = x[:4]
    with pytest.raises(InputError, match=r"wkv6: u must be \[2, 16\], got \[2, 17\]"):
        wkv6(r, lw, k, v, torch.zeros(2, 17), s0)
    with pytest.raises(InputError, match=r"wkv6: state must be"):
        wkv6(r, lw, k, v, torch.zeros(2, 16), s0[:, :1])
