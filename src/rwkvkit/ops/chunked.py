"""Chunked-parallel WKV in plain PyTorch (CPU, fallback, autograd).

The sequence is cut into chunks of ``chunk_size`` steps. Inside a chunk every step is
written in closed form from the state entering the chunk (matrix products over the chunk;
for RWKV-7 also one unit-lower-triangular solve), and only the chunk-to-chunk state update runs
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

Because everything is linear in S0, SA = P S0^T + Q, ``Y = Rq S0^T + Y0`` and
``S_next = S0 M + U``; P, Q, Rq, Y0 are computed for all chunks at once. The loop over chunks
then either applies them to the state directly (``scan="state"``, the CPU default: three
[N, N] x [N, L] products per chunk) or first builds every chunk's M and U [N, N]
(``scan="matrices"``: one [N, N] product per chunk, but T/L * N^2 numbers written, which
costs more than it saves where memory bandwidth is scarce).

RWKV-5.2 / RWKV-6 per head (v5.2: the same with a decay that does not depend on t), same
notation; the spec's S[key, value] transposed to [value, key]:
    y_t = S_{t-1} r_t + (sum_j r_t[j] u[j] k_t[j]) v_t ;   S_t = S_{t-1} diag(w_t) + v_t k_t^T
    Y   = (r e^{Lam_{t-1}}) S0^T + A V
    S_L = S0 diag(e^{Lam_L}) + V^T (K e^{Lam_L - Lam})
with A[t, s] = sum_j r_t[j] k_s[j] e^{Lam_{t-1}[j] - Lam_s[j]} for s < t, the bonus
A[t, t] = sum_j r_t[j] u[j] k_t[j], and 0 above the diagonal.
Here the decay can be close to 0 (v6: log w = -exp(...), down to -1e4 and below), so the
WKV-7 factorisation e^{Lam_t} * e^{-Lam_s} overflows, and even the difference of two
cumulative sums Lam_{t-1} - Lam_s loses the small log-decays that follow a huge one
(float32 spacing near 1e4 is 1e-3). Instead A is built over a binary tree of aligned blocks
(chunk_size a power of two): every pair s < t of a chunk lies in exactly one block of size
2h whose left half holds s and right half holds t, and there the decay splits at the
block's middle m:
    e^{Lam_{t-1} - Lam_s} = e^{sum_{m <= q < t} log w_q} * e^{sum_{s < q < m} log w_q}
                          = e^{P_h[t]} * e^{S_h[s]},
with P_h / S_h the exclusive prefix / suffix sums of log w inside blocks of size h. Both
factors are <= 1 (nothing overflows; an underflow only rounds to 0 a term that is smaller
still), and each is a plain sum of the very log-decays it spans, so nothing cancels. The
cross block is one product (r_right e^{P_h}) (k_left e^{S_h})^T; going up a level,
    A_2h = [[A_h(left), 0], [cross, A_h(right)]],   P_2h(right) = P_h + total_h(left),
    S_2h(left) = S_h + total_h(right),   total_2h = total_h(left) + total_h(right),
starting from the 1x1 blocks A_1 = the bonus. At the top, P and S are the chunk's
exclusive prefix (Lam_{t-1}) and suffix (Lam_L - Lam_s) sums, as needed for the state
terms. No entry is ever computed for s > t, so no masked inf or NaN can reach a gradient.
Cost: log2(L) levels of elementwise work on the inputs plus [h, N] x [N, h] products.
The scan over chunks is S_next = S0 diag(e^{Lam_L}) + V^T (K e^{Lam_L - Lam}).
"""

from __future__ import annotations

import torch

WKV7_MAX_CHUNK = 32  # exp(0.6065 * 32) ~ 2.7e8: still far from float32 overflow
# wkv6_chunked's chunk length. Any power of two is exact and stable; on CPU (T = 4096, H = 12,
# N = 64, 2 threads) 16..64 are equally fast (~0.1 s forward, ~0.3 s with backward), 8 and 128
# slower. 32 keeps the stored chunk states at twice the input's size.
WKV6_CHUNK = 32


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
    scan: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7 WKV in chunked-parallel form.

    Args: ``r, log_w, k, v, a, b`` of shape [B, T, H, N] (``log_w`` = log of the decay,
    in [-exp(-0.5), 0]); ``state`` [B, H, N(value), N(key)] or None for zeros.
    ``scan``: how the state crosses the chunks (same numbers either way): "state" carries
    it through the loop, three [N, N]-by-[N, L] products per chunk; "matrices" first builds
    every chunk's [N, N] transition ``S_next = S0 M + U`` in parallel, then the loop is one
    [N, N] product per chunk. None picks "state" on the CPU, where writing the per-chunk
    matrices costs more than the loop, and "matrices" elsewhere (fewer, larger kernels).
    Computes in float32 (float64 if the state or inputs are float64).
    Returns ``(y [B, T, H, N], final state [B, H, N, N])`` in that dtype.
    """
    if not 1 <= chunk_size <= WKV7_MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{WKV7_MAX_CHUNK}, got {chunk_size}")
    if scan is None:
        scan = "state" if r.device.type == "cpu" else "matrices"
    if scan not in ("state", "matrices"):
        raise ValueError(f"scan must be 'state' or 'matrices', got {scan!r}")
    B, T, H, N = r.shape
    dt, s = _compute_dtype_and_state(r, state)
    if T == 0:  # (a new tensor, never the caller's state)
        return r.new_zeros(B, 0, H, N, dtype=dt), s.clone()
    L = chunk_size
    r, lw, k, v, a, b = _to_chunks((r, log_w, k, v, a, b), L, dt)

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

    # SA = (I - A_ab)^{-1} [(a e^{Lam_{t-1}}) S0^T + A_ak V] = P S0^T + Q. The inverse of the
    # [L, L] unit-lower-triangular matrix comes from one solve with L right-hand sides
    # (cheaper than solving for the [L, 2N] right-hand side); every product below is exact.
    eye = torch.eye(L, dtype=dt, device=r.device)
    inverse = torch.linalg.solve_triangular(eye - A_ab, eye.expand_as(A_ab), upper=False, unitriangular=True)
    P = inverse @ a_q  # [.., L, N_key]: the part of SA driven by S0
    Q = (inverse @ A_ak) @ v  # [.., L, N_value]: the part driven by this chunk's values
    Rq = r_q + A_rb @ P  # y = Rq S0^T + Y0
    Y0 = A_rk @ v + A_rb @ Q  # [.., L, N_value]

    if scan == "matrices":
        M = torch.diag_embed(lam_last.exp().squeeze(-2)) + P.transpose(-1, -2) @ b_e  # [.., N_key, N_key]
        U = v.transpose(-1, -2) @ k_e + Q.transpose(-1, -2) @ b_e  # [.., N_value, N_key]
        entering = []
        # unbind, not M[:, :, c]: indexing inside the loop makes the backward quadratic in nc
        for M_c, U_c in zip(M.unbind(2), U.unbind(2)):
            entering.append(s)
            s = s @ M_c + U_c
        S0 = torch.stack(entering, dim=2)  # [B, H, nc, N_value, N_key]
        return _from_chunks(Rq @ S0.transpose(-1, -2) + Y0, T), s

    # Per chunk: SA^T = S0 P^T + Q^T;  y = Rq S0^T + Y0;  S_L = S0 diag(e^{Lam_L}) + V^T K_e + SA^T B_e.
    nc = r.shape[2]
    per_chunk = lambda t: t.reshape(B * H, nc, *t.shape[-2:]).unbind(1)  # noqa: E731
    s = s.reshape(B * H, N, N)
    ys = []
    for PT, QT, Rq_c, Y0_c, g, VT, ke, be in zip(*map(per_chunk, (
        P.transpose(-1, -2), Q.transpose(-1, -2), Rq, Y0, lam_last.exp(), v.transpose(-1, -2), k_e, b_e,
    ))):
        sa_t = torch.baddbmm(QT, s, PT)  # [BH, N_value, L]
        ys.append(torch.baddbmm(Y0_c, Rq_c, s.transpose(-1, -2)))
        s = torch.baddbmm(s * g, VT, ke).baddbmm(sa_t, be)
    y = torch.stack(ys, dim=1).view(B, H, nc, L, N)
    return _from_chunks(y, T), s.view(B, H, N, N)


def _wkv6_intra_chunk(
    r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, bonus: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The within-chunk terms of WKV-6 for inputs [..., L, N] (L a power of two) and the
    bonus ``sum_j r_t[j] u[j] k_t[j]`` [..., L]: returns the matrix A [..., L, L] (bonus on
    the diagonal), the exclusive prefix and suffix sums of ``log_w`` over the chunk
    [..., L, N] and its total [..., 1, N]. See the module docstring.
    """
    *lead, L, N = r.shape
    A = bonus[..., None, None]  # [..., L, 1, 1]: the blocks of size 1
    pre = suf = None  # exclusive prefix / suffix sums inside blocks of size h (zero for h = 1)
    total = log_w  # [..., L // h, N]: the sum over each block
    h = 1
    while h < L:
        nb = L // (2 * h)

        def halves(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(*lead, nb, 2, h, x.shape[-1])

        q = halves(r)[..., 1, :, :]  # t in the right half: decay from the middle to t - 1
        kk = halves(k)[..., 0, :, :]  # s in the left half: decay from s + 1 to the middle
        if pre is not None:
            pre, suf = halves(pre), halves(suf)
            q = q * pre[..., 1, :, :].exp()
            kk = kk * suf[..., 0, :, :].exp()
        cross = q @ kk.transpose(-1, -2)  # [..., nb, h(t), h(s)]
        A = A.reshape(*lead, nb, 2, h, h)
        upper = torch.nn.functional.pad(A[..., 0, :, :], (0, h))
        lower = torch.cat([cross, A[..., 1, :, :]], dim=-1)
        A = torch.cat([upper, lower], dim=-2)  # [..., nb, 2h, 2h]

        total = total.reshape(*lead, nb, 2, 1, N)
        left, right = total[..., 0, :, :], total[..., 1, :, :]  # [..., nb, 1, N]
        if pre is None:
            zero = torch.zeros_like(left)
            pre = torch.stack([zero, left], dim=-3)
            suf = torch.stack([right, zero], dim=-3)
        else:
            pre = torch.stack([pre[..., 0, :, :], pre[..., 1, :, :] + left], dim=-3)
            suf = torch.stack([suf[..., 0, :, :] + right, suf[..., 1, :, :]], dim=-3)
        pre = pre.reshape(*lead, L, N)
        suf = suf.reshape(*lead, L, N)
        total = (left + right).reshape(*lead, nb, N)
        h *= 2
    if pre is None:  # L == 1
        pre = suf = torch.zeros_like(log_w)
    return A.reshape(*lead, L, L), pre, suf, total.reshape(*lead, 1, N)


def wkv6_chunked(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    chunk_size: int = WKV6_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5.2 / RWKV-6 WKV in chunked-parallel form.

    Args: ``r, log_w, k, v`` of shape [B, T, H, N] (``log_w`` = log of the decay, <= 0, any
    magnitude); ``u`` the bonus ("time_faaaa") [H, N]; ``state`` [B, H, N(value), N(key)] or
    None for zeros. ``chunk_size`` must be a power of two (sequences shorter than a chunk use
    the next power of two at or above T instead).
    Computes in float32 (float64 if the state or inputs are float64).
    Returns ``(y [B, T, H, N], final state [B, H, N, N])`` in that dtype.
    """
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    B, T, H, N = r.shape
    dt, s = _compute_dtype_and_state(r, state)
    if T == 0:  # (a new tensor, never the caller's state)
        return r.new_zeros(B, 0, H, N, dtype=dt), s.clone()
    L = min(chunk_size, 1 << (T - 1).bit_length())
    r, lw, k, v = _to_chunks((r, log_w, k, v), L, dt)
    u = u.to(dt).reshape(1, H, 1, 1, N)

    A, pre, suf, total = _wkv6_intra_chunk(r, lw, k, (r * u * k).sum(-1))
    r_q = r * pre.exp()  # r_t e^{Lam_{t-1}}
    k_e = k * suf.exp()  # k_s e^{Lam_L - Lam_s}
    U = v.transpose(-1, -2) @ k_e  # [B, H, nc, N_value, N_key]
    decay = total.exp()  # [B, H, nc, 1, N_key]

    entering = []  # unbind once: indexing [:, :, c] per step would make backward quadratic in nc
    for d_c, u_c in zip(decay.unbind(2), U.unbind(2)):
        entering.append(s)
        s = s * d_c + u_c
    S0 = torch.stack(entering, dim=2)  # [B, H, nc, N_value, N_key]
    return _from_chunks(r_q @ S0.transpose(-1, -2) + A @ v, T), s


def _compute_dtype_and_state(r: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.dtype, torch.Tensor]:
    """float64 if the inputs or the state are float64, else float32; and the entering state
    in that dtype (zeros for None)."""
    B, _, H, N = r.shape
    f64 = r.dtype == torch.float64 or (state is not None and state.dtype == torch.float64)
    dt = torch.float64 if f64 else torch.float32
    s = torch.zeros(B, H, N, N, dtype=dt, device=r.device) if state is None else state.to(dt)
    return dt, s


def _to_chunks(xs: tuple[torch.Tensor, ...], L: int, dt: torch.dtype) -> list[torch.Tensor]:
    """[B, T, H, N] -> contiguous [B, H, nc, L, N] in ``dt``, zero-padded at the end (one copy
    each). Zero inputs with zero log-decay leave the state unchanged, so the padding does not
    affect the result."""
    B, T, H, N = xs[0].shape
    nc = -(-T // L)
    out = []
    for x in xs:
        if nc * L != T:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nc * L - T))
        out.append(x.reshape(B, nc, L, H, N).permute(0, 3, 1, 2, 4).to(dt, memory_format=torch.contiguous_format))
    return out


def _from_chunks(y: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, nc, L, N] -> [B, T, H, N] (the padding dropped)."""
    B, H, nc, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
