"""Model configuration: one dataclass for every architecture.

A config names the architecture (a registry key such as "rwkv7") and every size the model
needs. Official checkpoints carry no config, so each model class infers one from the
tensor shapes (see ``config_from_state_dict`` on the model classes); files rwkvkit writes
store it in ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class ModelConfig:
    """Sizes of a model.

    Attributes:
        arch: registry key ("rwkv5", "rwkv6", "rwkv7", ...).
        n_layer: number of blocks.
        n_embd: model width C.
        vocab_size: rows of the embedding and the head.
        head_size: channels per head N (64 in official models); heads H = C / N.
        ffn_dim: hidden width of the channel-mix (0: the architecture's default, e.g. 4C
            for RWKV-7, set when the model is built).
        lora: low-rank sizes by name (RWKV-7: "w", "a", "v", "g").
        extra: architecture options that are not sizes, as JSON values (GoldFinch:
            "gold_layers", "compression", "rope_base"; Llama: "rope_base", "norm"). Each
            model fills in its defaults when it is built, so a saved config.json names them.
    """

    arch: str
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    ffn_dim: int = 0
    lora: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str):
            raise ConfigError(f"config: arch must be a string such as 'rwkv7', got {self.arch!r}")
        for name in ("n_layer", "n_embd", "vocab_size", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.head_size:
            raise ConfigError(
                f"config: n_embd {self.n_embd} is not a multiple of head_size {self.head_size}"
            )
        if not isinstance(self.ffn_dim, int) or isinstance(self.ffn_dim, bool) or self.ffn_dim < 0:
            raise ConfigError(f"config: ffn_dim must be a non-negative integer (0: the default), got {self.ffn_dim!r}")
        if not isinstance(self.lora, dict):
            raise ConfigError(f"config: lora must be a dict of low-rank sizes by name, got {self.lora!r}")
        for name, size in self.lora.items():
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ConfigError(f"config: lora size {name!r} must be a positive integer, got {size!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"config: extra must be a dict of options, got {type(self.extra).__name__}")
        for name, value in self.extra.items():
            if not isinstance(name, str) or not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"config: extra option {name!r} must be a number, string or boolean, got {value!r}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["extra"]:  # RWKV-5/6/7 configs stay as they were
            del out["extra"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build a config from a dict (e.g. config.json), naming ``source`` in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("arch", "n_layer", "n_embd", "vocab_size") if n not in data]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {str(exc).removeprefix('config: ')}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
