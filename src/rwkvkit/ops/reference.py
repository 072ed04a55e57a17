"""Step-by-step WKV recurrences: the executable spec every faster backend is tested against.

Shapes: inputs ``[B, T, H, N]``; state ``[B, H, N, N]`` indexed ``[..., value, key]``.
The decay enters as its logarithm ``log_w <= 0`` (so decays close to 1 keep their
precision), and the reference computes ``w = exp(log_w)`` at each step.
"""

from __future__ import annotations

import torch


def wkv7_step(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RWKV-7 step for inputs ``[B, H, N]`` and state ``[B, H, N(value), N(key)]``.

    S' = S diag(w) + (S a) b^T + v k^T ;  y = S' r.
    Computes in the state's dtype and returns ``(y, S')`` in that dtype.
    """
    dt = state.dtype
    r, w, k, v, a, b = (x.to(dt) for x in (r, log_w.exp(), k, v, a, b))
    sa = torch.einsum("bhij,bhj->bhi", state, a)
    state = state * w.unsqueeze(-2) + sa.unsqueeze(-1) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = torch.einsum("bhij,bhj->bhi", state, r)
    return y, state


def wkv7_reference(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV over a sequence, one step at a time, computed in ``dtype``.

    Returns ``(y [B, T, H, N], final state [B, H, N, N])``, both in ``dtype``.
    """
    return _scan(lambda t, s: wkv7_step(r[:, t], log_w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], s), r, state, dtype)


def wkv6_step(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RWKV-5.2 / RWKV-6 step for inputs ``[B, H, N]``, bonus ``u`` ``[H, N]`` and state
    ``[B, H, N(value), N(key)]``.

    y = S r + (sum_j r[j] u[j] k[j]) v ;  S' = S diag(w) + v k^T   (y reads the state before
    this token's update; the bonus ``u`` weighs the current token instead).
    Computes in the state's dtype and returns ``(y, S')`` in that dtype.
    """
    dt = state.dtype
    w = log_w.to(dt).exp()  # in dt: a decay close to 1 keeps its digits
    r, k, v, u = (x.to(dt) for x in (r, k, v, u))
    y = torch.einsum("bhij,bhj->bhi", state, r) + (r * u * k).sum(-1, keepdim=True) * v
    state = state * w.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    return y, state


def wkv6_reference(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2 / RWKV-6 WKV over a sequence, one step at a time, computed in ``dtype``.

    ``log_w`` is per token ``[B, T, H, N]`` (RWKV-5.2: the same static decay at every token).
    Returns ``(y [B, T, H, N], final state [B, H, N, N])``, both in ``dtype``.
    """
    return _scan(lambda t, s: wkv6_step(r[:, t], log_w[:, t], k[:, t], v[:, t], u, s), r, state, dtype)


def _scan(step, r: torch.Tensor, state: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``step(t, S) -> (y_t, S')`` for t = 0..T-1 from ``state`` (zeros if None), in ``dtype``."""
    B, T, H, N = r.shape
    s = torch.zeros(B, H, N, N, dtype=dtype, device=r.device) if state is None else state.to(dtype)
    ys = []
    for t in range(T):
        y, s = step(t, s)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N, dtype=dtype)
    return y, s
