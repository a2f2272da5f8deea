"""Hostile arguments to Llama.build, generation, ModelArgs and Transformer (issue 24, items 5, 11 and 14): each is
refused with an error that names the problem, or, where it has a meaning, does what it means."""

from __future__ import annotations

import sys

import fairscale.nn.model_parallel.initialize as fs_init
import numpy as np
import pytest
import torch

import llama.loader as loader
from llama import Llama, ModelArgs, Transformer
from llama import model as model_module
from llama.distributed import available_memory, check_device
from llama.quant import kernels as quant_kernels
from llama.quant.linear import use_int8_inputs

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67]]


@pytest.fixture(scope="module")
def generator(make_checkpoint, tokenizer_path, build_generator) -> Llama:
    return build_generator(make_checkpoint("gqa"), tokenizer_path)


# ---------------------------------------------------------------- max_gen_len beyond max_seq_len (item 5)


@pytest.mark.parametrize("max_gen_len", [sys.maxsize, 10**30, np.int64(2**63 - 1), 65, 10**6])
def test_max_gen_len_beyond_max_seq_len_means_up_to_max_seq_len(generator, max_gen_len):
    want_tokens, want_logprobs = generator.generate(PROMPTS, max_gen_len=64, temperature=0, logprobs=True)
    assert max(len(t) for t in want_tokens) > 1  # a budget that ended at once would not look like this
    tokens, logprobs = generator.generate(PROMPTS, max_gen_len=max_gen_len, temperature=0, logprobs=True)
    assert tokens == want_tokens and logprobs == want_logprobs


def test_max_gen_len_beyond_max_seq_len_streams_the_same_text(generator):
    want = generator.text_completion(["The quick brown"], temperature=0, max_gen_len=None)[0]["generation"]
    assert want
    assert "".join(generator.text_completion_stream("The quick brown", temperature=0, max_gen_len=10**30)) == want
    got = generator.text_completion(["The quick brown"], temperature=0, max_gen_len=sys.maxsize)[0]["generation"]
    assert got == want


def test_max_gen_len_below_max_seq_len_keeps_the_references_budget(generator):
    tokens, _ = generator.generate(PROMPTS, max_gen_len=3, temperature=0)
    assert all(len(t) <= 3 for t in tokens) and any(len(t) == 3 for t in tokens)


# ---------------------------------------------------------------- numbers (item 14)


def test_numpy_floats_are_taken_wherever_floats_are(generator):
    results = []
    for temperature, top_p in ((np.float32(0.7), np.float32(0.9)), (float(np.float32(0.7)), float(np.float32(0.9)))):
        torch.manual_seed(3)
        results.append(generator.text_completion(["Llamas live in"], temperature=temperature, top_p=top_p,
                                                 max_gen_len=8))  # fmt: skip
    assert results[0] == results[1]
    torch.manual_seed(3)
    stream = generator.text_completion_stream("Llamas live in", temperature=np.float64(0.7), top_p=np.float16(0.9),
                                              max_gen_len=8)  # fmt: skip
    streamed = "".join(stream)
    torch.manual_seed(3)
    top_p = float(np.float16(0.9))
    [batch] = generator.text_completion(["Llamas live in"], temperature=0.7, top_p=top_p, max_gen_len=8)
    assert streamed == batch["generation"] and streamed


@pytest.mark.parametrize("bad", [np.float32("nan"), np.float64("inf"), np.bool_(True), True, "0.5", torch.tensor(0.5)])
def test_non_numbers_and_non_finite_numbers_are_still_refused(generator, bad):
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        generator.text_completion(["hi"], temperature=bad, max_gen_len=2)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        generator.text_completion(["hi"], top_p=bad, max_gen_len=2)


# ---------------------------------------------------------------- Llama.build's arguments (item 14)


@pytest.mark.parametrize("device", ["meta", "mps", "xla", torch.device("meta"), "tpu:0", "gpu", 3.5])
def test_unsupported_devices_are_refused_naming_the_supported_ones(
    make_checkpoint, tokenizer_path, device, build_generator
):
    with pytest.raises(ValueError, match=r"device=.*use 'cpu', 'cuda' or 'cuda:N'"):
        build_generator(make_checkpoint("gqa"), tokenizer_path, device=device)


def test_a_cuda_device_this_process_cannot_see_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2'.*sees 2 CUDA device\(s\): cuda:0 to cuda:1"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no usable CUDA device; use device='cpu'"):
        check_device("cuda")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64, torch.int8, torch.bool])
def test_dtypes_the_model_does_not_compute_in_are_refused(make_checkpoint, tokenizer_path, dtype, build_generator):
    with pytest.raises(ValueError, match=rf"dtype {dtype} is not supported.*torch.float32, torch.float16, torch.bf"):
        build_generator(make_checkpoint("gqa"), tokenizer_path, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", 4, np.float32])
def test_a_dtype_that_is_no_torch_dtype_is_a_type_error(make_checkpoint, tokenizer_path, dtype, build_generator):
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        build_generator(make_checkpoint("gqa"), tokenizer_path, dtype=dtype)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30, 1.5, True, "1", None])
def test_seeds_torch_cannot_take_are_refused(make_checkpoint, tokenizer_path, seed, build_generator):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"):
        build_generator(make_checkpoint("gqa"), tokenizer_path, seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), np.int64(7)])
def test_every_seed_torch_takes_is_taken(make_checkpoint, tokenizer_path, seed, build_generator):
    build_generator(make_checkpoint("gqa"), tokenizer_path, seed=seed)
    assert torch.initial_seed() == int(seed) % 2**64


@pytest.mark.parametrize("which", ["ckpt_dir", "tokenizer_path"])
@pytest.mark.parametrize("value", [None, 3, ["folder"]])
def test_a_missing_path_says_to_pass_one(make_checkpoint, tokenizer_path, which, value):
    paths = {"ckpt_dir": str(make_checkpoint("gqa")), "tokenizer_path": str(tokenizer_path), which: value}
    with pytest.raises(TypeError, match=rf"{which} must be a path .*llama.demo.DEMO_CKPT_DIR"):
        Llama.build(max_seq_len=64, max_batch_size=4, device="cpu", **paths)


# ---------------------------------------------------------------- a KV cache that cannot fit (item 14)


def test_a_kv_cache_larger_than_memory_is_refused_with_its_size(
    make_checkpoint, tokenizer_path, monkeypatch, build_generator
):
    monkeypatch.setattr(loader, "available_memory", lambda device: 16 * 10**9)
    # 2 (keys, values) x 2 layers x 4 rows x 10**8 positions x 2 KV heads x 16 x 4 bytes = 204.8 GB
    expected = (r"max_seq_len=100000000 with max_batch_size=4 needs a KV cache of 205 GB \(keys and values: 2 x 2 "
                r"layers x 4 rows x 100000000 positions x 2 KV heads x 16 x 4 bytes\), more than the 16 GB of physical "
                r"memory on this host; lower max_seq_len")  # fmt: skip
    with pytest.raises(ValueError, match=expected):
        build_generator(make_checkpoint("gqa"), tokenizer_path, max_seq_len=10**8)
    build_generator(make_checkpoint("gqa"), tokenizer_path)  # the process can still build


def test_a_kv_cache_no_machine_holds_is_refused_before_allocating(make_checkpoint, tokenizer_path, build_generator):
    assert available_memory(torch.device("cpu")) > 10**8  # this host's memory can be told
    with pytest.raises(ValueError, match=r"needs a KV cache of 2\.05e\+06 GB .*lower max_seq_len"):
        build_generator(make_checkpoint("gqa"), tokenizer_path, max_seq_len=10**12)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 51.20 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 51200000000 bytes. Error code 12 (Cannot allocate memory)"),
])  # fmt: skip
def test_an_allocator_failure_while_building_names_the_kv_cache(
    make_checkpoint, tokenizer_path, monkeypatch, error, build_generator
):
    def fail(self, *args):
        raise error

    monkeypatch.setattr(loader, "available_memory", lambda device: None)  # the check cannot tell
    monkeypatch.setattr(model_module.Attention, "__init__", fail)
    with pytest.raises(MemoryError, match=r"max_seq_len=64 with max_batch_size=4 needs a KV cache of 0\.000131 GB.*"
                                          r"ran out of memory on cpu: lower max_seq_len.*torch said"):  # fmt: skip
        build_generator(make_checkpoint("gqa"), tokenizer_path)


def test_other_errors_while_building_pass_through(make_checkpoint, tokenizer_path, monkeypatch, build_generator):
    def fail(self, *args):
        raise RuntimeError("something else")

    monkeypatch.setattr(model_module.Attention, "__init__", fail)
    with pytest.raises(RuntimeError, match="^something else$"):
        build_generator(make_checkpoint("gqa"), tokenizer_path)


def test_kv_cache_bytes_is_what_the_model_allocates(tiny_args):
    for name in ("mha", "gqa", "mqa"):
        args = tiny_args(name, max_seq_len=24, max_batch_size=3)
        model = Transformer(args).to(torch.bfloat16)
        held = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("cache_k", "cache_v")))
        assert model_module.kv_cache_bytes(args, 1, torch.bfloat16) == held
    # more ranks than KV heads: each rank holds one KV head
    assert model_module.kv_cache_shape(tiny_args("mqa"), 4) == (4, 64, 1, 16)
    assert model_module.kv_cache_shape(tiny_args("gqa"), 2) == (4, 64, 1, 16)


# ---------------------------------------------------------------- model construction (item 14)


def test_a_transformer_without_a_process_group_says_how_to_make_one(tiny_args, monkeypatch):
    monkeypatch.setattr(fs_init, "_MODEL_PARALLEL_GROUP", None)  # as in a fresh process
    assert not fs_init.model_parallel_is_initialized()
    with pytest.raises(RuntimeError, match=r"call llama.distributed.setup_model_parallel\(None, device\)"):
        Transformer(tiny_args("gqa"))


def test_rope_scaling_factor_without_use_scaled_rope_is_refused(
    tiny_args, make_checkpoint, tokenizer_path, build_generator
):
    with pytest.raises(ValueError, match=r"rope_scaling_factor=8.0 is given but use_scaled_rope is false"):
        tiny_args("gqa", rope_scaling_factor=8.0)
    with pytest.raises(ValueError, match=r"rope_scaling_factor=32.0 .*\"use_scaled_rope\": true in params.json"):
        ModelArgs.from_params({"dim": 64, "n_layers": 2, "n_heads": 4, "rope_scaling_factor": 32.0})
    with pytest.raises(ValueError, match="use_scaled_rope is false"):  # a Llama 2 checkpoint has no scaled RoPE
        build_generator(make_checkpoint("gqa"), tokenizer_path, rope_scaling_factor=8.0)
    assert tiny_args("gqa", rope_scaling_factor=32.0, use_scaled_rope=True).rope_scaling_factor == 32.0


def test_no_checkpoint_of_metas_sets_a_rope_factor_without_scaled_rope():
    """The oracle: every model llama-models knows gives ModelArgs that the new check accepts."""
    from llama_models.sku_list import all_registered_models

    known = {f for f in ModelArgs.__dataclass_fields__}
    checked = 0
    for model in all_registered_models():
        if model.arch_args:
            ModelArgs(**{k: v for k, v in model.arch_args.items() if k in known})
            checked += 1
    assert checked > 30


# ---------------------------------------------------------------- the fast path with quantization (item 11)


@pytest.mark.skipif(not quant_kernels.available(), reason="no C compiler could build the quantized kernels here")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fast_path_with_exact_kernels_gives_the_default_paths_greedy_tokens(
    make_checkpoint, tokenizer_path, mode, build_generator
):
    """What Llama.build's docstring says of compile=True with quantize=: with the exact kernels, the fast path
    decodes to the default path's greedy tokens in fp32, as it does without quantization."""
    ckpt = make_checkpoint("gqa")
    default = build_generator(ckpt, tokenizer_path, quantize=mode)
    fast = build_generator(ckpt, tokenizer_path, quantize=mode, compile=True)
    assert fast.fast is not None and fast.fast.quantized_on_cpu
    for g in (default, fast):
        use_int8_inputs(g.model, False)
    want = default.generate(PROMPTS, max_gen_len=40, temperature=0)[0]
    assert sum(map(len, want)) > 3 * 10  # long enough to say something
    assert fast.generate(PROMPTS, max_gen_len=40, temperature=0)[0] == want
