"""The example scripts end to end, as subprocesses: plain python, and torchrun with 1 and 2 processes."""

import subprocess
import sys

import pytest
from helpers import REPO, SEPARATOR, run

pytestmark = pytest.mark.slow


def launcher(nproc: int) -> list[str]:
    if nproc == 0:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@pytest.mark.parametrize("nproc", [0, 1, 2], ids=["python", "torchrun-1", "torchrun-2"])
def test_text_example(make_checkpoint, tokenizer_path, nproc):
    ckpt = make_checkpoint("gqa", n_shards=max(nproc, 1))
    out = run(
        launcher(nproc)
        + ["example_text_completion.py", str(ckpt), str(tokenizer_path), "--max_gen_len=8", "--dtype=float32"]
    ).stdout
    assert out.count(SEPARATOR) == 4  # printed once, by rank 0 only
    assert "The best advice I ever received was\n> " in out
    assert out.count(f"Using {ckpt}") == 1


@pytest.mark.parametrize("nproc", [0, 2], ids=["python", "torchrun-2"])
def test_chat_example(make_checkpoint, tokenizer_path, nproc):
    ckpt = make_checkpoint("gqa", n_shards=max(nproc, 1))
    out = run(
        launcher(nproc)
        + ["example_chat_completion.py", str(ckpt), str(tokenizer_path), "--max_gen_len=8",
           "--max_batch_size=4"]
    ).stdout  # fmt: skip
    assert out.count(SEPARATOR) == 6  # six dialogs, in two batches of at most 4
    assert "> Assistant: " in out
    assert "User: Why is the sky blue?" in out


@pytest.fixture(scope="module")
def int4_checkpoint(make_checkpoint, tmp_path_factory):
    from llama import quantize as quant

    return quant.quantize_checkpoint(make_checkpoint("gqa"), tmp_path_factory.mktemp("q") / "int4", "int4")


@pytest.mark.parametrize("flag", [None, "--quantize=int4"], ids=["quantized-folder", "same-mode-flag"])
def test_text_example_runs_a_quantized_checkpoint(int4_checkpoint, tokenizer_path, flag):
    cmd = [sys.executable, "example_text_completion.py", str(int4_checkpoint), str(tokenizer_path),
           "--max_gen_len=8", "--temperature=0"] + ([flag] if flag else [])  # fmt: skip
    out = run(cmd).stdout
    assert out.count(SEPARATOR) == 4 and f"Using {int4_checkpoint}" in out
    assert all(generations(out))  # every prompt got a continuation


def test_text_example_quantizes_a_float_checkpoint_while_loading(make_checkpoint, tokenizer_path):
    cmd = [sys.executable, "example_text_completion.py", str(make_checkpoint("gqa")), str(tokenizer_path),
           "--max_gen_len=8", "--temperature=0"]  # fmt: skip
    out = run(cmd + ["--quantize=int8"]).stdout
    assert out.count(SEPARATOR) == 4 and all(generations(out))
    bad = run(cmd + ["--quantize=int3"], ok=False)  # the flag reaches Llama.build
    assert bad.returncode != 0 and "unknown quantization mode 'int3'" in bad.stderr


def test_example_refuses_another_mode_for_a_quantized_checkpoint(int4_checkpoint, tokenizer_path):
    proc = run([sys.executable, "example_text_completion.py", str(int4_checkpoint), str(tokenizer_path),
                "--quantize=int8"], ok=False)  # fmt: skip
    assert proc.returncode != 0
    assert f"'{int4_checkpoint}' is already quantized as int4 (group 32)" in proc.stderr
    assert "no --quantize in the example scripts" in proc.stderr


def test_interactive_chat_on_a_quantized_checkpoint(int4_checkpoint, tokenizer_path):
    cmd = [sys.executable, "example_chat_completion.py", str(int4_checkpoint), str(tokenizer_path), "--interactive",
           "--temperature=0", "--max_gen_len=8", "--max_seq_len=96"]  # fmt: skip
    out = run(cmd, input="Hello there, llama.\n/exit\n").stdout
    assert "You: Assistant: " in out and f"Using {int4_checkpoint}" in out


def test_example_rejects_half_a_model():
    proc = subprocess.run(
        [sys.executable, "example_text_completion.py", "--ckpt_dir=/nonexistent"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "give both ckpt_dir and tokenizer_path" in proc.stderr


def generations(out: str) -> list[str]:
    """The text after "> " in each printed block."""
    return [block.split("\n> ", 1)[1].strip() for block in out.split(SEPARATOR)[:-1]]


def test_text_example_without_arguments_uses_the_demo_model():
    """No arguments: the built-in demo model; greedy output is the same under python and torchrun."""
    plain = run([sys.executable, "example_text_completion.py", "--temperature=0"]).stdout
    launched = run(launcher(1) + ["example_text_completion.py", "--temperature=0"]).stdout
    assert "Using the built-in demo model" in plain
    assert len(generations(plain)) == 4 and all(len(g) > 5 for g in generations(plain))
    assert sum(w.isalpha() for w in " ".join(generations(plain)).split()) >= 20
    assert plain.split("Using", 1)[1] == launched.split("Using", 1)[1]


def test_chat_example_without_arguments_answers_in_english():
    out = run([sys.executable, "example_chat_completion.py", "--max_gen_len=24"]).stdout
    answers = [line for line in out.splitlines() if line.startswith("> Assistant: ")]
    assert len(answers) == 6
    words = " ".join(answers).replace("> Assistant: ", " ").split()
    assert sum(w.isalpha() for w in words) >= len(answers) * 2
