"""Chat formats: how a dialog becomes prompt token ids, and how a generated answer becomes a message.

``Llama`` holds one as ``generator.formatter`` (Meta's name), chosen with the tokenizer. A chat format has:

- ``encode_dialog_prompt(dialog) -> list[int]``: the prompt that the model continues with the answer;
- ``refusal(dialog) -> str | None``: text returned instead of generating (Llama 2's special-tag guard);
- ``stop_reason(stop_id) -> str``: why an answer ended, from the stop id that ended it (None: no stop id did):
  "end_of_turn", "end_of_message" or "out_of_tokens", as Meta's ``StopReason``;
- ``decode_answer(text, stop_reason) -> Message``: the assistant message for a generated text.

``Llama2ChatFormat``: ``<s>[INST] <<SYS>>system<</SYS>> user [/INST] answer </s>``, as Meta's reference.
``Llama3ChatFormat``: ``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>``
per message, with tool calls, as Meta's ``llama_models.llama3.chat_format.ChatFormat``.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any, Dict, List, Literal, Optional, Protocol, Tuple, TypedDict

from llama.tokenizer import TokenizerLike, check_text

# "ipython" is Llama 3's role for a tool's output; "tool" is Meta's alias for it (llama_models' Role.tool).
Role = Literal["system", "user", "assistant", "ipython", "tool"]


class ToolCall(TypedDict):
    """A tool call in an assistant message. tool_name is a built-in tool's name ("brave_search",
    "wolfram_alpha", "photogen", "code_interpreter") or a custom function's."""

    call_id: str
    tool_name: str
    arguments: Dict[str, Any]


class _MessageText(TypedDict):
    role: Role
    content: str


class Message(_MessageText, total=False):
    """A chat message: role and content, and for a Llama 3 assistant message optionally tool_calls and
    stop_reason ("end_of_turn", "end_of_message" or "out_of_tokens")."""

    tool_calls: List[ToolCall]
    stop_reason: str


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


# Llama 3's built-in tools. All but code_interpreter are called as `name.call(query="...")`; code_interpreter's
# call is the code itself, after <|python_tag|>.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")

# What Meta's ToolUtils looks for in an answer (llama_models.llama3.tool_utils):
_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
# `<function=name>{...}</function>`. The arguments end at the first "}", as in Meta's pattern, so nested JSON
# objects do not parse there (kept for equal answers).
_FUNCTION_TAG_CALL = re.compile(r"<function=(?P<name>[^}]+)>(?P<args>{.*?})")


def _json_object(text: str) -> Optional[dict]:
    """text parsed as JSON if it is a JSON object, else None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _python_list_call(text: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(name, keyword arguments) of the first call when text is a Python list of calls with literal keyword
    arguments only, e.g. ``[get_weather(city="Paris", days=3)]``; else None."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    calls = tree.body[0].value
    if not isinstance(calls, ast.List) or not calls.elts:
        return None
    for call in calls.elts:
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
            return None
    # Meta takes only the first call of the list.
    first = calls.elts[0]
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in first.keywords}
    except ValueError:  # a non-literal argument; Meta raises here, we read the answer as text
        return None
    return first.func.id, arguments


def _custom_tool_call(text: str) -> Optional[Tuple[str, Any]]:
    """(function name, arguments) of a custom tool call in an answer, in the forms Meta's ToolUtils reads:
    ``<function=name>{json}</function>`` anywhere in the text, or the whole text being
    ``{"type": "function", "name": ..., "parameters": ...}`` or a Python list of calls."""
    match = _FUNCTION_TAG_CALL.search(text)
    if match:
        try:
            # Meta swaps single quotes for double ones first, so {'a': 1} parses too.
            return match["name"], json.loads(match["args"].replace("'", '"'))
        except json.JSONDecodeError:
            return None
    obj = _json_object(text)
    if obj is not None:
        if obj.get("type") == "function" or "name" in obj:
            if not isinstance(obj.get("name"), str) or "parameters" not in obj:
                return None  # Meta raises here (KeyError, or pydantic's on a non-str name); we read it as text
            return obj["name"], obj["parameters"]
        return None
    return _python_list_call(text)


class Llama3ChatFormat:
    """The Llama 3.x chat format of Meta's ``llama_models`` (0.3): dialog to prompt ids, answer to message.

    A message is ``<|start_header_id|>role<|end_header_id|>\\n\\n`` + content + ``<|eot_id|>``. Content is encoded
    as given: ``llama_models`` does not strip it (Meta's older ``llama3`` repository did); we follow
    ``llama_models``. An assistant message may carry ``tool_calls``, written after its content as Meta writes
    them with its default (JSON) tool prompt format, and ``stop_reason``: "end_of_message" ends it with
    ``<|eom_id|>`` (the model called a tool and waits for its answer). Text that spells a special token is
    encoded as plain text, so no dialog needs to be refused.
    """

    ROLES = ("system", "user", "assistant", "ipython", "tool")
    ROLE_ERROR = "Llama 3 messages have the roles 'system', 'user', 'assistant' and 'ipython' (alias 'tool')"

    def __init__(self, tokenizer: TokenizerLike):
        self.tokenizer = tokenizer
        specials = getattr(tokenizer, "special_tokens", None)
        if not isinstance(specials, dict) or "<|start_header_id|>" not in specials:
            raise TypeError(
                f"Llama3ChatFormat needs a Llama 3 tokenizer (llama.tokenizer.Llama3Tokenizer), "
                f"got a {type(tokenizer).__name__}"
            )
        self._special = specials

    # -- prompt --

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """Token ids of a dialog, ending with an assistant header for the model to continue.

        Any order of roles is accepted, as Meta's format does; the last message need not be the user's.
        """
        check_messages(dialog, self.ROLES, self.ROLE_ERROR)
        tokens = [self._special["<|begin_of_text|>"]]
        for message in dialog:
            tokens += self._encode_message(message)
        tokens += self._encode_header("assistant")
        return tokens

    def _encode_header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        encode = self.tokenizer.encode
        return (
            [self._special["<|start_header_id|>"]]
            + encode(role, bos=False, eos=False)
            + [self._special["<|end_header_id|>"]]
            + encode("\n\n", bos=False, eos=False)
        )

    def _encode_message(self, message: Message) -> list[int]:
        role = message["role"]
        tool_calls = message.get("tool_calls") or []
        stop_reason = message.get("stop_reason")
        if role != "assistant" and (tool_calls or stop_reason is not None):
            raise ValueError(f"only assistant messages carry tool_calls or stop_reason, got a {role!r} message")
        if stop_reason is not None and stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {stop_reason!r}; expected one of {STOP_REASONS}")
        encode = self.tokenizer.encode
        tokens = self._encode_header(role)
        # Code to run follows <|python_tag|>; Meta looks only at the first call to decide.
        if tool_calls and _check_tool_call(tool_calls[0])["tool_name"] == "code_interpreter":
            tokens.append(self._special["<|python_tag|>"])
        tokens += encode(message["content"], bos=False, eos=False)
        # Each piece is encoded on its own, as Meta does: ids can differ from those of the joined text.
        for call in tool_calls:
            tokens += encode(_tool_call_text(_check_tool_call(call)), bos=False, eos=False)
        end = "<|eom_id|>" if stop_reason == "end_of_message" else "<|eot_id|>"
        tokens.append(self._special[end])
        return tokens

    # -- answer --

    def refusal(self, dialog: Dialog) -> Optional[str]:
        """None: Llama 3's tokenizer encodes special-token text as plain text, so Llama 2's tag guard has no use."""
        return None

    def stop_reason(self, stop_id: Optional[int]) -> str:
        """As Meta's chat completion: <|eot_id|> ends a turn, <|eom_id|> a message; anything else, including
        <|end_of_text|> and no stop id at all, counts as running out of tokens."""
        if stop_id == self._special["<|eot_id|>"]:
            return "end_of_turn"
        if stop_id == self._special["<|eom_id|>"]:
            return "end_of_message"
        return "out_of_tokens"

    def decode_answer(self, text: str, stop_reason: str) -> Message:
        """The assistant message for a generated text, as Meta's ``decode_assistant_message_from_content``.

        Leftover header, ``<|python_tag|>`` and ``<|eot_id|>`` / ``<|eom_id|>`` text is removed (a trailing one
        sets stop_reason). A tool call found in the answer goes to ``tool_calls`` (at most one, as Meta's) and
        empties ``content``. Returns ``{"role": "assistant", "content", "stop_reason", "tool_calls"}``.
        """
        content = text.strip(" ")  # spaces only, as Meta's
        header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if content.startswith(header):
            content = content[len(header) :]
        ipython = content.startswith("<|python_tag|>")
        if ipython:
            content = content[len("<|python_tag|>") :]
        if content.endswith("<|eot_id|>"):
            content, stop_reason = content[: -len("<|eot_id|>")], "end_of_turn"
        elif content.endswith("<|eom_id|>"):
            content, stop_reason = content[: -len("<|eom_id|>")], "end_of_message"

        name: Optional[str] = None
        arguments: Any = {}
        custom = _custom_tool_call(content)
        if custom is not None:
            name, arguments = custom
            # A built-in tool called in the custom form: Meta keeps its first argument as the query.
            if name in BUILTIN_TOOLS and isinstance(arguments, dict) and arguments:
                arguments = {"query": next(iter(arguments.values()))}
        else:
            builtin = _BUILTIN_CALL.search(content)
            if builtin is not None:
                name, arguments = builtin["name"], {"query": builtin["query"]}
            elif ipython:
                name, arguments = "code_interpreter", {"code": content}

        tool_calls: List[ToolCall] = []
        if name is not None and arguments is not None:
            tool_calls.append({"call_id": str(uuid.uuid4()), "tool_name": name, "arguments": arguments})
            content = ""
        return {"role": "assistant", "content": content, "stop_reason": stop_reason, "tool_calls": tool_calls}


def _check_tool_call(call: object) -> ToolCall:
    """call itself if it is a tool call dict {'tool_name': str, 'arguments': dict, ...}, else a TypeError."""
    if not isinstance(call, dict) or not isinstance(call.get("tool_name"), str):
        raise TypeError(f"each tool call must be a dict with a str 'tool_name', got {call!r}")
    if not isinstance(call.get("arguments"), dict):
        raise TypeError(f"tool call {call['tool_name']!r} needs a dict of 'arguments', got {call.get('arguments')!r}")
    return call


def _tool_call_text(call: ToolCall) -> str:
    """How an assistant message writes a tool call, as Meta's default (JSON) tool prompt format."""
    name, arguments = call["tool_name"], call["arguments"]
    key = "code" if name == "code_interpreter" else "query"
    if name in BUILTIN_TOOLS and key not in arguments:
        raise ValueError(f"a {name} call needs the argument {key!r}, got {sorted(arguments)}")
    if name == "code_interpreter":
        return arguments["code"]
    if name in BUILTIN_TOOLS:
        return f'{name}.call(query="{arguments["query"]}")'
    return json.dumps({"type": "function", "name": name, "parameters": arguments})
