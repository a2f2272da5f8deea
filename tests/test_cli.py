import pytest
import torch

from llama.checks import parse_dtype
from llama.cli import resolve_model


def test_parse_dtype():
    assert parse_dtype(None) is None
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of float32, float16, bfloat16"):
        parse_dtype("fp8")


def test_resolve_model():
    ckpt, tok, name = resolve_model(None, None)
    assert ckpt.endswith("demo") and tok.endswith("tokenizer.model") and "demo" in name
    assert resolve_model("a", "b") == ("a", "b", "a")
    with pytest.raises(ValueError, match="give both"):
        resolve_model(None, "b")
