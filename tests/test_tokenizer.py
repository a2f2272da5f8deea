from pathlib import Path

import pytest

from llama.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Café naïve 日本語 🙂",
    "[INST] question [/INST]",
    "",
]


def mistral_tokenizer_path() -> Path:
    mistral_common = pytest.importorskip("mistral_common", reason="install the test extra: pip install -e '.[test]'")
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def test_special_ids_and_bos_eos(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.n_words == 512
    plain = tok.encode("hello", bos=False, eos=False)
    assert tok.encode("hello", bos=True, eos=False) == [1] + plain
    assert tok.encode("hello", bos=False, eos=True) == plain + [2]
    assert tok.encode("hello", bos=True, eos=True) == [1] + plain + [2]


def test_byte_fallback_round_trips_characters_outside_the_vocabulary(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "Zürich ☃ 𝄞"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip() == t])
def test_round_trip_exact(tokenizer_path, text):
    tok = Tokenizer(tokenizer_path)
    assert tok.decode(tok.encode(text, bos=True, eos=False)) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip() == t])
def test_round_trip_real_llama_tokenizer(text):
    tok = Tokenizer(mistral_tokenizer_path())
    assert tok.n_words == 32000
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    ids = tok.encode(text, bos=True, eos=False)
    assert ids[0] == 1
    assert tok.decode(ids) == text


def test_real_tokenizer_known_pieces():
    tok = Tokenizer(mistral_tokenizer_path())
    # SentencePiece adds a dummy prefix space: "Hello" is the single piece "▁Hello".
    ids = tok.encode("Hello", bos=False, eos=False)
    assert [tok.sp_model.id_to_piece(i) for i in ids] == ["▁Hello"]


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")


def test_unreadable_model_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        Tokenizer(bad)


@pytest.mark.parametrize("value", [None, 12, b"bytes", ["list"]])
def test_encode_rejects_non_str(tokenizer_path, value):
    with pytest.raises(TypeError, match="expects a str"):
        Tokenizer(tokenizer_path).encode(value, bos=True, eos=False)
