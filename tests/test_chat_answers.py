"""Chat answers: any generated text becomes a message as Meta's decoder reads it, the next turn accepts it, and a
chat stream joins to exactly the batch answer (issue 24, items 1, 4, 6, 12, 13 and 14's tool_calls)."""

from __future__ import annotations

import contextlib
import io
import random
import re
from unittest import mock

import pytest
import torch
from helpers import random_model
from llama_models.datatypes import RawMessage, StopReason, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
from llama_models.llama3.tool_utils import BUILTIN_TOOL_PATTERN, CUSTOM_TOOL_CALL_PATTERN, ToolUtils

from llama import Llama
from llama.chat_format import Llama2ChatFormat, Llama3ChatFormat
from llama.engine import batching, loop
from llama.engine.ends import RowEnd
from llama.engine.stream import ChatStream
from llama.interactive import chat_loop
from llama.model import ModelArgs
from llama.tokenizer import Llama3Tokenizer, Tokenizer

HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
FUNCTION_TAG, BUILTIN_CALL = CUSTOM_TOOL_CALL_PATTERN, re.compile(BUILTIN_TOOL_PATTERN)  # Meta's


# ---------------------------------------------------------------- the oracle

_UNREAD = staticmethod(lambda body: None)


def meta_answer(meta_format: MetaChatFormat, text: str, stop_reason: str) -> tuple:
    """(content, stop_reason, [(tool_name, arguments)]) as Meta's decode_assistant_message_from_content gives them.

    Where Meta's decoder raises, or gives a call that cannot be sent back (Meta's encoder fails on it, or it holds
    a lone surrogate, which our tokenizer refuses in any text), the answer is read on as if that form of call
    were not there: Meta's decoder with its custom-call extraction off, then with its built-in one off too.
    """
    custom, builtin = "maybe_extract_custom_tool_call", "maybe_extract_builtin_tool_call"
    for off in ([], [custom], [custom, builtin]):
        with contextlib.ExitStack() as patches:
            for name in off:
                patches.enter_context(mock.patch.object(ToolUtils, name, _UNREAD))
            patches.enter_context(contextlib.redirect_stdout(io.StringIO()))  # Meta prints its JSON errors
            try:
                msg = meta_format.decode_assistant_message_from_content(text, StopReason(stop_reason))
                meta_format.encode_dialog_prompt([msg])
                for call in msg.tool_calls:
                    ToolUtils.encode_tool_call(call, ToolPromptFormat.json).encode("utf-8")
            except Exception:  # noqa: BLE001 - any failure of Meta's is what the next reading is for
                continue
        calls = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in msg.tool_calls]
        return msg.content, msg.stop_reason.value, calls
    raise AssertionError("unreachable: with both extractions off Meta's decoder cannot fail")


def our_answer(llama3_format: Llama3ChatFormat, text: str, stop_reason: str) -> tuple:
    """Our decoded answer, after checking that it is a well-formed message that the next turn accepts."""
    msg = llama3_format.decode_answer(text, stop_reason)
    assert set(msg) == {"role", "content", "stop_reason", "tool_calls"} and msg["role"] == "assistant"
    llama3_format.encode_dialog_prompt([{"role": "user", "content": "q"}, msg, {"role": "user", "content": "and?"}])
    return msg["content"], msg["stop_reason"], [(c["tool_name"], c["arguments"]) for c in msg["tool_calls"]]


# Texts the issue names, and forms that exercise each way Meta's decoder reads, raises or decodes an unsendable call.
TRICKY = [
    "[" * 1000,  # RecursionError in json
    '{"a":' * 1000,
    "[f(a={[1]: 2})]",  # TypeError: unhashable
    "-" * 100_000 + "1",  # MemoryError in ast
    "[f(a=" + "1" * 5000 + ")]",  # over Python's 4300-digit limit
    "1" * 5000,  # ValueError (not a JSONDecodeError) from json
    "\0[f()]",
    "[f(a=(1,2))]",  # Meta gives a list
    "[f(a={1,2})]",
    "[f(a=set())]",
    '[f(**{"a":1})]',  # no argument name: Meta's ToolCall refuses it
    "[f(a=1, a=2)]",
    "[f(a=1), g(b=x)]",  # Meta evaluates every call's arguments, not only the first's
    '[f(a=b"x")]',
    "[f(a=b'\\xff')]",
    "[f(a=1j)]",
    "[f(a=...)]",
    "[f(a={b'k': 1})]",
    "[f(a={1: 2})]",
    "[f(a=[[1]])]",
    "[(f)(a=1)]",
    "# a comment\r[f(a=1)]",
    '{"name": "f", "parameters": [1]}',  # parameters that are not a dict
    '{"name": "f", "parameters": 5}',
    '{"name": "f", "parameters": "x"}',  # a str: Meta's ToolCall takes it
    '{"name": "f", "parameters": null}',
    '<|python_tag|>{"name": "f", "parameters": null}',
    '{"name": 5, "parameters": null}',
    '{"name": 5, "parameters": {}}',
    '{"name": [1], "parameters": null}',
    '{"name": "f", "parameters": {"a": {"b": {"c": 1}}}}',
    '{"name": "f", "parameters": {"q": "\\ud800"}}',
    '{"name": "brave_search", "parameters": {}}',
    '{"name": "brave_search", "parameters": null}',
    '{"name": "brave_search", "parameters": {"q": "\\ud800"}}',
    '{"name": "brave_search", "parameters": {"q": {"a": 1}}}',
    '{"name": "code_interpreter", "parameters": {"code": "print(1)"}}',  # Meta gives {"query": ...}: unsendable
    '<|python_tag|>{"name": "code_interpreter", "parameters": {"code": "print(1)"}}',
    'code_interpreter.call(query="x")',
    '<|python_tag|>code_interpreter.call(query="x")',
    '<function=f>{"a": 1}</function>',
    "<function=brave_search>{}</function>",
    "<function=f>{[}</function>",
    "  hi  ",
    HEADER + "  hi  <|eot_id|>",
    "<|python_tag|>print(1)",
    "hi<|start_header_id|>user<|end_header_id|>\n\nmore",
]

PIECES = ["[", "]", "{", "}", "(", ")", '"', "'", ":", ",", "=", " ", "  ", "\n", "\r", "**", "#", "\\", "\0", "-",
          "<|python_tag|>", "<|eot_id|>", "<|eom_id|>", HEADER, "<|start_header_id|>", "<function=", ">", "</function>",
          ".call(query=", '"name"', '"parameters"', '"type"', '"function"', "f", "a", "1", "1.5", "null", "true",
          "None", "b", "x", "1j", "...", "set()", "é", '"\\ud800"', "brave_search", "code_interpreter"]  # fmt: skip
NAMES = ['"f"', '"brave_search"', '"code_interpreter"', '"photogen"', "null", "5", "[1]", '{"a": 1}']


def json_value(rng: random.Random, depth: int) -> str:
    """A random JSON value (or a broken piece of one), nested up to three levels."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind < 4:
        choices = [['"x"', '"\\ud800"', "'q'"], ["1", "-2", "1.5", "1e400", "NaN"], ["true", "false"], ["null"]]
        return rng.choice(choices[kind])
    if kind == 4:
        return rng.choice(['"', "{", "x", "]"])
    if kind < 7:
        keys = rng.sample("abq", rng.randrange(3))
        return "{" + ", ".join(f'"{k}": {json_value(rng, depth + 1)}' for k in keys) + "}"
    return "[" + ", ".join(json_value(rng, depth + 1) for _ in range(rng.randrange(3))) + "]"


def py_value(rng: random.Random, depth: int) -> str:
    """A random Python literal (or something that is not one), nested up to three levels."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(['"x"', "b'x'", "b'\\xff'", "'\\ud800'", "1", "1.5", "True", "None", "1j", "...", "x", "f()"])
    if kind < 4:
        return rng.choice([["set()", "()", "[]", "{}"], ["[", "[[", "(("], ['"', "=", ")"]][kind - 1])
    items = [py_value(rng, depth + 1) for _ in range(rng.randrange(1, 3))]
    if kind == 4:
        return "(" + ", ".join(items) + ",)"
    if kind == 5:
        return "{" + ", ".join(items) + "}"
    keys = rng.choice([["'k'", "b'k'"], ["1", "'k'"], ["[1]"], ["'a'"]])
    return "{" + ", ".join(f"{k}: {v}" for k, v in zip(keys, items)) + "}"


def fuzzed_answers(n: int, seed: int = 0) -> list[str]:
    """Random answers: runs of tool-call syntax, JSON and Python calls with random arguments, calls after text,
    each with a random beginning (header, <|python_tag|>, spaces) and end (<|eot_id|>, <|eom_id|>, spaces)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 4 == 0:
            body = "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 14)))
        elif i % 4 == 1:
            kind = rng.choice(["", '"type": "function", '])
            body = f'{{{kind}"name": {rng.choice(NAMES)}, "parameters": {json_value(rng, 0)}}}'
        elif i % 4 == 2:
            keywords = [rng.choice([f"{k}={py_value(rng, 0)}", f"**{py_value(rng, 1)}"]) for k in rng.sample("aqb", 2)]
            calls = [f"{rng.choice(['f', 'brave_search', 'code_interpreter'])}({', '.join(keywords)})"]
            body = "[" + ", ".join(calls * rng.randrange(1, 3)) + "]"
        else:
            name = rng.choice(["f", "brave_search", "code_interpreter", "my_tool", "}"])
            call = rng.choice([f"<function={name}>{json_value(rng, 0)}</function>", f'{name}.call(query="a b")'])
            body = rng.choice(["Sure. ", "", "x "]) + call + rng.choice(["", " done", "\n"])
        start = rng.choice(["", "", " ", "<|python_tag|>", HEADER, "  " + HEADER + "<|python_tag|>"])
        texts.append(start + body + rng.choice(["", "", "<|eot_id|>", "<|eom_id|>", "  ", " <|eom_id|> "]))
    return texts


# ---------------------------------------------------------------- decoding (items 1, 13)


@pytest.mark.parametrize("text", TRICKY, ids=lambda t: repr(t[:40]))
def test_decode_answer_never_raises_and_reads_as_meta(llama3_format, meta_format, text):
    for stop_reason in ("end_of_turn", "out_of_tokens"):
        assert repr(our_answer(llama3_format, text, stop_reason)) == repr(meta_answer(meta_format, text, stop_reason))


def test_fuzzed_answers_read_as_metas_and_are_accepted_back(llama3_format, meta_format):
    texts = fuzzed_answers(400)
    decoded = [our_answer(llama3_format, text, "out_of_tokens") for text in texts]  # none raises, all are accepted back
    assert repr(decoded) == repr([meta_answer(meta_format, text, "out_of_tokens") for text in texts])
    assert sum(bool(calls) for _, _, calls in decoded) > 100  # the fuzz reaches tool calls, not only text


@pytest.mark.parametrize(
    "text, tool_name, arguments",
    [
        ("[f(a=(1,2))]", "f", {"a": [1, 2]}),  # a tuple or set becomes a list, as in Meta's ToolCall
        ("[f(a={1,2})]", "f", {"a": [1, 2]}),
        ('[f(a=b"x")]', "f", {"a": "x"}),
        ('{"name": "f", "parameters": "x y"}', "f", "x y"),  # Meta's ToolCall takes str arguments
        ('{"name": "brave_search", "parameters": {"q": "llamas"}}', "brave_search", {"query": "llamas"}),
    ],
)
def test_tool_call_arguments_as_metas(llama3_format, text, tool_name, arguments):
    [call] = llama3_format.decode_answer(text, "end_of_turn")["tool_calls"]
    assert (call["tool_name"], call["arguments"]) == (tool_name, arguments)


@pytest.mark.parametrize(
    "text",
    ['[f(**{"a":1})]', "[f(a=1), g(b=x)]", '{"name": "f", "parameters": [1]}', "[f(a=[[1]])]", "[f(a={[1]: 2})]"],
)
def test_calls_meta_cannot_read_are_content(llama3_format, text):
    assert llama3_format.decode_answer(text, "end_of_turn") == {
        "role": "assistant", "content": text, "stop_reason": "end_of_turn", "tool_calls": []
    }  # fmt: skip


def test_decoded_str_arguments_are_sent_back_as_metas(llama3_format, meta_format):
    text = '{"name": "f", "parameters": "x y"}'
    dialog = [{"role": "user", "content": "q"}, llama3_format.decode_answer(text, "end_of_message")]
    meta_message = meta_format.decode_assistant_message_from_content(text, StopReason("end_of_message"))
    meta_dialog = [RawMessage(role="user", content="q"), meta_message]
    assert llama3_format.encode_dialog_prompt(dialog) == meta_format.encode_dialog_prompt(meta_dialog).tokens


@pytest.mark.parametrize(
    "tool_calls, error, match",
    [
        ({"call_id": "1", "tool_name": "f", "arguments": {}}, TypeError, r"message 1 \('assistant'\).*must be a list"),
        ("f()", TypeError, "tool_calls must be a list"),
        ([{"call_id": "1", "tool_name": "f", "arguments": {"a": {1, 2}}}], TypeError, "JSON values"),
        ([{"call_id": "1", "tool_name": "code_interpreter", "arguments": {"code": 5}}], TypeError, "'code' must be"),
        ([{"call_id": "1", "tool_name": "brave_search", "arguments": "x"}], TypeError, "dict of 'arguments'"),
    ],
)
def test_bad_tool_calls_are_named(llama3_format, tool_calls, error, match):
    dialog = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": tool_calls}]
    with pytest.raises(error, match=match):
        llama3_format.encode_dialog_prompt(dialog)


# ---------------------------------------------------------------- the stream's answer (item 4)


def stream_of(formatter, pieces: list[str], stop_id=None) -> tuple[list[str], ChatStream]:
    """A ChatStream fed the raw pieces (as TextStream deltas come), ended by stop_id; its deltas and itself."""

    def raw():
        yield from pieces
        if stop_id is not None:  # the row's end, as the decoding loop's stream returns it
            end = RowEnd(len(pieces) + 1, frozenset([stop_id]))
            end.add(stop_id)
            return end

    stream = ChatStream(formatter, raw())
    return list(stream), stream


def without_call_ids(message: dict) -> dict:
    calls = [{k: v for k, v in c.items() if k != "call_id"} for c in message.get("tool_calls", [])]
    return {**message, "tool_calls": calls} if "tool_calls" in message else message


def split_randomly(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(len(text) + 1)))) if text else []
    return [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]


STREAMED = [
    "  hi  ",
    "  hi there.  <|eot_id|>  ",
    "<|python_tag|>print(1)",
    '{"name": "f", "parameters": {}}',
    '\n{"name": "f", "parameters": {}}',
    "[f(a=1)]",
    "# comment\n[f(a=1)]",
    HEADER + "hello  ",
    "  " + HEADER + "<|python_tag|>" + 'brave_search.call(query="x")',
    "hi<|start_header_id|>user<|end_header_id|>\n\nmore",
    "hi <|eo",
    "a <|eot_id|><|eom_id|> ",
    "[1] is a note, [f] too",
    "(see below) then { and [",
    '{"not": "a call"}',
    "[f(x=y)]",
    "# Title\nSome text",
    "<|start_header_id|>assistant",
    "x.call(query=1) and x.call(query=\"y",
]


@pytest.mark.parametrize("text", STREAMED, ids=repr)
def test_chat_stream_joins_to_the_answer_for_any_split(llama3_format, text):
    expected = llama3_format.decode_answer(text, "end_of_turn")
    rng = random.Random(0)
    for pieces in [[text], list(text)] + [split_randomly(text, rng) for _ in range(20)]:
        deltas, stream = stream_of(llama3_format, pieces, llama3_format.tokenizer.eot_id)
        assert "".join(deltas) == expected["content"] and all(deltas)
        assert without_call_ids(stream.message) == without_call_ids(expected)
    if expected["tool_calls"]:
        assert deltas == []  # a call shows nothing: no raw <|python_tag|>, JSON or list


def assert_shown_before_the_call(shown: str, text: str) -> None:
    """shown (what a stream of an answer that is a tool call showed) ends before the call: nothing of a call that
    is the whole answer, only text before a call written inside it (Meta's patterns find those)."""
    body = text.lstrip(" ")
    body = body[len(HEADER) :] if body.startswith(HEADER) else body
    inside = [m.start() for m in (FUNCTION_TAG.search(body), BUILTIN_CALL.search(body)) if m is not None]
    assert body.startswith(shown) and len(shown) <= min(inside, default=0), (shown, text)


@pytest.mark.parametrize(
    "text", ['Sure. <function=f>{"a": 1}</function>', 'Let me look: brave_search.call(query="llamas")<|eom_id|>']
)
def test_a_call_after_text_shows_the_text_never_the_call(llama3_format, text):
    deltas, stream = stream_of(llama3_format, list(text))
    assert stream.message["content"] == "" and len(stream.message["tool_calls"]) == 1
    shown = "".join(deltas)
    assert shown and "<function" not in shown and ".call(" not in shown
    assert_shown_before_the_call(shown, text)


def test_fuzzed_streams_join_to_the_answer(llama3_format):
    rng = random.Random(1)
    after_text = 0
    for text in fuzzed_answers(300, seed=2):
        expected = llama3_format.decode_answer(text, "out_of_tokens")
        deltas, stream = stream_of(llama3_format, split_randomly(text, rng))
        assert without_call_ids(stream.message) == without_call_ids(expected)
        if expected["tool_calls"]:
            assert_shown_before_the_call("".join(deltas), text)
        if "".join(deltas) != expected["content"]:  # the documented case: a call written after some text
            assert expected["content"] == "" and expected["tool_calls"], text
            after_text += 1
    assert after_text < 40


# Ways an answer may go on: closing a call of any form, ending it, or plain text.
CONTINUATIONS = ["", " ", "x", "x y", '")', '"} ', ")]", "=1)]", '{"a": 1}</function>', '.call(query="q")', "]",
                 "\n[f(a=1)]", "}", "<|eot_id|>", " <|eom_id|>  ", "ssistant<|end_header_id|>\n\nhi",
                 "thon_tag|>1"]  # fmt: skip


def test_settled_content_begins_every_answer_the_text_may_become(llama3_format):
    texts = fuzzed_answers(150, seed=4) + STREAMED
    for text in texts:
        for end in sorted({*range(0, len(text) + 1, max(1, len(text) // 10)), len(text)}):
            settled = llama3_format.settled_content(text[:end])
            for more in CONTINUATIONS:
                answer = llama3_format.decode_answer(text[:end] + more, "end_of_turn")
                if answer["tool_calls"] and answer["content"] == "":
                    assert_shown_before_the_call(settled, text[:end] + more)
                else:
                    assert answer["content"].startswith(settled), (text[:end], more)


def test_settled_content_only_grows(llama3_format):
    for text in fuzzed_answers(200, seed=3) + STREAMED:
        shown = ""
        for end in range(len(text) + 1):
            settled = llama3_format.settled_content(text[:end])
            assert settled.startswith(shown), (text, end)
            shown = settled


# ---------------------------------------------------------------- generated answers, both generations


class Forced:
    """A select_next_token that generates the given ids, one per step, whatever the logits (then the last again)."""

    def __init__(self, ids: list[int]):
        self.ids, self.step = ids, 0

    def __call__(self, last_logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
        token = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        return torch.full(last_logits.shape[:1], token, dtype=torch.long)


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer) -> Llama:
    vocab_size = llama3_tokenizer.n_words
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, max_seq_len=96, max_batch_size=2)
    return Llama(random_model(args), llama3_tokenizer)


@pytest.fixture(scope="module")
def llama2(tokenizer_path) -> Llama:
    tok = Tokenizer(tokenizer_path)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, max_seq_len=96, max_batch_size=2)
    return Llama(random_model(args), tok)


def batch_and_stream(generator: Llama, monkeypatch, ids: list[int], **kwargs) -> tuple[dict, list[str], ChatStream]:
    dialog = [{"role": "user", "content": "hi"}]
    kwargs = {"temperature": 0, "max_gen_len": 40, **kwargs}
    forced = Forced(ids)
    monkeypatch.setattr(loop, "select_next_token", forced)
    monkeypatch.setattr(batching, "select_next_token", forced)  # the streams run on the engine
    batch = generator.chat_completion([dialog], **kwargs)[0]["generation"]
    forced.step = 0
    stream = generator.chat_completion_stream(dialog, **kwargs)
    return batch, list(stream), stream


LLAMA3_ANSWERS = ["spaces", "spaces_out_of_tokens", "python_tag", "python_tag_as_text", "json_call", "python_list_call",
                  "builtin_call", "header_first", "header_mid_answer", "eot_text", "unreadable_call"]  # fmt: skip


def llama3_answers(tok: Llama3Tokenizer) -> dict[str, list[int]]:
    """Token ids of Llama 3 answers, by name (LLAMA3_ANSWERS): special tokens as the model generates them."""
    def enc(text: str) -> list[int]:
        return tok.encode(text, bos=False, eos=False)

    header = [tok.start_header_id] + enc("assistant") + [tok.end_header_id] + enc("\n\n")
    return {
        "spaces": enc("  hi  ") + [tok.eot_id],
        "spaces_out_of_tokens": enc("  hi there  "),
        "python_tag": [tok.python_tag_id] + enc("print(1)") + [tok.eom_id],
        "python_tag_as_text": enc("<|python_tag|>print(1)") + [tok.eom_id],
        "json_call": enc('{"name": "f", "parameters": {}}') + [tok.eom_id],
        "python_list_call": enc("[f(a=1)]") + [tok.eot_id],
        "builtin_call": [tok.python_tag_id] + enc('brave_search.call(query="llamas")') + [tok.eom_id],
        "header_first": header + enc("hello ") + [tok.eot_id],
        "header_mid_answer": enc("hi") + header + enc("more") + [tok.start_header_id] + enc("user"),
        "eot_text": enc("done <|eot_id|>") + [tok.eos_id],
        "unreadable_call": enc("[f(a={[1]: 2})]") + [tok.eot_id],
    }


@pytest.mark.parametrize("name", LLAMA3_ANSWERS)
def test_llama3_stream_is_the_batch_answer(llama3, monkeypatch, name):
    answers = llama3_answers(llama3.tokenizer)
    assert list(answers) == LLAMA3_ANSWERS
    ids = answers[name]
    batch, deltas, stream = batch_and_stream(llama3, monkeypatch, ids)
    assert "".join(deltas) == batch["content"]
    assert without_call_ids(stream.message) == without_call_ids(batch)
    assert not any("<|python_tag|>" in d or "<|eot_id|>" in d for d in deltas)
    if name in ("python_tag", "json_call", "python_list_call", "builtin_call"):
        assert deltas == [] and batch["tool_calls"] and batch["content"] == ""


def test_llama3_stream_with_a_stop_string(llama3, monkeypatch):
    ids = llama3.tokenizer.encode("  one two\n\nthree", bos=False, eos=False)
    batch, deltas, stream = batch_and_stream(llama3, monkeypatch, ids, stop=["\n\n"])
    assert "".join(deltas) == batch["content"] == "one two"
    assert stream.message == batch


@pytest.mark.parametrize("text", ["  hi  ", "[/INST] answer", "Café 🙂 [f(a=1)]", "<|python_tag|>print(1)"])
def test_llama2_stream_is_the_batch_answer(llama2, monkeypatch, text):
    ids = llama2.tokenizer.encode(text, bos=False, eos=False) + [llama2.tokenizer.eos_id]
    batch, deltas, stream = batch_and_stream(llama2, monkeypatch, ids)
    assert "".join(deltas) == batch["content"]
    assert stream.message == batch == {"role": "assistant", "content": batch["content"]}


def test_chat_completion_never_fails_after_generation(llama3, monkeypatch):
    ids = llama3.tokenizer.encode("[f(a={[1]: 2})]", bos=False, eos=False) + [llama3.tokenizer.eot_id]
    monkeypatch.setattr(loop, "select_next_token", Forced(ids))
    monkeypatch.setattr(batching, "select_next_token", Forced(ids))
    [result] = llama3.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=40)
    assert result["generation"]["content"] == "[f(a={[1]: 2})]" and result["generation"]["tool_calls"] == []


# ---------------------------------------------------------------- the interactive chat keeps the message (item 4)


def test_interactive_chat_keeps_the_structured_answer(llama3, monkeypatch):
    tok = llama3.tokenizer
    forced = Forced([tok.python_tag_id] + tok.encode("print(1)", bos=False, eos=False) + [tok.eom_id])
    monkeypatch.setattr(batching, "select_next_token", forced)  # the chat streams on the engine
    dialogs, stream = [], llama3.chat_completion_stream

    def recorded(dialog, *args, **kwargs):
        dialogs.append(dialog)
        forced.step = 0
        return stream(dialog, *args, **kwargs)

    monkeypatch.setattr(llama3, "chat_completion_stream", recorded)
    lines, out = iter(["run it", "again", "/exit"]), io.StringIO()
    chat_loop(llama3, temperature=0, max_gen_len=16, read=lambda prompt: next(lines), out=out)
    reply = dialogs[1][1]
    assert reply["content"] == "" and reply["stop_reason"] == "end_of_message"
    calls = [(c["tool_name"], c["arguments"]) for c in reply["tool_calls"]]
    assert calls == [("code_interpreter", {"code": "print(1)"})]
    text = out.getvalue()
    assert "<|python_tag|>" not in text and '[tool call: code_interpreter {"code": "print(1)"}]' in text


# ---------------------------------------------------------------- echo scores the dialog's prompt (item 6)


@pytest.mark.parametrize("generator_name", ["llama2", "llama3"])
def test_chat_completion_echo_scores_the_prompt(request, generator_name):
    generator: Llama = request.getfixturevalue(generator_name)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a llama?"}]
    prompt = generator.formatter.encode_dialog_prompt(dialog)
    [scored] = generator.chat_completion([dialog], max_gen_len=0, logprobs=True, echo=True)
    assert scored["tokens"] == [generator.tokenizer.decode([x]) for x in prompt]
    _, [expected] = generator.generate([prompt], max_gen_len=0, logprobs=True, echo=True)
    assert scored["logprobs"] == expected and len(expected) == len(prompt)
    assert scored["generation"]["content"] == ""

    # With an answer, echo only puts the prompt in front of the tokens and logprobs: the answer stays the same.
    plain = generator.chat_completion([dialog], temperature=0, max_gen_len=6, logprobs=True)[0]
    echoed = generator.chat_completion([dialog], temperature=0, max_gen_len=6, logprobs=True, echo=True)[0]
    assert echoed["generation"] == plain["generation"]
    assert echoed["tokens"] == scored["tokens"] + plain["tokens"]
    assert echoed["logprobs"][len(prompt) :] == plain["logprobs"]
    stop = [plain["generation"]["content"][2:4]] if len(plain["generation"]["content"]) >= 4 else ["zz"]
    stopped = generator.chat_completion([dialog], temperature=0, max_gen_len=6, stop=stop)[0]["generation"]
    echoed = generator.chat_completion([dialog], temperature=0, max_gen_len=6, stop=stop, echo=True)[0]["generation"]
    assert echoed == stopped


def test_llama2_format_is_unchanged_by_settled_content(tokenizer_path):
    fmt = Llama2ChatFormat(Tokenizer(tokenizer_path))
    assert fmt.settled_content("  [INST] x  ") == "  [INST] x  "
