"""WKV recurrences: one interface, several backends.

``wkv7`` (RWKV-7) and ``wkv6`` (RWKV-5.2 and RWKV-6) pick the backend: the Triton kernels
on CUDA when triton is installed (``RWKVKIT_WKV_BACKEND=torch`` turns them off; a step-by-step
kernel for a few tokens without gradients, the chunked ones otherwise;
``RWKVKIT_WKV6_RECURRENT=0`` keeps WKV-6 off its step-by-step kernel), else the recurrent step
for T == 1 and the PyTorch chunked form otherwise. ``wkv7_`` is the in-place
decoding step (no gradients); ``wkv7_timemix_step_`` is the whole RWKV-7 time-mix step around
it (one kernel on CUDA; ``RWKVKIT_FUSED_STEP=0`` turns that off).
``reference`` holds the step-by-step spec.
"""

from __future__ import annotations

import os

import torch

from ..errors import InputError
from .chunked import wkv6_chunked, wkv7_chunked
from .inplace import wkv7_step_
from .reference import wkv6_reference, wkv6_step, wkv7_reference, wkv7_step

__all__ = [
    "wkv6",
    "wkv6_chunked",
    "wkv6_reference",
    "wkv6_step",
    "wkv7",
    "wkv7_",
    "wkv7_chunked",
    "wkv7_reference",
    "wkv7_step",
    "wkv7_timemix_step_",
]


def _check(fn: str, names: str, xs: tuple[torch.Tensor, ...], state: torch.Tensor) -> tuple[int, int, int, int]:
    """The shapes the dispatchers need: every input one [B, T, H, N] shape, the state
    [B, H, N, N] floating point (an InputError naming them otherwise); returns (B, T, H, N)."""
    r = xs[0]
    if r.dim() != 4 or any(x.shape != r.shape for x in xs):
        raise InputError(f"{fn}: {names} must share one [B, T, H, N] shape, got {[list(x.shape) for x in xs]}")
    B, T, H, N = r.shape
    if state.shape != (B, H, N, N) or not state.is_floating_point():
        raise InputError(f"{fn}: state must be a floating-point [{B}, {H}, {N}, {N}] tensor, "
                         f"got {list(state.shape)} {state.dtype}")
    return B, T, H, N


def _triton_enabled(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("RWKVKIT_WKV_BACKEND", "auto") != "torch"


def wkv7(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV: inputs [B, T, H, N], state [B, H, N, N] ([value, key]).

    Returns ``(y, new_state)``; the given state is not modified. ``y`` and the new state are
    in the state's dtype. On CUDA: the step-by-step kernel for a few tokens without
    gradients (decoding), the chunked kernels otherwise.
    """
    _check("wkv7", "r, log_w, k, v, a, b", (r, log_w, k, v, a, b), state)
    if _triton_enabled(r):
        from .triton import wkv7_recurrent, wkv7_triton, wkv7_triton_supports

        if wkv7_triton_supports(r, log_w, k, v, a, b, state):
            xs = (r, log_w, k, v, a, b, state)
            if r.shape[1] <= 16 and not (torch.is_grad_enabled() and any(x.requires_grad for x in xs)):
                return wkv7_recurrent(*xs, out_dtype=state.dtype)
            return wkv7_triton(*xs, out_dtype=state.dtype)
    if r.shape[1] == 1:
        y, s = wkv7_step(r[:, 0], log_w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state)
        return y.unsqueeze(1), s
    return wkv7_chunked(r, log_w, k, v, a, b, state)


def wkv7_(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One RWKV-7 step for decoding, in place: inputs [B, H, N], ``state`` [B, H, N, N] is
    updated. Returns ``y`` [B, H, N] in the state's dtype. No gradients."""
    if torch.is_grad_enabled():  # (a no_grad decorator would cost ~2 us on every call)
        with torch.no_grad():
            return wkv7_(r, log_w, k, v, a, b, state)
    if _triton_enabled(r) and state.dtype == torch.float32 and state.is_contiguous():
        from .triton import wkv7_recurrent, wkv7_triton_supports

        xs = [x.unsqueeze(1) for x in (r, log_w, k, v, a, b)]
        if wkv7_triton_supports(*xs, state):
            return wkv7_recurrent(*xs, state, inplace=True, out_dtype=state.dtype)[0][:, 0]
    return wkv7_step_(r, log_w, k, v, a, b, state)


def _fused_step_enabled(x: torch.Tensor) -> bool:
    return _triton_enabled(x) and os.environ.get("RWKVKIT_FUSED_STEP", "1") != "0"


def wkv7_timemix_step_(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    gate: torch.Tensor | None,
    v_first: torch.Tensor | None,
    k_k: torch.Tensor,
    k_a: torch.Tensor,
    r_k: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    state: torch.Tensor,
) -> torch.Tensor:
    """One RWKV-7 time-mix decoding step from its projections to the input of its output
    matrix, the state [B, H, N, N] float32 updated in place (no gradients):

        v = lerp(v, v_first, gate)                     (when ``gate`` is given: layers > 0)
        kk = normalize(k * k_k) per head;  k = k * (1 - k_a + a * k_a)
        S = S diag(e^log_w) + (S (-kk)) (kk a)^T + v k^T;  y = S r
        out = (GroupNorm_H(y; ln_weight, ln_bias, eps) + (sum(r * r_k * k) per head) v) * g

    ``r, log_w, k, v, a, g, gate, v_first`` [B, C] (C = H N); ``k_k, k_a, ln_weight,
    ln_bias`` [C]; ``r_k`` [H, N]. Returns ``out`` [B, C] in r's dtype. On CUDA
    (unless ``RWKVKIT_FUSED_STEP=0``): one Triton kernel instead of ~20 small ops (the CUDA-graph step
    is bound by its kernel count); else PyTorch ops around ``wkv7_``. The kernel computes in
    float32 throughout; the ops round to r's dtype between steps as the model always did.
    """
    if torch.is_grad_enabled():
        with torch.no_grad():
            return wkv7_timemix_step_(r, log_w, k, v, a, g, gate, v_first, k_k, k_a, r_k, ln_weight, ln_bias,
                                      eps, state)
    B, H, N, _ = state.shape
    xs = (r, log_w, k, v, a, g) + ((gate, v_first) if gate is not None else ())
    if (_fused_step_enabled(r) and N in (16, 32, 64, 128) and state.dtype == torch.float32
            and state.is_contiguous() and all(x.is_contiguous() and x.device == r.device for x in xs)):
        from .triton import available, wkv7_timemix_step_ as fused

        if available():
            return fused(r, log_w, k, v, a, g, gate, v_first, k_k.reshape(-1), k_a.reshape(-1), r_k.contiguous(),
                         ln_weight.contiguous(), ln_bias.contiguous(), eps, state)
    C = H * N
    if gate is not None:
        v = torch.lerp(v, v_first, gate)
    kk = (k * k_k.reshape(C)).view(B, H, N)
    kk = kk.div_(torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min_(1e-12))  # F.normalize
    k_a = k_a.reshape(C)
    k = k * torch.addcmul(1 - k_a, a, k_a)  # k (1 + (a - 1) k_a)
    r, k, v, a = r.view(B, H, N), k.view(B, H, N), v.view(B, H, N), a.view(B, H, N)
    y = wkv7_(r, log_w.view(B, H, N), k, v, -kk, kk * a, state)
    y = torch.group_norm(y.view(B, C), H, ln_weight.to(y.dtype), ln_bias.to(y.dtype), eps)
    y = y.to(r.dtype).view(B, H, N).addcmul_(torch.linalg.vecdot(r * r_k, k).unsqueeze(-1), v)  # + bonus
    return y.view(B, C).mul_(g)


def wkv6(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2 / RWKV-6 WKV: inputs [B, T, H, N], bonus ``u`` [H, N], state [B, H, N, N]
    ([value, key]).

    Returns ``(y, new_state)``; the given state is not modified. ``y`` and the new state are
    in the state's dtype. On CUDA: the step-by-step kernel for up to 16 tokens without
    gradients (decoding; ``RWKVKIT_WKV6_RECURRENT=0`` turns it off), else the chunked kernels
    for T > 1.
    """
    _, _, H, N = _check("wkv6", "r, log_w, k, v", (r, log_w, k, v), state)
    if u.shape != (H, N):
        raise InputError(f"wkv6: u must be [{H}, {N}], got {list(u.shape)}")
    if _triton_enabled(r):
        from .triton import wkv6_recurrent, wkv6_triton, wkv6_triton_supports

        if wkv6_triton_supports(r, log_w, k, v, u, state):
            xs = (r, log_w, k, v, u, state)
            if (r.shape[1] <= 16 and os.environ.get("RWKVKIT_WKV6_RECURRENT", "1") == "1"
                    and not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))):
                return wkv6_recurrent(*xs, out_dtype=state.dtype)
            if r.shape[1] > 1:
                return wkv6_triton(*xs, out_dtype=state.dtype)
    if r.shape[1] == 1:
        y, s = wkv6_step(r[:, 0], log_w[:, 0], k[:, 0], v[:, 0], u, state)
        return y.unsqueeze(1), s
    return wkv6_chunked(r, log_w, k, v, u, state)
