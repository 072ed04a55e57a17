"""Training checkpoints: atomic directories, the last K kept, a ``latest`` pointer; and the
export of a model to the official ``.pth`` layout.

A run's checkpoints live in ``OUT/checkpoints/``::

    step-00000500/
        model.safetensors, config.json (+ tokenizer files)   model.save(): load_model() reads it
        training_state.safetensors   optimizer moments, RNG states (tensors)
        training_state.json          step, tokens, schedule, data position, optimizer
                                     hyper-parameters, RNG states (the rest), the run's config
    latest                           text: the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, each file fsynced, then renamed
to its final name in one step; ``latest`` is rewritten atomically only after that, and old
checkpoints are renamed away before they are deleted. So a run killed at any moment leaves
``latest`` naming a complete checkpoint (or no ``latest`` at all before the first save).
Nothing here is pickled: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_path, atomic_write_text
from ..models.base import LanguageModel

STATE_FORMAT = "rwkvkit-train-state"
STATE_VERSION = 1
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
LATEST = "latest"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# -- the training state: tensors to safetensors, the rest to JSON -------------------------------
def pack_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested dict into ``{dotted.key: tensor}`` and a JSON-able dict where each
    tensor is replaced by ``{"__tensor__": dotted.key}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if torch.is_tensor(obj):
            tensors[path] = obj.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            for k in obj:
                if not isinstance(k, str):
                    raise TypeError(f"training state key {k!r} at {path!r} is not a string")
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"training state value at {path!r} is a {type(obj).__name__}")

    return tensors, walk(state, "")


def unpack_state(tensors: dict[str, torch.Tensor], meta: Any) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            return tensors[meta["__tensor__"]]
        return {k: unpack_state(tensors, v) for k, v in meta.items()}
    if isinstance(meta, list):
        return [unpack_state(tensors, v) for v in meta]
    return meta


# -- writing -------------------------------------------------------------------------------------
def save_checkpoint(root: str | os.PathLike, step: int, model: LanguageModel, state: dict[str, Any],
                    *, keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, and keep
    only the newest ``keep_last`` checkpoints. Returns its directory.

    ``model`` is saved with ``model.save`` (so ``load_model`` reads the directory); ``state``
    (a nested dict of tensors, numbers, strings, lists) becomes the training-state files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save(tmp)
        tensors, meta = pack_state(state)
        with atomic_path(tmp / STATE_TENSORS) as p:
            save_file(tensors, str(p), metadata={"format": STATE_FORMAT})
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "state": meta}
        atomic_write_text(tmp / STATE_JSON, json.dumps(doc, indent=1) + "\n")
        _usual_permissions(tmp)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved before (e.g. a rerun): move the old one away
            _discard(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    prune(root, keep_last)
    return final


def _usual_permissions(directory: Path) -> None:
    """mkdtemp makes a 0700 directory and some writers 0600 files: give the checkpoint the
    permissions ordinary mkdir / open would (umask applied)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed to a hidden name first, so a half-deleted
    directory never carries a checkpoint's name."""
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    root = Path(root)
    keep = {p.name for p in list_checkpoints(root)[-max(1, keep_last):]}
    latest = latest_checkpoint(root)
    if latest is not None:
        keep.add(latest.name)
    for p in list_checkpoints(root):
        if p.name not in keep:
            _discard(p)


def clean_partial(root: str | os.PathLike) -> None:
    """Remove what an interrupted save or prune left behind (hidden temporary directories)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-step-") or p.name.startswith(".trash-")):
            shutil.rmtree(p, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet.

    Should ``latest`` name a directory that is gone (a checkpoint of the same step being
    replaced when the run was killed), the newest checkpoint directory is taken instead:
    every ``step-*`` directory is complete, since it only gets that name once written.
    """
    root = Path(root)
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if _NAME.match(name) and (root / name).is_dir():
        return root / name
    found = list_checkpoints(root)
    return found[-1] if found else None


@dataclass
class TrainingState:
    """A checkpoint's training state: the step and the nested state dict that was saved."""

    path: Path
    step: int
    state: dict[str, Any]


def load_training_state(path: str | os.PathLike) -> TrainingState:
    """Read the training state of checkpoint directory ``path``."""
    path = Path(path)
    meta_path, tensor_path = path / STATE_JSON, path / STATE_TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file (not a training checkpoint)")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{meta_path}: not an rwkvkit training state")
    if doc.get("version") != STATE_VERSION:
        raise CheckpointError(f"{meta_path}: version {doc.get('version')!r}; this rwkvkit reads {STATE_VERSION}")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise CheckpointError(f"{tensor_path}: corrupt training state ({exc})") from None
    return TrainingState(path=path, step=int(doc["step"]), state=unpack_state(tensors, doc["state"]))


# -- export --------------------------------------------------------------------------------------
def official_state_dict(model: LanguageModel, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's tensors in the official checkpoint layout and key order.

    Our parameter names are the official keys; RWKV-7 files also carry layer 0's unused
    ``att.v0/v1/v2`` (zeros here), which are inserted where the official files have them.
    Floating tensors are cast to ``dtype`` (None keeps them).
    """
    out: dict[str, torch.Tensor] = {}
    cfg = model.config
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        out[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()).contiguous()
        if cfg.arch == "rwkv7" and key == "blocks.0.att.a2" and "blocks.0.att.v0" not in out:
            C, Dv = cfg.n_embd, cfg.lora["v"]
            zdt = dtype or t.dtype
            out["blocks.0.att.v0"] = torch.zeros(1, 1, C, dtype=zdt)
            out["blocks.0.att.v1"] = torch.zeros(C, Dv, dtype=zdt)
            out["blocks.0.att.v2"] = torch.zeros(Dv, C, dtype=zdt)
    return out


def export_official(model: LanguageModel, path: str | os.PathLike,
                    dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write ``model`` as an official ``.pth`` (a ``torch.save``d dict of tensors, bf16 like
    the released files unless ``dtype`` says otherwise), atomically."""
    path = Path(path)
    sd = official_state_dict(model, dtype)
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return path
