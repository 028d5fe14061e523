"""What every command shares: the typer app, the common options, the error guard, ``--json`` output
and scratch folders. Written once here so that a command is only its own logic."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from personalign.errors import PersonalignError, ValidationError

app = typer.Typer(help="Personalised alignment for chat apps.", no_args_is_help=True, add_completion=False)

StoreOpt = Annotated[Path, typer.Option(help="Store directory (profiles, memories).")]
ModelOpt = Annotated[
    str | None, typer.Option(help="Generator: HF id or local path (default: embedded SmolLM2-135M-Instruct).")
]
EncoderOpt = Annotated[
    str | None,
    typer.Option(help="Sentence encoder: HF id or local path (default: embedded all-MiniLM-L6-v2)."),
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:0 or auto.")]
UserOpt = Annotated[str, typer.Option("--user", "-u", help="User id.")]
FeaturesOpt = Annotated[
    str, typer.Option(help="Featurizer parts: response, prompt_x_response, log_length, style.")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")]

USAGE_EXIT = 2  # the command line itself is wrong (typer's own usage errors use 2 too)
ERROR_EXIT = 1  # the command line was fine; the data, the store or the models were not


def exit_code(err: Exception) -> int:
    """2 for a bad option (a ``ValidationError`` on a ``--flag``), 1 for every other error."""
    return USAGE_EXIT if isinstance(err, ValidationError) and err.field.startswith("--") else ERROR_EXIT


# A module of an optional extra that is not installed: the extra that brings it.
EXTRAS = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "sqlalchemy": "serve",  # --profiles-url (also in [postgres])
    "huey": "serve",  # adapter training jobs
    "psycopg": "postgres",  # --profiles-url postgresql://...
    "matplotlib": "lab",
    "scipy": "lab",
    "sklearn": "lab",
    "gguf": "embedded",
}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The error line for a module of an optional extra that is not installed (``None``: not an extra's)."""
    extra = EXTRAS.get((err.name or "").split(".")[0])
    if extra is None:
        return None
    return f"error: this command needs {err.name}, which is not installed. Fix: pip install 'personalign[{extra}]'"


@contextmanager
def failing(*also: type[Exception], usage: bool = False) -> Iterator[None]:
    """Turn a personalign error (and any of ``also``) into ``error: ...`` on stderr and an exit code
    (``usage=True``: the block only checks option values, so any error in it is a usage error).
    A missing optional dependency names the extra that installs it."""
    try:
        yield
    except (PersonalignError, *also) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(USAGE_EXIT if usage else exit_code(err)) from None
    except ModuleNotFoundError as err:
        message = missing_extra(err)
        if message is None:
            raise
        typer.echo(message, err=True)
        raise typer.Exit(ERROR_EXIT) from None


@contextmanager
def scratch(store: Path | None, prefix: str = "personalign-") -> Iterator[Path]:
    """``store`` when given, else a temporary folder removed afterwards."""
    root = store or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if store is None:
            shutil.rmtree(root, ignore_errors=True)


def write_json(path: Path | None, result: Any) -> bool:
    """The ``--json`` output: the whole result, indented, when a path was given (returns whether it was)."""
    if path is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return True


def open_personalizer(
    store: Path, model: str | None = None, encoder: str | None = None, device: str | None = None
) -> Any:
    from personalign.personalizer import Personalizer

    return Personalizer.load(model=model, encoder=encoder, device=device, store=store)


def split_list(text: str, name: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise ValidationError(name, "is empty", f"give a comma-separated list, e.g. {name} a,b")
    return items


def int_list(text: str, name: str) -> list[int]:
    try:
        return [int(p) for p in split_list(text, name)]
    except ValueError:
        raise ValidationError(
            name, f"cannot read {text!r}", f"write integers separated by commas, e.g. {name} 1,2,4,8", text
        ) from None
