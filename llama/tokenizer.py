"""SentencePiece tokenizer with the reference's interface."""

from __future__ import annotations

import logging
import os

from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model (``tokenizer.model``)."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path!r}; pass the path of Meta's tokenizer.model"
            )
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
        logger.debug("#words: %d - BOS ID: %d - EOS ID: %d", self.n_words, self.bos_id, self.eos_id)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of s, with the BOS id in front and/or the EOS id at the end when asked."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: list[int]) -> str:
        """Text of the token ids t."""
        return self.sp_model.decode(list(t))
