"""OpenAI chat messages and tools in Meta's Llama chat formats, and answers back in OpenAI's shape.

Messages: ``system`` (and OpenAI's newer ``developer``), ``user``, ``assistant`` (with ``tool_calls``) and ``tool``
become a ``llama.chat_format`` dialog; Llama 3's format calls a tool's output ``ipython``. Content is a string or
a list of text parts.

Tools (Llama 3.1 and later only; Llama 2 has no tool format), in Meta's JSON tool-calling format (the
"JSON based tool calling" prompt of llama-models' Llama 3.1 prompt format):

- the system message starts with ``Environment: ipython`` (one is added if the dialog has none), so the model
  may end a call with ``<|eom_id|>``;
- a user message listing the functions in JSON goes right after the leading system message(s);
- the answer is read by the format's ``decode_answer`` (Meta's parser). A call becomes an OpenAI ``tool_calls``
  entry only if it names one of the request's functions; any other answer (a built-in tool, an unknown name,
  malformed JSON) is returned as plain ``content``.

``tool_choice``: ``auto`` (the default with tools) as above; ``none`` sends no tools and returns every answer as
content. ``required`` and a named function are enforced by the prompt's end, not by asking nicely: the answer is
begun for the model (``{"type": "function", "name": "`` for ``required``, and up to ``"parameters":`` for a named
function), so it can only go on with a call; the instruction "You must call ..." is added to the tools message
too. The forced beginning is part of the answer that is parsed. An answer cut short by max_tokens, or whose JSON
does not parse, is still returned as content (finish_reason ``length`` or ``stop``): nothing constrains the
arguments' tokens.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from llama.chat_format import ChatFormat, Dialog, Llama3ChatFormat, Message
from llama.serve.protocol import APIError, _short

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TOOLS_INTRO = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n"
)
TOOLS_OUTRO = "\nReturn function calls in JSON format."
ENVIRONMENT = "Environment: ipython"


@dataclass
class ChatPrompt:
    """A chat request's prompt: the dialog, the text the answer is forced to begin with, and the functions a call
    may name (empty: tool calls are returned as content)."""

    dialog: Dialog
    prefix: str
    functions: tuple[str, ...]


def build_prompt(formatter: Optional[ChatFormat], messages: list[Any], tools: Any, tool_choice: Any) -> ChatPrompt:
    if formatter is None:
        raise APIError(400, "this model has no chat format (its tokenizer belongs to no Llama family); use "
                            "/v1/completions", param="messages")  # fmt: skip
    llama3 = isinstance(formatter, Llama3ChatFormat)
    dialog = [_message(m, i, llama3) for i, m in enumerate(messages)]
    functions = _functions(tools)
    choice = _tool_choice(tool_choice, functions)
    if not functions or choice == "none":
        return ChatPrompt(dialog, "", ())
    if not llama3:
        raise APIError(400, "tools need a Llama 3.1 or later model (Meta's Llama 2 chat format has no tool calls)",
                       param="tools")  # fmt: skip
    names = tuple(f["name"] for f in functions)
    instruction = ""
    prefix = ""
    if choice == "required":
        instruction, prefix = "\nYou must call one of these functions.", '{"type": "function", "name": "'
    elif choice != "auto":
        instruction = f"\nYou must call the function {choice}."
        prefix = '{"type": "function", "name": ' + json.dumps(choice) + ', "parameters":'
    listing = "\n".join(json.dumps({"type": "function", "function": f}, indent=4) for f in functions)
    tools_message: Message = {"role": "user", "content": TOOLS_INTRO + listing + TOOLS_OUTRO + instruction}
    leading = 0
    while leading < len(dialog) and dialog[leading]["role"] == "system":
        leading += 1
    if leading == 0:
        dialog = [{"role": "system", "content": ENVIRONMENT}, *dialog]
        leading = 1
    else:
        dialog[0] = {"role": "system", "content": f"{ENVIRONMENT}\n\n{dialog[0]['content']}"}
    dialog.insert(leading, tools_message)
    return ChatPrompt(dialog, prefix, names)


def _message(message: Any, index: int, llama3: bool) -> Message:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{param} must be an object with a role and content, got {_short(message)}", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise APIError(400, f"{param}.role must be one of {', '.join(ROLES)}, got {_short(role)}", param=param)
    content = _content(message.get("content"), f"{param}.content", allow_none=role == "assistant")
    out: Message = {"role": ROLES[role], "content": content}  # type: ignore[typeddict-item]
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant":
            raise APIError(400, f"{param}: only assistant messages carry tool_calls", param=param)
        if not llama3:
            raise APIError(400, f"{param}: tool calls need a Llama 3.1 or later model", param=param)
        out["tool_calls"] = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out["stop_reason"] = "end_of_message"  # a call ends with <|eom_id|> under "Environment: ipython"
    return out


def _content(content: Any, param: str, allow_none: bool) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{param}: only text parts ({{'type': 'text', 'text': ...}}) are supported, got "
                                    f"{_short(part)}", param=param)  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"{param} must be a string or a list of text parts, got {_short(content)}", param=param)


def _tool_call(call: Any, param: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{param} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}, got "
                            f"{_short(call)}", param=param)  # fmt: skip
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise APIError(400, f"{param}.function.arguments must be a JSON object in a string, got {_short(arguments)}",
                       param=param)  # fmt: skip
    call_id = call.get("id") if isinstance(call.get("id"), str) else str(uuid.uuid4())
    return {"call_id": call_id, "tool_name": function["name"], "arguments": parsed}


def _functions(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise APIError(400, f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got "
                            f"{_short(tools)}", param="tools")  # fmt: skip
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'description', "
                                f"'parameters'}}}}, got {_short(tool)}", param="tools")  # fmt: skip
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
        functions.append({k: function[k] for k in ("name", "description", "parameters") if k in function})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, f"tools name a function twice: {names}", param="tools")
    return functions


def _tool_choice(choice: Any, functions: list[dict[str, Any]]) -> str:
    """The choice: "auto", "none", "required" or the name of the function to call."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not functions:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return choice
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {_short(choice)}", param="tool_choice")  # fmt: skip
    if name not in [f["name"] for f in functions]:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return name


# ---------------------------------------------------------------------------------------------- answers


@dataclass
class Answer:
    """An answer in OpenAI's shape: its content (None when it is a call), tool_calls, and whether it is a call."""

    content: Optional[str]
    tool_calls: list[dict[str, Any]]


def read_answer(formatter: ChatFormat, prompt: ChatPrompt, text: str, stop_id: Optional[int],
                message: Optional[Message] = None) -> Answer:  # fmt: skip
    """The answer to a chat prompt from its generated text (after the forced prefix), or from the engine's message
    where it parsed one itself (no prefix)."""
    if message is None or prompt.prefix:
        message = formatter.decode_answer(prompt.prefix + text, formatter.stop_reason(stop_id))
    calls = message.get("tool_calls") or []
    if calls and all(c["tool_name"] in prompt.functions for c in calls):
        return Answer(None, [_openai_call(c) for c in calls])
    if calls:  # a call we may not return as one: the answer as text
        return Answer(plain_text(prompt.prefix + text), [])
    return Answer(message["content"], [])


def plain_text(text: str) -> str:
    """An answer's text without what the format wraps around a call (spaces, a header, <|python_tag|>)."""
    text = text.strip(" ")
    for mark in (Llama3ChatFormat.HEADER, Llama3ChatFormat.PYTHON_TAG):
        if text.startswith(mark):
            text = text[len(mark) :]
    return text


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["arguments"]
    return {
        "id": f"call_{call['call_id'].replace('-', '')}",
        "type": "function",
        "function": {"name": call["tool_name"],
                     "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
    }  # fmt: skip


def settled(formatter: ChatFormat, prompt: ChatPrompt, text: str) -> str:
    """The beginning of the content that no later token can change (what a stream may show); nothing of an answer
    forced to be a call."""
    if prompt.prefix:
        return ""
    return formatter.settled_content(text)
