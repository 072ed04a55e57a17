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
from ..quantize import Int8Linear, Int8Rows, quantize_int8_per_channel
from .recurrent import RWKVModel, group_norm_heads, layer_count, official_matrix_init, orthogonal_, shape_of, token_shift
from .registry import register

DECAY_SCALE = math.exp(-0.5)  # log w = -DECAY_SCALE * sigmoid(z)
GROUPNORM_EPS = 64e-5


def default_lora_sizes(n_embd: int) -> dict[str, int]:
    """Low-rank sizes of the current official recipe (64/64/32/128 at C=768)."""

    def size(factor: float) -> int:
        return max(32, round(factor * math.sqrt(n_embd) / 32) * 32)

    return {"w": size(2.5), "a": size(2.5), "v": size(1.7), "g": size(5.0)}


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
        y = group_norm_heads(y, self.ln_x, x.dtype)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), wkv, v_first

    def step_(
        self, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token (decoding, called by ``RWKV7.step_`` without autograd): x [B, C] (ln1
        output) -> (out [B, C], v_first); ``shift`` [B, C] and ``wkv`` [B, H, N, N] (this
        layer's state) are updated in place. The same equations as ``forward``, with the six
        token mixes in one op and fewer, fused small ops; in int8 models on the CPU, the four
        low-rank maps are two int8 products (:class:`Int8Products`); everything from the
        projections to the output matrix is ``ops.wkv7_timemix_step_`` (one kernel on CUDA
        unless ``RWKVKIT_FUSED_STEP=0``)."""
        B, C = x.shape
        first = self.layer_id == 0  # layer 0 has no value residual (no v0, v1, v2)
        xx = shift.to(x.dtype) - x
        shift.copy_(x)
        mu = torch.cat((self.x_r, self.x_k, self.x_v, self.x_w, self.x_a, self.x_g))  # [6, 1, C]
        mix = torch.addcmul(x, xx, mu)  # [6, B, C]: the inputs of r, k, v and of the w, a, g maps

        r, k, v = self.receptance(mix[0]), self.key(mix[1]), self.value(mix[2])
        # The low-rank maps: sigmoid(z_v) (layers > 0), sigmoid(z_w) (the decay), a and g.
        int8 = self.int8_products()
        if int8 is not None:
            gate, sw, a, g = int8.low_rank(mix[3:] if first else mix[2:])
        else:
            gate = None if first else torch.addmm(self.v0.view(1, C), mix[2] @ self.v1, self.v2).sigmoid_()
            z = torch.addmm(self.w0.view(1, C), torch.tanh(mix[3] @ self.w1), self.w2)
            sw = torch.sigmoid(z.to(torch.promote_types(z.dtype, torch.float32)))
            a = torch.addmm(self.a0.view(1, C), mix[4] @ self.a1, self.a2).sigmoid_()
            g = torch.sigmoid(mix[5] @ self.g1) @ self.g2
        if first:
            v_first = v
        ln = self.ln_x
        y = ops.wkv7_timemix_step_(r, sw.mul_(-DECAY_SCALE), k, v, a, g, gate, None if first else v_first,
                                   self.k_k, self.k_a, self.r_k, ln.weight, ln.bias, ln.eps, wkv)
        return self.output(y), v_first

    def int8_products(self) -> "Int8Products | None":
        """For a model quantized for the CPU (``quantize="int8"`` with fbgemm): the decoding
        step's int8 low-rank maps, else None. Derived from the low-rank weights on first use
        and again whenever one of them changes (loaded anew, updated in place). (Called once
        per token and layer: it reads ``_modules`` and ``_parameters`` directly, as
        ``nn.Module.__getattr__`` costs ~0.7 us a name.)"""
        r = self._modules["receptance"]
        if not isinstance(r, Int8Linear) or r.packed is None:
            return None
        params = self._parameters
        maps = ("w", "a", "g") if self.layer_id == 0 else ("v", "w", "a", "g")
        low_rank = [params[m + i] for m in maps for i in "012" if m + i in params]
        versions = tuple((p.data_ptr(), p._version) for p in low_rank)
        cached = self.__dict__.get("_int8_products")
        if cached is None or cached.versions != versions:
            cached = Int8Products(self, maps, versions)
            self.__dict__["_int8_products"] = cached  # a plain attribute: not a module, not in state_dict
        return cached


class Int8Products:
    """The int8 low-rank maps of one RWKV-7 time-mix's decoding step, derived from its float
    low-rank weights (which stay as they are for ``forward`` and ``state_dict``).

    ``low_rank(rows [n, B, C]) -> (sigmoid(z_v) or None, sigmoid(z_w), a, g)`` for the mixes
    x_v (layers > 0), x_w, x_a, x_g in two products instead of eight: the down-projections
    stacked (:class:`Int8Rows`), their output masked to one block per row, and the
    up-projections stacked along their input, so that row i meets only map i's matrix. The
    rows of that second product are scaled one by one (a tanh, two raw projections and a
    sigmoid have different ranges). Decoding reads the low-rank matrices in int8 (2 C (D_w
    + D_a + D_v + D_g) bytes a layer instead of 4x that in float32) and makes 2 calls
    instead of 8.
    """

    def __init__(self, att: TimeMix, maps: tuple[str, ...], versions: tuple) -> None:
        self.versions = versions
        self.replaces = tuple(m + i for m in maps for i in "12")  # the float matrices decoding no longer reads
        self.down = Int8Rows([getattr(att, m + "1").t() for m in maps])
        ups = [getattr(att, m + "2") for m in maps]  # [D_i, C]
        up = torch.cat(ups).t().float()  # [C, sum D_i]
        self.up = Int8Linear(up.shape[1], up.shape[0], *quantize_int8_per_channel(up))
        self.mask = torch.block_diag(*[torch.ones(1, u.shape[0]) for u in ups]).unsqueeze(1)  # [n, 1, sum D_i]
        ends = torch.tensor([u.shape[0] for u in ups]).cumsum(0).tolist()
        block = {m: slice(end - u.shape[0], end) for m, u, end in zip(maps, ups, ends)}
        self.w_block, self.g_block = (maps.index("w"), block["w"]), (maps.index("g"), block["g"])
        self.bias = torch.cat([getattr(att, m + "0") for m in maps[:-1]]).float()  # [n - 1, 1, C]: v0, w0, a0
        self.has_gate = "v" in maps

    def low_rank(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        n, B, C = rows.shape
        h = self.down(rows.float()).mul_(self.mask)  # [n, B, sum D_i]: row i keeps block i
        h[self.w_block[0], :, self.w_block[1]].tanh_()
        h[self.g_block[0], :, self.g_block[1]].sigmoid_()
        u = self.up(h.view(n * B, -1)).view(n, B, C)
        s = torch.add(u[:-1], self.bias).sigmoid_()  # sigmoid(z_v), sigmoid(z_w), a
        dt = rows.dtype
        gate = s[0].to(dt) if self.has_gate else None
        return gate, s[-2], s[-1].to(dt), u[-1].to(dt)


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

    def step_(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """One token (decoding, without autograd): x [B, C] (ln2 output) -> out [B, C];
        ``shift`` [B, C] is updated in place."""
        xk = torch.addcmul(x, shift.to(x.dtype) - x, self.x_k.view(-1))
        shift.copy_(x)
        return self.value(torch.relu_(self.key(xk)).square_())


@register("rwkv7")
class RWKV7(RWKVModel):
    """RWKV-7 "Goose" language model: ``forward(tokens, state) -> (logits, state)``."""

    def __init__(self, config: ModelConfig) -> None:
        config.lora = {**default_lora_sizes(config.n_embd), **config.lora}
        config.ffn_dim = config.ffn_dim or 4 * config.n_embd
        super().__init__(config, lambda i: TimeMix(config, i), lambda i: ChannelMix(config))

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        vocab, C = shape_of(sd, "emb.weight")
        H, N = shape_of(sd, "blocks.0.att.r_k")
        n_layer = layer_count(sd)
        lora = {n: shape_of(sd, f"blocks.0.att.{n}1")[1] for n in ("w", "a", "g")}
        if n_layer > 1:
            lora["v"] = shape_of(sd, "blocks.1.att.v1")[1]
        elif "blocks.0.att.v1" in sd:
            lora["v"] = shape_of(sd, "blocks.0.att.v1")[1]
        return ModelConfig(
            arch="rwkv7", n_layer=n_layer, n_embd=C, vocab_size=vocab, head_size=N,
            ffn_dim=shape_of(sd, "blocks.0.ffn.key.weight")[0], lora=lora,
        )

    @classmethod
    def ignored_keys(cls, sd: dict[str, torch.Tensor]) -> set[str]:
        unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
        return super().ignored_keys(sd) | (unused & set(sd))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the official from-scratch recipe does (train_temp, "better rwkv7 init")."""
        cfg = self.config
        C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()

        def put(p: torch.Tensor, value: torch.Tensor) -> None:
            p.copy_(value.reshape(p.shape).to(p.dtype))

        official_matrix_init(self, {
            "att.receptance.weight": 1.0, "att.key.weight": 0.1, "att.value.weight": 1.0,
            "att.output.weight": 0.0, "ffn.key.weight": 1.0, "ffn.value.weight": 0.0,
        })
        for i, block in enumerate(self.blocks):
            r0 = i / (L - 1) if L > 1 else 0.0  # guarded: a single layer counts as the first
            r1 = 1.0 - i / L
            att = block.att
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
                orthogonal_(w_out, 0.1)
            put(att.k_k, 0.71 - 0.1 * linear)
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            att.ln_x.bias.zero_()
            put(block.ffn.x_k, 1.0 - ddd ** (r1**4))
