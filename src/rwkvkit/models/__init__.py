"""Model implementations; each registers itself under its architecture name."""

from .base import LanguageModel
from .registry import available_archs, model_class

__all__ = ["LanguageModel", "available_archs", "model_class"]
