"""Train the small demo model shipped in llama/demo/ on Debian's fortune cookies, on CPU.

Fetch the data first (tools/get_demo_data.sh), then:

    python tools/train_demo.py                          # 40 minutes of training, then evaluation
    python tools/train_demo.py --max_steps 1200         # a fixed number of steps: bit-for-bit reproducible

Steps: (a) split the fortunes into train and held-out (every 20th fortune held out); (b) train a SentencePiece
BPE tokenizer with Llama 2's settings (byte fallback, unk=0, bos=1, eos=2, no pad piece, identity
normalisation, split digits) on the train text; (c) train a Llama 2 architecture model (RMSNorm, RoPE, GQA,
SwiGLU): llama.model's own Transformer, whose parameter names are Meta's; (d) write llama/demo/
(consolidated.00.pth in bfloat16, params.json, tokenizer.model); (e) evaluate held-out perplexity through
llama's own inference path, against a unigram baseline, and write a held-out sample for tests/test_demo.py.

With --minutes alone the cosine schedule runs on wall-clock time, so the run ends with a decayed learning rate
whatever the machine's speed, but how many steps fit depends on that speed. With --max_steps the schedule runs
on steps, and two runs give the same weights (same torch version, same number of threads, same CPU kind);
--minutes then only caps the time.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make llama and tools importable
    sys.path.insert(0, str(REPO))

from llama import Llama  # noqa: E402
from llama.commandline import fire_checked  # noqa: E402
from llama.distributed import setup_model_parallel  # noqa: E402
from llama.model import BlockOps, ModelArgs, Transformer, repeat_kv  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402
from tools import demo_eval  # noqa: E402

HOLDOUT_EVERY = 20  # fortune i is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
TEST_SAMPLE_BYTES = 30_000  # size of tests/data/demo_heldout.txt
WORDS_MIN_COUNT = 5  # words of the train text seen at least this often go to tests/data/demo_words.txt
PROMPTS = [
    "The meaning of life is",
    "A computer is",
    "Never trust a man who",
    "Q:\tWhat do you get when you cross a",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- data


def load_fortunes(path: str | Path) -> list[str]:
    """The fortune texts of data/fortunes.jsonl (written by tools/get_demo_data.sh), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: run tools/get_demo_data.sh first")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def split_fortunes(texts: list[str], every: int = HOLDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th fortune is held out."""
    train = [t for i, t in enumerate(texts) if i % every != every - 1]
    heldout = [t for i, t in enumerate(texts) if i % every == every - 1]
    return train, heldout


def train_tokenizer(texts: list[str], out_path: Path, vocab_size: int) -> None:
    """A SentencePiece BPE model with Llama 2's trainer and normaliser settings, trained on texts' lines."""
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        max_sentence_length=4192,
        num_threads=1,
        minloglevel=2,
    )
    out_path.write_bytes(model.getvalue())


def epoch_windows(docs: list[list[int]], bos: int, eos: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """One epoch of training windows (n, seq_len + 1), from the documents in a fresh random order.

    The documents are joined as BOS doc EOS BOS doc EOS ... and cut into windows that start at a BOS where
    possible (the next window starts at the BOS of the document that the previous one cut, so what the model
    sees at position 0 is what generation gives it), or mid-document when one document is much longer than a
    window. The windows come back shuffled.
    """
    order = torch.randperm(len(docs), generator=gen).tolist()
    stream: list[int] = []
    starts: list[int] = []
    for i in order:
        starts.append(len(stream))
        stream += [bos] + docs[i] + [eos]
    data = torch.tensor(stream, dtype=torch.long)
    bos_at = torch.tensor(starts, dtype=torch.long)
    windows, s = [], 0
    while s + seq_len + 1 <= len(stream):
        windows.append(s)
        # the last document start inside this window's targets, if it leaves at least half a window of progress
        hi = int(torch.searchsorted(bos_at, s + seq_len, right=True)) - 1
        nxt = int(bos_at[hi]) if hi >= 0 else -1
        s = nxt if nxt >= s + seq_len // 2 else s + seq_len
    idx = torch.tensor(windows, dtype=torch.long)[:, None] + torch.arange(seq_len + 1)[None, :]
    out = data[idx]
    return out[torch.randperm(len(out), generator=gen)]


# ---------------------------------------------------------------------------------------------------- model
# llama.model's own Transformer and blocks, without a KV cache, with PyTorch's fused causal attention for training.


class TrainingOps(BlockOps):
    """How the training forward computes llama.model's blocks: as the reference does, except attention, which is
    PyTorch's fused causal attention over the sequence (scaled by 1/sqrt(head_dim) as in llama.model)."""

    def attend(
        self, xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        n_rep = xq.shape[2] // keys.shape[2]
        keys, values = repeat_kv(keys, n_rep), repeat_kv(values, n_rep)
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), is_causal=True
        )  # (bsz, n_heads, seqlen, head_dim)
        return out.transpose(1, 2)


TRAINING = TrainingOps()


class TrainTransformer(Transformer):
    """llama.model.Transformer for training on CPU: one model-parallel rank, no KV cache (each call is a whole
    sequence from position 0), weights initialised at random, and a forward that autograd can follow."""

    def __init__(self, args: ModelArgs):
        setup_model_parallel(None, torch.device("cpu"))  # one in-memory rank, as Llama.build makes
        super().__init__(args, kv_cache=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 style: N(0, 0.02), with the projections that write into the residual stream scaled down by depth.
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.params.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits (bsz, seqlen, vocab) in fp32 for tokens (bsz, seqlen) at positions 0..seqlen-1."""
        h = self.tok_embeddings(tokens)
        return self.logits(h, 0, self.freqs_cis[: tokens.shape[1]], None, TRAINING)


def meta_params(args: ModelArgs) -> dict:
    """params.json in Meta's layout (vocab_size -1: Llama.build takes it from the tokenizer)."""
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "vocab_size": -1,
    }


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_demo(model: TrainTransformer, tokenizer_model: Path, out_dir: Path) -> None:
    """Write consolidated.00.pth (bfloat16), params.json and tokenizer.model into out_dir, file by file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()}
    _replace(out_dir / "consolidated.00.pth", lambda p: torch.save(state, p))
    _replace(out_dir / "params.json", lambda p: p.write_text(json.dumps(meta_params(model.params), indent=2) + "\n"))
    if tokenizer_model.resolve() != (out_dir / "tokenizer.model").resolve():
        _replace(out_dir / "tokenizer.model", lambda p: p.write_bytes(tokenizer_model.read_bytes()))


# ---------------------------------------------------------------------------------------------------- training


def lr_at(step: int, progress: float, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    cosine = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * min(1.0, (step + 1) / warmup) * cosine


@torch.no_grad()
def window_loss(model: TrainTransformer, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        n += w[:, 1:].numel()
    model.train()
    return total / n


def main(
    data: str = str(REPO / "data" / "fortunes.jsonl"),
    out: str = str(REPO / "llama" / "demo"),
    minutes: float = 40.0,
    max_steps: Optional[int] = None,
    vocab_size: int = 4096,
    dim: int = 288,
    n_layers: int = 6,
    n_heads: int = 8,
    n_kv_heads: int = 4,
    multiple_of: int = 32,
    seq_len: int = 256,
    batch_size: int = 16,
    lr: float = 2e-3,
    min_lr_ratio: float = 0.1,
    warmup: int = 50,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 1234,
    threads: int = 2,
    log_every: int = 10,
    eval_every: int = 100,
    write_test_data: bool = True,
    metrics: str = str(REPO / "runs" / "demo_metrics.json"),
) -> dict:
    """Train the demo model and write it to `out`; returns (and writes to `metrics`) the evaluation."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget_s = minutes * 60.0

    # (a) data
    texts = load_fortunes(data)
    train_texts, heldout_texts = split_fortunes(texts)
    log(
        f"{len(texts)} fortunes, {sum(map(len, texts))} characters: {len(train_texts)} train "
        f"({sum(map(len, train_texts))} chars), {len(heldout_texts)} held out ({sum(map(len, heldout_texts))} chars)"
    )

    # (b) tokenizer
    t0 = time.time()
    tok_path = out_dir / "tokenizer.model"
    _replace(tok_path, lambda p: train_tokenizer(train_texts, p, vocab_size))
    tokenizer = Tokenizer(tok_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.n_words) == (1, 2, -1, vocab_size)
    train_docs = [tokenizer.encode(t, bos=False, eos=False) for t in train_texts]
    heldout_docs = [tokenizer.encode(t, bos=False, eos=False) for t in heldout_texts]
    n_train_tokens = sum(len(d) + 2 for d in train_docs)
    log(
        f"tokenizer: {vocab_size} pieces in {time.time() - t0:.1f} s; train {n_train_tokens} tokens with BOS/EOS "
        f"({sum(map(len, train_texts)) / sum(map(len, train_docs)):.2f} chars/token)"
    )

    # (c) model
    args = ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
        multiple_of=multiple_of, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len, max_batch_size=batch_size,
    )  # fmt: skip
    model = TrainTransformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {json.dumps(meta_params(args))}, {n_params} parameters ({n_params / 1e6:.2f} M)")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    eval_windows = epoch_windows(heldout_docs, 1, 2, seq_len, torch.Generator().manual_seed(0))[:32]

    step, epoch, tokens_seen = 0, 0, 0
    windows, pos = epoch_windows(train_docs, 1, 2, seq_len, gen), 0
    start = time.time()
    last_t, last_tokens, loss_sum, loss_n = start, 0, 0.0, 0
    history = []
    while True:
        elapsed = time.time() - start
        if max_steps is not None and step >= max_steps:
            break
        if elapsed >= budget_s:
            log(f"time budget of {minutes} min reached at step {step}")
            break
        if pos + batch_size > len(windows):
            epoch += 1
            windows, pos = epoch_windows(train_docs, 1, 2, seq_len, gen), 0
        batch = windows[pos : pos + batch_size]
        pos += batch_size
        progress = step / max_steps if max_steps is not None else elapsed / budget_s
        cur_lr = lr_at(step, progress, lr, warmup, min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        if step % log_every == 0:
            now = time.time()
            tps = (tokens_seen - last_tokens) / (now - last_t)
            log(
                f"step {step} epoch {epoch + pos / len(windows):.2f} loss {loss_sum / loss_n:.4f} lr {cur_lr:.2e} "
                f"{tps:.0f} tok/s elapsed {(now - start) / 60:.1f} min"
            )
            last_t, last_tokens, loss_sum, loss_n = now, tokens_seen, 0.0, 0
        if eval_every and step % eval_every == 0:
            t_eval = time.time()
            val = window_loss(model, eval_windows, batch_size)
            history.append({"step": step, "heldout_loss": val, "elapsed_s": time.time() - start})
            log(f"step {step} held-out window loss {val:.4f} (ppl {math.exp(val):.2f}) [{time.time() - t_eval:.1f} s]")
    train_s = time.time() - start
    epochs = tokens_seen / n_train_tokens
    log(f"trained {step} steps, {tokens_seen} tokens ({epochs:.2f} epochs) in {train_s / 60:.1f} min")

    # (d) the checkpoint folder
    save_demo(model, tok_path, out_dir)
    ckpt_bytes = (out_dir / "consolidated.00.pth").stat().st_size
    log(f"wrote {out_dir} (consolidated.00.pth: {ckpt_bytes / 1e6:.2f} MB)")

    # (e) evaluation through llama's inference path
    result = {
        "params": meta_params(args),
        "n_params": n_params,
        "vocab_size": vocab_size,
        "checkpoint_bytes": ckpt_bytes,
        "train": {
            "steps": step, "tokens": tokens_seen, "epochs": tokens_seen / n_train_tokens, "seconds": train_s,
            "tokens_per_s": tokens_seen / train_s, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
            "max_steps": max_steps, "minutes": minutes, "seed": seed, "threads": threads, "history": history,
        },
        "data": {
            "fortunes": len(texts), "train_fortunes": len(train_texts), "heldout_fortunes": len(heldout_texts),
            "train_chars": sum(map(len, train_texts)), "heldout_chars": sum(map(len, heldout_texts)),
            "train_tokens": n_train_tokens,
        },
    }  # fmt: skip
    result.update(evaluate(out_dir, train_texts, heldout_texts, seq_len, model, write_test_data))
    Path(metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics).write_text(json.dumps(result, indent=2) + "\n")
    log(f"metrics written to {metrics}")
    return result


def write_words(train_texts: list[str], path: Path, min_count: int = WORDS_MIN_COUNT) -> int:
    """Write the lower-cased alphabetic words seen at least min_count times in the train text, one a line."""
    words = Counter(w.lower() for t in train_texts for w in re.findall(r"[A-Za-z]+", t))
    keep = sorted(w for w, c in words.items() if c >= min_count)
    path.write_text("\n".join(keep) + "\n")
    return len(keep)


def evaluate(
    ckpt_dir: Path,
    train_texts: list[str],
    heldout_texts: list[str],
    seq_len: int,
    train_model: Optional[TrainTransformer] = None,
    write_test_data: bool = True,
) -> dict:
    """Held-out perplexity of the saved checkpoint (via Llama.build) and of a unigram baseline, plus samples."""
    t0 = time.time()
    g = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=seq_len, max_batch_size=16,
                    device="cpu", dtype=torch.float32)  # fmt: skip
    tok = g.tokenizer
    heldout = demo_eval.target_documents(tok, heldout_texts)
    train = demo_eval.target_documents(tok, train_texts)
    nll, n = demo_eval.model_nll(g, heldout)
    counts = demo_eval.unigram_counts(train)
    u_nll, u_n = demo_eval.unigram_nll(counts, heldout, tok.n_words, add=1.0)
    assert u_n == n
    n_chars = sum(len(t) for t in heldout_texts) + len(heldout_texts)  # + 1 per text for its end
    res: dict = {
        "heldout": {
            "tokens": n, "model_ppl": demo_eval.perplexity(nll, n), "unigram_ppl": demo_eval.perplexity(u_nll, u_n),
            "model_bits_per_char": nll / math.log(2) / n_chars, "unigram_bits_per_char": u_nll / math.log(2) / n_chars,
        },
    }  # fmt: skip
    log(f"held-out ({n} tokens): model ppl {res['heldout']['model_ppl']:.3f}, "
        f"unigram ppl {res['heldout']['unigram_ppl']:.3f} [{time.time() - t0:.1f} s]")  # fmt: skip

    if train_model is not None:
        # The training network and llama.model.Transformer must compute the same function: compare the logits of
        # the training model with bf16-rounded weights to those of the loaded checkpoint.
        ref = TrainTransformer(train_model.params)
        ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in train_model.state_dict().items()})
        ref.eval()
        x = torch.tensor([demo_eval.chunks(heldout[:1], tok.bos_id, seq_len)[0]])
        with torch.no_grad():
            diff = float((ref(x) - g.model.forward(x, 0)).abs().max())
        res["train_vs_inference_max_logit_diff"] = diff
        log(f"training network vs llama.model.Transformer: max |logit difference| {diff:.2e}")
        assert diff < 1e-3, diff

    # The held-out sample for tests/test_demo.py and the figures the test compares against.
    sample, size = [], 0
    for t in heldout_texts:
        if size >= TEST_SAMPLE_BYTES:
            break
        sample.append(t)
        size += len((t + "\n%\n").encode("utf-8"))
    s_docs = demo_eval.target_documents(tok, sample, max_tokens=demo_eval.TEST_MAX_TOKENS)
    s_nll, s_n = demo_eval.model_nll(g, s_docs)
    o_nll, _ = demo_eval.unigram_nll(demo_eval.unigram_counts(s_docs), s_docs, tok.n_words, add=0.0)
    t_nll, _ = demo_eval.unigram_nll(counts, s_docs, tok.n_words, add=1.0)
    res["test_sample"] = {
        "texts": len(sample), "bytes": size, "tokens": s_n, "model_ppl": demo_eval.perplexity(s_nll, s_n),
        "unigram_ppl_train_counts": demo_eval.perplexity(t_nll, s_n),
        "unigram_ppl_oracle": demo_eval.perplexity(o_nll, s_n),
    }  # fmt: skip
    log(f"test sample: {res['test_sample']}")
    if write_test_data:
        data_dir = REPO / "tests" / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        demo_eval.write_texts(data_dir / "demo_heldout.txt", sample)
        n_words = write_words(train_texts, data_dir / "demo_words.txt")
        log(f"wrote {data_dir / 'demo_heldout.txt'} and {data_dir / 'demo_words.txt'} ({n_words} words)")

    samples = []
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.9)):
        g = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=128, max_batch_size=4,
                        device="cpu", dtype=torch.float32, seed=1)  # fmt: skip
        outs = g.text_completion(PROMPTS, temperature=temperature, top_p=top_p, max_gen_len=64)
        for p, o in zip(PROMPTS, outs):
            samples.append({"temperature": temperature, "top_p": top_p, "prompt": p, "generation": o["generation"]})
            log(f"T={temperature} {p!r} -> {o['generation']!r}")
    res["samples"] = samples
    return res


if __name__ == "__main__":
    fire_checked(main, serialize=lambda metrics: None)  # the metrics are logged and written, not printed again
