"""What a caller hands the continuous-batching engine (``llama.engine.batching``) and what it gets back.

``SamplingParams`` are one request's own settings, checked when the request is made, so a bad value fails that
request alone. ``RequestHandle`` is the caller's side of a running request: iterate it (from a thread, or with
``async for``) for its ``StepOutput``s, one per generated token, and call ``result()`` for its ``Result``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Optional, Sequence

import torch

from llama.checks import check_sampling, check_seed, check_stop, is_int

if TYPE_CHECKING:
    from llama.chat_format import Message
    from llama.engine.batching import Engine

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, as ``generate``/``text_completion`` take them, plus its own seed.

    max_gen_len: None generates up to the KV cache's end (max_seq_len); 0 only scores the prompt (with logprobs
    and echo). seed: the request's own random generator, so the same seed gives the same text whatever else the
    engine runs; None draws from torch's global generator, as the reference's ``generate`` does. top_logprobs:
    with logprobs, also the k most likely tokens at each scored position (at most 20). echo: the result's text
    starts with the prompt's, and with logprobs the prompt's tokens are scored too.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: Optional[int] = None
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, 0 if self.max_gen_len is None else self.max_gen_len)
        object.__setattr__(self, "stop", tuple(check_stop(self.stop)))
        for name in ("logprobs", "echo"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.seed is not None:
            check_seed(self.seed)

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens are scored too (echo with logprobs): then every prompt position's logits
        are needed, not only the last one's."""
        return self.echo and self.logprobs


@dataclass(frozen=True)
class StepOutput:
    """One generated token of a request: its id, the text it adds (held back while it may still change: see
    ``TextStream.delta``), and with logprobs its log-probability and the top alternatives [(id, logprob)]. The
    last output of a request may carry text alone (token None): what was held back until the end."""

    token: Optional[int]
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the one that ended the request (a stop id) included

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Result:
    """A finished request.

    tokens: the generated tokens kept (up to the stop id, which is not kept, or the stop string's end; with echo,
    the prompt's first); text: their text (with echo, the prompt's first), cut before a stop string; logprobs
    and top_logprobs: per kept token, when asked for (the prompt's first token, which nothing predicts, has 0.0
    and no alternatives). finish_reason: "stop" (``stop_id`` or ``stop_string`` says which), "length" or
    "cancelled". message: for a chat request, the answer as ``chat_completion`` returns it (with Llama 3 its
    ``stop_reason`` and ``tool_calls``).
    """

    request_id: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    usage: Usage
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    stop_id: Optional[int] = None
    stop_string: Optional[str] = None
    message: Optional[Message] = None


class Outbox:
    """Where the engine puts one request's outputs and result, for its handle to read (the engine holds this, never
    the handle itself, so that a handle nobody holds any more is collected and cancels its request)."""

    def __init__(self) -> None:
        self.outputs: deque[StepOutput] = deque()
        self.result: Optional[Result] = None
        self.error: Optional[BaseException] = None
        self.changed = threading.Condition()
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def push(self, output: StepOutput) -> None:
        with self.changed:
            self.outputs.append(output)
            self._wake()

    def finish(self, result: Optional[Result], error: Optional[BaseException] = None) -> None:
        with self.changed:
            self.result, self.error = result, error
            self._wake()

    def _wake(self) -> None:
        self.changed.notify_all()
        for loop, future in self.waiters:
            loop.call_soon_threadsafe(_settle, future)
        self.waiters.clear()


class RequestHandle(Iterator[StepOutput]):
    """The caller's side of one request: its ``StepOutput``s as they come (iterate it, or ``async for``), its
    ``Result`` (``result()``), and ``cancel()``.

    A handle that is dropped before its request has finished cancels the request, so a consumer that stops
    reading frees its slot.
    """

    def __init__(self, engine: Engine, request_id: str, box: Outbox):
        self.id = request_id
        self._engine = engine
        self._box = box

    @property
    def done(self) -> bool:
        return self._box.done

    def __next__(self) -> StepOutput:
        box = self._box
        with box.changed:
            box.changed.wait_for(lambda: box.outputs or box.done)
            if box.outputs:
                return box.outputs.popleft()
        if box.error is not None:
            raise box.error
        raise StopIteration

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self._async_outputs()

    async def _async_outputs(self) -> AsyncIterator[StepOutput]:
        box = self._box
        while True:
            with box.changed:
                if box.outputs:
                    output: Optional[StepOutput] = box.outputs.popleft()
                elif box.done:
                    break
                else:
                    loop = asyncio.get_running_loop()
                    future = loop.create_future()
                    box.waiters.append((loop, future))
                    output = None
            if output is None:
                await future
                continue
            yield output
        if box.error is not None:
            raise box.error

    def result(self, timeout: Optional[float] = None) -> Result:
        """The finished request (waiting for it); its error, if the engine failed it."""
        box = self._box
        with box.changed:
            if not box.changed.wait_for(lambda: box.done, timeout):
                raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        if box.error is not None:
            raise box.error
        return box.result  # type: ignore[return-value]

    async def async_result(self) -> Result:
        """``result()`` for asyncio callers: waits without blocking the event loop."""
        async for _ in self:
            pass
        return self.result()

    def cancel(self) -> bool:
        """Cancel the request (see ``Engine.cancel``); False if it had already finished."""
        return self._engine.cancel(self.id)

    def __del__(self) -> None:
        if not self._box.done:
            self._engine.drop(self.id)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def request_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    """A seeded request's own random generator (the stream ``torch.manual_seed(seed)`` gives the global one); None
    for an unseeded request, which draws from torch's global generator."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
