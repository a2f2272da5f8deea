"""Plain helpers and constants shared by the test modules (fixtures live in conftest.py).

Test modules import from here, never from each other or from conftest.py: pytest loads conftest.py as a plugin,
and a second import of it, or of a test module, under another name would run its module code twice.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from llama.model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parent.parent

# Meta's Llama 3 tokenizer.model (the same file for Llama 3, 3.1, 3.2 and 3.3), shipped in llama-models.
META_TOKENIZER = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))

# name -> tiny ModelArgs covering each variant the reference supports
TINY_CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4),
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    "mqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1),
    "ffn_multiplier": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=16),
    "odd_multiple_of": dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, multiple_of=7, rope_theta=500.0),
}

CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A journey of a thousand miles begins with a single step, said the old teacher to the students.
Llamas live in the mountains of South America and are related to camels and alpacas.
Numbers such as 12345 and 2024 appear in text, along with punctuation: commas, periods; and quotes "like this".
Café, naïve, résumé and jalapeño carry accents; 日本語 and emoji 🙂 fall back to bytes.
Researchers trust reference code because it gives the same numbers every time it runs.
Question: what is the capital of France? Answer: the capital of France is Paris.
[INST] <<SYS>> system prompts and instructions <</SYS>> [/INST]
"""

# The prompts that model-parallel runs (tests/mp_worker.py under torchrun) greedily complete.
MP_PROMPTS = ["The quick brown fox", "Llamas live in", "Question: what is the capital of France?"]

# What the example scripts print between two results.
SEPARATOR = "=================================="


# ---------------------------------------------------------------- tiny models


def init_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight a well-spread random value (fan-in scaled), so logits are far from ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    return init_random_(Transformer(args), seed).eval()


def params_json(args: ModelArgs) -> dict:
    """The params.json Meta would write for args (vocab_size -1: the tokenizer decides)."""
    keep = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")
    params = {k: v for k, v in dataclasses.asdict(args).items() if k in keep and v is not None}
    params["vocab_size"] = -1
    return params


def on_threads(n: int, fn: Callable[..., object], *args) -> object:
    """fn(*args) with n threads in torch's OpenMP runtime, which the C kernels share (the tests run on one:
    conftest), then the thread count as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def build_kernels_portably(monkeypatch, tmp_path, module) -> None:
    """Make `module` (a module with C kernels, such as llama.kernels.cpu_attention) build them anew into tmp_path
    for the baseline x86-64 (or without -march at all elsewhere), so that they take their plain loops, not AVX2's."""
    from llama.kernels import cpu_gemv

    portable = "-march=x86-64" if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else "-O3"
    monkeypatch.setattr(cpu_gemv, "BASE_FLAGS", [portable if f == "-march=native" else f for f in cpu_gemv.BASE_FLAGS])
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(module, "_state", {})


# ---------------------------------------------------------------- checkpoint folders


def meta_shards(ckpt_dir: Path) -> list[dict[str, torch.Tensor]]:
    from llama.weights import checkpoint

    return [torch.load(p, weights_only=True) for p in checkpoint.find_shards(ckpt_dir)]


def assert_same_meta_checkpoint(a: Path, b: Path) -> None:
    """Folders a and b hold the same params.json and bit-identical shards with the same keys."""
    assert json.loads((a / "params.json").read_text()) == json.loads((b / "params.json").read_text())
    shards_a, shards_b = meta_shards(a), meta_shards(b)
    assert len(shards_a) == len(shards_b)
    for sa, sb in zip(shards_a, shards_b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def hf_model(hf_dir: Path):
    """Hugging Face's fp32 model of hf_dir, with its plain (eager) attention."""
    import transformers  # the test extra; imported here so that a test module without it can still import us

    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the .safetensors files in hf_dir, by name."""
    import safetensors.torch

    state = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(path))
    return state


# ---------------------------------------------------------------- subprocesses


def run(cmd: list[str], input: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """Run cmd in the repository root with one thread per process; with ok, assert that it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, input=input, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous or a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_worker(nproc: int, ckpt_dir: Path, tokenizer_path: Path, prompts: list[str]) -> dict:
    """tests/mp_worker.py under torchrun: rank 0's greedy generations of prompts and logits of prompts[0]."""
    proc = torchrun(nproc, "tests/mp_worker.py", str(ckpt_dir), str(tokenizer_path), json.dumps(prompts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout  # only rank 0 reports
    return json.loads(lines[0][len("RESULT ") :])
