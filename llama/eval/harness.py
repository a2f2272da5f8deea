"""This library's model for EleutherAI's lm-evaluation-harness (lm-eval 0.4), registered as ``llama``.

    python -m llama.eval lm-eval --model llama --model_args ckpt_dir=DIR,tokenizer_path=P,dtype=float32 --tasks T

lm-eval 0.4 finds no models by entry point: importing this module registers ``llama`` (``register_model``), so the
Python API needs ``import llama.eval.harness`` before ``lm_eval.simple_evaluate(model="llama", ...)``, or pass a
``LlamaLM`` itself as ``model=``. model_args: ``ckpt_dir``, ``tokenizer_path`` (default: the folder's own
tokenizer.model, else the one next to it), ``max_seq_len`` (2048), ``max_batch_size`` (rows per forward pass and
the KV cache's rows; default lm-eval's ``--batch_size`` when above 1, else 8), ``dtype``, ``device``,
``quantize`` (int8/int4), ``compile`` (the fast path), ``seed``, ``max_gen_toks`` (256).

- ``loglikelihood``: (context, continuation) pairs tokenized as lm-eval's TemplateLM does (the pair encoded whole,
  the context's tokens split off; the context encoded with BOS as Meta's ``text_completion`` does), left-truncated
  to max_seq_len + 1 tokens, deduplicated (multiple-choice answers of one token share one input), sorted longest
  first and run max_batch_size rows a forward pass (``Transformer.forward`` or, with ``compile=True``,
  ``FastDecoder.prefill``). Each answer is (sum of the continuation's log-probabilities, whether greedy decoding
  gives it).
- ``loglikelihood_rolling``: the document's tokens (no BOS) in windows of max_seq_len, the first behind BOS,
  each later one scoring up to max_seq_len new tokens with the tokens before them as context: each token is
  scored exactly once, with as much context as fits.
- ``generate_until``: the decoding loop with ``until`` as stop strings (the generation ends before the first one)
  and ``max_gen_toks`` as the length budget; greedy unless ``do_sample`` (then ``temperature``, ``top_p``); the
  context keeps its last max_seq_len - max_gen_toks tokens.
- chat templates (``--apply_chat_template``): the family's own chat format (``generator.formatter``: Llama 2's
  ``[INST]``, Llama 3's headers) gives the prompt's token ids; the text handed to lm-eval is their rendering, and
  the ids are remembered for it, so what the model sees is exactly ``encode_dialog_prompt``'s.

Under torchrun (model parallel) every rank builds the model and runs every request, in the same order, so the
ranks make the same forward calls; the model reports rank 0 of 1 on every rank (lm-eval then lets only
LOCAL_RANK 0 report), and only the main process shows progress.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional, Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own models register on this import; without it, only ours would)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llama.checks import parse_dtype
from llama.distributed import is_main_process, launched_by_torchrun
from llama.eval.perplexity import default_tokenizer_path, forward_logits
from llama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from llama.generation import Llama

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default

Request = tuple[Optional[tuple[str, str]], list[int], list[int]]  # (strings or None, context ids, continuation ids)


@register_model("llama")
class LlamaLM(TemplateLM):
    """An lm-eval model over ``Llama.build``'s generator (or a given one: ``LlamaLM(generator=...)``)."""

    def __init__(
        self,
        ckpt_dir: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        max_batch_size: Optional[int] = None,
        dtype: Optional[str] = None,
        device: Optional[str] = None,
        quantize: Optional[str] = None,
        compile: bool = False,
        seed: int = 1,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        batch_size: Any = None,
        generator: Optional[Llama] = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for --model llama: {', '.join(sorted(unknown))}; it takes ckpt_dir, "
                             "tokenizer_path, max_seq_len, max_batch_size, dtype, device, quantize, compile, seed, "
                             "max_gen_toks")  # fmt: skip
        if max_batch_size is None:  # lm-eval's --batch_size (1 unless given; "auto" is ours to pick)
            given = str(batch_size) if batch_size is not None else ""
            max_batch_size = int(given) if given.isdigit() and int(given) > 1 else DEFAULT_MAX_BATCH_SIZE
        if generator is None:
            if ckpt_dir is None:
                raise ValueError("--model llama needs model_args ckpt_dir=FOLDER (and tokenizer_path=FILE unless the "
                                 "folder holds its tokenizer.model or has one next to it)")  # fmt: skip
            from llama.generation import Llama

            tokenizer_path = tokenizer_path or default_tokenizer_path(ckpt_dir)
            generator = Llama.build(
                str(ckpt_dir), str(tokenizer_path), max_seq_len=int(max_seq_len), max_batch_size=int(max_batch_size),
                seed=int(seed), device=model_device(device), dtype=parse_dtype(dtype), quantize=quantize,
                compile=bool(compile),
            )  # fmt: skip
        self.generator = generator
        self.tokenizer_path = str(tokenizer_path or "")
        self.params = generator.model.params
        self.max_gen_toks_default = int(max_gen_toks)
        self.fast = generator.fast is not None
        self._device = generator.device
        # Chat prompts handed to lm-eval (their rendering) -> their token ids (apply_chat_template)
        self.chat_prompts: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.generator.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling document are scored behind: BOS, as every Llama prompt starts."""
        return self.generator.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.params.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self.max_gen_toks_default

    @property
    def batch_size(self) -> int:
        return self.params.max_batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """The string's ids: BOS first unless add_special_tokens is False; a chat prompt of ours (or a string that
        starts with one) as the chat format encoded it."""
        chat = self._chat_prefix(string)
        if chat is not None:
            return self.chat_prompts[chat] + self._after_chat(string[len(chat) :])
        return self.generator.tokenizer.encode(string, bos=add_special_tokens is not False, eos=False)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.generator.tokenizer.decode(list(tokens))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context in self.chat_prompts:  # lm-eval's split would move a chat prompt's trailing "\n\n" away
            return list(self.chat_prompts[context]), self._after_chat(continuation)
        return super()._encode_pair(context, continuation)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        for request in requests:
            context, continuation = request.args
            if not continuation:
                raise ValueError(f"{_where(request)}: an empty continuation (context {context[-60:]!r}): there is "
                                 "nothing to score; fix the task's doc_to_choice/doc_to_target")  # fmt: skip
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any):
        """(sum of log-probabilities, greedy) of each request's continuation after its context."""
        limit = self.max_length
        inputs: dict[tuple[int, ...], list[int]] = defaultdict(list)  # input ids -> the requests it serves
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {index}: the continuation encodes to no tokens; nothing to score")
            if len(continuation) > limit:
                raise ValueError(f"request {index}: a continuation of {len(continuation)} tokens does not fit "
                                 f"max_seq_len {limit}; raise max_seq_len in model_args")  # fmt: skip
            whole = (list(context) + list(continuation))[-(limit + 1) :]
            inputs[tuple(whole[:-1])].append(index)
        order = sorted(inputs, key=lambda ids: (-len(ids), ids))  # longest first: the first batch shows the cost
        answers: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood (llama)", file=sys.stderr,
                   disable=disable_tqdm or not is_main_process())  # fmt: skip
        rows = self.params.max_batch_size
        for first in range(0, len(order), rows):
            batch = order[first : first + rows]
            width = len(batch[0])
            grid = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                grid[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logits = forward_logits(self.generator, grid.to(self.generator.device), self.fast)
            for row, ids in enumerate(batch):
                served = inputs[ids]
                longest = max(len(requests[i][2]) for i in served)
                # the logits at the input's last `longest` positions score the continuations' tokens
                logprobs = torch.log_softmax(logits[row, len(ids) - longest : len(ids)].float(), dim=-1)
                greedy = logprobs.argmax(dim=-1)
                for i in served:
                    strings, _, continuation = requests[i]
                    n = len(continuation)
                    targets = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
                    picked = logprobs[longest - n :].gather(1, targets.view(-1, 1))
                    answer = (float(picked.sum()), bool((greedy[longest - n :] == targets).all()))
                    answers[i] = answer
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                    bar.update(1)
        bar.close()
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood, every token scored once (``rolling_windows``)."""
        windows: list[Request] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            if not tokens:
                raise ValueError(f"{_where(request)}: an empty document ({text!r}): there is nothing to score")
            for context, continuation in rolling_windows(tokens, self.prefix_token_id, self.max_length):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, grouped by generation settings and run max_batch_size rows at a time."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        texts: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until (llama)", file=sys.stderr,
                   disable=disable_tqdm or not is_main_process())  # fmt: skip
        for indices in groups.values():
            settings = generation_settings(requests[indices[0]].args[1], self.max_gen_toks, self.max_length)
            room = self.max_length - settings["max_gen_len"]
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(prompts[i]))
            for first in range(0, len(ordered), self.params.max_batch_size):
                batch = ordered[first : first + self.params.max_batch_size]
                done = self.generator.engine.complete([prompts[i] for i in batch], settings["max_gen_len"],
                                                      settings["temperature"], settings["top_p"], logprobs=False,
                                                      echo=False, stop=settings["stop"])  # fmt: skip
                for i, tokens, end in zip(batch, done.tokens, done.ends):
                    # the text up to the first stop string where stop strings were given (as text_completion's)
                    text = end.stream.final_text() if end.stream is not None else self.tok_decode(tokens)
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        bar.close()
        return texts

    # ------------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        return f"llama-{type(self.generator.tokenizer).__name__}-{os.path.basename(self.tokenizer_path)}"

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        """The name of the family's chat format: the prompts are made by its code, not by a Jinja template."""
        formatter = self.generator.formatter
        return None if formatter is None else f"{type(formatter).__module__}.{type(formatter).__name__}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The dialog as the family's chat format encodes it (``encode_dialog_prompt``), rendered as text; its ids
        are kept for that text. Without add_generation_prompt, a last assistant message is a prefix of the answer:
        the dialog before it, then its content."""
        formatter = self.generator.formatter
        if formatter is None:
            raise TypeError("this model's tokenizer belongs to no Llama family: it has no chat format")
        dialog = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        if not add_generation_prompt and len(dialog) > 1 and dialog[-1]["role"] == "assistant":
            ids = formatter.encode_dialog_prompt(dialog[:-1]) + self._after_chat(dialog[-1]["content"])
        else:
            ids = formatter.encode_dialog_prompt(dialog)
        text = self._render(ids)
        self.chat_prompts[text] = ids
        return text

    def _after_chat(self, text: str) -> list[int]:
        """Ids of text that follows a chat prompt, as the chat format encodes an answer. SentencePiece (Llama 2):
        the answer follows "[/INST] " in one string, so one leading space is the piece's own "▁"."""
        tokenizer = self.generator.tokenizer
        if isinstance(tokenizer, Tokenizer):
            if not text.strip():
                return []
            return tokenizer.encode(text[1:] if text.startswith(" ") else text, bos=False, eos=False)
        return tokenizer.encode(text, bos=False, eos=False) if text else []

    def _render(self, ids: Sequence[int]) -> str:
        """Readable text of a prompt's ids: special tokens by name, the rest decoded run by run."""
        tokenizer = self.generator.tokenizer
        names = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
        specials = getattr(tokenizer, "special_tokens", None)
        if isinstance(specials, dict):
            names = {i: name for name, i in specials.items()}
        out, run = [], []
        for token in ids:
            if token in names:
                out.append(tokenizer.decode(run) if run else "")
                out.append(names[token])
                run = []
            else:
                run.append(token)
        out.append(tokenizer.decode(run) if run else "")
        return "".join(out)

    def _chat_prefix(self, string: str) -> Optional[str]:
        """The longest chat prompt of ours that string starts with, or None."""
        if string in self.chat_prompts:
            return string
        found = None
        for text in self.chat_prompts:
            if string.startswith(text) and (found is None or len(text) > len(found)):
                found = text
        return found


def model_device(device: Any) -> Optional[str]:
    """The device to build on for lm-eval's --device, which defaults to "cuda:0" even without CUDA: a CUDA device
    without CUDA is the library's default (the CPU, with a warning); under torchrun any CUDA device is each rank's
    own (cuda:LOCAL_RANK, the library's default), as model parallelism needs."""
    if device is None:
        return None
    text = str(device)
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            logger.warning("--device %s: CUDA is not available, running on the CPU", text)
            return None
        if launched_by_torchrun():
            return None
    return text


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score each of tokens exactly once, each input at most max_len tokens.

    The first window feeds [prefix] + tokens[:n - 1] and scores tokens[:n], n = min(max_len, len(tokens)); each
    later one scores the next (up to max_len) tokens behind the max_len + 1 - their count tokens before them, so
    every prediction has as much context as fits (lm-eval's windows, with one token of required context).
    """
    tokens = list(tokens)
    n = min(max_len, len(tokens))
    windows = [([prefix], tokens[:n])]
    done = n
    while done < len(tokens):
        end = min(done + max_len, len(tokens))
        windows.append((tokens[end - max_len - 1 : done], tokens[done:end]))
        done = end
    return windows


def generation_settings(kwargs: Any, default_max_gen_toks: int, max_seq_len: int) -> dict[str, Any]:
    """lm-eval's gen_kwargs as the decoding loop's arguments: stop strings, max_gen_len, temperature, top_p."""
    if not isinstance(kwargs, dict):
        raise TypeError(f"generate_until's gen_kwargs must be a dict, got {kwargs!r}")
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None)
    stop = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"gen_kwargs until must be non-empty strings, got {until!r}")
    max_gen = int(kwargs.pop("max_gen_toks", default_max_gen_toks))
    if not 1 <= max_gen < max_seq_len:
        raise ValueError(f"max_gen_toks {max_gen} must be in [1, max_seq_len {max_seq_len}): raise max_seq_len in "
                         "model_args or lower max_gen_toks")  # fmt: skip
    sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
    top_p = float(kwargs.pop("top_p", 1.0))
    if not sample:
        temperature = 0.0
    kwargs.pop("max_length", None)
    if kwargs:
        logger.warning("generate_until: ignoring gen_kwargs %s (the llama model takes until, max_gen_toks, "
                       "do_sample, temperature, top_p)", sorted(kwargs))  # fmt: skip
    return {"stop": stop or None, "max_gen_len": max_gen, "temperature": temperature, "top_p": top_p}


def _where(request: Instance) -> str:
    return f"task {request.task_name!r}, document {request.doc_id}"


def cli(args: Sequence[str]) -> int:
    """lm-eval's command line with ``--model llama`` registered (this module's import did it): ``python -m
    llama.eval lm-eval --model llama --model_args ckpt_dir=... --tasks ...``; args are lm-eval's own."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
