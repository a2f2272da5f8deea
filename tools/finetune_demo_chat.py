"""Fine-tune the demo model (llama/demo/) so that it answers in the Llama 2 chat format, on CPU.

The model trained by tools/train_demo.py has only seen plain fortunes, so after ``<s>[INST] user [/INST]`` it
predicts EOS and ``chat_completion`` returns empty answers. This script continues training it for a few minutes
on a mix of

* plain fortunes, exactly as in train_demo.py (``BOS text EOS`` packed into windows), by default half of every
  batch, so that held-out perplexity does not suffer, and
* chat samples built from the TRAIN split of the fortunes only: a user message (one of the generic prompts below,
  the first lines of a fortune whose remaining lines are the answer, or a line of another fortune), sometimes
  with a system prompt and sometimes after a first exchange, answered by a train fortune. The prompt tokens come
  from ``Llama2ChatFormat.encode_dialog_prompt``; the answer tokens are ``tokenizer.encode(answer + " ")`` followed by
  EOS, which is exactly how the chat format encodes a finished exchange. The loss of a chat sample is computed on
  its final answer tokens (and that answer's EOS) only.

The tokenizer, params.json and the architecture stay as they are; consolidated.00.pth is overwritten (bfloat16).

    python tools/finetune_demo_chat.py --minutes 10 > runs/finetune_chat.log 2>&1
    python tools/finetune_demo_chat.py --max_steps 300 --minutes 1000    # a fixed number of steps: reproducible

As in train_demo.py, --minutes alone runs the cosine schedule on wall-clock time; --max_steps runs it on steps.
Note that --init defaults to llama/demo/, which is also the default --out: a second run fine-tunes the
fine-tuned model again. Start from the base model (tools/train_demo.py, or --init on a copy of it) to reproduce.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make llama and tools importable
    sys.path.insert(0, str(REPO))

from example_chat_completion import DIALOGS  # noqa: E402
from llama import Dialog, Llama  # noqa: E402
from llama.chat_format import Llama2ChatFormat  # noqa: E402
from llama.commandline import fire_checked  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402
from tools.train_demo import (  # noqa: E402
    TrainTransformer,
    epoch_windows,
    evaluate,
    load_fortunes,
    log,
    lr_at,
    meta_params,
    save_demo,
    split_fortunes,
    window_loss,
)

# Generic requests a user might type; any train fortune is taken as the (fortune-cookie) answer.
USER_PROMPTS = [
    "Tell me something wise.",
    "Say something funny.",
    "What do you think about life?",
    "Give me a quote.",
    "Do you have any advice for me?",
    "Tell me a joke.",
    "Cheer me up, please.",
    "What is the secret of happiness?",
    "Can you tell me my fortune?",
    "I am bored. Say something.",
    "What should I do today?",
    "Share a thought with me.",
    "What do you know about computers?",
    "Any words of wisdom?",
    "How do I become a better person?",
    "What is love?",
    "Why do people work so hard?",
    "Tell me something I don't know.",
    "Say something clever.",
    "What would you tell a young programmer?",
    "Is there a lesson in all this?",
    "Give me some advice about money.",
    "What makes a good friend?",
    "Write me a short poem.",
    "Tell me a short story.",
    "What is the meaning of it all?",
    "Hello! How are you?",
    "Explain the world to me.",
    "What did the wise man say?",
    "I need some inspiration.",
    "Say something about women and men.",
    "What is your favourite saying?",
    "Make me laugh.",
    "What happens next?",
    "Can you help me with a question?",
    "Please give me a fortune cookie.",
]

SYSTEM_PROMPTS = [
    "You are a fortune cookie. Answer every message with a fortune.",
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a witty old philosopher.",
    "Always reply with a quotation.",
    "Be kind and keep it short.",
    "You are a friendly assistant who likes jokes.",
    "Answer like a Unix guru.",
]

# Follow-up requests for the second turn of two-turn dialogs.
FOLLOW_UPS = [
    "Another one, please.",
    "Tell me more.",
    "That was good. One more?",
    "What else?",
    "Hmm. And now something different.",
    "Go on.",
    "I don't get it. Try again.",
    "Nice! Give me another.",
]

EVAL_DIALOGS: list[Dialog] = DIALOGS  # the example script's dialogs; none of them is in the training mix

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def _words(text: str) -> int:
    return len(re.findall(r"[A-Za-z]+", text))


def split_question_answer(text: str, rng: random.Random) -> Optional[tuple[str, str]]:
    """Cut a fortune at a line (or else sentence) boundary into (question, answer), or None when it has none.

    Both parts need at least three words, and the answer must not be just an attribution (``-- Somebody``).
    """
    lines = text.split("\n")
    cuts = [("\n".join(lines[:i]), "\n".join(lines[i:])) for i in range(1, len(lines))]
    if not cuts:
        parts = SENTENCE_END.split(text)
        cuts = [(" ".join(parts[:i]), " ".join(parts[i:])) for i in range(1, len(parts))]
    cuts = [
        (q.strip(), a.strip()) for q, a in cuts if _words(q) >= 3 and _words(a) >= 3 and not a.strip().startswith("--")
    ]
    return rng.choice(cuts) if cuts else None


def random_line(texts: list[str], rng: random.Random) -> str:
    """A line of at least three words from a random text, without its attribution dashes."""
    while True:
        lines = [ln.strip() for ln in rng.choice(texts).split("\n")]
        lines = [ln for ln in lines if _words(ln) >= 3 and not ln.startswith("--")]
        if lines:
            return rng.choice(lines)


class ChatSampler:
    """Random chat-formatted samples whose answers (and user lines) are the given train fortunes."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        train_texts: list[str],
        rng: random.Random,
        max_answer_tokens: int = 128,
        max_len: int = 257,
        p_system: float = 0.25,
        p_two_turn: float = 0.2,
        kinds: tuple[tuple[str, float], ...] = (("prompt", 0.5), ("split", 0.25), ("line", 0.25)),
    ):
        self.tok, self.texts, self.rng, self.max_len = tokenizer, train_texts, rng, max_len
        self.answers = [t for t in train_texts if len(tokenizer.encode(t, bos=False, eos=False)) <= max_answer_tokens]
        self.p_system, self.p_two_turn = p_system, p_two_turn
        self.kind_names = [k for k, _ in kinds]
        self.kind_weights = [w for _, w in kinds]

    def exchange(self, first: bool) -> tuple[str, str]:
        """(user message, answer) of one exchange."""
        rng = self.rng
        kind = rng.choices(self.kind_names, self.kind_weights)[0] if first else "follow_up"
        if kind == "split":
            qa = split_question_answer(rng.choice(self.answers), rng)
            if qa is not None:
                return qa
            kind = "prompt"
        if kind == "line":
            return random_line(self.texts, rng), rng.choice(self.answers)
        if kind == "follow_up":
            return rng.choice(FOLLOW_UPS), rng.choice(self.answers)
        return rng.choice(USER_PROMPTS), rng.choice(self.answers)

    def dialog(self) -> tuple[Dialog, str]:
        """(dialog ending with a user message, the answer to train on)."""
        rng = self.rng
        dialog: Dialog = []
        if rng.random() < self.p_system:
            dialog.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        user, answer = self.exchange(first=True)
        if rng.random() < self.p_two_turn:
            dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            user, answer = self.exchange(first=False)
        dialog.append({"role": "user", "content": user})
        return dialog, answer

    def sample(self) -> tuple[list[int], int]:
        """(tokens, n_prompt): the encoded dialog with its answer and EOS; the loss goes on tokens[n_prompt:]."""
        while True:
            dialog, answer = self.dialog()
            tokens, n_prompt = encode_chat_sample(self.tok, dialog, answer)
            if len(tokens) <= self.max_len:
                return tokens, n_prompt


def encode_chat_sample(tokenizer: Tokenizer, dialog: Dialog, answer: str) -> tuple[list[int], int]:
    """The dialog's prompt followed by the answer as the chat format encodes a finished exchange, and EOS."""
    prompt = Llama2ChatFormat(tokenizer).encode_dialog_prompt(dialog)
    return prompt + tokenizer.encode(answer.strip() + " ", bos=False, eos=True), len(prompt)


def chat_windows(samples: list[tuple[list[int], int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole samples, in the given order, into windows of seq_len + 1 tokens (padded with pad_id).

    Returns (windows (n, seq_len + 1), target mask (n, seq_len)): the mask is True where the target (the token
    at position j + 1) belongs to a sample's answer. Every window starts with a sample's BOS.
    """
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    row: list[int] = []
    mask: list[bool] = []  # one entry per token of row: is it a target to train on
    for tokens, n_prompt in samples:
        if len(row) + len(tokens) > seq_len + 1:
            rows.append(row + [pad_id] * (seq_len + 1 - len(row)))
            masks.append(mask + [False] * (seq_len + 1 - len(mask)))
            row, mask = [], []
        row += tokens
        mask += [False] * n_prompt + [True] * (len(tokens) - n_prompt)
    if row:
        rows.append(row + [pad_id] * (seq_len + 1 - len(row)))
        masks.append(mask + [False] * (seq_len + 1 - len(mask)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)[:, 1:]


def load_train_model(init: Path, tokenizer: Tokenizer, seq_len: int) -> TrainTransformer:
    """The training network with the weights of the checkpoint folder `init` (bfloat16 weights become fp32)."""
    params = json.loads((init / "params.json").read_text())
    args = ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"], n_kv_heads=params["n_kv_heads"],
        vocab_size=tokenizer.n_words, multiple_of=params["multiple_of"],
        ffn_dim_multiplier=params["ffn_dim_multiplier"], norm_eps=params["norm_eps"],
        rope_theta=params["rope_theta"], max_seq_len=seq_len,
    )  # fmt: skip
    model = TrainTransformer(args)
    state = torch.load(init / "consolidated.00.pth", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


@torch.no_grad()
def masked_loss(model: TrainTransformer, windows: torch.Tensor, mask: torch.Tensor, batch_size: int) -> float:
    """Mean loss over the masked targets of the windows."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w, m = windows[i : i + batch_size], mask[i : i + batch_size]
        nll = F.cross_entropy(model(w[:, :-1]).transpose(1, 2), w[:, 1:], reduction="none")
        total += float(nll[m].sum())
        n += int(m.sum())
    model.train()
    return total / n


@torch.no_grad()
def empty_start_probability(model: TrainTransformer, tokenizer: Tokenizer, dialogs: list[Dialog]) -> float:
    """Mean probability that the first answer token of each dialog is EOS or a line break (an empty first line)."""
    model.eval()
    ids = [tokenizer.eos_id, tokenizer.sp_model.piece_to_id("<0x0A>")]
    probs = []
    for dialog in dialogs:
        x = torch.tensor([Llama2ChatFormat(tokenizer).encode_dialog_prompt(dialog)])
        probs.append(float(model(x)[0, -1].softmax(-1)[ids].sum()))
    model.train()
    return sum(probs) / len(probs)


def chat_samples(ckpt_dir: Path, max_gen_len: int = 48) -> list[dict]:
    """Answers to EVAL_DIALOGS from Llama.chat_completion (float32, seed 1 at build), greedy and sampled."""
    out = []
    for temperature, top_p in ((0.0, 1.0), (0.6, 0.9)):
        g = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=512, max_batch_size=8,
                        device="cpu", dtype=torch.float32, seed=1)  # fmt: skip
        results = g.chat_completion(EVAL_DIALOGS, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        for dialog, r in zip(EVAL_DIALOGS, results):
            answer = r["generation"]["content"]
            out.append({"temperature": temperature, "top_p": top_p, "dialog": dialog, "answer": answer})
            log(f"T={temperature} {dialog[-1]['content']!r} -> {answer!r}")
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(
    init: str = str(REPO / "llama" / "demo"),
    out: str = str(REPO / "llama" / "demo"),
    data: str = str(REPO / "data" / "fortunes.jsonl"),
    minutes: float = 10.0,
    max_steps: Optional[int] = None,
    seq_len: int = 256,
    batch_size: int = 16,
    plain_fraction: float = 0.5,
    lr: float = 5e-4,
    min_lr_ratio: float = 0.1,
    warmup: int = 10,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 4321,
    threads: int = 2,
    log_every: int = 10,
    eval_every: int = 50,
    metrics: str = str(REPO / "runs" / "demo_chat_metrics.json"),
) -> dict:
    """Fine-tune the checkpoint in `init` for chat and write it to `out`; returns (and writes) the evaluation."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    init_dir, out_dir = Path(init), Path(out)
    budget_s = minutes * 60.0
    n_plain = round(batch_size * plain_fraction)
    n_chat = batch_size - n_plain
    init_sha = {name: sha256(init_dir / name) for name in ("consolidated.00.pth", "tokenizer.model")}
    log(f"init {init_dir}: {json.dumps(init_sha)}")

    texts = load_fortunes(data)
    train_texts, heldout_texts = split_fortunes(texts)
    tok_path = init_dir / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    train_docs = [tokenizer.encode(t, bos=False, eos=False) for t in train_texts]
    heldout_docs = [tokenizer.encode(t, bos=False, eos=False) for t in heldout_texts]
    model = load_train_model(init_dir, tokenizer, seq_len)
    args = model.params
    log(f"{len(train_texts)} train fortunes, {len(heldout_texts)} held out; model {json.dumps(meta_params(args))}")

    # chat samples: the train fortunes only
    sampler = ChatSampler(tokenizer, train_texts, rng, max_len=seq_len + 1)
    n_chat_samples = len(train_texts)  # samples drawn per chat "epoch" (fresh pairings each time)
    for _ in range(3):
        d, a = sampler.dialog()
        log(f"chat sample: {d!r} -> {a!r}")

    # monitoring: plain held-out windows (as in train_demo.py), chat answers that are held-out fortunes to
    # generic prompts (evaluation only, never trained on), and P(EOS or newline first) on the example dialogs
    eval_windows = epoch_windows(heldout_docs, 1, 2, seq_len, torch.Generator().manual_seed(0))[:32]
    eval_rng = random.Random(0)
    eval_chat = [
        encode_chat_sample(tokenizer, [{"role": "user", "content": eval_rng.choice(USER_PROMPTS)}], t)
        for t in heldout_texts[:200]
        if len(tokenizer.encode(t, bos=False, eos=False)) <= 128
    ]
    eval_chat_windows, eval_chat_mask = chat_windows(eval_chat, seq_len, tokenizer.eos_id)

    def evaluate_now(step: int) -> dict:
        t_eval = time.time()
        res = {
            "step": step,
            "heldout_loss": window_loss(model, eval_windows, batch_size),
            "chat_answer_loss": masked_loss(model, eval_chat_windows, eval_chat_mask, batch_size),
            "p_empty_start": empty_start_probability(model, tokenizer, EVAL_DIALOGS),
        }
        log(f"step {step}: held-out window loss {res['heldout_loss']:.4f} (ppl {math.exp(res['heldout_loss']):.2f}), "
            f"held-out chat answer loss {res['chat_answer_loss']:.4f}, P(EOS or \\n first) {res['p_empty_start']:.3f} "
            f"[{time.time() - t_eval:.1f} s]")  # fmt: skip
        return res

    history = [evaluate_now(0)]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip

    def new_chat_windows() -> tuple[torch.Tensor, torch.Tensor]:
        w, m = chat_windows([sampler.sample() for _ in range(n_chat_samples)], seq_len, tokenizer.eos_id)
        perm = torch.randperm(len(w), generator=gen)
        return w[perm], m[perm]

    plain, plain_pos = epoch_windows(train_docs, 1, 2, seq_len, gen), 0
    chat, chat_mask, chat_pos = *new_chat_windows(), 0
    log(f"{len(plain)} plain windows and {len(chat)} chat windows per epoch; batches of {n_plain} plain + "
        f"{n_chat} chat windows")  # fmt: skip
    step, plain_tokens, chat_tokens, chat_targets = 0, 0, 0, 0
    start = time.time()
    last_t, loss_sum, loss_n = start, 0.0, 0
    while True:
        elapsed = time.time() - start
        if max_steps is not None and step >= max_steps:
            break
        if elapsed >= budget_s:
            log(f"time budget of {minutes} min reached at step {step}")
            break
        if plain_pos + n_plain > len(plain):
            plain, plain_pos = epoch_windows(train_docs, 1, 2, seq_len, gen), 0
        if chat_pos + n_chat > len(chat):
            chat, chat_mask, chat_pos = *new_chat_windows(), 0
        batch = torch.cat([plain[plain_pos : plain_pos + n_plain], chat[chat_pos : chat_pos + n_chat]])
        mask = torch.cat([
            torch.ones(n_plain, seq_len, dtype=torch.bool), chat_mask[chat_pos : chat_pos + n_chat]
        ])  # fmt: skip
        plain_pos, chat_pos = plain_pos + n_plain, chat_pos + n_chat
        progress = step / max_steps if max_steps is not None else elapsed / budget_s
        cur_lr = lr_at(step, progress, lr, warmup, min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        nll = F.cross_entropy(model(batch[:, :-1]).transpose(1, 2), batch[:, 1:], reduction="none")
        loss = nll[mask].mean()  # plain windows: every target; chat windows: the answers' tokens and EOS only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        plain_tokens += n_plain * seq_len
        chat_tokens += n_chat * seq_len
        chat_targets += int(mask[n_plain:].sum())
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        if step % log_every == 0:
            now = time.time()
            tps = log_every * batch_size * seq_len / (now - last_t)
            log(f"step {step} loss {loss_sum / loss_n:.4f} lr {cur_lr:.2e} {tps:.0f} tok/s "
                f"elapsed {(now - start) / 60:.1f} min")  # fmt: skip
            last_t, loss_sum, loss_n = now, 0.0, 0
        if eval_every and step % eval_every == 0:
            history.append(evaluate_now(step))
    train_s = time.time() - start
    log(f"fine-tuned {step} steps in {train_s / 60:.2f} min: {plain_tokens} plain tokens, {chat_tokens} chat window "
        f"tokens ({chat_targets} answer targets)")  # fmt: skip
    history.append(evaluate_now(step))

    save_demo(model, tok_path, out_dir)
    ckpt_bytes = (out_dir / "consolidated.00.pth").stat().st_size
    assert sha256(out_dir / "tokenizer.model") == init_sha["tokenizer.model"]
    log(f"wrote {out_dir} (consolidated.00.pth: {ckpt_bytes / 1e6:.2f} MB)")

    result = {
        "init": str(init_dir), "init_sha256": init_sha, "checkpoint_bytes": ckpt_bytes,
        "checkpoint_sha256": sha256(out_dir / "consolidated.00.pth"),
        "finetune": {
            "steps": step, "seconds": train_s, "plain_tokens": plain_tokens, "chat_window_tokens": chat_tokens,
            "chat_answer_targets": chat_targets, "tokens_per_s": (plain_tokens + chat_tokens) / train_s,
            "batch_size": batch_size, "plain_rows": n_plain, "chat_rows": n_chat, "seq_len": seq_len, "lr": lr,
            "min_lr_ratio": min_lr_ratio, "warmup": warmup, "max_steps": max_steps, "minutes": minutes,
            "seed": seed, "threads": threads, "history": history,
        },
    }  # fmt: skip
    result.update(evaluate(out_dir, train_texts, heldout_texts, seq_len, model, write_test_data=False))
    result["chat_samples"] = chat_samples(out_dir)
    Path(metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics).write_text(json.dumps(result, indent=2) + "\n")
    log(f"metrics written to {metrics}")
    return result


if __name__ == "__main__":
    fire_checked(main, serialize=lambda metrics: None)  # the metrics are logged and written, not printed again
