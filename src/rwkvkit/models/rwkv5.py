"""RWKV-5.2 "Eagle" (x052), as in the official release.

Like RWKV-6 (see rwkv6.py) but with static token mixing and a static decay:

    x_* = x mu_* + x_prev (1 - mu_*)          (mu weighs the CURRENT token, unlike v6/v7)
    r = W_r x_r;  k = W_k x_k;  v = W_v x_v;  g = SiLU(W_g x_g)
    log w = -exp(time_decay)   per channel, the same at every token
    y = S r + (sum(r u k) per head) v;   S = S diag(w) + v k^T
    out = W_o (GroupNorm(y) * g)
    channel-mix: out = sigmoid(W_r x_r) * W_v relu(W_k x_k)^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from .recurrent import RWKVModel, group_norm_heads, layer_count, official_matrix_init, shape_of, token_shift
from .registry import register
from . import rwkv6
from .rwkv6 import RWKV56_MATRIX_GAINS, ffn_default, init_decay_and_bonus


def mix(x: torch.Tensor, prev: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """RWKV-5 token mixing: ``mu`` is the weight of the current token."""
    return x * mu + prev * (1 - mu)


class TimeMix(nn.Module):
    """The RWKV-5.2 attention ("att") sub-block."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g = (
            nn.Parameter(torch.empty(1, 1, C)) for _ in range(4)
        )
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        rwkv6.add_projections(self, C, H)

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = token_shift(x, x_prev)
        r = self.receptance(mix(x, prev, self.time_mix_r))
        k = self.key(mix(x, prev, self.time_mix_k))
        v = self.value(mix(x, prev, self.time_mix_v))
        g = F.silu(self.gate(mix(x, prev, self.time_mix_g)))
        decay = self.time_decay.to(torch.promote_types(self.time_decay.dtype, torch.float32))
        log_w = (-torch.exp(decay)).expand(B, T, H, N)

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, wkv = ops.wkv6(heads(r), log_w, heads(k), heads(v), self.time_faaaa, wkv)
        return self.output(group_norm_heads(y, self.ln_x, x.dtype) * g), wkv, v_first


class ChannelMix(rwkv6.ChannelMix):
    """The RWKV-5 feed-forward ("ffn") sub-block: RWKV-6's with RWKV-5 token mixing."""

    MIX = ("time_mix_k", "time_mix_r")

    def mix(self, x: torch.Tensor, prev: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return mix(x, prev, mu)


@register("rwkv5")
class RWKV5(RWKVModel):
    """RWKV-5.2 "Eagle" language model: ``forward(tokens, state) -> (logits, state)``."""

    def __init__(self, config: ModelConfig) -> None:
        config.ffn_dim = config.ffn_dim or ffn_default(config.n_embd)
        super().__init__(config, lambda i: TimeMix(config, i), lambda i: ChannelMix(config))

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        vocab, C = shape_of(sd, "emb.weight")
        H, N = shape_of(sd, "blocks.0.att.time_decay")
        return ModelConfig(
            arch="rwkv5", n_layer=layer_count(sd), n_embd=C, vocab_size=vocab, head_size=N,
            ffn_dim=shape_of(sd, "blocks.0.ffn.key.weight")[0],
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the official RWKV-5.2 from-scratch recipe does."""
        cfg = self.config
        C, L, H = cfg.n_embd, cfg.n_layer, cfg.n_head
        ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
        official_matrix_init(self, RWKV56_MATRIX_GAINS)
        for i, block in enumerate(self.blocks):
            r0 = i / (L - 1) if L > 1 else 0.0
            r1 = 1.0 - i / L
            att, ffn = block.att, block.ffn
            att.time_mix_k.copy_(ddd**r1)
            att.time_mix_v.copy_(ddd**r1 + 0.3 * r0)
            att.time_mix_r.copy_(ddd ** (0.5 * r1))
            att.time_mix_g.copy_(ddd ** (0.5 * r1))
            decay, bonus = init_decay_and_bonus(C, H, r0)
            att.time_decay.copy_(decay.view(H, -1))
            att.time_faaaa.copy_(bonus.view(H, -1))
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            att.ln_x.bias.zero_()
            ffn.time_mix_k.copy_(ddd**r1)
            ffn.time_mix_r.copy_(ddd**r1)
