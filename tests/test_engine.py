"""The continuous-batching engine (issue 20): each request gets exactly what it gets alone through ``generate``,
whatever else runs, arrives, ends or is cancelled around it; bad requests fail alone."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

from llama import Llama
from llama.engine.batching import Engine, QueueFull
from llama.engine.requests import SamplingParams

PROMPTS = ["The quick brown fox", "Llamas live in", "Once upon a time there was", "A", "Numbers such as 12345 and"]


@pytest.fixture(scope="module")
def generator(make_checkpoint, tokenizer_path, build_generator) -> Llama:
    g = build_generator(make_checkpoint("gqa", seed=11), tokenizer_path, max_batch_size=3)
    with torch.no_grad():  # no byte pieces in greedy text (as tests/test_stream.py), so the text is readable
        g.model.output.weight[3:259] = 0.0
    return g


def engine_of(generator: Llama, **options) -> Engine:
    """An engine stepped by the test itself (no thread), so arrivals land at chosen steps."""
    return Engine.for_llama(generator, background=False, **options)


def alone(generator: Llama, prompt: list[int], max_gen_len: int, **kwargs) -> tuple[list[int], list[float]]:
    """The request run alone through Meta's generate: its tokens and logprobs."""
    tokens, logprobs = generator.generate([prompt], max_gen_len, temperature=0, logprobs=True, **kwargs)
    return tokens[0], logprobs[0]


def encode(generator: Llama, text: str) -> list[int]:
    return generator.tokenizer.encode(text, bos=True, eos=False)


def run_until_done(engine: Engine, handles, arrivals=None, cancels=None, limit=500) -> int:
    """Step the engine until every handle is done; arrivals {step: [(prompt, params)]} are submitted at their step,
    cancels {step: [handle index]} cancelled then. Returns the steps taken."""
    arrivals, cancels = arrivals or {}, cancels or {}
    for step in range(limit):
        for prompt, params in arrivals.pop(step, []):
            handles.append(engine.submit(prompt, params))
        for i in cancels.pop(step, []):
            handles[i].cancel()
        if not engine.step() and not arrivals and all(h.done for h in handles):
            return step
    raise AssertionError("the engine did not finish")


def assert_same_logprobs(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    assert max((abs(a - b) for a, b in zip(got, expected)), default=0.0) <= 1e-5


# ---------------------------------------------------------------- exact per request


@pytest.mark.parametrize("chunk", [4, 128], ids=["chunked_prefill", "whole_prefill"])
def test_staggered_requests_equal_each_run_alone(generator, chunk):
    prompts = [encode(generator, p) for p in PROMPTS]
    lengths = [12, 5, 20, 9, 16]
    expected = [alone(generator, p, n) for p, n in zip(prompts, lengths)]
    engine = engine_of(generator, prefill_chunk=chunk)
    params = [SamplingParams(temperature=0, max_gen_len=n, logprobs=True) for n in lengths]
    handles = [engine.submit(prompts[0], params[0])]
    # more requests than slots (3): the last ones wait, then take the slots that free up
    arrivals = {1: [(prompts[1], params[1])], 3: [(prompts[2], params[2]), (prompts[3], params[3])],
                4: [(prompts[4], params[4])]}  # fmt: skip
    run_until_done(engine, handles, arrivals)
    for handle, (tokens, logprobs) in zip(handles, expected):
        result = handle.result()
        assert result.tokens == tokens
        assert_same_logprobs(result.logprobs, logprobs)
        assert result.finish_reason == "length" and result.usage.completion_tokens == len(tokens)


def test_a_prompt_within_one_chunk_is_bitwise_the_reference(generator):
    """Prefilled whole and decoded alone, a request computes what generate does, to the bit."""
    prompt = encode(generator, PROMPTS[2])
    tokens, logprobs = alone(generator, prompt, 10)
    engine = engine_of(generator)
    handle = engine.submit(prompt, SamplingParams(temperature=0, max_gen_len=10, logprobs=True))
    run_until_done(engine, [handle])
    assert handle.result().tokens == tokens and handle.result().logprobs == logprobs


def test_cancelled_requests_free_their_slots_and_leave_the_others_exact(generator):
    prompts = [encode(generator, p) for p in PROMPTS[:4]]
    expected = [alone(generator, p, 14) for p in prompts]
    engine = engine_of(generator, prefill_chunk=3)
    params = SamplingParams(temperature=0, max_gen_len=14, logprobs=True)
    handles = [engine.submit(p, params) for p in prompts]  # the fourth waits for a slot
    run_until_done(engine, handles, cancels={2: [0], 5: [3]})
    results = [h.result() for h in handles]
    assert [r.finish_reason for r in results] == ["cancelled", "length", "length", "cancelled"]
    assert len(results[0].tokens) < 14
    for result, (tokens, logprobs) in zip(results[1:3], expected[1:3]):
        assert result.tokens == tokens
        assert_same_logprobs(result.logprobs, logprobs)
    assert handles[0].cancel() is False  # cancelling twice is harmless
    assert not engine._active and not engine._waiting and not engine._requests


def test_stop_strings_and_stop_ids_end_a_request_as_text_completion_does(generator):
    plain = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30)[0]["generation"]
    stop = plain[len(plain) // 2 : len(plain) // 2 + 3]
    expected = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30, stop=[stop])[0]["generation"]
    engine = engine_of(generator)
    handle = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_gen_len=30, stop=[stop]))
    run_until_done(engine, [handle])
    result = handle.result()
    assert (result.text, result.finish_reason, result.stop_string) == (expected, "stop", stop)
    assert "".join(o.text for o in handle) == expected


def test_echo_and_scoring_equal_generate(generator):
    prompt = encode(generator, PROMPTS[4])
    tokens, logprobs = generator.generate([prompt], max_gen_len=0, logprobs=True, echo=True)
    engine = engine_of(generator, prefill_chunk=3)
    handle = engine.submit(prompt, SamplingParams(max_gen_len=0, logprobs=True, echo=True, top_logprobs=2))
    run_until_done(engine, [handle])
    result = handle.result()
    assert result.tokens == tokens[0] and result.finish_reason == "length"
    assert result.logprobs[0] == 0.0 and result.top_logprobs[0] == []
    assert_same_logprobs(result.logprobs, logprobs[0])
    for (_, best), lp in zip((t[0] for t in result.top_logprobs[1:]), result.logprobs[1:]):
        assert best >= lp - 1e-6  # the top alternative is at least as likely as the prompt's token

    gen_tokens, gen_logprobs = generator.generate([prompt], 6, temperature=0, logprobs=True, echo=True)
    handle = engine.submit(prompt, SamplingParams(temperature=0, max_gen_len=6, logprobs=True, echo=True))
    run_until_done(engine, [handle])
    assert handle.result().tokens == gen_tokens[0]
    assert_same_logprobs(handle.result().logprobs, gen_logprobs[0])
    text = generator.text_completion([PROMPTS[4]], temperature=0, max_gen_len=6, echo=True)[0]["generation"]
    assert handle.result().text == text


def test_seeded_sampling_is_the_same_however_requests_interleave(generator):
    prompt = encode(generator, PROMPTS[1])
    torch.manual_seed(77)
    reference = generator.generate([prompt], 16, temperature=1.0, top_p=0.95)[0][0]  # the global generator
    params = SamplingParams(temperature=1.0, top_p=0.95, max_gen_len=16, seed=77)
    engine = engine_of(generator)
    alone_handle = engine.submit(prompt, params)
    run_until_done(engine, [alone_handle])
    others = SamplingParams(temperature=1.0, max_gen_len=16)
    handles = [engine.submit(encode(generator, PROMPTS[0]), others)]
    run_until_done(engine, handles, arrivals={2: [(prompt, params)], 3: [(encode(generator, PROMPTS[3]), others)]})
    assert alone_handle.result().tokens == handles[1].result().tokens == reference


def test_a_chat_request_answers_as_chat_completion(generator):
    dialog = [{"role": "user", "content": "What is a llama?"}]
    expected = generator.chat_completion([dialog], temperature=0, max_gen_len=12)[0]["generation"]
    engine = engine_of(generator)
    handle = engine.submit_chat(dialog, SamplingParams(temperature=0, max_gen_len=12))
    run_until_done(engine, [handle])
    assert handle.result().message == expected


# ---------------------------------------------------------------- threads, asyncio, the background thread


def test_threads_and_asyncio_each_get_their_own_answer(generator):
    expected = [generator.text_completion([p], temperature=0, max_gen_len=10)[0]["generation"] for p in PROMPTS]
    with Engine.for_llama(generator) as engine:
        params = SamplingParams(temperature=0, max_gen_len=10)
        got: dict[int, str] = {}

        def client(i: int) -> None:
            got[i] = "".join(o.text for o in engine.submit(PROMPTS[i], params))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()

        async def async_clients() -> list[str]:
            async def one(i: int) -> str:
                handle = engine.submit(PROMPTS[i], params)
                return "".join([o.text async for o in handle])

            return await asyncio.gather(one(3), one(4))

        got[3], got[4] = asyncio.run(async_clients())
        for t in threads:
            t.join()
    assert [got[i] for i in range(5)] == expected


def test_many_requests_leave_nothing_behind(generator):
    """A soak: hundreds of short requests through the background thread; every one ends, nothing is kept."""
    with Engine.for_llama(generator, prefill_chunk=8) as engine:
        params = [SamplingParams(temperature=t, max_gen_len=n, seed=s) for s, (t, n) in
                  enumerate([(0, 2), (0.8, 3), (0, 1), (1.0, 2)] * 50)]  # fmt: skip
        handles = [engine.submit(PROMPTS[i % 5], p) for i, p in enumerate(params)]
        results = [h.result(timeout=120) for h in handles]
        assert engine.wait_idle(timeout=10)
        assert all(r.finish_reason in ("length", "stop") for r in results)
        assert not engine._active and not engine._waiting and not engine._requests


# ---------------------------------------------------------------- bad requests fail alone


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: SamplingParams(temperature=math.nan), ValueError, "temperature"),
        (lambda: SamplingParams(temperature=-1), ValueError, "temperature"),
        (lambda: SamplingParams(top_p=2), ValueError, "top_p"),
        (lambda: SamplingParams(max_gen_len=-1), ValueError, "max_gen_len"),
        (lambda: SamplingParams(top_logprobs=21), ValueError, "top_logprobs"),
        (lambda: SamplingParams(logprobs="yes"), TypeError, "logprobs"),
        (lambda: SamplingParams(stop="x"), TypeError, "stop"),
        (lambda: SamplingParams(seed=2**70), ValueError, "seed"),
    ],
)
def test_bad_sampling_params_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(
    "prompt, max_gen_len, error, message",
    [
        ([], 4, ValueError, "empty"),
        ([1, 10**6], 4, ValueError, "outside the vocabulary"),
        ([1, -3], 4, ValueError, "outside the vocabulary"),
        ([1, 2.5], 4, TypeError, "integers"),
        (5, 4, TypeError, "token ids"),
        ([1] * 65, 0, ValueError, "more than max_seq_len=64"),
        ([1] * 60, 10, ValueError, "ask for at most 4 tokens"),
    ],
)
def test_bad_requests_fail_alone_and_the_engine_goes_on(generator, prompt, max_gen_len, error, message):
    engine = engine_of(generator)
    good = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_gen_len=4))
    with pytest.raises(error, match=message):
        engine.submit(prompt, SamplingParams(temperature=0, max_gen_len=max_gen_len))
    run_until_done(engine, [good])
    assert good.result().tokens == alone(generator, encode(generator, PROMPTS[0]), 4)[0]


def test_cancel_of_unknown_ids_and_duplicate_ids(generator):
    engine = engine_of(generator)
    with pytest.raises(KeyError, match="no request with id 'nope'"):
        engine.cancel("nope")
    handle = engine.submit(PROMPTS[0], SamplingParams(max_gen_len=2), request_id="mine")
    with pytest.raises(ValueError, match="already running"):
        engine.submit(PROMPTS[1], request_id="mine")
    run_until_done(engine, [handle])
    assert engine.cancel("mine") is False  # finished: cancelling it is not an error


def test_misuse_of_the_engine_is_refused_with_the_fix_named(generator):
    from llama.engine.batching import EngineClosed

    for option in ({"prefill_chunk": 0}, {"max_waiting": 1.5}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            engine_of(generator, **option)
    engine = engine_of(generator)
    with pytest.raises(TypeError, match="request_id must be a non-empty str"):
        engine.submit(PROMPTS[0], request_id=7)
    handle = engine.submit(PROMPTS[0], SamplingParams(max_gen_len=2))
    with pytest.raises(TimeoutError, match="has not finished after 0.01 s"):
        handle.result(timeout=0.01)  # nobody steps this engine
    engine.close()
    assert handle.result().finish_reason == "cancelled"
    with pytest.raises(EngineClosed, match="no more requests"):
        engine.submit(PROMPTS[0])
    no_chat = Engine(generator.model, generator.tokenizer, background=False)
    with pytest.raises(TypeError, match="no chat format"):
        no_chat.submit_chat([{"role": "user", "content": "hi"}])


def test_only_the_background_thread_steps_a_started_engine(generator):
    with Engine.for_llama(generator) as engine:
        engine.start()
        with pytest.raises(RuntimeError, match="background thread runs its steps"):
            engine.step()


def test_prompt_chunks_ask_for_every_position_only_when_the_prompt_is_scored(generator):
    """A chunk's logits are needed at every position only with echo and logprobs; otherwise the plan asks for the
    last position's alone (the fast path then skips the output layer for the others)."""
    engine = engine_of(generator, prefill_chunk=4)
    asked = []
    rows = engine.forward

    class Recording:
        def prefill(self, tokens, slot, start, last_only=False):
            asked.append(last_only)
            return rows.prefill(tokens, slot, start, last_only=last_only)

        def decode(self, *args):
            return rows.decode(*args)

    engine.forward = Recording()
    plain = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_gen_len=2))
    run_until_done(engine, [plain])
    assert asked and all(asked)  # every chunk: the last position only
    asked.clear()
    scored = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_gen_len=2, echo=True, logprobs=True))
    run_until_done(engine, [scored])
    assert asked and not any(asked)
    assert len(scored.result().logprobs) == len(scored.result().tokens)  # the prompt's tokens scored too


def test_fast_prefill_into_a_slot_refuses_what_is_not_one_row_in_the_cache(tiny_args):
    from helpers import random_model

    from llama.engine.fast import FastDecoder

    fast = FastDecoder(random_model(tiny_args("gqa", max_batch_size=2)), compile=False)
    with pytest.raises(ValueError, match="one row into one of the cache's 2 slots"):
        fast.prefill(torch.ones(1, 4, dtype=torch.long), 0, slot=2)
    with pytest.raises(ValueError, match="got 2 rows"):
        fast.prefill(torch.ones(2, 4, dtype=torch.long), 0, slot=0)


def test_a_full_queue_is_refused_with_queue_full(generator):
    engine = engine_of(generator, max_waiting=2)
    handles = [engine.submit(PROMPTS[0], SamplingParams(max_gen_len=2)) for _ in range(2)]
    with pytest.raises(QueueFull, match="max_waiting=2"):
        engine.submit(PROMPTS[0])
    run_until_done(engine, handles)
    engine.submit(PROMPTS[0], SamplingParams(max_gen_len=1))  # room again


def test_a_failing_step_fails_its_requests_and_the_engine_serves_the_next(generator, monkeypatch):
    engine = engine_of(generator)
    handle = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_gen_len=5))

    def broken(*args):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(engine.forward, "decode", broken)
    run_until_done(engine, [handle])
    with pytest.raises(RuntimeError, match="fell over"):
        handle.result()
    monkeypatch.undo()
    again = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_gen_len=5))
    run_until_done(engine, [again])
    assert again.result().tokens == alone(generator, encode(generator, PROMPTS[0]), 5)[0]
    # the KV cache's lock is free again: a batch call runs
    generator.generate([encode(generator, PROMPTS[1])], 2)


def test_a_dropped_handle_cancels_its_request(generator):
    engine = engine_of(generator)
    engine.submit(PROMPTS[0], SamplingParams(max_gen_len=30))  # the handle is dropped at once
    engine.step()
    assert not engine._active and not engine._requests


# ---------------------------------------------------------------- the fast path's rows


@pytest.mark.parametrize(
    "dtype, quantize, compile",
    [("float32", None, False), ("float32", None, True), ("bfloat16", None, False), ("float32", "int8", False)],
    ids=["fp32-row-step", "fp32-compiled-row-step", "bf16-c-step", "int8-c-step"],
)
def test_fast_path_rows_equal_the_fast_path_alone(tiny_args, tokenizer_path, dtype, quantize, compile):
    """The fast path's prefill into a slot and its row step (the C step with per-row slots and positions where it
    serves, else the compiled or eager row step) give each request what the fast path gives it alone."""
    from helpers import random_model

    from llama import Tokenizer
    from llama.engine.fast import FastDecoder
    from llama.quant.linear import quantize_model
    from llama.quant.scheme import Scheme

    tokenizer = Tokenizer(tokenizer_path)
    model = random_model(tiny_args("gqa", vocab_size=tokenizer.n_words, max_batch_size=3), seed=3)
    with torch.no_grad():
        model.output.weight[3:259] = 0.0
    model = model.to(getattr(torch, dtype))
    if quantize:
        model = quantize_model(model, Scheme(quantize, 16))
    eager = Llama(model, tokenizer, fast=FastDecoder(model, compile=False))
    prompts = [encode(eager, p) for p in PROMPTS[:4]]
    expected = [alone(eager, p, 12) for p in prompts]  # (not compiled: the compiled step's own test is test_fast's)
    fast = FastDecoder(model, compile=compile)
    assert (fast.cpu_step is not None) == (dtype == "bfloat16" or quantize is not None)
    generator = Llama(model, tokenizer, fast=fast)
    engine = engine_of(generator, prefill_chunk=3)
    params = SamplingParams(temperature=0, max_gen_len=12, logprobs=True)
    handles = [engine.submit(prompts[0], params)]
    run_until_done(engine, handles, arrivals={2: [(p, params) for p in prompts[1:]]})
    for handle, (tokens, logprobs) in zip(handles, expected):
        assert handle.result().tokens == tokens
        assert_same_logprobs(handle.result().logprobs, logprobs)
