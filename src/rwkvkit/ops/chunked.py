"""Chunked-parallel WKV in plain PyTorch (CPU, fallback, autograd).

The sequence is cut into chunks of ``chunk_size`` steps. Inside a chunk every step is
written in closed form from the state entering the chunk (matrix products over the chunk,
one unit-lower-triangular solve), and only the chunk-to-chunk state update runs
sequentially. Padding the tail with zero inputs and zero log-decay leaves the state
unchanged, so any T works.

RWKV-7 per head, chunk-local steps t = 1..L, entering state S0 ([value, key]):
    Lam_t = sum_{u<=t} log w_u,   decays e^{Lam_t - Lam_s} <= 1 for s <= t
    SA[t]  = S_{t-1} a_t                          (rows of the "delta" term)
    SA = (I - A_ab)^{-1} [ (a e^{Lam_{t-1}}) S0^T + A_ak V ]
    Y  = (r e^{Lam_t}) S0^T + A_rk V + A_rb SA
    S_L = S0 diag(e^{Lam_L}) + V^T (K e^{Lam_L - Lam}) + SA^T (B e^{Lam_L - Lam})
with A_xy[t, s] = sum_j x_t[j] y_s[j] e^{Lam_(t or t-1)[j] - Lam_s[j]} (strictly lower for
the a-rows, lower for the r-rows). The pairwise decays are factorised as
e^{Lam_t} * e^{-Lam_s}; RWKV-7's decay is bounded below by exp(-e^-0.5), so over a chunk of
16 steps e^{-Lam_s} stays below 1.7e4: safe in float32.

Because everything is linear in S0, each chunk reduces to ``S_next = S0 M + U`` and
``Y = Rq S0^T + Y0``; the chunk quantities are computed for all chunks at once and the
scan over chunks is a short loop of [N, N] products.
"""

from __future__ import annotations

import torch

WKV7_MAX_CHUNK = 32  # exp(0.6065 * 32) ~ 2.7e8: still far from float32 overflow


def wkv7_chunked(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV in chunked-parallel form.

    Args: ``r, log_w, k, v, a, b`` of shape [B, T, H, N] (``log_w`` = log of the decay,
    in [-exp(-0.5), 0]); ``state`` [B, H, N(value), N(key)] or None for zeros.
    Computes in float32 (float64 if the state or inputs are float64).
    Returns ``(y [B, T, H, N], final state [B, H, N, N])`` in that dtype.
    """
    if not 1 <= chunk_size <= WKV7_MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{WKV7_MAX_CHUNK}, got {chunk_size}")
    B, T, H, N = r.shape
    dt = torch.float64 if (r.dtype == torch.float64 or (state is not None and state.dtype == torch.float64)) else torch.float32
    s = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=dt), s

    L = chunk_size
    nc = -(-T // L)
    pad = nc * L - T

    def prep(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, N] -> [B, H, nc, L, N], zero-padded at the end
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)

    r, lw, k, v, a, b = (prep(x) for x in (r, log_w, k, v, a, b))

    lam = lw.cumsum(dim=-2)  # inclusive Lam_t
    lam_prev = lam - lw  # exclusive Lam_{t-1}
    lam_last = lam[..., -1:, :]  # Lam_L
    inv = torch.exp(-lam)  # e^{-Lam_s} (bounded, see module docstring)

    a_q = a * lam_prev.exp()
    r_q = r * lam.exp()
    k_i = k * inv
    b_i = b * inv
    to_end = torch.exp(lam_last - lam)
    k_e = k * to_end
    b_e = b * to_end

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    A_ab = (a_q @ b_i.transpose(-1, -2)).masked_fill(~strict, 0)
    A_ak = (a_q @ k_i.transpose(-1, -2)).masked_fill(~strict, 0)
    A_rb = (r_q @ b_i.transpose(-1, -2)).masked_fill(~incl, 0)
    A_rk = (r_q @ k_i.transpose(-1, -2)).masked_fill(~incl, 0)

    eye = torch.eye(L, dtype=dt, device=r.device)
    lhs = eye - A_ab
    # P: the part of SA driven by S0; Q: the part driven by this chunk's values.
    PQ = torch.linalg.solve_triangular(lhs, torch.cat([a_q, A_ak @ v], dim=-1), upper=False, unitriangular=True)
    P, Q = PQ[..., :N], PQ[..., N:]

    Rq = r_q + A_rb @ P  # [.., L, N_key]: y = Rq S0^T + Y0
    Y0 = A_rk @ v + A_rb @ Q  # [.., L, N_value]
    M = torch.diag_embed(lam_last.exp().squeeze(-2)) + P.transpose(-1, -2) @ b_e  # [.., N_key, N_key]
    U = v.transpose(-1, -2) @ k_e + Q.transpose(-1, -2) @ b_e  # [.., N_value, N_key]

    entering = []
    for c in range(nc):
        entering.append(s)
        s = s @ M[:, :, c] + U[:, :, c]
    S0 = torch.stack(entering, dim=2)  # [B, H, nc, N_value, N_key]
    y = Rq @ S0.transpose(-1, -2) + Y0  # [B, H, nc, L, N_value]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return y, s
