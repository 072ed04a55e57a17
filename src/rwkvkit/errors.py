"""Exceptions raised by rwkvkit.

Every error the library raises on bad input is a subclass of :class:`RwkvkitError`, so
callers (and the CLI) can catch one type; the subclasses say what kind of fault it was,
and the message names the file, key, shape or value at fault.
"""

from __future__ import annotations


class RwkvkitError(Exception):
    """Base class of every error rwkvkit raises on bad input."""


class CheckpointError(RwkvkitError):
    """A checkpoint file cannot be read: missing, corrupt, truncated or of an unknown format."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint holds something other than tensors (it could run code); refused."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint is of an architecture or variant rwkvkit does not run."""


class StateDictError(CheckpointError):
    """The tensors of a checkpoint do not fit the model: missing, unexpected or misshapen keys."""


class ConfigError(RwkvkitError):
    """A model configuration or config.json is invalid."""


class TokenizerError(RwkvkitError):
    """Text or token ids that the tokenizer cannot handle, or a bad vocabulary file."""


class StateError(RwkvkitError):
    """A recurrent state that does not match the model or the operation asked of it."""


class GenerationError(RwkvkitError):
    """Invalid generation settings or inputs."""


class InputError(RwkvkitError, ValueError):
    """Invalid arguments to a model call (token shapes, ids out of range, ...)."""


class CUDAGraphError(RwkvkitError):
    """A model that cannot be decoded through a CUDA graph (not on CUDA, a growing cache, int8)."""
