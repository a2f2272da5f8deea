"""The OpenAI-compatible HTTP app over the continuous-batching engine: ``create_app(engine, model_name=...)``.

Routes: ``GET /health`` (open even with an API key), ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/completions`` and ``POST /v1/chat/completions``. Each choice of a request (n per prompt) is one engine
request; a streamed answer is server-sent events ending in ``data: [DONE]``. A client that goes away cancels its
requests: a stream notices when its task is cancelled, a plain request polls for the disconnect while it waits.

Every refusal is OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status:
400 for a bad request, 401 without the API key, 404 for an unknown model or route, 413 for a body over the size
limit, 429 with ``Retry-After`` when the engine's queue is full, 503 once the engine is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama.engine.batching import Engine, EngineClosed, QueueFull
from llama.engine.requests import RequestHandle, Result, SamplingParams
from llama.serve import chat, protocol
from llama.serve.protocol import APIError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_N = 16
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.2


@dataclass
class Choice:
    """One engine request of an HTTP request: its index among the response's choices, and its prompt tokens."""

    index: int
    prompt: list[int]
    handle: RequestHandle


class Service:
    """What the routes do, over one engine: check a request, submit its choices, shape the answers."""

    def __init__(self, engine: Engine, model_name: str, max_n: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.formatter = engine.formatter
        self.max_seq_len = engine.params.max_seq_len
        self.model_name = model_name
        self.max_n = max_n
        self.created = protocol.now()

    # ------------------------------------------------------------------ shared

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def check_length(self, n_prompt: int, max_tokens: Optional[int], param: str, index: int = 0) -> None:
        """APIError 400 for a prompt that does not fit the context with room for max_tokens (None: one token)."""
        limit = self.max_seq_len
        which = f"prompt {index}" if index else "the prompt"
        if max_tokens is None:
            if n_prompt >= limit:
                raise APIError(400, f"this model's maximum context length is {limit} tokens, and {which} has "
                                    f"{n_prompt}, which leaves no room for an answer; shorten it",
                               param="messages", code="context_length_exceeded")  # fmt: skip
        elif n_prompt + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; {which} has {n_prompt} "
                                f"tokens and {param} is {max_tokens}, {n_prompt + max_tokens} in all; ask for at most "
                                f"{max(limit - n_prompt, 0)} tokens or shorten the prompt", param=param,
                           code="context_length_exceeded")  # fmt: skip

    def submit(self, jobs: list[tuple[int, list[int], SamplingParams, Optional[Any]]]) -> list[Choice]:
        """Submit (index, prompt tokens, params, dialog or None) jobs; all or none (a refusal cancels the rest)."""
        choices: list[Choice] = []
        try:
            for index, tokens, params, dialog in jobs:
                if dialog is not None:
                    handle = self.engine.submit_chat(dialog, params)
                else:
                    handle = self.engine.submit(tokens, params)
                choices.append(Choice(index, tokens, handle))
        except BaseException as e:
            cancel(choices)
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
            if isinstance(e, EngineClosed):
                raise APIError(503, "the server is shutting down", code="engine_closed") from None
            if isinstance(e, (ValueError, TypeError)):
                raise APIError(400, str(e)) from None
            raise
        return choices

    def params(self, sampling: protocol.Sampling, index: int, **extra: Any) -> SamplingParams:
        try:
            return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_gen_len=sampling.max_tokens, stop=sampling.stop,
                                  seed=protocol.choice_seed(sampling.seed, index), **extra)  # fmt: skip
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, bos=True, eos=False)
        except (ValueError, TypeError) as e:  # a lone surrogate (not valid Unicode)...
            raise APIError(400, f"{param}: {e}", param=param) from None

    def usage(self, choices: list[Choice], results: list[Result], n: int) -> dict[str, int]:
        prompt = sum(len(c.prompt) for c in choices[::n])  # each prompt once, as OpenAI counts
        return protocol.usage(prompt, sum(r.usage.completion_tokens for r in results))

    # ------------------------------------------------------------------ completions

    def completion_jobs(self, request: protocol.CompletionRequest) -> list[tuple[int, list[int], SamplingParams, None]]:
        self.check_model(request.model)
        sampling = request.sampling
        jobs = []
        for i, prompt in enumerate(request.prompts):
            # token ids outside the vocabulary: the engine's submit refuses them (a 400, see submit)
            tokens = self.encode(prompt, "prompt") if isinstance(prompt, str) else prompt
            self.check_length(len(tokens), sampling.max_tokens, "max_tokens", i)
            for j in range(sampling.n):
                params = self.params(sampling, j, echo=request.echo, logprobs=request.logprobs is not None,
                                     top_logprobs=request.logprobs or 0)  # fmt: skip
                jobs.append((i * sampling.n + j, tokens, params, None))
        return jobs

    def completion_choice(self, request: protocol.CompletionRequest, choice: Choice, result: Result) -> dict:
        logprobs = None
        if request.logprobs is not None:
            logprobs = self.legacy_logprobs(result.tokens, result.logprobs, result.top_logprobs, request.echo)
        return {"index": choice.index, "text": result.text, "logprobs": logprobs,
                "finish_reason": finish_reason(result)}  # fmt: skip

    def legacy_logprobs(self, tokens: list[int], logprobs: Optional[list[float]],
                        top: Optional[list[list[tuple[int, float]]]], echo: bool) -> dict[str, Any]:  # fmt: skip
        values: list[Optional[float]] = list(logprobs or [])
        alternatives = list(top or []) + [[] for _ in range(len(values) - len(top or []))]
        tops: list[Optional[dict[str, float]]] = [
            protocol.top_dict(self.tokenizer, tokens[max(0, i - protocol.PIECE_CONTEXT) : i], alts)
            for i, alts in enumerate(alternatives)
        ]
        if echo and values:  # nothing predicts the prompt's first token: OpenAI's null
            values[0], tops[0] = None, None
        return protocol.legacy_logprobs(protocol.token_pieces(self.tokenizer, tokens), values, tops)

    def completion(self, request: protocol.CompletionRequest, choices: list[Choice], results: list[Result]) -> dict:
        return {
            "id": protocol.new_id("cmpl"), "object": "text_completion", "created": protocol.now(),
            "model": self.model_name,
            "choices": [self.completion_choice(request, c, r) for c, r in zip(choices, results)],
            "usage": self.usage(choices, results, request.sampling.n),
        }  # fmt: skip

    async def completion_events(self, request: protocol.CompletionRequest, choices: list[Choice]) -> AsyncIterator[str]:
        head = {"id": protocol.new_id("cmpl"), "object": "text_completion", "created": protocol.now(),
                "model": self.model_name}  # fmt: skip
        include_usage = request.sampling.include_usage

        def chunk(index: int, text: str, logprobs: Any = None, finish: Optional[str] = None) -> str:
            body = {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return protocol.sse(body)

        shown = {c.index: "" for c in choices}
        tokens: dict[int, list[int]] = {c.index: [] for c in choices}
        if request.echo:
            for c in choices:
                shown[c.index] = self.tokenizer.decode(c.prompt)
                yield chunk(c.index, shown[c.index])
        results = []
        async for choice, output, result in merged(choices):
            i = choice.index
            if result is not None:
                rest = result.text[len(shown[i]) :] if result.text.startswith(shown[i]) else ""
                results.append(result)
                yield chunk(i, rest, None, finish_reason(result))
                continue
            logprobs = None
            if output.token is not None and request.logprobs is not None:
                context = tokens[i][-protocol.PIECE_CONTEXT :]
                tokens[i].append(output.token)
                piece = protocol.piece(self.tokenizer, context, output.token)
                top = protocol.top_dict(self.tokenizer, context, output.top_logprobs)
                logprobs = protocol.legacy_logprobs([piece], [output.logprob], [top], len(shown[i]))
            if output.text or logprobs is not None:
                shown[i] += output.text
                yield chunk(i, output.text, logprobs)
        if include_usage:
            yield protocol.sse({**head, "choices": [], "usage": self.usage(choices, results, request.sampling.n)})
        yield protocol.sse("[DONE]")

    # ------------------------------------------------------------------ chat

    def chat_jobs(self, request: protocol.ChatRequest) -> tuple[chat.ChatPrompt, list[tuple]]:
        self.check_model(request.model)
        prompt = chat.build_prompt(self.formatter, request.messages, request.tools, request.tool_choice)
        try:
            tokens = self.formatter.encode_dialog_prompt(prompt.dialog)
        except (ValueError, TypeError) as e:  # roles out of order, a bad tool call...
            raise APIError(400, f"messages: {e}", param="messages") from None
        if prompt.prefix:
            tokens = tokens + self.tokenizer.encode(prompt.prefix, bos=False, eos=False)
        sampling = request.sampling
        self.check_length(len(tokens), sampling.max_tokens, "max_completion_tokens")
        jobs = []
        for j in range(sampling.n):
            params = self.params(sampling, j, logprobs=request.logprobs, top_logprobs=request.top_logprobs)
            jobs.append((j, tokens, params, None if prompt.prefix else prompt.dialog))
        return prompt, jobs

    def answer(self, prompt: chat.ChatPrompt, result: Result) -> chat.Answer:
        return chat.read_answer(self.formatter, prompt, result.text, result.stop_id, result.message)

    def chat_logprobs(self, tokens: list[int], logprobs: list[float], top: Optional[list]) -> list[dict]:
        tops = top or [None] * len(tokens)
        context = protocol.PIECE_CONTEXT
        return [protocol.chat_logprob_entry(self.tokenizer, tokens[max(0, i - context) : i], token, value, alts)
                for i, (token, value, alts) in enumerate(zip(tokens, logprobs, tops))]  # fmt: skip

    def chat_choice(self, request: protocol.ChatRequest, prompt: chat.ChatPrompt, choice: Choice,
                    result: Result) -> dict:  # fmt: skip
        answer = self.answer(prompt, result)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        logprobs = None
        if request.logprobs:
            logprobs = {"content": self.chat_logprobs(result.tokens, result.logprobs or [], result.top_logprobs),
                        "refusal": None}  # fmt: skip
        finish = "tool_calls" if answer.tool_calls else finish_reason(result)
        return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def chat(self, request: protocol.ChatRequest, prompt: chat.ChatPrompt, choices: list[Choice],
             results: list[Result]) -> dict:  # fmt: skip
        return {
            "id": protocol.new_id("chatcmpl"), "object": "chat.completion", "created": protocol.now(),
            "model": self.model_name,
            "choices": [self.chat_choice(request, prompt, c, r) for c, r in zip(choices, results)],
            "usage": self.usage(choices, results, request.sampling.n),
        }  # fmt: skip

    async def chat_events(self, request: protocol.ChatRequest, prompt: chat.ChatPrompt,
                          choices: list[Choice]) -> AsyncIterator[str]:  # fmt: skip
        head = {"id": protocol.new_id("chatcmpl"), "object": "chat.completion.chunk", "created": protocol.now(),
                "model": self.model_name}  # fmt: skip
        include_usage = request.sampling.include_usage

        def chunk(index: int, delta: dict, logprobs: Any = None, finish: Optional[str] = None) -> str:
            entry = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = {**head, "choices": [entry]}
            if include_usage:
                body["usage"] = None
            return protocol.sse(body)

        text = {c.index: "" for c in choices}
        shown = {c.index: "" for c in choices}
        tokens: dict[int, list[int]] = {c.index: [] for c in choices}
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        results = []
        async for choice, output, result in merged(choices):
            i = choice.index
            if result is not None:
                results.append(result)
                answer = self.answer(prompt, result)
                if answer.tool_calls:
                    calls = [{"index": k, **call} for k, call in enumerate(answer.tool_calls)]
                    yield chunk(i, {"tool_calls": calls})
                elif answer.content and answer.content.startswith(shown[i]) and len(answer.content) > len(shown[i]):
                    yield chunk(i, {"content": answer.content[len(shown[i]) :]})
                yield chunk(i, {}, None, "tool_calls" if answer.tool_calls else finish_reason(result))
                continue
            text[i] += output.text
            settled = chat.settled(self.formatter, prompt, text[i])
            delta = {}
            if len(settled) > len(shown[i]):
                delta = {"content": settled[len(shown[i]) :]}
                shown[i] = settled
            logprobs = None
            if output.token is not None and request.logprobs:
                context = tokens[i][-protocol.PIECE_CONTEXT :]
                tokens[i].append(output.token)
                entry = protocol.chat_logprob_entry(self.tokenizer, context, output.token, output.logprob,
                                                    output.top_logprobs)  # fmt: skip
                logprobs = {"content": [entry], "refusal": None}
            if delta or logprobs is not None:
                yield chunk(i, delta, logprobs)
        if include_usage:
            yield protocol.sse({**head, "choices": [], "usage": self.usage(choices, results, request.sampling.n)})
        yield protocol.sse("[DONE]")


def finish_reason(result: Result) -> str:
    if result.finish_reason == "cancelled":  # only the engine closing cancels a request whose client still waits
        raise APIError(503, "the server is shutting down; the request was cancelled", code="engine_closed")
    return result.finish_reason


def cancel(choices: list[Choice]) -> None:
    for choice in choices:
        if not choice.handle.done:
            try:
                choice.handle.cancel()
            except KeyError:  # finished and forgotten meanwhile
                pass


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Any, Optional[Result]]]:
    """(choice, StepOutput, None) as any choice's tokens come, then (choice, None, Result) as each ends."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for output in choice.handle:
                await queue.put((choice, output, None))
            await queue.put((choice, None, choice.handle.result()))
        except BaseException as e:
            await queue.put((choice, e, None))
            if not isinstance(e, Exception):
                raise

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                choice, output, result = await queue.get()
                if isinstance(output, BaseException):
                    raise output
                yield choice, output, result
                if result is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()


async def wait_for(request: Request, choices: list[Choice]) -> list[Result]:
    """The choices' results; cancels them if the client disconnects first (then raises ClientGone)."""
    gathered = asyncio.ensure_future(asyncio.gather(*(c.handle.async_result() for c in choices)))
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not gathered.done():
            gathered.cancel()
        cancel(choices)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def guarded(request: Request, events: AsyncIterator[str], choices: list[Choice]) -> AsyncIterator[str]:
    """A stream's events; its requests are cancelled however it ends (a disconnect cancels the task). An error
    after the stream has begun becomes an error event, as OpenAI sends them."""
    try:
        async for event in events:
            yield event
            if await request.is_disconnected():
                logger.info("client disconnected: cancelling %d request(s)", len(choices))
                return
    except APIError as e:
        yield protocol.sse(e.body())
        yield protocol.sse("[DONE]")
    except Exception as e:
        logger.exception("stream failed")
        yield protocol.sse(protocol.error_body(f"the server failed: {e}", "server_error"))
        yield protocol.sse("[DONE]")
    finally:
        cancel(choices)


# ---------------------------------------------------------------------------------------------- the app


class APIKeyGuard:
    """ASGI middleware: every route but /health needs ``Authorization: Bearer KEY`` (compared in constant time)."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")  # fmt: skip
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                         code="request_too_large")  # fmt: skip
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return protocol.parse_body(bytes(body))


def create_app(engine: Engine, *, model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_n: int = DEFAULT_MAX_N) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `engine` as the model `model_name` (see the module's docstring). The engine stays
    the caller's: close it when the server has stopped."""
    service = Service(engine, model_name, max_n)
    app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(protocol.error_body(message, "invalid_request_error", None, code),
                            status_code=error.status_code)  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": service.created, "owned_by": "llama",
                "max_model_len": service.max_seq_len}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        service.check_model(model)
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = protocol.read_completion(await read_json(request, max_body_bytes), max_n)
        choices = service.submit(service.completion_jobs(body))
        if body.sampling.stream:
            return event_stream(request, service.completion_events(body, choices), choices)
        results = await wait_or_gone(request, choices)
        return JSONResponse(service.completion(body, choices, results))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = protocol.read_chat(await read_json(request, max_body_bytes), max_n)
        prompt, jobs = service.chat_jobs(body)
        choices = service.submit(jobs)
        if body.sampling.stream:
            return event_stream(request, service.chat_events(body, prompt, choices), choices)
        results = await wait_or_gone(request, choices)
        return JSONResponse(service.chat(body, prompt, choices, results))

    if api_key:
        app.add_middleware(APIKeyGuard, api_key=api_key)
    return app


def event_stream(request: Request, events: AsyncIterator[str], choices: list[Choice]) -> StreamingResponse:
    return StreamingResponse(guarded(request, events, choices), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def wait_or_gone(request: Request, choices: list[Choice]) -> list[Result]:
    try:
        return await wait_for(request, choices)
    except ClientGone:
        logger.info("client disconnected: cancelled %d request(s)", len(choices))
        raise APIError(400, "the client disconnected", code="client_disconnected") from None


__all__ = ["APIError", "Service", "create_app"]
