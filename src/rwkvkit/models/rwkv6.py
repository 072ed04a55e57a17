"""RWKV-6 "Finch" (x060), as in the official release.

Per token, with x the normalised block input and x_prev the previous token's:

    time-mix:  xx = x_prev - x
               m_w, m_k, m_v, m_r, m_g = tanh((x + xx mu_x) maa_w1) maa_w2     (ddlerp LoRA)
               x_* = x + xx (mu_* + m_*)
               r = W_r x_r;  k = W_k x_k;  v = W_v x_v;  g = SiLU(W_g x_g)
               log w = -exp(time_decay + tanh(x_w decay_w1) decay_w2)          (float32)
               y = S r + (sum(r u k) per head) v;   S = S diag(w) + v k^T     (per head)
               out = W_o (GroupNorm(y) * g)
    channel-mix: out = sigmoid(W_r x_r) * W_v relu(W_k x_k)^2,  x_* = x + (x_prev - x) mu_*

The WKV state is [value, key] like RWKV-7's; the official files' ``time_state`` (state
tuning) is stored in that orientation already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from .recurrent import RWKVModel, group_norm_heads, layer_count, official_matrix_init, shape_of, token_shift
from .registry import register

GROUPNORM_EPS = 64e-5
MIX_NAMES = ("w", "k", "v", "r", "g")  # the order of the ddlerp LoRA's five outputs


def ffn_default(n_embd: int) -> int:
    """The official RWKV-5/6 channel-mix width: 3.5 C rounded down to a multiple of 32."""
    return int((n_embd * 3.5) // 32 * 32)


def init_decay_and_bonus(C: int, H: int, r0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official RWKV-5/6 init of time_decay and time_faaaa (flat [C])."""
    n = torch.arange(C, dtype=torch.float64)
    decay = -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r0)
    bonus = r0 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1
    return decay, bonus


def mix_init(C: int, layer_id: int, n_layer: int) -> dict[str, torch.Tensor]:
    """The official RWKV-6 token-shift init values [1, 1, C] (float64) of layer ``layer_id``:
    "base" 1 - ddd^r1 (x, w, k), "fast" 1 - ddd^(r1/2) (r, g), "value" 1 - (ddd^r1 + 0.3 r0)
    and "ffn" 1 - ddd^(r1^3) (the channel-mix), with ddd_i = i/C, r0 = l/(L-1), r1 = 1 - l/L."""
    ddd = torch.arange(C, dtype=torch.float64).view(1, 1, C) / C
    r0 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    r1 = 1.0 - layer_id / n_layer
    return {"base": 1.0 - ddd**r1, "fast": 1.0 - ddd ** (0.5 * r1), "value": 1.0 - (ddd**r1 + 0.3 * r0),
            "ffn": 1.0 - ddd ** (r1**3)}


def ddlerp(module: nn.Module, x: torch.Tensor, x_prev: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Finch's data-dependent token shift: x + (x_{t-1} - x) * (time_maa_n + LoRA_n(x)) for
    each of the five names, in the order of the LoRA's outputs."""
    B, T, _ = x.shape
    xx = token_shift(x, x_prev) - x
    lora = torch.tanh((x + xx * module.time_maa_x) @ module.time_maa_w1).view(B, T, len(names), -1)
    m = torch.einsum("btjd,jdc->jbtc", lora, module.time_maa_w2)
    return [x + xx * (getattr(module, f"time_maa_{n}") + m[j]) for j, n in enumerate(names)]


def data_decay(module: nn.Module, xw: torch.Tensor) -> torch.Tensor:
    """Finch's log-decay from its LoRA, -exp(time_decay + LoRA(xw)), in at least float32."""
    z = module.time_decay + torch.tanh(xw @ module.time_decay_w1) @ module.time_decay_w2
    return -torch.exp(z.to(torch.promote_types(z.dtype, torch.float32)))


def add_data_dependent_params(module: nn.Module, C: int, Dm: int, Dd: int, mix_names: tuple[str, ...]) -> None:
    """The parameters of :func:`ddlerp` (time_maa_x, one time_maa_* per name, the LoRA
    time_maa_w1/w2 with one output per name) and of :func:`data_decay` (time_decay and its
    LoRA), in the official order."""
    for name in ("x", *mix_names):
        setattr(module, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, C)))
    module.time_maa_w1 = nn.Parameter(torch.empty(C, len(mix_names) * Dm))
    module.time_maa_w2 = nn.Parameter(torch.empty(len(mix_names), Dm, C))
    module.time_decay = nn.Parameter(torch.empty(1, 1, C))
    module.time_decay_w1 = nn.Parameter(torch.empty(C, Dd))
    module.time_decay_w2 = nn.Parameter(torch.empty(Dd, C))


def add_projections(module: nn.Module, C: int, H: int) -> None:
    """The RWKV-5/6 time-mix matrices (receptance, key, value, gate, output) and ln_x."""
    for name in ("receptance", "key", "value", "gate", "output"):
        setattr(module, name, nn.Linear(C, C, bias=False))
    module.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)


class TimeMix(nn.Module):
    """The RWKV-6 attention ("att") sub-block."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        Dm, Dd = config.lora["maa"], config.lora["decay"]
        self.n_head, self.head_size = H, N
        add_data_dependent_params(self, C, Dm, Dd, MIX_NAMES)
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        add_projections(self, C, H)

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xw, xk, xv, xr, xg = ddlerp(self, x, x_prev, MIX_NAMES)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        log_w = data_decay(self, xw)

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, wkv = ops.wkv6(heads(r), heads(log_w), heads(k), heads(v), self.time_faaaa, wkv)
        return self.output(group_norm_heads(y, self.ln_x, x.dtype) * g), wkv, v_first


class ChannelMix(nn.Module):
    """The RWKV-6 feed-forward ("ffn") sub-block: squared ReLU with a receptance gate."""

    MIX = ("time_maa_k", "time_maa_r")  # RWKV-5 names them time_mix_*

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.ffn_dim
        for name in self.MIX:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    @torch.no_grad()
    def reset_mix(self, value: torch.Tensor) -> None:
        """Set both token-shift mixes to ``value`` [1, 1, C] (see :func:`mix_init`)."""
        for name in self.MIX:
            getattr(self, name).copy_(value)

    def mix(self, x: torch.Tensor, prev: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """RWKV-6/7 token mixing: ``mu`` is the weight of the previous token."""
        return x + (prev - x) * mu

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        prev = token_shift(x, x_prev)
        xk, xr = (self.mix(x, prev, getattr(self, name)) for name in self.MIX)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2)


RWKV56_MATRIX_GAINS = {
    "att.receptance.weight": 1.0, "att.key.weight": 0.1, "att.value.weight": 1.0, "att.gate.weight": 0.1,
    "att.output.weight": 0.0, "ffn.key.weight": 1.0, "ffn.receptance.weight": 0.0, "ffn.value.weight": 0.0,
}


@register("rwkv6")
class RWKV6(RWKVModel):
    """RWKV-6 "Finch" language model: ``forward(tokens, state) -> (logits, state)``."""

    def __init__(self, config: ModelConfig) -> None:
        big = config.n_embd >= 4096
        config.lora = {"maa": 64 if big else 32, "decay": 128 if big else 64, **config.lora}
        config.ffn_dim = config.ffn_dim or ffn_default(config.n_embd)
        super().__init__(config, lambda i: TimeMix(config, i), lambda i: ChannelMix(config))

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        vocab, C = shape_of(sd, "emb.weight")
        H, N = shape_of(sd, "blocks.0.att.time_faaaa")
        return ModelConfig(
            arch="rwkv6", n_layer=layer_count(sd), n_embd=C, vocab_size=vocab, head_size=N,
            ffn_dim=shape_of(sd, "blocks.0.ffn.key.weight")[0],
            lora={"maa": shape_of(sd, "blocks.0.att.time_maa_w1")[1] // 5,
                  "decay": shape_of(sd, "blocks.0.att.time_decay_w1")[1]},
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the official RWKV-6 from-scratch recipe does."""
        cfg = self.config
        C, L, H = cfg.n_embd, cfg.n_layer, cfg.n_head
        official_matrix_init(self, RWKV56_MATRIX_GAINS)
        for i, block in enumerate(self.blocks):
            r0 = i / (L - 1) if L > 1 else 0.0
            att = block.att
            mix = mix_init(C, i, L)
            for name, kind in (("x", "base"), ("w", "base"), ("k", "base"), ("v", "value"), ("r", "fast"),
                               ("g", "fast")):
                getattr(att, f"time_maa_{name}").copy_(mix[kind])
            att.time_maa_w1.zero_()
            att.time_maa_w2.uniform_(-0.01, 0.01)
            decay, bonus = init_decay_and_bonus(C, H, r0)
            att.time_decay.copy_(decay.view(1, 1, C))
            att.time_faaaa.copy_(bonus.view(H, -1))
            att.time_decay_w1.zero_()
            att.time_decay_w2.uniform_(-0.01, 0.01)
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            att.ln_x.bias.zero_()
            block.ffn.reset_mix(mix["ffn"])
