"""The OpenAI-compatible server (llama.serve) on the built-in demo model (a Llama 2 family model), driven with the
real `openai` client and raw HTTP: answers equal the library's own, streams join to them, errors are OpenAI's
shape with a 4xx status, disconnects cancel, the command line starts, serves and stops cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import REPO

from llama import Llama
from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

openai = pytest.importorskip("openai", reason="install the test extra: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="install the test extra: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="install the test extra: pip install -e '.[test]'")

from llama.engine.batching import Engine, QueueFull  # noqa: E402
from llama.serve import ServerThread, create_app  # noqa: E402

MODEL = "llama-demo"
MAX_SEQ_LEN = 128
MAX_BODY = 64 * 1024
PROMPTS = ["A computer is", "The quick brown fox", "Life is like"]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a good life?"}]


@pytest.fixture(scope="module")
def generator() -> Llama:
    return Llama.build(str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), max_seq_len=MAX_SEQ_LEN, max_batch_size=4,
                       device="cpu", dtype=torch.float32)  # fmt: skip


@pytest.fixture(scope="module")
def engine(generator):
    engine = Engine.for_llama(generator)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def server(engine):
    """One server for the module, on a free loopback port; stopped whatever the tests do."""
    server = ServerThread(create_app(engine, model_name=MODEL, max_n=4, max_body_bytes=MAX_BODY)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Until the engine holds no request (a cancelled one ends at its next step)."""
    assert engine.wait_idle(timeout), f"{engine.running} requests still hold slots, {engine.waiting} wait"


# ---------------------------------------------------------------------------------------------- answers


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_greedy_completions_equal_text_completion(client, generator):
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0)
    expected = generator.text_completion(PROMPTS, temperature=0, max_gen_len=24)
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [e["generation"] for e in expected]
    assert {c.finish_reason for c in response.choices} == {"length"}
    assert response.model == MODEL and response.id and response.created > 0
    assert response.usage.completion_tokens == 3 * 24
    assert response.usage.prompt_tokens == sum(len(generator.tokenizer.encode(p, bos=True, eos=False)) for p in PROMPTS)


def test_token_id_prompts_and_stop_strings(client, generator):
    ids = generator.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, stop=["who"])
    [expected] = generator.text_completion(PROMPTS[:1], temperature=0, max_gen_len=24, stop=["who"])
    assert response.choices[0].text == expected["generation"]
    assert response.choices[0].finish_reason == "stop"


def test_streamed_completion_joins_to_the_answer_and_carries_usage(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_chat_equals_chat_completion_and_streams_join(client, generator):
    [expected] = generator.chat_completion([DIALOG], temperature=0, max_gen_len=40)
    response = client.chat.completions.create(model=MODEL, messages=DIALOG, max_completion_tokens=40, temperature=0)
    assert response.choices[0].message.content == expected["generation"]["content"]
    assert response.choices[0].message.role == "assistant" and response.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["generation"]["content"]
    assert chunks[-1].usage.total_tokens == response.usage.total_tokens


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=1.0, top_p=1.0, seed=1234)
    first = client.completions.create(**kwargs, n=3)
    again = client.completions.create(**kwargs, n=3)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3  # each choice has its own seed: seed + index
    assert client.completions.create(**kwargs).choices[0].text == texts[0]  # choice 0 is what n=1 gives
    chat = dict(model=MODEL, messages=DIALOG, max_tokens=16, temperature=1.0, seed=99, n=2)
    assert ([c.message.content for c in client.chat.completions.create(**chat).choices]
            == [c.message.content for c in client.chat.completions.create(**chat).choices])  # fmt: skip


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_prompt_scoring_equals_generate_max_gen_len_0(client, generator, max_tokens):
    """lm-eval's local-completions: echo + logprobs + max_tokens 0 or 1 gives the prompt's token logprobs."""
    tokens = generator.tokenizer.encode("The quick brown fox jumps over the lazy dog", bos=True, eos=False)
    _, [expected] = generator.generate([tokens], max_gen_len=0, logprobs=True, echo=True)
    response = client.completions.create(model=MODEL, prompt=tokens, max_tokens=max_tokens, echo=True, logprobs=1,
                                         temperature=0)  # fmt: skip
    logprobs = response.choices[0].logprobs
    n = len(tokens)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # OpenAI's shape
    assert logprobs.token_logprobs[1:n] == expected[1:]
    assert len(logprobs.tokens) == n + max_tokens
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    text = response.choices[0].text
    assert "".join(logprobs.tokens) == text and text.startswith(generator.tokenizer.decode(tokens))
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]


def test_chat_logprobs_use_the_chat_shape(client, generator):
    response = client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3)  # fmt: skip
    [expected] = generator.chat_completion([DIALOG], temperature=0, max_gen_len=8, logprobs=True)
    content = response.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(expected["logprobs"], abs=1e-5)
    assert "".join(e.token for e in content) == response.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-5 for e in content)
    assert all(bytes(e.bytes).decode() == e.token for e in content)


# ---------------------------------------------------------------------------------------------- errors


def post(server, path: str, body: str | bytes | dict, **headers) -> httpx.Response:
    data = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(f"{server.url}{path}", content=data, headers={"content-type": "application/json", **headers})


COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/completions", b'{"model": ', 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", b'{"model": "llama-demo", "prompt": "x", "temperature": NaN}', 400, "NaN"),
        ("/v1/completions", b'{"model": "llama-demo", "prompt": "x", "top_p": Infinity}', 400, "Infinity"),
        ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": True}, 400, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {**COMPLETION, "top_p": -0.5}, 400, "top_p"),
        ("/v1/completions", {**COMPLETION, "n": 5}, 400, "n must be"),
        ("/v1/completions", {**COMPLETION, "seed": 2**70}, 400, "seed"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 500}, 400, "maximum context length is 128"),
        ("/v1/completions", {**COMPLETION, "prompt": "word " * 200}, 400, "maximum context length is 128"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 10**9]}, 400, "outside the vocabulary"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt must be"),
        ("/v1/completions", {**COMPLETION, "prompt": "\ud800"}, 400, "prompt"),
        ("/v1/completions", {**COMPLETION, "stop": [""]}, 400, "stop"),
        ("/v1/completions", {**COMPLETION, "temprature": 0}, 400, "temprature"),
        ("/v1/completions", {**COMPLETION, "presence_penalty": 1}, 400, "not supported"),
        ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "does not exist"),
        ("/v1/completions", {"prompt": "x"}, 400, "model is required"),
        ("/v1/completions", b'{"model": "llama-demo", "prompt": "' + b"x" * MAX_BODY + b'"}', 413, "limit"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "4"}]}, 400, "role"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "needs logprobs"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
         "Llama 3.1"),
        ("/v1/nowhere", COMPLETION, 404, "Not Found"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_with_4xx(server, client, path, body, status, needle):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"], error
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices  # the server still serves


def test_the_official_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=DIALOG)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)


def test_a_full_queue_answers_429_with_retry_after(server, engine, monkeypatch):
    def full(*args, **kwargs):
        raise QueueFull("1024 requests are waiting")

    monkeypatch.setattr(engine, "submit", full)
    response = post(server, "/v1/completions", COMPLETION)
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_api_key_guards_every_route_but_health(engine):
    with ServerThread(create_app(engine, model_name=MODEL, api_key="s3cret")) as guarded:
        assert httpx.get(f"{guarded.url}/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            response = httpx.get(f"{guarded.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------------------------------------- disconnects


def spy_cancels(engine, monkeypatch) -> list[bool]:
    cancelled: list[bool] = []
    real = engine.cancel

    def cancel(request_id):
        cancelled.append(real(request_id))
        return cancelled[-1]

    monkeypatch.setattr(engine, "cancel", cancel)
    return cancelled


class SlowRows:
    """The engine's forward passes, each decode step made to take at least 10 ms, so a request runs long enough."""

    def __init__(self, rows):
        self.rows = rows

    def prefill(self, *args, **options):
        return self.rows.prefill(*args, **options)

    def decode(self, *args):
        time.sleep(0.01)
        return self.rows.decode(*args)


def test_a_client_that_disconnects_cancels_its_request(server, engine, monkeypatch):
    cancelled = spy_cancels(engine, monkeypatch)
    monkeypatch.setattr(engine, "forward", SlowRows(engine.forward))  # 120 tokens take over 1.2 s
    body = {"model": MODEL, "prompt": "A", "max_tokens": 120, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # generation has begun
    wait_idle(engine)
    assert True in cancelled  # cancelled while it ran, not finished
    cancelled.clear()
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
    wait_idle(engine)
    assert True in cancelled


def test_concurrent_streams_each_get_their_sequential_answer(client, generator, engine):
    """8 streaming clients at once, mixed lengths; half disconnect halfway, and their slots come back."""
    lengths = [5, 40, 12, 60, 8, 33, 20, 50]
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(len(lengths))]
    expected = [generator.text_completion([p], temperature=0, max_gen_len=n)[0]["generation"]
                for p, n in zip(prompts, lengths)]  # fmt: skip
    got: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                           stream=True)  # fmt: skip
        text = ""
        for k, chunk in enumerate(stream):
            text += chunk.choices[0].text
            if i % 2 and k == lengths[i] // 2:
                stream.close()  # disconnect halfway
                return
        got[i] = text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(lengths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {i: expected[i] for i in range(0, len(lengths), 2)}
    wait_idle(engine)
    assert client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=lengths[1],
                                     temperature=0).choices[0].text == expected[1]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the command line


def test_importing_llama_or_llama_serve_loads_no_web_framework():
    code = "import sys, llama, llama.serve; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('fastapi', 'uvicorn', 'starlette')))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_command_line_refuses_a_bad_flag_before_loading():
    out = subprocess.run([sys.executable, "-m", "llama.serve", "--prot", "80"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--prot" in out.stderr and "--port" in out.stderr


@pytest.mark.parametrize("ranks", [1, 2], ids=["python", "torchrun-2-ranks"])
def test_the_command_line_serves_the_demo_model_and_stops_cleanly_on_sigterm(generator, ranks):
    """Under torchrun, rank 0 serves HTTP and schedules while rank 1 follows its plans (Engine.follow): the
    answer is the one-process library's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]  # fmt: skip
    cmd = launcher + ["-m", "llama.serve", "--port", "0", "--max_seq_len", "64", "--max_batch_size", "2",
                      "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = ""
        while (match := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log)) is None:
            line = proc.stdout.readline()
            assert line, f"the server exited: {log}"
            log += line
        url = match.group(1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # uvicorn starts right after the line
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        answer = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0
        )
        assert answer.choices[0].text == generator.text_completion(PROMPTS[:1], temperature=0,
                                                                   max_gen_len=12)[0]["generation"]  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        # torchrun's own agent reports a SIGTERM as a failure (exit 1) after its ranks have ended cleanly
        assert proc.returncode == 0 or ranks > 1, log + rest
        assert "engine closed" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
