"""The skeleton every model shares, and the RWKV-5/6/7 recurrent state on top of it.

    x = ln0(emb[tokens])
    for each block:  x = x + att(ln1(x));  x = x + ffn(ln2(x))
    h = ln_out(x);   logits = head(h)

:class:`BlockStackModel` is that skeleton (embedding, pre-norm blocks, head, init on
construction); GoldFinch and the Llama baseline build on it with their own state.
:class:`RWKVModel` adds the RWKV recurrent state: each version supplies its own time-mix
(``att``) and channel-mix (``ffn``) modules. The time-mix takes ``(x, x_prev, wkv,
v_first)`` and returns ``(out, new wkv, v_first)``; ``v_first`` is RWKV-7's value residual
and passes through untouched elsewhere.

Decoding has a second entry point, ``RWKVModel.step_(tokens [B], state) -> logits [B, V]``:
one token per row, the state updated in place (no gradients, no new state per token, no
host-device synchronisation), for generation and serving. A sub-block may define its own
``step_`` (RWKV-7's do); otherwise its forward runs over the one token.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..errors import ConfigError, InputError, StateDictError, StateError
from ..state import ModelState, RecurrentState
from .base import LanguageModel, check_batch_size


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's input at every position: [prev, x_0, ..., x_{T-2}]."""
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


def shape_of(sd: dict[str, torch.Tensor], key: str, ndim: int = 2) -> tuple[int, ...]:
    """The shape of ``sd[key]`` (``ndim`` sizes), or a StateDictError naming the key needed to
    infer sizes, or its shape when it has another number of dimensions."""
    if key not in sd:
        raise StateDictError(f"missing key {key!r}, needed to infer the model's sizes")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise StateDictError(f"key {key!r} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def layer_count(sd: dict[str, torch.Tensor]) -> int:
    """1 + the largest block index among ``blocks.<i>.`` keys."""
    indices = [k.split(".")[1] for k in sd if k.startswith("blocks.")]
    bad = [i for i in indices if not i.isdigit()]
    if bad:
        raise StateDictError(f"key blocks.{bad[0]}...: the block index is not a number")
    return 1 + max(int(i) for i in indices)


class Block(nn.Module):
    """One pre-norm block; layer 0 also owns ``ln0`` (applied to the embedding)."""

    def __init__(self, config: ModelConfig, layer_id: int, att: nn.Module, ffn: nn.Module,
                 norm: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = norm(C)
        self.ln1 = norm(C)
        self.ln2 = norm(C)
        self.att = att
        self.ffn = ffn


class BlockStackModel(LanguageModel):
    """Embedding, pre-norm blocks, ``ln_out`` and head; subclasses build the blocks' att and
    ffn modules, define the state and ``hidden``, and initialise in ``reset_parameters``.

    ``modules`` are extra top-level modules (e.g. GoldFinch's key compression), registered
    before the initialisation runs. ``norm`` makes every norm of the stack (LayerNorm by
    default).
    """

    def __init__(self, config: ModelConfig, make_att: Callable[[int], nn.Module], make_ffn: Callable[[int], nn.Module],
                 *, norm: Callable[[int], nn.Module] = nn.LayerNorm, **modules: nn.Module) -> None:
        super().__init__(config)
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList(Block(config, i, make_att(i), make_ffn(i), norm) for i in range(config.n_layer))
        self.ln_out = norm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        for name, module in modules.items():
            setattr(self, name, module)
        # Recompute each block in the backward pass instead of keeping its activations.
        self.gradient_checkpointing = False
        if self.emb.weight.device.type != "meta":  # on "meta" the weights come from a file
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter as the official from-scratch recipe does."""
        raise NotImplementedError

    def _checkpointed(self, fn: Callable, *args):
        """``fn(*args)``, recomputed in the backward pass when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def check_state(self, state: RecurrentState, batch_size: int) -> RecurrentState:
        """``state`` checked against this model (class, shapes, ``batch_size`` rows; a
        :class:`~rwkvkit.errors.StateError` names what differs) and moved to its device, the
        WKV state in float32 (float64 for a float64 model). A state from a file or another
        device is cast into new tensors: the caller's state is untouched and gradients still
        reach it; one already in place is returned with the same tensors."""
        ref = self.state_template()  # checks shapes without allocating a state
        if not isinstance(state, RecurrentState):
            raise StateError(f"state must be a RecurrentState, got {type(state).__name__}")
        ref.check_compatible(state)
        if state.batch_size != batch_size:
            raise StateError(f"state has batch size {state.batch_size}, tokens have {batch_size} rows")
        return RecurrentState(
            arch=state.arch,
            att_shift=state.att_shift.to(self.device),
            wkv=state.wkv.to(self.device, ref.wkv.dtype),
            ffn_shift=state.ffn_shift.to(self.device),
        )

    @torch.no_grad()
    def step_(self, tokens: torch.Tensor, state: ModelState) -> torch.Tensor:
        """Decode one token per row: ``tokens`` [B] -> logits float32 [B, V], with the
        ``state`` object advanced past the tokens (the contract of ``RWKVModel.step_``).

        This generic form runs ``forward`` and moves the new tensors into ``state``; models
        whose state is a growing cache (GoldFinch, Llama) use it: a cache cannot grow in a
        fixed buffer, so unlike RWKV's step it allocates and is not replayable as a CUDA graph.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            what = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"step_: tokens must be integer ids of shape [B], got {what}")
        if state is None:  # (the state is advanced where it lies: there must be one)
            raise StateError(f"step_: state must be a {type(self.state_template()).__name__}, got NoneType "
                             "(start from model.init_state(B) or generation.prefill)")
        logits, new = self(tokens[:, None], state, last_only=True)
        for name, t in new.tensor_fields().items():
            setattr(state, name, t)
        return logits[:, -1]


class RWKVModel(BlockStackModel):
    """An RWKV-5/6/7 language model; subclasses build the blocks' att and ffn modules."""

    def __init__(self, config: ModelConfig, make_att: Callable[[int], nn.Module],
                 make_ffn: Callable[[int], nn.Module]) -> None:
        if config.extra:
            raise ConfigError(f"config: {self.arch} has no options, got extra {config.extra}")
        super().__init__(config, make_att, make_ffn)

    @classmethod
    def default_state_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> RecurrentState | None:
        """The tuned initial state of a state-tuned file (``blocks.i.att.time_state``, stored
        [H, value, key] like our wkv state), or None."""
        keys = [f"blocks.{i}.att.time_state" for i in range(layer_count(sd))]
        present = [k for k in keys if k in sd]
        if not present:
            return None
        if len(present) != len(keys):
            missing = sorted(set(keys) - set(present))
            raise StateDictError(f"state-tuned file lacks {', '.join(missing)}")
        first = tuple(sd[keys[0]].shape)
        for k in keys:
            shape = tuple(sd[k].shape)
            if len(shape) != 3 or shape[1] != shape[2] or shape != first:
                raise StateDictError(f"{k}: expected [H, N, N] like {keys[0]} {list(first)}, found {list(shape)}")
        wkv = torch.stack([sd[k].float() for k in keys]).unsqueeze(1)  # [L, 1, H, N, N]
        L, C = wkv.shape[0], sd["emb.weight"].shape[1]
        zeros = torch.zeros(L, 1, C)
        return RecurrentState(arch=cls.arch, att_shift=zeros, wkv=wkv, ffn_shift=zeros.clone())

    @classmethod
    def ignored_keys(cls, sd: dict[str, torch.Tensor]) -> set[str]:
        return {k for k in sd if k.endswith(".att.time_state")}

    def init_state(self, batch_size: int = 1) -> RecurrentState:
        """The initial state for ``batch_size`` rows: the tuned state if any, else zeros."""
        batch_size = check_batch_size(batch_size)
        if self.default_state is None:
            return self._zero_state(batch_size, self.device)
        template, s = self.state_template(), self.default_state.expand(batch_size)
        return RecurrentState(
            arch=self.arch,
            **{n: getattr(s, n).to(self.device, t.dtype) for n, t in template.tensor_fields().items()},
        )

    def state_template(self) -> RecurrentState:
        """A batch-1 state on the "meta" device: this model's state shapes and dtypes, no memory."""
        return self._zero_state(1, torch.device("meta"))

    def _zero_state(self, batch_size: int, device: torch.device) -> RecurrentState:
        cfg = self.config
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        dt = self.dtype
        wkv_dtype = torch.float64 if dt == torch.float64 else torch.float32
        return RecurrentState(
            arch=self.arch,
            att_shift=torch.zeros(L, batch_size, C, dtype=dt, device=device),
            wkv=torch.zeros(L, batch_size, H, N, N, dtype=wkv_dtype, device=device),
            ffn_shift=torch.zeros(L, batch_size, C, dtype=dt, device=device),
        )

    @staticmethod
    def _block_forward(block: Block, i: int, x, v_first, att_shift, wkv, ffn_shift):
        """One block over [B, T, C]: returns (x, v_first, last ln1 output, wkv, last ln2 output)."""
        if i == 0:
            x = block.ln0(x)
        xa = block.ln1(x)
        out, s, v_first = block.att(xa, att_shift.to(xa.dtype), wkv, v_first)
        x = x + out
        xf = block.ln2(x)
        x = x + block.ffn(xf, ffn_shift.to(xf.dtype))
        return x, v_first, xa[:, -1], s, xf[:, -1]

    def hidden(
        self, tokens: torch.Tensor, state: RecurrentState | None = None
    ) -> tuple[torch.Tensor, RecurrentState]:
        tokens = self.check_tokens(tokens)
        B = tokens.shape[0]
        state = self.init_state(B) if state is None else self.check_state(state, B)
        x = self.emb(tokens)
        v_first = None
        att_shift, wkv, ffn_shift = [], [], []
        for i, block in enumerate(self.blocks):
            x, v_first, xa_last, s, xf_last = self._checkpointed(
                self._block_forward, block, i, x, v_first, state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            att_shift.append(xa_last)
            wkv.append(s)
            ffn_shift.append(xf_last)
        new_state = RecurrentState(
            arch=self.arch,
            att_shift=torch.stack(att_shift).to(state.att_shift.dtype),
            wkv=torch.stack(wkv).to(state.wkv.dtype),
            ffn_shift=torch.stack(ffn_shift).to(state.ffn_shift.dtype),
        )
        return self.ln_out(x), new_state

    @torch.no_grad()
    def step_(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """Decode one token per row in place: ``tokens`` [B] -> logits float32 [B, V], with
        ``state`` (batch B) advanced past the tokens. The fast path of generation and serving.

        The same numbers as ``forward(tokens[:, None], state)`` up to float rounding, but
        ``state`` is modified where it lies instead of being returned anew, nothing is
        tracked for autograd, and nothing reads the device back (token ids are not
        range-checked; shapes are): with ``tokens`` and ``state`` in fixed buffers a GPU can
        replay the call as a CUDA graph. ``state`` must have the model's device and dtypes
        (as from ``init_state``, ``forward`` or ``generation.prefill``); use
        ``state.clone()`` first to keep the old one.
        """
        tokens = self._check_step_args(tokens, state)
        x = self.emb(tokens)
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            out, v_first = time_mix_step_(block.att, block.ln1(x), state.att_shift[i], state.wkv[i], v_first)
            x = x + out
            x = x + channel_mix_step_(block.ffn, block.ln2(x), state.ffn_shift[i])
        return self.head(self.ln_out(x)).float()

    def _check_step_args(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """Shapes, dtypes and devices only (nothing here reads tensor values); returns the
        tokens on the model's device."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            what = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"step_: tokens must be integer ids of shape [B], got {what}")
        if not isinstance(state, RecurrentState):
            raise StateError(f"step_: state must be a RecurrentState, got {type(state).__name__}")
        cfg, B = self.config, tokens.shape[0]
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        wkv_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        expected = {"att_shift": (L, B, C), "wkv": (L, B, H, N, N), "ffn_shift": (L, B, C)}
        for name, shape in expected.items():
            t = getattr(state, name)
            if tuple(t.shape) != shape:
                raise StateError(f"step_: state.{name} has shape {tuple(t.shape)}, expected {shape} for {B} token(s)")
            if t.device != self.device:
                raise StateError(f"step_: state.{name} is on {t.device}, the model on {self.device} (state.to(device) first)")
        if state.wkv.dtype != wkv_dtype:
            raise StateError(f"step_: state.wkv is {state.wkv.dtype}, expected {wkv_dtype}")
        return tokens.to(self.device)


def time_mix_step_(
    att: nn.Module, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, v_first: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token through a time-mix: x [B, C] (ln1 output) -> (out [B, C], v_first), with
    ``shift`` [B, C] and ``wkv`` [B, H, N, N] (this layer's state) updated in place. Uses the
    module's own ``step_`` if it has one, else its forward over one token."""
    step = getattr(att, "step_", None)
    if step is not None:
        return step(x, shift, wkv, v_first)
    out, s, v_first = att(x.unsqueeze(1), shift.to(x.dtype), wkv, v_first)
    shift.copy_(x)
    wkv.copy_(s)
    return out[:, 0], v_first


def channel_mix_step_(ffn: nn.Module, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One token through a channel-mix: x [B, C] (ln2 output) -> out [B, C], ``shift``
    updated in place (the module's own ``step_`` if it has one)."""
    step = getattr(ffn, "step_", None)
    if step is not None:
        return step(x, shift)
    out = ffn(x.unsqueeze(1), shift.to(x.dtype))
    shift.copy_(x)
    return out[:, 0]


def group_norm_heads(y: torch.Tensor, ln_x: nn.GroupNorm, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-head LayerNorm of the WKV output [B, T, H, N] (GroupNorm, eps 64e-5) in float32
    or better, returned as [B, T, C] in ``out_dtype``."""
    B, T, H, N = y.shape
    w, b = ln_x.weight.to(y.dtype), ln_x.bias.to(y.dtype)
    return nn.functional.group_norm(y.reshape(B * T, H * N), H, w, b, eps=ln_x.eps).view(B, T, H * N).to(out_dtype)


def orthogonal_(w: torch.Tensor, gain: float) -> None:
    """The official init of a matrix: orthogonal, gain scaled by sqrt(rows/cols) for tall
    matrices; gain 0 means zeros."""
    if gain == 0:
        nn.init.zeros_(w)
        return
    rows, cols = w.shape
    nn.init.orthogonal_(w, gain=gain * (math.sqrt(rows / cols) if rows > cols else 1.0))


def official_matrix_init(model: BlockStackModel, gains: dict[str, float]) -> None:
    """The official ``generate_init_weight`` for the big matrices: orthogonal with the given
    gains (by parameter-name suffix, e.g. "att.key.weight": 0.1), a small uniform embedding
    (paired with ln0), the head at gain 0.5*sqrt(V/C), LayerNorms at identity."""
    cfg = model.config
    V, C = cfg.vocab_size, cfg.n_embd
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    # The head's gain is 0.5 * sqrt(V / C) in total (not scaled again for its shape).
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
    for name, p in model.named_parameters():
        for suffix, gain in gains.items():
            if name.endswith(suffix):
                orthogonal_(p, gain)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
