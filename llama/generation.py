"""Text and chat generation with the reference's API: ``Llama.build``, ``generate``, ``text_completion``,
``chat_completion`` and their streams.

``Llama`` is a facade. ``llama.loader`` loads a checkpoint folder; ``llama.engine.loop.DecodeLoop`` decodes (the
one loop, over the faithful model or the fast path, and the lock on the KV cache); ``llama.engine.ends`` decides
where each row ends and why; ``llama.engine.sampling`` picks tokens; the chat format (``generator.formatter``) comes
from the model's family (``llama.families``). What stays here is text in and text out.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Generator, Iterator, List, Optional, TypedDict

import torch

from llama.chat_format import ChatFormat, Dialog, Message
from llama.checks import check_prompt_strings, check_stop
from llama.engine.batching import Engine
from llama.engine.ends import RowEnd
from llama.engine.loop import DecodeLoop
from llama.engine.requests import RequestHandle, Result, SamplingParams
from llama.engine.sampling import sample_top_p  # noqa: F401  (Meta's llama.generation has it; kept importable)
from llama.engine.stream import ChatStream
from llama.families import family_of
from llama.loader import load
from llama.model import Transformer
from llama.tokenizer import TokenizerLike

if TYPE_CHECKING:
    from llama.engine.fast import FastDecoder

__all__ = ["ChatPrediction", "CompletionPrediction", "Dialog", "Llama", "Message"]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama:
    """The reference's generator: ``build`` loads one; ``generate``, ``text_completion`` and ``chat_completion``
    (and their streams) decode with it."""

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
        rope_scaling_factor: Optional[float] = None,
        timeout_s: Optional[float] = None,
        quantize: Optional[str] = None,
    ) -> Llama:
        """Load a Meta checkpoint folder and its tokenizer, ready to generate.

        Under ``torchrun`` every process holds one model-parallel slice (NCCL on CUDA, gloo on CPU). Without a
        launcher a one-process group is started, so plain ``python`` and notebooks work. A checkpoint saved with
        any number of shards loads on any number of processes that its heads can be split over. Which Llama
        generation it is follows from the tokenizer file (``llama.families``).

        Args:
            ckpt_dir: folder with ``params.json`` and ``consolidated.NN.pth`` (``llama.demo.DEMO_CKPT_DIR`` is the
                built-in demo model's).
            tokenizer_path: Meta's ``tokenizer.model`` (``llama.demo.DEMO_TOKENIZER_PATH`` for the demo model).
            max_seq_len: longest prompt plus generation; sizes the KV cache. A KV cache larger than the memory
                (the GPU's free memory, the host's physical memory) is refused with its size.
            max_batch_size: most prompts per call; sizes the KV cache.
            model_parallel_size: ranks per model copy; defaults to the world size.
            seed: torch seed, the same on every rank so sampling agrees across ranks; any integer
                ``torch.manual_seed`` takes, in [-2**63, 2**64 - 1].
            device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; defaults to ``cuda:LOCAL_RANK`` with CUDA, else
                ``cpu``. Other device types (``meta``, ``mps``...) are refused.
            dtype: weight dtype, torch.float32, torch.float16 or torch.bfloat16; defaults to float16 on CUDA (as
                the reference) and bfloat16 on CPU.
            compile: decode with the opt-in fast path (``llama.engine.fast``): static shapes, no per-step host sync,
                ``torch.compile``. One model-parallel rank only. In fp32 it gives the default path's greedy tokens
                (tests compare them). With ``quantize``, on a CPU, both paths decode with the int8-input kernels
                (``llama.quant``), whose rounding turns the paths' last-bit differences into logits ~1e-2
                apart, so near-ties can pick other tokens; ``llama.quantize.use_int8_inputs(model, False)``
                switches both to the exact kernels, and then the fast path gives the default path's greedy
                tokens in fp32 again. The reference for a quantized model is the default path with exact
                products, ``x @ dequantize(W).T`` (see the README's Quantization section).
            rope_scaling_factor: overrides params.json's (Llama 3.1+ scaled RoPE; Meta's code uses 8, see the
                README on Llama 3.2).
            timeout_s: seconds a collective waits for the other ranks before the job fails with an error naming
                them, instead of hanging (torch's default is 30 min); default ``llama.distributed.DEFAULT_TIMEOUT_S``
                (300 s, why: there). A process group that already exists keeps its own timeout.
            quantize: "int8" or "int4": weight-only quantization of the linear layers while loading
                (``llama.quantize``). A checkpoint written by ``python -m llama.quantize`` loads quantized
                without it.
        """
        loaded = load(
            ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed, device=device,
            dtype=dtype, compile=compile, rope_scaling_factor=rope_scaling_factor, timeout_s=timeout_s,
            quantize=quantize,
        )  # fmt: skip
        return Llama(loaded.model, loaded.tokenizer, fast=loaded.fast, formatter=loaded.formatter)

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        fast: Optional[FastDecoder] = None,
        formatter: Optional[ChatFormat] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        if formatter is None:
            try:
                formatter = family_of(tokenizer).chat_format(tokenizer)
            except TypeError:  # a tokenizer of no family (the benchmarks' stand-ins): no chat
                formatter = None
        self.formatter: Optional[ChatFormat] = formatter  # None: a tokenizer of no family (benchmarks), no chat
        self.fast = fast  # decode steps on the static-shape path when set
        self.engine = DecodeLoop(model, tokenizer, fast)
        self._batching: Optional[Engine] = None
        self._batching_made = threading.Lock()

    @property
    def batching(self) -> Engine:
        """The continuous-batching engine on this Llama's model (``llama.engine.batching``), made on first use: many
        requests at once, from any thread, each decoded as if alone. The streams use it (with one process). It
        shares the KV cache with the batch calls, which wait while it has requests (and it waits for them)."""
        with self._batching_made:
            if self._batching is None:
                self._batching = Engine.for_llama(self)
            return self._batching

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: Optional[int],
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt (a list of token ids) by up to max_gen_len tokens (None: up to max_seq_len).

        max_gen_len=0 generates nothing: with logprobs=True, echo=True it returns each prompt with the
        log-probability of its tokens, from one forward pass (as researchers use the reference for).

        Returns the generated token ids of each prompt (with the prompt in front if echo), cut before the first
        stop id (Llama 2: EOS), and, if logprobs, the log-probability under the model of each returned token
        (0.0 for the first prompt token, which nothing predicts).
        """
        done = self.engine.complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return done.tokens, done.logprobs

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
        check_prompt_strings(prompts)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        done = self.engine.complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop)
        texts = [self._text(tokens, end) for tokens, end in zip(done.tokens, done.ends)]
        if not logprobs:
            return [{"generation": text} for text in texts]
        return [
            {"generation": text, "tokens": self._pieces(t), "logprobs": lp}
            for text, t, lp in zip(texts, done.tokens, done.logprobs)
        ]

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
        prompt_tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        return self._stream(prompt_tokens, temperature, top_p, max_gen_len, stop)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[List[str]] = None,
        echo: bool = False,
    ) -> List[ChatPrediction]:
        """Answer the last user message of each dialog as the assistant, in the chat format of the model's
        generation (``generator.formatter``).

        stop: as for ``text_completion``.
        echo: with logprobs, "tokens" and "logprobs" start with the dialog's prompt tokens (the chat format's
            encoding of it) and their log-probabilities, as ``text_completion``'s do; ``generation`` stays the
            answer alone. ``max_gen_len=0, logprobs=True, echo=True`` scores each dialog's prompt.

        Nothing raises after generation: whatever text the model produced becomes a message
        (``formatter.decode_answer``), which the next dialog accepts as an assistant message.
        """
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError("dialogs must be a list of dialogs (each a list of {'role', 'content'} messages)")
        formatter = self._chat_format()
        prompt_tokens = [formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        refusals = [formatter.refusal(dialog) for dialog in dialogs]
        done = self.engine.complete(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop, echo_text=False
        )
        results: List[ChatPrediction] = []
        for i, (tokens, end) in enumerate(zip(done.tokens, done.ends)):
            answer = tokens[len(prompt_tokens[i]) :] if echo else tokens  # the text is the answer's alone
            text = refusals[i] if refusals[i] is not None else self._text(answer, end)
            result: ChatPrediction = {"generation": formatter.decode_answer(text, formatter.stop_reason(end.stop_id))}
            if logprobs:
                result["tokens"], result["logprobs"] = self._pieces(tokens), done.logprobs[i]
            results.append(result)
        return results

    def chat_completion_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Optional[List[str]] = None,
    ) -> ChatStream:
        """The assistant's answer to one dialog as it is generated: a ``ChatStream``.

        Iterate it for str deltas of the answer's content; they join to exactly the ``content`` of the message
        that ``chat_completion([dialog], ...)`` returns with the same arguments and seed. Once they are exhausted,
        its ``message`` is that whole message (with Llama 3, ``stop_reason`` and ``tool_calls``): keep it, not the
        joined deltas, as the assistant's turn of the dialog. An answer that is a tool call streams no text; see
        ``ChatStream`` for the one case of a call written after some text.
        """
        formatter = self._chat_format()
        prompt_tokens = formatter.encode_dialog_prompt(dialog)
        refusal = formatter.refusal(dialog)
        if refusal is not None:
            check_stop(stop)
            return ChatStream(formatter, iter([refusal]))
        return ChatStream(formatter, self._stream(prompt_tokens, temperature, top_p, max_gen_len, stop))

    # ------------------------------------------------------------------ glue

    def _stream(
        self, prompt_tokens: List[int], temperature: float, top_p: float, max_gen_len: Optional[int],
        stop: Optional[List[str]],
    ) -> Generator[str, None, RowEnd | Result]:  # fmt: skip
        """The text deltas of one prompt's row, which return how it ended (finish_reason, stop_id, stop_string).

        With one process the request runs on the continuous-batching engine, so streams from several threads run
        together. Under torchrun with several ranks, every rank runs the stream in step with the others, one call
        at a time, as the reference's calls run (``DecodeLoop.stream``).
        """
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            return self.engine.stream(prompt_tokens, temperature, top_p, max_gen_len, stop)
        # The batch calls' checks and length rule: max_gen_len is clamped to the cache, as text_completion does
        [prompt], rule = self.engine.prepare([prompt_tokens], max_gen_len, temperature, top_p, stop, stream=True)
        params = SamplingParams(temperature, top_p, rule.budget(len(prompt)), tuple(rule.stop))
        return _deltas(self.batching.submit(prompt, params))

    def _chat_format(self) -> ChatFormat:
        if self.formatter is None:
            raise TypeError(
                f"this Llama has no chat format: its {type(self.tokenizer).__name__} belongs to no family in "
                "llama.families; pass formatter= to Llama(...)"
            )
        return self.formatter

    def _text(self, tokens: List[int], end: RowEnd) -> str:
        """A row's text: its stream's, cut before a stop string, where stop strings were given; else its tokens'."""
        return end.stream.final_text() if end.stream is not None else self.tokenizer.decode(tokens)

    def _pieces(self, tokens: List[int]) -> List[str]:
        """Each token's own text, as the reference returns them with logprobs."""
        return [self.tokenizer.decode([x]) for x in tokens]


def _deltas(handle: RequestHandle) -> Generator[str, None, Result]:
    """A request's text deltas; returns its result. Closing the generator early cancels the request."""
    try:
        for output in handle:
            if output.text:
                yield output.text
    finally:
        if not handle.done:
            handle.cancel()
    return handle.result()
