"""Model state: what a model carries from one call to the next.

A state is a small dataclass. :class:`ModelState` holds the generic machinery; each tensor
field names its batch axis (1 unless the class says otherwise: layers first, batch second),
and cache fields also name the axis that grows with the context, so batch operations
(select rows, join batches, expand) and files are the same for every field and every
subclass. Non-tensor fields (besides ``arch``) are plain JSON values; files keep them in the
safetensors metadata.

RWKV-5/6/7 (:class:`RecurrentState`):
    att_shift  [L, B, C]        previous token's ln1 output (activation dtype)
    wkv        [L, B, H, N, N]  float32 WKV state indexed [..., value, key] (y = S r)
    ffn_shift  [L, B, C]        previous token's ln2 output (activation dtype)

GoldFinch (:class:`GoldFinchState`): the above for the Finch-C2 layers, plus
    gold_att_shift, gold_ffn_shift  [G, B, C]   the GOLD layers' previous ln1 / ln2 outputs
    cache_c    [B, N, C/16]     compressed keys of every token so far (model dtype)
    cache_ids  [B, N]           token ids of every token so far (int32)

Transformers with a key/value cache (:class:`KVCacheState`, the Llama baseline):
    k, v       [L, B, H, N, D]  keys (after RoPE) and values of every token so far

Rows of one batch share a cache length N: joining states of different lengths is an error
(decode prompts of different lengths in separate batches).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import StateError
from .files import atomic_path

S = TypeVar("S", bound="ModelState")


@dataclass
class ModelState:
    """Base class of every model state: generic batch operations and files."""

    arch: str

    # Registry of state classes by name, so ``load`` can rebuild subclasses.
    _classes: ClassVar[dict[str, type["ModelState"]]] = {}
    # Fields whose batch axis is not 1, and cache fields' length axis (skipped in shape checks).
    BATCH_AXIS: ClassVar[dict[str, int]] = {}
    LENGTH_AXIS: ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        ModelState._classes[cls.__name__] = cls

    # -- generic helpers over the fields ---------------------------------------------------
    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name, in declaration order."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def value_fields(self) -> dict[str, Any]:
        """The non-tensor fields other than ``arch`` (JSON values), by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "arch" and not isinstance(getattr(self, f.name), torch.Tensor)
        }

    @classmethod
    def batch_axis(cls, name: str) -> int:
        return cls.BATCH_AXIS.get(name, 1)

    def _replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)

    def _map(self: S, fn) -> S:
        """Apply ``fn(tensor, batch_axis)`` to every tensor field."""
        return self._replace(**{n: fn(t, self.batch_axis(n)) for n, t in self.tensor_fields().items()})

    @property
    def batch_size(self) -> int:
        name, t = next(iter(self.tensor_fields().items()))
        return t.shape[self.batch_axis(name)]

    @property
    def cache_length(self) -> int:
        """Tokens held in the cache (0 for states without one)."""
        for name, axis in self.LENGTH_AXIS.items():
            return getattr(self, name).shape[axis]
        return 0

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensor_fields().values())).device

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensor_fields().values())

    def _shape_without(self, name: str, shape: Sequence[int]) -> tuple:
        """``shape`` with the batch axis (and a cache's length axis) of field ``name`` as None."""
        skip = {self.batch_axis(name), self.LENGTH_AXIS.get(name, -1)}
        return tuple(None if i in skip else s for i, s in enumerate(shape))

    # -- public operations ----------------------------------------------------------------
    def clone(self: S) -> S:
        """A deep copy (to branch from a prompt state)."""
        return self._map(lambda t, _: t.clone())

    def detach(self: S) -> S:
        return self._map(lambda t, _: t.detach())

    def to(self: S, device: torch.device | str) -> S:
        return self._map(lambda t, _: t.to(device))

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
        return self._map(lambda t, axis: t.index_select(axis, index.to(t.device)))

    def expand(self: S, batch_size: int) -> S:
        """Repeat a batch-1 state ``batch_size`` times (one prompt state for many rows)."""
        if self.batch_size != 1:
            raise StateError(f"expand: needs a batch-1 state, this one has batch size {self.batch_size}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise StateError(f"expand: batch_size must be a positive integer, got {batch_size!r}")

        def grow(t: torch.Tensor, axis: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[axis] = batch_size
            return t.expand(*shape).contiguous()

        return self._map(grow)

    @classmethod
    def cat(cls, states: Sequence[S]) -> S:
        """Join states along the batch axis (e.g. prompts prefilled one by one).

        States with a cache must hold the same number of tokens: rows of a batch share a
        cache length.
        """
        if not states:
            raise StateError("cat: no states given")
        first = states[0]
        if not all(isinstance(s, ModelState) for s in states):
            raise StateError("cat: every item must be a RecurrentState (or another model state)")
        for i, s in enumerate(states[1:], 1):
            if type(s) is not type(first) or s.arch != first.arch:
                raise StateError(f"cat: state {i} is {type(s).__name__}/{s.arch}, state 0 is {type(first).__name__}/{first.arch}")
            if s.cache_length != first.cache_length:
                raise StateError(f"cat: state {i} holds {s.cache_length} cached tokens, state 0 holds "
                                 f"{first.cache_length}; the rows of a batch share a cache length")
            if s.value_fields() != first.value_fields():
                raise StateError(f"cat: state {i} has {s.value_fields()}, state 0 has {first.value_fields()}")
            for name, t in s.tensor_fields().items():
                ref = getattr(first, name)
                if first._shape_without(name, t.shape) != first._shape_without(name, ref.shape):
                    raise StateError(f"cat: state {i} field {name} has shape {tuple(t.shape)}, state 0 has {tuple(ref.shape)}")
        return first._replace(**{
            n: torch.cat([getattr(s, n) for s in states], dim=first.batch_axis(n)) for n in first.tensor_fields()
        })

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors (atomically), with its arch, class and non-tensor
        fields in the metadata."""
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.tensor_fields().items()}
        meta = {"arch": self.arch, "state_class": type(self).__name__, "format": "rwkvkit-state"}
        values = self.value_fields()
        if values:
            meta["fields"] = json.dumps(values)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "ModelState":
        """Read a state written by :meth:`save`; it comes back as the class it was saved as."""
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
        name = meta.get("state_class", "RecurrentState")  # files from before the class was recorded
        klass = cls._classes.get(name)
        if klass is None:
            raise StateError(f"{path}: unknown state class {name!r}")
        try:
            values = json.loads(meta.get("fields", "{}"))
        except json.JSONDecodeError:
            raise StateError(f"{path}: the metadata's non-tensor fields are not valid JSON") from None
        fields = {f.name: f for f in dataclasses.fields(klass) if f.name != "arch"}
        unknown = sorted(set(values) - set(fields)) + sorted(set(tensors) - set(fields))
        if unknown:
            raise StateError(f"{path}: {name} has no field(s) {', '.join(unknown)}")
        args: dict[str, Any] = {**values}
        missing = []
        for n, f in fields.items():
            if n in tensors:
                args[n] = tensors[n]
            elif n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(n)
        if missing:
            raise StateError(f"{path}: missing state field(s) {', '.join(missing)}")
        sizes = {n: tuple(t.shape)[klass.batch_axis(n)] if t.dim() > klass.batch_axis(n) else None
                 for n, t in tensors.items()}
        if len(set(sizes.values())) > 1 or None in sizes.values():
            raise StateError(f"{path}: state tensors must share the batch size; found {sizes}")
        return klass(arch=meta["arch"], **args)

    def check_compatible(self, other: "ModelState", what: str = "state") -> None:
        """Raise StateError unless ``other`` has this state's class, arch and shapes (batch
        size and cache length aside)."""
        if type(other) is not type(self) or other.arch != self.arch:
            raise StateError(f"{what}: expected a {self.arch} {type(self).__name__}, got "
                             f"{getattr(other, 'arch', '?')} {type(other).__name__}")
        for name, t in self.tensor_fields().items():
            o = getattr(other, name)
            if self._shape_without(name, o.shape) != self._shape_without(name, t.shape) or o.dim() != t.dim():
                want = tuple("B" if s is None else s for s in self._shape_without(name, t.shape))
                if name in self.LENGTH_AXIS:
                    want = tuple("N" if i == self.LENGTH_AXIS[name] else s for i, s in enumerate(want))
                raise StateError(f"{what}: field {name} has shape {tuple(o.shape)}, the model expects {want}")
        batch = {name: t.shape[self.batch_axis(name)] for name, t in other.tensor_fields().items()}
        if len(set(batch.values())) > 1:
            raise StateError(f"{what}: its fields disagree on the batch size: {batch}")
        if other.value_fields() != self.value_fields():
            raise StateError(f"{what}: {other.value_fields()}, the model expects {self.value_fields()}")


@dataclass
class RecurrentState(ModelState):
    """The recurrent state of an RWKV-5/6/7 model (see the module docstring for layouts)."""

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    @property
    def n_layer(self) -> int:
        return self.att_shift.shape[0]

    @property
    def device(self) -> torch.device:
        return self.wkv.device


@dataclass
class GoldFinchState(RecurrentState):
    """GoldFinch: the Finch-C2 layers' recurrent state (``att_shift``, ``wkv``,
    ``ffn_shift``), the GOLD layers' token-shift states, and one cache for the whole model:
    compressed keys ``cache_c`` [B, N, C/16] and token ids ``cache_ids`` [B, N] (int32)."""

    gold_att_shift: torch.Tensor
    gold_ffn_shift: torch.Tensor
    cache_c: torch.Tensor
    cache_ids: torch.Tensor

    BATCH_AXIS: ClassVar[dict[str, int]] = {"cache_c": 0, "cache_ids": 0}
    LENGTH_AXIS: ClassVar[dict[str, int]] = {"cache_c": 1, "cache_ids": 1}


@dataclass
class KVCacheState(ModelState):
    """A transformer's key/value cache: ``k`` and ``v`` [L, B, H, N, D] (keys after RoPE)."""

    k: torch.Tensor
    v: torch.Tensor

    LENGTH_AXIS: ClassVar[dict[str, int]] = {"k": 3, "v": 3}
