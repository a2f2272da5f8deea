"""A faithful implementation of Meta's Llama 2 and Llama 3.x reference inference code.

The names below load on first use (PEP 562), so ``import llama`` or ``import llama.model`` does not import the
tokenizers, the process-group code or the generation stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "ChatPrediction": "llama.generation",
    "CompletionPrediction": "llama.generation",
    "Dialog": "llama.generation",
    "Llama": "llama.generation",
    "Message": "llama.generation",
    "ModelArgs": "llama.model",
    "Transformer": "llama.model",
    "Tokenizer": "llama.tokenizer",
}

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
]

if TYPE_CHECKING:
    from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
    from llama.model import ModelArgs, Transformer
    from llama.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
