"""Held-out evaluation of the demo model (llama/demo/), shared by tools/train_demo.py and tests/test_demo.py.

Every text is scored as one document: its tokens followed by EOS, cut into pieces of at most chunk_len - 1
tokens, each fed to the model behind a BOS at position 0. Every document token and every EOS is predicted
exactly once; BOS itself is never a target. Perplexity is exp(mean negative log-likelihood per target token).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from llama import Llama
from llama.tokenizer import Tokenizer

SEPARATOR = "%"  # the fortune file format: texts separated by lines holding only "%"
TEST_MAX_TOKENS = 3000  # tokens of tests/data/demo_heldout.txt that tests/test_demo.py scores


def read_texts(path: str | Path) -> list[str]:
    """The texts of a file in fortune format."""
    raw = Path(path).read_text(encoding="utf-8")
    return [t.strip("\n") for t in re.split(r"^%\n", raw + "\n", flags=re.M) if t.strip()]


def write_texts(path: str | Path, texts: Iterable[str]) -> None:
    Path(path).write_text("".join(t + "\n" + SEPARATOR + "\n" for t in texts), encoding="utf-8")


def target_documents(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: Optional[int] = None) -> list[list[int]]:
    """Token ids of each text plus EOS (the targets), keeping at most max_tokens ids in all."""
    docs: list[list[int]] = []
    left = max_tokens
    for text in texts:
        doc = tokenizer.encode(text, bos=False, eos=True)
        if left is not None:
            if left <= 0:
                break
            doc = doc[:left]
            left -= len(doc)
        docs.append(doc)
    return docs


def chunks(docs: Sequence[Sequence[int]], bos_id: int, chunk_len: int) -> list[list[int]]:
    """[BOS] + piece for every piece of chunk_len - 1 tokens of every document."""
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be at least 2, got {chunk_len}")
    out = []
    for doc in docs:
        for i in range(0, len(doc), chunk_len - 1):
            out.append([bos_id] + list(doc[i : i + chunk_len - 1]))
    return out


@torch.inference_mode()
def model_nll(generator: Llama, docs: Sequence[Sequence[int]], batch_size: Optional[int] = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every target token of docs under the model, and their number.

    Runs the model's own inference path (``Transformer.forward(tokens, 0)``), so chunks are at most the
    model's max_seq_len and batches at most its max_batch_size.
    """
    params = generator.model.params
    batch_size = params.max_batch_size if batch_size is None else min(batch_size, params.max_batch_size)
    pieces = chunks(docs, generator.tokenizer.bos_id, params.max_seq_len)
    pieces.sort(key=len)  # similar lengths together: less padding
    total, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start : start + batch_size]
        width = max(len(p) for p in batch)
        tokens = torch.zeros((len(batch), width), dtype=torch.long, device=generator.device)
        valid = torch.zeros((len(batch), width - 1), dtype=torch.bool, device=generator.device)
        for i, p in enumerate(batch):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            valid[i, : len(p) - 1] = True
        logits = generator.model.forward(tokens, 0)[:, :-1]  # causal: padding after a row changes nothing
        nll = F.cross_entropy(logits.transpose(1, 2).float(), tokens[:, 1:], reduction="none")
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    return total, count


def unigram_counts(docs: Iterable[Sequence[int]]) -> Counter:
    counts: Counter = Counter()
    for doc in docs:
        counts.update(doc)
    return counts


def unigram_nll(counts: Counter, docs: Iterable[Sequence[int]], vocab_size: int, add: float = 1.0) -> tuple[float, int]:
    """Summed negative log-likelihood of docs' tokens under unigram frequencies smoothed by adding `add`."""
    norm = sum(counts.values()) + add * vocab_size
    total, count = 0.0, 0
    for doc in docs:
        for t in doc:
            p = (counts.get(t, 0) + add) / norm
            if p <= 0:
                return math.inf, count + 1
            total -= math.log(p)
            count += 1
    return total, count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count)
