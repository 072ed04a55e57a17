"""Architecture name -> model class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from .base import LanguageModel

_REGISTRY: dict[str, type["LanguageModel"]] = {}


def register(arch: str) -> Callable[[type["LanguageModel"]], type["LanguageModel"]]:
    """Class decorator: make a model class available under ``arch``."""

    def deco(cls: type["LanguageModel"]) -> type["LanguageModel"]:
        cls.arch = arch
        _REGISTRY[arch] = cls
        return cls

    return deco


def model_class(arch: str) -> type["LanguageModel"]:
    """The model class registered for ``arch``."""
    _load_builtin_models()
    try:
        return _REGISTRY[arch]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not implemented (available: {known})"
        ) from None


def available_archs() -> list[str]:
    _load_builtin_models()
    return sorted(_REGISTRY)


def _load_builtin_models() -> None:
    # Importing a model module registers it.
    from . import goldfinch, llama, rwkv5, rwkv6, rwkv7  # noqa: F401
