"""Collective timeouts: the argument is checked, and a rank that stops answering ends the job with a clear error."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO

import llama.distributed as distributed
from llama import Llama
from llama.distributed import CollectiveError, collective, explain_collective_failure, setup_model_parallel


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "300", True])
def test_timeout_must_be_a_positive_finite_number(bad):
    message = f"timeout_s must be a positive finite number of seconds, got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        setup_model_parallel(1, torch.device("cpu"), timeout_s=bad)


def test_build_checks_the_timeout(make_checkpoint, tokenizer_path):
    with pytest.raises(ValueError, match="timeout_s must be a positive finite number"):
        Llama.build(str(make_checkpoint("gqa")), str(tokenizer_path), 64, 1, device="cpu", timeout_s=-5)


def test_default_and_existing_group():
    assert distributed.check_timeout_s(None) == distributed.DEFAULT_TIMEOUT_S == 300.0
    assert distributed.check_timeout_s(2) == 2.0
    assert setup_model_parallel(1, torch.device("cpu"), timeout_s=7) == 1  # the session's group is reused as is


def test_patient_broadcast_with_one_process_is_a_no_op():
    assert distributed.start_patient_broadcasts() is None  # nobody to wait for, so no group
    assert distributed.broadcast_from_main("a line", patient=True) == "a line"


def test_gloo_timeout_names_the_collective_the_seconds_and_the_waited_on_ranks(monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 3)
    gloo = RuntimeError("[tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete")
    text = explain_collective_failure("broadcast_from_main", gloo)
    assert text.startswith("rank 0: broadcast_from_main timed out after 5 s: torch's message does not say")
    assert "waiting on rank(s) 1, 2" in text and "timeout_s" in text and "Timed out waiting 5000ms" in text


def test_ranks_named_by_torch_are_named(monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    error = RuntimeError("[Rank 0]: Ranks 3 failed to pass monitoredBarrier in 5000 ms; Timeout(ms)=5000")
    assert "rank(s) 3 did not answer (as torch's message says)" in explain_collective_failure("a barrier", error)


def test_collective_converts_only_collective_failures():
    with pytest.raises(CollectiveError, match="rank 0: x failed: .* exited or was killed") as info:
        with collective("x"):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="^shapes do not match$"):  # not a collective: unchanged
        with collective("x"):
            raise RuntimeError("shapes do not match")


def is_gone(pid: int) -> bool:
    """True once the process has exited (a zombie not yet reaped by its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def run_with_a_stopped_rank(ckpt_dir, tokenizer_path, where: str, tmp_path, limit_s: float = 60):
    """torchrun the worker on 2 processes, rank 1 stopping itself. Returns torchrun's exit status, its stderr, and
    the seconds from rank 1's stop until rank 0 ended (None if rank 0 was still running after limit_s)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/stopped_rank_worker.py", str(ckpt_dir), str(tokenizer_path), str(tmp_path), where]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr_path = tmp_path / "stderr.txt"
    start = time.monotonic()
    with open(stderr_path, "w") as stderr:
        torchrun = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    rank_1 = stopped_at = took = None
    try:
        while time.monotonic() - start < limit_s and torchrun.poll() is None:
            if rank_1 is None and (tmp_path / "1").exists():
                rank_1, stopped_at = int((tmp_path / "1").read_text()), time.monotonic()
            if rank_1 is not None and (tmp_path / "0").exists() and is_gone(int((tmp_path / "0").read_text())):
                took = time.monotonic() - stopped_at
                break
            time.sleep(0.2)
        # torchrun now SIGTERMs the stopped rank, which cannot handle it, and SIGKILLs it only 30 s later (its
        # --shutdown_timeout does not apply to a failed worker): a person or a scheduler would kill it; so do we.
        if rank_1 is not None:
            os.kill(rank_1, signal.SIGKILL)
        status = torchrun.wait(timeout=30)
    finally:  # whatever happened, nothing we started outlives the test
        for pid in [rank_1, torchrun.pid]:
            if pid is not None and not is_gone(pid):
                os.kill(pid, signal.SIGKILL)
        torchrun.wait(timeout=30)
    return status, stderr_path.read_text(), took


@pytest.mark.slow
@pytest.mark.parametrize("where", ["broadcast", "generate", "engine"])
def test_a_stopped_rank_ends_the_job_with_a_clear_error(make_checkpoint, tokenizer_path, tmp_path, where):
    status, stderr, took = run_with_a_stopped_rank(make_checkpoint("gqa", n_shards=2), tokenizer_path, where, tmp_path)
    assert took is not None and took < 30, f"rank 0 did not end within 30 s of rank 1's stop: {stderr[-3000:]}"
    assert status != 0, stderr[-3000:]
    what = "a generation step" if where == "generate" else "broadcast_from_main"
    message = rf"CollectiveError: rank 0: {what}.* timed out after 5 s: .*waiting on rank\(s\) 1\..*--timeout_s"
    assert re.search(message, stderr), stderr[-3000:]
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 1 ", stderr), stderr[-3000:]  # torchrun: rank 0 failed first


@pytest.mark.slow
def test_the_other_ranks_wait_for_a_person_longer_than_the_timeout(make_checkpoint, tokenizer_path, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/stopped_rank_worker.py", str(make_checkpoint("gqa", n_shards=2)), str(tokenizer_path),
           str(tmp_path), "patient"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK 0 GOT 'the next line'" in proc.stdout and "RANK 1 GOT 'the next line'" in proc.stdout
