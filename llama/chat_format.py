"""Chat formats: how a dialog becomes prompt token ids, and how a generated answer becomes a message.

``Llama`` holds one as ``generator.formatter`` (Meta's name), chosen with the tokenizer. A chat format has:

- ``encode_dialog_prompt(dialog) -> list[int]``: the prompt that the model continues with the answer;
- ``refusal(dialog) -> str | None``: text returned instead of generating (Llama 2's special-tag guard);
- ``stop_reason(stop_id) -> str``: why an answer ended, from the stop id that ended it (None: no stop id did):
  "end_of_turn", "end_of_message" or "out_of_tokens", as Meta's ``StopReason``;
- ``decode_answer(text, stop_reason) -> Message``: the assistant message for a generated text.

``Llama2ChatFormat``: ``<s>[INST] <<SYS>>system<</SYS>> user [/INST] answer </s>``, as Meta's reference.
"""

from __future__ import annotations

from typing import List, Literal, Optional, Protocol, TypedDict

from llama.tokenizer import TokenizerLike, check_text

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]


class ChatFormat(Protocol):
    tokenizer: TokenizerLike

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]: ...

    def refusal(self, dialog: Dialog) -> Optional[str]: ...

    def stop_reason(self, stop_id: Optional[int]) -> str: ...

    def decode_answer(self, text: str, stop_reason: str) -> Message: ...


def check_messages(dialog: Dialog, roles: tuple[str, ...], role_error: str) -> None:
    """TypeError/ValueError unless dialog is a non-empty list of {'role', 'content': str} with known roles."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("each dialog must be a non-empty list of messages")
    for msg in dialog:
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise TypeError(f"each message must be a dict with 'role' and 'content', got {msg!r}")
        check_text(msg["content"], "message content must be")
        if msg["role"] not in roles:
            raise ValueError(f"unknown role {msg['role']!r}: {role_error}")


class Llama2ChatFormat:
    """The Llama 2 chat format of Meta's reference ``chat_completion``."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
    UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
    ROLE_ERROR = (
        "model only supports 'system', 'user' and 'assistant' roles, "
        "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
    )

    def __init__(self, tokenizer: TokenizerLike):
        self.tokenizer = tokenizer

    def refusal(self, dialog: Dialog) -> Optional[str]:
        """The reference's answer to a dialog whose text holds [INST], [/INST], <<SYS>> or <</SYS>>."""
        if any(tag in msg["content"] for tag in self.SPECIAL_TAGS for msg in dialog):
            return self.UNSAFE_ERROR
        return None

    def stop_reason(self, stop_id: Optional[int]) -> str:
        return "end_of_turn" if stop_id == self.tokenizer.eos_id else "out_of_tokens"

    def decode_answer(self, text: str, stop_reason: str) -> Message:
        return {"role": "assistant", "content": text}

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """Token ids of a dialog in the Llama 2 chat format.

        A leading system message is folded into the first user message between <<SYS>> tags. Each earlier
        (user, assistant) pair becomes ``<s>[INST] user [/INST] answer </s>``; the last user message becomes
        ``<s>[INST] user [/INST]``, which the model continues with its answer.
        """
        check_messages(dialog, ("system", "user", "assistant"), self.ROLE_ERROR)
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError(f"Last message must be from user, got {dialog[-1]['role']}")
            merged = self.B_SYS + dialog[0]["content"] + self.E_SYS + dialog[1]["content"]
            dialog = [{"role": dialog[1]["role"], "content": merged}] + list(dialog[2:])
        if not (
            all(msg["role"] == "user" for msg in dialog[::2])
            and all(msg["role"] == "assistant" for msg in dialog[1::2])
        ):
            raise ValueError(self.ROLE_ERROR)
        if dialog[-1]["role"] != "user":
            raise ValueError(f"Last message must be from user, got {dialog[-1]['role']}")
        encode = self.tokenizer.encode
        tokens: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{self.B_INST} {prompt['content'].strip()} {self.E_INST} {answer['content'].strip()} "
            tokens += encode(text, bos=True, eos=True)
        tokens += encode(f"{self.B_INST} {dialog[-1]['content'].strip()} {self.E_INST}", bos=True, eos=False)
        return tokens
