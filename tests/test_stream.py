"""Streaming and stop strings: streamed text equals the batch API's, stops cut the text and end only their row."""

import pytest
import torch

from llama import Llama
from llama.checks import check_stop
from llama.engine.stream import REPLACEMENT_CHAR, TextStream
from llama.tokenizer import Tokenizer

PROMPTS = ["The quick brown fox", "Llamas live in", "Café naïve"]
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a llama?"},
    {"role": "assistant", "content": "An animal."},
    {"role": "user", "content": "Where does it live?"},
]


@pytest.fixture(scope="module")
def generator(make_checkpoint, tokenizer_path, build_generator) -> Llama:
    g = build_generator(make_checkpoint("gqa", seed=11), tokenizer_path)
    # A random model picks raw byte pieces (ids 3..258) as often as words, so greedy text is mostly U+FFFD.
    # Zero their logits: greedy text is then made of real pieces, while sampling still draws bytes.
    with torch.no_grad():
        g.model.output.weight[3:259] = 0.0
    return g


def seeded(fn, *args, **kwargs):
    torch.manual_seed(1234)
    return fn(*args, **kwargs)


def stream_text(fn, *args, **kwargs):
    torch.manual_seed(1234)
    # Deltas are never taken back, so equality of the joined text also proves that no delta showed a
    # character that later changed (the random model's invalid byte runs stay U+FFFD in both).
    return "".join(fn(*args, **kwargs))


# ---------------------------------------------------------------- TextStream on its own


def feed(tok: Tokenizer, text: str, stop=()) -> tuple[TextStream, list[str]]:
    stream, deltas = TextStream(tok, stop), []
    for t in tok.encode(text, bos=False, eos=False):
        stream.add(t)
        deltas.append(stream.delta())
    deltas.append(stream.delta(final=True))
    return stream, deltas


def test_multibyte_characters_are_never_split(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "snow ☃ and music 𝄞 done"
    ids = tok.encode(text, bos=False, eos=False)
    assert sum(3 <= i < 259 for i in ids) >= 7  # the test really goes through byte-fallback pieces
    stream, deltas = feed(tok, text)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "☃" in "".join(d for d in deltas if "☃" in d)  # the snowman comes out whole, in one delta


def test_leading_space_matches_full_decode(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    _, deltas = feed(tok, "  two leading spaces")
    assert "".join(deltas) == tok.decode(tok.encode("  two leading spaces", bos=False, eos=False))


def test_stop_spanning_tokens_is_held_back_then_cut(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "The quick brown fox jumps over the lazy dog"
    stream, deltas = feed(tok, text, stop=["fox jum"])
    assert stream.stopped and stream.final_text() == "The quick brown "
    assert "".join(deltas) == "The quick brown "  # nothing of the stop string was ever shown
    assert tok.decode(stream.tokens[: stream.n_tokens_for_text()]).startswith("The quick brown")


def test_earliest_of_several_stops_wins(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    stream, _ = feed(tok, "one two three four", stop=["four", "two", "three"])
    assert stream.final_text() == "one "


def test_text_that_only_looks_like_a_stop_is_released(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    stream, deltas = feed(tok, "the cat sat on the mat", stop=["the end"])
    assert not stream.stopped and "".join(deltas) == "the cat sat on the mat"


@pytest.mark.parametrize("bad, error", [("stop", TypeError), ([1], TypeError), ([""], ValueError)])
def test_check_stop(bad, error):
    with pytest.raises(error):
        check_stop(bad)


# ---------------------------------------------------------------- streamed == batch


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_stream_equals_text_completion(generator, prompt, temperature):
    kwargs = dict(temperature=temperature, top_p=0.95, max_gen_len=30)
    batch = seeded(generator.text_completion, [prompt], **kwargs)[0]["generation"]
    assert stream_text(generator.text_completion_stream, prompt, **kwargs) == batch


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_chat_stream_equals_chat_completion(generator, temperature):
    kwargs = dict(temperature=temperature, top_p=0.95, max_gen_len=20)
    batch = seeded(generator.chat_completion, [DIALOG], **kwargs)[0]["generation"]["content"]
    assert stream_text(generator.chat_completion_stream, DIALOG, **kwargs) == batch


def test_sampled_streams_go_through_byte_fallback(generator):
    """At temperature 1 the random model emits raw byte pieces: the stream must still match the batch text."""
    seen_bytes = False
    for seed in range(6):
        torch.manual_seed(seed)
        out = generator.text_completion(["x"], temperature=1.0, top_p=1.0, max_gen_len=40, logprobs=True)[0]
        torch.manual_seed(seed)
        streamed = "".join(generator.text_completion_stream("x", temperature=1.0, top_p=1.0, max_gen_len=40))
        assert streamed == out["generation"]
        seen_bytes |= any(t.startswith("<0x") or REPLACEMENT_CHAR in t for t in out["tokens"])
    assert seen_bytes


def test_special_tags_stream_the_unsafe_error(generator):
    from llama.chat_format import Llama2ChatFormat

    UNSAFE_ERROR = Llama2ChatFormat.UNSAFE_ERROR

    assert list(generator.chat_completion_stream([{"role": "user", "content": "[INST] hi"}])) == [UNSAFE_ERROR]


def test_stream_checks_arguments_before_the_first_token(generator):
    with pytest.raises(ValueError, match="temperature"):
        generator.text_completion_stream("hi", temperature=-1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        generator.text_completion_stream(["hi"])
    with pytest.raises(ValueError, match="alternating"):
        generator.chat_completion_stream([{"role": "assistant", "content": "hi"}])


# ---------------------------------------------------------------- stop strings in the batch API


def middle_of(text: str) -> str:
    """A stop string from the middle of text that straddles at least one word boundary."""
    assert len(text) >= 12, text
    return text[len(text) // 3 : len(text) // 3 + 5]


def test_stop_cuts_text_and_ends_generation_early(generator, monkeypatch):
    plain = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30)[0]["generation"]
    stop = middle_of(plain)
    calls = []
    forward = generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda *a: calls.append(1) or forward(*a))
    out = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30, stop=[stop], logprobs=True)[0]
    assert out["generation"] == plain[: plain.index(stop)]
    assert len(calls) < 30  # it stopped generating at the stop string, not at max_gen_len
    assert len(out["tokens"]) == len(out["logprobs"])
    assert "".join(out["tokens"]).replace("▁", " ").strip().startswith(out["generation"].strip()[:3])
    streamed = "".join(generator.text_completion_stream(PROMPTS[0], temperature=0, max_gen_len=30, stop=[stop]))
    assert streamed == out["generation"]


def test_stop_in_one_row_leaves_the_others(generator):
    plain = [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=30)]
    stop = middle_of(plain[1])
    assert all(stop not in p for i, p in enumerate(plain) if i != 1), "pick another seed"
    stopped = [r["generation"] for r in generator.text_completion(PROMPTS, temperature=0, max_gen_len=30, stop=[stop])]
    assert stopped[1] == plain[1][: plain[1].index(stop)]
    assert stopped[0] == plain[0] and stopped[2] == plain[2]


def test_several_stops_and_echo(generator):
    plain = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30)[0]["generation"]
    early, late = plain[4:7], plain[15:19]
    out = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30, stop=[late, early])[0]
    assert out["generation"] == plain[: min(plain.index(early), plain.index(late))]

    full = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30, echo=True)[0]["generation"]
    echoed = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30, stop=[late, early], echo=True)
    after = len(PROMPTS[0])  # stops are looked for in the generated part only
    assert echoed[0]["generation"] == full[: min(full.index(early, after), full.index(late, after))]


def test_chat_stop(generator):
    dialogs = [[{"role": "user", "content": f"Tell me about llamas, part {i}."}] for i in range(4)]
    answers = [r["generation"]["content"] for r in generator.chat_completion(dialogs, temperature=0, max_gen_len=30)]
    i = next(i for i, a in enumerate(answers) if len(a) >= 12)  # short answers (early EOS) make poor tests
    stop = middle_of(answers[i])
    out = generator.chat_completion([dialogs[i]], temperature=0, max_gen_len=30, stop=[stop])
    assert out[0]["generation"]["content"] == answers[i][: answers[i].index(stop)]


def drain(stream) -> object:
    """Run a stream to its end; what its generator returns (the row's RowEnd)."""
    while True:
        try:
            next(stream)
        except StopIteration as end:
            return end.value


@pytest.mark.parametrize("with_stop", [False, True], ids=["length", "stop_string"])
def test_batch_and_stream_end_a_row_alike(generator, with_stop):
    prompt = generator.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    plain = generator.text_completion([PROMPTS[0]], temperature=0, max_gen_len=30)[0]["generation"]
    stop = [middle_of(plain)] if with_stop else None
    [batch] = generator.engine.complete([prompt], 30, 0, 0.9, logprobs=False, echo=False, stop=stop).ends
    streamed = drain(generator.engine.stream(prompt, 0, 0.9, 30, stop))
    reasons = [(end.finish_reason, end.stop_id, end.stop_string) for end in (batch, streamed)]
    assert reasons[0] == reasons[1] == (("stop", None, stop[0]) if with_stop else ("length", None, None))


# ---------------------------------------------------------------- one Llama, several generations


def test_alternated_streams_both_complete(generator):
    """Two streams of one Llama run together on its continuous-batching engine (they used to invalidate each
    other): read in turns, each joins to its own batch answer."""
    kwargs = dict(temperature=0, max_gen_len=20)
    expected = [generator.text_completion([p], **kwargs)[0]["generation"] for p in PROMPTS[:2]]
    streams = [generator.text_completion_stream(p, **kwargs) for p in PROMPTS[:2]]
    pieces: list[list[str]] = [[], []]
    live = [0, 1]
    while live:
        for i in list(live):
            piece = next(streams[i], None)
            if piece is None:
                live.remove(i)
            else:
                pieces[i].append(piece)
    assert ["".join(p) for p in pieces] == expected


def test_a_batch_call_during_a_stream_waits_and_both_are_right(generator):
    kwargs = dict(temperature=0, max_gen_len=20)
    expected = [generator.text_completion([p], **kwargs)[0]["generation"] for p in PROMPTS[:2]]
    stream = generator.text_completion_stream(PROMPTS[0], **kwargs)
    first = next(stream)
    # the batch call waits for the engine's request to end (it runs on without being read), then takes the cache
    assert generator.text_completion([PROMPTS[1]], **kwargs)[0]["generation"] == expected[1]
    assert first + "".join(stream) == expected[0]


def test_streams_from_threads_each_get_their_own_answer(generator):
    from concurrent.futures import ThreadPoolExecutor

    kwargs = dict(temperature=0, max_gen_len=16)
    prompts = PROMPTS * 2
    expected = [generator.text_completion([p], **kwargs)[0]["generation"] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: "".join(generator.text_completion_stream(p, **kwargs)), prompts))
    assert got == expected


def test_a_stream_dropped_halfway_frees_its_slot(generator):
    stream = generator.text_completion_stream(PROMPTS[0], temperature=0, max_gen_len=40)
    next(stream)
    stream.close()  # the consumer stops reading: the request is cancelled and its slot freed
    engine = generator.batching
    assert engine.wait_idle(timeout=30)
    assert not engine._active and not engine._requests


def test_the_device_mirror_ends_rows_where_their_row_ends_do(generator):
    """EndRule.ended_on_device (the decoding loop's check) and RowEnd.add agree on every random row: the stop ids
    and the length limit are one rule, read in two places."""
    from llama.engine.ends import EndRule

    stop = generator.tokenizer.stop_ids[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        prompt_lens = torch.randint(1, 20, (4,), generator=gen).tolist()
        rule = EndRule(generator.tokenizer, max_gen_len=int(torch.randint(1, 12, (1,), generator=gen)), max_seq_len=24)
        stop_ids, limits = rule.mirror(prompt_lens, torch.device("cpu"))
        rows = [rule.rows_after([[0] * p], [p])[0] for p in prompt_lens]  # rows before any generated token
        ended_on_device = torch.zeros(4, dtype=torch.bool)
        for cur_pos in range(min(prompt_lens), 24):
            tokens = torch.randint(0, 8, (4,), generator=gen)
            tokens[tokens == 7] = stop  # a stop id now and then
            step = EndRule.ended_on_device(tokens, cur_pos, stop_ids, limits)
            for i, row in enumerate(rows):
                if cur_pos < prompt_lens[i] or ended_on_device[i]:
                    continue  # a prompt position, or after the row's end: neither decides anything
                assert bool(step[i]) == row.add(int(tokens[i])), (prompt_lens[i], cur_pos, row.finish_reason)
                ended_on_device[i] = step[i]
        assert all(row.ended for row in rows), "every row ends by its length at the latest"
