"""GoldFinch: Finch-C2 layers below, GOLD attention layers above, one compressed key cache.

Goldstein et al., "GoldFinch: High Performance RWKV/Transformer Hybrid with Linear Pre-Fill
and Extreme KV-Cache Compression" (arXiv:2407.12077); our spec: shared/spec/goldfinch.md.
Architectures: "goldfinch" (the hybrid) and "finch-c2" (Finch-C2 blocks only).

    x = ln0(emb[tokens]);  x0 = x                                (the block-0 input)
    blocks [0, L-G):  x += c2_att(ln1(x));  x += ffn(ln2(x))     Finch-C2, recurrent
    c  = x W_KD                               C/16 per token: the only cached activation
    kD = rms_norm(cat[x0, c] W_KU)            "proto-keys", shared by every GOLD layer
    e  = rms_norm(x0)                         the embeddings: GOLD values come from these
    blocks [L-G, L):  x += gold_att(ln1(x), kD, e);  x += ffn(ln2(x))
    h = ln_out(x);  logits = head(h)
with rms_norm(x) = x / (sqrt(mean(x^2)) + 1e-8) (no weight) and ffn the Finch channel-mix.

Finch-C2 time-mix (Finch, RWKV-6, with four changes marked *):
    xx = x_prev - x;  m_r, m_k, m_v, m_w, m_v2 = tanh((x + xx mu_x) maa_w1) maa_w2   (* order)
    x_* = x + xx (mu_* + m_*);  r = W_r x_r;  v = W_v x_v
    log w = -exp(time_decay + tanh(x_w decay_w1) decay_w2)
    k = W_k x_k * (1 - w)                                   * keeps the state rows normalised
    y = S r;  S = S diag(w) + v k^T                         * no bonus u: WKV-6 with u = 0
    v2 = W_v x_v2 + tanh(x_v2 value2_w1) value2_w2          * a second value replaces the bonus
    out = W_o LayerNorm(y + v2)                             * LayerNorm over all heads; no gate

GOLD time-mix (queries from the hidden state, keys from kD, values from e):
    q   = LN_q(W_q ddlerp_q(x, x_prev))                      one ddlerp LoRA, as Finch's
    a_t = e_t + (e_{t-1} - e_t) mu_vcache;  m_k, m_v = tanh(a maa_kv_w1) maa_kv_w2
    k~  = kD_t + (kD_{t-1} - kD_t)(mu_k + m_k);  v~ = e_t + (e_{t-1} - e_t)(mu_v + m_v)
    k   = LN_k(k~ + tanh(k~ key_w1) key_w2);     v  = LN_v(v~ + tanh(v~ value_w1) value_w2)
    out = W_o LN_x(softmax attention(q, k, v), causal, per head)    (no position encoding,
          RoPE optional: ``extra["rope_base"]``), with kD_{-1} = e_{-1} = 0.

State and cache (:class:`~rwkvkit.state.GoldFinchState`): the Finch-C2 layers' recurrent state,
the GOLD layers' token-shift vectors, and for the whole model only ``c`` (C/16 values in the
model dtype) and the token ids (int32) of every token so far: kD, e, and every GOLD layer's
keys and values are rebuilt from them at each call, ``cache_chunk`` positions at a time, so
the memory beyond the cache itself stays bounded whatever the context length. Rows of a
batch share a cache length.

Linear-time prefill: with ``last_only`` the Finch-C2 blocks (chunked WKV, O(N)) run over the
whole prompt and fill the cache, and the GOLD blocks run only over the last 2G positions
(G GOLD blocks): each of their 2G sub-layers reads the previous token through its token
shift, so position t of sub-layer j is exact once the window reaches j positions further
back; 2G positions make the last logits and every GOLD shift state exact (spec section 5).
Decoding a token costs O(N) attention per GOLD layer. ``last_only=False`` (training,
``hidden``) runs every layer at every position.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..errors import ConfigError, StateDictError, StateError
from ..state import GoldFinchState
from .attention import check_rope_base, chunked_causal_attention, rope
from .base import check_batch_size
from .recurrent import BlockStackModel, RWKVModel, layer_count, official_matrix_init, shape_of, token_shift
from .registry import register
from .rwkv6 import (
    RWKV56_MATRIX_GAINS,
    ChannelMix,
    add_data_dependent_params,
    data_decay,
    ddlerp,
    ffn_default,
    init_decay_and_bonus,
    mix_init,
)

COMPRESSION = 16  # c has C / 16 channels
CACHE_CHUNK = 4096  # cache positions rebuilt into keys and values at a time
GOLDFINCH_OPTIONS = ("gold_layers", "compression", "rope_base")
MATRIX_GAINS = {**RWKV56_MATRIX_GAINS, "att.query.weight": 1.0, "w_kv_cache_a.weight": 1.0, "w_kv_cache_b.weight": 1.0}


def default_gold_layers(n_layer: int) -> int:
    """The official split: the last third of the blocks are GOLD (first GOLD block
    ``int(n_layer * 2 / 3)``: L12 -> blocks 8-11, L24 -> 16-23)."""
    return n_layer - int(n_layer * 2 / 3)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x / (RMS(x) + 1e-8) over the last axis (no weight; the epsilon outside the root, as
    the official code), computed in float32 or better."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    return (y / (y.norm(dim=-1, keepdim=True) * y.shape[-1] ** -0.5 + 1e-8)).to(x.dtype)


def full_layer_norm(y: torch.Tensor, ln: nn.LayerNorm, out_dtype: torch.dtype) -> torch.Tensor:
    """``ln`` over the whole width, in float32 or better (as the official eval path)."""
    dt = torch.promote_types(y.dtype, torch.float32)
    return F.layer_norm(y.to(dt), ln.normalized_shape, ln.weight.to(dt), ln.bias.to(dt), ln.eps).to(out_dtype)


# -- Finch-C2 --------------------------------------------------------------------------------------
class FinchC2TimeMix(nn.Module):
    """The Finch-C2 ("RWKV-6-C2", x060c2) attention sub-block."""

    MIX_NAMES = ("r", "k", "v", "w", "v2")  # the order of the ddlerp LoRA's five outputs

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        Dm, Dd = config.lora["maa"], config.lora["decay"]
        self.n_head, self.head_size = H, N
        add_data_dependent_params(self, C, Dm, Dd, self.MIX_NAMES)
        self.time_value2_w1 = nn.Parameter(torch.empty(C, Dd))
        self.time_value2_w2 = nn.Parameter(torch.empty(Dd, C))
        for name in ("receptance", "key", "value", "output"):
            setattr(self, name, nn.Linear(C, C, bias=False))
        self.ln_x = nn.LayerNorm(C)

    @torch.no_grad()
    def reset_parameters(self, layer_id: int, n_layer: int) -> None:
        """The official init (Finch's, with v2 mixed like v); big matrices and LayerNorms
        are set by the model (:func:`official_matrix_init`) before this."""
        C = self.time_decay.shape[-1]
        mix = mix_init(C, layer_id, n_layer)
        for name, kind in (("x", "base"), ("r", "fast"), ("k", "base"), ("v", "value"), ("w", "base"),
                           ("v2", "value")):
            getattr(self, f"time_maa_{name}").copy_(mix[kind])
        r0 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
        self.time_decay.copy_(init_decay_and_bonus(C, self.n_head, r0)[0].view(1, 1, C))
        for name in ("time_maa", "time_decay", "time_value2"):
            getattr(self, f"{name}_w1").zero_()
            getattr(self, f"{name}_w2").uniform_(-0.01, 0.01)
        self.ln_x.weight.fill_(((1 + layer_id) / n_layer) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(
        self, x: torch.Tensor, x_prev: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xr, xk, xv, xw, xv2 = ddlerp(self, x, x_prev, self.MIX_NAMES)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        v2 = self.value(xv2) + torch.tanh(xv2 @ self.time_value2_w1) @ self.time_value2_w2
        log_w = data_decay(self, xw)
        k = k * (-torch.expm1(log_w)).to(k.dtype)  # k (1 - w)

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        no_bonus = torch.zeros(H, N, dtype=wkv.dtype, device=x.device)
        y, wkv = ops.wkv6(heads(r), heads(log_w), heads(k), heads(v), no_bonus, wkv)
        y = y.reshape(B, T, C) + v2.to(y.dtype)
        return self.output(full_layer_norm(y, self.ln_x, x.dtype)), wkv, v_first


def _c2_sizes(config: ModelConfig) -> None:
    """Fill Finch-C2's default low-rank sizes and channel-mix width into ``config``."""
    big = config.n_embd >= 4096  # the later official configs' ranks for wide models
    config.lora = {"maa": 64 if big else 32, "decay": 128 if big else 64, **config.lora}
    config.ffn_dim = config.ffn_dim or ffn_default(config.n_embd)


def _c2_config(sd: dict[str, torch.Tensor], arch: str) -> ModelConfig:
    vocab, C = shape_of(sd, "emb.weight")
    head_size = sd["blocks.0.att.time_faaaa"].shape[1] if "blocks.0.att.time_faaaa" in sd else 64
    return ModelConfig(
        arch=arch, n_layer=layer_count(sd), n_embd=C, vocab_size=vocab, head_size=head_size,
        ffn_dim=shape_of(sd, "blocks.0.ffn.key.weight")[0],
        lora={"maa": shape_of(sd, "blocks.0.att.time_maa_w1")[1] // 5,
              "decay": shape_of(sd, "blocks.0.att.time_decay_w1")[1]},
    )


def _unused_bonus(sd: dict[str, torch.Tensor]) -> set[str]:
    # Official Finch-C2 files keep time_faaaa, which the kernel never reads (u = 0).
    return {k for k in sd if k.endswith(".att.time_faaaa")}


@register("finch-c2")
class FinchC2(RWKVModel):
    """Finch-C2 ("RWKV-6-C2") language model: every block a Finch-C2 time-mix and a Finch
    channel-mix; the state is a :class:`~rwkvkit.state.RecurrentState` like RWKV-6's."""

    def __init__(self, config: ModelConfig) -> None:
        _c2_sizes(config)
        super().__init__(config, lambda i: FinchC2TimeMix(config), lambda i: ChannelMix(config))

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        return _c2_config(sd, "finch-c2")

    @classmethod
    def ignored_keys(cls, sd: dict[str, torch.Tensor]) -> set[str]:
        return super().ignored_keys(sd) | _unused_bonus(sd)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official from-scratch init (GoldFinch code, as Finch's)."""
        C, L = self.config.n_embd, self.config.n_layer
        official_matrix_init(self, RWKV56_MATRIX_GAINS)
        for i, block in enumerate(self.blocks):
            block.att.reset_parameters(i, L)
            block.ffn.reset_mix(mix_init(C, i, L)["ffn"])


# -- GOLD --------------------------------------------------------------------------------------------
class GoldTimeMix(nn.Module):
    """The GOLD attention sub-block: its own queries, keys and values made from the shared
    proto-keys kD and the embeddings e (no key or value matrices of its own)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        Dm, R = config.lora["maa"], config.lora["kv"]
        self.n_head, self.head_size = H, N
        for name in ("x", "q", "v_cache", "k", "v"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, C)))
        self.time_maa_q_w1 = nn.Parameter(torch.empty(C, Dm))
        self.time_maa_q_w2 = nn.Parameter(torch.empty(Dm, C))
        self.time_maa_kv_w1 = nn.Parameter(torch.empty(C, 2 * Dm))
        self.time_maa_kv_w2 = nn.Parameter(torch.empty(2, Dm, C))
        self.time_key_w1 = nn.Parameter(torch.empty(C, R))
        self.time_key_w2 = nn.Parameter(torch.empty(R, C))
        self.time_value_w1 = nn.Parameter(torch.empty(C, R))
        self.time_value_w2 = nn.Parameter(torch.empty(R, C))
        self.query = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        for name in ("ln_q", "ln_k", "ln_v", "ln_x"):
            setattr(self, name, nn.LayerNorm(C))

    @torch.no_grad()
    def reset_parameters(self, layer_id: int, n_layer: int) -> None:
        """The official init; query/output matrices and LayerNorms are set by the model."""
        mix = mix_init(self.time_maa_x.shape[-1], layer_id, n_layer)
        for name, kind in (("x", "base"), ("q", "fast"), ("v_cache", "base"), ("k", "base"), ("v", "value")):
            getattr(self, f"time_maa_{name}").copy_(mix[kind])
        for name in ("time_maa_q", "time_maa_kv", "time_key", "time_value"):
            getattr(self, f"{name}_w1").zero_()
            getattr(self, f"{name}_w2").uniform_(-0.01, 0.01)
        self.ln_x.weight.fill_(((1 + layer_id) / n_layer) ** 0.7)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, H, T, N]."""
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_size).transpose(1, 2)

    def queries(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, T, N] of the block inputs ``x`` [B, T, C] (eq. 17)."""
        xx = token_shift(x, x_prev) - x
        m = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_q_w1) @ self.time_maa_q_w2
        return self.heads(self.ln_q(self.query(x + xx * (self.time_maa_q + m))))

    def keys_values(self, kd: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, n, N] of n positions from their proto-keys and embeddings
        ``kd``, ``e`` [B, n + 1, C] (row 0: the position before, zeros at the start; eqs. 18-20)."""
        dk, kd = kd[:, :-1] - kd[:, 1:], kd[:, 1:]
        de, e = e[:, :-1] - e[:, 1:], e[:, 1:]
        B, n, _ = kd.shape
        lora = torch.tanh((e + de * self.time_maa_v_cache) @ self.time_maa_kv_w1).view(B, n, 2, -1)
        mk, mv = torch.einsum("btjd,jdc->jbtc", lora, self.time_maa_kv_w2)
        k = kd + dk * (self.time_maa_k + mk)
        v = e + de * (self.time_maa_v + mv)
        k = self.ln_k(k + torch.tanh(k @ self.time_key_w1) @ self.time_key_w2)
        v = self.ln_v(v + torch.tanh(v @ self.time_value_w1) @ self.time_value_w2)
        return self.heads(k), self.heads(v)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The sub-block's output from the attention result [B, H, T, N] (eq. 21)."""
        B, H, T, N = y.shape
        return self.output(self.ln_x(y.transpose(1, 2).reshape(B, T, H * N)))


class _KeySource:
    """kD and e of the cached positions, rebuilt from the compressed keys and token ids in
    chunks of ``chunk`` positions; the queries (the last ``n_query`` positions) always fall in
    the last chunk. With one chunk the result is computed once and kept for every layer."""

    def __init__(self, model: "GoldFinch", c: torch.Tensor, ids: torch.Tensor, n_query: int, chunk: int) -> None:
        self.model, self.c, self.ids = model, c, ids
        total = c.shape[1]
        history = total - n_query
        starts = list(range(0, history, chunk)) or [0]
        self.bounds = list(zip(starts, starts[1:] + [total]))
        self.total = total
        self.kept = self._build(0, total) if len(self.bounds) == 1 else None

    def _build(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = max(a - 1, 0)
        m = self.model
        x0 = m.blocks[0].ln0(m.emb(self.ids[:, lo:b].long()))
        c = self.c[:, lo:b].to(x0.dtype)
        kd = rms_norm(m.w_kv_cache_b(torch.cat([x0, c], dim=-1)))
        e = rms_norm(x0)
        if a == 0:  # the position before the first is zeros
            kd, e = F.pad(kd, (0, 0, 1, 0)), F.pad(e, (0, 0, 1, 0))
        return kd, e

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        for a, b in self.bounds:
            kd, e = self.kept if self.kept is not None else self._build(a, b)
            yield a, b, kd, e


@register("goldfinch")
class GoldFinch(BlockStackModel):
    """GoldFinch language model: ``forward(tokens, state, last_only=...) -> (logits, state)``.

    ``config.extra``: ``gold_layers`` (G, default a third of the blocks, the last ones),
    ``compression`` (16: the cache keeps C/16 values per token), ``rope_base`` (0: no
    position encoding, the paper's default; e.g. 10000 for RoPE in the GOLD layers).
    ``config.lora``: ``maa`` 32, ``decay`` 64 (also the v2 rank), ``kv`` max(C/16, 64) (the
    GOLD key/value LoRA rank). ``cache_chunk`` (attribute) bounds the positions rebuilt at
    once from the cache.
    """

    def __init__(self, config: ModelConfig) -> None:
        C, L = config.n_embd, config.n_layer
        _c2_sizes(config)
        config.lora = {"kv": max(C // 16, 64), **config.lora}
        config.extra = {"gold_layers": default_gold_layers(L), "compression": COMPRESSION, "rope_base": 0.0,
                        **config.extra}
        _check_options(config)
        first_gold = L - config.extra["gold_layers"]
        Ck = C // config.extra["compression"]
        super().__init__(
            config,
            lambda i: FinchC2TimeMix(config) if i < first_gold else GoldTimeMix(config),
            lambda i: ChannelMix(config),
            w_kv_cache_a=nn.Linear(C, Ck, bias=False),
            w_kv_cache_b=nn.Linear(C + Ck, C, bias=False),
        )
        self.first_gold = first_gold  # blocks [first_gold, L) are GOLD
        self.compressed_dim = Ck
        self.cache_chunk = CACHE_CHUNK

    @property
    def n_gold(self) -> int:
        return self.config.n_layer - self.first_gold

    # -- files and init ---------------------------------------------------------------------------
    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        config = _c2_config(sd, "goldfinch")
        L = config.n_layer
        gold = [i for i in range(L) if f"blocks.{i}.att.query.weight" in sd]
        if not gold or gold != list(range(gold[0], L)) or gold[0] == 0:
            raise StateDictError(f"GoldFinch file: GOLD blocks (att.query.weight) must be the last ones after "
                                 f"at least one Finch-C2 block; found them at {gold}")
        Ck = shape_of(sd, "w_kv_cache_a.weight")[0]
        if config.n_embd % Ck:
            raise StateDictError(f"w_kv_cache_a.weight: {Ck} rows do not divide the width {config.n_embd}")
        config.lora["kv"] = shape_of(sd, f"blocks.{gold[0]}.att.time_key_w1")[1]
        config.extra = {"gold_layers": len(gold), "compression": config.n_embd // Ck, "rope_base": 0.0}
        return config

    @classmethod
    def ignored_keys(cls, sd: dict[str, torch.Tensor]) -> set[str]:
        return _unused_bonus(sd)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official from-scratch init (GoldFinch code's generate_init_weight)."""
        C, L = self.config.n_embd, self.config.n_layer
        official_matrix_init(self, MATRIX_GAINS)
        for i, block in enumerate(self.blocks):
            block.att.reset_parameters(i, L)
            block.ffn.reset_mix(mix_init(C, i, L)["ffn"])

    # -- state --------------------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> GoldFinchState:
        """The state before any token: zero recurrent state, empty cache."""
        return self._zero_state(check_batch_size(batch_size), self.device)

    def state_template(self) -> GoldFinchState:
        return self._zero_state(1, torch.device("meta"))

    def _zero_state(self, B: int, device: torch.device) -> GoldFinchState:
        cfg, dt = self.config, self.dtype
        Lc, G, C, H, N = self.first_gold, self.n_gold, cfg.n_embd, cfg.n_head, cfg.head_size
        zeros = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return GoldFinchState(
            arch=self.arch,
            att_shift=zeros(Lc, B, C), wkv=zeros(Lc, B, H, N, N, dtype=torch.promote_types(dt, torch.float32)),
            ffn_shift=zeros(Lc, B, C), gold_att_shift=zeros(G, B, C), gold_ffn_shift=zeros(G, B, C),
            cache_c=zeros(B, 0, self.compressed_dim), cache_ids=zeros(B, 0, dtype=torch.int32),
        )

    def _prepare_state(self, state: GoldFinchState | None, B: int) -> GoldFinchState:
        if state is None:
            return self.init_state(B)
        ref = self.state_template()
        if not isinstance(state, GoldFinchState):
            raise StateError(f"state must be a GoldFinchState, got {type(state).__name__}")
        ref.check_compatible(state)
        if state.batch_size != B:
            raise StateError(f"state has batch size {state.batch_size}, tokens have {B} rows")
        ids = state.cache_ids
        if ids.is_floating_point() or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size)):
            raise StateError(f"state: cache_ids must be token ids in [0, {self.config.vocab_size})")
        # New tensors in the model's device and dtypes: the caller's state is untouched.
        d = self.device
        return GoldFinchState(
            arch=state.arch, att_shift=state.att_shift.to(d), wkv=state.wkv.to(d, ref.wkv.dtype),
            ffn_shift=state.ffn_shift.to(d), gold_att_shift=state.gold_att_shift.to(d),
            gold_ffn_shift=state.gold_ffn_shift.to(d), cache_c=state.cache_c.to(d, self.dtype),
            cache_ids=ids.to(d, torch.int32),
        )

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """C/16 compressed-key values in ``dtype`` (default: the model's) + a 4-byte token id."""
        return self.compressed_dim * (dtype or self.dtype).itemsize + 4

    # -- forward ------------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, state: GoldFinchState | None = None) -> tuple[torch.Tensor, GoldFinchState]:
        """Final normalised hidden states [B, T, C] of every position, and the new state."""
        return self._run(tokens, state, window=None)

    def forward(self, tokens: torch.Tensor, state: GoldFinchState | None = None, *,
                last_only: bool = False) -> tuple[torch.Tensor, GoldFinchState]:
        """Logits [B, T, V] float32 ([B, 1, V] with ``last_only``: then the GOLD blocks run
        over the last 2G positions only) and the new state; ``state`` is not modified."""
        if not last_only:
            return super().forward(tokens, state)
        h, state = self._run(tokens, state, window=2 * self.n_gold)
        logits = self.head(h[:, -1:])
        return (logits if logits.dtype == torch.float64 else logits.float()), state

    def _run(self, tokens: torch.Tensor, state: GoldFinchState | None,
             window: int | None) -> tuple[torch.Tensor, GoldFinchState]:
        """The stack over ``tokens``; the GOLD blocks over the last ``window`` positions
        (None: all). Returns the hidden states of the positions the GOLD blocks ran over."""
        tokens = self.check_tokens(tokens)
        B, T = tokens.shape
        state = self._prepare_state(state, B)
        x = self.blocks[0].ln0(self.emb(tokens))

        att_shift, wkv, ffn_shift = [], [], []
        for i in range(self.first_gold):
            x, a, s, f = self._checkpointed(self._c2_block, self.blocks[i], x, state.att_shift[i], state.wkv[i],
                                            state.ffn_shift[i])
            att_shift.append(a)
            wkv.append(s)
            ffn_shift.append(f)

        c = self.w_kv_cache_a(x)
        cache_c = torch.cat([state.cache_c, c.to(state.cache_c.dtype)], dim=1)
        cache_ids = torch.cat([state.cache_ids, tokens.to(torch.int32)], dim=1)

        W = T if window is None else min(T, window)
        gold_att = list(state.gold_att_shift.unbind(0))
        gold_ffn = list(state.gold_ffn_shift.unbind(0))
        if W < T:
            # The first GOLD block's shift input is the Finch-C2 output, known everywhere; the
            # other sub-layers start from zeros, which cannot reach the window's last 2G - 1
            # positions (see the module docstring).
            gold_att[0] = self.blocks[self.first_gold].ln1(x[:, T - W - 1])
            gold_att[1:] = [torch.zeros_like(t) for t in gold_att[1:]]
            gold_ffn = [torch.zeros_like(t) for t in gold_ffn]
        x = x[:, T - W:]
        source = _KeySource(self, cache_c, cache_ids, W, self.cache_chunk)
        for g in range(self.n_gold):
            x, gold_att[g], gold_ffn[g] = self._checkpointed(
                self._gold_block, self.blocks[self.first_gold + g], x, gold_att[g], gold_ffn[g], source)

        new_state = GoldFinchState(
            arch=self.arch,
            att_shift=torch.stack(att_shift).to(state.att_shift.dtype),
            wkv=torch.stack(wkv).to(state.wkv.dtype),
            ffn_shift=torch.stack(ffn_shift).to(state.ffn_shift.dtype),
            gold_att_shift=torch.stack(gold_att).to(state.gold_att_shift.dtype),
            gold_ffn_shift=torch.stack(gold_ffn).to(state.gold_ffn_shift.dtype),
            cache_c=cache_c, cache_ids=cache_ids,
        )
        return self.ln_out(x), new_state

    @staticmethod
    def _c2_block(block: nn.Module, x, att_shift, wkv, ffn_shift):
        """A Finch-C2 block: (x, last ln1 output, wkv, last ln2 output)."""
        xa = block.ln1(x)
        out, wkv, _ = block.att(xa, att_shift.to(xa.dtype), wkv, None)
        x = x + out
        xf = block.ln2(x)
        x = x + block.ffn(xf, ffn_shift.to(xf.dtype))
        return x, xa[:, -1], wkv, xf[:, -1]

    def _gold_block(self, block: nn.Module, x, att_shift, ffn_shift, source: _KeySource):
        """A GOLD block over the last W positions: (x, last ln1 output, last ln2 output)."""
        att = block.att
        xa = block.ln1(x)
        q = att.queries(xa, att_shift.to(xa.dtype))
        base, total, W = self.config.extra["rope_base"], source.total, x.shape[1]
        if base:
            q = rope(q, torch.arange(total - W, total, device=x.device), base)

        def keys() -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
            for a, b, kd, e in source.chunks():
                k, v = att.keys_values(kd.to(q.dtype), e.to(q.dtype))
                if base:
                    k = rope(k, torch.arange(a, b, device=x.device), base)
                yield k, v.to(k.dtype), a

        y = chunked_causal_attention(q, keys(), total, len(source.bounds))
        x = x + att.finish(y)
        xf = block.ln2(x)
        x = x + block.ffn(xf, ffn_shift.to(xf.dtype))
        return x, xa[:, -1], xf[:, -1]


def _check_options(config: ModelConfig) -> None:
    ex, L = config.extra, config.n_layer
    unknown = sorted(set(ex) - set(GOLDFINCH_OPTIONS))
    if unknown:
        raise ConfigError(f"config: unknown GoldFinch option(s) {', '.join(unknown)} (known: {', '.join(GOLDFINCH_OPTIONS)})")
    G = ex["gold_layers"]
    if isinstance(G, bool) or not isinstance(G, int) or not 1 <= G < L:
        raise ConfigError(f"config: gold_layers must be an integer in [1, n_layer - 1] = [1, {L - 1}] "
                          f"(at least one Finch-C2 block below the GOLD blocks), got {G!r}")
    r = ex["compression"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or config.n_embd // r < 1:
        raise ConfigError(f"config: compression must be an integer in [1, n_embd], got {r!r}")
    check_rope_base(ex["rope_base"], config.head_size)
