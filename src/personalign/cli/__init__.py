"""The ``personalign`` command line, one module per command group.

- ``_common``: the typer ``app``, the shared options, ``failing()`` (the one error guard: exit
  code 1 for errors, 2 for a bad option), ``scratch()`` temp folders and ``write_json``;
- ``core``: ``enroll``, ``remember``, ``chat``, ``profile``, ``forget``, ``export``, ``serve``;
- ``demo``: ``demo``;
- ``train`` (and ``train_steer``, the steering recipes), ``eval``, ``bench``: the
  ``personalign train|eval|bench ...`` groups;
- ``memory``: ``memory add|get|update|history|list|search``, ``export-user`` and ``eval drift``;
- ``engine``: ``engine build|info|run`` (the llama.cpp server remote decoding runs on).

A new command group is one module here that imports ``app`` from ``_common`` (and, for a
sub-group, calls ``app.add_typer``), plus its name in ``GROUPS`` below.
"""

from __future__ import annotations

from importlib import import_module
from typing import Annotated

import typer

from personalign.cli._common import app

GROUPS = ("core", "demo", "train", "train_steer", "eval", "eval_psoups", "bench", "memory", "engine")
for _group in GROUPS:
    import_module(f"personalign.cli.{_group}")


def _print_version(value: bool) -> None:
    if value:
        from personalign import __version__

        typer.echo(f"personalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Personalised alignment for chat apps."""


def main() -> None:
    """The ``personalign`` entry point: the app, with a missing optional extra named rather than a traceback."""
    from personalign.cli._common import missing_extra

    try:
        app()
    except ModuleNotFoundError as err:
        message = missing_extra(err)
        if message is None:
            raise
        typer.echo(message, err=True)
        raise SystemExit(1) from None


__all__ = ["app", "main"]
