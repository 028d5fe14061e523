"""``personalign engine ...``: the llama.cpp server personalign can decode on (``build``, ``info``, ``run``);
and ``personalign worker``, which runs the background jobs (adapter trainings) a server queues.

``build`` makes ``llama-server`` once per machine from the llama-cpp-python sdist (the Makefile's
install target runs it); ``run`` starts it for the embedded GGUF model, for use with
``personalign serve --engine-url``.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from personalign.cli._common import DeviceOpt, ModelOpt, StoreOpt, app, failing

engine_app = typer.Typer(help="The llama.cpp server that remote decoding runs on.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("build")
def build(
    jobs: Annotated[int | None, typer.Option(help="Parallel compile jobs (default: every core).")] = None,
) -> None:
    """Build llama-server from the llama-cpp-python sdist on PyPI (once per machine; cached)."""
    from personalign.backends.llamacpp import _built, build_server, cache_dir

    with failing():
        folder = cache_dir()
        if _built(folder):
            typer.echo(f"llama-server is built: {folder / 'bin' / 'llama-server'}")
            return
        typer.echo(f"building llama-server into {folder} (a few minutes, once per machine)")
        typer.echo(f"built: {build_server(folder, jobs)}")


@engine_app.command("info")
def info() -> None:
    """Where the built server lives and how it was built (JSON)."""
    from personalign.backends.llamacpp import build_info, cache_dir

    typer.echo(json.dumps({"folder": str(cache_dir()), "build": build_info()}, indent=2))


@engine_app.command("run")
def run(
    model: Annotated[Path | None, typer.Option(help="A GGUF model (default: the embedded SmolLM2).")] = None,
    port: Annotated[int, typer.Option(help="Loopback port.")] = 8081,
    parallel: Annotated[int, typer.Option(help="Server slots (requests decoded together).")] = 4,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: llama.cpp's choice).")] = None,
) -> None:
    """Start llama-server on 127.0.0.1:PORT until interrupted (then: personalign serve --engine-url)."""
    from personalign.backends.llamacpp import LlamaServer
    from personalign.models import embedded_gguf_path

    with failing():
        server = LlamaServer(model or embedded_gguf_path(), parallel=parallel, threads=threads, port=port)
        server.start()
    typer.echo(f"llama-server on {server.url} (log: {server.log}); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command("worker")
def worker(
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    profiles_url: Annotated[
        str | None,
        typer.Option(help="The profiles database the server uses (sqlite:///... or postgresql://...)."),
    ] = None,
    threads: Annotated[
        int, typer.Option(min=1, help="torch CPU threads for training (leave cores to chats).")
    ] = 1,
    parent: Annotated[
        int | None, typer.Option(help="Exit when this process ends (serve passes its own pid).")
    ] = None,
) -> None:
    """Run background jobs (adapter trainings queued by `personalign serve`) until interrupted."""
    from personalign.jobs import WorkerSpec, run_worker

    with failing():
        run_worker(WorkerSpec(str(store), model, device, profiles_url, threads), parent=parent)
