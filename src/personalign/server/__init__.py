"""The HTTP server: OpenAI-compatible chat with per-user personalisation (``personalign serve``).

Importing this package loads nothing heavy; FastAPI and the app load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "ServerThread", "create_app", "load_api_keys"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from personalign.server.app import create_app

        return create_app
    if name in ("ServerConfig", "load_api_keys"):
        from personalign.server import config

        return getattr(config, name)
    if name == "ServerThread":
        from personalign.server.run import ServerThread

        return ServerThread
    raise AttributeError(f"module 'personalign.server' has no attribute {name!r}")
