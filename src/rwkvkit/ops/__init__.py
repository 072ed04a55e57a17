"""WKV recurrences: one interface, several backends.

``wkv7`` (RWKV-7) and ``wkv6`` (RWKV-5.2 and RWKV-6) pick the backend: the recurrent step
for T == 1, the Triton kernels for RWKV-7 on CUDA when triton is installed
(``RWKVKIT_WKV_BACKEND=torch`` turns them off), and the PyTorch chunked form otherwise.
``reference`` holds the step-by-step spec.
"""

from __future__ import annotations

import os

import torch

from .chunked import wkv6_chunked, wkv7_chunked
from .reference import wkv6_reference, wkv6_step, wkv7_reference, wkv7_step

__all__ = [
    "wkv6",
    "wkv6_chunked",
    "wkv6_reference",
    "wkv6_step",
    "wkv7",
    "wkv7_chunked",
    "wkv7_reference",
    "wkv7_step",
]


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
    in the state's dtype.
    """
    if r.shape[1] == 1:
        y, s = wkv7_step(r[:, 0], log_w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state)
        return y.unsqueeze(1), s
    if r.is_cuda and os.environ.get("RWKVKIT_WKV_BACKEND", "auto") != "torch":
        from .triton import wkv7_triton, wkv7_triton_supports

        if wkv7_triton_supports(r, log_w, k, v, a, b, state):
            return wkv7_triton(r, log_w, k, v, a, b, state, out_dtype=state.dtype)
    return wkv7_chunked(r, log_w, k, v, a, b, state)


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
    return wkv6_chunked(r, log_w, k, v, u, state)
