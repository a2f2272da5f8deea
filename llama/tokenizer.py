"""Tokenizers behind one small interface, and the one place that decides how a tokenizer file is opened.

Every tokenizer has ``n_words``, ``bos_id``, ``eos_id``, ``pad_id``, ``stop_ids`` (the ids that end a generated
row), ``encode(s, *, bos, eos)`` and ``decode(ids)``. The generation loop, the chat formats and the streams use
only these. ``llama.families.load_tokenizer(path)`` looks at a file and opens it with the class that reads it.

- ``Tokenizer``: SentencePiece (Llama 2's ``tokenizer.model``), Meta's reference interface.
- ``Llama3Tokenizer``: tiktoken byte-level BPE (Llama 3.x's ``tokenizer.model``, a ranks file), as Meta's
  ``llama_models.llama3.tokenizer.Tokenizer``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from typing import ClassVar, Iterator, Optional, Protocol, Sequence, runtime_checkable

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


def check_ids(t: Sequence[int], n_words: int) -> list[int]:
    """t as a list, once its min and max show that its ids lie in 0..n_words-1 (cheap enough for every decode);
    else the error of ``bad_id_error``. Floats in range pass here: the tokenizer library raises a TypeError for
    them, which the caller replaces with ``bad_id_error``'s."""
    ids = list(t)
    if ids:
        try:
            in_range = 0 <= min(ids) and max(ids) < n_words
        except TypeError:  # ids of types that do not compare with numbers (str, None, lists)
            in_range = False
        error = None if in_range else bad_id_error(ids, n_words)
        if error is not None:
            raise error
    return ids


def bad_id_error(ids: Sequence[object], n_words: int) -> Optional[Exception]:
    """The error for the first id in ids that is not an int in 0..n_words-1; None when all are.

    Python's and numpy's ints count (anything with ``__index__``); floats, even whole ones, do not.
    """
    for i, x in enumerate(ids):
        if not hasattr(type(x), "__index__"):
            return TypeError(f"token ids must be ints, got {x!r} ({type(x).__name__}) at index {i}")
        if not 0 <= x < n_words:
            return ValueError(
                f"token id {int(x)} (at index {i}) is out of range: this tokenizer's ids are 0..{n_words - 1}"
            )
    return None


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model (Llama 2's ``tokenizer.model``)."""

    kind: ClassVar[str] = "SentencePiece model (Llama 2)"

    def __init__(self, model_path: str | os.PathLike):
        model_path = check_file(model_path)
        from sentencepiece import SentencePieceProcessor  # here, so importing this module loads neither library

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

        Its first field is ``pieces`` (field 1, length-delimited): the byte 0x0A, which is also a newline, so a
        ranks file that starts with a blank line is told apart by its text.
        """
        return head[:1] == b"\x0a" and not looks_like_ranks(head)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of s, with the BOS id in front and/or the EOS id at the end when asked."""
        t = self.sp_model.encode(check_text(s))
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of the token ids t; a ValueError naming an id outside 0..n_words-1, a TypeError for a non-int."""
        ids = check_ids(t, self.n_words)
        try:
            return self.sp_model.decode(ids)
        except TypeError as e:  # a float id: say which, in our words
            raise bad_id_error(ids, self.n_words) or e from e


# Llama 3's pre-tokenizer: tiktoken first splits text with this pattern, then runs BPE inside each piece.
# The alternatives, tried in order:
_LLAMA3_SPLIT = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions, any case
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, with at most one leading non-letter (usually a space)
        r"\p{N}{1,3}",  # digits, at most three at a time
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation and symbols, an optional leading space, trailing newlines
        r"\s*[\r\n]+",  # whitespace up to and including newlines
        r"\s+(?!\S)",  # whitespace, leaving its last space to the word that follows
        r"\s+",  # any other whitespace
    ]
)

# Meta's named special tokens, in id order right after the BPE ranks. The rest of the 256 special ids are
# "<|reserved_special_token_N|>", N counting on from 2 (0 and 1 are already among the named ones).
_LLAMA3_NAMED_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",  # a tool call follows
    "<|image|>",
)
_LLAMA3_N_SPECIAL = 256

# tiktoken's Rust core panics on very long inputs, and slows down badly on very long runs of whitespace or of
# non-whitespace (openai/tiktoken#195), so Meta encodes text in pieces within these limits; we cut where it does,
# because a different cut can give different ids.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")  # Python's \s is exactly str.isspace(), Meta's test for whitespace

# The first line of a ranks file: a base64 token, one space, its rank.
_RANKS_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+(\r?\n|$)")


# Meta's Llama 3 ranks file is about 2.2 MB; a file far larger is not one, and is refused before it is read.
MAX_RANKS_FILE_BYTES = 64 * 2**20


def looks_like_ranks(head: bytes) -> bool:
    """Whether a file starting with `head` looks like a tiktoken ranks file: a first line ``<base64> <int>``,
    after any blank lines (which Meta's reader skips)."""
    return _RANKS_LINE.match(head.lstrip()) is not None


def read_ranks(path: str) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken ranks file (see ``parse_ranks``); a file over MAX_RANKS_FILE_BYTES is refused
    from its size."""
    size = os.path.getsize(path)
    if size > MAX_RANKS_FILE_BYTES:
        raise ValueError(
            f"{path}: {size} bytes is far more than a tiktoken ranks file holds (Meta's Llama 3 tokenizer.model "
            f"is about 2.2 MB; over {MAX_RANKS_FILE_BYTES // 2**20} MiB is refused); is it the right file?"
        )
    with open(path, "rb") as f:
        return parse_ranks(f.read(), path)


def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """The BPE ranks of the contents of a tiktoken ranks file: one ``<base64 token> <rank>`` a line, ranks
    0..n-1, each of the 256 single bytes among the tokens. `source` names the file in errors.

    Blank lines are skipped, as Meta's reader does. Where Meta's reader logs a warning and skips a bad line, this
    raises a ValueError naming the file and line: a tokenizer missing a token would give wrong ids silently.
    """
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}, line {lineno}"
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}")
        token_b64, rank_text = fields
        try:
            token = base64.b64decode(token_b64, validate=True)
        except binascii.Error as e:
            raise ValueError(f"{where}: {token_b64[:80]!r} is not base64 ({e})") from e
        if not rank_text.isdigit():
            raise ValueError(f"{where}: the rank {rank_text[:80]!r} is not a non-negative integer")
        if token in ranks:
            raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
        rank = int(rank_text)
        if rank in line_of_rank:
            raise ValueError(f"{where}: rank {rank} is already given to the token on line {line_of_rank[rank]}")
        ranks[token] = rank
        line_of_rank[rank] = lineno
    if not ranks:
        raise ValueError(f"{source}: no BPE ranks in the file")
    # The special tokens take the ids right after the ranks, so the ranks must be exactly 0..n-1. They are
    # distinct (checked above), so they are 0..n-1 unless one is n or more.
    n = len(ranks)
    if max(line_of_rank) >= n:
        gap = next(rank for rank in range(n) if rank not in line_of_rank)
        raise ValueError(f"{source}: the ranks must be 0..{n - 1}, each once, but rank {gap} is missing")
    # tiktoken starts every text from its single bytes: without a rank for one of them, encoding text that holds
    # that byte panics (a pyo3 PanicException, which `except Exception` does not catch).
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ValueError(
            f"{source}: the single byte {bytes(missing[:1])!r} has no rank ({len(missing)} of the 256 byte values "
            "lack one); a byte-level BPE ranks file ranks each byte value, so this file is damaged or not one"
        )
    return ranks


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """s cut into consecutive pieces so that no piece holds more than max_run whitespace, or non-whitespace,
    characters in a row: each run longer than that is cut every max_run characters from its start (Meta's cuts).
    """
    start = 0
    for run in _RUN.finditer(s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Llama3Tokenizer:
    """Encodes text to token ids and back with Llama 3's tiktoken BPE (the ``tokenizer.model`` of Llama 3.x).

    Ids and text are those of Meta's ``llama_models.llama3.tokenizer.Tokenizer`` with its default arguments:
    text that spells a special token (e.g. ``"<|eot_id|>"``) is encoded as plain text; only the chat format puts
    special ids in a prompt. ``special_tokens`` maps each special token to its id.
    """

    kind: ClassVar[str] = "tiktoken BPE ranks file (Llama 3)"
    pat_str: ClassVar[str] = _LLAMA3_SPLIT

    def __init__(self, model_path: str | os.PathLike):
        model_path = check_file(model_path)
        # Read the file ourselves: tiktoken's load_tiktoken_bpe caches by path and can return a stale copy
        # after the file at that path is rewritten.
        self._init_from_ranks(read_ranks(model_path), os.path.basename(model_path))
        logger.debug("loaded tiktoken ranks from %s", model_path)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], name: str) -> Llama3Tokenizer:
        """The tokenizer of BPE ranks already read and checked (by ``parse_ranks``), without a file."""
        tokenizer = cls.__new__(cls)
        tokenizer._init_from_ranks(ranks, name)
        return tokenizer

    def _init_from_ranks(self, ranks: dict[bytes, int], name: str) -> None:
        import tiktoken  # here, so importing this module loads neither tokenizer library
        n_reserved = _LLAMA3_N_SPECIAL - len(_LLAMA3_NAMED_SPECIAL)
        reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]
        specials = list(_LLAMA3_NAMED_SPECIAL) + reserved
        self.special_tokens: dict[str, int] = {token: len(ranks) + i for i, token in enumerate(specials)}
        self.model = tiktoken.Encoding(
            name=name, pat_str=self.pat_str, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )

        self.n_words: int = len(ranks) + len(specials)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.start_header_id: int = self.special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self.special_tokens["<|end_header_id|>"]
        # Meta's stop_tokens, in its order: a row ends at end of text, end of message or end of turn.
        self.stop_ids: list[int] = [self.eos_id, self.eom_id, self.eot_id]
        logger.debug("#words: %d - BOS ID: %d - EOS ID: %d", self.n_words, self.bos_id, self.eos_id)

    @classmethod
    def recognizes(cls, head: bytes) -> bool:
        """Whether a file starting with `head` looks like a tiktoken ranks file: a first line ``<base64> <int>``,
        after any blank lines."""
        return looks_like_ranks(head)

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of s, with the BOS id in front and/or the EOS id at the end when asked.

        Special-token text in s is encoded as ordinary text (Meta's default allowed_special=set(),
        disallowed_special=()), which is what tiktoken's encode_ordinary does.
        """
        s = check_text(s)
        t: list[int] = [self.bos_id] if bos else []
        for start in range(0, len(s), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(s[start : start + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                t.extend(self.model.encode_ordinary(piece))
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of the token ids t; bytes that do not form valid UTF-8 become U+FFFD, as in Meta's decode.

        A ValueError naming an id outside 0..n_words-1 (tiktoken would raise an OverflowError or KeyError), a
        TypeError for an id that is not an int.
        """
        ids = check_ids(t, self.n_words)
        try:
            return self.model.decode(ids)
        except TypeError as e:  # a float id: say which, in our words
            raise bad_id_error(ids, self.n_words) or e from e
