"""The WKV-6 decoding kernel (``ops.triton.wkv6.wkv6_recurrent``): outputs and final state against
the float64 step reference, a new state or the given one updated in place, RWKV-5.2's
stride-0 decay, and ``ops.wkv6`` taking it for a few tokens without gradients (the default;
RWKVKIT_WKV6_RECURRENT=0 turns it off).

Runs on CUDA, or on the CPU under the Triton interpreter with RWKVKIT_TRITON_INTERPRET=1
(tests/triton_checks.py); skips otherwise.
"""

import pytest
import torch
from triton_checks import DEVICE, assert_decoding_unchanged_by, gpu_only  # before the kernels: sets up the interpreter, or skips

from conftest import rel_err
from test_ops_wkv6 import wkv6_inputs

from rwkvkit import ops
from rwkvkit.ops import wkv6_reference
from rwkvkit.ops.triton.wkv6 import wkv6_recurrent


def test_package_entry_points_stay_functions():
    """The dispatcher calls ``ops.triton.wkv6_recurrent`` & co. once the kernel modules are
    imported: no submodule may share a name with them (a ``wkv6_recurrent.py`` did, and the
    package attribute became that module: the first GPU run's dispatcher failures)."""
    import importlib
    import pkgutil

    from rwkvkit.ops import triton as triton_ops

    for module in pkgutil.iter_modules(triton_ops.__path__):
        importlib.import_module(f"rwkvkit.ops.triton.{module.name}")
    for name in triton_ops.__all__:
        assert callable(getattr(triton_ops, name)) and not isinstance(getattr(triton_ops, name), type(triton_ops)), name


@pytest.mark.parametrize("T", [1, 5, 16])
@pytest.mark.parametrize("decay", ["realistic", "mixed"])
def test_matches_reference(seed, T, decay):
    """float32 inputs: a new state (the given one untouched); bf16 inputs with a float32
    output, the state updated in place."""
    r, log_w, k, v, u, s0 = wkv6_inputs(2, T, 2, 32, decay=decay)
    y_ref, s_ref = wkv6_reference(*[t.double() for t in (r, log_w, k, v, u, s0)])
    inp = [t.to(DEVICE) for t in (r, log_w, k, v, u)]
    state = s0.clone().to(DEVICE)
    y, s = wkv6_recurrent(*inp, state)
    assert s is not state and torch.equal(state, s0.to(DEVICE)) and y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5

    rounded = [t.bfloat16() for t in inp[:4]] + [inp[4]]  # u stays float32, as the models keep it
    y_bf, s_bf = wkv6_reference(*[t.double() for t in rounded], s0.double().to(DEVICE))
    y2, s2 = wkv6_recurrent(*rounded, state, inplace=True, out_dtype=torch.float32)
    assert s2 is state and y2.dtype == torch.float32
    assert rel_err(y2, y_bf) < 1e-5 and rel_err(state, s_bf) < 1e-5


def test_no_state_and_strided_decay(seed):
    """No initial state (zeros); RWKV-5.2's per-head decay as a stride-0 view over B and T."""
    B, T, H, N = 2, 7, 3, 16
    r, _, k, v, u, _ = wkv6_inputs(B, T, H, N)
    decay = -torch.rand(1, 1, H, N) * 3 - 0.01
    expanded = decay.expand(B, T, H, N)
    zeros = torch.zeros(B, H, N, N)
    y_ref, s_ref = wkv6_reference(*[t.double() for t in (r, expanded, k, v, u, zeros)])
    y, s = wkv6_recurrent(r.to(DEVICE), decay.to(DEVICE).expand(B, T, H, N), k.to(DEVICE), v.to(DEVICE),
                          u.to(DEVICE))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_rejects_bad_arguments():
    x = [torch.zeros(1, 2, 1, 16, device=DEVICE) for _ in range(4)]
    u = torch.zeros(1, 16, device=DEVICE)
    state = torch.zeros(1, 1, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="inplace"):
        wkv6_recurrent(*x, u, state.double(), inplace=True)
    with pytest.raises(ValueError, match="inplace"):
        wkv6_recurrent(*x, u, inplace=True)
    with pytest.raises(ValueError, match="u must be"):
        wkv6_recurrent(*x, torch.zeros(2, 16, device=DEVICE), state)
    with pytest.raises(ValueError, match="state must be"):
        wkv6_recurrent(*x, u, torch.zeros(1, 1, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="head size"):
        wkv6_recurrent(*[torch.zeros(1, 2, 1, 24, device=DEVICE) for _ in range(4)], torch.zeros(1, 24, device=DEVICE))


@gpu_only
def test_dispatcher_takes_it_for_decoding(seed, monkeypatch):
    """ops.wkv6 on CUDA: by default a few tokens without gradients go through the decoding
    kernel (the same numbers as calling it), not with RWKVKIT_WKV6_RECURRENT=0, and with
    gradients through the chunked kernels."""
    monkeypatch.delenv("RWKVKIT_WKV6_RECURRENT", raising=False)  # the default
    calls = []
    from rwkvkit.ops import triton as triton_ops

    real = triton_ops.wkv6_recurrent
    monkeypatch.setattr(triton_ops, "wkv6_recurrent", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    r, log_w, k, v, u, s0 = (t.to(DEVICE) for t in wkv6_inputs(2, 4, 2, 64))
    with torch.no_grad():
        y, s = ops.wkv6(r, log_w, k, v, u, s0)
    assert calls and torch.equal(y, wkv6_recurrent(r, log_w, k, v, u, s0)[0])
    calls.clear()
    monkeypatch.setenv("RWKVKIT_WKV6_RECURRENT", "0")
    with torch.no_grad():
        ops.wkv6(r, log_w, k, v, u, s0)
    assert not calls
    monkeypatch.delenv("RWKVKIT_WKV6_RECURRENT")
    r.requires_grad_()
    y, _ = ops.wkv6(r, log_w, k, v, u, s0)
    assert not calls and y.requires_grad


@gpu_only
@pytest.mark.parametrize("arch", ["rwkv5", "rwkv6"])
def test_model_decoding_with_the_kernel(seed, arch, monkeypatch):
    """RWKV-5.2 / RWKV-6 decoding (model.step_, float32) with RWKVKIT_WKV6_RECURRENT=1 equals
    decoding without it."""
    assert_decoding_unchanged_by(monkeypatch, "RWKVKIT_WKV6_RECURRENT", arch, 2)
