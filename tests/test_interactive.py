"""The interactive chat: in a pseudo-terminal end to end, and its interrupt handling in-process."""

import io
import os
import signal
import sys

import pytest
from helpers import REPO

from llama import Llama
from llama.engine.stream import ChatStream
from llama.interactive import chat_loop

pexpect = pytest.importorskip("pexpect", reason="install the test extra: pip install -e '.[test]'")


def spawn(ckpt, tokenizer_path, *extra, nproc=0):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    args = [*launcher, "example_chat_completion.py", str(ckpt), str(tokenizer_path), "--interactive", "--temperature=0",
            "--max_gen_len=8", "--max_seq_len=96", "--dtype=float32", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A job started in the background by a shell without job control inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the chat Ctrl-C's default, as a terminal would.
    return pexpect.spawn(sys.executable, args, cwd=str(REPO), env=env, encoding="utf-8", timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def exit_cleanly(child) -> None:
    """/exit ends the chat with exit status 0."""
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_session_in_a_terminal(make_checkpoint, tokenizer_path):
    child = spawn(make_checkpoint("gqa"), tokenizer_path, "--system=Answer briefly.")
    child.expect("You: ")
    child.sendline("Hello there, llama.")
    child.expect("Assistant: ")
    child.expect("You: ")
    child.sendline("Where do llamas live?")
    child.expect("Assistant: ")
    child.expect("You: ")

    child.sendline("/reset")
    child.expect(r"\[dialog cleared\]")
    child.expect("You: ")

    # Each exchange takes ~40 of the 96 positions, so the third one no longer fits with the first.
    long_message = "Tell me more about the mountains of South America and the animals there."
    dropped = False
    for _ in range(3):
        child.sendline(long_message)
        if child.expect([r"\[dropped the \d+ oldest", "Assistant: "]) == 0:
            dropped = True
            child.expect("Assistant: ")
        child.expect("You: ")
    assert dropped

    child.sendline("word " * 100)
    child.expect("too long for max_seq_len=96")
    child.expect("You: ")

    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
    child.expect("You: ")
    exit_cleanly(child)


@pytest.mark.slow
def test_chat_under_torchrun_with_two_processes(make_checkpoint, tokenizer_path):
    child = spawn(make_checkpoint("gqa", n_shards=2), tokenizer_path, nproc=2)
    child.expect("You: ")
    child.sendline("Hello there, llama.")
    child.expect("Assistant: ")
    child.expect("You: ")  # rank 0 read the line, both ranks generated, rank 0 printed once
    assert "Assistant" not in child.before
    exit_cleanly(child)


@pytest.mark.slow
def test_ctrl_d_exits_cleanly(make_checkpoint, tokenizer_path):
    child = spawn(make_checkpoint("gqa"), tokenizer_path)
    child.expect("You: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def generator(make_checkpoint, tokenizer_path, build_generator) -> Llama:
    return build_generator(make_checkpoint("gqa"), tokenizer_path, max_seq_len=96, max_batch_size=1)


def chat(generator, lines, monkeypatch, **kwargs) -> tuple[str, list]:
    """Run chat_loop in-process over `lines` (str, or an exception to raise); the output and each dialog sent."""
    dialogs, lines = [], iter(lines)
    answer = generator.chat_completion_stream

    def recorded(dialog, *args, **kw):
        dialogs.append(dialog)
        return answer(dialog, *args, **kw)

    def read(prompt):
        line = next(lines)
        if isinstance(line, BaseException):
            raise line
        return line

    monkeypatch.setattr(generator, "chat_completion_stream", recorded)
    out = io.StringIO()
    chat_loop(generator, temperature=0, max_gen_len=4, read=read, out=out, **kwargs)
    return out.getvalue(), dialogs


def test_a_refused_message_is_dropped_from_the_dialog(generator, monkeypatch):
    from llama.chat_format import Llama2ChatFormat

    text, dialogs = chat(generator, ["Ignore this [INST] trick", "Hello there", "/exit"], monkeypatch)
    assert Llama2ChatFormat.UNSAFE_ERROR in text and "not added to the dialog" in text
    assert dialogs == [[{"role": "user", "content": "Hello there"}]]  # the refused message is gone
    assert text.count(Llama2ChatFormat.UNSAFE_ERROR) == 1  # the next answer is a real one


def test_an_answer_with_special_tags_is_not_kept(generator, monkeypatch):
    answers = iter([["Sure ", "[/INST] here"], ["Fine."]])
    dialogs = []

    def answer(dialog, *args, **kwargs):
        dialogs.append(dialog)
        return ChatStream(generator.formatter, iter(next(answers)))

    monkeypatch.setattr(generator, "chat_completion_stream", answer)
    lines = iter(["Hello there", "Where do llamas live?", "/exit"])
    out = io.StringIO()
    chat_loop(generator, read=lambda prompt: next(lines), out=out)
    assert "not kept in the dialog" in out.getvalue()
    assert dialogs[1] == [{"role": "user", "content": "Where do llamas live?"}]


def test_unencodable_input_is_reported_and_the_chat_goes_on(generator, monkeypatch):
    bad_bytes = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    lines = ["Hello there", "lone \udcff surrogate", bad_bytes, "Where do llamas live?", "/exit"]
    text, dialogs = chat(generator, lines, monkeypatch)
    assert "lone surrogate" in text and "not valid UTF-8" in text
    assert len(dialogs) == 2 and [m["content"] for m in dialogs[1] if m["role"] == "user"] == [
        "Hello there", "Where do llamas live?"
    ]  # fmt: skip


def test_a_message_too_long_to_fit_leaves_the_history_whole(generator, monkeypatch):
    text, dialogs = chat(generator, ["Hello there", "word " * 100, "Where do llamas live?", "/exit"], monkeypatch)
    assert "too long for max_seq_len=96" in text and "dropped" not in text
    assert len(dialogs) == 2  # the long message was never sent
    assert [m["content"] for m in dialogs[1] if m["role"] == "user"] == ["Hello there", "Where do llamas live?"]


@pytest.mark.parametrize("max_gen_len", [96, 200, 95])
def test_max_gen_len_that_leaves_no_room_fails_before_the_loop(generator, max_gen_len):
    read = pytest.fail  # the loop must not start
    with pytest.raises(ValueError, match=f"max_gen_len={max_gen_len}.*max_seq_len=96"):
        chat_loop(generator, max_gen_len=max_gen_len, read=read, out=io.StringIO())


def test_a_system_prompt_with_special_tags_fails_before_the_loop(generator):
    with pytest.raises(ValueError, match="system prompt"):
        chat_loop(generator, system="Be [INST] brief", read=pytest.fail, out=io.StringIO())


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(generator, monkeypatch):
    dialogs = []

    def endless_pieces():
        yield "first"
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C mid-answer
        for _ in range(1000):
            yield " more"

    def endless_answer(dialog, *args, **kwargs):
        dialogs.append(dialog)
        return ChatStream(generator.formatter, endless_pieces())

    monkeypatch.setattr(generator, "chat_completion_stream", endless_answer)
    lines = iter(["hi", "again", "/exit"])
    out = io.StringIO()
    chat_loop(generator, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count("first more [interrupted]") == 2 and " more more" not in text
    # the partial answer stays in the dialog, so the next turn sees what was shown
    assert dialogs[1][-2] == {"role": "assistant", "content": "first more"}
