"""A terminal chat on top of ``Llama.chat_completion_stream``, used by ``example_chat_completion.py --interactive``.

Rank 0 reads the terminal and broadcasts each line, so every model-parallel rank runs the same generation.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from typing import Callable, Iterator, List, Optional, TextIO

from llama.chat_format import Dialog, Message
from llama.checks import check_positive_int
from llama.distributed import broadcast_from_main, collective, is_main_process, start_patient_broadcasts
from llama.generation import Llama

HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops an answer."


@contextlib.contextmanager
def _catch_interrupt() -> Iterator[Callable[[], bool]]:
    """While active, Ctrl-C only raises a flag; yields a function that tells whether it was pressed."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def fit_dialog(
    generator: Llama, system: Optional[str], turns: List[Message], answer_room: int
) -> Optional[tuple[List[Message], Dialog, int, int]]:
    """Drop the oldest (user, assistant) pairs until the prompt leaves answer_room tokens in max_seq_len.

    Returns the turns kept, the dialog to send (system message first), its length in tokens, and how many
    pairs were dropped; or None, before dropping anything, when the last message (the user's) does not fit even
    alone. The last user message is never dropped here, and `turns` itself is never changed.
    """
    max_seq_len = generator.model.params.max_seq_len

    def dialog_of(kept: List[Message]) -> tuple[Dialog, int]:
        dialog: Dialog = ([{"role": "system", "content": system}] if system else []) + kept
        return dialog, len(generator.formatter.encode_dialog_prompt(dialog))

    if dialog_of(turns[-1:])[1] + answer_room > max_seq_len:
        return None  # no exchange is worth dropping for it
    dropped = 0
    while True:
        dialog, prompt_len = dialog_of(turns)
        if prompt_len + answer_room <= max_seq_len or len(turns) <= 1:
            return turns, dialog, prompt_len, dropped
        turns = turns[2:]
        dropped += 1


def _check_room(generator: Llama, system: Optional[str], max_gen_len: Optional[int], answer_room: int) -> None:
    """ValueError now, before the loop, if no message could ever be answered: the system prompt is refused, or
    even an empty message plus the answer's room does not fit in max_seq_len."""
    base: Dialog = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ""}]
    refusal = generator.formatter.refusal(base)
    if refusal is not None:
        raise ValueError(f"the system prompt {system!r} is refused by the chat format ({refusal}); change it")
    max_seq_len = generator.model.params.max_seq_len
    floor = len(generator.formatter.encode_dialog_prompt(base))
    if floor + answer_room > max_seq_len:
        room = f"max_gen_len={max_gen_len}" if max_gen_len is not None else f"the default answer room of {answer_room}"
        raise ValueError(
            f"{room} leaves no room for a message in max_seq_len={max_seq_len}: even an empty message takes "
            f"{floor} tokens{' with the system prompt' if system else ''}; use max_gen_len <= "
            f"{max_seq_len - floor - 1}, a shorter system prompt or a larger max_seq_len"
        )


def chat_loop(
    generator: Llama,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """Chat in the terminal until /exit or Ctrl-D, streaming each answer as it is generated."""
    main = is_main_process()
    max_seq_len = generator.model.params.max_seq_len
    if max_gen_len is not None:
        check_positive_int("max_gen_len", max_gen_len)
    answer_room = max_gen_len if max_gen_len is not None else max(1, max_seq_len // 4)
    _check_room(generator, system, max_gen_len, answer_room)

    def say(text: str, end: str = "\n") -> None:
        if main:
            out.write(text + end)
            out.flush()

    start_patient_broadcasts()  # every rank, now: soon rank 0 waits for the person
    say(HELP)
    turns: List[Message] = []
    while True:
        line: Optional[str] = None
        if main:
            try:
                line = read("You: ")
            except EOFError:  # Ctrl-D
                say("")
                line = "/exit"
            except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, ask again
                say("")
                line = ""
            except UnicodeDecodeError as e:  # stdin is strict UTF-8 and the line was not
                say(f"[that line is not valid UTF-8 ({e.reason}) and was not sent; please type it again]")
                line = ""
        line = broadcast_from_main(line, patient=True).strip()  # the other ranks wait for the person too
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            turns = []
            say("[dialog cleared]")
            continue

        message: Message = {"role": "user", "content": line}
        refusal = generator.formatter.refusal([message])
        if refusal is not None:  # kept, it would refuse every later message of the dialog too
            say(f"[{refusal} That message was not added to the dialog.]")
            continue
        try:
            fitted = fit_dialog(generator, system, turns + [message], answer_room)
        except ValueError as e:  # text the tokenizer refuses (a lone surrogate from undecodable input)
            say(f"[that message was not sent: {e}]")
            continue
        if fitted is None:  # checked before dropping anything: the dialog so far stays whole
            say(f"[that message is too long for max_seq_len={max_seq_len}; please shorten it]")
            continue
        turns, dialog, prompt_len, dropped = fitted
        if dropped:
            say(f"[dropped the {dropped} oldest exchange(s) to fit max_seq_len={max_seq_len}]")

        say("Assistant: ", end="")
        answer = []
        room = max_seq_len - prompt_len if max_gen_len is None else max_gen_len
        with _catch_interrupt() as interrupted, collective("a generation step (the model-parallel all-reduce)"):
            stream = generator.chat_completion_stream(dialog, temperature, top_p, max_gen_len=room)
            for piece in stream:
                answer.append(piece)
                say(piece, end="")
                if broadcast_from_main(interrupted()):
                    say(" [interrupted]", end="")
                    break
        say("")
        # The whole answer as chat_completion gives it (a Llama 3 tool call in tool_calls, not as text); an
        # interrupted one keeps what was shown.
        reply: Message = stream.message or {"role": "assistant", "content": "".join(answer)}
        for call in reply.get("tool_calls") or []:
            say(f"[tool call: {call['tool_name']} {json.dumps(call['arguments'])}]")
        if generator.formatter.refusal([reply]) is not None:  # the model wrote a special tag: same poison
            say("[that answer holds a special tag, so this exchange was not kept in the dialog]")
            turns = turns[:-1]
            continue
        turns.append(reply)
