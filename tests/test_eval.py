"""llama.eval's perplexity and KL divergence: llama.cpp's chunking and statistics, checked against an independent
computation from Hugging Face's logits on the same weights (converted by llama.convert), and the errors."""

import math
import re
import sys

import pytest
import torch
from helpers import REPO, hf_model, run
from torch.testing import assert_close

from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH
from llama.eval import kld
from llama.eval.perplexity import (
    Window,
    check_main_args,
    chunk_windows,
    perplexity,
    ppl_with_uncertainty,
    stride_windows,
    text_tokens,
)
from llama.hf import convert as hf_convert

transformers = pytest.importorskip("transformers", reason="install the test extra: pip install -e '.[test]'")

CTX = 64
TEXT = (REPO / "tests" / "data" / "demo_heldout.txt").read_text(encoding="utf-8")[:2400]  # ~850 tokens: 13 chunks


@pytest.fixture(scope="module")
def demo(build_generator):
    """The demo model in fp32, room for ctx 64 and 4 chunks a forward pass."""
    return build_generator(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, max_seq_len=CTX, max_batch_size=4)


@pytest.fixture(scope="module")
def demo_hf(tmp_path_factory):
    """Hugging Face's fp32 model of the demo weights, converted by llama.convert, and its tokenizer."""
    out = tmp_path_factory.mktemp("demo-hf") / "hf"
    hf_convert.to_hf(str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), str(out), dtype="float32")
    return hf_model(out), transformers.AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def hf_nlls(model, ids: list[int], ctx: int, stride=None) -> torch.Tensor:
    """-log p of each scored token, written from llama-perplexity's description (chunks: BOS first, second half
    scored) and Hugging Face's perplexity guide (stride), on HF's logits, one window at a time."""
    nlls = []
    if stride is None:
        for start in range(0, len(ids) // ctx * ctx, ctx):
            chunk = [ids[0]] + ids[start + 1 : start + ctx]  # ids[0] is BOS
            with torch.no_grad():
                logits = model(torch.tensor([chunk])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for j in range(ctx // 2, ctx - 1):
                nlls.append(-logp[j, chunk[j + 1]])
    else:
        previous_end = 1
        for begin in range(0, len(ids), stride):
            end = min(begin + ctx, len(ids))
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for target in range(previous_end, end):
                nlls.append(-logp[target - begin - 1, ids[target]])
            previous_end = end
            if end == len(ids):
                break
    return torch.stack(nlls)


def test_windows_follow_llama_cpp_and_the_sliding_window():
    assert chunk_windows(200, 64) == [Window(0, 64, 32, True), Window(64, 128, 32, True), Window(128, 192, 32, True)]
    assert [w.n_scored for w in chunk_windows(200, 64)] == [31, 31, 31]  # ctx - 1 - ctx/2 each, as llama.cpp
    windows = stride_windows(100, 40, 25)
    assert [(w.start, w.end) for w in windows] == [(0, 40), (25, 65), (50, 90), (75, 100)]
    scored = [w.start + w.first_scored + 1 + k for w in windows for k in range(w.n_scored)]
    assert scored == list(range(1, 100))  # every token after the first, once
    assert not any(w.bos for w in windows)


def test_perplexity_matches_an_independent_computation_from_hf_logits(demo, demo_hf):
    model, hf_tokenizer = demo_hf
    ids = text_tokens(demo, TEXT)
    assert ids == hf_tokenizer(TEXT)["input_ids"]  # the same tokens, BOS first
    expected = hf_nlls(model, ids, CTX)
    result = perplexity(demo, TEXT, ctx=CTX, batch_size=4)
    assert result.n_windows == len(ids) // CTX and result.count == (len(ids) // CTX) * (CTX - 1 - CTX // 2)
    assert_close(result.nlls, expected, atol=1e-4, rtol=0)
    ppl = math.exp(float(expected.mean()))
    uncertainty = ppl * float(expected.std(unbiased=False)) / math.sqrt(len(expected) - 1)  # llama.cpp's formula
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.uncertainty == pytest.approx(uncertainty, rel=1e-3)
    assert result.line() == f"Final estimate: PPL = {result.ppl:.4f} +/- {result.uncertainty:.5f}"


def test_sliding_window_matches_hf_and_scores_every_token_once(demo, demo_hf):
    model, _ = demo_hf
    ids = text_tokens(demo, TEXT)
    result = perplexity(demo, ids, ctx=CTX, stride=24, batch_size=3)
    assert result.count == len(ids) - 1
    assert_close(result.nlls, hf_nlls(model, ids, CTX, stride=24), atol=1e-4, rtol=0)


def test_batching_does_not_change_the_numbers(demo):
    one = perplexity(demo, TEXT, ctx=CTX, batch_size=1)
    four = perplexity(demo, TEXT, ctx=CTX, batch_size=4)
    assert_close(one.nlls, four.nlls, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ranks", [1, 2], ids=["python", "torchrun-2-ranks"])
def test_the_cli_prints_llama_cpp_final_estimate_equal_to_hf(demo, demo_hf, text_file, ranks):
    """Also under torchrun: each rank holds half of the model, every rank runs the same chunks, rank 0 prints."""
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]  # fmt: skip
    proc = run(launcher + ["-m", "llama.eval", "perplexity", "--ckpt_dir", str(DEMO_CKPT_DIR), "--text",
                           str(text_file), "--ctx", str(CTX), "--batch_size", "4", "--dtype", "float32"])  # fmt: skip
    found = re.findall(r"^Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)$", proc.stdout, re.M)
    assert len(found) == 1, proc.stdout  # one line, from rank 0
    [(ppl, _)] = found
    expected = hf_nlls(demo_hf[0], text_tokens(demo, TEXT), CTX)
    assert float(ppl) == pytest.approx(math.exp(float(expected.mean())), abs=1e-3)
    assert "perplexity" in proc.stderr and "chunk" in proc.stderr  # the progress bar, on stderr


def test_kl_divergence_statistics(demo, build_generator, tmp_path):
    # the model against itself: nothing moves
    same = perplexity(demo, TEXT, ctx=CTX, base=demo).kl.summary()
    assert same["kld"] == 0 and same["same_top"] == 1.0 and same["dp_rms"] == 0
    assert same["ppl"] == same["ppl_base"]
    # int8 against fp32, checked against KL divergence computed here from both models' logits
    int8 = build_generator(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, max_seq_len=CTX, max_batch_size=4, quantize="int8")
    result = perplexity(int8, TEXT, ctx=CTX, base=demo)
    stats = result.kl.summary()
    ids = torch.tensor(text_tokens(demo, TEXT))
    klds, tops, dps = [], [], []
    for w in chunk_windows(len(ids), CTX):
        chunk = ids[w.start : w.end].clone()
        chunk[0] = demo.tokenizer.bos_id
        p = torch.log_softmax(demo.model.forward(chunk[None], 0)[0, CTX // 2 : -1].double(), -1)
        q = torch.log_softmax(int8.model.forward(chunk[None], 0)[0, CTX // 2 : -1].double(), -1)
        klds.append(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1))
        tops.append(p.argmax(-1) == q.argmax(-1))
        target = chunk[CTX // 2 + 1 :, None]
        dps.append(q.gather(1, target).exp().squeeze(1) - p.gather(1, target).exp().squeeze(1))
    klds, dps = torch.cat(klds), torch.cat(dps)
    # Our log-probabilities are fp32 (~1e-7 rounding each) and int8's KLD is only ~1e-5: agreement to 1e-3 relative
    assert stats["kld"] == pytest.approx(float(klds.mean()), rel=1e-3) and stats["kld"] > 0
    assert stats["kld_unc"] == pytest.approx(float(klds.std()) / math.sqrt(len(klds)), rel=1e-2)
    assert stats["same_top"] == pytest.approx(float(torch.cat(tops).double().mean()))
    assert stats["dp"] == pytest.approx(float(dps.mean()), abs=1e-9)
    # Δp from fp32 probabilities (~6e-8 rounding each) against float64 ones: ~1e-5 of an RMS of ~1e-3
    assert stats["dp_rms"] == pytest.approx(float(dps.square().mean().sqrt()), rel=1e-4)
    assert stats["kld_median"] == pytest.approx(float(klds.double().quantile(0.5)), rel=1e-2)
    assert stats["ppl"] == pytest.approx(result.ppl, rel=1e-6)
    report = result.kl.report()
    assert f"Mean    KLD: {stats['kld']:10.6f}" in report and "Same top p:" in report and "RMS Δp" in report
    # the base's log-probabilities saved to a file give the same statistics
    saved = tmp_path / "base.logprobs"
    perplexity(demo, TEXT, ctx=CTX, save_logprobs=saved)
    assert saved.stat().st_size > result.count * 4096 * 4
    assert perplexity(int8, TEXT, ctx=CTX, base=saved).kl.summary() == pytest.approx(stats, rel=1e-6, abs=1e-9)
    # a saved run of other settings or tokens is refused
    with pytest.raises(ValueError, match="--ctx 64 --stride None, this run has --ctx 32"):
        perplexity(int8, TEXT, ctx=32, base=saved)
    with pytest.raises(ValueError, match="other tokens"):
        perplexity(int8, TEXT[:-200], ctx=CTX, base=saved)


def test_llama_cpp_estimators():
    values = torch.arange(20, dtype=torch.float64)
    mean, unc = kld.mean_and_uncertainty(values)
    assert mean == 9.5 and unc == pytest.approx(float(values.std()) / math.sqrt(20))
    assert kld.mean_and_uncertainty(values[:10])[1] == 0.0  # llama.cpp: no uncertainty from 10 values or fewer
    assert kld.percentile(values, 0.999) == pytest.approx(18.981) and kld.percentile(values, 0.5) == 9.5
    ppl, unc = ppl_with_uncertainty(torch.tensor([1.0, 2.0, 3.0]))
    assert ppl == pytest.approx(math.exp(2)) and unc == pytest.approx(math.exp(2) * math.sqrt((2 / 3) / 2))


def test_bad_input_is_refused_with_the_problem_named(demo, make_checkpoint, build_generator, tmp_path):
    with pytest.raises(ValueError, match=r"shorter than two chunks of ctx 64 \(128 tokens"):
        perplexity(demo, TEXT[:300], ctx=CTX)
    with pytest.raises(ValueError, match="ctx 128 is larger than the model's max_seq_len 64"):
        perplexity(demo, TEXT, ctx=128)
    with pytest.raises(ValueError, match=r"stride must be in \[1, ctx\]"):
        perplexity(demo, TEXT, ctx=CTX, stride=65)
    other = build_generator(make_checkpoint("gqa"), max_seq_len=CTX)  # the tests' 512-piece vocabulary
    with pytest.raises(ValueError, match="vocabulary has 512 tokens, the model's 4096"):
        perplexity(demo, TEXT, ctx=CTX, base=other)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not log-probabilities")
    with pytest.raises(ValueError, match="not a file of base log-probabilities"):
        perplexity(demo, TEXT, ctx=CTX, base=junk)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ctx=128, max_seq_len=64), "--ctx 128 is larger than --max_seq_len 64"),
        (dict(stride=600), "--stride must be in [1, ctx] = [1, 512]"),
        (dict(quantize="int3"), "--quantize must be one of int8, int4"),
        (dict(dtype="float64"), "unknown dtype 'float64'"),
        (dict(text="no/such/file.txt"), "--text 'no/such/file.txt' is not a file"),
        (dict(kl_divergence="base.logprobs", save_logprobs="other.logprobs"), "--kl_divergence 'base.logprobs': no"),
    ],
)
def test_the_cli_checks_its_flags_before_loading(text_file, overrides, message):
    flags = dict(ckpt_dir=str(DEMO_CKPT_DIR), text=str(text_file), tokenizer_path=None, ctx=512, stride=None,
                 batch_size=1, quantize=None, dtype=None, max_seq_len=None, kl_divergence=None, base_dtype=None,
                 save_logprobs=None)  # fmt: skip
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        check_main_args(**{**flags, **overrides})


def test_the_cli_refuses_a_mistyped_flag_before_loading(text_file):
    proc = run([sys.executable, "-m", "llama.eval", "perplexity", "--ckpt_dir", str(DEMO_CKPT_DIR), "--text",
                str(text_file), "--ctx", "abc"], ok=False)  # fmt: skip
    assert proc.returncode == 2 and "--ctx must be an integer, not 'abc'" in proc.stderr
