"""Running the app: ``serve`` (what ``personalign serve`` calls), a background-thread server, a Chroma client."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from personalign.errors import ValidationError


def chroma_client(url: str) -> Any:
    """A ``chromadb.HttpClient`` for ``http(s)://host[:port]`` (a running ``chroma run``), checked with a heartbeat."""
    import chromadb
    from chromadb.config import Settings

    parts = urlsplit(url)
    fix = "pass e.g. --chroma-url http://127.0.0.1:8001 (start the server with `chroma run --path DIR --port 8001`)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("--chroma-url", "must be an http(s) URL with a host", fix, url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 8000)
    except ValueError:
        raise ValidationError("--chroma-url", "has an invalid port", fix, url) from None
    try:
        client = chromadb.HttpClient(
            host=parts.hostname,
            port=port,
            ssl=parts.scheme == "https",
            settings=Settings(anonymized_telemetry=False),
        )
        client.heartbeat()
    except Exception as err:
        raise ValidationError(
            "--chroma-url", f"no Chroma server answers there ({type(err).__name__}: {err})", fix, url
        ) from None
    return client


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: the OS picks a free one; read it from ``getsockname()``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


class ServerThread:
    """Run an ASGI app with uvicorn on a loopback port in a background thread (tests, benchmarks).

    with ServerThread(create_app(pz)) as server:
        OpenAI(base_url=server.base_url, api_key="none")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._socket = bound_socket(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="personalign-uvicorn",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``."""
        return f"{self.url}/v1"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Stopped(Exception):
    """Raised by our SIGINT/SIGTERM handler, which uvicorn calls again after its graceful shutdown."""


def _stopped(signum: int, frame: Any) -> None:
    raise _Stopped


def serve(
    personalizer: Any, config: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve until SIGINT/SIGTERM, which finish in-flight requests and then return normally (so the
    caller can close the store). One process, one worker: an embedded store has exactly one writer;
    scale with more stores or a Chroma server (docs/server.md)."""
    import uvicorn

    from personalign.server.app import create_app

    app = create_app(personalizer, config)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    )
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn restores the handlers it found and re-raises the signal once it has shut down:
    # ours turns that into a normal return instead of the default handler killing the process.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
