"""An OpenAI-compatible HTTP server over the continuous-batching engine: ``python -m llama.serve --help``.

``app``: the FastAPI app (``create_app(engine, model_name=...)``) and what its routes do; ``protocol``: OpenAI's
request fields and response shapes, with no web framework; ``chat``: OpenAI messages and tools in Meta's chat
formats; ``server``: uvicorn with clean Ctrl-C/SIGTERM handling, and ``ServerThread`` for tests and notebooks.
FastAPI and uvicorn are the ``serve`` extra (``pip install -e ".[serve]"``); nothing else in the library
imports this package, and importing it loads neither until ``create_app`` or ``ServerThread`` is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerThread", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from llama.serve.app import create_app

        return create_app
    if name == "ServerThread":
        from llama.serve.server import ServerThread

        return ServerThread
    raise AttributeError(f"module 'llama.serve' has no attribute {name!r}")
