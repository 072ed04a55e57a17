"""Triton GPU kernels for the WKV recurrences (optional: needs the ``triton`` package).

Importing this package never fails: ``available()`` says whether Triton can be imported,
``wkv7_triton_supports`` / ``wkv6_triton_supports`` whether a call can take the Triton path,
and ``wkv7_triton`` / ``wkv6_triton`` import the kernels on first use.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = [
    "available",
    "wkv6_recurrent",
    "wkv6_triton",
    "wkv6_triton_supports",
    "wkv7_recurrent",
    "wkv7_timemix_step_",
    "wkv7_triton",
    "wkv7_triton_supports",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEAD_SIZES = (16, 32, 64, 128)


def available() -> bool:
    """True when the ``triton`` package is installed."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


def wkv7_triton_supports(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> bool:
    """True when ``wkv7_triton`` can take these tensors: Triton installed, all on one CUDA
    device, one [B, T, H, N] shape with N in 16/32/64/128, dtypes float32/bfloat16/float16,
    and a float32 [B, H, N, N] state (or None)."""
    xs = (r, log_w, k, v, a, b)
    if not (r.is_cuda and r.dim() == 4 and r.shape[-1] in _HEAD_SIZES):
        return False
    if any(x.device != r.device or x.shape != r.shape or x.dtype not in _KERNEL_DTYPES for x in xs):
        return False
    if state is not None:
        B, _, H, N = r.shape
        if state.device != r.device or state.dtype != torch.float32 or state.shape != (B, H, N, N):
            return False
    return available()


def wkv7_triton(*args, **kwargs):
    """RWKV-7 WKV through the Triton kernels; see ``rwkvkit.ops.triton.wkv7.wkv7_triton``."""
    from .wkv7 import wkv7_triton as impl

    return impl(*args, **kwargs)


def wkv7_timemix_step_(*args, **kwargs):
    """An RWKV-7 time-mix decoding step in one kernel; see ``rwkvkit.ops.wkv7_timemix_step_``."""
    from .wkv7 import wkv7_timemix_step_ as impl

    return impl(*args, **kwargs)


def wkv7_recurrent(*args, **kwargs):
    """RWKV-7 WKV step by step in one kernel (decoding); see ``rwkvkit.ops.triton.wkv7``."""
    from .wkv7 import wkv7_recurrent as impl

    return impl(*args, **kwargs)


def wkv6_triton_supports(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> bool:
    """True when ``wkv6_triton`` can take these tensors: Triton installed, all on one CUDA
    device, one [B, T, H, N] shape with N in 16/32/64/128 (``log_w`` may be a strided view, e.g.
    RWKV-5.2's expanded per-head decay), a [H, N] bonus ``u``, dtypes float32/bfloat16/float16,
    and a float32 [B, H, N, N] state (or None)."""
    xs = (r, log_w, k, v)
    if not (r.is_cuda and r.dim() == 4 and r.shape[-1] in _HEAD_SIZES):
        return False
    if any(x.device != r.device or x.shape != r.shape or x.dtype not in _KERNEL_DTYPES for x in xs):
        return False
    B, _, H, N = r.shape
    if u.device != r.device or u.shape != (H, N) or u.dtype not in _KERNEL_DTYPES:
        return False
    if state is not None:
        if state.device != r.device or state.dtype != torch.float32 or state.shape != (B, H, N, N):
            return False
    return available()


def wkv6_triton(*args, **kwargs):
    """RWKV-5.2 / RWKV-6 WKV through the Triton kernels; see
    ``rwkvkit.ops.triton.wkv6.wkv6_triton``."""
    from .wkv6 import wkv6_triton as impl

    return impl(*args, **kwargs)


def wkv6_recurrent(*args, **kwargs):
    """RWKV-5.2 / RWKV-6 WKV step by step in one kernel (decoding); see
    ``rwkvkit.ops.triton.wkv6.wkv6_recurrent``."""
    from .wkv6 import wkv6_recurrent as impl

    return impl(*args, **kwargs)
