"""A terminal chat on top of ``Llama.chat_completion_stream``, used by ``example_chat_completion.py --interactive``.

Rank 0 reads the terminal and broadcasts each line, so every model-parallel rank runs the same generation.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Callable, Iterator, List, Optional, TextIO

from llama.chat_format import Dialog, Message
from llama.distributed import broadcast_from_main, is_main_process
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
) -> tuple[List[Message], Dialog, int, int]:
    """Drop the oldest (user, assistant) pairs until the prompt leaves answer_room tokens in max_seq_len.

    Returns the turns kept, the dialog to send (system message first), its length in tokens, and how many
    pairs were dropped. The last user message is never dropped here.
    """
    max_seq_len = generator.model.params.max_seq_len
    dropped = 0
    while True:
        dialog: Dialog = ([{"role": "system", "content": system}] if system else []) + turns
        prompt_len = len(generator.formatter.encode_dialog_prompt(dialog))
        if prompt_len + answer_room <= max_seq_len or len(turns) <= 1:
            return turns, dialog, prompt_len, dropped
        turns = turns[2:]
        dropped += 1


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
    answer_room = max_gen_len if max_gen_len is not None else max(1, max_seq_len // 4)

    def say(text: str, end: str = "\n") -> None:
        if main:
            out.write(text + end)
            out.flush()

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
        line = broadcast_from_main(line).strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            turns = []
            say("[dialog cleared]")
            continue

        message: Message = {"role": "user", "content": line}
        turns, dialog, prompt_len, dropped = fit_dialog(generator, system, turns + [message], answer_room)
        if dropped:
            say(f"[dropped the {dropped} oldest exchange(s) to fit max_seq_len={max_seq_len}]")
        if prompt_len + answer_room > max_seq_len:
            say(f"[that message is too long for max_seq_len={max_seq_len}; please shorten it]")
            turns = turns[:-1]
            continue

        say("Assistant: ", end="")
        answer = []
        room = max_seq_len - prompt_len if max_gen_len is None else max_gen_len
        with _catch_interrupt() as interrupted:
            for piece in generator.chat_completion_stream(dialog, temperature, top_p, max_gen_len=room):
                answer.append(piece)
                say(piece, end="")
                if broadcast_from_main(interrupted()):
                    say(" [interrupted]", end="")
                    break
        say("")
        turns.append({"role": "assistant", "content": "".join(answer)})
