"""Weight quantization for inference: ``load_model(path, quantize="int8")``.

``"int8"``: every big matrix (the blocks' ``nn.Linear`` layers and the head) becomes an
:class:`Int8Linear` holding int8 weights with one float32 scale per output channel
(symmetric: W ~ q * s, q in [-127, 127]). The embedding (a row lookup), the LayerNorms, the
low-rank matrices and the other small vectors keep the model's dtype. Decoding reads about a
quarter of the bytes of float32 weights per token, which is what bounds its speed on a CPU.

How an int8 product is computed:

* CPU with PyTorch's fbgemm engine (x86): each input row is divided by its largest
  magnitude, rounded to integers on a fixed grid (8 bits; 7 where the CPU's int8 dot product
  saturates, i.e. x86 without VNNI), multiplied by the int8 weights with int32 accumulation,
  and scaled back. Scaling per row keeps every row's own resolution and makes its result
  independent of the other rows of the batch. A single row (decoding one sequence) is
  quantized over its own [min, max] by the kernel directly, which saves the scaling passes;
  so a row decoded alone and the same row inside a batch can differ in the last int8 step.
* Anywhere else: weight-only, the weights dequantized on the fly (correct, not fast).

Decoding one token reads every weight once and does little arithmetic with it, so the fixed
cost of a call counts as much as the bytes. :class:`Int8Rows` multiplies several matrices,
each by its own input rows, in one call; the RWKV-7 decoding step uses it for its low-rank
maps, which it keeps as int8 copies for decoding (their float matrices stay for ``forward``;
``rwkv7.Int8Products``).

``state_dict()`` of a quantized layer holds the dequantized float32 ``weight`` under the
official key, so ``model.save()`` and exporting still write official-layout files (with the
rounding of the int8 weights), and loading a state dict into an :class:`Int8Linear`
quantizes it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

QUANTIZE_MODES = ("int8",)
_TINY = 1e-30  # rows whose largest magnitude is below this are treated as zeros


def check_mode(quantize: str | None) -> str | None:
    """``quantize`` if it is None or a known mode, else a ConfigError naming the choices."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE_MODES)} or None")
    return quantize


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(q int8 [out, in], scale float32 [out])`` with
    ``weight ~ q * scale[:, None]``; an all-zero row gets scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.lru_cache(maxsize=None)
def _fbgemm_activation_levels() -> int | None:
    """Largest magnitude of the int8 activation grid that the x86 engine multiplies exactly
    (127: 8 bits; 63: 7 bits where u8 x s8 pairs saturate in int16), or None when the engine
    is not available. Found by running the kernel once on a worst case."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        w = torch.full((8, 64), 1.0)
        x = torch.ones(1, 64)
        packed = _prepack(*quantize_int8_per_channel(w))
        for levels in (127, 63):
            y = _fbgemm_linear(x, packed, levels)
            if torch.allclose(y, torch.full_like(y, 64.0), rtol=1e-3):
                return levels
    except (RuntimeError, AttributeError):  # engine missing from this build
        return None
    return None


def _prepack(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """The int8 weights packed for fbgemm (chosen explicitly: the "x86" engine's own choice
    is slower for single rows)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the kernel is not
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = engine


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    """fbgemm's two products: ``linear_dynamic`` (the input quantized over its own range by
    the kernel) and ``linear_with_input_q_dq_qweight_dq_output_fp32`` (on a given grid).

    Called below their Python wrappers: the overload packet inspects the arguments on every
    call (~5 us), and an overload that takes a packed-weights object still scans them in
    Python (~2 us); the operator itself (``_op``, where this torch has it) does neither.
    Call them inside :func:`_plain_dispatch`."""
    ops = torch.ops.quantized
    overloads = (ops.linear_dynamic.default, ops.linear_with_input_q_dq_qweight_dq_output_fp32.default)
    return tuple(getattr(op, "_op", op) for op in overloads)


def _plain_dispatch() -> Any:
    """A context without ``__torch_function__`` dispatch on tensor subclasses, for calls that
    take the packed weights. Before each call PyTorch probes every argument for a
    ``__torch_function__`` attribute; on the packed weights (a TorchScript object) the probe
    raises and catches an exception inside, ~8 us of a ~11 us call on a small matrix. Our
    inputs are plain tensors, so skipping the probe changes nothing else."""
    return torch._C.DisableTorchFunctionSubclass()


def _fbgemm_linear(x: torch.Tensor, packed: Any, levels: int) -> torch.Tensor:
    """x [M, K] float32 -> x W^T [M, N] float32, activations quantized per row."""
    dynamic, on_grid = _kernels()
    with _plain_dispatch():
        if x.shape[0] == 1:  # one row: the kernel's own per-call range is that row's (fewer ops)
            return dynamic(x, packed, levels < 127)
        m = x.abs().amax(dim=-1, keepdim=True).clamp_min_(_TINY)  # (linalg.vector_norm(inf) is 10x slower)
        return on_grid(x / m, 1.0 / levels, levels + 1, packed).mul_(m)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and float32 per-output-channel scales
    (see the module docstring for how the product is computed)."""

    def __init__(self, in_features: int, out_features: int, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._set(q, scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ConfigError("Int8Linear: layers with a bias are not supported")
        q, scale = quantize_int8_per_channel(linear.weight)
        return cls(linear.in_features, linear.out_features, q, scale)

    def _set(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Store the weights in the form the kernel for their device wants."""
        self.levels = _fbgemm_activation_levels() if q.device.type == "cpu" else None
        if self.levels is not None:
            self.packed = _prepack(q, scale)
            self.register_buffer("qweight", None, persistent=False)
            self.register_buffer("scale", None, persistent=False)
        else:
            self.packed = None
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scale", scale.float(), persistent=False)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q int8 [out, in], scale float32 [out])``."""
        if self.packed is None:
            return self.qweight, self.scale
        qw, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qw.int_repr(), qw.q_per_channel_scales().float()

    def dequantized_weight(self) -> torch.Tensor:
        q, scale = self.int8_weight()
        return q.float() * scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if packed is not None and x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous():
            return _fbgemm_linear(x, packed, self.levels)  # decoding: no reshapes, fewest checks
        if packed is None:
            q, scale = self.qweight, self.scale
            return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
        if not x.is_cpu:
            raise RuntimeError(f"Int8Linear: weights packed for the CPU, input on {x.device}; quantize on the target device")
        shape = x.shape
        y = _fbgemm_linear(x.reshape(-1, shape[-1]).float().contiguous(), packed, self.levels)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    # -- state dict: the official float ``weight`` key -------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.dequantized_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying {tuple(w.shape)}, expected {(self.out_features, self.in_features)}")
            return
        device = self.qweight.device if self.packed is None else torch.device("cpu")
        self._set(*quantize_int8_per_channel(w.to(device)))

    def extra_repr(self) -> str:
        kernel = f"fbgemm, {8 if self.levels == 127 else 7}-bit activations" if self.packed is not None else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({kernel})"


class Int8Rows:
    """Several matrices with one input size, quantized and packed as one int8 matrix, for
    products in which each matrix has its own input rows (one token's differently mixed
    inputs to several projections):

        rows [n, B, in] -> y [n, B, sum(out_i)];  block(y, i) = rows[i] W_i^T  [B, out_i]

    One kernel call multiplies all n B rows by the stacked matrix; the caller keeps the
    diagonal blocks (``rwkv7.Int8Products`` masks the rest). Decoding is bound by reading the
    weights, which this does once, as n separate products would; the n-fold arithmetic is
    what such a product leaves idle, and one call instead of n saves n - 1 calls' fixed cost
    (~15-30 us each on a CPU). For one
    token (B == 1) the kernel quantizes the n rows over their common range (the mixes of one
    token span similar ranges); for several, each row is scaled on its own as in
    :class:`Int8Linear`, so rows of a batch do not affect each other. A plain object, not a
    module: it is derived from weights that the model keeps in their official form.
    Needs PyTorch's fbgemm engine (x86; see :func:`int8_rows_supported`).
    """

    def __init__(self, weights: list[torch.Tensor]) -> None:
        levels = _fbgemm_activation_levels()
        if levels is None:
            raise ConfigError("Int8Rows: this PyTorch has no fbgemm int8 kernels (x86 CPU builds have them)")
        self.levels = levels
        self.packed = _prepack(*quantize_int8_per_channel(torch.cat([w.detach().float().cpu() for w in weights])))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, B, in] -> every row times the stacked matrix, [n, B, sum(out_i)], in the
        rows' dtype."""
        n, B, K = rows.shape
        x = rows.reshape(n * B, K).float().contiguous()  # (no copies for float32 [n, B, K] rows)
        if B == 1:
            with _plain_dispatch():
                y = _kernels()[0](x, self.packed, self.levels < 127)
        else:
            y = _fbgemm_linear(x, self.packed, self.levels)
        return y.to(rows.dtype).view(n, B, -1)


def int8_rows_supported() -> bool:
    """Whether :class:`Int8Rows` (fbgemm's int8 kernels) is available here."""
    return _fbgemm_activation_levels() is not None


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace the big matrices of ``model`` (every ``nn.Linear``: the blocks' projections and
    the head) by quantized layers, in place; returns the model with ``model.quantization``
    set to ``mode``."""
    check_mode(mode)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    model.quantization = mode
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
