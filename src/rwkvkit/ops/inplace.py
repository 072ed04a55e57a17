"""The one-token WKV-7 step that updates the state where it lies (decoding; no autograd).

The same recurrence as ``reference.wkv7_step``, written for speed on the CPU (and as the
fallback elsewhere): the state [B, H, N(value), N(key)] is modified in place in three fused
passes, and nothing reads the device back, so a caller can capture the step in a CUDA graph.
The results equal the reference's up to float rounding (the order of the additions differs).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def wkv7_step_(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """RWKV-7: S <- S diag(w) + (S a) b^T + v k^T, then y = S r; inputs [B, H, N].

    ``state`` is updated in place; returns ``y`` [B, H, N] in the state's dtype.
    """
    dt = state.dtype
    r, w, k, v, a, b = (x.to(dt) for x in (r, log_w.exp(), k, v, a, b))
    # einsum, not matmul: a batched matrix-vector product through bmm is ~3x slower on the CPU
    sa = torch.einsum("bhij,bhj->bhi", state, a)
    state.mul_(w.unsqueeze(-2))
    state.addcmul_(sa.unsqueeze(-1), b.unsqueeze(-2))
    state.addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return torch.einsum("bhij,bhj->bhi", state, r)
