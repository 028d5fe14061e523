"""An HTTP server with tenant API keys over the tiny generator, for tests of tenancy and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


@contextmanager
def keyed_server(generator: Any, encoder: Any, folder: Path, keys: list[dict[str, Any]]) -> Iterator[Any]:
    """``personalign serve``'s app on loopback with ``keys`` (the key file's entries); the running
    server's ``pz`` is its Personalizer."""
    from personalign.personalizer import Personalizer
    from personalign.server import ServerConfig, ServerThread, create_app, load_api_keys

    key_file = folder / "keys.json"
    key_file.write_text(json.dumps({"keys": keys}))
    config = ServerConfig(api_keys=load_api_keys(key_file), max_tokens_cap=8, default_max_tokens=2)
    with (
        Personalizer(generator, encoder, store=folder / "store") as personalizer,
        ServerThread(create_app(personalizer, config)) as running,
    ):
        running.pz = personalizer
        yield running


def client(server: Any, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def api_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The error body of ``response``, after checking its status (and code)."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert code is None or body["code"] == code, body
    return body
