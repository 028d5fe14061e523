"""The everyday commands: ``enroll``, ``remember``, ``chat``, ``profile``, ``forget``, ``export`` and ``serve``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from personalign.cli._common import (
    DeviceOpt,
    EncoderOpt,
    ModelOpt,
    StoreOpt,
    UserOpt,
    app,
    failing,
    open_personalizer,
)
from personalign.errors import ValidationError
from personalign.steering.methods import METHODS

if TYPE_CHECKING:
    from personalign.steering.schema import Steering


def parse_steer(text: str | None) -> dict[str, Any] | None:
    """``--steer``'s text as a request: ``"verbosity=-0.5,structure=1"`` -> ``{"verbosity": -0.5,
    "structure": 1.0}``, or a JSON object in any form ``parse_steering`` reads."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValidationError(
                "--steer",
                f"is not valid JSON ({err.msg} at character {err.pos})",
                'quote the object, e.g. --steer \'{"direction": {"verbosity": 1}}\'',
                text,
            ) from None
        if not isinstance(loaded, dict):
            raise ValidationError(
                "--steer", "is not a JSON object", 'pass e.g. {"weights": {"verbosity": -0.5}}', text
            )
        return loaded
    steer: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            steer[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValidationError(
                "--steer",
                f"cannot read {part!r}",
                "write name=weight pairs, e.g. verbosity=-0.5, or a JSON object",
                text,
            )
    return steer


def steering_option(text: str | None, method: str | None) -> Steering | None:
    """The ``Steering`` for ``--steer`` and ``--steer-method`` (``None``: the user's default).

    Checked here, before any model loads, with the same ``ValidationError`` as the Python API.
    """
    from personalign.steering.schema import NESTED_KEYS, parse_steering

    request = parse_steer(text)
    if request is None:
        if method is not None:
            raise ValidationError(
                "--steer-method", "needs --steer", "add --steer, e.g. --steer verbosity=-0.5", method
            )
        return None
    if method is not None:
        if not any(key in NESTED_KEYS for key in request):
            request = {
                "weights": request,
                "method": method,
            }  # an empty --steer stays an (invalid) empty request
        elif request.get("method", method) != method:
            raise ValidationError(
                "--steer-method",
                f"disagrees with --steer's method {request['method']!r}",
                "give the method in one place",
                method,
            )
        else:
            request = {**request, "method": method}
    return parse_steering(request)


@app.command()
def enroll(
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="User id (else taken from the file's user column).")
    ] = None,
    file: Annotated[
        Path,
        typer.Option("--file", "-f", exists=True, dir_okay=False, help="JSONL in TRL preference format."),
    ] = ...,  # type: ignore[assignment]
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Add a user's comparisons from a JSONL file (validated entirely before anything is stored)."""
    from personalign.types import read_preferences

    with failing():
        rows = read_preferences(file)
        by_user: dict[str, list[Any]] = {}
        for index, (row_user, comparison) in enumerate(rows):
            owner = row_user or user
            if owner is None:
                raise ValidationError(
                    f"{file.name}:{index + 1}.user", "has no user", "add a user column or pass --user"
                )
            if user is not None and row_user is not None and row_user != user:
                raise ValidationError(
                    f"{file.name}:{index + 1}.user",
                    f"is {row_user!r}, not --user {user!r}",
                    "drop --user or filter the file",
                )
            by_user.setdefault(owner, []).append(comparison)
        with open_personalizer(store, model, encoder, device) as pz:
            for owner, comparisons in by_user.items():
                profile = pz.enroll(owner, comparisons)
                typer.echo(f"{owner}: +{len(comparisons)} comparisons ({len(profile.comparisons)} stored)")


@app.command()
def remember(
    user: UserOpt,
    text: Annotated[list[str], typer.Argument(help="Fact(s) to remember about the user.")],
    store: StoreOpt = Path(".personalign"),
    encoder: EncoderOpt = None,
) -> None:
    """Store facts about a user in their memory."""
    from personalign.memory.store import UserStore
    from personalign.models import load_encoder

    with failing():
        with UserStore(store, load_encoder(encoder)) as users:
            result = users.remember(user, list(text))
        for row in result["results"]:
            typer.echo(f"{row['id']}  {row['memory']}")


@app.command()
def chat(
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="User id (omit for a generic answer).")
    ] = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="One message; omit for an interactive session.")
    ] = None,
    steer: Annotated[
        str | None,
        typer.Option(
            help='Steering: verbosity=-0.5,structure=0.3 or JSON, e.g. \'{"direction": {"verbosity": 1}}\' (default: the user\'s own).'
        ),
    ] = None,
    steer_method: Annotated[
        str | None, typer.Option(help=f"Steering method, one of {', '.join(METHODS)} (default: auto).")
    ] = None,
    memory: Annotated[bool, typer.Option(help="Retrieve the user's memories.")] = True,
    shots: Annotated[bool, typer.Option(help="Put the user's comparisons in the prompt (FSPO).")] = True,
    fspo: Annotated[
        bool,
        typer.Option(
            help="Run the FSPO adapter with the shots (when one is installed: PERSONALIGN_FSPO_DIR)."
        ),
    ] = True,
    pplug: Annotated[
        bool,
        typer.Option(
            help="Prepend the user's Persona-Plug token (when a projector is installed: PERSONALIGN_PPLUG_DIR)."
        ),
    ] = True,
    describe: Annotated[
        bool,
        typer.Option(
            help="Put a one-line description of the user, written by the model, in the system prompt."
        ),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=8192)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Chat as a user: one message with --message, else an interactive session (empty line or EOF ends)."""
    with failing(usage=True):
        steering = steering_option(steer, steer_method)
    with failing():
        with open_personalizer(store, model, encoder, device) as pz:
            history: list[dict[str, str]] = []
            options = {
                "memory": memory,
                "shots": shots,
                "fspo": fspo,
                "pplug": pplug,
                "describe": describe,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
            }
            pending = [message] if message is not None else None
            while True:
                if pending is not None:
                    if not pending:
                        break
                    text = pending.pop()
                else:
                    typer.echo("you> ", nl=False)
                    text = sys.stdin.readline()
                    if not text.strip():
                        break
                history.append({"role": "user", "content": text.strip()})
                if pending is None:
                    typer.echo("bot> ", nl=False)
                pieces = []
                for piece in pz.stream(user, history, steer=steering, **options):
                    pieces.append(piece)
                    typer.echo(piece, nl=False)
                typer.echo()
                history.append({"role": "assistant", "content": "".join(pieces).strip()})


@app.command()
def profile(
    user: UserOpt,
    store: StoreOpt = Path(".personalign"),
    profiles_url: Annotated[
        str | None,
        typer.Option(
            help="The profiles database the store uses (sqlite:///path.db or postgresql://..., as given "
            "to serve); default: the store's JSON files."
        ),
    ] = None,
) -> None:
    """Print a user's stored profile as JSON."""
    from personalign.memory.profiles import open_profiles
    from personalign.memory.sql_profiles import sql_url

    with failing():
        if not (store / "users").is_dir():
            raise ValidationError(
                "--store", "is not a personalign store", "pass the directory given to enroll/chat", str(store)
            )
        if profiles_url is not None:
            url = sql_url(profiles_url)
            if url.get_backend_name() == "sqlite" and not Path(url.database).is_file():
                raise ValidationError(
                    "--profiles-url",
                    "names a SQLite file that does not exist",
                    "pass the --profiles-url given to serve",
                    profiles_url,
                )
        profiles = open_profiles(store, profiles_url)
        try:
            typer.echo(json.dumps(profiles.get(user).model_dump(mode="json"), indent=1))
        finally:
            profiles.close()


@app.command()
def forget(user: UserOpt, store: StoreOpt = Path(".personalign"), encoder: EncoderOpt = None) -> None:
    """Remove every trace of a user: memories and files."""
    from personalign.memory.store import UserStore
    from personalign.models import load_encoder

    with failing():
        with UserStore(store, load_encoder(encoder)) as users:
            outcome = users.forget(user)
        memories, removed = outcome["memories_deleted"], outcome["profile_deleted"]
        typer.echo(f"{user}: {memories} memories deleted, profile {'deleted' if removed else 'was absent'}")


@app.command()
def export(
    engine: Annotated[str, typer.Option(help="vllm or lorax.")],
    users: Annotated[str, typer.Option(help="Comma-separated user ids.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Hub id or folder the engine serves (default: the base the adapters name; "
            "HuggingFaceTB/SmolLM2-135M-Instruct for the embedded model)."
        ),
    ] = None,
    store: StoreOpt = Path(".personalign"),
) -> None:
    """Write users' adapters plus the command line or JSON a serving engine takes.

    Prints the command on stdout and notes (such as how the served base differs from the
    adapters' training base) on stderr.
    """
    from personalign.adapters.export import export_adapters

    with failing():
        ids = [u.strip() for u in users.split(",") if u.strip()]
        manifest = export_adapters(store / "users", ids, engine, out, base_model)  # type: ignore[arg-type]
        for note in manifest["notes"]:
            typer.echo(f"note: {note}", err=True)
        typer.echo(manifest["command"])


@app.command()
def serve(
    store: StoreOpt = Path(".personalign"),
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
    api_keys: Annotated[
        Path | None, typer.Option(help="JSON key file binding API keys to tenants (default: open server).")
    ] = None,
    chroma_url: Annotated[
        str | None, typer.Option(help="Keep memories on this Chroma server (chroma run) instead of embedded.")
    ] = None,
    profiles_url: Annotated[
        str | None,
        typer.Option(
            help="Keep profiles in this database (sqlite:///path.db or postgresql://...) instead of JSON files."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes (each loads the models); above 1 needs --profiles-url and --chroma-url.",
        ),
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="Where prompts decode: local (HF generate here), llama.cpp (a llama.cpp server; started "
            "here for the embedded model unless --engine-url), vllm (--engine-url). docs/scaling.md"
        ),
    ] = "local",
    engine_url: Annotated[
        str | None,
        typer.Option(help="The remote engine's base URL (http://HOST:PORT), for llama.cpp or vllm."),
    ] = None,
    engine_model: Annotated[
        str | None,
        typer.Option(help="The base model's name on the remote engine (vLLM's served model name)."),
    ] = None,
    jobs: Annotated[
        bool,
        typer.Option(
            help="Train adapters off the request path: a `personalign worker` child process runs the "
            "queued trainings (POST /v1/users/{id}/adapter)."
        ),
    ] = True,
    max_batch: Annotated[
        int, typer.Option(min=1, max=256, help="Most chat requests per generate call (1: no batching).")
    ] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0.0, max=1000.0, help="How long a batch waits to fill.")
    ] = 10.0,
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Cap on a request's max_tokens.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted.")] = 1_000_000,
    served_model: Annotated[
        str, typer.Option(help="Model name in /v1/models and responses.")
    ] = "personalign",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible API with per-user personalisation (see docs/server.md)."""
    with failing():  # without the [serve] extra: the error names it
        from personalign.memory.locking import StoreLock
        from personalign.memory.sql_profiles import SqlProfileStore, shown
        from personalign.memory.store import is_shared
        from personalign.server.config import ServerConfig, load_api_keys
        from personalign.server.run import (
            WorkerSettings,
            backend_for,
            check_engine,
            check_workers,
            chroma_client,
            hashed_keys,
            job_queue,
            serve_workers,
            start_job_worker,
            stop_job_worker,
        )
        from personalign.server.run import serve as run_server

    with failing(usage=True):
        config = ServerConfig(
            served_model=served_model,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            max_tokens_cap=max_tokens,
            default_max_tokens=min(256, max_tokens),
            max_body_bytes=max_body_bytes,
            api_keys=load_api_keys(api_keys) if api_keys is not None else (),
        )
        check_workers(workers, chroma_url, profiles_url)
        check_engine(engine, engine_url)
    tenants = sorted({k.tenant for k in config.api_keys})
    banner = (
        f"personalign serve: store {store}, memory {'on ' + chroma_url if chroma_url else 'embedded'}, "
        f"profiles {'in ' + shown(profiles_url) if profiles_url else 'as JSON files'}, "
        f"{'tenants ' + ', '.join(tenants) if tenants else 'open (no API keys)'}, max batch {max_batch}, "
        f"{workers} worker{'s' if workers > 1 else ''}, engine {engine}{' at ' + engine_url if engine_url else ''}, "
        f"adapter jobs {'on' if jobs else 'off'}, http://{host}:{port}/v1"
    )
    if workers > 1:
        with failing():
            chroma_client(chroma_url)  # type: ignore[arg-type]  # fail here, not in every worker
            SqlProfileStore(profiles_url, store).close()  # type: ignore[arg-type]  # creates the table once
        settings = WorkerSettings(
            store=str(store),
            chroma_url=chroma_url,
            profiles_url=profiles_url,
            model=model,
            encoder=encoder,
            device=device,
            config=hashed_keys(config).model_dump(mode="json"),
            engine=engine,
            engine_url=engine_url,
            engine_model=engine_model,
            jobs=jobs,
        )
        if engine == "llama.cpp" and engine_url is None:
            with failing(usage=True):
                raise ValidationError(
                    "--engine-url",
                    "is required with --workers above 1 and --engine llama.cpp (one engine for all workers)",
                    "start one with `personalign engine run --port 8081` and pass --engine-url http://127.0.0.1:8081",
                )
        typer.echo(banner, err=True)
        worker = start_job_worker(store, model, device, profiles_url) if jobs else None
        try:
            serve_workers(settings, workers, host=host, port=port, log_level=log_level)
        finally:
            stop_job_worker(worker)
        return
    with failing():
        client = chroma_client(chroma_url) if chroma_url else None
        if not is_shared(client is not None, profiles_url):
            # Fail in a second, not after loading models, when another process holds the store.
            store.mkdir(parents=True, exist_ok=True)
            probe = StoreLock(store)
            probe.acquire()
            probe.release()
        from personalign.personalizer import Personalizer

        personalizer = Personalizer.load(
            model=model,
            encoder=encoder,
            device=device,
            store=store,
            memory_client=client,
            profiles_url=profiles_url,
            backend=backend_for(engine, engine_url, engine_model),
        )
    typer.echo(banner, err=True)
    worker = start_job_worker(store, model, device, profiles_url) if jobs else None
    queue = job_queue(store, model, device, profiles_url) if jobs else None
    try:
        run_server(personalizer, config, host=host, port=port, log_level=log_level, jobs=queue)
    finally:
        stop_job_worker(worker)
        personalizer.close()
