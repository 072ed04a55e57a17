"""The training configuration: one flat dataclass, read from TOML, overridable from the CLI.

A config file groups its keys in tables for readability; every key belongs to one table, and
may also be written at the top level::

    [model]
    arch = "rwkv7"
    preset = "0.1b"            # n_layer, n_embd, head_size, lora (+ suggested ctx/lr)

    [data]
    train_data = "data/corpus.tokens"
    ctx_len = 512
    micro_batch = 16

    [optim]
    lr_init = 6e-4
    total_tokens = 1_500_000_000

Values come from, lowest first: the dataclass defaults, the preset, the file, then the
command line (``--set key=value`` / ``--set table.key=value`` and explicit flags). Errors are
:class:`~rwkvkit.errors.ConfigError` naming the key (``data.ctx_len``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError

ARCHS = ("rwkv5", "rwkv6", "rwkv7", "finch-c2", "goldfinch", "llama")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
DATA_ORDERS = ("magic", "shuffle", "sequential")
LORA_KEYS = {"rwkv7": ("w", "a", "v", "g"), "rwkv6": ("maa", "decay"), "rwkv5": (), "finch-c2": ("maa", "decay"),
             "goldfinch": ("maa", "decay", "kv"), "llama": ()}
EVAL_CONTEXTS = ("auto", "stream", "window")


def _key(section: str, **kw: Any) -> Any:
    """A dataclass field that belongs to TOML table ``section``."""
    default = kw.pop("default", dataclasses.MISSING)
    factory = kw.pop("default_factory", dataclasses.MISSING)
    meta = {"section": section, **kw}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run needs (see ``examples/train_tiny.toml``).

    Sizes left at 0 come from the preset or the architecture's defaults; ``vocab_size`` 0
    takes the data file's vocabulary. The run length is ``total_steps`` or ``total_tokens``
    (one of them, > 0); a step is ``micro_batch * grad_accum`` samples of ``ctx_len`` tokens
    on each of the ranks. ``extra`` holds architecture options (``ModelConfig.extra``, e.g.
    ``extra = {rope_base = 10000}`` for GoldFinch). ``eval_context``: "stream" scores the
    validation tokens as one stream (the state carried from window to window), "window" scores
    each ``ctx_len`` window from a fresh state, like a training sample; "auto" is "stream" for
    recurrent models and "window" for models whose state is a growing cache (GoldFinch,
    Llama), which would otherwise attend far beyond the context they were trained on.
    """

    # [model]
    arch: str = _key("model", default="rwkv7", choices=ARCHS)
    preset: str = _key("model", default="")
    n_layer: int = _key("model", default=0, minimum=0)
    n_embd: int = _key("model", default=0, minimum=0)
    head_size: int = _key("model", default=64, minimum=1)
    vocab_size: int = _key("model", default=0, minimum=0)
    ffn_dim: int = _key("model", default=0, minimum=0)
    lora: dict = _key("model", default_factory=dict)
    extra: dict = _key("model", default_factory=dict)
    init_from: str = _key("model", default="")
    # [data]
    train_data: str = _key("data", default="")
    val_data: str = _key("data", default="auto")
    data_order: str = _key("data", default="magic", choices=DATA_ORDERS)
    ctx_len: int = _key("data", default=512, minimum=1)
    micro_batch: int = _key("data", default=16, minimum=1)
    grad_accum: int = _key("data", default=1, minimum=1)
    # [optim]
    lr_init: float = _key("optim", default=6e-4, minimum=0.0)
    lr_final: float = _key("optim", default=6e-5, minimum=0.0)
    warmup_steps: int = _key("optim", default=10, minimum=0)
    total_steps: int = _key("optim", default=0, minimum=0)
    total_tokens: int = _key("optim", default=0, minimum=0)
    weight_decay: float = _key("optim", default=0.001, minimum=0.0)
    grad_clip: float = _key("optim", default=1.0, minimum=0.0)
    betas: list = _key("optim", default_factory=lambda: [0.9, 0.99])
    eps: float = _key("optim", default=1e-18, minimum=0.0)
    l2wrap: float = _key("optim", default=1e-4, minimum=0.0)
    # [train]
    out_dir: str = _key("train", default="runs/train")
    seed: int = _key("train", default=0, minimum=0)
    device: str = _key("train", default="auto")
    precision: str = _key("train", default="auto", choices=PRECISIONS)
    grad_checkpoint: bool = _key("train", default=False)
    distributed: str = _key("train", default="ddp", choices=STRATEGIES)
    stop_at_step: int = _key("train", default=0, minimum=0)
    loss_chunk: int = _key("train", default=0, minimum=0)
    # [eval]
    eval_every: int = _key("eval", default=200, minimum=0)
    eval_tokens: int = _key("eval", default=1 << 18, minimum=0)
    eval_context: str = _key("eval", default="auto", choices=EVAL_CONTEXTS)
    # [checkpoint]
    save_every: int = _key("checkpoint", default=500, minimum=0)
    keep_last: int = _key("checkpoint", default=3, minimum=1)
    # [log]
    progress: bool = _key("log", default=True)
    log_every: int = _key("log", default=10, minimum=1)
    tensorboard: bool = _key("log", default=True)
    plot: bool = _key("log", default=True)

    # -- derived ----------------------------------------------------------------------------
    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens of one optimizer step over all ranks."""
        return self.ctx_len * self.micro_batch * self.grad_accum * world_size

    def steps(self, world_size: int = 1) -> int:
        """The run length in optimizer steps (``total_steps``, or ``total_tokens`` rounded up)."""
        if self.total_steps:
            return self.total_steps
        return math.ceil(self.total_tokens / self.tokens_per_step(world_size))

    def model_config_dict(self, vocab_size: int) -> dict[str, Any]:
        """The :class:`~rwkvkit.config.ModelConfig` fields of the model to build."""
        return {"arch": self.arch, "n_layer": self.n_layer, "n_embd": self.n_embd,
                "vocab_size": self.vocab_size or vocab_size, "head_size": self.head_size,
                "ffn_dim": self.ffn_dim, "lora": dict(self.lora), "extra": dict(self.extra)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied and validated (keys as in :func:`from_dict`)."""
        return from_dict({**self.to_dict(), **changes})


# -- presets -------------------------------------------------------------------------------------
_V7_RELEASED_LORA = {"w": 64, "a": 64, "v": 32, "g": 128}  # RWKV-7 World 0.1B and 0.4B

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A model for tests and CPU smoke runs: seconds per hundred steps.
    "tiny": {
        "rwkv7": {"n_layer": 2, "n_embd": 64, "head_size": 32, "lora": {"w": 16, "a": 16, "v": 16, "g": 16}},
        "rwkv6": {"n_layer": 2, "n_embd": 64, "head_size": 32, "lora": {"maa": 8, "decay": 16}},
        "rwkv5": {"n_layer": 2, "n_embd": 64, "head_size": 32},
        "finch-c2": {"n_layer": 2, "n_embd": 64, "head_size": 32, "lora": {"maa": 8, "decay": 16}},
        "goldfinch": {"n_layer": 3, "n_embd": 64, "head_size": 32, "lora": {"maa": 8, "decay": 16, "kv": 16}},
        "llama": {"n_layer": 2, "n_embd": 64, "head_size": 32},
        "*": {"ctx_len": 64, "micro_batch": 4, "lr_init": 3e-3, "lr_final": 3e-4, "warmup_steps": 10,
              "eval_every": 50, "eval_tokens": 4096, "save_every": 100},
    },
    # The released L12-D768 models; the minipile demo's settings.
    "0.1b": {
        "rwkv7": {"n_layer": 12, "n_embd": 768, "head_size": 64, "lora": dict(_V7_RELEASED_LORA)},
        "rwkv6": {"n_layer": 12, "n_embd": 768, "head_size": 64, "lora": {"maa": 32, "decay": 64}},
        "rwkv5": {"n_layer": 12, "n_embd": 768, "head_size": 64},
        # The GoldFinch paper's L12-D768 ablation models.
        "finch-c2": {"n_layer": 12, "n_embd": 768, "head_size": 64, "lora": {"maa": 32, "decay": 64}},
        "goldfinch": {"n_layer": 12, "n_embd": 768, "head_size": 64, "lora": {"maa": 32, "decay": 64, "kv": 64}},
        "llama": {"n_layer": 12, "n_embd": 768, "head_size": 64},
        "*": {"ctx_len": 512, "micro_batch": 16, "lr_init": 6e-4, "lr_final": 6e-5, "warmup_steps": 10},
    },
    # The released L24-D1024 models ("4e-4 for L24-D1024").
    "0.4b": {
        "rwkv7": {"n_layer": 24, "n_embd": 1024, "head_size": 64, "lora": dict(_V7_RELEASED_LORA)},
        "rwkv6": {"n_layer": 24, "n_embd": 1024, "head_size": 64, "lora": {"maa": 32, "decay": 64}},
        "rwkv5": {"n_layer": 24, "n_embd": 1024, "head_size": 64},
        "*": {"ctx_len": 512, "micro_batch": 16, "lr_init": 4e-4, "lr_final": 4e-5, "warmup_steps": 10},
    },
}


def preset_values(preset: str, arch: str) -> dict[str, Any]:
    """The keys a preset sets for ``arch`` (model sizes, then suggested training settings)."""
    if not preset:
        return {}
    if preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset': unknown preset {preset!r} "
                          f"(choose from {', '.join(PRESETS)})")
    table = PRESETS[preset]
    if arch not in table:
        raise ConfigError(f"config key 'model.preset': preset {preset!r} has no {arch} sizes")
    return {**table.get("*", {}), **table[arch]}


# -- reading and validating ----------------------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SECTIONS = tuple(dict.fromkeys(f.metadata["section"] for f in _FIELDS.values()))


def key_name(name: str) -> str:
    """The dotted name of a key, as errors print it: ``data.ctx_len``."""
    f = _FIELDS.get(name)
    return f"{f.metadata['section']}.{name}" if f else name


def _unknown(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    hint = f" (did you mean {key_name(close[0])!r}?)" if close else ""
    return ConfigError(f"config key {where!r}: unknown key{hint}")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _check_value(name: str, value: Any) -> Any:
    """``value`` converted to the type of field ``name``, or a ConfigError naming the key."""
    f = _FIELDS[name]
    where = f"config key {key_name(name)!r}"
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_type_name(value)} {value!r}")
    elif kind == "int":
        if isinstance(value, float) and value.is_integer() and name.startswith("total_"):
            value = int(value)  # total_tokens = 1.5e9
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_type_name(value)} {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_type_name(value)} {value!r}")
    elif kind == "list":  # betas
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value))
        if not ok:
            raise ConfigError(f"{where}: expected two numbers in [0, 1), e.g. [0.9, 0.99], got {value!r}")
        value = [float(b) for b in value]
    elif name == "extra":  # architecture options
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (bool, int, float, str)) for k, v in value.items()
        ):
            raise ConfigError(f"{where}: expected a table of numbers, strings or booleans, e.g. "
                              f"{{rope_base = 10000}}, got {value!r}")
        value = dict(value)
    elif kind == "dict":  # lora
        if not isinstance(value, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()
        ):
            raise ConfigError(f"{where}: expected a table of positive integers, e.g. {{w = 64}}, got {value!r}")
        value = dict(value)
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{field: value}`` from a TOML document: tables named after sections, or keys at
    the top level. A key must sit in its own table (``ctx_len`` under ``[data]``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                if sub not in _FIELDS:
                    raise _unknown(sub, f"{key}.{sub}")
                if _FIELDS[sub].metadata["section"] != key:
                    raise ConfigError(f"config key '{key}.{sub}': belongs in table "
                                      f"[{_FIELDS[sub].metadata['section']}]")
                out[sub] = v
        elif key in _FIELDS:
            out[key] = value
        else:
            raise _unknown(key, key)
    return out


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A validated config from flat keys; the preset's values fill keys not given."""
    values = dict(values)
    for name in values:
        if name not in _FIELDS:
            raise _unknown(name, name)
    arch = _check_value("arch", values.get("arch", _FIELDS["arch"].default))
    preset = _check_value("preset", values.get("preset", ""))
    merged = {**preset_values(preset, arch), **values}
    checked = {name: _check_value(name, v) for name, v in merged.items()}
    cfg = TrainConfig(**checked)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: TrainConfig) -> None:
    for name in ("n_layer", "n_embd"):
        if getattr(cfg, name) == 0 and not cfg.init_from:
            raise ConfigError(f"config key {key_name(name)!r}: not set (give it, or a model.preset)")
    if cfg.n_embd and cfg.n_embd % cfg.head_size:
        raise ConfigError(f"config key 'model.n_embd': {cfg.n_embd} is not a multiple of "
                          f"model.head_size {cfg.head_size}")
    allowed = LORA_KEYS[cfg.arch]
    for name in cfg.lora:
        if name not in allowed:
            raise ConfigError(f"config key 'model.lora': {name!r} is not a low-rank size of {cfg.arch} "
                              f"(it has: {', '.join(allowed) or 'none'})")
    if not cfg.train_data:
        raise ConfigError("config key 'data.train_data': not set (a token file made by `rwkvkit prepare`)")
    if cfg.total_steps and cfg.total_tokens:
        raise ConfigError("config key 'optim.total_tokens': give total_steps or total_tokens, not both")
    if not cfg.total_steps and not cfg.total_tokens:
        raise ConfigError("config key 'optim.total_steps': not set (give total_steps or total_tokens)")
    if cfg.lr_init <= 0:
        raise ConfigError(f"config key 'optim.lr_init': must be > 0, got {cfg.lr_init}")
    if cfg.lr_final > cfg.lr_init:
        raise ConfigError(f"config key 'optim.lr_final': {cfg.lr_final} is above lr_init {cfg.lr_init}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib, or tomli on Python 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs tomli: pip install 'rwkvkit[train]'") from None
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` or ``"table.key=value"`` -> ``(key, value)``; the value is read as a
    TOML value (``3e-4``, ``true``, ``[0.9, 0.95]``, ``{w = 32}``), else taken as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = (s.strip() for s in item.split("=", 1))
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS or name not in _FIELDS:
            raise _unknown(name, key)
        if _FIELDS[name].metadata["section"] != section:
            raise ConfigError(f"config key {key!r}: belongs in table [{_FIELDS[name].metadata['section']}]")
        key = name
    elif key not in _FIELDS:
        raise _unknown(key, key)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                **explicit: Any) -> TrainConfig:
    """The config of a TOML file (optional) with ``--set`` overrides and explicit values
    (``None`` values are ignored) applied on top.

    Relative paths (data, ``out_dir``) are relative to the working directory.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = flatten(read_toml(path))
            for name, value in values.items():
                _check_value(name, value)
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    values.update({k: v for k, v in explicit.items() if v is not None})
    return from_dict(values)
