"""The OpenAI wire format: request checking and response shapes, with no web framework and no model.

A request body is read by ``parse_body`` (JSON, no NaN or Infinity, an object) and its fields by ``Fields``, which
raises ``APIError`` (an OpenAI-shaped error with its HTTP status) naming the field and what it takes. The checked
requests are ``CompletionRequest`` and ``ChatRequest``; the response builders at the end make the JSON objects
(``text_completion``, ``chat.completion`` and their stream chunks) from the engine's results.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from llama.checks import SEED_RANGE
from llama.engine.requests import MAX_TOP_LOGPROBS
from llama.tokenizer import TokenizerLike

MAX_STOP = 16  # OpenAI allows 4 stop strings; lm-eval's tasks may give a few more
MAX_STOP_CHARS = 1000
MAX_LEGACY_LOGPROBS = MAX_TOP_LOGPROBS  # OpenAI's legacy completions allow 5; the engine gives up to 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Meta's sampling defaults (Llama.text_completion's, and the generation_config.json of Meta's HF releases), used
# when a request gives no temperature or top_p. OpenAI's own defaults (1.0, 1.0) are a request away.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9

# Fields that OpenAI's clients and agent frameworks send with values that change nothing here: accepted with any
# value. Other unknown fields are refused by name, so that a misspelt "temprature" is not silently ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction"})


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; APIError 400 for anything else (NaN and Infinity are not JSON)."""

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number; send a finite number")

    try:
        body = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


class Fields:
    """Typed access to a request body's fields; every bad value is an APIError 400 naming the field."""

    def __init__(self, body: dict[str, Any], known: Sequence[str]):
        unknown = sorted(set(body) - set(known) - IGNORED_FIELDS)
        if unknown:
            raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}; this server takes "
                                f"{', '.join(sorted(known))}", param=unknown[0])  # fmt: skip
        self.body = body

    def given(self, name: str) -> bool:
        return self.body.get(name) is not None

    def _bad(self, name: str, what: str) -> APIError:
        return APIError(400, f"{name} must be {what}, got {_short(self.body[name])}", param=name)

    def integer(self, name: str, default: Any, low: int, high: Optional[int] = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 16.0 from a client that writes every number as a float
        bounds = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            raise self._bad(name, bounds)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or not low <= value <= high):  # fmt: skip
            raise self._bad(name, f"a number in [{low}, {high}]")
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def string(self, name: str, default: Optional[str] = None) -> Optional[str]:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def obj(self, name: str) -> dict[str, Any]:
        value = self.body.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad(name, "an object")
        return value

    def stop(self) -> tuple[str, ...]:
        value = self.body.get("stop")
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if (not isinstance(stops, list) or len(stops) > MAX_STOP
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):  # fmt: skip
            raise self._bad("stop", f"a non-empty string or a list of at most {MAX_STOP} of them (each at most "
                                    f"{MAX_STOP_CHARS} characters)")  # fmt: skip
        return tuple(stops)

    def unsupported(self, name: str, neutral: Sequence[Any]) -> None:
        """Refuse a field this server does not implement, unless it has a value that changes nothing."""
        value = self.body.get(name)
        if value is not None and value not in neutral:
            raise APIError(400, f"{name} is not supported by this server (got {_short(value)}); leave it out",
                           param=name)  # fmt: skip

    def seed(self) -> Optional[int]:
        return self.integer("seed", None, *SEED_RANGE)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class Sampling:
    """What every choice of a request shares (the engine's SamplingParams, less the per-choice seed)."""

    max_tokens: Optional[int]  # None: up to the end of the context
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: Optional[int]
    n: int
    stream: bool
    include_usage: bool


def read_sampling(fields: Fields, max_tokens: Optional[int], max_n: int) -> Sampling:
    fields.unsupported("presence_penalty", (0, 0.0))
    fields.unsupported("frequency_penalty", (0, 0.0))
    fields.unsupported("logit_bias", ({},))
    stream = fields.boolean("stream")
    options = fields.obj("stream_options")
    if options and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise APIError(400, f"unknown stream_options {unknown}; this server takes include_usage",
                       param="stream_options")  # fmt: skip
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be true or false", param="stream_options")
    return Sampling(
        max_tokens=max_tokens,
        temperature=fields.number("temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_p=fields.number("top_p", DEFAULT_TOP_P, 0.0, 1.0),
        stop=fields.stop(),
        seed=fields.seed(),
        n=fields.integer("n", 1, 1, max_n),
        stream=stream,
        include_usage=include_usage,
    )


def choice_seed(seed: Optional[int], index: int) -> Optional[int]:
    """The seed of a prompt's choice `index` (0..n-1): the request's seed for the first, seed + index for the
    others (wrapped into torch's range), so choice 0 is what n=1 gives and the others differ from it."""
    if seed is None or index == 0:
        return seed
    low, high = SEED_RANGE
    return (seed + index - low) % (high - low + 1) + low


COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "logprobs", "echo",
                     "stream", "stream_options", "suffix", "best_of", "presence_penalty", "frequency_penalty",
                     "logit_bias")  # fmt: skip


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # a text is encoded with BOS, as text_completion does
    sampling: Sampling
    logprobs: Optional[int]  # None: no logprobs; k: the chosen token's and the k most likely
    echo: bool


def read_completion(body: dict[str, Any], max_n: int) -> CompletionRequest:
    fields = Fields(body, COMPLETION_FIELDS)
    model = read_model(fields)
    fields.unsupported("suffix", ("",))
    fields.unsupported("best_of", (1,))
    sampling = read_sampling(fields, fields.integer("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, 0), max_n)
    logprobs = fields.integer("logprobs", None, 0, MAX_LEGACY_LOGPROBS)
    echo = fields.boolean("echo")
    if sampling.stream and echo and logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported when streaming (the prompt's logprobs come at the "
                            "end); send it with stream: false", param="echo")  # fmt: skip
    return CompletionRequest(model, read_prompts(body.get("prompt")), sampling, logprobs, echo)


def read_model(fields: Fields) -> str:
    model = fields.string("model")
    if model is None:
        raise APIError(400, "model is required: give the served model's name (GET /v1/models lists it)",
                       param="model")  # fmt: skip
    return model


def read_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    what = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_token(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, f"prompt must be {what} (none of them empty), got {_short(prompt)}", param="prompt")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
               "logprobs", "top_logprobs", "stream", "stream_options", "tools", "tool_choice", "presence_penalty",
               "frequency_penalty", "logit_bias", "response_format")  # fmt: skip


@dataclass
class ChatRequest:
    model: str
    messages: list[Any]  # checked by llama.serve.chat
    sampling: Sampling
    logprobs: bool
    top_logprobs: int
    tools: Any = None  # checked by llama.serve.chat
    tool_choice: Any = None


def read_chat(body: dict[str, Any], max_n: int) -> ChatRequest:
    fields = Fields(body, CHAT_FIELDS)
    model = read_model(fields)
    fields.unsupported("response_format", ({"type": "text"},))
    if fields.given("max_completion_tokens") and fields.given("max_tokens"):
        if body["max_completion_tokens"] != body["max_tokens"]:
            raise APIError(400, "max_tokens and max_completion_tokens differ; give one of them (max_tokens is the "
                                "older name)", param="max_tokens")  # fmt: skip
    name = "max_completion_tokens" if fields.given("max_completion_tokens") else "max_tokens"
    sampling = read_sampling(fields, fields.integer(name, None, 1), max_n)
    logprobs = fields.boolean("logprobs")
    top_logprobs = fields.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of messages", param="messages")
    return ChatRequest(model, messages, sampling, logprobs, top_logprobs, body.get("tools"), body.get("tool_choice"))


# ---------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


PIECE_CONTEXT = 8  # tokens decoded before a token to find the text it adds (a character spans at most 4)


def piece(tokenizer: TokenizerLike, context: Sequence[int], token: int) -> str:
    """The text token adds after the context tokens. (SentencePiece drops a leading space when a token is decoded
    alone: "▁man" alone is "man", after "a" it adds " man".)"""
    context = list(context[-PIECE_CONTEXT:])
    before = tokenizer.decode(context) if context else ""
    after = tokenizer.decode([*context, token])
    keep = len(before) if after.startswith(before) else len(_common(before, after))
    return after[keep:]


def token_pieces(tokenizer: TokenizerLike, tokens: Sequence[int]) -> list[str]:
    """Each token's text in its place, so that the pieces of text that decodes piece by piece join to it."""
    return [piece(tokenizer, tokens[max(0, i - PIECE_CONTEXT) : i], t) for i, t in enumerate(tokens)]


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def legacy_logprobs(pieces: list[str], logprobs: list[Optional[float]], top: list[Optional[dict[str, float]]],
                    offset: int = 0) -> dict[str, Any]:  # fmt: skip
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs and text_offset (from `offset`)."""
    offsets, at = [], offset
    for text in pieces:
        offsets.append(at)
        at += len(text)
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def top_dict(tokenizer: TokenizerLike, context: Sequence[int],
             alternatives: Optional[list[tuple[int, float]]]) -> dict[str, float]:  # fmt: skip
    """The legacy shape of a position's alternatives: {token text: logprob} (tokens of equal text keep the best)."""
    out: dict[str, float] = {}
    for token, logprob in alternatives or []:
        out.setdefault(piece(tokenizer, context, token), logprob)
    return out


def chat_logprob_entry(tokenizer: TokenizerLike, context: Sequence[int], token: int, logprob: float,
                       alternatives: Optional[list[tuple[int, float]]]) -> dict[str, Any]:  # fmt: skip
    """One generated token in the chat shape: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""

    def entry(token: int, value: float) -> dict[str, Any]:
        text = piece(tokenizer, context, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in alternatives or []]}


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
