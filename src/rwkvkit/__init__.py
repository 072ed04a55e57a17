"""rwkvkit: RWKV models (RWKV-7 "Goose" first) for training, inference and research.

Public API::

    model = rwkvkit.load_model("RWKV-x070-World-0.1B-...pth")   # or a saved directory
    logits, state = model(tokens)                               # tokens: LongTensor [B, T]
    text = rwkvkit.generate(model, "The capital of France is", max_new_tokens=20)
"""

from .checkpoint import load_default_model, load_model
from .config import ModelConfig
from .errors import RwkvkitError
from .generation import ChatSession, SamplingParams, complete, generate, generate_batch, prefill, stream
from .state import RecurrentState
from .tokenizer import WorldTokenizer

__all__ = [
    "ChatSession",
    "ModelConfig",
    "RecurrentState",
    "RwkvkitError",
    "SamplingParams",
    "WorldTokenizer",
    "complete",
    "generate",
    "generate_batch",
    "load_default_model",
    "load_model",
    "prefill",
    "stream",
]
__version__ = "0.1.0"
