"""CUDA: the same checkpoint gives the CPU's greedy tokens, in fp32 and on the fast path. Skipped without a GPU."""

import pytest
import torch
from torch.testing import assert_close

from llama import Llama

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

PROMPTS = ["The quick brown fox", "Llamas live in", "Question: what is the capital of France?"]


def test_cuda_fp32_matches_cpu(make_checkpoint, tokenizer_path, build_generator):
    cpu = build_generator(make_checkpoint("gqa"), tokenizer_path)
    gpu = build_generator(make_checkpoint("gqa"), tokenizer_path, device="cuda")
    assert gpu.model.layers[0].attention.kv_cache.device.type == "cuda"
    tokens = torch.tensor([cpu.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    assert_close(gpu.model.forward(tokens.cuda(), 0).cpu(), cpu.model.forward(tokens, 0), rtol=1e-4, atol=1e-4)
    expected = cpu.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    assert gpu.text_completion(PROMPTS, temperature=0, max_gen_len=12) == expected


def test_cuda_default_dtype_is_float16(make_checkpoint, tokenizer_path):
    g = Llama.build(str(make_checkpoint("gqa")), str(tokenizer_path), max_seq_len=32, max_batch_size=1)
    assert g.device.type == "cuda" and g.model.output.weight.dtype == torch.float16
    assert torch.get_default_dtype() == torch.float32


def test_cuda_fast_path_matches_faithful(make_checkpoint, tokenizer_path, build_generator):
    faithful = build_generator(make_checkpoint("gqa"), tokenizer_path, device="cuda")
    fast = build_generator(make_checkpoint("gqa"), tokenizer_path, device="cuda", compile=True)
    expected = faithful.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    assert fast.text_completion(PROMPTS, temperature=0, max_gen_len=12) == expected
