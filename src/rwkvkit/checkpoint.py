"""Reading and writing checkpoints; detecting the architecture of official files.

Official BlinkDL ``.pth`` files are read with ``torch.load(weights_only=True, mmap=True)``
only: a pickle that asks for anything but tensors is refused before it can run code.
Files that rwkvkit writes are ``model.safetensors`` + ``config.json`` (+ tokenizer files).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import ModelConfig
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    StateDictError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from .models.base import FORMAT_VERSION, LanguageModel
from .models.registry import model_class
from .state import RecurrentState

_PREFIXES = ("_forward_module.", "module.")

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
"""The small bundled RWKV-7 (L8 D256, 8192-token World subset; docs/default_model.md)."""
_MAX_LISTED = 12


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


# -- reading ----------------------------------------------------------------------------------
def read_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file (weights only, memory-mapped when possible)."""
    path = Path(path)
    _check_file(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # Legacy (non-zip) format, or not a torch file at all: read it without mmap.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", msg)  # the dotted name only
        if "Weights only load failed" in msg and found:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the pickle holds objects other than tensors "
                f"(it references {found.group(1)}); nothing from it was executed"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint") from None
    except (KeyError, TypeError):  # the unpickler choking on bytes that are no pickle at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError) as exc:
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__  # its first sentence
        first = first if len(first) <= 200 else first[:197] + "..."
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None
    return _as_tensor_dict(obj, path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a ``.safetensors`` file."""
    path = Path(path)
    _check_file(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return tensors, meta


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a dict of tensors, but key {key!r} holds {type(value).__name__}"
            )
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# -- architecture -----------------------------------------------------------------------------
def detect_arch(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """The architecture of an official state dict, from its key names.

    Raises UnsupportedArchitectureError naming what was found for files rwkvkit cannot run.
    """
    if "emb.weight" not in sd or not any(k.startswith("blocks.0.") for k in sd):
        first = _listed(sorted(sd)) if sd else "no keys"
        raise UnsupportedArchitectureError(
            f"{source}: not an RWKV checkpoint (no emb.weight / blocks.0.*; found {first})"
        )
    if "blocks.0.att.r_k" in sd or "blocks.0.att.x_r" in sd:
        if any(".ffn.s_emb" in k for k in sd):
            raise UnsupportedArchitectureError(
                f"{source}: RWKV-7 DeepEmbed variant (ffn.s_emb keys) is not supported"
            )
        return "rwkv7"
    gold_paper = _goldfinch_paper_arch(sd, source)
    if gold_paper is not None:
        return gold_paper
    if "blocks.0.att.time_maa_x" in sd:
        return "rwkv6"
    decay = sd.get("blocks.0.att.time_decay")
    if "blocks.0.att.ln_x.weight" in sd:
        if (
            "blocks.0.att.gate.weight" in sd
            and decay is not None
            and decay.dim() == 2
            and decay.shape[1] > 1
        ):
            return "rwkv5"
        shape = tuple(decay.shape) if decay is not None else None
        raise UnsupportedArchitectureError(
            f"{source}: RWKV-5.0/5.1 checkpoint (per-head decay, time_decay shape {shape}) is not supported"
        )
    if "blocks.0.att.time_first" in sd:
        raise UnsupportedArchitectureError(f"{source}: RWKV-4 checkpoint (time_first, no ln_x) is not supported")
    raise UnsupportedArchitectureError(
        f"{source}: unknown RWKV variant (blocks.0 keys: {_listed(sorted(k for k in sd if k.startswith('blocks.0.')))})"
    )


def _goldfinch_paper_arch(sd: dict[str, torch.Tensor], source: str) -> str | None:
    """The architectures of the GoldFinch paper's released files (recursal/GoldFinch-paper),
    whose parameter names are ours: GoldFinch (the shared key compression
    ``w_kv_cache_a/b``), Finch-C2 (``time_value2_w1``, no gate) and the Llama baseline
    (``att.wq``). None for other files. Its Finch files are RWKV-6 files."""
    if any(k.endswith(".att.ln_r.weight") for k in sd):
        raise UnsupportedArchitectureError(
            f"{source}: GPTAlpha attention blocks (att.ln_r.weight, the GoldFinch paper's ablation) are not supported")
    if "w_kv_cache_a.weight" in sd:
        if "blocks.0.att.time_value2_w1" not in sd:
            raise UnsupportedArchitectureError(
                f"{source}: GOLD blocks over lower blocks other than Finch-C2 (blocks.0.att has "
                f"{_listed(sorted(k for k in sd if k.startswith('blocks.0.att.')))}; the paper's upgrade "
                "experiment) are not supported")
        return "goldfinch"
    if "blocks.0.att.time_value2_w1" in sd and "blocks.0.att.gate.weight" not in sd:
        return "finch-c2"
    if "blocks.0.att.wq.weight" in sd:
        return "llama"
    return None


# -- building a model -------------------------------------------------------------------------
def _check_keys(model: LanguageModel, sd: dict[str, torch.Tensor], ignored: set[str], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected and k not in ignored)
    present = [k for k in expected if k in sd]
    wrong = [f"{k} expected {list(expected[k])} found {list(sd[k].shape)}" for k in present
             if tuple(sd[k].shape) != expected[k]]
    not_float = [f"{k} ({sd[k].dtype})" for k in present if not sd[k].is_floating_point()]
    faults = [f"{what}: {_listed(keys)}" for what, keys in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected), ("wrong shape(s)", wrong),
        ("expected floating-point weights", not_float)) if keys]
    if faults:  # every kind at once, so that one run shows all that is wrong
        raise StateDictError(f"{source}: {'; '.join(faults)}")


def build_model(
    config: ModelConfig,
    sd: dict[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    source: str = "checkpoint",
) -> LanguageModel:
    """A model of ``config`` holding the tensors of ``sd`` (checked against its keys and shapes).

    ``dtype`` None keeps each tensor's dtype from the file.
    """
    cls = model_class(config.arch)
    with torch.device("meta"):
        model = cls(config)
    _check_keys(model, sd, cls.ignored_keys(sd), source)
    if dtype is None:  # one dtype for the whole model: the embedding's
        dtype = sd["emb.weight"].dtype
    tensors = {}
    for key in model.state_dict():
        t = sd[key]
        if t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.to(device)
    model.load_state_dict(tensors, assign=True)
    return model.eval()


def _state_from_tensors(arch: str, sd: dict[str, torch.Tensor], prefix: str) -> RecurrentState | None:
    fields = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not fields:
        return None
    return RecurrentState(arch=arch, **fields)


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    *,
    quantize: str | None = None,
    extra: dict[str, Any] | None = None,
) -> LanguageModel:
    """Load a model from an official ``.pth``, a directory written by ``model.save``, a
    ``.safetensors`` file with its ``config.json`` beside it, or a training run's folder (its
    newest checkpoint).

    The model carries ``.config`` and ``.tokenizer`` (the World tokenizer for official
    65536-vocabulary files; None when unknown).

    Args:
        device: where the weights go (quantized weights are packed for that device).
        dtype: of the weights and activations (float32 by default; ``torch.bfloat16``
            halves the bytes read per token); None keeps the file's dtype. On the CPU,
            float32 matrices are stored column-major, which decodes faster (see
            ``_decode_layout``; saved files are row-major as always).
        quantize: None (default) or ``"int8"``: the big matrices (the blocks' projections
            and the head) in int8 with per-output-channel scales, everything else in
            ``dtype`` (see :mod:`rwkvkit.quantize`). For inference; about a quarter of the
            bytes of float32 weights per decoded token.
        extra: architecture options of an official ``.pth`` that its tensors cannot tell
            (``ModelConfig.extra``), e.g. ``{"rope_base": 10000.0}`` for the GoldFinch
            paper's ``goldfinch_rope10k.pth``. A saved model's config.json names its own.
    """
    from .quantize import check_mode, quantize_model
    from .tokenizer import load_tokenizer

    check_mode(quantize)
    device = usable_device(device)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(f"load_model: dtype must be a floating-point torch.dtype such as torch.bfloat16 "
                         f"(or None: the file's), got {dtype!r}")

    path = _newest_checkpoint(Path(path))
    if extra and (path.is_dir() or path.suffix == ".safetensors"):
        raise ConfigError(f"{path}: extra={extra!r} applies to official .pth files only; a saved "
                          "model's options are in its config.json")
    if path.is_dir() or path.suffix == ".safetensors":
        directory = path if path.is_dir() else path.parent
        weights = directory / "model.safetensors" if path.is_dir() else path
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: no such file (a saved model needs its config.json)")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise ConfigError(f"{config_path}: format_version {version!r}; this rwkvkit reads 1 to {FORMAT_VERSION}")
        if meta.get("tokenizer") is not None and not isinstance(meta["tokenizer"], dict):
            raise ConfigError(f"{config_path}: tokenizer must be an object (as save() writes it), "
                              f"got {meta['tokenizer']!r}")
        fields = {k: v for k, v in meta.items() if k not in ("format_version", "tokenizer")}
        config = ModelConfig.from_dict(fields, source=str(config_path))
        sd, _ = read_safetensors(weights)
        default_state = _state_from_tensors(config.arch, sd, "default_state.")
        sd = {k: v for k, v in sd.items() if not k.startswith("default_state.")}
        model = build_model(config, sd, device=device, dtype=dtype, source=str(weights))
        if isinstance(meta.get("tokenizer"), dict):
            model.tokenizer = load_tokenizer(meta["tokenizer"], directory)
    else:
        sd = read_pth(path)
        arch = detect_arch(sd, str(path))
        cls = model_class(arch)
        try:  # (errors of the sizes inferred from the tensors name the file)
            config = cls.config_from_state_dict(sd)
            if extra:
                config.extra = {**config.extra, **extra}
            default_state = cls.default_state_from_state_dict(sd)
        except (StateDictError, ConfigError) as exc:
            raise type(exc)(f"{path}: {exc}") from None
        model = build_model(config, sd, device=device, dtype=dtype, source=str(path))
        if config.vocab_size == 65536:
            model.tokenizer = _bundled_world_tokenizer()
    if default_state is not None:
        model.state_template().check_compatible(default_state, f"{path}: default_state")
        model.default_state = default_state.to(device)
    if quantize is not None:
        quantize_model(model, quantize)
    else:
        _decode_layout(model)
    return model


def usable_device(device: torch.device | str, what: str = "device") -> torch.device:
    """``device`` as a torch.device that can hold tensors here, or an InputError saying why not
    (an unknown name, the meta device, no CUDA or another backend missing); ``what`` names it in
    the message (the CLI: "--device")."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what} {device!r}: not a torch device") from None
    if dev.type == "meta":
        raise InputError(f"{what} meta holds no values; load the model on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{what} {dev}: CUDA is not available (no GPU, or a CPU-only PyTorch)")
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"{what} {dev} is not usable here ({str(exc).split('. ')[0]})") from None
    return dev


def _decode_layout(model: nn.Module) -> None:
    """On the CPU, float32 ``nn.Linear`` weights are stored transposed (column-major: the same
    [out, in] tensor, strides (1, out)), as the reference package stores its matrices. At
    batch 1 decoding reads every weight once from memory, and MKL streams that layout faster:
    an RWKV-7 L12 D768 V65536 step took 40.6 instead of 50.5 ms on 2 threads of an AMD EPYC
    (the 65536 x 768 head alone 9.4 instead of 15.1 ms); prefill's matrix products run at the
    same speed either way. Not for bfloat16, where the same change made decoding slower (40.5
    instead of 32.5 ms). Saved files stay row-major (``save`` and the exports write contiguous
    tensors)."""
    if model.device.type != "cpu":
        return
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None and w.dtype == torch.float32 and w.is_contiguous():
            module.weight.data = w.data.t().contiguous().t()


def _newest_checkpoint(path: Path) -> Path:
    """A training run's folder, its ``checkpoints`` folder or their ``latest`` pointer -> the
    newest checkpoint in it; any other path unchanged."""
    if path.is_file() and path.name == "latest":
        root = path.parent
    elif path.is_dir() and not (path / "config.json").exists():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if not (root / "latest").is_file():
            return path
    else:
        return path
    from .train.checkpointing import latest_checkpoint

    return latest_checkpoint(root) or path


@functools.lru_cache(maxsize=1)
def _bundled_world_tokenizer():
    """One shared instance of the bundled World tokenizer (it is immutable and thread-safe)."""
    from .tokenizer import WorldTokenizer

    return WorldTokenizer()


def load_default_model(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32, *, quantize: str | None = None
) -> LanguageModel:
    """The small RWKV-7 that ships with rwkvkit (11M parameters, trained on public-domain
    books and TinyStories): good for trying the API and the CLI, not for real work."""
    return load_model(DEFAULT_MODEL_DIR, device=device, dtype=dtype, quantize=quantize)


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What ``rwkvkit info`` prints: architecture, sizes, parameter count, state size."""
    model = load_model(path, dtype=None)
    cfg = model.config
    file_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {
        "path": str(path),
        "arch": cfg.arch,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "head_size": cfg.head_size,
        "vocab_size": cfg.vocab_size,
        "ffn_dim": cfg.ffn_dim,
        "lora": dict(cfg.lora),
        "dtype": ", ".join(file_dtypes),
        "parameters": model.num_parameters(),
        "state_bytes_fp32": _state_bytes_fp32(model),
        "cache_bytes_per_token_bf16": model.cache_bytes_per_token(torch.bfloat16),
        "cache_ratio_vs_llama": model.cache_ratio_vs_llama(),
        "tuned_state": model.default_state is not None,
        "tokenizer": getattr(model.tokenizer, "kind", None),
    }


def _state_bytes_fp32(model: LanguageModel) -> int:
    state = model.init_state(1)
    return sum(t.numel() * 4 for t in state.tensor_fields().values())
