"""Chat formats: how a dialog becomes prompt token ids, and how a generated answer becomes a message.

``Llama`` holds one as ``generator.formatter`` (Meta's name), chosen with the tokenizer. A chat format has:

- ``encode_dialog_prompt(dialog) -> list[int]``: the prompt that the model continues with the answer;
- ``refusal(dialog) -> str | None``: text returned instead of generating (Llama 2's special-tag guard);
- ``stop_reason(stop_id) -> str``: why an answer ended, from the stop id that ended it (None: no stop id did):
  "end_of_turn", "end_of_message" or "out_of_tokens", as Meta's ``StopReason``;
- ``decode_answer(text, stop_reason) -> Message``: the assistant message for a generated text; never raises;
- ``settled_content(text) -> str``: the beginning of the content of every answer that begins with text, which a
  stream may show (``llama.engine.stream.ChatStream``).

``Llama2ChatFormat``: ``<s>[INST] <<SYS>>system<</SYS>> user [/INST] answer </s>``, as Meta's reference.
``Llama3ChatFormat``: ``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>``
per message, with tool calls, as Meta's ``llama_models.llama3.chat_format.ChatFormat``.
"""

from __future__ import annotations

import ast
import json
import re
import reprlib
import uuid
from typing import Any, Dict, List, Literal, Optional, Protocol, Tuple, TypedDict, Union

from llama.tokenizer import TokenizerLike, check_text

# "ipython" is Llama 3's role for a tool's output; "tool" is Meta's alias for it (llama_models' Role.tool).
Role = Literal["system", "user", "assistant", "ipython", "tool"]


class ToolCall(TypedDict):
    """A tool call in an assistant message. tool_name is a built-in tool's name ("brave_search",
    "wolfram_alpha", "photogen", "code_interpreter") or a custom function's."""

    call_id: str
    tool_name: str
    arguments: Union[Dict[str, Any], str]  # a str only for a custom tool, as Meta's ToolCall allows


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

    def settled_content(self, text: str) -> str: ...


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

    def settled_content(self, text: str) -> str:
        """text itself: a Llama 2 answer's content is its text, so every generated piece can be shown."""
        return text

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
_FUNCTION_TAG = "<function="
_CALL_OPENING = '.call(query="'

# What Meta's parsers raise on an answer they cannot read (its decoder lets them escape): SyntaxError, and
# MemoryError on deeply nested code, from ast; ValueError (null bytes, ints of over 4300 digits, and ours below)
# and RecursionError on deep nesting from json; TypeError from an unhashable dict key or set item.
_PARSE_ERRORS = (SyntaxError, ValueError, TypeError, RecursionError, MemoryError)


class _Unreadable(ValueError):
    """A custom tool call that Meta's decoder raises on, or that could not be sent back in a dialog."""


def _meta_primitive(value: Any) -> Any:
    """value as Meta's ``ToolCall`` (pydantic) holds a primitive: str, int, float, bool or None; bytes become str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")  # pydantic's lax str; a UnicodeDecodeError is a ValueError
    if value is None or isinstance(value, (str, int, float)):  # bool is an int
        return value
    raise _Unreadable(f"{type(value).__name__} is no argument value in Meta's ToolCall")


def _meta_argument(value: Any) -> Any:
    """One argument value as Meta's ``ToolCall`` holds it: a primitive, a list of them (a tuple or set becomes a
    list) or a dict of them with str keys. Anything deeper, or of another type, Meta's pydantic model refuses."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_meta_primitive(v) for v in value]
    if isinstance(value, dict):
        return {_meta_key(k): _meta_primitive(v) for k, v in value.items()}
    return _meta_primitive(value)


def _meta_key(key: Any) -> str:
    if isinstance(key, (str, bytes)):
        return _meta_primitive(key)
    raise _Unreadable(f"a {type(key).__name__} key is no argument name in Meta's ToolCall")


def _meta_arguments(arguments: Any) -> Union[str, Dict[str, Any]]:
    """A call's arguments as Meta's ``ToolCall`` holds them: a str, or a dict of argument values."""
    if isinstance(arguments, str):
        return arguments
    if not isinstance(arguments, dict):
        raise _Unreadable(f"{type(arguments).__name__} arguments are not a dict")
    return {_meta_key(k): _meta_argument(v) for k, v in arguments.items()}


def _python_list_calls(text: str) -> Optional[List[Tuple[str, Dict[Any, Any]]]]:
    """Each call's (name, keyword arguments) when text is a Python list of calls with keyword arguments only, e.g.
    ``[get_weather(city="Paris", days=3)]``, else None; a _PARSE_ERRORS error where Meta's parser raises (an
    argument that is not a literal, code nested too deep)."""
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
    # Every call's arguments are evaluated, as Meta does, though only the first call is kept. `**{...}` has no
    # name (kw.arg is None), which Meta's ToolCall refuses later.
    return [(call.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}) for call in calls.elts]


def _find_custom_call(text: str) -> Optional[Tuple[Any, Any]]:
    """(name, arguments) of a custom tool call as Meta's ``ToolUtils.maybe_extract_custom_tool_call`` finds it:
    ``<function=name>{json}</function>`` anywhere in the text, or the whole text being
    ``{"type": "function", "name": ..., "parameters": ...}`` or a Python list of calls. Either may be of any type.
    None where there is none; raises where Meta's raises."""
    match = _FUNCTION_TAG_CALL.search(text)
    if match:
        # Meta swaps single quotes for double ones first, so {'a': 1} parses too. Where that is not JSON, Meta
        # reads on as if there were no custom call, as our caller does on the error.
        return match["name"], json.loads(match["args"].replace("'", '"'))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None  # deeper errors (RecursionError, 4300-digit ints) escape, as from Meta's
    if isinstance(value, dict):
        if value.get("type") != "function" and "name" not in value:
            return None
        if "name" not in value or "parameters" not in value:
            raise _Unreadable("a JSON function call needs a 'name' and 'parameters'")  # Meta: KeyError
        return value["name"], value["parameters"]
    calls = _python_list_calls(text)
    return calls[0] if calls else None


def _custom_tool_call(text: str) -> Optional[Tuple[Any, Any]]:
    """The custom tool call of an answer as Meta's ``decode_assistant_message_from_content`` reads it:
    (name, arguments), or None if there is none.

    Either of name and arguments may be None: then Meta makes no call of it, but no longer looks for a built-in
    call either. A built-in tool called in the custom form keeps its first argument as the query, as Meta's.
    Where Meta's decoder raises (an unreadable call, arguments its ``ToolCall`` type refuses), or decodes a call
    that could not be sent back in a dialog (code_interpreter called in the custom form gets a "query", not
    "code"), this returns None: the answer is read on as if it held no custom call.
    """
    try:
        found = _find_custom_call(text)
        if found is None:
            return None
        name, arguments = found
        if isinstance(name, (list, dict)):
            raise _Unreadable("Meta looks the name up in a dict first, and a list or dict cannot be a key")
        if name in BUILTIN_TOOLS:
            if not isinstance(arguments, dict) or not arguments:
                raise _Unreadable(f"a {name} call needs a non-empty dict of arguments")  # Meta: AttributeError...
            arguments = {"query": next(iter(arguments.values()))}
        if name is None or arguments is None:
            return name, arguments
        if not isinstance(name, str):
            raise _Unreadable(f"a tool name must be a str, got {name!r}")
        call: ToolCall = {"call_id": "", "tool_name": name, "arguments": _meta_arguments(arguments)}
        check_text(_tool_call_text(_check_tool_call(call)), "a decoded tool call must be")
        return name, call["arguments"]
    except _PARSE_ERRORS:
        return None


def _builtin_tool_call(text: str) -> Optional[Tuple[str, Dict[str, str]]]:
    """The first `name.call(query="...")` in text, as Meta's ``maybe_extract_builtin_tool_call``; None if there
    is none, or if it could not be sent back (`code_interpreter.call(...)`: its call is written from "code")."""
    match = _BUILTIN_CALL.search(text)
    if match is None or match["name"] == "code_interpreter":
        return None
    return match["name"], {"query": match["query"]}


def _partial_end(text: str, token: str) -> int:
    """The length of the longest proper beginning of token that text ends with (0 if none)."""
    return next((k for k in range(min(len(token) - 1, len(text)), 0, -1) if text.endswith(token[:k])), 0)


# What a stream runs on each step, over the whole answer so far: plain finds and anchored regexes, all linear.
_PYTHON_SPACE = {  # whitespace, line continuations and comments (an open one to the end), and brackets
    bracket: re.compile(r"(?:[\s\\" + re.escape(bracket) + r"]|#[^\r\n]*)*") for bracket in "()"
}
_NAME_REST = re.compile(r"(?:\w|[^\x00-\x7f])*")  # a Python name's characters, and any non-ASCII one
_WORD_END = re.compile(r"\w+\Z")


def _may_become_whole_call(body: str) -> bool:
    """Whether body, and so any answer that begins with it, may still turn out to be a call that is the whole
    answer: a JSON object, or a Python list of calls (after blank lines, comments and brackets, a name, then "(").
    Errs towards True: a stream holds back such an answer until its end."""
    if body.lstrip()[:1] in ("", "{"):
        return True
    i = _PYTHON_SPACE["("].match(body).end()
    if i == len(body):
        return True
    if body[i] != "[":
        return False
    i = _PYTHON_SPACE["("].match(body, i + 1).end()
    if i == len(body):
        return True
    if not (body[i] == "_" or body[i].isalpha() or not body[i].isascii()):
        return False
    i = _PYTHON_SPACE[")"].match(body, _NAME_REST.match(body, i).end()).end()
    return i == len(body) or body[i] == "("


def _word_start(text: str, end: int) -> int:
    """Where the run of word characters (a regex's \\w) that ends at `end` begins; end itself if there is none."""
    window = 64
    while True:
        begin = max(0, end - window)
        match = _WORD_END.search(text, begin, end)
        if match is None:
            return end
        if match.start() > begin or begin == 0:
            return match.start()
        window *= 8  # the word goes on before the window


def _builtin_call_start(body: str) -> int:
    """Where the first built-in call `name.call(query="...")` in body begins, as Meta's pattern finds it, or the
    one that may be growing at its end: a word, then the beginning of `.call(query="...")`; len(body) if none."""
    size = len(_CALL_OPENING)
    opening = body.find(_CALL_OPENING)
    while opening >= 0:  # the first complete call: a name before the opening, `")` after its query
        name = _word_start(body, opening)
        close = body.find('"', opening + size)
        if name < opening and close >= 0 and body.startswith(")", close + 1):
            return name
        opening = body.find(_CALL_OPENING, opening + 1)
    # One still growing: an opening whose quote is the last quote but for a final one (which may close the
    # query), or that ends the body; or the beginning of an opening, or a bare word, at the end.
    final = len(body) - 1
    last_quote = body.rfind('"', 0, final)
    ends = [o for o in (last_quote - size + 1, final - size + 1) if o >= 0 and body.startswith(_CALL_OPENING, o)]
    ends += [len(body) - k for k in range(size - 1, -1, -1) if body.endswith(_CALL_OPENING[:k])]
    return min((name for name in (_word_start(body, end) for end in ends) if name < len(body)), default=len(body))


def _call_start(body: str) -> int:
    """Where the first tool call written inside body begins, or may begin as more text comes (Meta's parser finds
    `<function=...>{...}` and `name.call(query="...")` anywhere in an answer); len(body) if nowhere."""
    tag = body.find(_FUNCTION_TAG)
    return min(tag if tag >= 0 else len(body) - _partial_end(body, _FUNCTION_TAG), _builtin_call_start(body))


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
    HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"  # an answer may begin with it (then removed)
    PYTHON_TAG = "<|python_tag|>"
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
        for index, message in enumerate(dialog):
            tokens += self._encode_message(message, index)
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

    def _encode_message(self, message: Message, index: int) -> list[int]:
        role = message["role"]
        tool_calls = message.get("tool_calls")
        if tool_calls is None:
            tool_calls = []
        elif not isinstance(tool_calls, (list, tuple)):
            raise TypeError(
                f"message {index} ({role!r}) has tool_calls of type {type(tool_calls).__name__}: tool_calls must be "
                f"a list of tool calls (each {{'call_id', 'tool_name', 'arguments'}}), got {reprlib.repr(tool_calls)}"
            )
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

        Never raises, whatever the text: where Meta's decoder raises (a call it cannot parse, arguments its
        ``ToolCall`` type refuses) or decodes a call that cannot be sent back, the answer is read on as if that
        call were not there, so it ends as plain content (or as code after ``<|python_tag|>``). Whatever this
        returns is accepted as an assistant message of the next dialog.
        """
        content = text.strip(" ")  # spaces only, as Meta's
        if content.startswith(self.HEADER):
            content = content[len(self.HEADER) :]
        ipython = content.startswith(self.PYTHON_TAG)
        if ipython:
            content = content[len(self.PYTHON_TAG) :]
        if content.endswith("<|eot_id|>"):
            content, stop_reason = content[: -len("<|eot_id|>")], "end_of_turn"
        elif content.endswith("<|eom_id|>"):
            content, stop_reason = content[: -len("<|eom_id|>")], "end_of_message"

        name: Any = None
        arguments: Any = {}
        custom = _custom_tool_call(content)
        if custom is not None:
            name, arguments = custom
        else:
            builtin = _builtin_tool_call(content)
            if builtin is not None:
                name, arguments = builtin
            elif ipython:
                name, arguments = "code_interpreter", {"code": content}

        tool_calls: List[ToolCall] = []
        if name is not None and arguments is not None:
            tool_calls.append({"call_id": str(uuid.uuid4()), "tool_name": name, "arguments": arguments})
            content = ""
        return {"role": "assistant", "content": content, "stop_reason": stop_reason, "tool_calls": tool_calls}

    def settled_content(self, text: str) -> str:
        """The beginning of the content that ``decode_answer`` gives every answer that begins with text: what a
        stream may show once it has generated text.

        Held back are leading spaces and a leading header or ``<|python_tag|>``, trailing spaces and a trailing
        ``<|eot_id|>`` / ``<|eom_id|>`` (decode_answer removes them), an answer that may still be a call as a whole
        (after ``<|python_tag|>``, a JSON object, a Python list of calls), and text from where a tool call written
        inside the answer begins or may begin. Beyond it: text before a call written inside the answer is content
        until the call comes, when decode_answer empties the content (Meta's parser finds ``<function=...>`` and
        ``name.call(query="...")`` anywhere in an answer).
        """
        body = text.lstrip(" ")
        if self.HEADER.startswith(body):
            return ""
        if body.startswith(self.HEADER):
            body = body[len(self.HEADER) :]
        if self.PYTHON_TAG.startswith(body) or body.startswith(self.PYTHON_TAG) or _may_become_whole_call(body):
            return ""
        return body[: min(_call_start(body), _trailing_start(body))]


def _trailing_start(body: str) -> int:
    """Where the tail that decode_answer may still cut off an answer that begins with body begins: trailing
    spaces, or an ``<|eot_id|>`` / ``<|eom_id|>`` (or the beginning of one) and the spaces after it."""
    kept = body.rstrip(" ")
    start = len(kept)
    for end in ("<|eot_id|>", "<|eom_id|>"):
        if kept.endswith(end):
            start = min(start, len(kept) - len(end))
        elif kept == body:  # the beginning of one, if no space follows it
            start = min(start, len(body) - _partial_end(body, end))
    return start


def _check_tool_call(call: object) -> ToolCall:
    """call itself if it is a tool call dict {'tool_name': str, 'arguments': dict or str, ...}, else a TypeError.

    As in Meta's ``ToolCall``, a custom tool's arguments may be a str; a built-in tool's are a dict."""
    if not isinstance(call, dict) or not isinstance(call.get("tool_name"), str):
        raise TypeError(f"each tool call must be a dict with a str 'tool_name', got {reprlib.repr(call)}")
    name, arguments = call["tool_name"], call.get("arguments")
    if not isinstance(arguments, dict) and not (isinstance(arguments, str) and name not in BUILTIN_TOOLS):
        raise TypeError(
            f"tool call {name!r} needs a dict of 'arguments' (or a str, for a custom tool), "
            f"got {reprlib.repr(arguments)}"
        )
    return call


def _tool_call_text(call: ToolCall) -> str:
    """How an assistant message writes a tool call, as Meta's default (JSON) tool prompt format."""
    name, arguments = call["tool_name"], call["arguments"]
    key = "code" if name == "code_interpreter" else "query"
    if name in BUILTIN_TOOLS and key not in arguments:
        raise ValueError(f"a {name} call needs the argument {key!r}, got {list(arguments)}")
    if name == "code_interpreter":
        if not isinstance(arguments["code"], str):
            raise TypeError(f"a code_interpreter call's 'code' must be a str, got {reprlib.repr(arguments['code'])}")
        return arguments["code"]
    if name in BUILTIN_TOOLS:
        return f'{name}.call(query="{arguments["query"]}")'
    try:
        return json.dumps({"type": "function", "name": name, "parameters": arguments})
    except (TypeError, ValueError, RecursionError) as e:  # a set, a circular or too deeply nested value...
        raise TypeError(f"tool call {name!r}: its arguments must be JSON values (str, number, bool, None, list, "
                        f"dict with str keys), which {reprlib.repr(arguments)} is not ({e})") from e
