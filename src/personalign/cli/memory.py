"""``personalign memory ...`` (the memory lifecycle), ``personalign comparisons edit``,
``personalign export-user`` and ``personalign eval drift``. Results are printed as JSON, in the
shape Python and HTTP return.

The memory commands open the store with the encoder only (no generator is loaded);
``comparisons edit`` re-infers the user's state, so it loads the models as ``enroll`` does."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from personalign.cli._common import (
    DeviceOpt,
    EncoderOpt,
    ModelOpt,
    StoreOpt,
    UserOpt,
    app,
    failing,
    int_list,
    open_personalizer,
    write_json,
)
from personalign.cli.eval import eval_app
from personalign.errors import ValidationError

memory_app = typer.Typer(
    help="Memories with a lifecycle: add, get, update, history, list, search.", no_args_is_help=True
)
app.add_typer(memory_app, name="memory")
comparisons_app = typer.Typer(
    help="A user's stored comparisons: edit them by index (`personalign profile` lists them in order).",
    no_args_is_help=True,
)
app.add_typer(comparisons_app, name="comparisons")

MetadataOpt = Annotated[
    str | None, typer.Option(help='Metadata as a JSON object, e.g. \'{"category": "diet"}\'.')
]
FiltersOpt = Annotated[
    str | None,
    typer.Option(help='Metadata filter as JSON: \'{"category": "diet"}\' or \'{"priority": {"gte": 2}}\'.'),
]
StatusOpt = Annotated[str, typer.Option(help="active (the default), superseded or all.")]
MemoryIdOpt = Annotated[str, typer.Argument(help="The memory id (from memory list).")]


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """An option's JSON object, or a usage error naming the option."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValidationError(
            option,
            f"is not valid JSON ({err.msg})",
            'quote a JSON object, e.g. \'{"category": "diet"}\'',
            text,
        ) from None
    if not isinstance(value, dict):
        raise ValidationError(option, "is not a JSON object", 'pass e.g. \'{"category": "diet"}\'', text)
    return value


def existing_store(store: Path) -> None:
    """A missing store is an error naming ``--store``, not a new empty store."""
    if not (store / "users").is_dir():
        raise ValidationError(
            "--store", "is not a personalign store", "pass the directory given to enroll/remember", str(store)
        )


@contextmanager
def opened(store: Path, encoder: str | None) -> Iterator[Any]:
    """The store (profiles and memories) with the encoder; a missing store is an error, not created."""
    from personalign.memory.lifecycle import UnknownMemoryError
    from personalign.memory.store import UserStore
    from personalign.models import load_encoder

    with failing(UnknownMemoryError):
        existing_store(store)
        with UserStore(store, load_encoder(encoder)) as users:
            yield users


def show(result: Any) -> None:
    typer.echo(json.dumps(result, indent=1, ensure_ascii=False))


@memory_app.command("add")
def memory_add(
    user: UserOpt,
    text: Annotated[list[str], typer.Argument(help="Fact(s) to remember.")],
    key: Annotated[
        str | None,
        typer.Option(help="A short identifier (home_city): the new memory supersedes the one with this key."),
    ] = None,
    on_conflict: Annotated[
        str, typer.Option(help="keep (report close unkeyed memories) or supersede them.")
    ] = "keep",
    metadata: MetadataOpt = None,
    store: StoreOpt = Path(".personalign"),
    encoder: EncoderOpt = None,
) -> None:
    """Store fact(s): de-duplicated, superseding by key (the user is created if new)."""
    from personalign.memory.store import UserStore
    from personalign.models import load_encoder

    with failing():
        meta = json_object(metadata, "--metadata")
        with UserStore(store, load_encoder(encoder)) as users:
            show(users.remember(user, list(text), meta, key=key, on_conflict=on_conflict, source="cli"))


@memory_app.command("get")
def memory_get(
    user: UserOpt, memory_id: MemoryIdOpt, store: StoreOpt = Path(".personalign"), encoder: EncoderOpt = None
) -> None:
    """One memory by id (any status)."""
    with opened(store, encoder) as users:
        show({"results": [users.memories.get(user, memory_id)]})


@memory_app.command("update")
def memory_update(
    user: UserOpt,
    memory_id: MemoryIdOpt,
    text: Annotated[str, typer.Argument(help="The new text.")],
    metadata: MetadataOpt = None,
    store: StoreOpt = Path(".personalign"),
    encoder: EncoderOpt = None,
) -> None:
    """Replace a memory's text (and metadata, when given); the previous text stays in its history."""
    with opened(store, encoder) as users:
        show(
            users.memories.update(
                user, memory_id, text, metadata=json_object(metadata, "--metadata"), source="cli"
            )
        )


@memory_app.command("history")
def memory_history(
    user: UserOpt, memory_id: MemoryIdOpt, store: StoreOpt = Path(".personalign"), encoder: EncoderOpt = None
) -> None:
    """Every version of a memory, oldest first, with its time and source."""
    with opened(store, encoder) as users:
        show(users.memories.history(user, memory_id))


@memory_app.command("list")
def memory_list(
    user: UserOpt,
    filters: FiltersOpt = None,
    status: StatusOpt = "active",
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many (oldest first).")] = None,
    store: StoreOpt = Path(".personalign"),
    encoder: EncoderOpt = None,
) -> None:
    """The user's memories, oldest first, narrowed by metadata filters."""
    with opened(store, encoder) as users:
        show(users.memories.list(user, filters=json_object(filters, "--filters"), status=status, limit=limit))


@memory_app.command("search")
def memory_search(
    user: UserOpt,
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    top_k: Annotated[int, typer.Option(min=1, max=1000)] = 5,
    filters: FiltersOpt = None,
    status: StatusOpt = "active",
    store: StoreOpt = Path(".personalign"),
    encoder: EncoderOpt = None,
) -> None:
    """The memories closest in meaning to the query (active ones unless --status says otherwise)."""
    with opened(store, encoder) as users:
        show(
            users.memories.search(
                user, query, top_k=top_k, filters=json_object(filters, "--filters"), status=status
            )
        )


INDEX = re.compile(r"(0|[1-9][0-9]{0,8})")  # a comparison index as JSON object key, as HTTP takes it


def replacements(text: str | None) -> dict[int, Any]:
    """``--replace``'s JSON object (index -> TRL-format comparison), each comparison checked and named."""
    from personalign.types import comparison_from_row

    rows = json_object(text, "--replace") or {}
    fix = 'write e.g. \'{"1": {"prompt": "...", "chosen": "...", "rejected": "..."}}\''
    parsed: dict[int, Any] = {}
    for key, row in rows.items():
        if not INDEX.fullmatch(key):
            raise ValidationError("--replace", f"key {key!r} is not a comparison index", fix, key)
        if not isinstance(row, dict):
            raise ValidationError(f"--replace.{key}", "is not a JSON object", fix, row)
        parsed[int(key)] = comparison_from_row(row, f"--replace.{key}")
    return parsed


@comparisons_app.command("edit")
def comparisons_edit(
    user: UserOpt,
    remove: Annotated[
        str | None,
        typer.Option(help="Indices to delete, comma-separated (as `personalign profile` lists them)."),
    ] = None,
    replace: Annotated[
        str | None,
        typer.Option(
            help='JSON object of index -> comparison in TRL format: \'{"1": {"prompt": ..., "chosen": ..., "rejected": ...}}\'.'
        ),
    ] = None,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Remove and/or replace comparisons by index; the inferred steering and state are recomputed in the
    same atomic write. Every index and comparison is checked first: on any error nothing changes."""
    with failing():
        indices = int_list(remove, "--remove") if remove is not None else []
        fresh = replacements(replace)
        existing_store(store)
        with open_personalizer(store, model, encoder, device) as pz:
            profile = pz.edit_comparisons(user, remove=indices, replace=fresh)
            show(
                {
                    "user": user,
                    "removed": len(set(indices)),
                    "replaced": len(fresh),
                    "comparisons": len(profile.comparisons),
                    "version": profile.version,
                    "default_steer": pz.default_steer(user),
                }
            )


@app.command("export-user")
def export_user_cmd(
    user: UserOpt,
    out: Annotated[Path | None, typer.Option(help="Write the document here (default: print it).")] = None,
    store: StoreOpt = Path(".personalign"),
    encoder: EncoderOpt = None,
) -> None:
    """Everything stored about a user (comparisons, memories with history, state, steering, adapter) as one JSON document."""
    from personalign.adapters.store import ADAPTER_DIR, META_FILE
    from personalign.memory.export import export_user
    from personalign.personalizer import _default_steering

    def adapter_meta(u: str) -> dict[str, Any] | None:
        path = users.profiles.user_dir(u) / ADAPTER_DIR / META_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def default_steer(u: str) -> dict[str, float]:
        return _default_steering(users.profiles.get(u)).weights

    with opened(store, encoder) as users:
        document = export_user(user, users.profiles, users.memories, adapter_meta, default_steer)
    if not write_json(out, document):
        show(document)
    else:
        typer.echo(
            f"{user}: {len(document['comparisons'])} comparisons, {len(document['memories'])} memories -> {out}"
        )


@eval_app.command("drift")
def eval_drift(
    out: Annotated[Path, typer.Option(help="Folder for drift.json and drift.png.")] = Path("drift-eval"),
    ks: Annotated[str, typer.Option(help="Post-switch comparisons to evaluate after.")] = "1,2,4,8",
    pre: Annotated[int, typer.Option(min=1, help="Comparisons before the switch.")] = 16,
    held_out: Annotated[int, typer.Option(min=1, help="Held-out pairs per user and scenario.")] = 32,
    users: Annotated[int, typer.Option(min=10, help="Synthetic users (20% are test users).")] = 200,
    seeds: Annotated[int, typer.Option(min=1)] = 1,
    half_life: Annotated[float, typer.Option(help="The recency method's half-life, in comparisons.")] = 4.0,
    memory_people: Annotated[int, typer.Option(min=0, help="Memory timelines (people); 0 skips them.")] = 20,
    encoder: EncoderOpt = None,
) -> None:
    """Preference drift (users who switch archetype, and who never do) and memory timelines (facts that change)."""
    from personalign.eval.drift import DriftEvalConfig, run_drift
    from personalign.models import load_encoder

    with failing():
        config = DriftEvalConfig(
            ks=int_list(ks, "--ks"),
            pre=pre,
            held_out=held_out,
            synthetic_users=users,
            seeds=seeds,
            half_life=half_life,
            memory_people=memory_people,
        )
        result = run_drift(config, load_encoder(encoder), out=out, progress=typer.echo)
    for scenario in ("switch", "stay"):
        for k, cell in result["preference"][scenario].items():
            typer.echo(
                f"{scenario:6s} k={k}: "
                + "  ".join(f"{m} {cell[m]:.3f}" for m in ("static", "recency", "detector", "fresh"))
            )
    for mode, cell in result["memory"].items():
        typer.echo(
            f"memory {mode}: current top-1 {cell['current_top1']:.3f}, earlier version outranks it {cell['superseded_outranks_current']:.3f}"
        )
    typer.echo(f"json -> {out / 'drift.json'}\nplot -> {out / 'drift.png'}")
