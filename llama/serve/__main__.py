"""``python -m llama.serve``: an OpenAI-compatible server on the continuous-batching engine.

    python -m llama.serve                                   # the built-in demo model on http://127.0.0.1:8000
    python -m llama.serve --ckpt_dir Llama3.1-8B-Instruct --quantize int8 --api_key KEY
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir llama-2-13b-chat --tokenizer_path tokenizer.model

Under torchrun every rank loads its slice and builds the engine; rank 0 serves HTTP and schedules, the other
ranks run the forward passes it broadcasts (``Engine.follow``) until it closes.
"""

from __future__ import annotations

# `python -m llama.serve` executes this file as __main__: hand over to the one llama.serve.__main__ module before
# this copy defines anything (see commandline.run_module).
if __name__ == "__main__":
    from llama.commandline import run_module

    run_module("llama.serve.__main__", "main")

import logging
import signal
from pathlib import Path
from typing import Optional

from llama.checks import check_positive_int

logger = logging.getLogger("llama.serve")


def resolve_paths(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> tuple[str, str, str]:
    """(ckpt_dir, tokenizer_path, default model name): the built-in demo model when no ckpt_dir is given; else the
    tokenizer given, or the folder's own tokenizer.model (Llama 3), or the one beside the folder (Llama 2)."""
    if ckpt_dir is None:
        if tokenizer_path is not None:
            raise ValueError("--tokenizer_path needs --ckpt_dir (give neither to serve the built-in demo model)")
        from llama.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH

        return str(DEMO_CKPT_DIR), str(DEMO_TOKENIZER_PATH), "llama-demo"
    name = Path(ckpt_dir).resolve().name or "llama"
    if tokenizer_path is not None:
        return ckpt_dir, tokenizer_path, name
    for candidate in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir).parent / "tokenizer.model"):
        if candidate.is_file():
            return ckpt_dir, str(candidate), name
    raise FileNotFoundError(f"no tokenizer.model in {ckpt_dir} or beside it; give --tokenizer_path")


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_seq_len: int = 2048,
    max_batch_size: int = 8,
    quantize: Optional[str] = None,
    compile: bool = False,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    prefill_chunk: int = 128,
    max_waiting: int = 256,
    max_n: int = 16,
    max_body_bytes: int = 4 * 2**20,
    timeout_s: Optional[float] = None,
    log_level: str = "info",
) -> None:
    """Serve a Llama checkpoint over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models, /health).

    Args:
        ckpt_dir: Meta checkpoint folder (float or quantized); none: the built-in demo model.
        tokenizer_path: tokenizer.model; default: the folder's own, else the one beside the folder.
        host: address to listen on; 127.0.0.1 (this machine only) unless told otherwise, e.g. 0.0.0.0.
        port: TCP port (0: any free one; the log says which).
        api_key: if given, every route but /health needs the header "Authorization: Bearer API_KEY".
        model_name: the model's name in requests and answers; default: the folder's name ("llama-demo").
        max_seq_len: context of every request (prompt plus answer); sizes the KV cache.
        max_batch_size: requests decoded together (KV cache slots); more wait in a queue.
        quantize: "int8" or "int4": quantize a float checkpoint while loading it.
        compile: the opt-in fast decode path (one model-parallel rank only).
        device: "cpu", "cuda" or "cuda:N"; default: CUDA if present, else the CPU.
        dtype: "float32", "float16" or "bfloat16"; default: float16 on CUDA, bfloat16 on the CPU.
        prefill_chunk: prompt tokens prefilled per engine step (a long prompt delays the others by one chunk).
        max_waiting: requests that may wait for a slot; beyond, the server answers 429 with Retry-After.
        max_n: the largest n (choices per prompt) a request may ask for.
        max_body_bytes: the largest request body (413 beyond).
        timeout_s: seconds a collective waits for the other ranks (torchrun).
        log_level: uvicorn's: "critical", "error", "warning", "info" or "debug".
    """
    levels = ("critical", "error", "warning", "info", "debug")
    if log_level not in levels:
        raise ValueError(f"--log_level must be one of {', '.join(levels)}, got {log_level!r}")
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size),
                        ("prefill_chunk", prefill_chunk), ("max_waiting", max_waiting), ("max_n", max_n),
                        ("max_body_bytes", max_body_bytes)):  # fmt: skip
        check_positive_int(f"--{name}", value)
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    if api_key is not None and not api_key:
        raise ValueError("--api_key is empty; give a key, or leave the flag out to serve without one")
    if model_name is not None and not model_name:
        raise ValueError("--model_name is empty")
    ckpt_dir, tokenizer_path, default_name = resolve_paths(ckpt_dir, tokenizer_path)
    model_name = model_name or default_name
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"ERROR: the server needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'") from None

    from llama.checks import parse_dtype
    from llama.distributed import is_main_process
    from llama.engine.batching import Engine
    from llama.generation import Llama

    leader = is_main_process()
    logging.basicConfig(level=logging.INFO if leader else logging.WARNING, format="%(message)s")
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device,
                            dtype=parse_dtype(dtype), compile=compile, quantize=quantize,
                            timeout_s=timeout_s)  # fmt: skip
    engine = Engine.for_llama(generator, prefill_chunk=prefill_chunk, max_waiting=max_waiting)
    if not leader:
        # torchrun passes Ctrl-C and SIGTERM to every rank: this one waits for rank 0, whose engine closes and
        # tells the others to return, rather than leave rank 0 broadcasting to a dead rank.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        engine.follow()  # until rank 0's engine closes
        return
    try:
        serve(engine, model_name, host, port, api_key, max_n, max_body_bytes, log_level)
    finally:
        engine.close()
    logger.info("engine closed; bye")


def serve(engine, model_name: str, host: str, port: int, api_key: Optional[str], max_n: int, max_body_bytes: int,
          log_level: str) -> None:  # fmt: skip
    """Serve until Ctrl-C or SIGTERM, which close the engine first (cancelling what runs)."""
    from llama.serve.app import create_app
    from llama.serve.server import Server, bind, config

    app = create_app(engine, model_name=model_name, api_key=api_key, max_n=max_n, max_body_bytes=max_body_bytes)
    sock = bind(host, port)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}"
    logger.info("serving %s on %s/v1 (%s)", model_name, where, "API key required" if api_key else "no API key")
    server = Server(config(app, log_level), on_signal=engine.close)
    server.run(sockets=[sock])
    sock.close()
