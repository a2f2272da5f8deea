"""Llama3Tokenizer against Meta's own (llama_models.llama3.tokenizer.Tokenizer) on Meta's real tokenizer.model."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import pytest
from helpers import META_TOKENIZER
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama.chat_format import Llama2ChatFormat, Llama3ChatFormat
from llama.families import family_of, load_tokenizer
from llama.tokenizer import Llama3Tokenizer, Tokenizer, TokenizerLike, _split_long_runs

TEXTS = [
    "",
    "Hello world",
    "  leading spaces and trailing  ",
    "Café naïve résumé jalapeño, Zürich ☃ 𝄞",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🙂👍🏽👨‍👩‍👧‍👦 and flags 🇫🇷",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\r\n",
    "digits 1 12 123 1234 12345 3.14159 1,000,000 0x1F",
    "I'm, you're, they've, we'll, he'd, it's, I'M, DON'T",
    "tabs\t\tand\nnewlines\n\n\n and \u00a0non-breaking\u2003spaces\u3000",
    "<|begin_of_text|><|eot_id|> special-token text <|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_100|><|python_tag|>x",
    "\x00\x01 control \x7f characters",
]


@pytest.fixture(scope="module")
def ours() -> Llama3Tokenizer:
    return Llama3Tokenizer(META_TOKENIZER)


@pytest.fixture(scope="module")
def meta() -> MetaTokenizer:
    return MetaTokenizer(META_TOKENIZER)


def test_special_ids_as_meta(ours, meta):
    assert ours.special_tokens == meta.special_tokens
    assert len(ours.special_tokens) == 256
    assert ours.n_words == meta.n_words == 128256
    assert (
        (ours.bos_id, ours.eos_id, ours.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id) == (128000, 128001, 128004)
    )
    assert (ours.eom_id, ours.eot_id, ours.python_tag_id) == (meta.eom_id, meta.eot_id, meta.python_tag_id)
    assert (ours.eom_id, ours.eot_id, ours.python_tag_id) == (128008, 128009, 128010)
    assert (ours.start_header_id, ours.end_header_id) == (128006, 128007)
    assert ours.special_tokens["<|image|>"] == 128011
    assert ours.special_tokens["<|reserved_special_token_2|>"] == 128012
    assert ours.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert ours.stop_ids == meta.stop_tokens == [128001, 128008, 128009]
    assert ours.pat_str == meta.pat_str
    assert isinstance(ours, TokenizerLike)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (True, True)])
def test_ids_and_text_as_meta(ours, meta, text, bos, eos):
    ids = ours.encode(text, bos=bos, eos=eos)
    assert ids == meta.encode(text, bos=bos, eos=eos)
    assert ours.decode(ids) == meta.decode(ids)
    if not bos and not eos:
        assert ours.decode(ids) == text  # byte-level BPE round-trips any text


def test_special_token_text_is_plain_text(ours):
    ids = ours.encode("<|eot_id|>", bos=False, eos=False)
    assert ours.eot_id not in ids and len(ids) > 1
    assert ours.decode(ids) == "<|eot_id|>"


def test_decode_as_meta_on_special_and_broken_bytes(ours, meta):
    clef = ours.encode("𝄞", bos=False, eos=False)  # four UTF-8 bytes in several tokens
    assert len(clef) > 1
    ids_sets = [
        [128000, 128006, 882, 128007, 271, 9906, 128009, 128255],
        clef[:1],  # a cut UTF-8 sequence: U+FFFD
        clef[1:] + clef,
        list(range(0, 128256, 997)),
    ]
    for ids in ids_sets:
        assert ours.decode(ids) == meta.decode(ids)
        assert ours.decode(tuple(ids)) == meta.decode(ids)


@pytest.mark.parametrize(
    "text",
    [
        " " * 30_000 + "x",  # one whitespace run over 25k
        "word " + "\n" * 26_000 + "\t" * 50_001 + "end",
        "a" * 60_000 + " " * 25_001 + "b" * 25_000 + " " + "c" * 25_001,  # runs over, at and past the limit
        "🙂" * 30_000,
    ],
    ids=["spaces", "newlines-tabs", "letters", "emoji"],
)
def test_long_runs_as_meta(ours, meta, text):
    assert ours.encode(text, bos=True, eos=False) == meta.encode(text, bos=True, eos=False)


def test_input_over_400k_chars_as_meta(ours, meta):
    rng = random.Random(0)
    words = ["the", "llama", " ", "\n", "12345", "日本", "🙂", "<|eot_id|>", "x" * 300, " " * 40]
    text = "".join(rng.choice(words) for _ in range(120_000))
    text += "y" * 30_000 + " " * 30_000  # long runs near the end, after the first 400k chunk
    assert len(text) > 800_000
    ids = ours.encode(text, bos=True, eos=True)
    assert ids == meta.encode(text, bos=True, eos=True)
    assert ours.decode(ids[1:-1]) == text


def test_run_splitting_equals_meta_on_random_strings():
    # Meta's splitter and ours with a small limit, on strings built from a few space and non-space characters.
    rng = random.Random(1)
    for _ in range(2000):
        s = "".join(rng.choice(" a\n\u00a0b\t") for _ in range(rng.randrange(0, 40)))
        limit = rng.randrange(1, 6)
        assert list(_split_long_runs(s, limit)) == list(MetaTokenizer._split_whitespaces_or_nonwhitespaces(s, limit))


def test_lone_surrogate_and_non_str_rejected(ours):
    with pytest.raises(ValueError, match="lone surrogate"):
        ours.encode("a\ud800b", bos=False, eos=False)
    with pytest.raises(TypeError, match="expects a str"):
        ours.encode(b"bytes", bos=False, eos=False)


# -- ranks files --


def write_ranks(path: Path, tokens: list[bytes]) -> None:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))


BYTES = [bytes([b]) for b in range(256)]


def test_rewritten_ranks_file_is_read_again(tmp_path):
    # The same path with new contents must give the new tokenizer (tiktoken's own loader caches by path).
    path = tmp_path / "tokenizer.model"
    write_ranks(path, BYTES)
    first = Llama3Tokenizer(path)
    assert first.n_words == 256 + 256 and first.bos_id == 256
    assert first.encode("ab", bos=False, eos=False) == [97, 98]
    write_ranks(path, BYTES + [b"ab"])
    second = Llama3Tokenizer(path)
    assert second.n_words == 257 + 256 and second.bos_id == 257
    assert second.encode("ab", bos=False, eos=False) == [256]
    assert load_tokenizer(path).encode("ab", bos=False, eos=False) == [256]


@pytest.mark.parametrize(
    "contents,message",
    [
        (b"", "no BPE ranks"),
        (b"IQ== 0\nIg==\n", "line 2: expected '<base64 token> <rank>'"),
        (b"IQ== 0\nIg== 1 2\n", "line 2: expected"),
        (b"IQ== 0\n\nnot-base64! 1\n", "line 3: .* is not base64"),
        (b"IQ== 0\nIg== one\n", "line 2: the rank .* is not a non-negative integer"),
        (b"IQ== 0\nIg== -1\n", "line 2: the rank"),
        (b"IQ== 0\nIQ== 1\n", "line 2: token .* already has rank 0"),
        (b"IQ== 0\nIg== 2\n", r"the ranks must be 0\.\.1"),
    ],
)
def test_corrupt_ranks_file(tmp_path, contents, message):
    path = tmp_path / "bad.model"
    path.write_bytes(contents)
    with pytest.raises(ValueError, match=message) as info:
        Llama3Tokenizer(path)
    assert str(path) in str(info.value)


def test_missing_ranks_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Llama3Tokenizer(tmp_path / "nope.model")


# -- which class opens which file --


def test_load_tokenizer_picks_the_class(tokenizer_path, ours):
    sp = load_tokenizer(tokenizer_path)
    assert type(sp) is Tokenizer
    assert family_of(sp).name == "Llama 2" and isinstance(family_of(sp).chat_format(sp), Llama2ChatFormat)
    tok = load_tokenizer(META_TOKENIZER)
    assert type(tok) is Llama3Tokenizer
    assert tok.encode("Hello world", bos=True, eos=False) == ours.encode("Hello world", bos=True, eos=False)
    assert family_of(tok).name == "Llama 3" and isinstance(family_of(tok).chat_format(tok), Llama3ChatFormat)


def test_recognizes_only_its_own_kind(tokenizer_path):
    sp_head = Path(tokenizer_path).read_bytes()[:256]
    ranks_head = META_TOKENIZER.read_bytes()[:256]
    assert Tokenizer.recognizes(sp_head) and not Tokenizer.recognizes(ranks_head)
    assert Llama3Tokenizer.recognizes(ranks_head) and not Llama3Tokenizer.recognizes(sp_head)
    assert Llama3Tokenizer.recognizes(b"IQ== 0")  # a one-line file without its newline
    assert not Llama3Tokenizer.recognizes(b"hello world\n")


@pytest.mark.parametrize("contents", [b"hello world\n", b'{"vocab": {}}', b"\x00\x01\x02", b""])
def test_load_tokenizer_rejects_other_files(tmp_path, contents):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(contents)
    with pytest.raises(ValueError, match="is not a tokenizer file this library reads") as info:
        load_tokenizer(path)
    assert Tokenizer.kind in str(info.value) and Llama3Tokenizer.kind in str(info.value)
