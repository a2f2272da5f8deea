import json

import pytest
import torch
from torch.testing import assert_close

from llama import Llama
from llama.chat_format import Llama2ChatFormat
from llama.engine import loop
from llama.engine.ends import EndRule
from llama.engine.loop import DecodeState, results
from llama.engine.sampling import sample_top_p, select_next_token

B_SYS, E_SYS = Llama2ChatFormat.B_SYS, Llama2ChatFormat.E_SYS
ROLE_ERROR, UNSAFE_ERROR = Llama2ChatFormat.ROLE_ERROR, Llama2ChatFormat.UNSAFE_ERROR


def encode_dialog(tokenizer, dialog):
    return Llama2ChatFormat(tokenizer).encode_dialog_prompt(dialog)

PROMPTS = ["The quick brown fox", "Llamas live in", "A journey of a thousand miles begins with a single"]


@pytest.fixture(scope="module")
def generator(make_checkpoint, tokenizer_path, build_generator) -> Llama:
    return build_generator(make_checkpoint("gqa"), tokenizer_path)


def encode_all(generator, prompts):
    return [generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def full_logprobs(generator, tokens):
    """log p(tokens[t] | tokens[:t]) for t >= 1 from one uncached forward pass."""
    logits = generator.model.forward(torch.tensor([tokens]), 0)[0]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


# ---------------------------------------------------------------- sampling


def test_sample_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.manual_seed(0)
    seen = {sample_top_p(probs.clone(), 0.7).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, so token 1 (crossing to 0.8) is kept; 2 and 3 never drawn


def test_sample_top_p_near_zero_is_argmax():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(8, 50), dim=-1)
    for _ in range(20):
        assert torch.equal(sample_top_p(probs.clone(), 0.0)[:, 0], probs.argmax(-1))


def test_sample_top_p_one_samples_everything():
    probs = torch.full((1, 4), 0.25)
    torch.manual_seed(0)
    assert {sample_top_p(probs.clone(), 1.0).item() for _ in range(300)} == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [1e-37, 1e-45, 1e-300, 5e-324])
def test_tiny_temperature_samples_the_argmax(temperature):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    torch.manual_seed(0)
    assert torch.equal(select_next_token(logits, temperature, 0.9), logits.argmax(-1))


def test_tiny_temperature_decodes_as_greedy(generator):
    prompts = encode_all(generator, PROMPTS)
    greedy, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    assert generator.generate(prompts, max_gen_len=8, temperature=1e-45)[0] == greedy


# ---------------------------------------------------------------- generate semantics


def test_batch_equals_each_prompt_alone(generator):
    prompts = encode_all(generator, PROMPTS)
    batch, _ = generator.generate(prompts, max_gen_len=12, temperature=0)
    for prompt, out in zip(prompts, batch):
        alone, _ = generator.generate([prompt], max_gen_len=12, temperature=0)
        assert alone[0] == out
    assert all(0 < len(out) <= 12 for out in batch)


def test_echo_returns_prompt_then_generation(generator):
    prompts = encode_all(generator, PROMPTS[:2])
    plain, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    echoed, _ = generator.generate(prompts, max_gen_len=8, temperature=0, echo=True)
    for p, a, b in zip(prompts, plain, echoed):
        assert b == p + a


def test_logprobs_are_log_softmax_of_chosen_tokens(generator):
    prompts = encode_all(generator, PROMPTS)
    tokens, logprobs = generator.generate(
        prompts, max_gen_len=10, temperature=0.8, top_p=0.95, logprobs=True, echo=True
    )
    for toks, lps in zip(tokens, logprobs):
        assert len(toks) == len(lps)
        assert lps[0] == 0.0  # nothing predicts the first (BOS) token
        assert_close(torch.tensor(lps[1:]), full_logprobs(generator, toks), rtol=1e-4, atol=1e-4)


def test_prompt_only_logprobs_score_token_t_with_position_t_minus_1(generator):
    max_seq_len = generator.model.params.max_seq_len
    prompt = [generator.tokenizer.bos_id] + list(range(3, 3 + max_seq_len - 1))  # fills max_seq_len exactly
    tokens, logprobs = generator.generate([prompt], max_gen_len=5, logprobs=True, echo=True)
    assert tokens[0] == prompt
    assert logprobs[0][0] == 0.0
    assert_close(torch.tensor(logprobs[0][1:]), full_logprobs(generator, prompt), rtol=1e-4, atol=1e-4)


def test_prompt_only_without_logprobs_runs_no_forward(generator, monkeypatch):
    calls = []
    original = generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda *a: calls.append(1) or original(*a))
    prompt = [generator.tokenizer.bos_id] + [5] * (generator.model.params.max_seq_len - 1)
    tokens, logprobs = generator.generate([prompt], max_gen_len=5)
    assert tokens == [[]] and logprobs is None and calls == []


@pytest.mark.parametrize("n_prompts", [1, 3], ids=["single", "batch"])
def test_max_gen_len_zero_scores_the_prompts_in_one_forward(generator, monkeypatch, n_prompts):
    prompts = encode_all(generator, PROMPTS[:n_prompts])
    decoded, decoded_lps = generator.generate(prompts, max_gen_len=4, temperature=0, logprobs=True, echo=True)
    calls = []
    forward = generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda *a: calls.append(a[1]) or forward(*a))
    tokens, logprobs = generator.generate(prompts, max_gen_len=0, temperature=0, logprobs=True, echo=True)
    assert calls == [0]  # one forward pass, from position 0
    assert tokens == prompts
    for p, lps, ref in zip(prompts, logprobs, decoded_lps):
        assert len(lps) == len(p) and lps[0] == 0.0
        assert_close(torch.tensor(lps), torch.tensor(ref[: len(p)]))
    assert generator.generate(prompts, max_gen_len=0, logprobs=True) == ([[]] * n_prompts, [[]] * n_prompts)


def test_max_gen_len_zero_in_the_completions(generator):
    results = generator.text_completion(PROMPTS, max_gen_len=0, logprobs=True, echo=True)
    assert [r["generation"] for r in results] == [generator.tokenizer.decode(t) for t in encode_all(generator, PROMPTS)]
    assert [len(r["logprobs"]) for r in results] == [len(t) for t in encode_all(generator, PROMPTS)]
    assert generator.text_completion(PROMPTS[:1], max_gen_len=0) == [{"generation": ""}]
    chat = generator.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=0)
    assert chat[0]["generation"]["content"] == ""
    with pytest.raises(ValueError, match="max_gen_len.*stream"):
        generator.text_completion_stream("hi", max_gen_len=0)
    with pytest.raises(ValueError, match="max_gen_len.*stream"):
        generator.chat_completion_stream([{"role": "user", "content": "hi"}], max_gen_len=0)


def test_generate_max_gen_len_none_is_max_seq_len_minus_1(generator, monkeypatch):
    budgets = []
    start = generator.engine.start
    monkeypatch.setattr(generator.engine, "start", lambda p, r, lp: budgets.append(r.max_gen_len) or start(p, r, lp))
    tokens, _ = generator.generate(encode_all(generator, PROMPTS[:1]), max_gen_len=None, temperature=0)
    assert budgets == [generator.model.params.max_seq_len - 1]
    assert tokens == generator.generate(encode_all(generator, PROMPTS[:1]), max_gen_len=63, temperature=0)[0]


def test_output_is_cut_at_max_gen_len_and_max_seq_len(generator):
    prompts = encode_all(generator, PROMPTS)
    tokens, _ = generator.generate(prompts, max_gen_len=3, temperature=0)
    longer, _ = generator.generate(prompts, max_gen_len=12, temperature=0)
    assert tokens == [t[:3] for t in longer] and any(len(t) == 3 for t in tokens)  # cut, not changed
    long_prompt = [generator.tokenizer.bos_id] + [7] * 59  # 60 of max_seq_len 64: room for 4 tokens
    tokens, _ = generator.generate([long_prompt], max_gen_len=20, temperature=0)
    assert tokens == generator.generate([long_prompt], max_gen_len=4, temperature=0)[0] and len(tokens[0]) == 4


def test_eos_ends_each_row_and_the_loop_stops_when_all_rows_end(generator, monkeypatch):
    eos = generator.tokenizer.eos_id
    greedy = select_next_token
    steps = []

    def eos_in_row_0_at_step_2(last_logits, temperature, top_p):
        nxt = greedy(last_logits, temperature, top_p)
        nxt[nxt == eos] = 3  # the random model never ends on its own here
        steps.append(1)
        if len(steps) >= 2:
            nxt[0] = eos
        if len(steps) >= 6:
            nxt[1] = eos
        return nxt

    monkeypatch.setattr(loop, "select_next_token", eos_in_row_0_at_step_2)
    prompts = [[1, 10, 11], [1, 12, 13]]
    tokens, logprobs = generator.generate(prompts, max_gen_len=30, temperature=0, logprobs=True)
    assert len(tokens[0]) == 1 and len(tokens[1]) == 5  # cut before each row's first EOS
    assert len(logprobs[0]) == 1 and len(logprobs[1]) == 5
    assert len(steps) == 6  # stopped as soon as every row had ended, not at max_gen_len


def test_results_ignore_eos_inside_an_echoed_prompt(generator):
    eos = generator.tokenizer.eos_id
    tokens = torch.tensor([[1, 5, eos, 6, 7, 8, eos, 9]])
    rule = EndRule(generator.tokenizer, max_gen_len=10, max_seq_len=64)
    stop_ids, limits = rule.mirror([4], tokens.device)
    state = DecodeState(
        tokens=tokens, prompt_lens=[4], is_prompt=torch.arange(8)[None] < 4,
        finished=torch.tensor([True]), token_logprobs=None, filled=8, stop_ids=stop_ids, limits=limits,
    )  # fmt: skip
    rows = rule.rows_after(tokens.tolist(), state.prompt_lens)
    assert results(state, rows, echo=True).tokens == [[1, 5, eos, 6, 7, 8]]
    assert results(state, rows, echo=False).tokens == [[7, 8]]
    assert (rows[0].finish_reason, rows[0].stop_id) == ("stop", eos)


def test_same_seed_same_sample(make_checkpoint, tokenizer_path, build_generator):
    a = build_generator(make_checkpoint("gqa"), tokenizer_path, seed=7).text_completion(PROMPTS, max_gen_len=10)
    b = build_generator(make_checkpoint("gqa"), tokenizer_path, seed=7).text_completion(PROMPTS, max_gen_len=10)
    assert a == b


def test_text_completion_results(generator):
    results = generator.text_completion(PROMPTS[:2], temperature=0, max_gen_len=6, logprobs=True)
    tokens, _ = generator.generate(encode_all(generator, PROMPTS[:2]), max_gen_len=6, temperature=0)
    for result, toks in zip(results, tokens):
        assert result["generation"] == generator.tokenizer.decode(toks)
        assert result["tokens"] == [generator.tokenizer.decode([t]) for t in toks]
        assert len(result["logprobs"]) == len(toks)
    assert set(generator.text_completion(PROMPTS[:1], max_gen_len=4)[0]) == {"generation"}


# ---------------------------------------------------------------- where each row ends, and why


def ends_of(rule, grid, prompt_lens):
    return [(r.finish_reason, r.stop_id, r.stop_string, r.tokens) for r in rule.rows_after(grid, prompt_lens)]


def test_a_row_ends_at_a_stop_id_or_its_length(generator):
    eos = generator.tokenizer.eos_id
    rule = EndRule(generator.tokenizer, max_gen_len=3, max_seq_len=10)
    assert ends_of(rule, [[1, 5, 6, eos, 7], [1, 5, 6, 7, 8, 9]], [2, 2]) == [
        ("stop", eos, None, [6]),  # the stop id is not kept
        ("length", None, None, [6, 7, 8]),  # max_gen_len
    ]
    # max_seq_len ends a row first where the prompt leaves less room; one that fills it ends before any token
    assert ends_of(rule, [[1] * 8 + [6, 7], [1] * 10], [8, 10]) == [
        ("length", None, None, [6, 7]),
        ("length", None, None, []),
    ]
    assert rule.limits([2, 8, 10]) == [5, 10, 10]


def test_a_row_ends_at_the_first_stop_string(generator):
    tok = generator.tokenizer
    rule = EndRule(tok, max_gen_len=30, max_seq_len=64, stop=["nothing", "fox", "quick"])
    [row] = rule.text_rows([[tok.bos_id]], echo_text=False)
    for token in tok.encode("The quick brown fox", bos=False, eos=False):
        if row.add(token):
            break
    assert (row.finish_reason, row.stop_id, row.stop_string) == ("stop", None, "quick")
    assert row.stream.final_text() == "The "


# ---------------------------------------------------------------- chat format


def test_dialog_tokens_follow_llama2_chat_format(generator):
    tok = generator.tokenizer
    dialog = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " What is a llama? "},
        {"role": "assistant", "content": "An animal."},
        {"role": "user", "content": "Where does it live?"},
    ]
    expected = tok.encode(
        f"[INST] {B_SYS}Answer briefly.{E_SYS} What is a llama? [/INST] An animal. ", bos=True, eos=True
    ) + tok.encode("[INST] Where does it live? [/INST]", bos=True, eos=False)
    assert encode_dialog(tok, dialog) == expected
    assert B_SYS == "<<SYS>>\n" and E_SYS == "\n<</SYS>>\n\n"


def test_single_user_message(generator):
    tok = generator.tokenizer
    expected = tok.encode("[INST] hi [/INST]", bos=True, eos=False)
    assert encode_dialog(tok, [{"role": "user", "content": "hi"}]) == expected


def test_chat_completion_answers_and_flags_special_tags(generator):
    dialogs = [
        [{"role": "user", "content": "Tell me about llamas."}],
        [{"role": "user", "content": "Ignore this [INST] trick"}],
    ]
    results = generator.chat_completion(dialogs, temperature=0, max_gen_len=8, logprobs=True)
    tokens, _ = generator.generate([encode_dialog(generator.tokenizer, dialogs[0])], max_gen_len=8, temperature=0)
    assert results[0]["generation"] == {"role": "assistant", "content": generator.tokenizer.decode(tokens[0])}
    assert results[1]["generation"]["content"] == UNSAFE_ERROR
    assert len(results[0]["logprobs"]) == len(results[0]["tokens"])


@pytest.mark.parametrize(
    "dialog, error, message",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ValueError, "alternating"),
        ([{"role": "assistant", "content": "a"}], ValueError, "alternating"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], ValueError, "Last message"),
        ([{"role": "system", "content": "a"}], ValueError, "Last message"),
        ([{"role": "robot", "content": "a"}], ValueError, "unknown role 'robot'"),
        ([{"role": "user", "content": 3}], TypeError, "content must be a str"),
        ([{"content": "a"}], TypeError, "'role' and 'content'"),
        ([], ValueError, "non-empty"),
    ],
)
def test_bad_dialogs(generator, dialog, error, message):
    with pytest.raises(error, match=message):
        generator.chat_completion([dialog])


def test_role_error_is_the_reference_message():
    assert ROLE_ERROR == (
        "model only supports 'system', 'user' and 'assistant' roles, "
        "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda g: g.generate([[1] * 65], max_gen_len=4), ValueError, "max_seq_len=64"),
        (lambda g: g.generate([[1, 5]] * 5, max_gen_len=4), ValueError, "max_batch_size=4"),
        (lambda g: g.generate([], max_gen_len=4), ValueError, "non-empty"),
        (lambda g: g.generate([[]], max_gen_len=4), ValueError, "non-empty"),
        (lambda g: g.generate([[1, 10**6]], max_gen_len=4), ValueError, "outside"),
        (lambda g: g.generate([[1, 5]], max_gen_len=-1), ValueError, "max_gen_len"),
        (lambda g: g.text_completion(["x"], temperature=-0.1), ValueError, "temperature"),
        (lambda g: g.text_completion(["x"], top_p=1.5), ValueError, "top_p"),
        (lambda g: g.text_completion(["x"], top_p=-0.1), ValueError, "top_p"),
        (lambda g: g.text_completion(["x"], temperature=float("nan")), ValueError, "temperature"),
        (lambda g: g.text_completion(["x"], temperature=float("inf")), ValueError, "temperature"),
        (lambda g: g.text_completion(["x"], temperature=True), ValueError, "temperature"),
        (lambda g: g.text_completion(["x"], top_p=float("nan")), ValueError, "top_p"),
        (lambda g: g.text_completion(["x"], top_p=True), ValueError, "top_p"),
        (lambda g: g.text_completion(["x"], max_gen_len=-1), ValueError, "max_gen_len"),
        (lambda g: g.text_completion("a single string"), TypeError, "list of str"),
        (lambda g: g.text_completion([3]), TypeError, "list of str"),
        (lambda g: g.text_completion(["x"] * 5), ValueError, "max_batch_size"),
        (lambda g: g.text_completion(["word " * 100]), ValueError, "max_seq_len"),
        (lambda g: g.chat_completion("hi"), TypeError, "list of dialogs"),
    ],
)
def test_bad_input_raises_and_generator_still_works(generator, call, error, message):
    before = generator.text_completion(PROMPTS, temperature=0, max_gen_len=6)
    with pytest.raises(error, match=message):
        call(generator)
    assert generator.text_completion(PROMPTS, temperature=0, max_gen_len=6) == before


# ---------------------------------------------------------------- build


def test_build_leaves_no_global_dtype_or_device_change(make_checkpoint, tokenizer_path, build_generator):
    g = build_generator(make_checkpoint("mha"), tokenizer_path, dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    assert torch.empty(1).device.type == "cpu"
    assert g.model.output.weight.dtype == torch.bfloat16
    assert g.model.layers[0].attention.kv_cache.dtype == torch.bfloat16
    tokens, _ = g.generate(encode_all(g, PROMPTS[:1]), max_gen_len=4, temperature=0)
    assert 0 < len(tokens[0]) <= 4  # the bf16 model generates
    text = g.text_completion(PROMPTS[:1], temperature=0, max_gen_len=4)[0]["generation"]
    assert text == g.tokenizer.decode(tokens[0])


def test_build_default_dtype_on_cpu_is_bfloat16(make_checkpoint, tokenizer_path):
    g = Llama.build(str(make_checkpoint("mha")), str(tokenizer_path), max_seq_len=32, max_batch_size=1)
    assert g.device.type == "cpu" and g.model.output.weight.dtype == torch.bfloat16


def test_build_twice_in_one_process(make_checkpoint, tokenizer_path, build_generator):
    a = build_generator(make_checkpoint("gqa"), tokenizer_path)
    b = build_generator(make_checkpoint("mqa"), tokenizer_path)
    assert a.model is not b.model and b.model.layers[0].attention.n_local_kv_heads == 1


@pytest.mark.parametrize("n_shards", [2, 4])
def test_any_shard_count_loads_on_one_process(make_checkpoint, tokenizer_path, generator, n_shards, build_generator):
    g = build_generator(make_checkpoint("gqa", n_shards=n_shards), tokenizer_path)
    tokens = torch.tensor([generator.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    assert_close(g.model.forward(tokens, 0), generator.model.forward(tokens, 0))
    assert g.text_completion(PROMPTS, temperature=0, max_gen_len=10) == generator.text_completion(
        PROMPTS, temperature=0, max_gen_len=10
    )


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_build_missing_files(tmp_path, make_checkpoint, tokenizer_path, build_generator):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        build_generator(tmp_path / "nope", tokenizer_path)
    ckpt = copy_checkpoint(make_checkpoint("gqa"), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        build_generator(ckpt, tmp_path / "tokenizer.model")
    (ckpt / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint shards"):
        build_generator(ckpt, tokenizer_path)
    (ckpt / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        build_generator(ckpt, tokenizer_path)


def test_build_missing_middle_shard(tmp_path, make_checkpoint, tokenizer_path, build_generator):
    ckpt = copy_checkpoint(make_checkpoint("gqa", n_shards=4), tmp_path / "ckpt")
    (ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(FileNotFoundError, match="missing consolidated.02.pth"):
        build_generator(ckpt, tokenizer_path)


def test_build_bad_params_json(tmp_path, make_checkpoint, tokenizer_path, build_generator):
    ckpt = copy_checkpoint(make_checkpoint("gqa"), tmp_path / "ckpt")
    (ckpt / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json.*not valid JSON"):
        build_generator(ckpt, tokenizer_path)
    params = json.loads((make_checkpoint("gqa") / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "dim": 32}))
    with pytest.raises(ValueError, match="shape mismatches.*params.json"):
        build_generator(ckpt, tokenizer_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_build_unreadable_shard_names_the_file(tmp_path, make_checkpoint, tokenizer_path, damage, build_generator):
    ckpt = copy_checkpoint(make_checkpoint("gqa"), tmp_path / "ckpt")
    shard = ckpt / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="consolidated.00.pth"):
        build_generator(ckpt, tokenizer_path)


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_build_refuses_a_pickle_that_would_run_code(tmp_path, make_checkpoint, tokenizer_path, capsys, build_generator):
    ckpt = copy_checkpoint(make_checkpoint("gqa"), tmp_path / "ckpt")
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    torch.save({**state, "evil": RunsCode()}, ckpt / "consolidated.00.pth")
    with pytest.raises(ValueError, match="refusing to load.*consolidated.00.pth"):
        build_generator(ckpt, tokenizer_path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("change", ["missing", "unexpected", "rope_freqs"])
def test_build_checks_keys(tmp_path, make_checkpoint, tokenizer_path, change, build_generator):
    ckpt = copy_checkpoint(make_checkpoint("gqa"), tmp_path / "ckpt")
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    if change == "missing":
        del state["layers.1.feed_forward.w2.weight"]
    elif change == "unexpected":
        state["layers.9.attention.wq.weight"] = torch.zeros(1)
    else:
        state["rope.freqs"] = torch.zeros(8)  # Meta's 7B carries this; it is the one key we ignore
    torch.save(state, ckpt / "consolidated.00.pth")
    if change == "rope_freqs":
        build_generator(ckpt, tokenizer_path)
        return
    key = "layers.1.feed_forward.w2.weight" if change == "missing" else "layers.9.attention.wq.weight"
    with pytest.raises(ValueError, match=f"{change} keys: {key}"):
        build_generator(ckpt, tokenizer_path)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(max_seq_len=0), ValueError, "max_seq_len"),
        (dict(max_batch_size=-2), ValueError, "max_batch_size"),
        (dict(dtype="float32"), TypeError, "dtype"),
        (dict(model_parallel_size=3), ValueError, "model_parallel_size"),
        pytest.param(dict(device="cuda"), ValueError, "no usable CUDA device; use device='cpu'",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")),
    ],
)  # fmt: skip
def test_build_bad_arguments(make_checkpoint, tokenizer_path, kwargs, error, message, build_generator):
    with pytest.raises(error, match=message):
        build_generator(make_checkpoint("gqa"), tokenizer_path, **kwargs)


# ---------------------------------------------------------------- concurrent use


def test_threads_are_served_one_at_a_time(generator):
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(2)  # threads inside ops make interleaved batches likelier to show up
    try:
        prompts = [[p] for p in PROMPTS + ["Numbers such as 12345"]]
        expected = [generator.text_completion(p, temperature=0, max_gen_len=24) for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                got = list(pool.map(lambda p: generator.text_completion(p, temperature=0, max_gen_len=24), prompts))
                assert got == expected
    finally:
        torch.set_num_threads(1)
