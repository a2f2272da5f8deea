"""Model parallelism under torchrun on CPU (gloo): sharded checkpoints give the same results as one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch.testing import assert_close

from llama import Llama

PROMPTS = ["The quick brown fox", "Llamas live in", "Question: what is the capital of France?"]

pytestmark = pytest.mark.slow


def torchrun(nproc: int, script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_worker(nproc, ckpt_dir, tokenizer_path):
    proc = torchrun(nproc, "tests/mp_worker.py", str(ckpt_dir), str(tokenizer_path), json.dumps(PROMPTS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout  # only rank 0 reports
    return json.loads(lines[0][len("RESULT ") :])


@pytest.fixture(scope="module")
def single_process(make_checkpoint, tokenizer_path):
    g = Llama.build(
        str(make_checkpoint("gqa")), str(tokenizer_path), max_seq_len=64, max_batch_size=4,
        device="cpu", dtype=torch.float32,
    )  # fmt: skip
    tokens = torch.tensor([g.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    return {
        "generations": [r["generation"] for r in g.text_completion(PROMPTS, temperature=0, max_gen_len=12)],
        "logits": g.model.forward(tokens, 0),
    }


@pytest.mark.parametrize("n_shards", [2, 1], ids=["mp2-checkpoint", "mp1-checkpoint"])
def test_two_processes_match_one(make_checkpoint, tokenizer_path, single_process, n_shards):
    result = run_worker(2, make_checkpoint("gqa", n_shards=n_shards), tokenizer_path)
    assert result["generations"] == single_process["generations"]
    assert_close(torch.tensor(result["logits"]), single_process["logits"], rtol=1e-5, atol=1e-5)
