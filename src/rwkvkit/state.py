"""Recurrent state of RWKV models.

A state is a small dataclass of stacked per-layer tensors. Every tensor field has the
layer axis first and the batch axis second, so batch operations (select rows, join
batches) are the same for every field and every subclass (models with caches add fields).

For RWKV-5/6/7:
    att_shift  [L, B, C]        previous token's ln1 output (activation dtype)
    wkv        [L, B, H, N, N]  float32 WKV state indexed [..., value, key] (y = S r)
    ffn_shift  [L, B, C]        previous token's ln2 output (activation dtype)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import StateError
from .files import atomic_path

S = TypeVar("S", bound="RecurrentState")


@dataclass
class RecurrentState:
    """The recurrent state of an RWKV-5/6/7 model (see the module docstring for layouts)."""

    arch: str
    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    # Registry of state classes by name, so ``load`` can rebuild subclasses.
    _classes: ClassVar[dict[str, type["RecurrentState"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        RecurrentState._classes[cls.__name__] = cls

    # -- generic helpers over the tensor fields -------------------------------------------
    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name, in declaration order."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def _replace(self: S, **tensors: torch.Tensor) -> S:
        return dataclasses.replace(self, **tensors)

    def _map(self: S, fn) -> S:
        return self._replace(**{n: fn(t) for n, t in self.tensor_fields().items()})

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    @property
    def n_layer(self) -> int:
        return self.att_shift.shape[0]

    @property
    def device(self) -> torch.device:
        return self.wkv.device

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensor_fields().values())

    # -- public operations ----------------------------------------------------------------
    def clone(self: S) -> S:
        """A deep copy (to branch from a prompt state)."""
        return self._map(lambda t: t.clone())

    def detach(self: S) -> S:
        return self._map(lambda t: t.detach())

    def to(self: S, device: torch.device | str) -> S:
        return self._map(lambda t: t.to(device))

    def select(self: S, rows: int | Sequence[int] | torch.Tensor) -> S:
        """The state of the given batch rows (an int keeps a batch of one)."""
        if isinstance(rows, int):
            rows = [rows]
        index = torch.as_tensor(rows, device=self.device)
        if index.dtype == torch.bool or index.is_floating_point() or index.dim() > 1:
            raise StateError(f"select: rows must be integer row numbers, got {index.dtype} {tuple(index.shape)}")
        index = index.long().reshape(-1)
        if index.numel() and (index.min() < -self.batch_size or index.max() >= self.batch_size):
            raise StateError(f"select: rows {index.tolist()} out of range for batch size {self.batch_size}")
        index = torch.where(index < 0, index + self.batch_size, index)
        return self._map(lambda t: t.index_select(1, index.to(t.device)))

    def expand(self: S, batch_size: int) -> S:
        """Repeat a batch-1 state ``batch_size`` times (one prompt state for many rows)."""
        if self.batch_size != 1:
            raise StateError(f"expand: needs a batch-1 state, this one has batch size {self.batch_size}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise StateError(f"expand: batch_size must be a positive integer, got {batch_size!r}")
        return self._map(lambda t: t.expand(t.shape[0], batch_size, *t.shape[2:]).contiguous())

    @classmethod
    def cat(cls, states: Sequence[S]) -> S:
        """Join states along the batch axis (e.g. prompts prefilled one by one)."""
        if not states:
            raise StateError("cat: no states given")
        first = states[0]
        if not all(isinstance(s, RecurrentState) for s in states):
            raise StateError("cat: every item must be a RecurrentState")
        for i, s in enumerate(states[1:], 1):
            if type(s) is not type(first) or s.arch != first.arch:
                raise StateError(f"cat: state {i} is {type(s).__name__}/{s.arch}, state 0 is {type(first).__name__}/{first.arch}")
            for name, t in s.tensor_fields().items():
                ref = getattr(first, name)
                if t.shape[:1] + t.shape[2:] != ref.shape[:1] + ref.shape[2:]:
                    raise StateError(f"cat: state {i} field {name} has shape {tuple(t.shape)}, state 0 has {tuple(ref.shape)}")
        return first._replace(
            **{n: torch.cat([getattr(s, n) for s in states], dim=1) for n in first.tensor_fields()}
        )

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors (atomically), with its arch in the metadata."""
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.tensor_fields().items()}
        meta = {"arch": self.arch, "state_class": type(self).__name__, "format": "rwkvkit-state"}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "RecurrentState":
        """Read a state written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"{path}: no such state file")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise StateError(f"{path}: not a readable safetensors state file ({exc})") from None
        if meta.get("format") != "rwkvkit-state" or "arch" not in meta:
            raise StateError(f"{path}: safetensors file has no rwkvkit state metadata")
        klass = cls._classes.get(meta.get("state_class", ""), RecurrentState)
        if klass is RecurrentState and meta.get("state_class") not in (None, "RecurrentState"):
            raise StateError(f"{path}: unknown state class {meta['state_class']!r}")
        names = [f.name for f in dataclasses.fields(klass) if f.name != "arch"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise StateError(f"{path}: missing state tensor(s) {', '.join(missing)}")
        shapes = {n: tuple(tensors[n].shape) for n in names}
        if any(len(sh) < 2 or sh[:2] != shapes[names[0]][:2] for sh in shapes.values()):
            raise StateError(f"{path}: state tensors must share [layers, batch, ...]; found {shapes}")
        return klass(arch=meta["arch"], **{n: tensors[n] for n in names})

    def check_compatible(self, other: "RecurrentState", what: str = "state") -> None:
        """Raise StateError unless ``other`` has this state's class, arch and shapes (batch aside)."""
        if type(other) is not type(self) or other.arch != self.arch:
            raise StateError(f"{what}: expected a {self.arch} {type(self).__name__}, got {other.arch} {type(other).__name__}")
        for name, t in self.tensor_fields().items():
            o = getattr(other, name)
            if o.shape[:1] + o.shape[2:] != t.shape[:1] + t.shape[2:]:
                raise StateError(
                    f"{what}: field {name} has shape {tuple(o.shape)}, the model expects "
                    f"{(t.shape[0], 'B', *t.shape[2:])}"
                )
RecurrentState._classes["RecurrentState"] = RecurrentState
