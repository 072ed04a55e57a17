"""RWKV-7 "Goose" (x070), as in the official release.

Parameter names and shapes are the official checkpoint keys, so an official ``.pth`` loads
with ``load_state_dict`` and ``state_dict()`` is the official layout (without the unused
``blocks.0.att.v0/v1/v2``). Per token, with x the normalised block input and x_prev the
previous token's:

    time-mix:  xx = x_prev - x;  x_* = x + xx * mu_*                     (plain lerp)
               r = W_r x_r;  k = W_k x_k;  v = W_v x_v
               log w = -e^-0.5 * sigmoid(w0 + tanh(x_w w1) w2)            (decay in (0.545, 1))
               v = lerp(v, v_first, sigmoid(v0 + x_v v1 v2))   (layers > 0; value residual)
               a = sigmoid(a0 + x_a a1 a2);  g = sigmoid(x_g g1) g2
               kk = normalize(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
               S = S diag(w) + (S (-kk)) (kk a)^T + v k^T;  y = S r           (per head)
               y = GroupNorm(y) + (sum(r * k * r_k) per head) * v
               out = W_o (y * g)
    channel-mix: k = relu(W_k (x + (x_prev - x) mu_k))^2;  out = W_v k

Numerics follow the reference: decay and the WKV state in float32, GroupNorm eps 64e-5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..errors import StateDictError, StateError
from ..state import RecurrentState
from .base import LanguageModel
from .registry import register

DECAY_SCALE = math.exp(-0.5)  # log w = -DECAY_SCALE * sigmoid(z)
GROUPNORM_EPS = 64e-5


def default_lora_sizes(n_embd: int) -> dict[str, int]:
    """Low-rank sizes of the current official recipe (64/64/32/128 at C=768)."""

    def size(factor: float) -> int:
        return max(32, round(factor * math.sqrt(n_embd) / 32) * 32)

    return {"w": size(2.5), "a": size(2.5), "v": size(1.7), "g": size(5.0)}


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's input at every position: [prev, x_0, ..., x_{T-2}]."""
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """The RWKV-7 attention ("att") sub-block of layer ``layer_id``."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        Dw, Da, Dv, Dg = (config.lora[n] for n in ("w", "a", "v", "g"))
        self.layer_id, self.n_head, self.head_size = layer_id, H, N

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.empty(1, 1, C))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), nn.Parameter(torch.empty(C, Dw)), nn.Parameter(torch.empty(Dw, C))
        self.a0, self.a1, self.a2 = vec(), nn.Parameter(torch.empty(C, Da)), nn.Parameter(torch.empty(Da, C))
        if layer_id > 0:  # layer 0's value is v_first itself: it has no residual mix
            self.v0, self.v1, self.v2 = vec(), nn.Parameter(torch.empty(C, Dv)), nn.Parameter(torch.empty(Dv, C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, Dg)), nn.Parameter(torch.empty(Dg, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] (ln1 output), x_prev [B, C], wkv [B, H, N, N] -> (out, new wkv, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev) - x
        xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        z = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)
        log_w = -DECAY_SCALE * torch.sigmoid(z.to(torch.promote_types(z.dtype, torch.float32)))

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, wkv = ops.wkv7(heads(r), heads(log_w), heads(k), heads(v), -kk, kk * heads(a), wkv)

        y = F.group_norm(
            y.reshape(B * T, C), H, self.ln_x.weight.to(y.dtype), self.ln_x.bias.to(y.dtype), eps=GROUPNORM_EPS
        ).view(B, T, C).to(x.dtype)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), wkv, v_first


class ChannelMix(nn.Module):
    """The RWKV-7 feed-forward ("ffn") sub-block: squared ReLU, no receptance gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.ffn_dim
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        xk = x + (token_shift(x, x_prev) - x) * self.x_k
        return self.value(torch.relu(self.key(xk)) ** 2)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config)


@register("rwkv7")
class RWKV7(LanguageModel):
    """RWKV-7 "Goose" language model: ``forward(tokens, state) -> (logits, state)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        missing = {"w", "a", "v", "g"} - set(config.lora)
        if missing:
            config.lora = {**default_lora_sizes(config.n_embd), **config.lora}
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        if self.emb.weight.device.type != "meta":
            self.reset_parameters()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise StateDictError(f"missing key {key!r}, needed to infer the model's sizes")
            return tuple(sd[key].shape)

        vocab, C = shape("emb.weight")
        H, N = shape("blocks.0.att.r_k")
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        lora = {"w": shape("blocks.0.att.w1")[1], "a": shape("blocks.0.att.a1")[1], "g": shape("blocks.0.att.g1")[1]}
        if n_layer > 1:
            lora["v"] = shape("blocks.1.att.v1")[1]
        elif "blocks.0.att.v1" in sd:
            lora["v"] = shape("blocks.0.att.v1")[1]
        return ModelConfig(
            arch="rwkv7", n_layer=n_layer, n_embd=C, vocab_size=vocab, head_size=N,
            ffn_dim=shape("blocks.0.ffn.key.weight")[0], lora=lora,
        )

    @classmethod
    def ignored_keys(cls, sd: dict[str, torch.Tensor]) -> set[str]:
        return {k for k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2") if k in sd}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the official from-scratch recipe does (train_temp, "better rwkv7 init")."""
        cfg = self.config
        C, L, N, V = cfg.n_embd, cfg.n_layer, cfg.head_size, cfg.vocab_size
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()

        def ortho(w: torch.Tensor, gain: float) -> None:
            rows, cols = w.shape
            nn.init.orthogonal_(w, gain=gain * (math.sqrt(rows / cols) if rows > cols else 1.0))

        def put(p: torch.Tensor, value: torch.Tensor) -> None:
            p.copy_(value.reshape(p.shape).to(p.dtype))

        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        ortho(self.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5)
        for i, block in enumerate(self.blocks):
            r0 = i / (L - 1) if L > 1 else 0.0
            r1 = 1.0 - i / L
            att, ffn = block.att, block.ffn
            for name, p in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)):
                put(getattr(att, f"x_{name}"), 1.0 - ddd ** (p * r1))
            www = -6 + 6 * (n / (C - 1)) ** (1 + r0**0.3)
            put(att.w0, www + 0.5 + 2.5 * zigzag)
            put(att.a0, -0.19 + 0.3 * zigzag + 0.4 * linear)
            lora_pairs = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
            if i > 0:
                put(att.v0, 0.73 - 0.4 * linear)
                lora_pairs.append((att.v1, att.v2))
            for w_in, w_out in lora_pairs:
                w_in.zero_()
                ortho(w_out, 0.1)
            put(att.k_k, 0.71 - 0.1 * linear)
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            ortho(att.receptance.weight, 1.0)
            ortho(att.key.weight, 0.1)
            ortho(att.value.weight, 1.0)
            att.output.weight.zero_()
            att.ln_x.weight.copy_(torch.full((C,), ((1 + i) / L) ** 0.7))
            att.ln_x.bias.zero_()
            put(ffn.x_k, 1.0 - ddd ** (r1**4))
            ortho(ffn.key.weight, 1.0)
            ffn.value.weight.zero_()
            for ln in (block.ln1, block.ln2, *((block.ln0,) if i == 0 else ())):
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
        nn.init.ones_(self.ln_out.weight)
        nn.init.zeros_(self.ln_out.bias)

    # -- state ------------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> RecurrentState:
        """The initial state for ``batch_size`` rows: the tuned state if any, else zeros."""
        if self.default_state is not None:
            return self.default_state.to(self.device).expand(batch_size)
        cfg = self.config
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        dev, dt = self.device, self.dtype
        wkv_dtype = torch.float64 if dt == torch.float64 else torch.float32
        return RecurrentState(
            arch=self.arch,
            att_shift=torch.zeros(L, batch_size, C, dtype=dt, device=dev),
            wkv=torch.zeros(L, batch_size, H, N, N, dtype=wkv_dtype, device=dev),
            ffn_shift=torch.zeros(L, batch_size, C, dtype=dt, device=dev),
        )

    # -- forward ----------------------------------------------------------------------------
    def hidden(
        self, tokens: torch.Tensor, state: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState]:
        tokens = self.check_tokens(tokens)
        B = tokens.shape[0]
        if state is None:
            state = self.init_state(B)
        else:
            self.init_state(1).check_compatible(state)
            if state.batch_size != B:
                raise StateError(f"state has batch size {state.batch_size}, tokens have {B} rows")
        x = self.emb(tokens)
        v_first = None
        att_shift, wkv, ffn_shift = [], [], []
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            xa = block.ln1(x)
            out, s, v_first = block.att(xa, state.att_shift[i].to(xa.dtype), state.wkv[i], v_first)
            x = x + out
            xf = block.ln2(x)
            x = x + block.ffn(xf, state.ffn_shift[i].to(xf.dtype))
            att_shift.append(xa[:, -1])
            wkv.append(s)
            ffn_shift.append(xf[:, -1])
        new_state = RecurrentState(
            arch=self.arch,
            att_shift=torch.stack(att_shift).to(state.att_shift.dtype),
            wkv=torch.stack(wkv).to(state.wkv.dtype),
            ffn_shift=torch.stack(ffn_shift).to(state.ffn_shift.dtype),
        )
        return self.ln_out(x), new_state
