"""The forward of the GoldFinch paper's released code (recursal/GoldFinch-paper), written
afresh from its equations over a plain state dict, in float64, independent of
rwkvkit.models: what official GoldFinch, Finch-C2 and Llama files must give once loaded.

It follows the paper code's fresh-state, whole-sequence call: token shifts over the whole
sequence with zeros before the first position, the WKV-6 recurrence step by step (the
kernel's read-before-write order, bonus u = 0), softmax attention with the top-left causal
mask (right for a fresh sequence), RoPE by complex pairs (2i, 2i+1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _weights(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() for k, v in sd.items()}


def _ln(w: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], 1e-5)


def _prev(x: Tensor) -> Tensor:
    """x at the previous position along T ([B, T, C]), zeros before the first."""
    return F.pad(x, (0, 0, 1, -1))


def _rms(x: Tensor) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + 1e-8)


def _lora_mixes(x: Tensor, w1: Tensor, w2: Tensor) -> list[Tensor]:
    """tanh(x w1) split into w2.shape[0] slices of the rank, each through its w2[j]."""
    B, T, _ = x.shape
    h = torch.tanh(x @ w1).view(B, T, w2.shape[0], w2.shape[1])
    return [h[:, :, j] @ w2[j] for j in range(w2.shape[0])]


def _rope(x: Tensor, base: float) -> Tensor:
    """[B, H, T, D] rotated at positions 0..T-1, channel pairs (2i, 2i+1) as complex numbers."""
    B, H, T, D = x.shape
    freq = base ** -(torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freq))
    return torch.view_as_real(torch.view_as_complex(x.reshape(B, H, T, D // 2, 2).contiguous()) * turn).reshape(B, H, T, D)


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention, [B, H, T, D] each, fresh sequence."""
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _heads(x: Tensor, n: int) -> Tensor:
    B, T, C = x.shape
    return x.view(B, T, C // n, n).transpose(1, 2)


def _merge(y: Tensor) -> Tensor:
    B, H, T, N = y.shape
    return y.transpose(1, 2).reshape(B, T, H * N)


def _finch_c2(w: dict[str, Tensor], p: str, x: Tensor, head_size: int) -> Tensor:
    B, T, C = x.shape
    H, N = C // head_size, head_size
    d = _prev(x) - x
    mr, mk, mv, mw, mv2 = _lora_mixes(x + d * w[p + "time_maa_x"], w[p + "time_maa_w1"], w[p + "time_maa_w2"])
    xr, xk, xv = x + d * (w[p + "time_maa_r"] + mr), x + d * (w[p + "time_maa_k"] + mk), x + d * (w[p + "time_maa_v"] + mv)
    xw, xv2 = x + d * (w[p + "time_maa_w"] + mw), x + d * (w[p + "time_maa_v2"] + mv2)
    r, k, v = xr @ w[p + "receptance.weight"].T, xk @ w[p + "key.weight"].T, xv @ w[p + "value.weight"].T
    v2 = xv2 @ w[p + "value.weight"].T + torch.tanh(xv2 @ w[p + "time_value2_w1"]) @ w[p + "time_value2_w2"]
    decay = torch.exp(-torch.exp(w[p + "time_decay"] + torch.tanh(xw @ w[p + "time_decay_w1"]) @ w[p + "time_decay_w2"]))
    k = k * (1 - decay)
    # WKV-6 with u = 0: y_t = r_t S_{t-1};  S_t = diag(w_t) S_{t-1} + k_t^T v_t  (S: key x value)
    S = torch.zeros(B, H, N, N, dtype=x.dtype)
    y = torch.empty(B, T, H, N, dtype=x.dtype)
    for t in range(T):
        rt, kt, vt, wt = (z[:, t].view(B, H, N) for z in (r, k, v, decay))
        y[:, t] = torch.einsum("bhk,bhkv->bhv", rt, S)
        S = S * wt.unsqueeze(-1) + kt.unsqueeze(-1) * vt.unsqueeze(-2)
    y = y.reshape(B, T, C) + v2
    return _ln(w, p + "ln_x", y) @ w[p + "output.weight"].T


def _gold(w: dict[str, Tensor], p: str, x: Tensor, kd: Tensor, x0: Tensor, head_size: int, rope_base: float) -> Tensor:
    d = _prev(x) - x
    (mq,) = _lora_mixes(x + d * w[p + "time_maa_x"], w[p + "time_maa_q_w1"], w[p + "time_maa_q_w2"].unsqueeze(0))
    q = _ln(w, p + "ln_q", (x + d * (w[p + "time_maa_q"] + mq)) @ w[p + "query.weight"].T)
    e = _rms(x0)
    de, dk = _prev(e) - e, _prev(kd) - kd
    mk, mv = _lora_mixes(e + de * w[p + "time_maa_v_cache"], w[p + "time_maa_kv_w1"], w[p + "time_maa_kv_w2"])
    k = kd + dk * (w[p + "time_maa_k"] + mk)
    v = e + de * (w[p + "time_maa_v"] + mv)
    k = _ln(w, p + "ln_k", k + torch.tanh(k @ w[p + "time_key_w1"]) @ w[p + "time_key_w2"])
    v = _ln(w, p + "ln_v", v + torch.tanh(v @ w[p + "time_value_w1"]) @ w[p + "time_value_w2"])
    q, k, v = _heads(q, head_size), _heads(k, head_size), _heads(v, head_size)
    if rope_base:
        q, k = _rope(q, rope_base), _rope(k, rope_base)
    return _ln(w, p + "ln_x", _merge(_attend(q, k, v))) @ w[p + "output.weight"].T


def _channel_mix(w: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    d = _prev(x) - x
    k = torch.relu((x + d * w[p + "time_maa_k"]) @ w[p + "key.weight"].T) ** 2
    return torch.sigmoid((x + d * w[p + "time_maa_r"]) @ w[p + "receptance.weight"].T) * (k @ w[p + "value.weight"].T)


def _n_layer(sd: dict[str, Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def goldfinch_logits(sd: dict[str, Tensor], tokens: Tensor, *, head_size: int = 64, rope_base: float = 0.0) -> Tensor:
    """Logits [B, T, V] (float64) of a GoldFinch or Finch-C2 paper file over ``tokens``."""
    w = _weights(sd)
    L = _n_layer(sd)
    first_gold = min([i for i in range(L) if f"blocks.{i}.att.query.weight" in sd], default=L)
    x = _ln(w, "blocks.0.ln0", w["emb.weight"][tokens])
    x0, kd = x, None
    for i in range(L):
        p = f"blocks.{i}."
        a = _ln(w, p + "ln1", x)
        if i < first_gold:
            x = x + _finch_c2(w, p + "att.", a, head_size)
        else:
            x = x + _gold(w, p + "att.", a, kd, x0, head_size, rope_base)
        x = x + _channel_mix(w, p + "ffn.", _ln(w, p + "ln2", x))
        if i == first_gold - 1 < L - 1:  # after the last Finch-C2 block: compress, then "TokenCat"
            c = x @ w["w_kv_cache_a.weight"].T
            kd = _rms(torch.cat([x0, c], dim=-1) @ w["w_kv_cache_b.weight"].T)
    return _ln(w, "ln_out", x) @ w["head.weight"].T


def llama_logits(sd: dict[str, Tensor], tokens: Tensor, *, head_size: int = 64, rope_base: float = 10000.0) -> Tensor:
    """Logits [B, T, V] (float64) of a Llama-baseline paper file over ``tokens``."""
    w = _weights(sd)
    x = _ln(w, "blocks.0.ln0", w["emb.weight"][tokens])
    for i in range(_n_layer(sd)):
        p = f"blocks.{i}."
        a = _ln(w, p + "ln1", x)
        q, k, v = (_heads(a @ w[p + f"att.{n}.weight"].T, head_size) for n in ("wq", "wk", "wv"))
        if rope_base:
            q, k = _rope(q, rope_base), _rope(k, rope_base)
        x = x + _merge(_attend(q, k, v)) @ w[p + "att.wo.weight"].T
        f = _ln(w, p + "ln2", x)
        x = x + (F.silu(f @ w[p + "ffn.w1.weight"].T) * (f @ w[p + "ffn.w3.weight"].T)) @ w[p + "ffn.w2.weight"].T
    return _ln(w, "ln_out", x) @ w["head.weight"].T
