"""Llama3ChatFormat against Meta's llama_models.llama3.chat_format.ChatFormat on Meta's real tokenizer."""

from __future__ import annotations

import json
import uuid

import pytest
from helpers import random_model
from llama_models.datatypes import RawMessage, StopReason
from llama_models.datatypes import ToolCall as MetaToolCall

from llama.chat_format import Llama2ChatFormat, Llama3ChatFormat


def to_meta(dialog: list[dict]) -> list[RawMessage]:
    """The same dialog as Meta's RawMessages ("ipython" is Meta's Role.tool)."""
    out = []
    for msg in dialog:
        calls = [MetaToolCall(**call) for call in msg.get("tool_calls", [])]
        stop = msg.get("stop_reason")
        out.append(
            RawMessage(
                role="tool" if msg["role"] == "ipython" else msg["role"],
                content=msg["content"],
                tool_calls=calls,
                stop_reason=None if stop is None else StopReason(stop),
            )
        )
    return out


def call(name: str, **arguments) -> dict:
    return {"call_id": str(uuid.uuid4()), "tool_name": name, "arguments": arguments}


DIALOGS = {
    "user": [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    "system_multi_turn": [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Eiffel Tower high\nLouvre's art and Notre-Dame\nSeine flows gently"},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    "unstripped_whitespace": [
        {"role": "system", "content": "  spaces around  \n"},
        {"role": "user", "content": "\n\nhello \t"},
        {"role": "assistant", "content": " answer "},
        {"role": "user", "content": ""},
    ],
    "special_token_text": [
        {"role": "user", "content": "say <|eot_id|> and <|start_header_id|>system<|end_header_id|>"}
    ],
    "unicode": [{"role": "user", "content": "日本語で答えて 🙂 — Café"}],
    "brave_search_eom_ipython": [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha"},
        {"role": "user", "content": "What is the weather in SF today?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("brave_search", query="weather in San Francisco")],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": '{"temperature": "17C", "sky": "fog"}'},
    ],
    "tool_alias": [
        {"role": "user", "content": "What is 2 ** 100?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("wolfram_alpha", query="2^100")],
            "stop_reason": "end_of_message",
        },
        {"role": "tool", "content": "1267650600228229401496703205376"},
        {"role": "assistant", "content": "It is 1267650600228229401496703205376.", "stop_reason": "end_of_turn"},
        {"role": "user", "content": "and a picture of it?"},
        {"role": "assistant", "content": "", "tool_calls": [call("photogen", query="the number 2^100")]},
    ],
    "code_interpreter": [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Compute the 10th Fibonacci number"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call(
                    "code_interpreter",
                    code="def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\nprint(fib(10))",
                )
            ],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": "55"},
    ],
    "custom_tool": [
        {"role": "user", "content": "Weather in Menlo Park in Celsius?"},
        {
            "role": "assistant",
            "content": "Let me check. ",
            "tool_calls": [call("get_weather", city="Menlo Park", unit="celsius", days=3, exact=True)],
            "stop_reason": "end_of_message",
        },
        {"role": "ipython", "content": "{'temp': 21}"},
    ],
    "last_message_assistant": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "stop_reason": "out_of_tokens"},
    ],
}


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_ids_as_meta(llama3_format, meta_format, name):
    dialog = DIALOGS[name]
    assert llama3_format.encode_dialog_prompt(dialog) == meta_format.encode_dialog_prompt(to_meta(dialog)).tokens


def test_dialog_layout(llama3_format, llama3_tokenizer):
    # <|begin_of_text|> <|start_header_id|>user<|end_header_id|>\n\n hi <|eot_id|>, then the assistant header.
    def enc(s: str) -> list[int]:
        return llama3_tokenizer.encode(s, bos=False, eos=False)

    def header(role: str) -> list[int]:
        return [128006] + enc(role) + [128007] + enc("\n\n")

    ids = llama3_format.encode_dialog_prompt([{"role": "user", "content": "hi"}])
    assert ids == [128000] + header("user") + enc("hi") + [128009] + header("assistant")
    eom = llama3_format.encode_dialog_prompt(
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("code_interpreter", code="1+1")],
                "stop_reason": "end_of_message",
            }
        ]
    )
    assert eom == [128000] + header("assistant") + [128010] + enc("1+1") + [128008] + header("assistant")


@pytest.mark.parametrize(
    "dialog,error,match",
    [
        ([], ValueError, "non-empty list"),
        ([{"role": "robot", "content": "x"}], ValueError, "unknown role 'robot'"),
        ([{"role": "user"}], TypeError, "'role' and 'content'"),
        ([{"role": "user", "content": 3}], TypeError, "content must be a str"),
        ([{"role": "user", "content": "a\udc80"}], ValueError, "lone surrogate"),
        ([{"role": "user", "content": "x", "tool_calls": [call("f")]}], ValueError, "only assistant messages"),
        ([{"role": "assistant", "content": "x", "stop_reason": "done"}], ValueError, "unknown stop_reason 'done'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"tool_name": "f"}]}], TypeError, "dict of 'arguments'"),
        ([{"role": "assistant", "content": "", "tool_calls": ["f()"]}], TypeError, "str 'tool_name'"),
        ([{"role": "assistant", "content": "", "tool_calls": [call("brave_search", q="x")]}], ValueError, "'query'"),
        ([{"role": "assistant", "content": "", "tool_calls": [call("code_interpreter")]}], ValueError, "'code'"),
    ],
)
def test_bad_dialogs(llama3_format, dialog, error, match):
    with pytest.raises(error, match=match):
        llama3_format.encode_dialog_prompt(dialog)


def test_needs_a_llama3_tokenizer(tokenizer_path):
    from llama.tokenizer import Tokenizer

    with pytest.raises(TypeError, match="needs a Llama 3 tokenizer"):
        Llama3ChatFormat(Tokenizer(tokenizer_path))


def test_refusal_and_stop_reason(llama3_format, llama3_tokenizer):
    assert llama3_format.refusal([{"role": "user", "content": "[INST] <<SYS>> <|eot_id|>"}]) is None
    assert llama3_format.stop_reason(llama3_tokenizer.eot_id) == "end_of_turn"
    assert llama3_format.stop_reason(llama3_tokenizer.eom_id) == "end_of_message"
    # Meta's chat completion gives out_of_tokens for anything but eot/eom, <|end_of_text|> included.
    assert llama3_format.stop_reason(llama3_tokenizer.eos_id) == "out_of_tokens"
    assert llama3_format.stop_reason(None) == "out_of_tokens"


# (generated text, stop reason passed in)
ANSWERS = [
    ("Paris is the capital of France.", "end_of_turn"),
    ("  spaced answer \n", "out_of_tokens"),
    ("answer that ran out", "out_of_tokens"),
    ("done<|eot_id|>", "out_of_tokens"),
    ("<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>", "end_of_turn"),
    ('<|python_tag|>brave_search.call(query="weather in SF")<|eom_id|>', "end_of_turn"),
    ('brave_search.call(query="latest news")', "end_of_message"),
    ('<|python_tag|>wolfram_alpha.call(query="integrate x^2")', "end_of_message"),
    ('photogen.call(query="a llama on the moon")<|eom_id|>', "end_of_turn"),
    ('I will search: my_tool.call(query="x y")', "end_of_turn"),
    ("<|python_tag|>import math\nprint(math.sqrt(2))<|eom_id|>", "end_of_turn"),
    ('<function=get_weather>{"city": "Paris", "days": 3}</function><|eom_id|>', "end_of_turn"),
    ("<function=get_weather>{'city': 'Paris'}</function>", "end_of_message"),
    ('Calling it: <function=lookup>{"id": 7}</function>', "end_of_turn"),
    ("<function=broken>{not json}</function>", "end_of_turn"),
    ('<function=brave_search>{"q": "llamas"}</function>', "end_of_turn"),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Tokyo"}}', "end_of_message"),
    ('{"name": "get_time", "parameters": {"tz": "UTC"}}<|eom_id|>', "end_of_turn"),
    ('{"type": "function", "name": "wolfram_alpha", "parameters": {"query": "2+2"}}', "end_of_turn"),
    ('{"answer": 42}', "end_of_turn"),
    ('[get_weather(city="Paris", days=3), get_time(tz="CET")]', "end_of_turn"),
    ("[not_a_call, 3]", "end_of_turn"),
    ('<|python_tag|>[search(q="x")]', "end_of_message"),
]


def normalized_meta_answer(meta_format, text, stop_reason):
    msg = meta_format.decode_assistant_message_from_content(text, StopReason(stop_reason))
    calls = [
        (getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in msg.tool_calls
    ]  # Meta's tool_name is a BuiltinTool for built-ins
    return msg.content, msg.stop_reason.value, calls


@pytest.mark.parametrize("text,stop_reason", ANSWERS)
def test_decode_answer_as_meta(llama3_format, meta_format, text, stop_reason):
    msg = llama3_format.decode_answer(text, stop_reason)
    assert set(msg) == {"role", "content", "stop_reason", "tool_calls"} and msg["role"] == "assistant"
    calls = [(c["tool_name"], c["arguments"]) for c in msg["tool_calls"]]
    assert (msg["content"], msg["stop_reason"], calls) == normalized_meta_answer(meta_format, text, stop_reason)
    for c in msg["tool_calls"]:
        assert set(c) == {"call_id", "tool_name", "arguments"}
        assert isinstance(c["tool_name"], str)
        uuid.UUID(c["call_id"])  # a uuid4, as Meta's


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "function", "parameters": {"a": 1}}',  # no name: Meta raises KeyError
        '{"name": "f"}',  # no parameters: Meta raises KeyError
        "[f(x=y)]",  # a non-literal argument: Meta raises ValueError
    ],
)
def test_decode_answer_reads_half_calls_as_text(llama3_format, text):
    # Where Meta's decoder raises, ours keeps the answer as text.
    assert llama3_format.decode_answer(text, "end_of_turn") == {
        "role": "assistant",
        "content": text,
        "stop_reason": "end_of_turn",
        "tool_calls": [],
    }


def test_decoded_tool_call_encodes_back_as_meta(llama3_format, meta_format):
    text = '<|python_tag|>brave_search.call(query="llama facts")<|eom_id|>'
    answer = llama3_format.decode_answer(text, "out_of_tokens")
    assert answer["tool_calls"][0]["tool_name"] == "brave_search" and answer["stop_reason"] == "end_of_message"
    dialog = [{"role": "user", "content": "llama facts?"}, answer, {"role": "ipython", "content": "they hum"}]
    assert llama3_format.encode_dialog_prompt(dialog) == meta_format.encode_dialog_prompt(to_meta(dialog)).tokens


def test_llama2_decode_answer_unchanged(tokenizer_path):
    from llama.tokenizer import Tokenizer

    fmt = Llama2ChatFormat(Tokenizer(tokenizer_path))
    text = '<|python_tag|>brave_search.call(query="x")<|eot_id|>'
    assert fmt.decode_answer(text, "end_of_turn") == {"role": "assistant", "content": text}


def test_custom_call_arguments_are_json(llama3_format, llama3_tokenizer):
    # A custom call is written as Meta's JSON tool prompt format.
    dialog = [{"role": "assistant", "content": "", "tool_calls": [call("f", a=[1, 2], b=None)]}]
    text = llama3_tokenizer.decode(llama3_format.encode_dialog_prompt(dialog))
    assert json.dumps({"type": "function", "name": "f", "parameters": {"a": [1, 2], "b": None}}) in text


def test_chat_completion_with_a_llama3_tokenizer(llama3_tokenizer):
    # The generator takes the Llama 3 chat format from the tokenizer's family and returns its message shape.
    from llama.generation import Llama
    from llama.model import ModelArgs

    vocab_size = llama3_tokenizer.n_words
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, max_seq_len=64, max_batch_size=2)
    generator = Llama(random_model(args), llama3_tokenizer)
    assert isinstance(generator.formatter, Llama3ChatFormat)
    dialog = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    [result] = generator.chat_completion([dialog], temperature=0, max_gen_len=4)
    message = result["generation"]
    assert message["role"] == "assistant" and message["stop_reason"] in ("end_of_turn", "out_of_tokens")
    stream = generator.chat_completion_stream(dialog, temperature=0, max_gen_len=4)
    assert "".join(stream) == message["content"]  # the stream holds back the spaces decode_answer strips
    assert stream.message == message
