"""WKV recurrences: one interface, several backends.

``wkv7`` (RWKV-7) and ``wkv6`` (RWKV-5.2 and RWKV-6) pick the backend: the Triton kernels
on CUDA when triton is installed (``RWKVKIT_WKV_BACKEND=torch`` turns them off), else the
recurrent step for T == 1 and the PyTorch chunked form otherwise. ``wkv7_`` is the in-place
decoding step (no gradients).
``reference`` holds the step-by-step spec.
"""

from __future__ import annotations

import os

import torch

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
]


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
    in the state's dtype.
    """
    if r.shape[1] == 1:
        y, s = wkv6_step(r[:, 0], log_w[:, 0], k[:, 0], v[:, 0], u, state)
        return y.unsqueeze(1), s
    if _triton_enabled(r):
        from .triton import wkv6_triton, wkv6_triton_supports

        if wkv6_triton_supports(r, log_w, k, v, u, state):
            return wkv6_triton(r, log_w, k, v, u, state, out_dtype=state.dtype)
    return wkv6_chunked(r, log_w, k, v, u, state)
