"""Each Llama generation as data: its tokenizer class, chat format and model class.

``Llama.build`` opens the tokenizer file with ``load_tokenizer``, which tries each family's tokenizer class,
and takes the rest of the family from there, so nothing asks the user which generation a checkpoint is.
A new generation is a new row of ``FAMILIES``, not a branch in the loop or the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llama.chat_format import ChatFormat, Llama2ChatFormat, Llama3ChatFormat
from llama.model import Llama3Transformer, Transformer
from llama.tokenizer import Llama3Tokenizer, Tokenizer, TokenizerLike, check_file


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer_cls: type  # has classmethod recognizes(head: bytes) -> bool and a str `kind`
    chat_format_cls: type
    model_cls: type = Transformer

    def chat_format(self, tokenizer: TokenizerLike) -> ChatFormat:
        return self.chat_format_cls(tokenizer)


FAMILIES: tuple[Family, ...] = (
    Family("Llama 2", Tokenizer, Llama2ChatFormat, Transformer),
    Family("Llama 3", Llama3Tokenizer, Llama3ChatFormat, Llama3Transformer),
)


def load_tokenizer(path: str | os.PathLike) -> TokenizerLike:
    """The tokenizer for the file at `path`, opened with the class of whichever family the file belongs to."""
    path = check_file(path)
    with open(path, "rb") as f:
        head = f.read(256)
    for family in FAMILIES:
        if family.tokenizer_cls.recognizes(head):
            return family.tokenizer_cls(path)
    kinds = "; ".join(family.tokenizer_cls.kind for family in FAMILIES)
    raise ValueError(f"{path!r} is not a tokenizer file this library reads (it reads: {kinds})")


def family_of_folder(folder: str | os.PathLike) -> Family:
    """The family of a checkpoint folder, from the tokenizer.model inside it (Llama 3's folders hold one);
    Llama 2 (whose tokenizer lives one folder up) when there is none."""
    path = os.path.join(folder, "tokenizer.model")
    return family_of(load_tokenizer(path)) if os.path.isfile(path) else FAMILIES[0]


def family_of(tokenizer: TokenizerLike) -> Family:
    """The family whose tokenizer class `tokenizer` is."""
    for family in FAMILIES:
        if isinstance(tokenizer, family.tokenizer_cls):
            return family
    raise TypeError(f"no Llama family uses a {type(tokenizer).__name__}; see llama.families.FAMILIES")
