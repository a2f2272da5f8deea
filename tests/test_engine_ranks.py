"""The continuous-batching engine under torchrun (issue 20, item 6): rank 0 schedules, the other ranks follow its
plans, on one node and on two torchrun "nodes" on loopback; each request equals itself run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import MP_PROMPTS, REPO, free_port

pytestmark = pytest.mark.slow


def check(stdout: str) -> None:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout  # only rank 0 reports
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["cancelled"] == "cancelled"
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(result["engine"], result["alone"]):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= 1e-5


def worker_args(make_checkpoint, tokenizer_path) -> list[str]:
    prompts = MP_PROMPTS + ["Once upon a time"]  # more requests than the 2 slots
    return ["tests/engine_worker.py", str(make_checkpoint("gqa", n_shards=2)), str(tokenizer_path), json.dumps(prompts)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_engine_on_two_ranks_of_one_node(make_checkpoint, tokenizer_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(cmd + worker_args(make_checkpoint, tokenizer_path), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(proc.stdout)


def test_engine_on_two_nodes(make_checkpoint, tokenizer_path):
    """Two torchrun launchers of one process each, meeting through c10d on loopback: how a model too large for
    one machine is served across several."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint={endpoint}", "--rdzv_id=engine-test"]  # fmt: skip
    launchers = [subprocess.Popen(cmd + worker_args(make_checkpoint, tokenizer_path), cwd=REPO, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=300) for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(err[-2000:] for _, err in outputs)
    check("\n".join(out for out, _ in outputs))
