"""WKV-6 (RWKV-5.2 / RWKV-6): the chunked-parallel form against the float64 step-by-step
reference, with decays anywhere from ~1 to ~0."""

import pytest
import torch

from conftest import rel_err
from rwkvkit.ops import wkv6, wkv6_chunked, wkv6_reference, wkv6_step

DECAYS = ["realistic", "near_zero", "near_one", "mixed"]


def wkv6_inputs(B, T, H, N, *, decay="realistic", dtype=torch.float32, gen=None):
    """Inputs as an RWKV-6 layer makes them: log w = -exp(time_decay + lora)."""
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    if decay == "realistic":  # time_decay in [-6, -1] (the init's range) plus a LoRA term
        log_w = -torch.exp(-6 + 5 * rand(B, T, H, N) + 0.5 * randn(B, T, H, N))
    elif decay == "near_zero":  # decays ~e^-20 .. e^-150, and some e^-1e4 (0 even in float64)
        log_w = -(20 + 130 * rand(B, T, H, N))
        log_w = torch.where(rand(B, T, H, N) < 0.05, torch.full_like(log_w, -1e4), log_w)
    elif decay == "near_one":  # log w ~ -1e-6: the long-memory end
        log_w = -torch.exp(randn(B, T, H, N) * 0.5 - 14)
    elif decay == "mixed":  # realistic, with sporadic huge decays in the same channels:
        # differences of chunk-wide cumulative sums lose the small log-decays after a huge one
        log_w = -torch.exp(randn(B, T, H, N) * 2 - 4)
        log_w = torch.where(rand(B, T, H, N) < 0.05, torch.full_like(log_w, -1e4), log_w)
    else:
        raise ValueError(decay)
    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    u = randn(H, N) * 0.5
    state = randn(B, H, N, N)
    return [x.to(dtype) for x in (r, log_w, k, v, u, state)]


def test_reference_matches_the_spec_layout(seed):
    """The spec's form, S in [key, value]: y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}),
    S_t = diag(w_t) S_{t-1} + k_t v_t^T. Our state is its transpose."""
    x = [t.double() for t in wkv6_inputs(2, 11, 3, 8)]
    r, log_w, k, v, u, s0 = x
    S = s0.transpose(-1, -2)  # [B, H, key, value]
    ys = []
    for t in range(11):
        rt, kt, vt, wt = r[:, t], k[:, t], v[:, t], log_w[:, t].exp()
        kv = kt.unsqueeze(-1) * vt.unsqueeze(-2)
        ys.append(torch.einsum("bhk,bhkv->bhv", rt, u.unsqueeze(-1) * kv + S))
        S = wt.unsqueeze(-1) * S + kv
    y_ref, s_ref = wkv6_reference(*x)
    assert rel_err(y_ref, torch.stack(ys, 1)) < 1e-14, f"seed {seed}"
    assert rel_err(s_ref, S.transpose(-1, -2)) < 1e-14, f"seed {seed}"


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 100])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 32, 64])
def test_chunked_matches_reference(seed, T, chunk_size):
    *x, s0 = wkv6_inputs(2, T, 2, 32)
    y_ref, s_ref = wkv6_reference(*x, s0)
    y, s = wkv6_chunked(*x, s0, chunk_size=chunk_size)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5, f"seed {seed}"
    assert rel_err(s, s_ref) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_long_sequence(seed, decay):
    """T = 4096 with head size 64: float32 chunked form within 1e-5 of float64, all finite."""
    *x, s0 = wkv6_inputs(1, 4096, 1, 64, decay=decay)
    y_ref, s_ref = wkv6_reference(*x, s0)
    y, s = wkv6_chunked(*x, s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all(), f"seed {seed}"
    assert rel_err(y, y_ref) < 1e-5, f"seed {seed}"
    assert rel_err(s, s_ref) < 1e-5, f"seed {seed}"


def test_chunk_size_must_be_a_power_of_two():
    x = wkv6_inputs(1, 8, 1, 4)
    for bad in (0, 3, 24):
        with pytest.raises(ValueError):
            wkv6_chunked(*x, chunk_size=bad)


def test_chunked_zero_initial_state(seed):
    *x, _ = wkv6_inputs(1, 40, 2, 16)
    y_ref, s_ref = wkv6_reference(*x, None)
    y, s = wkv6_chunked(*x, None)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_float64_inputs_compute_in_float64(seed):
    *x, s0 = wkv6_inputs(1, 50, 2, 16, dtype=torch.float64)
    y_ref, s_ref = wkv6_reference(*x, s0)
    y, s = wkv6_chunked(*x, s0)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_dispatcher_step_and_chunked_agree(seed):
    *x, s0 = wkv6_inputs(3, 9, 2, 16)
    y_all, s_all = wkv6(*x, s0)
    s, ys = s0, []
    for t in range(9):
        y, s = wkv6(*(z[:, t : t + 1] for z in x[:4]), x[4], s)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_all) < 1e-5 and rel_err(s, s_all) < 1e-5


def test_static_decay_broadcast_over_time(seed):
    """RWKV-5.2: one decay per channel, passed as an expanded (stride-0) view."""
    r, log_w, k, v, u, s0 = wkv6_inputs(2, 21, 2, 16)
    log_w = log_w[:1, :1].expand(2, 21, 2, 16)
    y_ref, s_ref = wkv6_reference(r, log_w.contiguous(), k, v, u, s0)
    y, s = wkv6(r, log_w, k, v, u, s0)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_state_not_modified(seed):
    *x, s0 = wkv6_inputs(1, 20, 1, 16)
    before = s0.clone()
    wkv6(*x, s0)
    wkv6(*(z[:, :1] for z in x[:4]), x[4], s0)
    wkv6_step(*(z[:, 0] for z in x[:4]), x[4], s0)
    assert torch.equal(s0, before)


@pytest.mark.parametrize("decay", DECAYS)
def test_gradients_match_reference(seed, decay):
    """Autograd through the chunked form equals autograd through the step loop (float64),
    for every input and the initial state; no NaN even where decays underflow to 0."""
    x = [t.double().requires_grad_() for t in wkv6_inputs(1, 37, 2, 8, decay=decay)]
    gy = torch.randn(1, 37, 2, 8, dtype=torch.float64)
    gs = torch.randn(1, 2, 8, 8, dtype=torch.float64)

    def grads(fn):
        y, s = fn(*x)
        loss = (y * gy).sum() + (s * gs).sum()
        return torch.autograd.grad(loss, x)

    ref = grads(lambda *a: wkv6_reference(*a))
    names = ["r", "log_w", "k", "v", "u", "state"]
    for chunk_size in (4, 16):
        got = grads(lambda *a: wkv6_chunked(*a, chunk_size=chunk_size))
        for name, g, g_ref in zip(names, got, ref):
            assert torch.isfinite(g).all(), f"grad {name} not finite, chunk {chunk_size}, seed {seed}"
            assert rel_err(g, g_ref) < 1e-10, f"grad {name}, chunk {chunk_size}, seed {seed}"


@pytest.mark.parametrize("decay", DECAYS)
def test_float32_gradients_close_to_float64(seed, decay):
    x32 = [t.requires_grad_() for t in wkv6_inputs(1, 200, 1, 32, decay=decay)]
    x64 = [t.detach().double().requires_grad_() for t in x32]
    gy = torch.randn(1, 200, 1, 32)
    gs = torch.randn(1, 1, 32, 32)
    y32, s32 = wkv6_chunked(*x32)
    y64, s64 = wkv6_reference(*x64)
    g32 = torch.autograd.grad((y32 * gy).sum() + (s32 * gs).sum(), x32)
    g64 = torch.autograd.grad((y64 * gy.double()).sum() + (s64 * gs.double()).sum(), x64)
    for name, g, g_ref in zip(["r", "log_w", "k", "v", "u", "state"], g32, g64):
        assert torch.isfinite(g).all(), f"grad {name} not finite, seed {seed}"
        assert rel_err(g, g_ref) < 1e-4, f"grad {name}, seed {seed}"
