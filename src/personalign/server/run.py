"""Running the app: ``serve`` (what ``personalign serve`` calls), several worker processes
(``serve_workers``), a background-thread server, a Chroma client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from personalign.errors import ValidationError

WORKER_ENV = "PERSONALIGN_SERVE_WORKER"  # a worker process's settings, as JSON (see WorkerSettings)
WORKER_HEADER = "x-personalign-worker"  # each answer of a worker process names it (its process id)


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
    personalizer: Any,
    config: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    jobs: Any = None,
) -> None:
    """Serve until SIGINT/SIGTERM, which finish in-flight requests and then return normally (so the
    caller can close the store). One process, one worker: an embedded store has exactly one writer;
    scale with more stores or a Chroma server (docs/server.md)."""
    import uvicorn

    from personalign.server.app import create_app

    app = create_app(personalizer, config, jobs=jobs)
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


# --- the generation backend and the job worker ---------------------------------------------------

ENGINES = ("local", "llama.cpp", "vllm")


def check_engine(engine: str, url: str | None) -> None:
    """``serve --engine`` and ``--engine-url`` fit together (``ValidationError`` naming the option)."""
    fix = "pass --engine local, --engine llama.cpp [--engine-url URL] or --engine vllm --engine-url URL"
    if engine not in ENGINES:
        raise ValidationError("--engine", f"is not one of {list(ENGINES)}", fix, engine)
    if engine == "local" and url is not None:
        raise ValidationError("--engine-url", "needs --engine llama.cpp or vllm", fix, url)
    if engine == "vllm" and url is None:
        raise ValidationError("--engine-url", "is required for --engine vllm", fix)
    parts = urlsplit(url or "http://x")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("--engine-url", "must be an http(s) URL with a host", fix, url)


def backend_for(engine: str, url: str | None, model: str | None = None) -> Any:
    """The backend ``serve --engine`` names: ``None`` for the in-process one; for ``llama.cpp``
    without ``url``, a llama.cpp server started here for the embedded GGUF (adapters hot-loaded)."""
    check_engine(engine, url)
    if engine == "local":
        return None
    from personalign.backends.remote import RemoteEngine, managed_llama_cpp

    if url is None:
        return managed_llama_cpp()
    backend = RemoteEngine(url, kind=engine, model=model)
    backend.health()  # fail at start, not on the first chat
    return backend


def job_queue(store: str | Path, model: str | None, device: str | None, profiles_url: str | None) -> Any:
    """The adapter-training queue of ``store`` (:class:`personalign.jobs.JobQueue`)."""
    from personalign.jobs import JobQueue, WorkerSpec

    return JobQueue(WorkerSpec(str(store), model, device or "cpu", profiles_url))


def start_job_worker(
    store: str | Path, model: str | None, device: str | None, profiles_url: str | None
) -> subprocess.Popen[bytes]:
    """``personalign worker`` for ``store`` in a child process (it trains adapters; serve stops it)."""
    command = [
        sys.executable,
        "-m",
        "personalign.cli",
        "worker",
        "--store",
        str(store),
        "--parent",
        str(os.getpid()),
    ]
    for flag, value in (("--model", model), ("--device", device or "cpu"), ("--profiles-url", profiles_url)):
        if value is not None:
            command += [flag, value]
    return subprocess.Popen(command)


def stop_job_worker(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # huey's consumer finishes its current job's step and exits
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- several worker processes -----------------------------------------------------------------


class WorkerSettings(BaseModel):
    """What each worker process of ``personalign serve --workers N`` builds its app from.

    Passed to the workers in the environment variable ``PERSONALIGN_SERVE_WORKER`` as JSON;
    API keys travel as their SHA-256 digests only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str
    chroma_url: str | None = None
    profiles_url: str | None = None
    model: str | None = None
    encoder: str | None = None
    device: str | None = None
    config: dict[str, Any] = {}
    engine: str = "local"
    engine_url: str | None = None
    engine_model: str | None = None
    jobs: bool = True


def check_workers(workers: int, chroma_url: str | None, profiles_url: str | None) -> None:
    """Refuse several workers on a store that only one process may open (JSON profiles or
    embedded Chroma): ``ValidationError`` naming ``--workers`` and the options that fix it."""
    if workers <= 1 or (chroma_url is not None and profiles_url is not None):
        return
    missing = [
        option
        for option, value in (("--profiles-url", profiles_url), ("--chroma-url", chroma_url))
        if value is None
    ]
    raise ValidationError(
        "--workers",
        f"needs a store that several processes can share, but {' and '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not given (JSON profiles and an embedded Chroma "
        "have one writer)",
        "add --profiles-url sqlite:///STORE/profiles.db (or postgresql://...) and --chroma-url "
        "http://HOST:PORT (a running `chroma run`), or serve with --workers 1",
        workers,
    )


def hashed_keys(config: Any) -> Any:
    """``config`` with every plain API key replaced by its SHA-256 digest (what workers receive)."""
    from personalign.server.config import ApiKey

    keys = tuple(ApiKey(key_sha256=k.digest, tenant=k.tenant, read_only=k.read_only) for k in config.api_keys)
    return config.model_copy(update={"api_keys": keys})


def serve_workers(
    settings: WorkerSettings,
    workers: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve with ``workers`` uvicorn worker processes on one port until SIGINT/SIGTERM. Each
    builds its own Personalizer on the shared store (:func:`worker_app`); a worker that dies is
    replaced. The store must be shared (:func:`check_workers`)."""
    import uvicorn

    check_workers(workers, settings.chroma_url, settings.profiles_url)
    os.environ[WORKER_ENV] = settings.model_dump_json()
    uvicorn.run(
        "personalign.server.run:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        timeout_worker_healthcheck=60,  # a worker loading its models may answer pings late
    )


def worker_app() -> Any:
    """The app of one worker process, from ``$PERSONALIGN_SERVE_WORKER`` (uvicorn's factory)."""
    from personalign.personalizer import Personalizer
    from personalign.server.app import create_app
    from personalign.server.config import ServerConfig

    settings = WorkerSettings.model_validate_json(os.environ[WORKER_ENV])
    check_workers(2, settings.chroma_url, settings.profiles_url)
    personalizer = Personalizer.load(
        model=settings.model,
        encoder=settings.encoder,
        device=settings.device,
        store=settings.store,
        memory_client=chroma_client(settings.chroma_url),  # type: ignore[arg-type]
        profiles_url=settings.profiles_url,
        backend=backend_for(settings.engine, settings.engine_url, settings.engine_model),
    )
    jobs = (
        job_queue(settings.store, settings.model, settings.device, settings.profiles_url)
        if settings.jobs
        else None
    )
    return WorkerId(create_app(personalizer, ServerConfig.model_validate(settings.config), jobs=jobs))


class WorkerId:
    """ASGI wrapper adding the ``x-personalign-worker`` header (this process's id) to every answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.header = (WORKER_HEADER.encode(), str(os.getpid()).encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
