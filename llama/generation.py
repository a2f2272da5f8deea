"""Text and chat generation with the reference's API (``Llama.build``, ``generate``, ``text_completion``,
``chat_completion``), built from small functions that can be tested on their own."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, List, Literal, Optional, Sequence, TypedDict

import torch
import torch.nn.functional as F

from llama import checkpoint
from llama.distributed import (
    default_device,
    default_dtype,
    default_dtype_scope,
    is_main_process,
    model_parallel_rank,
    setup_model_parallel,
)
from llama.fast import FastDecoder
from llama.model import ModelArgs, Transformer, check_model_parallel_fit
from llama.stream import TextStream, check_stop
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLE_ERROR = (
    "model only supports 'system', 'user' and 'assistant' roles, "
    "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability reaches p (nucleus sampling).

    probs: (bsz, vocab). The token whose cumulative probability crosses p is kept. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # mass strictly before this token already exceeds p
    probs_sort.masked_fill_(mask, 0.0)  # not probs_sort[mask] = 0: boolean indexing would sync with the host
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


def select_next_token(last_logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids (bsz,) from the logits (bsz, vocab) of the last position: greedy at temperature 0."""
    if temperature > 0:
        probs = torch.softmax(last_logits / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(last_logits, dim=-1).reshape(-1)


def token_logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[:, j]) under logits[:, j]: logits (bsz, n, vocab), targets (bsz, n) -> (bsz, n)."""
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@dataclass
class DecodeState:
    """A batch being decoded: the token grid, the per-row state, and how far it has got."""

    tokens: torch.Tensor  # (bsz, total_len), prompts left-aligned, pad_id beyond them until generated
    prompt_lens: list[int]
    is_prompt: torch.Tensor  # (bsz, total_len) bool: position holds a prompt token
    finished: torch.Tensor  # (bsz,) bool: row has produced EOS (or was stopped by the caller)
    token_logprobs: Optional[torch.Tensor]  # (bsz, total_len) fp32 when logprobs are asked for
    filled: int  # positions [0, filled) are final for every row


def _check_sampling(temperature: float, top_p: float, max_gen_len: Optional[int]) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
    if max_gen_len is not None and (not isinstance(max_gen_len, int) or max_gen_len < 1):
        raise ValueError(f"max_gen_len must be a positive integer or None, got {max_gen_len!r}")


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[str | torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        compile: bool = False,
    ) -> Llama:
        """Load a Meta checkpoint folder and its tokenizer, ready to generate.

        Under ``torchrun`` every process holds one model-parallel slice (NCCL on CUDA, gloo on CPU). Without a
        launcher a one-process group is started, so plain ``python`` and notebooks work. A checkpoint saved with
        any number of shards loads on any number of processes that its heads can be split over.

        Args:
            ckpt_dir: folder with ``params.json`` and ``consolidated.NN.pth``.
            tokenizer_path: Meta's ``tokenizer.model``.
            max_seq_len: longest prompt plus generation; sizes the KV cache.
            max_batch_size: most prompts per call; sizes the KV cache.
            model_parallel_size: ranks per model copy; defaults to the world size.
            seed: torch seed, the same on every rank so sampling agrees across ranks.
            device: defaults to ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``.
            dtype: weight dtype; defaults to float16 on CUDA (as the reference) and bfloat16 on CPU.
            compile: decode with the opt-in fast path (``llama.fast``): static shapes, no per-step host sync,
                ``torch.compile``. Same tokens as the default path; one model-parallel rank only.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = default_dtype(device)
        elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")

        # Check the files before starting any process group, so a typo fails fast and clearly.
        params = checkpoint.read_params(ckpt_dir)
        shard_paths = checkpoint.find_shards(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path)

        mp_size = setup_model_parallel(model_parallel_size, device)
        torch.manual_seed(seed)  # same seed on every rank: they must sample the same tokens

        start = time.time()
        model_args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        model_args.vocab_size = tokenizer.n_words
        check_model_parallel_fit(model_args, mp_size)
        with torch.device(device), default_dtype_scope(dtype):
            model = Transformer(model_args)
        checkpoint.load_weights(model, shard_paths, model_parallel_rank(), mp_size, device, dtype)
        if is_main_process():
            logger.info(
                "loaded %s (%d shard(s) on %d rank(s), %s, %s) in %.2f s",
                ckpt_dir, len(shard_paths), mp_size, device, dtype, time.time() - start,
            )
        return Llama(model, tokenizer, fast=FastDecoder(model) if compile else None)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, fast: Optional[FastDecoder] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.fast = fast  # decode steps on the static-shape path when set

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ------------------------------------------------------------------ the decoding loop

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token-id lists")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}; "
                "pass fewer prompts per call or build with a larger max_batch_size"
            )
        for i, t in enumerate(prompt_tokens):
            if not isinstance(t, (list, tuple)) or not t:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids")
            if len(t) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, more than max_seq_len={params.max_seq_len}; "
                    "shorten it or build with a larger max_seq_len"
                )
            if not all(isinstance(x, int) and 0 <= x < params.vocab_size for x in t):
                raise ValueError(f"prompt {i} holds token ids outside [0, {params.vocab_size})")

    def _start(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, logprobs: bool) -> DecodeState:
        """Lay the prompts into a (bsz, total_len) grid, as the reference does."""
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(self.model.params.max_seq_len, max_gen_len + max_prompt_len)
        bsz = len(prompt_tokens)
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        is_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
            is_prompt[k, : len(t)] = True
        return DecodeState(
            tokens=tokens,
            prompt_lens=[len(t) for t in prompt_tokens],
            is_prompt=is_prompt,
            finished=torch.zeros(bsz, dtype=torch.bool, device=self.device),
            token_logprobs=torch.zeros_like(tokens, dtype=torch.float) if logprobs else None,
            filled=min(len(t) for t in prompt_tokens),
        )

    @torch.inference_mode()
    def _decode(self, state: DecodeState, temperature: float, top_p: float) -> Iterator[int]:
        """Run the decoding loop over `state`, yielding each position once every row holds its token there.

        Decoding starts at the shortest prompt; longer prompts have their own tokens forced in until they run
        out. The loop ends at total_len or once every row is finished. A consumer may set rows of
        ``state.finished`` between steps to stop them early.
        """
        tokens, total_len = state.tokens, state.tokens.shape[1]
        eos_id = self.tokenizer.eos_id
        if state.filled == total_len:
            # Nothing to generate (every prompt fills max_seq_len): only score the prompts if asked. Unlike the
            # reference, token t is scored with the logits of position t - 1, and only when logprobs are wanted.
            if state.token_logprobs is not None:
                logits = self.model.forward(tokens, 0)
                state.token_logprobs[:, 1:] = token_logprobs_of(logits[:, :-1], tokens[:, 1:])
            return
        prev_pos = 0
        check_every = 1 if self.fast is None else self.fast.eos_check_every
        for step, cur_pos in enumerate(range(state.filled, total_len), start=1):
            if self.fast is not None and prev_pos > 0:  # one new token per row: the static-shape step
                logits = self.fast(tokens[:, prev_pos:cur_pos], prev_pos)
            else:
                logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (bsz, cur - prev, vocab)
            next_token = select_next_token(logits[:, -1], temperature, top_p)
            # Where the prompt still has a token at cur_pos, keep it.
            next_token = torch.where(state.is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if state.token_logprobs is not None:
                # logits at positions prev..cur-1 score the tokens at prev+1..cur
                state.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = token_logprobs_of(
                    logits, tokens[:, prev_pos + 1 : cur_pos + 1]
                )
            state.finished |= ~state.is_prompt[:, cur_pos] & (next_token == eos_id)
            prev_pos = cur_pos
            state.filled = cur_pos + 1
            yield cur_pos
            # The reference asks every step; the fast path only every few steps, as the answer costs a host
            # sync. Extra steps only add tokens after every row's EOS, which _results cuts off.
            if step % check_every == 0 and bool(state.finished.all()):
                break

    def _results(
        self, state: DecodeState, max_gen_len: int, echo: bool
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Cut each row to its prompt (if echo) plus at most max_gen_len tokens, ending before its first EOS."""
        rows = state.tokens[:, : state.filled].tolist()
        all_logprobs = state.token_logprobs[:, : state.filled].tolist() if state.token_logprobs is not None else None
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(rows):
            plen = state.prompt_lens[i]
            start = 0 if echo else plen
            end = plen + max_gen_len
            # Only generated tokens can end a row: unlike the reference, an EOS inside an echoed prompt
            # (an earlier chat turn) does not cut the prompt short.
            generated = toks[plen:end]
            if self.tokenizer.eos_id in generated:
                end = plen + generated.index(self.tokenizer.eos_id)
            out_tokens.append(toks[start:end])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[i][start:end])
        return out_tokens, (out_logprobs if all_logprobs is not None else None)

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt (a list of token ids) by up to max_gen_len tokens.

        Returns the generated token ids of each prompt (with the prompt in front if echo), cut at the first EOS,
        and, if logprobs, the log-probability under the model of each returned token (0.0 for the first prompt
        token, which nothing predicts).
        """
        _check_sampling(temperature, top_p, max_gen_len)
        self._check_prompts(prompt_tokens)
        state = self._start(prompt_tokens, max_gen_len, logprobs)
        for _ in self._decode(state, temperature, top_p):
            pass
        return self._results(state, max_gen_len, echo)

    def _decode_with_streams(
        self,
        state: DecodeState,
        streams: Sequence[TextStream],
        max_gen_len: int,
        temperature: float,
        top_p: float,
    ) -> Iterator[None]:
        """The decoding loop, with each row's generated tokens fed to its TextStream after every step.

        A row whose text reaches a stop string is marked finished, so the loop ends once every row is done.
        """
        eos_id = self.tokenizer.eos_id
        ended = [False] * len(streams)
        for cur_pos in self._decode(state, temperature, top_p):
            column = state.tokens[:, cur_pos].tolist()
            for row, stream in enumerate(streams):
                plen = state.prompt_lens[row]
                if ended[row] or cur_pos < plen:
                    continue
                if column[row] == eos_id or cur_pos >= plen + max_gen_len:
                    ended[row] = True
                    continue
                stream.add(column[row])
                if stream.stopped:
                    ended[row] = True
                    state.finished[row] = True
            yield

    def _complete(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        stop: Optional[List[str]],
    ) -> tuple[List[List[int]], Optional[List[List[float]]], List[str]]:
        """Token ids, logprobs and text of each completion; without stop strings, exactly ``generate``."""
        stop = check_stop(stop)
        max_gen_len = self._default_gen_len(max_gen_len)
        if not stop:
            tokens, logprobs_ = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
            return tokens, logprobs_, [self.tokenizer.decode(t) for t in tokens]

        _check_sampling(temperature, top_p, max_gen_len)
        self._check_prompts(prompt_tokens)
        state = self._start(prompt_tokens, max_gen_len, logprobs)
        streams = [TextStream(self.tokenizer, stop) for _ in prompt_tokens]
        for _ in self._decode_with_streams(state, streams, max_gen_len, temperature, top_p):
            pass
        tokens, logprobs_ = self._results(state, max_gen_len, echo)
        texts = []
        for row, stream in enumerate(streams):
            # Keep the tokens that cover the text up to the stop string (the last may hold part of it).
            keep = stream.n_tokens_for_text() + (state.prompt_lens[row] if echo else 0)
            tokens[row] = tokens[row][:keep]
            if logprobs_ is not None:
                logprobs_[row] = logprobs_[row][:keep]
            if echo:
                text = self.tokenizer.decode(tokens[row])
                after = len(self.tokenizer.decode(prompt_tokens[row]))
                cuts = [i for i in (text.find(s, after) for s in stop) if i >= 0]
                texts.append(text[: min(cuts)] if cuts else text)
            else:
                texts.append(stream.final_text())
        return tokens, logprobs_, texts

    def _stream(
        self,
        prompt_tokens: List[int],
        temperature: float,
        top_p: float,
        max_gen_len: Optional[int],
        stop: Optional[List[str]],
    ) -> Iterator[str]:
        """Check the arguments now, then return an iterator of text deltas for one prompt."""
        stop = check_stop(stop)
        max_gen_len = self._default_gen_len(max_gen_len)
        _check_sampling(temperature, top_p, max_gen_len)
        self._check_prompts([prompt_tokens])
        return self._stream_deltas(prompt_tokens, temperature, top_p, max_gen_len, stop)

    def _stream_deltas(
        self, prompt_tokens: List[int], temperature: float, top_p: float, max_gen_len: int, stop: List[str]
    ) -> Iterator[str]:
        state = self._start([prompt_tokens], max_gen_len, logprobs=False)
        stream = TextStream(self.tokenizer, stop)
        for _ in self._decode_with_streams(state, [stream], max_gen_len, temperature, top_p):
            piece = stream.delta()
            if piece:
                yield piece
        piece = stream.delta(final=True)
        if piece:
            yield piece

    # ------------------------------------------------------------------ text and chat

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Optional[List[str]] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt string; see ``generate`` for the arguments.

        stop: strings that end a row's generation as soon as its text contains one; the returned text ends
        right before the first of them. Other rows go on.
        """
        _check_prompt_strings(prompts)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, logprobs_, texts = self._complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop)
        if logprobs:
            return [
                {"generation": text, "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for text, t, lp in zip(texts, tokens, logprobs_)
            ]
        return [{"generation": text} for text in texts]

    def text_completion_stream(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas, as its tokens are generated.

        The deltas join to exactly the ``generation`` that ``text_completion([prompt], ...)`` returns with the
        same arguments and seed. A delta never holds half of a multi-byte character, nor text that could still
        turn out to begin a stop string.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self._stream(self.tokenizer.encode(prompt, bos=True, eos=False), temperature, top_p, max_gen_len, stop)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[List[str]] = None,
    ) -> List[ChatPrediction]:
        """Answer the last user message of each dialog as the assistant, in the Llama 2 chat format.

        stop: as for ``text_completion``.
        """
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError("dialogs must be a list of dialogs (each a list of {'role', 'content'} messages)")
        prompt_tokens = [encode_dialog(self.tokenizer, dialog) for dialog in dialogs]
        unsafe_requests = [has_special_tags(dialog) for dialog in dialogs]
        tokens, logprobs_, texts = self._complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, stop)
        results: List[ChatPrediction] = []
        for i, t in enumerate(tokens):
            content = UNSAFE_ERROR if unsafe_requests[i] else texts[i]
            result: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in t]
                result["logprobs"] = logprobs_[i]
            results.append(result)
        return results

    def chat_completion_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> Iterator[str]:
        """Yield the assistant's answer to one dialog as text deltas; they join to the ``chat_completion`` content."""
        prompt_tokens = encode_dialog(self.tokenizer, dialog)
        if has_special_tags(dialog):
            check_stop(stop)
            return iter([UNSAFE_ERROR])
        return self._stream(prompt_tokens, temperature, top_p, max_gen_len, stop)


def _check_prompt_strings(prompts: List[str]) -> None:
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of str (wrap a single prompt in a list)")


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Token ids of a dialog in the Llama 2 chat format.

    A leading system message is folded into the first user message between <<SYS>> tags. Each earlier
    (user, assistant) pair becomes ``<s>[INST] user [/INST] answer </s>``; the last user message becomes
    ``<s>[INST] user [/INST]``, which the model continues with its answer.
    """
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("each dialog must be a non-empty list of messages")
    for msg in dialog:
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise TypeError(f"each message must be a dict with 'role' and 'content', got {msg!r}")
        if not isinstance(msg["content"], str):
            raise TypeError(f"message content must be a str, got {type(msg['content']).__name__}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {msg['role']!r}: {ROLE_ERROR}")
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise ValueError(f"Last message must be from user, got {dialog[-1]['role']}")
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + list(dialog[2:])
    if not (
        all(msg["role"] == "user" for msg in dialog[::2])
        and all(msg["role"] == "assistant" for msg in dialog[1::2])
    ):
        raise ValueError(ROLE_ERROR)
    if dialog[-1]["role"] != "user":
        raise ValueError(f"Last message must be from user, got {dialog[-1]['role']}")
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens
