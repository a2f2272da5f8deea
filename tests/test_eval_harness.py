"""llama.eval.harness: the lm-eval model `llama` against lm-eval's own HF backend on the same weights (the demo model
converted by llama.convert, fp32), on the tiny local tasks of tests/data/lm_eval_tasks, offline."""

import os
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, run

from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH
from llama.hf import convert as hf_convert

pytest.importorskip("lm_eval", reason="install the test extra: pip install -e '.[test]'")
pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate (the test extra)")

TASKS_DIR = "tests/data/lm_eval_tasks"  # the tasks' data paths are relative to the repository root
MAX_LEN = 64  # both models' context: the rolling task's documents need several windows
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextmanager
def offline_in_repo(cache_dir):
    """Run from the repository root with the hub unreachable and datasets cached in cache_dir."""
    saved_env = {k: os.environ.get(k) for k in [*OFFLINE, "HF_DATASETS_CACHE"]}
    saved_cwd = os.getcwd()
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(cache_dir))
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def demo_lm(build_generator):
    from llama.eval.harness import LlamaLM

    generator = build_generator(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, max_seq_len=MAX_LEN, max_batch_size=8)
    return LlamaLM(generator=generator, tokenizer_path=str(DEMO_TOKENIZER_PATH))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_lm):
    """Every task through lm_eval.simple_evaluate: ours, HF's, and ours with --apply_chat_template. HF's backend
    adds BOS to every text it encodes, a rolling document's too, behind the BOS it is scored after; its rolling run
    is therefore made with add_bos_token=False, which gives the windows ours (and lm-eval's docs) describe."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    hf_dir = tmp_path_factory.mktemp("demo-hf") / "hf"
    hf_convert.to_hf(str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), str(hf_dir), dtype="float32")
    hf_args = f"pretrained={hf_dir},dtype=float32,max_length={MAX_LEN},device=cpu"
    out = {}
    with offline_in_repo(tmp_path_factory.mktemp("datasets")):
        manager = TaskManager(include_path=TASKS_DIR)

        def evaluate(model, tasks, model_args=None, **kwargs):
            return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                           log_samples=True, batch_size=8, verbosity="ERROR", **kwargs)  # fmt: skip

        out["ours"] = evaluate(demo_lm, ["llama_tiny_mc", "llama_tiny_gen", "llama_tiny_rolling"])
        out["hf"] = evaluate("hf", ["llama_tiny_mc", "llama_tiny_gen"], hf_args)
        out["hf_rolling"] = evaluate("hf", ["llama_tiny_rolling"], hf_args + ",add_bos_token=False")
        out["chat"] = evaluate(demo_lm, ["llama_tiny_gen"], apply_chat_template=True)
    return out


def responses(result, task):
    return [sample["resps"] for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_accuracies_are_identical_to_the_hf_backend(runs):
    ours, hf = runs["ours"]["results"], runs["hf"]["results"]
    for task, metric in [("llama_tiny_mc", "acc,none"), ("llama_tiny_mc", "acc_norm,none"),
                         ("llama_tiny_gen", "exact_match,none")]:  # fmt: skip
        assert ours[task][metric] == hf[task][metric], (task, metric)
    assert runs["ours"]["results"]["llama_tiny_mc"]["sample_len"] == 12


def test_per_request_loglikelihoods_match_within_1e4(runs):
    ours, hf = responses(runs["ours"], "llama_tiny_mc"), responses(runs["hf"], "llama_tiny_mc")
    pairs = [(a[0], b[0]) for doc_a, doc_b in zip(ours, hf) for a, b in zip(doc_a, doc_b)]
    assert len(pairs) == 37
    for (logprob, greedy), (hf_logprob, hf_greedy) in pairs:
        assert abs(logprob - hf_logprob) < 1e-4 and greedy == hf_greedy
    rolling = zip(responses(runs["ours"], "llama_tiny_rolling"), responses(runs["hf_rolling"], "llama_tiny_rolling"))
    for a, b in rolling:
        assert abs(a[0][0] - b[0][0]) < 1e-4 and a[0][0] < -100  # whole documents, several windows each
    ours_ppl = runs["ours"]["results"]["llama_tiny_rolling"]["word_perplexity,none"]
    assert ours_ppl == pytest.approx(runs["hf_rolling"]["results"]["llama_tiny_rolling"]["word_perplexity,none"])


def test_generations_are_identical_to_the_hf_backend(runs):
    ours, hf = responses(runs["ours"], "llama_tiny_gen"), responses(runs["hf"], "llama_tiny_gen")
    assert ours == hf
    assert all(r[0][0] and "\n" not in r[0][0] and "." not in r[0][0] for r in ours)  # until: "\n", "."


def test_chat_template_uses_the_family_format(runs, demo_lm):
    sample = runs["chat"]["samples"]["llama_tiny_gen"][0]
    prompt = sample["arguments"][0][0]
    assert prompt.startswith("<s>[INST] ") and prompt.endswith(" [/INST]")
    dialog = [{"role": "user", "content": sample["doc"]["context"]}]
    assert demo_lm.tok_encode(prompt) == demo_lm.generator.formatter.encode_dialog_prompt(dialog)
    assert runs["chat"]["results"]["llama_tiny_gen"]["sample_len"] == 4


def test_chat_continuations_are_encoded_as_the_chat_format_encodes_answers(demo_lm):
    formatter = demo_lm.generator.formatter
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a bird."},
              {"role": "assistant", "content": "A crow."}, {"role": "user", "content": "Another?"}]  # fmt: skip
    prompt = demo_lm.apply_chat_template(dialog)
    context, continuation = demo_lm._encode_pair(prompt, " A swan.")
    # Meta's format encodes an answer after "[/INST] " in one piece with the prompt (then " " and EOS)
    answered = formatter.encode_dialog_prompt(dialog + [{"role": "assistant", "content": "A swan."},
                                                        {"role": "user", "content": "x"}])  # fmt: skip
    assert context + continuation == answered[: len(context) + len(continuation)]
    prefill = demo_lm.apply_chat_template(dialog + [{"role": "assistant", "content": "A"}], add_generation_prompt=False)
    assert demo_lm.tok_encode(prefill) == context + demo_lm.generator.tokenizer.encode("A", bos=False, eos=False)


def test_llama3_chat_prompts_are_the_format_ids(llama3_tokenizer, llama3_format):
    from llama.eval.harness import LlamaLM

    stub = SimpleNamespace(model=SimpleNamespace(params=SimpleNamespace(max_seq_len=128, max_batch_size=1)),
                           tokenizer=llama3_tokenizer, formatter=llama3_format, fast=None, device=torch.device("cpu"))
    lm = LlamaLM(generator=stub)
    dialog = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}]
    prompt = lm.apply_chat_template(dialog)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    context, continuation = lm._encode_pair(prompt, "Blue")
    assert context == llama3_format.encode_dialog_prompt(dialog)
    assert continuation == llama3_tokenizer.encode("Blue", bos=False, eos=False)
    assert "Llama3ChatFormat" in lm.chat_template(True) and "Llama3Tokenizer" in lm.tokenizer_name


def test_rolling_windows_score_every_token_once():
    from llama.eval.harness import rolling_windows

    tokens = list(range(10, 160))
    for max_len in (1, 7, 64, 150, 400):
        windows = rolling_windows(tokens, 1, max_len)
        assert [t for _, continuation in windows for t in continuation] == tokens
        assert windows[0][0] == [1]
        for context, continuation in windows:
            assert len(context) + len(continuation) - 1 <= max_len and context  # fits; something to condition on
        for context, continuation in windows[1:]:  # later windows: full context, the tokens right before
            assert len(context) + len(continuation) == max_len + 1
            start = tokens.index(continuation[0])
            assert context == tokens[start - len(context) : start]


def instance(kind, args, task="llama_tiny_mc", doc_id=3):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, doc_id, 1))


def test_empty_requests_and_bad_arguments_are_refused(demo_lm):
    from llama.eval.harness import LlamaLM

    with pytest.raises(ValueError, match="task 'llama_tiny_mc', document 3: an empty continuation"):
        demo_lm.loglikelihood([instance("loglikelihood", ("Fools rush in", ""))])
    with pytest.raises(ValueError, match="document 3: an empty document"):
        demo_lm.loglikelihood_rolling([instance("loglikelihood_rolling", ("",))])
    with pytest.raises(ValueError, match=r"max_gen_toks 64 must be in \[1, max_seq_len 64\)"):
        demo_lm.generate_until([instance("generate_until", ("Hi", {"until": ["\n"], "max_gen_toks": 64}))])
    with pytest.raises(ValueError, match="unknown model_args for --model llama: ckpt"):
        LlamaLM(ckpt="x")
    with pytest.raises(ValueError, match="needs model_args ckpt_dir=FOLDER"):
        LlamaLM()
    assert demo_lm.loglikelihood([]) == [] and demo_lm.generate_until([]) == []


def test_the_lm_eval_command_registers_the_model(tmp_path):
    cmd = [sys.executable, "-m", "llama.eval", "lm-eval", "--model", "llama", "--model_args",
           f"ckpt_dir={DEMO_CKPT_DIR},dtype=float32,max_seq_len=64", "--tasks", "llama_tiny_mc",
           "--include_path", TASKS_DIR, "--limit", "3", "--batch_size", "4"]  # fmt: skip
    env_before = dict(os.environ)
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(tmp_path))
    try:
        proc = run(cmd)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    table = proc.stdout[proc.stdout.index("llama (") :]  # lm-eval's header line names the model, then the table
    assert "llama_tiny_mc" in table and "|acc     |" in table and "CUDA is not available" in proc.stderr
