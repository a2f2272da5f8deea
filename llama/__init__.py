"""A faithful implementation of Meta's Llama 2 reference inference code."""

from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Transformer",
    "Tokenizer",
]
