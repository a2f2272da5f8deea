"""Continuous batching: many requests decoded together, each exactly as if it ran alone.

``Engine`` takes requests at any time (``submit``, ``submit_chat``), from any thread, and runs them in steps. Each
request owns one slot of the model's KV cache (a row of max_seq_len positions) from the step it is admitted until
it ends; a request that finds every slot taken waits in a queue, first come first served. A step:

1. ends the cancelled requests and admits waiting ones into the free slots;
2. feeds every decoding request its last token, all in one forward pass, each row at its own slot and position;
3. prefills one chunk (``prefill_chunk`` tokens) of the oldest request still reading its prompt, so a long
   prompt delays the running rows by one chunk a step, not by the whole prompt;
4. picks each row's next token with the row's own sampling settings and random generator, and ends the rows
   that ``RowEnd`` ends (stop id, stop string, length), freeing their slots for the next step.

Exactness: a row's logits do not depend on the other rows (attention reads only its own slot, and each row is a
row of every product), so greedy tokens are those of the request run alone through ``Llama.generate``; a prompt of
up to ``prefill_chunk`` tokens is even prefilled with the same shapes, so its logits are bitwise the same in the
faithful path. A seeded request samples from its own generator, so its text does not depend on what else runs.

The forward passes go through a ``RowForward``: the faithful model (``Transformer.forward_rows``) or the fast path
(``FastDecoder``'s prefill and row step). Under torchrun with several model-parallel ranks, rank 0 schedules and
broadcasts each step's ``Plan``; every other rank runs ``follow()``, which performs the same forward passes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from llama.checks import check_prompts, is_int
from llama.distributed import CollectiveError, broadcast_from_main, start_patient_broadcasts
from llama.engine.ends import EndRule, RowEnd
from llama.engine.requests import Outbox, RequestHandle, Result, SamplingParams, StepOutput, Usage, request_generator
from llama.engine.sampling import select_next_token, token_logprobs_of
from llama.model import Transformer
from llama.tokenizer import TokenizerLike

if TYPE_CHECKING:
    from llama.chat_format import ChatFormat, Dialog
    from llama.engine.fast import FastDecoder

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 128
DEFAULT_MAX_WAITING = 1024
REMEMBERED_IDS = 4096  # finished request ids kept, so that cancelling one late is not an unknown id


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: try again later (a server answers 429 or 503)."""


class EngineClosed(RuntimeError):
    """The engine has been closed (or a rank of its job failed); it takes no more requests."""


# ---------------------------------------------------------------------------------------------- forward passes


class RowForward(Protocol):
    def prefill(self, tokens: torch.Tensor, slot: int, start: int, last_only: bool = False) -> torch.Tensor:
        """Logits (1, c, vocab) of a prompt chunk tokens (1, c) at positions start.. of cache slot `slot`
        (last_only: of its last position alone, (1, 1, vocab))."""

    def decode(self, tokens: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, 1, vocab) of one token per row (n, 1), row i at positions[i] of slot slots[i]."""


class ModelRows:
    """The faithful model as a RowForward: ``Transformer.forward_rows``."""

    def __init__(self, model: Transformer):
        self.model = model

    def prefill(self, tokens: torch.Tensor, slot: int, start: int, last_only: bool = False) -> torch.Tensor:
        logits = self.model.forward_rows(tokens, [slot], [start])  # the reference's shapes: its bits
        return logits[:, -1:] if last_only else logits

    def decode(self, tokens: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        return self.model.forward_rows(tokens, slots, positions)


class FastRows:
    """The fast path as a RowForward: its prefill into a slot and its row step."""

    def __init__(self, fast: FastDecoder):
        self.fast = fast

    def prefill(self, tokens: torch.Tensor, slot: int, start: int, last_only: bool = False) -> torch.Tensor:
        return self.fast.prefill(tokens, start, slot=slot, last_only=last_only)

    def decode(self, tokens: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        return self.fast.step_rows(tokens, slots, positions)


@dataclass(frozen=True)
class Plan:
    """One step's forward passes: what rank 0 broadcasts so every model-parallel rank runs the same ones.

    decode: (slots, positions, tokens), one token per row; prefill: (slot, start, tokens, every_position) of one
    prompt chunk, every_position saying whether all of its logits are needed (a prompt scored with echo and
    logprobs) or only the last position's.
    """

    decode: Optional[tuple[list[int], list[int], list[int]]]
    prefill: Optional[tuple[int, int, list[int], bool]]


def run_plan(forward: RowForward, plan: Plan, device: torch.device) -> tuple[Optional[torch.Tensor], ...]:
    """The logits of the plan's decode rows (n, vocab) and of its prefill chunk (c, vocab, or 1 for its last position
    when the others are not needed); None for what it lacks."""
    decoded = prefilled = None
    if plan.decode is not None:
        slots, positions, tokens = plan.decode
        column = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        decoded = forward.decode(column, slots, positions)[:, 0]
    if plan.prefill is not None:
        slot, start, tokens, every_position = plan.prefill
        chunk = torch.tensor([tokens], dtype=torch.long, device=device)
        prefilled = forward.prefill(chunk, slot, start, last_only=not every_position)[0]
    return decoded, prefilled


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class Running:
    """The engine's record of one request, from submission to its result."""

    id: str
    box: Outbox  # its handle's outputs and result (not the handle: a dropped handle cancels the request)
    prompt: list[int]
    params: SamplingParams
    row: RowEnd  # where the row ends, and its text
    generator: Optional[torch.Generator]
    formatter: Optional[ChatFormat] = None  # a chat request's: its answer becomes a message
    slot: Optional[int] = None
    prefilled: int = 0  # prompt tokens in the cache
    pending: Optional[int] = None  # the last sampled token, fed at the next step
    sampled: int = 0  # tokens sampled, the stop id included
    logprobs: list[float] = field(default_factory=list)  # of the prompt's tokens (echo) then the generated ones
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    cancelled: bool = False

    @property
    def position(self) -> int:
        """Where the pending token sits: after the prompt and the tokens fed before it."""
        return len(self.prompt) + self.sampled - 1


class Engine:
    """Continuous batching over one model and its KV cache: see the module's docstring.

    Build it from a ``Llama`` (``Engine.for_llama(generator)``) or from its parts. A background thread runs the
    steps once ``start()`` is called (``submit`` starts it); ``step()`` runs one step by hand (tests, or a caller
    that drives the engine itself). ``close()`` (or ``with``) ends it: running requests finish as "cancelled".

    The engine shares the KV cache with the ``Llama``'s batch calls (``generate``...): while any request holds a
    slot it holds the cache's lock (``lock``), so a batch call waits until the engine is idle, and the engine waits
    while a batch call runs.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        *,
        fast: Optional[FastDecoder] = None,
        formatter: Optional[ChatFormat] = None,
        lock: Optional[threading.RLock] = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_waiting: int = DEFAULT_MAX_WAITING,
        background: bool = True,
    ):
        """prefill_chunk: prompt tokens prefilled a step; max_waiting: requests that may wait for a slot before
        ``submit`` raises ``QueueFull``; background: run the steps in a thread that the first request starts (False:
        the caller runs them with ``step()``)."""
        for name, value in (("prefill_chunk", prefill_chunk), ("max_waiting", max_waiting)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.tokenizer, self.formatter = model, tokenizer, formatter
        self.forward: RowForward = ModelRows(model) if fast is None else FastRows(fast)
        self.params = model.params
        self.device = model.device
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        self.lock = lock if lock is not None else threading.RLock()  # the KV cache's
        self._holds_cache = False
        self._changed = threading.Condition()  # guards what follows; notified on submissions and cancels
        self._waiting: deque[Running] = deque()
        self._active: dict[int, Running] = {}  # slot -> request
        self._requests: dict[str, Running] = {}  # every unfinished request by id
        self._finished: OrderedDict[str, None] = OrderedDict()  # the last REMEMBERED_IDS finished ids
        self._dropped: deque[str] = deque()  # ids of requests whose handles were collected (drop)
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed: Optional[BaseException] = None  # why the engine takes no more requests
        self._step_lock = threading.Lock()  # one step at a time
        self.background = background
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.leader = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        self.ranks = world
        if world > 1:
            start_patient_broadcasts()  # a collective: every rank builds its engine at the same point

    @classmethod
    def for_llama(cls, generator: Any, **options: Any) -> Engine:
        """The engine of a ``Llama`` (its model, tokenizer, fast path, chat format and KV-cache lock)."""
        return cls(generator.model, generator.tokenizer, fast=generator.fast, formatter=generator.formatter,
                   lock=generator.engine.lock, **options)  # fmt: skip

    # ------------------------------------------------------------------ submitting

    def submit(
        self, prompt: str | Sequence[int], params: Optional[SamplingParams] = None, *, request_id: Optional[str] = None
    ) -> RequestHandle:
        """Start a request for a prompt (a string, encoded with BOS as ``text_completion`` does, or token ids).

        Raises ValueError/TypeError for a request that can never run (an empty prompt, ids outside the vocabulary,
        a prompt plus max_gen_len beyond max_seq_len), ``QueueFull`` when too many wait, ``EngineClosed`` after
        ``close()``. Nothing else is affected.
        """
        params = SamplingParams() if params is None else params
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt, bos=True, eos=False)
        elif not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        return self._enqueue(prompt, params, request_id, echo_text=params.echo)

    def submit_chat(
        self, dialog: Dialog, params: Optional[SamplingParams] = None, *, request_id: Optional[str] = None
    ) -> RequestHandle:
        """Start a request answering a dialog as the assistant, in the model's chat format; its result's
        ``message`` is what ``chat_completion`` returns as ``generation``. With echo, logprobs cover the dialog's
        prompt tokens too; the text is the answer's alone."""
        if self.formatter is None:
            raise TypeError("this engine has no chat format: build it with formatter= (Engine.for_llama does)")
        params = SamplingParams() if params is None else params
        tokens = self.formatter.encode_dialog_prompt(dialog)
        refusal = self.formatter.refusal(dialog)
        if refusal is not None:  # answered without generating (a Llama 2 dialog with unsafe text)
            return self._refuse(tokens, refusal, request_id)
        return self._enqueue(tokens, params, request_id, echo_text=False, formatter=self.formatter)

    def _check_fits(self, tokens: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, checked as the batch calls check theirs (``check_prompts``), and with its
        max_gen_len inside the cache (the batch calls clamp it; a request says how many tokens fit)."""
        max_seq_len = self.params.max_seq_len
        [tokens] = check_prompts([tokens], 1, max_seq_len, self.params.vocab_size)
        if params.max_gen_len is not None and len(tokens) + params.max_gen_len > max_seq_len:
            raise ValueError(
                f"the prompt's {len(tokens)} tokens plus max_gen_len={params.max_gen_len} exceed max_seq_len="
                f"{max_seq_len}; ask for at most {max_seq_len - len(tokens)} tokens, or build with a larger "
                "max_seq_len"
            )
        return tokens

    def _enqueue(self, tokens: Sequence[int], params: SamplingParams, request_id: Optional[str], echo_text: bool,
                 formatter: Optional[ChatFormat] = None) -> RequestHandle:  # fmt: skip
        tokens = self._check_fits(tokens, params)
        max_gen_len = self.params.max_seq_len if params.max_gen_len is None else params.max_gen_len
        rule = EndRule(self.tokenizer, max_gen_len, self.params.max_seq_len, params.stop)
        [row] = rule.text_rows([tokens], echo_text)
        with self._changed:
            request_id = self._new_id(request_id)
            if self._closed is not None:
                raise EngineClosed(f"the engine takes no more requests: {self._closed}")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting}); "
                                "try again later")  # fmt: skip
            box = Outbox()
            handle = RequestHandle(self, request_id, box)
            request = Running(request_id, box, tokens, params, row, request_generator(params.seed, self.device),
                              formatter)  # fmt: skip
            self._requests[request_id] = request
            self._waiting.append(request)
            self._changed.notify_all()
        if self.background:
            self.start()
        return handle

    def _new_id(self, request_id: Optional[str]) -> str:
        if request_id is None:
            return f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running; give each request its own id")
        return request_id

    def _refuse(self, tokens: list[int], refusal: str, request_id: Optional[str]) -> RequestHandle:
        with self._changed:
            request_id = self._new_id(request_id)
        box = Outbox()
        message = self.formatter.decode_answer(refusal, self.formatter.stop_reason(None))
        box.push(StepOutput(None, message["content"]))
        box.finish(Result(request_id, tokens, [], message["content"], "stop", Usage(len(tokens), 0),
                              message=message))  # fmt: skip
        self._remember(request_id)
        return RequestHandle(self, request_id, box)

    def cancel(self, request_id: str) -> bool:
        """Cancel a request: it ends with finish_reason "cancelled" at the next step, freeing its slot (a waiting
        one at once). False if it has already finished (cancelling twice is harmless); KeyError for an id the
        engine never had."""
        with self._changed:
            request = self._requests.get(request_id)
            if request is None:
                if request_id in self._finished:
                    return False
                raise KeyError(f"no request with id {request_id!r} (running or recently finished)")
            if request.cancelled:
                return False
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._end(request, "cancelled")
            self._changed.notify_all()
            return True

    def drop(self, request_id: str) -> None:
        """Cancel a request at the next step, without waiting for any lock: what a handle that is collected does
        (the collector may run inside the engine's own step)."""
        self._dropped.append(request_id)  # a deque's append is atomic

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Run the steps in a background thread (idempotent). Only rank 0 schedules: see ``follow``."""
        if not self.leader:
            raise RuntimeError("only rank 0 runs the engine's requests; other ranks call follow()")
        with self._changed:
            if self._thread is None and self._closed is None:
                self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed is not None or self._has_work())
                if self._closed is not None and not self._has_work():
                    break
            self.step()
        if self.ranks > 1:
            self._broadcast(None)  # the followers return

    def _has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def close(self) -> None:
        """Cancel every request and stop the background thread (the followers of other ranks return too)."""
        with self._changed:
            if self._closed is None:
                self._closed = EngineClosed("closed")
            for request in list(self._requests.values()):
                request.cancelled = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self.step()  # end what waits, without a thread
            if self.ranks > 1 and self.leader:
                self._broadcast(None)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> int:
        """Requests holding a KV-cache slot now."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no request runs or waits; False if `timeout` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._has_work(), timeout)

    def step(self) -> bool:
        """Run one step (see the module's docstring); False if there was nothing to do. Once the background thread
        runs (``start``), only it steps."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine's background thread runs its steps; step() is for an engine not started")
        with self._step_lock:
            with self._changed:
                self._end_cancelled()
                self._admit()
                plan, decoding, prefilling = self._plan()
            if plan is None:
                self._release_cache()
                return False
            try:
                self._take_cache()
                if self.ranks > 1:
                    self._broadcast(plan)
                decoded, prefilled = run_plan(self.forward, plan, self.device)
                with self._changed:
                    self._after_decode(decoding, decoded)
                    if prefilling is not None:
                        self._after_prefill(prefilling, len(plan.prefill[2]), prefilled)
            except BaseException as error:
                self._fail(error)
                if not isinstance(error, Exception):
                    raise
            finally:
                with self._changed:
                    if not self._active:
                        self._release_cache()
            return True

    def follow(self) -> None:
        """On a rank other than 0: run the forward passes rank 0's engine broadcasts, until it closes."""
        if self.leader:
            raise RuntimeError("rank 0 schedules the engine's steps; follow() is for the other ranks")
        while True:
            plan = broadcast_from_main(None, patient=True)
            if plan is None:
                return
            with self.lock:
                run_plan(self.forward, plan, self.device)

    def _broadcast(self, plan: Optional[Plan]) -> None:
        broadcast_from_main(plan, patient=True)

    # ------------------------------------------------------------------ scheduling (under _changed)

    def _end_cancelled(self) -> None:
        while self._dropped:  # handles collected since the last step (see drop)
            request = self._requests.get(self._dropped.popleft())
            if request is not None:
                request.cancelled = True
        for request in [r for r in self._active.values() if r.cancelled]:
            self._end(request, "cancelled")
        for request in [r for r in self._waiting if r.cancelled]:  # close() cancels the waiting ones too
            self._waiting.remove(request)
            self._end(request, "cancelled")

    def _admit(self) -> None:
        free = [s for s in range(self.params.max_batch_size) if s not in self._active]
        while free and self._waiting:
            request = self._waiting.popleft()
            request.slot = free.pop(0)
            self._active[request.slot] = request

    def _plan(self) -> tuple[Optional[Plan], list[Running], Optional[Running]]:
        """This step's plan, the requests it decodes, and the one whose prompt chunk it prefills (the one admitted
        first: the slots dict keeps admission order)."""
        decoding = [r for r in self._active.values() if r.pending is not None]
        decode = None
        if decoding:
            decode = ([r.slot for r in decoding], [r.position for r in decoding], [r.pending for r in decoding])
        reading = [r for r in self._active.values() if r.prefilled < len(r.prompt)]
        prefilling = reading[0] if reading else None
        prefill = None
        if prefilling is not None:
            start = prefilling.prefilled
            chunk = prefilling.prompt[start : start + self.prefill_chunk]
            prefill = (prefilling.slot, start, chunk, prefilling.params.scores_prompt)
        if decode is None and prefill is None:
            return None, [], None
        return Plan(decode, prefill), decoding, prefilling

    def _after_decode(self, decoding: list[Running], logits: Optional[torch.Tensor]) -> None:
        if logits is None:
            return
        for request, row_logits in zip(decoding, logits):
            request.pending = None
            self._take(request, row_logits)

    def _after_prefill(self, request: Running, count: int, logits: torch.Tensor) -> None:
        """After a chunk of `count` prompt tokens: logits of each of its positions, or of the last alone."""
        start = request.prefilled
        request.prefilled += count
        if request.params.scores_prompt:  # logits at positions start.. score the prompt's tokens start+1..
            targets = request.prompt[start + 1 : start + count + 1]
            if start == 0:
                request.logprobs.append(0.0)  # the first token: nothing predicts it
                request.top_logprobs.append([])
            self._score(request, logits[: len(targets)], targets)
        if request.prefilled < len(request.prompt):
            return
        if request.row.ended:  # no token to generate (max_gen_len=0, or a prompt that fills the cache)
            self._end(request, request.row.finish_reason)
            return
        self._take(request, logits[-1])

    def _score(self, request: Running, logits: torch.Tensor, targets: list[int]) -> None:
        picked = token_logprobs_of(logits[None], torch.tensor([targets], device=logits.device))[0]
        request.logprobs += picked.tolist()  # as the reference's generate computes them
        k = request.params.top_logprobs
        if k:
            values, ids = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
            request.top_logprobs += [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        elif request.params.logprobs:
            request.top_logprobs += [[] for _ in targets]

    def _take(self, request: Running, logits: torch.Tensor) -> None:
        """Pick the request's next token from its last logits (vocab,), follow it, and end the request if it ends."""
        params = request.params
        token = int(select_next_token(logits[None], params.temperature, params.top_p, request.generator)[0])
        request.sampled += 1
        row = request.row
        ended = row.add(token)
        kept = row.stop_id is None or not ended  # a stop id is not part of the answer
        logprob = top = None
        if params.logprobs and kept:
            self._score(request, logits[None], [token])
            logprob, top = request.logprobs[-1], request.top_logprobs[-1] or None
        if ended:
            delta = row.stream.delta(final=True)
            if kept:
                request.box.push(StepOutput(token, delta, logprob, top))
            elif delta:
                request.box.push(StepOutput(None, delta))
            self._end(request, row.finish_reason)
            return
        request.box.push(StepOutput(token, row.stream.delta(), logprob, top))
        request.pending = token

    def _end(self, request: Running, finish_reason: str) -> None:
        """Finish a request: free its slot, hand its result to its handle."""
        if request.slot is not None:
            self._active.pop(request.slot, None)
        self._requests.pop(request.id, None)
        self._remember(request.id)
        row, prompt, params = request.row, request.prompt, request.params
        n_kept = row.n_kept()
        tokens = (prompt if params.echo else []) + row.tokens[:n_kept]
        logprobs = top = None
        if params.logprobs:
            n_prompt = len(prompt) if params.echo else 0
            logprobs = request.logprobs[: n_prompt + n_kept]
            top = request.top_logprobs[: n_prompt + n_kept] if params.top_logprobs else None
        text = row.stream.final_text()
        message = None
        if request.formatter is not None:
            message = request.formatter.decode_answer(text, request.formatter.stop_reason(row.stop_id))
        result = Result(request.id, prompt, tokens, text, finish_reason, Usage(len(prompt), request.sampled),
                        logprobs, top, row.stop_id, row.stop_string, message)  # fmt: skip
        request.box.finish(result)
        self._changed.notify_all()  # wait_idle

    def _remember(self, request_id: str) -> None:
        self._finished[request_id] = None
        while len(self._finished) > REMEMBERED_IDS:
            self._finished.popitem(last=False)

    def _fail(self, error: BaseException) -> None:
        """A step failed: every admitted request ends with the error (their cache rows are in doubt). A failed
        collective (a dead rank) closes the engine."""
        logger.error("engine step failed: %s", error)
        with self._changed:
            failed = list(self._active.values())
            self._active.clear()
            if isinstance(error, CollectiveError) or not isinstance(error, Exception):
                self._closed = error
                failed += self._waiting
                self._waiting.clear()
            for request in failed:
                self._requests.pop(request.id, None)
                self._remember(request.id)
                request.box.finish(None, error)

    def _take_cache(self) -> None:
        if not self._holds_cache:
            self.lock.acquire()
            self._holds_cache = True

    def _release_cache(self) -> None:
        if self._holds_cache:
            self._holds_cache = False
            self.lock.release()
