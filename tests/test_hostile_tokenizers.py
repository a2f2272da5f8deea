"""Hostile tokenizer files and token ids (issue 24, item 9): damaged ranks files are refused with a message naming
the file and the problem, and decode names an id it cannot decode, for both tokenizers."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import tiktoken.load
from helpers import META_TOKENIZER
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama.families import load_tokenizer
from llama.tokenizer import MAX_RANKS_FILE_BYTES, Llama3Tokenizer, Tokenizer, read_ranks

BYTES = [bytes([b]) for b in range(256)]
MERGED = [b"th", b"the", b" t", b" the", b"ab"]  # each the join of two earlier tokens


def ranks_lines(tokens: list[bytes]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens))


# -- ranks files --


def test_a_missing_single_byte_is_refused(tmp_path):
    # One byte's line removed and the ranks renumbered: tiktoken accepted it, and encode("!") then panicked
    # (pyo3's PanicException, which `except Exception` does not catch).
    path = tmp_path / "tokenizer.model"
    path.write_bytes(ranks_lines([t for t in BYTES if t != b"!"] + MERGED))
    with pytest.raises(ValueError, match=r"the single byte b'!' has no rank \(1 of the 256") as info:
        Llama3Tokenizer(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="single byte"):
        load_tokenizer(path)


def test_a_missing_line_is_refused_naming_the_gap(tmp_path):
    lines = ranks_lines(BYTES + MERGED).splitlines(keepends=True)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(lines[:33] + lines[34:]))  # rank 33 (b"!") gone, the others keep theirs
    with pytest.raises(ValueError, match=r"the ranks must be 0\.\.259, each once, but rank 33 is missing") as info:
        Llama3Tokenizer(path)
    assert str(path) in str(info.value)


def test_a_rank_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(ranks_lines(BYTES) + base64.b64encode(b"th") + b" 7\n")
    with pytest.raises(ValueError, match=r"line 257: rank 7 is already given to the token on line 8"):
        Llama3Tokenizer(path)


def test_a_huge_file_is_refused_from_its_size_before_it_is_read(tmp_path):
    path = tmp_path / "tokenizer.model"
    with open(path, "wb") as f:  # a valid first line, then 2 GiB of (sparse) zeros
        f.write(ranks_lines(BYTES[:1]))
        f.truncate(2**31)
    # Read, the zeros would fail on line 2 with another message; this one comes from the size alone.
    with pytest.raises(ValueError, match=f"{2**31} bytes is far more than a tiktoken ranks file holds") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert MAX_RANKS_FILE_BYTES >= 16 * META_TOKENIZER.stat().st_size  # far from refusing a real file


@pytest.mark.parametrize("blank", [b"\n", b"\n\n", b"\r\n", b"  \n", b"\n\t\n"])
def test_leading_blank_lines_are_skipped_as_meta_does(tmp_path, monkeypatch, blank):
    # A newline is also the first byte of a SentencePiece model: this file was reported as
    # "not a readable SentencePiece model".
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's reader would cache the file by its path
    path = tmp_path / "tokenizer.model"
    path.write_bytes(blank + ranks_lines(BYTES + MERGED))
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, Llama3Tokenizer)
    meta = MetaTokenizer(path)
    if blank.strip(b"\r\n") == b"":  # tiktoken's own reader skips empty lines only, not lines of spaces
        assert read_ranks(str(path)) == tiktoken.load.load_tiktoken_bpe(str(path))
    assert tokenizer.n_words == meta.n_words == len(BYTES + MERGED) + 256
    for text in ["the theme", " the ab", "!? é 🙂"]:
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert ids == meta.encode(text, bos=True, eos=True)
        assert tokenizer.decode(ids) == meta.decode(ids)


def test_a_sentencepiece_model_is_still_recognized(tokenizer_path):
    assert type(load_tokenizer(tokenizer_path)) is Tokenizer


# -- ids decode cannot decode --


@pytest.mark.parametrize("bad", [-1, 2**40, 128256, -(2**70)])
def test_llama3_decode_names_an_id_out_of_range(llama3_tokenizer, bad):
    with pytest.raises(ValueError, match=rf"token id {bad} \(at index 1\) is out of range: .* 0\.\.128255"):
        llama3_tokenizer.decode([9906, bad, 1917])
    assert llama3_tokenizer.decode([9906, 1917]) == "Hello world"  # still usable


@pytest.mark.parametrize("bad", [1.5, 3.0, "a", None, [5], float("nan")])
def test_llama3_decode_refuses_ids_that_are_not_ints(llama3_tokenizer, bad):
    with pytest.raises(TypeError, match=r"token ids must be ints, got .* at index 1"):
        llama3_tokenizer.decode([9906, bad])


def test_decode_takes_numpy_ints_and_tuples(llama3_tokenizer, tokenizer_path):
    assert llama3_tokenizer.decode(np.array([9906, 1917])) == llama3_tokenizer.decode((9906, 1917)) == "Hello world"
    sp = Tokenizer(tokenizer_path)
    ids = sp.encode("Hello world", bos=False, eos=False)
    assert sp.decode(np.array(ids)) == sp.decode(tuple(ids)) == "Hello world"
    assert sp.decode([]) == llama3_tokenizer.decode([]) == ""


def test_sentencepiece_decode_names_a_bad_id(tokenizer_path):
    sp = Tokenizer(tokenizer_path)
    for bad in [-1, sp.n_words, 2**40]:
        with pytest.raises(ValueError, match=rf"token id {bad} \(at index 0\) is out of range: .* 0\.\.511"):
            sp.decode([bad])
    for bad in [1.5, "the", None]:  # SentencePiece itself would decode a str as a piece
        with pytest.raises(TypeError, match="token ids must be ints"):
            sp.decode([bad])
    assert sp.decode(sp.encode("Hello", bos=True, eos=False)) == "Hello"
