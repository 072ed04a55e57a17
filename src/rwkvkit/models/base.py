"""What every language model in rwkvkit shares: the call contract, saving, sizes."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from ..errors import InputError
from ..files import atomic_path, atomic_write_text
from ..state import ModelState

FORMAT_VERSION = 1


class LanguageModel(nn.Module):
    """Base class: ``(tokens, state) -> (logits, state)``.

    Subclasses implement ``hidden``, ``init_state`` and ``config_from_state_dict``, and own
    ``emb`` (the embedding) and ``head`` (the output matrix). Parameter names are the
    official checkpoint keys, so ``state_dict()`` is the official layout.
    """

    arch: ClassVar[str]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer: Any = None
        # A tuned initial state (batch 1) that replaces the zero state, if the file had one.
        self.default_state: ModelState | None = None

    # -- the contract -----------------------------------------------------------------------
    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def ignored_keys(cls, sd: dict[str, torch.Tensor]) -> set[str]:
        """Keys official files may carry that the model does not use."""
        return set()

    @classmethod
    def default_state_from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ModelState | None:
        """The tuned initial state an official file carries (state tuning), if any."""
        return None

    def init_state(self, batch_size: int = 1) -> ModelState:
        raise NotImplementedError

    def state_template(self) -> ModelState:
        """A batch-1 state with this model's shapes and dtypes (for checks; subclasses may
        return one on the "meta" device, holding no memory)."""
        return self.init_state(1)

    def hidden(
        self, tokens: torch.Tensor, state: ModelState | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        """Final normalised hidden states [B, T, C] (before the head) and the new state."""
        raise NotImplementedError

    def forward(
        self, tokens: torch.Tensor, state: ModelState | None = None, *, last_only: bool = False
    ) -> tuple[torch.Tensor, ModelState]:
        """Logits float32 [B, T, V] ([B, 1, V] with ``last_only``) and the new state.

        ``state`` (None: the initial state) is not modified. A float64 model returns float64
        logits (for exactness checks).
        """
        h, state = self.hidden(tokens, state)
        if last_only:
            h = h[:, -1:]
        logits = self.head(h)
        return (logits if logits.dtype == torch.float64 else logits.float()), state

    # -- helpers for subclasses -------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validate a [B, T] token tensor (T >= 1, ids in range) and move it to the model."""
        if not isinstance(tokens, torch.Tensor):
            raise InputError(f"tokens must be a LongTensor [B, T], got {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
            raise InputError(f"tokens must have shape [B, T] with B, T >= 1, got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            # Inside a CUDA-graph capture ids cannot be read back; the graph's caller checks
            # the ids it copies in (rwkvkit.cuda_graphs.GraphedForward).
            return tokens.to(self.device, torch.long)
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return tokens.to(self.device, torch.long)

    # -- sizes ------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_nbytes(self, batch_size: int = 1) -> int:
        """Bytes of the state for ``batch_size`` rows before any token (a recurrent state's
        whole size; a cache grows by :meth:`cache_bytes_per_token` per token)."""
        return self.state_template().nbytes() * batch_size

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the state grows by per token and batch row, with the cache stored in
        ``dtype`` (default: the model's dtype; token ids take 4 bytes). 0 for models whose
        state does not grow (RWKV)."""
        return 0

    def cache_ratio_vs_llama(self) -> float | None:
        """How many times smaller this model's per-token cache is than a Llama's of the same
        depth and width (2 L C values per token), both stored in 16 bits; None without a
        cache. GoldFinch: 2 L C / (C/16 + 2), 756x at 24 layers x 2048."""
        own = self.cache_bytes_per_token(torch.bfloat16)
        return 2 * self.config.n_layer * self.config.n_embd * 2 / own if own else None

    # -- training ---------------------------------------------------------------------------
    def optim_group(self, name: str, param: torch.Tensor) -> str | None:
        """The AdamW group of parameter ``name``: "decay" (weight decay), "lr1x", "lr2x" or
        "lr3x"; None (the default) leaves it to the official RWKV rule by name
        (:func:`rwkvkit.train.recipe.group_of`)."""
        return None

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors``, ``config.json`` and the tokenizer's files into ``directory``.

        Each file is written atomically.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"format_version": FORMAT_VERSION, **self.config.to_dict()}
        if self.tokenizer is not None:
            meta["tokenizer"] = self.tokenizer.save(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.default_state is not None:
            for name, t in self.default_state.tensor_fields().items():
                tensors[f"default_state.{name}"] = t.detach().contiguous().cpu()
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"arch": self.arch, "format": "rwkvkit"})
        atomic_write_text(directory / "config.json", json.dumps(meta, indent=2) + "\n")
        return directory


def check_batch_size(batch_size: Any) -> int:
    """``init_state``'s batch size: a positive int, or an InputError naming the value."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"init_state: batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)
