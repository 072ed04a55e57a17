"""The Llama baseline of the GoldFinch paper (its code's ``tmix_llama`` + ``cmix_llama``).

    x = ln0(emb[tokens])                      small-init embedding + ln0, as the RWKV models
    for each block:
        q, k, v = W_q x', W_k x', W_v x'      x' = ln1(x); full multi-head attention (no GQA)
        q, k = RoPE(q), RoPE(k)               base 10000, channel pairs (2i, 2i+1)
        x = x + W_o softmax_causal(q k^T / sqrt(D)) v
        x = x + W_2 (SiLU(W_1 x'') * W_3 x'')   x'' = ln2(x); SwiGLU, width C*8/3 rounded
                                                 down to a multiple of 32
    h = ln_out(x);  logits = head(h)

Norms are LayerNorms (the paper's choice, "to favour Llama"); ``extra["norm"] = "rmsnorm"``
gives RMSNorm (eps 1e-5) everywhere. The state is a key/value cache
(:class:`~rwkvkit.state.KVCacheState`, keys stored after RoPE); a prompt continued in pieces
attends with the bottom-right causal mask, so any split gives the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import ConfigError, StateError
from ..state import KVCacheState
from .attention import causal_attention, check_rope_base, rope
from .base import check_batch_size
from .recurrent import BlockStackModel, layer_count, official_matrix_init, shape_of
from .registry import register

LLAMA_OPTIONS = ("rope_base", "norm")
NORMS = ("layernorm", "rmsnorm")
MATRIX_GAINS = {name: 1.0 for name in ("att.wq.weight", "att.wk.weight", "att.wv.weight", "att.wo.weight",
                                       "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight")}


def swiglu_default(n_embd: int) -> int:
    """The baseline's SwiGLU width: C * 4 * 2/3 rounded down to a multiple of 32."""
    return n_embd * 4 * 2 // 3 // 32 * 32


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE and a key/value cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_size = config.n_head, config.head_size
        self.rope_base = float(config.extra["rope_base"])
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self, name, nn.Linear(C, C, bias=False))

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, T, C] after the cached positions; caches [B, H, N, D]. Returns (output,
        keys and values of all N + T positions)."""
        B, T, C = x.shape
        N = k_cache.shape[2]
        heads = lambda t: t.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        if self.rope_base:
            positions = torch.arange(N, N + T, device=x.device)
            q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        k = torch.cat([k_cache.to(k.dtype), k], dim=2)
        v = torch.cat([v_cache.to(v.dtype), v], dim=2)
        y = causal_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, C)), k, v


class SwiGLU(nn.Module):
    """The feed-forward sub-block: W_2 (SiLU(W_1 x) * W_3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.ffn_dim
        self.w1 = nn.Linear(C, F_, bias=False)
        self.w2 = nn.Linear(F_, C, bias=False)
        self.w3 = nn.Linear(C, F_, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@register("llama")
class Llama(BlockStackModel):
    """Llama baseline language model: ``forward(tokens, state) -> (logits, state)``.

    ``config.extra``: ``rope_base`` (10000; 0 turns RoPE off) and ``norm`` ("layernorm" or
    "rmsnorm").
    """

    def __init__(self, config: ModelConfig) -> None:
        config.ffn_dim = config.ffn_dim or swiglu_default(config.n_embd)
        config.extra = {"rope_base": 10000.0, "norm": "layernorm", **config.extra}
        _check_options(config)
        if config.extra["norm"] == "rmsnorm":
            norm = lambda C: nn.RMSNorm(C, eps=1e-5)  # noqa: E731
        else:
            norm = nn.LayerNorm
        super().__init__(config, lambda i: Attention(config), lambda i: SwiGLU(config), norm=norm)

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        vocab, C = shape_of(sd, "emb.weight")
        norm = "layernorm" if "blocks.0.ln1.bias" in sd else "rmsnorm"
        return ModelConfig(arch="llama", n_layer=layer_count(sd), n_embd=C, vocab_size=vocab,
                           ffn_dim=shape_of(sd, "blocks.0.ffn.w1.weight")[0], extra={"norm": norm})

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The GoldFinch code's init: small uniform embedding, head at gain 0.5 sqrt(V/C),
        every other matrix orthogonal at gain 1, norms at identity."""
        official_matrix_init(self, MATRIX_GAINS)

    def optim_group(self, name: str, param: torch.Tensor) -> str:
        """Weight decay on the matrices (embedding and head included), lr x1 for the rest."""
        return "decay" if param.squeeze().dim() >= 2 else "lr1x"

    # -- state --------------------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> KVCacheState:
        """An empty key/value cache."""
        return self._empty_cache(check_batch_size(batch_size), self.device)

    def state_template(self) -> KVCacheState:
        return self._empty_cache(1, torch.device("meta"))

    def _empty_cache(self, B: int, device: torch.device) -> KVCacheState:
        cfg = self.config
        empty = torch.zeros(cfg.n_layer, B, cfg.n_head, 0, cfg.head_size, dtype=self.dtype, device=device)
        return KVCacheState(arch=self.arch, k=empty, v=empty.clone())

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Keys and values of every layer: 2 L C values in ``dtype`` (default: the model's)."""
        return 2 * self.config.n_layer * self.config.n_embd * (dtype or self.dtype).itemsize

    # -- forward ------------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, state: KVCacheState | None = None) -> tuple[torch.Tensor, KVCacheState]:
        tokens = self.check_tokens(tokens)
        B = tokens.shape[0]
        if state is None:
            state = self.init_state(B)
        else:
            if not isinstance(state, KVCacheState):
                raise StateError(f"state must be a KVCacheState, got {type(state).__name__}")
            self.state_template().check_compatible(state)
            if state.batch_size != B:
                raise StateError(f"state has batch size {state.batch_size}, tokens have {B} rows")
            state = KVCacheState(arch=state.arch, k=state.k.to(self.device, self.dtype),
                                 v=state.v.to(self.device, self.dtype))
        x = self.blocks[0].ln0(self.emb(tokens))
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = self._checkpointed(self._block, block, x, state.k[i], state.v[i])
            ks.append(k)
            vs.append(v)
        new_state = KVCacheState(arch=self.arch, k=torch.stack(ks).to(state.k.dtype),
                                 v=torch.stack(vs).to(state.v.dtype))
        return self.ln_out(x), new_state

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        out, k, v = block.att(block.ln1(x), k_cache, v_cache)
        x = x + out
        return x + block.ffn(block.ln2(x)), k, v


def _check_options(config: ModelConfig) -> None:
    ex = config.extra
    unknown = sorted(set(ex) - set(LLAMA_OPTIONS))
    if unknown:
        raise ConfigError(f"config: unknown Llama option(s) {', '.join(unknown)} (known: {', '.join(LLAMA_OPTIONS)})")
    if ex["norm"] not in NORMS:
        raise ConfigError(f"config: norm must be one of {', '.join(NORMS)}, got {ex['norm']!r}")
    check_rope_base(ex["rope_base"], config.head_size)
