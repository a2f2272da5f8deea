"""The server with Llama 3's chat format: greedy chat answers of a tiny random Llama 3 model equal
chat_completion's, and tools in Meta's JSON format (auto, none, required, a named function; tool results sent
back) with an engine that answers a scripted text, so that the model's answer is a known tool call."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import META_TOKENIZER, init_random_

openai = pytest.importorskip("openai", reason="install the test extra: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="install the test extra: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="install the test extra: pip install -e '.[test]'")

from llama.engine.batching import Engine  # noqa: E402
from llama.engine.requests import Outbox, RequestHandle, Result, StepOutput, Usage  # noqa: E402
from llama.model import Llama3Transformer, ModelArgs  # noqa: E402
from llama.serve import ServerThread, create_app  # noqa: E402
from llama.weights import checkpoint  # noqa: E402
from llama.weights.layout import Layout  # noqa: E402

MODEL = "llama3-tiny"
# Llama 3.1's params.json keys, shrunk.
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}  # fmt: skip
DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a llama."}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": CITY}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, build_generator):
    args = ModelArgs.from_params(PARAMS, max_seq_len=128, max_batch_size=2)
    model = init_random_(Llama3Transformer(args), 0).eval()
    folder = tmp_path_factory.mktemp("l3") / "mp1"
    shards = Layout.from_model(model).split_state_dict(model.state_dict(), 1)
    checkpoint.save_checkpoint(folder, shards, PARAMS, [META_TOKENIZER])
    return build_generator(folder, max_seq_len=128, max_batch_size=2)


@pytest.fixture(scope="module")
def real_client(llama3):
    engine = Engine.for_llama(llama3)
    server = ServerThread(create_app(engine, model_name=MODEL)).start()
    try:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    finally:
        server.stop()
        engine.close()


def test_greedy_llama3_chat_equals_chat_completion(real_client, llama3):
    [expected] = llama3.chat_completion([DIALOG], temperature=0, max_gen_len=20)
    response = real_client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=20, temperature=0)
    assert response.choices[0].message.content == expected["generation"]["content"]
    chunks = real_client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=20, temperature=0,
                                                 stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["generation"]["content"]


# ---------------------------------------------------------------------------------------------- tools


class ScriptedEngine:
    """Stands in for the engine: every request's answer is `answer` (then <|eom_id|>), streamed token by token;
    the prompts it was given are kept."""

    def __init__(self, tokenizer, formatter):
        self.tokenizer, self.formatter = tokenizer, formatter
        self.params = SimpleNamespace(max_seq_len=4096, vocab_size=tokenizer.n_words)
        self.answer = ""
        self.prompts: list[list[int]] = []

    def submit(self, prompt, params=None, *, request_id=None):
        return self._answer(list(prompt), None)

    def submit_chat(self, dialog, params=None, *, request_id=None):
        return self._answer(self.formatter.encode_dialog_prompt(dialog), self.formatter)

    def cancel(self, request_id):
        return False

    def _answer(self, prompt, formatter):
        self.prompts.append(prompt)
        box = Outbox()
        handle = RequestHandle(self, f"scripted-{len(self.prompts)}", box)
        tokens = self.tokenizer.encode(self.answer, bos=False, eos=False)
        text = ""
        for i, token in enumerate(tokens):
            now = self.tokenizer.decode(tokens[: i + 1])
            box.push(StepOutput(token, now[len(text) :]))
            text = now
        eom = self.tokenizer.special_tokens["<|eom_id|>"]
        message = formatter.decode_answer(text, formatter.stop_reason(eom)) if formatter else None
        box.finish(Result(handle.id, prompt, tokens, text, "stop", Usage(len(prompt), len(tokens) + 1),
                              stop_id=eom, message=message))  # fmt: skip
        return handle


@pytest.fixture(scope="module")
def scripted(llama3_tokenizer, llama3_format):
    engine = ScriptedEngine(llama3_tokenizer, llama3_format)
    server = ServerThread(create_app(engine, model_name=MODEL)).start()
    try:
        yield engine, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), server
    finally:
        server.stop()


def last_prompt(engine) -> str:
    return engine.tokenizer.decode(engine.prompts[-1])


def test_auto_tool_call_in_metas_json_format(scripted):
    engine, client, _ = scripted
    engine.answer = '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = last_prompt(engine)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    assert '"name": "get_weather"' in prompt and '"name": "get_time"' in prompt
    assert prompt.endswith("Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_streamed_tool_calls_have_the_shape_the_client_parses(scripted):
    engine, client, _ = scripted
    engine.answer = '<|python_tag|>{"type": "function", "name": "get_time", "parameters": {}}'
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the call never streams as text
    [call] = [t for d in deltas for t in d.tool_calls or []]
    assert call.index == 0 and call.id and call.function.name == "get_time" and call.function.arguments == "{}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_named_and_required_tool_choice_begin_the_call_for_the_model(scripted):
    engine, client, _ = scripted
    engine.answer = ' {"city": "Rome"}}'  # what the model adds after the forced beginning
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named)
    assert last_prompt(engine).endswith('\n\n{"type": "function", "name": "get_weather", "parameters":')
    assert "You must call the function get_weather." in last_prompt(engine)
    [call] = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}

    engine.answer = 'get_time", "parameters": {}}'
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required")  # fmt: skip
    assert last_prompt(engine).endswith('\n\n{"type": "function", "name": "')
    assert response.choices[0].message.tool_calls[0].function.name == "get_time"

    engine.answer = "I would rather not."  # not a call after all: returned as text, never a made-up call
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required")
    assert response.choices[0].message.tool_calls is None and response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == '{"type": "function", "name": "I would rather not.'


def test_tool_choice_none_and_unknown_functions_answer_with_text(scripted):
    engine, client, _ = scripted
    call = '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'
    engine.answer = call
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert response.choices[0].message.content == call and response.choices[0].finish_reason == "stop"
    assert "Environment: ipython" not in last_prompt(engine) and "get_weather" not in last_prompt(engine)
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[TIME])  # get_weather not offered
    assert response.choices[0].message.content == call and response.choices[0].message.tool_calls is None
    engine.answer = "  It is sunny.  "
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])
    assert response.choices[0].message.content == "It is sunny." and response.choices[0].finish_reason == "stop"


def test_tool_results_go_back_in_the_ipython_role(scripted):
    engine, client, _ = scripted
    engine.answer = "It is 21 degrees in Paris."
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]  # fmt: skip
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert response.choices[0].message.content == "It is 21 degrees in Paris."
    prompt = last_prompt(engine)
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"type": "function", "name": "get_weather", '
            '"parameters": {"city": "Paris"}}<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>'
            in prompt)  # fmt: skip


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER]}, "twice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "arguments"),
    ],
)  # fmt: skip
def test_bad_tools_are_400s(scripted, extra, needle):
    _, _, server = scripted
    body = {"model": MODEL, "messages": ASK, **extra}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text


def test_the_tiny_model_fits_the_scripted_engines_vocabulary(llama3, llama3_tokenizer):
    """The scripted engine stands in for the real one: same tokenizer, same chat format."""
    assert llama3.tokenizer.n_words == llama3_tokenizer.n_words == PARAMS["vocab_size"]
    assert type(llama3.formatter).__name__ == "Llama3ChatFormat" and torch.is_tensor(llama3.model.output.weight)
