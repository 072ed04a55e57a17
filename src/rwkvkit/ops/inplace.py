"""The one-token WKV-7 step that updates the state where it lies (decoding; no autograd).

The same recurrence as ``reference.wkv7_step``, written for speed on the CPU (and as the
fallback elsewhere): the state [B, H, N(value), N(key)] is read once, modified in place in
three passes and read once more; nothing reads the device back, so a caller can capture the
step in a CUDA graph. The results equal the reference's up to float rounding (the order of
the additions differs).
"""

from __future__ import annotations

import torch


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

    ``state`` is updated in place; returns ``y`` [B, H, N] in the state's dtype. Call it
    without autograd (``ops.wkv7_`` does).
    """
    dt = state.dtype
    r, w, k, v, a, b = (x.to(dt) for x in (r, log_w.exp(), k, v, a, b))
    # S a is read before S is overwritten, y = S r after. Products with one vector are
    # multiply-and-sum: on the CPU a batched matrix-vector product (bmm, einsum, matmul) is
    # 2-4x slower at every batch size. (Reading S (w r) before the update as well, and adding
    # (S a)(b . r) + v (k . r), makes the same number of passes over S and 7 more small ops.)
    sa = (state * a.unsqueeze(-2)).sum(-1, keepdim=True)
    state.mul_(w.unsqueeze(-2)).addcmul_(sa, b.unsqueeze(-2)).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return (state * r.unsqueeze(-2)).sum(-1)
