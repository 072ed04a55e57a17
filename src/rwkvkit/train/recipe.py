"""The official RWKV training recipe: the model, parameter groups, AdamW and the LR schedule.

Initialisation is each model's ``reset_parameters()`` (the official from-scratch init), run
when the model is built. What this module adds (spec section 6):

Parameter groups (RWKV-LM ``configure_optimizers``; one rule for v5.2, v6 and v7), by name,
first match wins:

    ``_w1`` / ``_w2`` in the name      (v6 low-rank matrices)        lr x1, no weight decay
    ``time_mix`` / ``time_maa``        (v5/v6 token-shift mixes)     lr x1
    ``time_decay`` / ``att.w0``        (the decay bias)              lr x2
    ``time_faaaa``                     (v5/v6 bonus)                 lr x1
    ``time_first``                     (older bonus)                 lr x3
    ``.weight`` and >= 2-D             (emb, head, the big matrices) lr x1, weight decay
    everything else                    (LayerNorms, x_*, v7 low-rank, k_k, ...)  lr x1

Weight decay only on the big matrices: the README calls this "VERY IMPORTANT". A model may
define its own rule (``LanguageModel.optim_group``; the Llama baseline does: decay on the
matrices, lr x1 for the rest); GoldFinch and Finch-C2 follow the rule above, as their code
does (so the compression matrices ``w_kv_cache_a/b`` get weight decay, like ``emb`` and
``head``).

Schedule: warm-up ``lr *= 0.01 + 0.99 * step / warmup_steps`` for the first steps, and a
cosine from ``lr_init`` to ``lr_final`` over the steps after the warm-up (RWKV-LM measures
``progress = (step - warmup) / (total - warmup)``); each group gets ``lr * lr_scale``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..config import ModelConfig
from ..models.base import LanguageModel
from ..models.registry import model_class

GROUPS = ("decay", "lr1x", "lr2x", "lr3x")
LR_SCALE = {"decay": 1.0, "lr1x": 1.0, "lr2x": 2.0, "lr3x": 3.0}


def build_model(config: ModelConfig) -> LanguageModel:
    """A fresh float32 CPU model of ``config``, initialised by its ``reset_parameters``."""
    return model_class(config.arch)(config)


def group_of(name: str, param: torch.Tensor) -> str:
    """The parameter group of parameter ``name`` (official rule, see the module docstring)."""
    if "_w1" in name or "_w2" in name:
        return "lr1x"
    if "time_mix" in name or "time_maa" in name:
        return "lr1x"
    if "time_decay" in name or "time_daaaa" in name or "att.w0" in name:
        return "lr2x"
    if "time_faaaa" in name:
        return "lr1x"
    if "time_first" in name:
        return "lr3x"
    if ".weight" in name and param.squeeze().dim() >= 2:
        return "decay"
    return "lr1x"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model`` (non-empty ones, in :data:`GROUPS` order).

    Each group has ``params``, ``param_names``, ``weight_decay``, ``lr_scale`` and ``group``
    (its name).
    """
    named: dict[str, list[tuple[str, torch.Tensor]]] = {g: [] for g in GROUPS}
    own_rule = model.optim_group if isinstance(model, LanguageModel) else (lambda name, p: None)
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = own_rule(name, p) or group_of(name, p)
            if group not in named:
                raise ValueError(f"{type(model).__name__}.optim_group({name!r}) gave {group!r}, not one of {GROUPS}")
            named[group].append((name, p))
    groups = []
    for g in GROUPS:
        if named[g]:
            groups.append({
                "group": g,
                "params": [p for _, p in named[g]],
                "param_names": [n for n, _ in named[g]],
                "weight_decay": weight_decay if g == "decay" else 0.0,
                "lr_scale": LR_SCALE[g],
            })
    return groups


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: Iterable[float] = (0.9, 0.99),
                    eps: float = 1e-18, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (fused on CUDA unless ``fused`` is False, else foreach)."""
    groups = param_groups(model, weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    use_fused = on_cuda if fused is None else (fused and on_cuda)
    kwargs: dict[str, Any] = {"fused": True} if use_fused else {}
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, **kwargs)


class LRSchedule:
    """The RWKV learning-rate schedule over optimizer steps; its whole state is ``step``.

    Like ``torch.optim.lr_scheduler.LambdaLR``: :meth:`apply` sets every group's ``lr`` to
    ``lr_at(step) * group["lr_scale"]`` (call it before ``optimizer.step()``), :meth:`step`
    moves to the next step, and ``state_dict()`` / ``load_state_dict()`` resume it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, *, lr_init: float, lr_final: float,
                 warmup_steps: int, total_steps: int) -> None:
        if lr_init <= 0 or lr_final < 0 or total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"bad schedule: lr_init {lr_init}, lr_final {lr_final}, "
                             f"warmup_steps {warmup_steps}, total_steps {total_steps}")
        self.optimizer = optimizer
        self.lr_init, self.lr_final = lr_init, lr_final
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.last_step = 0  # the step the next optimizer.step() makes (0-based)

    def lr_at(self, step: int) -> float:
        """The base learning rate (lr scale 1) of optimizer step ``step`` (0-based)."""
        decay_span = self.total_steps - self.warmup_steps
        if decay_span > 0:
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / decay_span))
        else:
            progress = 1.0 if step >= self.total_steps else 0.0
        f = self.lr_final / self.lr_init
        lr = self.lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
        if step < self.warmup_steps:
            lr *= 0.01 + 0.99 * step / self.warmup_steps
        return lr

    def apply(self) -> float:
        """Set the groups' learning rates for the current step; returns the base lr."""
        lr = self.lr_at(self.last_step)
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        self.last_step += 1

    def state_dict(self) -> dict[str, int]:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["step"])
