"""Tokenizers behind one small interface, and the one place that decides how a tokenizer file is opened.

Every tokenizer has ``n_words``, ``bos_id``, ``eos_id``, ``pad_id``, ``stop_ids`` (the ids that end a generated
row), ``encode(s, *, bos, eos)`` and ``decode(ids)``. The generation loop, the chat formats and the streams use
only these. ``llama.families.load_tokenizer(path)`` looks at a file and opens it with the class that reads it.

- ``Tokenizer``: SentencePiece (Llama 2's ``tokenizer.model``), Meta's reference interface.
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar, Protocol, Sequence, runtime_checkable

from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)


@runtime_checkable
class TokenizerLike(Protocol):
    """What the rest of the library needs from a tokenizer."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: list[int]  # a generated row ends at the first of these

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, t: Sequence[int]) -> str: ...


def check_text(s: object, what: str = "Tokenizer.encode expects") -> str:
    """s itself if it is a str that can be encoded as UTF-8 (no lone surrogates), else a TypeError/ValueError.

    what: the start of the message, e.g. "message content must be".
    """
    if not isinstance(s, str):
        raise TypeError(f"{what} a str, got {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} valid Unicode text, but it holds {s[e.start:e.end]!r} at index {e.start} "
            "(a lone surrogate); decode the input with errors='replace' or remove it"
        ) from e
    return s


def check_file(model_path: str | os.PathLike) -> str:
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"tokenizer model not found: {model_path!r}; pass the path of Meta's tokenizer.model"
        )
    return model_path


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model (Llama 2's ``tokenizer.model``)."""

    kind: ClassVar[str] = "SentencePiece model (Llama 2)"

    def __init__(self, model_path: str | os.PathLike):
        model_path = check_file(model_path)
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path!r} is not a readable SentencePiece model: {e}") from e
        logger.debug("loaded SentencePiece model from %s", model_path)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama: no padding piece
        self.stop_ids: list[int] = [self.eos_id]
        logger.debug("#words: %d - BOS ID: %d - EOS ID: %d", self.n_words, self.bos_id, self.eos_id)

    @classmethod
    def recognizes(cls, head: bytes) -> bool:
        """Whether a file starting with `head` looks like a serialized SentencePiece ModelProto.

        Its first field is ``pieces`` (field 1, length-delimited): the byte 0x0A.
        """
        return head[:1] == b"\x0a"

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of s, with the BOS id in front and/or the EOS id at the end when asked."""
        t = self.sp_model.encode(check_text(s))
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of the token ids t."""
        return self.sp_model.decode(list(t))
