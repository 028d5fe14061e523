"""The ``personalign`` command line: demo, enroll, chat, remember, profile, forget, bench."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from importlib import resources
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from personalign.errors import PersonalignError, ValidationError
from personalign.steering.methods import METHODS

if TYPE_CHECKING:
    from personalign.steering.schema import Steering

app = typer.Typer(help="Personalised alignment for chat apps.", no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print ratios against a baseline run side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        from personalign import __version__

        typer.echo(f"personalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Personalised alignment for chat apps."""

StoreOpt = Annotated[Path, typer.Option(help="Store directory (profiles, memories).")]
ModelOpt = Annotated[str | None, typer.Option(help="Generator: HF id or local path (default: embedded SmolLM2-135M-Instruct).")]
EncoderOpt = Annotated[str | None, typer.Option(help="Sentence encoder: HF id or local path (default: embedded all-MiniLM-L6-v2).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:0 or auto.")]
UserOpt = Annotated[str, typer.Option("--user", "-u", help="User id.")]


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _open(store: Path, model: str | None = None, encoder: str | None = None, device: str | None = None) -> Any:
    from personalign.personalizer import Personalizer

    return Personalizer.load(model=model, encoder=encoder, device=device, store=store)


def parse_steer(text: str | None) -> dict[str, Any] | None:
    """``--steer``'s text as a request: ``"verbosity=-0.5,structure=1"`` -> ``{"verbosity": -0.5,
    "structure": 1.0}``, or a JSON object in any form ``parse_steering`` reads."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValidationError("--steer", f"is not valid JSON ({err.msg} at character {err.pos})", 'quote the object, e.g. --steer \'{"direction": {"verbosity": 1}}\'', text) from None
        if not isinstance(loaded, dict):
            raise ValidationError("--steer", "is not a JSON object", 'pass e.g. {"weights": {"verbosity": -0.5}}', text)
        return loaded
    steer: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            steer[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValidationError("--steer", f"cannot read {part!r}", "write name=weight pairs, e.g. verbosity=-0.5, or a JSON object", text)
    return steer


def steering_option(text: str | None, method: str | None) -> Steering | None:
    """The ``Steering`` for ``--steer`` and ``--steer-method`` (``None``: the user's default).

    Checked here, before any model loads, with the same ``ValidationError`` as the Python API.
    """
    from personalign.steering.schema import NESTED_KEYS, parse_steering

    request = parse_steer(text)
    if request is None:
        if method is not None:
            raise ValidationError("--steer-method", "needs --steer", "add --steer, e.g. --steer verbosity=-0.5", method)
        return None
    if method is not None:
        if not any(key in NESTED_KEYS for key in request):
            request = {"weights": request, "method": method}  # an empty --steer stays an (invalid) empty request
        elif request.get("method", method) != method:
            raise ValidationError("--steer-method", f"disagrees with --steer's method {request['method']!r}", "give the method in one place", method)
        else:
            request = {**request, "method": method}
    return parse_steering(request)


@app.command()
def enroll(
    user: Annotated[str | None, typer.Option("--user", "-u", help="User id (else taken from the file's user column).")] = None,
    file: Annotated[Path, typer.Option("--file", "-f", exists=True, dir_okay=False, help="JSONL in TRL preference format.")] = ...,  # type: ignore[assignment]
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Add a user's comparisons from a JSONL file (validated entirely before anything is stored)."""
    from personalign.types import read_preferences

    try:
        rows = read_preferences(file)
        by_user: dict[str, list[Any]] = {}
        for index, (row_user, comparison) in enumerate(rows):
            owner = row_user or user
            if owner is None:
                raise ValidationError(f"{file.name}:{index + 1}.user", "has no user", "add a user column or pass --user")
            if user is not None and row_user is not None and row_user != user:
                raise ValidationError(f"{file.name}:{index + 1}.user", f"is {row_user!r}, not --user {user!r}", "drop --user or filter the file")
            by_user.setdefault(owner, []).append(comparison)
        with _open(store, model, encoder, device) as pz:
            for owner, comparisons in by_user.items():
                profile = pz.enroll(owner, comparisons)
                typer.echo(f"{owner}: +{len(comparisons)} comparisons ({len(profile.comparisons)} stored)")
    except PersonalignError as err:
        _fail(err)


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

    try:
        with UserStore(store, load_encoder(encoder)) as users:
            result = users.remember(user, list(text))
        for row in result["results"]:
            typer.echo(f"{row['id']}  {row['memory']}")
    except PersonalignError as err:
        _fail(err)


@app.command()
def chat(
    user: Annotated[str | None, typer.Option("--user", "-u", help="User id (omit for a generic answer).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="One message; omit for an interactive session.")] = None,
    steer: Annotated[
        str | None,
        typer.Option(help='Steering: verbosity=-0.5,structure=0.3 or JSON, e.g. \'{"direction": {"verbosity": 1}}\' (default: the user\'s own).'),
    ] = None,
    steer_method: Annotated[str | None, typer.Option(help=f"Steering method, one of {', '.join(METHODS)} (default: auto).")] = None,
    memory: Annotated[bool, typer.Option(help="Retrieve the user's memories.")] = True,
    shots: Annotated[bool, typer.Option(help="Put the user's comparisons in the prompt (FSPO).")] = True,
    fspo: Annotated[bool, typer.Option(help="Run the FSPO adapter with the shots (when one is installed: PERSONALIGN_FSPO_DIR).")] = True,
    pplug: Annotated[bool, typer.Option(help="Prepend the user's Persona-Plug token (when a projector is installed: PERSONALIGN_PPLUG_DIR).")] = True,
    describe: Annotated[bool, typer.Option(help="Put a one-line description of the user, written by the model, in the system prompt.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=8192)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Chat as a user: one message with --message, else an interactive session (empty line or EOF ends)."""
    try:
        steering = steering_option(steer, steer_method)
        with _open(store, model, encoder, device) as pz:
            history: list[dict[str, str]] = []
            options = {"memory": memory, "shots": shots, "fspo": fspo, "pplug": pplug, "describe": describe, "max_new_tokens": max_new_tokens, "temperature": temperature}
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
    except PersonalignError as err:
        _fail(err)


@app.command()
def profile(user: UserOpt, store: StoreOpt = Path(".personalign")) -> None:
    """Print a user's stored profile as JSON."""
    from personalign.memory.profiles import ProfileStore

    try:
        if not (store / "users").is_dir():
            raise ValidationError("--store", "is not a personalign store", "pass the directory given to enroll/chat", str(store))
        typer.echo(json.dumps(ProfileStore(store).get(user).model_dump(mode="json"), indent=1))
    except PersonalignError as err:
        _fail(err)


@app.command()
def forget(user: UserOpt, store: StoreOpt = Path(".personalign"), encoder: EncoderOpt = None) -> None:
    """Remove every trace of a user: memories and files."""
    from personalign.memory.store import UserStore
    from personalign.models import load_encoder

    try:
        with UserStore(store, load_encoder(encoder)) as users:
            outcome = users.forget(user)
        memories, removed = outcome["memories_deleted"], outcome["profile_deleted"]
        typer.echo(f"{user}: {memories} memories deleted, profile {'deleted' if removed else 'was absent'}")
    except PersonalignError as err:
        _fail(err)


# --- demo --------------------------------------------------------------------------------

DEMO_MEMORIES = {"sam": "I am vegetarian and I cook for two.", "robin": "I am training for my first marathon."}
DEMO_QUESTIONS = ["Plan my dinner for tonight.", "How do I make my coffee taste better?", "What is a good way to relax after work?"]


def _steer_text(steer: dict[str, float]) -> str:
    return ", ".join(f"{name} {weight:+.2f}" for name, weight in steer.items()) or "none"


def _columns(texts: list[str], width: int) -> str:
    wrapped = [textwrap.wrap(t, width) or [""] for t in texts]
    lines = [" | ".join(cell.ljust(width) for cell in row) for row in zip_longest(*wrapped, fillvalue="")]
    return "\n".join(line.rstrip() for line in lines)


def demo_comparisons() -> list[tuple[str | None, Any]]:
    from personalign.types import read_preferences

    with resources.as_file(resources.files("personalign") / "data" / "demo_comparisons.jsonl") as path:
        return read_preferences(path)


@app.command()
def demo(
    store: Annotated[Path | None, typer.Option(help="Store directory (default: a temporary one, removed after).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=16, max=1024)] = 128,
    width: Annotated[int, typer.Option(min=20, max=120)] = 38,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Enroll two users with opposite preferences, give them memories, and answer the same questions for each."""
    from personalign.steering.objectives import word_count

    started = time.perf_counter()
    agree = False
    root = store or Path(tempfile.mkdtemp(prefix="personalign-demo-"))
    try:
        rows = demo_comparisons()
        users = list(dict.fromkeys(u for u, _ in rows if u))
        with _open(root, model, encoder, device) as pz:
            typer.echo(f"models loaded in {time.perf_counter() - started:.1f} s ({pz.generator.model_id}, {pz.encoder.name})\n")
            preference: dict[str, tuple[float, float]] = {}
            for user in users:
                comparisons = [c for u, c in rows if u == user]
                pz.enroll(user, comparisons)
                pz.remember(user, DEMO_MEMORIES[user])
                chosen = statistics.mean(word_count(c.chosen) for c in comparisons)
                rejected = statistics.mean(word_count(c.rejected) for c in comparisons)
                preference[user] = (chosen, rejected)
                typer.echo(
                    f"enrolled {user}: {len(comparisons)} comparisons (chosen {chosen:.0f} words vs rejected {rejected:.0f}), "
                    f"memory: {DEMO_MEMORIES[user]!r}, inferred steer: {_steer_text(pz.default_steer(user))}"
                )
            lengths: dict[str, list[int]] = {u: [] for u in [*users, "generic"]}
            for question in DEMO_QUESTIONS:
                typer.echo(f"\n=== {question}")
                answers = []
                for user in [*users, None]:
                    result = pz.respond(user, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens, repetition_penalty=1.1)
                    lengths[user or "generic"].append(word_count(result.text))
                    used = f"[{len(result.shots)} shots, {len(result.memories)} memories, steer {_steer_text(result.steer)}]"
                    answers.append(f"{(user or 'generic').upper()} {used} {result.text}")
                typer.echo(_columns(answers, width))
            typer.echo()
            agree = _print_measurement(users, preference, lengths)
    except PersonalignError as err:
        _fail(err)
    finally:
        if store is None:
            shutil.rmtree(root, ignore_errors=True)
    typer.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    if not agree:
        raise typer.Exit(1)


def _print_measurement(users: list[str], preference: dict[str, tuple[float, float]], lengths: dict[str, list[int]]) -> bool:
    """Print how answer lengths differ between users next to what their comparisons prefer.

    The check: users ordered by the length preference of their comparisons (chosen minus
    rejected words) must be in the same order by the mean length of their answers.
    Returns whether they are.
    """
    generic = statistics.mean(lengths["generic"])
    means = {u: statistics.mean(lengths[u]) for u in users}
    for user in users:
        chosen, rejected = preference[user]
        typer.echo(
            f"verbosity  {user}: comparisons prefer {'shorter' if chosen < rejected else 'longer'} answers "
            f"({chosen:.0f} vs {rejected:.0f} words); answers average {means[user]:.0f} words (generic {generic:.0f})"
        )
    by_preference = sorted(users, key=lambda u: preference[u][0] - preference[u][1])
    by_answers = sorted(users, key=lambda u: means[u])
    agree = by_preference == by_answers and len(set(means.values())) == len(users)
    shortest, longest = by_preference[0], by_preference[-1]
    typer.echo(
        f"{shortest}'s answers are {means[shortest] / max(means[longest], 1e-9):.2f}x the length of {longest}'s; "
        f"their comparisons point the same way: {'yes' if agree else 'NO'}"
    )
    return agree


# --- adapters ----------------------------------------------------------------------------

train_app = typer.Typer(help="Training recipes.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("user-lora")
def train_user_lora(
    user: UserOpt,
    file: Annotated[Path | None, typer.Option("--file", "-f", exists=True, dir_okay=False, help="New comparisons (JSONL) to add first.")] = None,
    loss: Annotated[str, typer.Option(help="dpo, ipo or simpo.")] = "dpo",
    rank: Annotated[int, typer.Option(min=1, max=256)] = 8,
    epochs: Annotated[int, typer.Option(min=1)] = 8,
    learning_rate: Annotated[float, typer.Option()] = 5e-4,
    beta: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train (or continue training) a user's LoRA adapter on all their comparisons."""
    from personalign.types import read_preferences

    config = {"loss": loss, "rank": rank, "epochs": epochs, "learning_rate": learning_rate, "beta": beta, "seed": seed, "progress": True}
    try:
        new = [c for row_user, c in read_preferences(file) if row_user in (None, user)] if file else []
        with _open(store, model, encoder, device) as pz:
            if new:
                profile = pz.enroll(user, new, adapter=True, adapter_config=config)
            else:
                profile = pz.train_adapter(user, config)
            meta = pz.adapters.metadata(user)
            path = pz.adapters.path(user)
        report = meta["report"]
        typer.echo(
            f"{user}: adapter trained on {meta['pairs']} pairs ({len(profile.comparisons)} stored), {report['epochs_run']} epochs, "
            f"held-out accuracy {report['holdout_accuracy'][-1:] or 'n/a'} -> {path}"
        )
    except PersonalignError as err:
        _fail(err)


@train_app.command("bank")
def train_bank(
    out: Annotated[Path, typer.Option(help="Folder for the bank (one PEFT folder per basis + personalign_bank.json).")],
    data: Annotated[str, typer.Option(help="Population to cluster: psoups, hh, popquorn, synthetic, or a .jsonl with a user column.")] = "synthetic",
    k: Annotated[int, typer.Option(min=1, max=64, help="Number of basis LoRAs (clusters of users).")] = 4,
    max_pairs: Annotated[int, typer.Option(min=1, help="Most comparisons a basis is trained on.")] = 48,
    rank: Annotated[int, typer.Option(min=1, max=256)] = 8,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    learning_rate: Annotated[float, typer.Option()] = 5e-4,
    beta: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train a LoRA bank: cluster users by their preference direction, one basis LoRA per cluster."""
    from personalign.adapters.bank import LoraBank
    from personalign.adapters.lora import LoraTrainConfig
    from personalign.eval.adapters import basis_groups
    from personalign.eval.populations import load_population
    from personalign.models import load_encoder, load_generator

    try:
        population = load_population(data, seed=seed)
        generator, enc = load_generator(model, device=device), load_encoder(encoder, device=device)
        groups = basis_groups(enc, population, k, max_pairs, seed)
        config = LoraTrainConfig(rank=rank, alpha=2 * rank, epochs=epochs, learning_rate=learning_rate, beta=beta, seed=seed, holdout_fraction=0.0, progress=True)
        bank = LoraBank.train(generator, groups, out, config, beta=beta)
        bank.provenance["data"] = data
        bank._write_manifest(out)
        typer.echo(f"bank of {bank.k} bases on {generator.model_id}: " + ", ".join(f"{g} ({len(c)} pairs)" for g, c in groups.items()) + f" -> {out}")
    except PersonalignError as err:
        _fail(err)


@train_app.command("user-bank")
def train_user_bank(
    user: UserOpt,
    bank: Annotated[Path, typer.Option(exists=True, file_okay=False, help="A bank made by `personalign train bank`.")],
    file: Annotated[Path | None, typer.Option("--file", "-f", exists=True, dir_okay=False, help="New comparisons (JSONL) to add first.")] = None,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Fit a user's weights over a LoRA bank (no training of the generator) and store the combined adapter."""
    from personalign.adapters.bank import LoraBank
    from personalign.types import read_preferences

    try:
        new = [c for row_user, c in read_preferences(file) if row_user in (None, user)] if file else []
        with _open(store, model, encoder, device) as pz:
            loaded = LoraBank.load(pz.generator, bank)
            comparisons = new or pz.profile(user).comparisons
            if new:
                comparisons = pz.enroll(user, new, adapter=loaded).comparisons
            else:
                pz.train_adapter(user, bank=loaded)
            summary = pz.adapters.metadata(user)["bank"]
        weights = ", ".join(f"{n}={w:+.2f}" for n, w in zip(summary["bases"], summary["weights"], strict=True))
        typer.echo(f"{user}: weights {weights}; fit accuracy {summary['fit_accuracy']:.2f} on {len(comparisons)} comparisons")
    except PersonalignError as err:
        _fail(err)


@app.command()
def export(
    engine: Annotated[str, typer.Option(help="vllm or lorax.")],
    users: Annotated[str, typer.Option(help="Comma-separated user ids.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    base_model: Annotated[str | None, typer.Option(help="Base model the engine serves (default: the generator's folder).")] = None,
    store: StoreOpt = Path(".personalign"),
) -> None:
    """Write users' adapters plus the command line or JSON a serving engine takes."""
    from personalign.adapters.export import export_adapters
    from personalign.models import EMBEDDED_GENERATOR, convert_embedded_generator

    try:
        base = base_model or str(convert_embedded_generator())
        if base_model is None:
            typer.echo(f"base model: {base} (the converted {EMBEDDED_GENERATOR}; pass --base-model for another)")
        manifest = export_adapters(store / "users", [u.strip() for u in users.split(",") if u.strip()], engine, out, base)  # type: ignore[arg-type]
        typer.echo(manifest["command"])
    except PersonalignError as err:
        _fail(err)


eval_app = typer.Typer(help="Evaluation harnesses (they read external data in place; nothing is copied).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _split_list(text: str, name: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise ValidationError(name, "is empty", f"give a comma-separated list, e.g. {name} a,b")
    return items


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(p) for p in _split_list(text, name)]
    except ValueError:
        raise ValidationError(name, f"cannot read {text!r}", f"write integers separated by commas, e.g. {name} 1,2,4,8", text) from None


@eval_app.command("merge")
def eval_merge(
    inputs: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="JSON files written by `eval enroll --json`.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the merged result here.")],
    plot: Annotated[Path | None, typer.Option(help="Write the merged plot (PNG) here.")] = None,
) -> None:
    """Merge enrollment results (e.g. each source run with its own features) into one JSON and one plot."""
    from personalign.eval.enroll import format_table, merge_results, plot_enroll

    try:
        merged = merge_results([json.loads(p.read_text(encoding="utf-8")) for p in inputs])
    except PersonalignError as err:
        _fail(err)
        return
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(merged, indent=1) + "\n")
    typer.echo(format_table(merged))
    typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_enroll(merged, plot)}")


@eval_app.command("enroll")
def eval_enroll(
    data: Annotated[str, typer.Option(help="Source name(s): psoups, hh, popquorn, prefeval, synthetic, or a .jsonl; comma-separated.")] = "synthetic",
    fit_data: Annotated[str | None, typer.Option(help="Fit the population models on this source instead of a user split of --data.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: bt, meandiff, pal, vpl, oracle, lora, bank.")] = "bt,meandiff,pal,vpl,oracle",
    shots: Annotated[str | None, typer.Option(help="Shot counts, e.g. 1,2,4,8 (default: 1,2,4 on psoups, 1,2,4,8 elsewhere).")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeded user splits per source.")] = 3,
    test_fraction: Annotated[float, typer.Option(help="Share of users held out for testing.")] = 0.2,
    features: Annotated[str, typer.Option(help="Featurizer parts: response, prompt_x_response, log_length, style, hidden (the generator's).")] = "response,prompt_x_response,log_length",
    active: Annotated[bool, typer.Option("--active", help="Add active vs random questioning curves (synthetic sources).")] = False,
    adapter_users: Annotated[int, typer.Option(min=1, help="Test users for the slow lora/bank methods.")] = 20,
    bank_pairs: Annotated[int, typer.Option(min=1, help="Comparisons each basis LoRA of the bank is trained on.")] = 32,
    item_effects: Annotated[bool, typer.Option("--item-effects", help="bt and pal also learn an offset per item seen in fitting (sources where users judge the same items).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy-vs-shots plot (PNG) here.")] = None,
    encoder: EncoderOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Held-out pairwise accuracy of each enrollment method per shot count, with 95% intervals."""
    from personalign.eval.enroll import EnrollConfig, format_table, plot_enroll, run_enroll
    from personalign.models import load_encoder, load_generator

    try:
        config = EnrollConfig(
            data=_split_list(data, "--data"),
            methods=_split_list(methods, "--methods"),
            shots=_int_list(shots, "--shots") if shots else None,
            seeds=seeds,
            fit_data=fit_data,
            test_fraction=test_fraction,
            features=tuple(_split_list(features, "--features")),
            active=active,
            adapter_users=adapter_users,
            bank_pairs=bank_pairs,
            item_effects=item_effects,
        )
        enc = load_encoder(encoder, device=device)
        generator = load_generator(model, device=device) if {"lora", "bank"} & set(config.methods) or "hidden" in config.features else None
        result = run_enroll(config, enc, generator, progress=lambda msg: typer.echo(msg, err=True))
    except PersonalignError as err:
        _fail(err)
        return
    typer.echo(format_table(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_enroll(result, plot)}")


def _train_embedder(method: str, data: str, out: Path, seed: int, features: str, encoder: str | None, device: str | None) -> None:
    from personalign.eval.populations import load_population
    from personalign.models import load_encoder, load_generator
    from personalign.persona import EMBEDDER_CLASSES, save_embedder
    from personalign.persona.base import Featurizer, FeaturizerConfig

    try:
        parts = tuple(_split_list(features, "--features"))
        onpolicy = data in ("synthetic-onpolicy", "synthetic-both")
        generator = load_generator(None, device=device) if "hidden" in parts or onpolicy else None
        if onpolicy:
            from personalign.eval.onpolicy import answer_pool, onpolicy_population
            from personalign.eval.populations import SyntheticConfig, SyntheticPopulation

            synthetic = SyntheticPopulation(SyntheticConfig(seed=seed))
            population = onpolicy_population(synthetic, answer_pool(generator, synthetic.prompts), synthetic.prompts, seed=seed)
            rows = population.population()
            if data == "synthetic-both":  # the generator's own answers and the templated candidates, the same users
                templated = synthetic.population(seed=seed).population()
                rows = {u: [*templated[u], *cs] for u, cs in rows.items()}
        else:
            population = load_population(data, seed=seed)
            rows = population.population()
        featurizer = Featurizer(load_encoder(encoder, device=device), FeaturizerConfig(parts=parts), generator if "hidden" in parts else None)
        started = time.perf_counter()
        embedder = EMBEDDER_CLASSES[method](featurizer).fit(rows, seed=seed)
        provenance = {"data": data, "seed": seed, "users": len(population.users)}
        if onpolicy:
            provenance["generator"] = generator.model_id  # type: ignore[union-attr]
        save_embedder(embedder, out, provenance=provenance)
        typer.echo(f"{method} fitted on {len(population.users)} users of {data} in {time.perf_counter() - started:.1f} s -> {out}")
    except PersonalignError as err:
        _fail(err)


TrainDataOpt = Annotated[
    str,
    typer.Option(
        help="Population: synthetic (project-made, templated answers), synthetic-onpolicy (the same users comparing the generator's own answers), synthetic-both, psoups, hh, popquorn, or a .jsonl with a user column."
    ),
]
FeaturesOpt = Annotated[str, typer.Option(help="Featurizer parts: response, prompt_x_response, log_length, style.")]


EmbedderOutOpt = Annotated[Path, typer.Option(help="Output folder (<method>_config.json + <method>.safetensors + embedder.json).")]


def _embedder_recipe(method: str, doc: str) -> Any:
    def recipe(
        out: EmbedderOutOpt,
        data: TrainDataOpt = "synthetic",
        seed: Annotated[int, typer.Option()] = 0,
        features: FeaturesOpt = "response,prompt_x_response,log_length",
        encoder: EncoderOpt = None,
        device: DeviceOpt = None,
    ) -> None:
        _train_embedder(method, data, out, seed, features, encoder, device)

    recipe.__doc__ = doc
    recipe.__name__ = f"train_{method}"
    return recipe


train_app.command("pal")(_embedder_recipe("pal", "Fit a PAL population model (K prototype rewards) for enrolling users."))
train_app.command("vpl")(_embedder_recipe("vpl", "Fit a VPL model (pair-set encoder to a Gaussian user latent, latent-conditioned reward)."))


SteerOutOpt = Annotated[Path | None, typer.Option(help="Artefact root (vas/, vas_model/, mix/ under it); default: the installed steering folder.")]
ObjectivesOpt = Annotated[str, typer.Option(help="Comma-separated objectives, e.g. verbosity,structure.")]


def _steer_samples(generator: Any, out: Path, samples: Path | None, per_prompt: int, max_new_tokens: int, seed: int) -> Any:
    from personalign.steering.recipes import get_samples

    out.mkdir(parents=True, exist_ok=True)
    return get_samples(generator, out, samples, n_per_prompt=per_prompt, max_new_tokens=max_new_tokens, seed=seed)


@train_app.command("vas")
def train_vas_cmd(
    out: SteerOutOpt = None,
    objectives: ObjectivesOpt = "verbosity,structure",
    kinds: Annotated[str, typer.Option(help="trunk (head on the generator's hidden state), gru (separate small value model), or both.")] = "trunk,gru",
    samples: Annotated[Path | None, typer.Option(help="Reuse a samples.jsonl (default: OUT/samples.jsonl, sampled when missing).")] = None,
    per_prompt: Annotated[int, typer.Option(min=1, help="Samples per training prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 160,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """VAS value models per objective, trained only on the frozen generator's own samples (TD(lambda))."""
    from personalign.models import load_generator
    from personalign.steering.methods import steering_dir
    from personalign.steering.recipes import train_vas_recipe, write_report

    try:
        root = out or steering_dir()
        generator = load_generator(model, device=device)
        data = _steer_samples(generator, root, samples, per_prompt, max_new_tokens, seed)
        report = train_vas_recipe(generator, root, _split_list(objectives, "--objectives"), kinds=_split_list(kinds, "--kinds"), samples=data, epochs=epochs, seed=seed)
        write_report(root, "vas", report)
        for name, r in report.items():
            typer.echo(f"{name}: loss {r['epoch_loss'][0]:.4f} -> {r['epoch_loss'][-1]:.4f} in {r['seconds']:.0f} s -> {r['folder']}")
    except PersonalignError as err:
        _fail(err)


@train_app.command("user-vas")
def train_user_vas_cmd(
    out: Annotated[Path, typer.Option(help="Output folder (user_vas_config.json + head-<k>/).")],
    embedder: Annotated[Path | None, typer.Option(help="The PAL embedder folder the heads follow (default: the shipped one).")] = None,
    per_prompt: Annotated[int, typer.Option(min=2, max=64, help="Sampled answers per training prompt.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 128,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    beta: Annotated[float, typer.Option(help="Default guidance strength.")] = 3.0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train user-conditioned value heads: one VAS head per PAL prototype, on the frozen generator's own samples."""
    from personalign.eval.onpolicy import PoolConfig, train_heads_on_pool
    from personalign.models import load_encoder, load_generator
    from personalign.persona import default_embedder_dir, load_embedder
    from personalign.steering.loop import LoopConfig
    from personalign.steering.uservas import UserVasConfig

    try:
        started = time.perf_counter()
        generator, encoder = load_generator(model, device=device), load_encoder(None, device=device)
        folder = embedder or default_embedder_dir()
        pal = load_embedder(folder, encoder, generator)
        config = UserVasConfig(default_beta=beta, loop=LoopConfig(epochs=epochs, learning_rate=2e-3, batch_size=16, name="user-vas"))
        heads = train_heads_on_pool(generator, pal, PoolConfig(n_per_prompt=per_prompt, max_new_tokens=max_new_tokens), config, provenance={"embedder_folder": str(folder.name)})
        heads.save(out)
        typer.echo(f"{len(heads.heads)} heads on {heads.meta['samples']} samples in {time.perf_counter() - started:.0f} s, final losses {heads.meta['final_losses']} -> {out}")
    except PersonalignError as err:
        _fail(err)


@train_app.command("modpo")
def train_modpo_cmd(
    out: SteerOutOpt = None,
    objectives: ObjectivesOpt = "verbosity,structure",
    margin_weight: Annotated[float, typer.Option(help="Weight of the other objectives' rewards in each adapter's MODPO margin.")] = 0.1,
    samples: Annotated[Path | None, typer.Option(help="Reuse a samples.jsonl (default: OUT/samples.jsonl, sampled when missing).")] = None,
    per_prompt: Annotated[int, typer.Option(min=2, help="Samples per training prompt (pairs come from the same prompt).")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 160,
    max_pairs: Annotated[int, typer.Option(min=1)] = 128,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """MODPO objective adapters (one LoRA per objective) for multi-objective logit mixing."""
    from personalign.models import load_generator
    from personalign.steering.methods import steering_dir
    from personalign.steering.recipes import train_modpo_recipe, write_report

    try:
        root = out or steering_dir()
        generator = load_generator(model, device=device)
        data = _steer_samples(generator, root, samples, per_prompt, max_new_tokens, seed)
        report = train_modpo_recipe(generator, root, _split_list(objectives, "--objectives"), samples=data, margin_weight=margin_weight, epochs=epochs, max_pairs=max_pairs, seed=seed)
        write_report(root, "modpo", report)
        for name, r in report.items():
            typer.echo(f"{name}: {r['pairs']} pairs, loss {r['epoch_loss'][0]:.4f} -> {r['epoch_loss'][-1]:.4f} in {r['seconds']:.0f} s -> {r['folder']}")
    except PersonalignError as err:
        _fail(err)


@train_app.command("dpa")
def train_dpa_cmd(
    out: SteerOutOpt = None,
    objectives: Annotated[str, typer.Option(help="The two objectives of the direction, e.g. verbosity,structure.")] = "verbosity,structure",
    iterations: Annotated[int, typer.Option(min=1, help="Rejection-sampling fine-tuning rounds.")] = 2,
    per_prompt: Annotated[int, typer.Option(min=2, help="Answers generated per prompt and direction; the best is kept.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 160,
    epochs: Annotated[int, typer.Option(min=1, help="SFT epochs per round.")] = 2,
    every_direction: Annotated[bool, typer.Option("--every-direction", help="Teach every direction its own best answer per prompt, not only the drawn direction.")] = False,
    loss: Annotated[str, typer.Option(help="sft (the paper: fine-tune on the best answers) or dpo (DPO on best vs worst under the same direction line).")] = "sft",
    beta: Annotated[float, typer.Option(help="DPO's beta (--loss dpo).")] = 0.1,
    line: Annotated[str, typer.Option(help="How the direction is written: numbers (the paper) or numbers+words (adds the prompting phrases).")] = "numbers",
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """A DPA direction-conditioned adapter: sample directions, keep the best of n answers, fine-tune, repeat."""
    from personalign.models import load_generator
    from personalign.steering.methods import steering_dir
    from personalign.steering.recipes import train_dpa_recipe, write_report

    try:
        if loss not in ("sft", "dpo"):
            raise ValidationError("--loss", "is not a DPA loss", "use sft or dpo", loss)
        if not beta > 0.0:
            raise ValidationError("--beta", "must be positive", "use e.g. 0.1", beta)
        if line not in ("numbers", "numbers+words"):
            raise ValidationError("--line", "is not a direction line form", "use numbers or numbers+words", line)
        root = out or steering_dir()
        root.mkdir(parents=True, exist_ok=True)
        generator = load_generator(model, device=device)
        report = train_dpa_recipe(generator, root, _split_list(objectives, "--objectives"), iterations=iterations, samples_per_prompt=per_prompt, max_new_tokens=max_new_tokens, epochs=epochs, every_direction=every_direction, loss=loss, beta=beta, line=line, seed=seed, progress=typer.echo)
        write_report(root, "dpa", report)
        typer.echo(f"dpa adapter in {report['seconds']:.0f} s -> {report['folder']}")
    except PersonalignError as err:
        _fail(err)


def _training_users(data: str, shots: int, why: str) -> tuple[dict[str, list[Any]], str]:
    """Users' comparisons for the FSPO and Persona-Plug recipes, and where they came from."""
    if data == "synthetic":
        from personalign.eval.generate import generation_split

        return generation_split(seed=0, shots=shots).train, "synthetic population (project-made), training users and topics of eval generate's split"
    from personalign.types import read_preferences

    users: dict[str, list[Any]] = {}
    for index, (owner, comparison) in enumerate(read_preferences(Path(data))):
        if owner is None:
            raise ValidationError(f"{Path(data).name}:{index + 1}.user", "has no user", f"{why}: add a user column")
        users.setdefault(owner, []).append(comparison)
    return users, str(data)


@train_app.command("fspo")
def train_fspo_cmd(
    out: Annotated[Path | None, typer.Option(help="Adapter folder (default: the installed data/fspo, which chat uses when present).")] = None,
    data: Annotated[str, typer.Option(help="synthetic (the evaluation split's training users) or a .jsonl with a user column.")] = "synthetic",
    shots: Annotated[int, typer.Option(min=1, max=16, help="N: shots per task.")] = 4,
    sft_tasks: Annotated[int, typer.Option(min=1, help="Tasks in the SFT stage.")] = 128,
    ipo_tasks: Annotated[int, typer.Option(min=0, help="Tasks in the IPO stage (0 skips it).")] = 48,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per stage.")] = 1,
    beta: Annotated[float, typer.Option(help="IPO beta (target margin 1 / (2 beta)).")] = 0.01,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Resume from / checkpoint to this folder each epoch.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """FSPO meta-training: a LoRA that answers a user from N of their comparisons in the prompt (SFT, then IPO)."""
    from personalign.models import load_generator
    from personalign.persona.fspo import FspoTrainConfig, fspo_dir, save_fspo, train_fspo
    from personalign.steering.loop import LoopConfig

    try:
        users, source = _training_users(data, shots, "FSPO learns per-user tasks")
        ckpt = str(checkpoint_dir) if checkpoint_dir else None
        config = FspoTrainConfig(
            shots=shots,
            sft_tasks=sft_tasks,
            ipo_tasks=ipo_tasks,
            beta=beta,
            seed=seed,
            sft=LoopConfig(epochs=epochs, learning_rate=5e-4, batch_size=2, name="fspo-sft", progress=True, checkpoint_dir=ckpt and ckpt + "/sft"),
            ipo=LoopConfig(epochs=epochs, learning_rate=1e-4, batch_size=2, name="fspo-ipo", progress=True, checkpoint_dir=ckpt and ckpt + "/ipo"),
        )
        generator = load_generator(model, device=device)
        started = time.perf_counter()
        peft_model, report = train_fspo(generator, users, config)
        folder = save_fspo(peft_model, out or fspo_dir(), generator.model_id, config, report, source)
        ipo = report.ipo.epoch_loss if report.ipo else []
        typer.echo(f"fspo: {report.tasks} tasks, SFT loss {report.sft.epoch_loss}, IPO loss {ipo}, {time.perf_counter() - started:.0f} s -> {folder}")
    except PersonalignError as err:
        _fail(err)


@train_app.command("pplug")
def train_pplug_cmd(
    out: Annotated[Path | None, typer.Option(help="Projector folder (default: the installed data/pplug, which chat uses when present).")] = None,
    data: Annotated[str, typer.Option(help="synthetic (the evaluation split's training users) or a .jsonl with a user column.")] = "synthetic",
    items: Annotated[int, typer.Option(min=1, help="History items per task: the preferred responses of this many of the user's comparisons.")] = 4,
    per_user: Annotated[int, typer.Option(min=1, help="Tasks per user (each a different target comparison).")] = 2,
    max_tasks: Annotated[int, typer.Option(min=2, help="Tasks at most (seeded subsample).")] = 320,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    learning_rate: Annotated[float, typer.Option()] = 1e-3,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Resume from / checkpoint to this folder each epoch.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Persona-Plug: a projector from a user's history to one soft token for the frozen generator."""
    import random

    from personalign.models import load_encoder, load_generator
    from personalign.persona.pplug import pplug_dir, save_plug
    from personalign.persona.pplug_train import PlugTask, PlugTrainConfig, train_plug

    try:
        users, source = _training_users(data, items, "Persona-Plug learns from users' histories")
        rng = random.Random(seed)
        tasks = []
        for owner in sorted(users):
            comparisons = users[owner]
            if len(comparisons) <= items:
                continue
            history = tuple(c.chosen for c in comparisons[:items])
            for target in rng.sample(comparisons[items:], min(per_user, len(comparisons) - items)):
                tasks.append(PlugTask(history, target.prompt_text, target.chosen))
        rng.shuffle(tasks)
        tasks = tasks[:max_tasks]
        if len(tasks) < 2:
            raise ValidationError("--data", f"gives {len(tasks)} tasks", f"give users more than --items {items} comparisons each")
        generator, enc = load_generator(model, device=device), load_encoder(encoder, device=device)
        config = PlugTrainConfig(epochs=epochs, learning_rate=learning_rate, seed=seed, progress=True, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
        plug, report = train_plug(generator, enc, tasks, config)
        folder = save_plug(plug, out or pplug_dir(), {"data": source, "tasks": len(tasks), "report": report.to_dict()})
        held = f"held-out NLL {report.val_nll_base:.3f} (no token) -> {report.val_nll[-1]:.3f}, " if report.gain is not None else ""
        typer.echo(f"pplug: {len(tasks)} tasks, {held}{report.seconds:.0f} s -> {folder}")
    except PersonalignError as err:
        _fail(err)


@eval_app.command("generate-merge")
def eval_generate_merge(
    files: Annotated[list[Path], typer.Argument(help="eval generate JSON files of the same settings, different methods.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the merged result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the merged plot (PNG) here.")] = None,
) -> None:
    """Merge eval generate runs of different methods into one result, table and plot."""
    from personalign.eval.generate import format_generate, merge_generate, write_generate

    try:
        result = merge_generate([json.loads(f.read_text()) for f in files])
        write_generate(result, json_out, plot)
        typer.echo(format_generate(result))
    except PersonalignError as err:
        _fail(err)


@eval_app.command("generate")
def eval_generate_cmd(
    methods: Annotated[str, typer.Option(help="Comma list of memory, fspo-prompt, fspo-trained, fspo-shuffled, pplug, all.")] = "memory,fspo-prompt,fspo-trained,fspo-shuffled,pplug,all",
    population: Annotated[str, typer.Option(help="Only 'synthetic' (users with hidden rewards that judge the answers).")] = "synthetic",
    users: Annotated[int, typer.Option(min=1, help="Test users (unseen in training).")] = 16,
    prompts_per_user: Annotated[int, typer.Option(min=1, help="Held-out-topic prompts per user.")] = 4,
    shots: Annotated[int, typer.Option(min=1, max=16, help="Enrolment comparisons per user.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 128,
    fspo: Annotated[Path | None, typer.Option(help="FSPO adapter folder (default: the installed one, if any).")] = None,
    pplug: Annotated[Path | None, typer.Option(help="Persona-Plug projector folder (default: the installed one, if any).")] = None,
    user_steering: Annotated[bool, typer.Option(help="Keep each user's inferred steering default on, as chat does (--no-user-steering isolates the conditioners).")] = True,
    comparisons: Annotated[str, typer.Option(help="What users compare to enrol: onpolicy (the generator's own answers, as a chat app collects them) or templated.")] = "onpolicy",
    rerank: Annotated[int, typer.Option(min=2, max=16, help="Candidates per answer for user-rerank.")] = 4,
    embedder: Annotated[str, typer.Option(help="'fit': fit PAL on this split's training users (see --fit-on); 'shipped': the installed one; or an embedder folder.")] = "fit",
    fit_on: Annotated[str, typer.Option(help="With --embedder fit: the training users' templated, onpolicy or both kinds of comparisons.")] = "both",
    user_vas: Annotated[str, typer.Option("--user-vas", help="Heads for the user-vas methods: 'fit' (trained for the embedder on the generator's samples, cached) or a heads folder.")] = "fit",
    user_vas_beta: Annotated[float, typer.Option(help="Guidance strength of the user-vas methods.")] = 3.0,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the win-rate plot (PNG) here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Win rates of personalised answers over the generic answer, judged by synthetic users' hidden rewards."""
    from personalign.eval.generate import GenerateConfig, format_generate, run_generate, write_generate

    if population != "synthetic":
        _fail(ValidationError("--population", f"{population!r} has no judge here", "use synthetic; real data: personalign eval prefeval / eval rewrite"))
    try:
        config = GenerateConfig(
            methods=_split_list(methods, "--methods"),
            users=users,
            prompts_per_user=prompts_per_user,
            shots=shots,
            seed=seed,
            max_new_tokens=max_new_tokens,
            user_steering=user_steering,
            comparisons=comparisons,
            rerank=rerank,
            user_vas=user_vas_beta,
        )
        with tempfile.TemporaryDirectory(prefix="personalign-eval-generate-") as store:
            from personalign.eval.generate import USER_VAS
            from personalign.eval.onpolicy import fit_split_embedder, fit_user_heads
            from personalign.models import load_encoder, load_generator
            from personalign.persona import default_embedder_dir, load_embedder
            from personalign.personalizer import Personalizer

            generator, encoder = load_generator(model, device=device), load_encoder(None, device=device)
            if embedder == "fit":
                chosen: Any = fit_split_embedder(generator, encoder, config.seed, config.shots, fit_on)
            else:
                chosen = load_embedder(default_embedder_dir() if embedder == "shipped" else Path(embedder), encoder, generator)
            heads = None
            if any(m in USER_VAS for m in config.methods):
                heads = fit_user_heads(generator, chosen) if user_vas == "fit" else Path(user_vas)
            pz = Personalizer(generator, encoder, store, fspo=fspo, embedder=chosen, user_vas=heads, **({"pplug": pplug} if pplug else {}))
            with pz:
                result = run_generate(pz, config, progress=lambda line: typer.echo(line, err=True), on_method=lambda partial: write_generate(partial, json_out, None))
        write_generate(result, json_out, plot)
        typer.echo(format_generate(result))
    except PersonalignError as err:
        _fail(err)


@eval_app.command("onpolicy")
def eval_onpolicy_cmd(
    embedders: Annotated[str, typer.Option(help="Comma list of pal, bt, meandiff, vpl.")] = "pal,bt,meandiff,vpl",
    data: Annotated[str, typer.Option(help="Comma list of what the embedders are fitted and users enrolled on: templated, onpolicy, both (fitted on both, enrolled on-policy).")] = "templated,onpolicy,both",
    seeds: Annotated[str, typer.Option(help="Comma list of split seeds.")] = "0,1",
    users: Annotated[int, typer.Option(min=1, help="Test users per seed.")] = 16,
    prompts_per_user: Annotated[int, typer.Option(min=1)] = 3,
    shots: Annotated[int, typer.Option(min=1, max=8, help="Enrolment comparisons per test user.")] = 4,
    best_of: Annotated[int, typer.Option(min=2, max=16)] = 8,
    enrol: Annotated[str, typer.Option(help="Comma list: random (the split's on-policy shots), active (chosen by information gain from pairs of the generator's answers).")] = "random,active",
    features: FeaturesOpt = "response,prompt_x_response,log_length",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """The reward side on the generator's own answers: on-policy ranking accuracy and best-of-N picks vs the generic answer."""
    from personalign.eval.onpolicy import (
        PoolConfig,
        RankingConfig,
        format_ranking,
        format_summary,
        run_ranking,
    )
    from personalign.models import load_encoder, load_generator

    try:
        config = RankingConfig(
            embedders=_split_list(embedders, "--embedders"),
            data=_split_list(data, "--data"),
            seeds=_int_list(seeds, "--seeds"),
            shots=shots,
            users=users,
            prompts_per_user=prompts_per_user,
            best_of=best_of,
            enrol=_split_list(enrol, "--enrol"),
            features=tuple(_split_list(features, "--features")),
            pool=PoolConfig(n_per_prompt=max(8, best_of)),
        )
        result = run_ranking(load_generator(model, device=device), load_encoder(None, device=device), config, progress=lambda line: typer.echo(line, err=True))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=1) + "\n")
        typer.echo(format_ranking(result))
        typer.echo("\nmeans over seeds:")
        typer.echo(format_summary(result))
    except PersonalignError as err:
        _fail(err)


@eval_app.command("prefeval")
def eval_prefeval(
    split: Annotated[str, typer.Option(help="test (the 4 travel_* topics), dev (the 16 others) or both.")] = "both",
    conditions: Annotated[str, typer.Option(help="Comma list of none, no-memory, memory, oracle.")] = "none,no-memory,memory,oracle",
    filler_turns: Annotated[int, typer.Option(min=0, help="Filler (user, assistant) exchanges between the preference and the question.")] = 3,
    test_items: Annotated[int, typer.Option(min=0, help="Items per test topic, seeded sample (0: all).")] = 10,
    dev_items: Annotated[int, typer.Option(min=0, help="Items per dev topic, seeded sample (0: all).")] = 2,
    n_memories: Annotated[int, typer.Option(min=1, max=100, help="Memories retrieved in the memory condition.")] = 5,
    memory_threshold: Annotated[float, typer.Option(min=-1.0, max=1.0, help="Least cosine similarity of a retrieved memory.")] = 0.2,
    memory_unit: Annotated[str, typer.Option(help="user (one memory per user turn) or exchange (per user+assistant exchange).")] = "user",
    topics: Annotated[str | None, typer.Option(help="Only these topics, comma-separated.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy plot (PNG) here.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding prefeval/ (default: $PERSONALIGN_DATA, else ../shared/data).")] = None,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """PrefEval MCQ accuracy when the preference is in a long context, in memory, absent, or right before the question."""
    from personalign.eval.prefeval import PrefEvalConfig, format_prefeval, plot_prefeval, run_prefeval

    root = Path(tempfile.mkdtemp(prefix="personalign-eval-prefeval-"))
    try:
        config = PrefEvalConfig(
            split=split,
            conditions=_split_list(conditions, "--conditions"),
            filler_turns=filler_turns,
            test_items=test_items or None,
            dev_items=dev_items or None,
            n_memories=n_memories,
            memory_threshold=memory_threshold,
            memory_unit=memory_unit,
            topics=_split_list(topics, "--topics") if topics else None,
            seed=seed,
            data_root=str(data_root) if data_root else None,
        )
        with _open(root, model, encoder, device) as pz:
            result = run_prefeval(config, pz, progress=lambda line: typer.echo(line, err=True))
    except PersonalignError as err:
        _fail(err)
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_prefeval(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_prefeval(result, plot)}")


@eval_app.command("popquorn-reference")
def eval_popquorn_reference(
    seeds: Annotated[int, typer.Option(min=1, max=100, help="Seeded splits for the fit-users-only reference.")] = 3,
    held_out: Annotated[float, typer.Option(min=0.01, max=0.99, help="Share of annotators held out.")] = 0.2,
    data_root: Annotated[Path | None, typer.Option(help="Folder that holds popquorn/ (default: $PERSONALIGN_DATA or ../shared/data).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """How often POPQUORN's item means order a user's own pairs: the README's leave-one-out
    reference recomputed, and item means of the fit users only (what a deployed model knows)."""
    from personalign.eval.reference import popquorn_reference

    try:
        result = popquorn_reference(data_root, seeds=seeds, held_out=held_out)
    except PersonalignError as err:
        _fail(err)
        return
    loo, fit = result["leave_one_out"], result["fit_users_only"]
    typer.echo(f"leave-one-out item means (all other annotators): {loo['ties_dropped']:.4f} over {loo['pairs']} pairs (ties dropped), {loo['ties_half']:.4f} over {loo['all_pairs']} (ties half)")
    typer.echo(f"item means of the fit users only ({held_out:.0%} held out, ties half): {fit['mean']:.4f} (per seed {', '.join(f'{a:.4f}' for a in fit['per_seed'])})")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


@eval_app.command("rewrite")
def eval_rewrite(
    split: Annotated[str, typer.Option(help="test (the seeded 20% held-out users) or dev (the others).")] = "test",
    arms: Annotated[str, typer.Option(help="Comma list: generic plus fspo-prompt, fspo-trained (needs an installed FSPO adapter), memory.")] = "generic,fspo-prompt",
    k: Annotated[int, typer.Option(min=1, help="Target emails per user.")] = 2,
    users: Annotated[int, typer.Option(min=0, help="Most users (0: all of the split).")] = 0,
    n_shots: Annotated[int, typer.Option(min=1, max=64, help="Most of the user's other emails put in the prompt (the most similar first).")] = 3,
    n_memories: Annotated[int, typer.Option(min=1, max=100, help="Memories retrieved in the memory arm.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per generate call.")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here (scores only, no email text).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the plot (PNG) here.")] = None,
    texts: Annotated[Path | None, typer.Option(help="Write the emails, references and outputs here as JSONL (they quote the data: keep it out of the repository).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding popquorn/ (default: $PERSONALIGN_DATA, else ../shared/data).")] = None,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """POPQUORN email rewriting: ROUGE-L and embedding similarity to the user's own rewrite, personalised vs generic."""
    from personalign.eval.rewrite import RewriteConfig, format_rewrite, plot_rewrite, run_rewrite, split_texts

    root = Path(tempfile.mkdtemp(prefix="personalign-eval-rewrite-"))
    try:
        config = RewriteConfig(
            split=split,
            arms=_split_list(arms, "--arms"),
            k=k,
            users=users or None,
            n_shots=n_shots,
            n_memories=n_memories,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            data_root=str(data_root) if data_root else None,
        )
        with _open(root, model, encoder, device) as pz:
            result, rows = split_texts(run_rewrite(config, pz, progress=lambda line: typer.echo(line, err=True)))
    except PersonalignError as err:
        _fail(err)
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_rewrite(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        typer.echo(f"json -> {json_out}")
    if texts is not None:
        texts.parent.mkdir(parents=True, exist_ok=True)
        texts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        typer.echo(f"texts -> {texts}")
    if plot is not None:
        typer.echo(f"plot -> {plot_rewrite(result, plot)}")


@eval_app.command("steer-merge")
def eval_steer_merge(
    files: Annotated[list[Path], typer.Argument(help="eval steer JSON files of the same settings, different methods.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the merged result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the merged plot (PNG) here.")] = None,
) -> None:
    """Merge eval steer runs of different methods into one result, table and plot."""
    from personalign.eval.steer import format_steer, merge_steer, plot_steer

    try:
        result = merge_steer([json.loads(f.read_text()) for f in files])
    except PersonalignError as err:
        _fail(err)
        return
    typer.echo(format_steer(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
    if plot is not None:
        typer.echo(f"plot: {plot_steer(result, plot)}")


@eval_app.command("steer")
def eval_steer(
    objectives: Annotated[str, typer.Option(help="Swept objective first; a second one adds the two-objective front. A leading - means less is better.")] = "verbosity,-structure",
    methods: Annotated[str, typer.Option(help="Comma-separated: prompt, logit, vas, vas-model, mix.")] = "prompt,logit,vas,vas-model,mix",
    sweep: Annotated[int, typer.Option(min=3, help="Requested weights, evenly over [-1, 1].")] = 7,
    directions: Annotated[int, typer.Option(min=2, help="Directions over [0, 90] degrees for the front.")] = 5,
    prompts: Annotated[int, typer.Option(min=1, help="Held-out prompts per point.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 128,
    seeds: Annotated[int, typer.Option(min=1, max=16, help="Answers per prompt and point (seeds 0, 1, ...): more answers, tighter drift intervals.")] = 1,
    no_front: Annotated[bool, typer.Option("--no-front", help="Only the sweep.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the sweep and front plot (PNG) here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Controllability (Spearman of requested vs measured), drift of the other objectives, and Pareto fronts per method."""
    from personalign.eval.steer import SteerEvalConfig, format_steer, plot_steer, run_steer_eval

    root = Path(tempfile.mkdtemp(prefix="personalign-eval-steer-"))
    try:
        config = SteerEvalConfig(
            objectives=_split_list(objectives, "--objectives"), methods=_split_list(methods, "--methods"), sweep=sweep, directions=directions, prompts=prompts, max_new_tokens=max_new_tokens, seeds=seeds, front=not no_front
        )
        with _open(root, model, None, device) as pz:
            result = run_steer_eval(config, pz, progress=typer.echo)
    except PersonalignError as err:
        _fail(err)
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_steer(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
    if plot is not None:
        typer.echo(f"plot: {plot_steer(result, plot)}")


# --- bench -------------------------------------------------------------------------------


@bench_app.command("adapters")
def bench_adapters(
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Mixed-user batches vs one adapter, activation cost vs adapters resident, enrolment time, bytes per user."""
    from personalign.bench.adapters import format_report, run_adapter_bench

    root = Path(tempfile.mkdtemp(prefix="personalign-bench-"))
    try:
        with _open(root, model, None, device) as pz:
            result = run_adapter_bench(pz, max_new_tokens=max_new_tokens, repeats=repeats, epochs=epochs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_report(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


@bench_app.command("steer")
def bench_steer(
    max_new_tokens: Annotated[int, typer.Option(min=4)] = 48,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    batch: Annotated[int, typer.Option(min=2, help="Requests in the batched setting.")] = 4,
    stock_too: Annotated[bool, typer.Option("--stock-too", help="Also run every case with stock F.linear (packing off), side by side.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Tokens per second of plain generate vs VAS (trunk head, separate model) and two-adapter logit mixing."""
    from personalign.bench.steer import format_steer_bench, run_steer_bench

    root = Path(tempfile.mkdtemp(prefix="personalign-bench-"))
    try:
        with _open(root, model, None, device) as pz:
            result = run_steer_bench(pz, max_new_tokens=max_new_tokens, repeats=repeats, batch=batch, stock_too=stock_too)
    except PersonalignError as err:
        _fail(err)
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_steer_bench(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


@bench_app.command("linear")
def bench_linear(
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    model: ModelOpt = None,
) -> None:
    """One decoding step's projections on the generator's weights: stock F.linear vs packed oneDNN, per row count."""
    from personalign.bench.linear import format_linear_bench, run_linear_bench
    from personalign.models import load_generator

    try:
        generator = load_generator(model, device="cpu", dtype="float32")
        result = run_linear_bench(generator.model, repeats=repeats)
    except PersonalignError as err:
        _fail(err)
        return
    except RuntimeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_linear_bench(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


@bench_app.command("generate")
def bench_generate(
    max_new_tokens: Annotated[int, typer.Option(min=4)] = 48,
    repeats: Annotated[int, typer.Option(min=1, help="Prompts (each runs every case once).")] = 3,
    fspo: Annotated[Path | None, typer.Option(help="FSPO adapter folder (default: the installed one, if any).")] = None,
    pplug: Annotated[Path | None, typer.Option(help="Persona-Plug projector folder (default: the installed one, if any).")] = None,
    user_vas: Annotated[Path | None, typer.Option("--user-vas", help="User-vas heads folder (default: the installed ones, if any fit).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Tokens per second of chat with memory, FSPO shots, the FSPO adapter and the Persona-Plug token vs plain generate."""
    from personalign.bench.generate import format_generate_bench, run_generate_bench
    from personalign.models import load_encoder, load_generator
    from personalign.personalizer import Personalizer

    root = Path(tempfile.mkdtemp(prefix="personalign-bench-"))
    try:
        pz = Personalizer(load_generator(model, device=device), load_encoder(None, device=device), root, fspo=fspo, user_vas=user_vas, **({"pplug": pplug} if pplug else {}))
        with pz:
            result = run_generate_bench(pz, max_new_tokens=max_new_tokens, repeats=repeats)
    except PersonalignError as err:
        _fail(err)
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_generate_bench(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


@bench_app.command("enroll")
def bench_enroll(
    users: Annotated[int, typer.Option(min=2, help="Fresh synthetic users to enroll.")] = 20,
    shots: Annotated[int, typer.Option(min=1, help="Comparisons per user.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    embedder: Annotated[Path | None, typer.Option(help="Embedder folder (default: the shipped PAL).")] = None,
    encoder: EncoderOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Inferring a user from their comparisons, as a ratio to encoding those comparisons' texts."""
    from personalign.bench.enroll import bench_store, format_enroll_report, run_enroll_bench
    from personalign.personalizer import Personalizer

    store = bench_store()
    try:
        with Personalizer.load(model=model, encoder=encoder, device=device, store=store, embedder=embedder) as pz:
            result = run_enroll_bench(pz, users=users + 1, shots=shots)
    except PersonalignError as err:
        _fail(err)
        return
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    typer.echo(format_enroll_report(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


@bench_app.command("memory")
def bench_memory(
    users: Annotated[int, typer.Option(min=1)] = 100,
    memories: Annotated[int, typer.Option(min=1)] = 10_000,
    queries: Annotated[int, typer.Option(min=1)] = 200,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    store: Annotated[Path | None, typer.Option(help="Store directory (default: a temporary one, removed after).")] = None,
) -> None:
    """add/search p50/p95 at N memories for one user among many, next to one encoder call."""
    from personalign.bench.memory import format_report, run_memory_bench

    root = store or Path(tempfile.mkdtemp(prefix="personalign-bench-"))
    try:
        result = run_memory_bench(root, users=users, memories=memories, queries=queries, adds=queries)
    finally:
        if store is None:
            shutil.rmtree(root, ignore_errors=True)
    typer.echo(format_report(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


# --- serve -------------------------------------------------------------------------------


@app.command()
def serve(
    store: StoreOpt = Path(".personalign"),
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
    api_keys: Annotated[Path | None, typer.Option(help="JSON key file binding API keys to tenants (default: open server).")] = None,
    chroma_url: Annotated[str | None, typer.Option(help="Keep memories on this Chroma server (chroma run) instead of embedded.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, max=256, help="Most chat requests per generate call (1: no batching).")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help="How long a batch waits to fill.")] = 10.0,
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Cap on a request's max_tokens.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted.")] = 1_000_000,
    served_model: Annotated[str, typer.Option(help="Model name in /v1/models and responses.")] = "personalign",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible API with per-user personalisation (see docs/server.md)."""
    from personalign.server.config import ServerConfig, load_api_keys
    from personalign.server.run import chroma_client
    from personalign.server.run import serve as run_server

    try:
        config = ServerConfig(
            served_model=served_model,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            max_tokens_cap=max_tokens,
            default_max_tokens=min(256, max_tokens),
            max_body_bytes=max_body_bytes,
            api_keys=load_api_keys(api_keys) if api_keys is not None else (),
        )
        client = chroma_client(chroma_url) if chroma_url else None
        # Fail in a second, not after loading models, when another process holds the store.
        from personalign.memory.locking import StoreLock

        store.mkdir(parents=True, exist_ok=True)
        probe = StoreLock(store)
        probe.acquire()
        probe.release()
        from personalign.personalizer import Personalizer

        personalizer = Personalizer.load(model=model, encoder=encoder, device=device, store=store, memory_client=client)
    except PersonalignError as err:
        _fail(err)
    tenants = sorted({k.tenant for k in config.api_keys})
    typer.echo(
        f"personalign serve: store {store}, memory {'on ' + chroma_url if chroma_url else 'embedded'}, "
        f"{'tenants ' + ', '.join(tenants) if tenants else 'open (no API keys)'}, max batch {max_batch}, "
        f"http://{host}:{port}/v1",
        err=True,
    )
    try:
        run_server(personalizer, config, host=host, port=port, log_level=log_level)
    finally:
        personalizer.close()


@bench_app.command("serve")
def bench_serve(
    clients: Annotated[str, typer.Option(help="Concurrency levels to measure, comma-separated.")] = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="Requests per client at each level (bounded by --seconds too).")] = 4,
    seconds: Annotated[float, typer.Option(min=1.0, help="Most seconds of load per level and server.")] = 60.0,
    max_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    max_batch: Annotated[int, typer.Option(min=2, max=256, help="Batch size of the batched server (the baseline uses 1).")] = 16,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
    mixed: Annotated[bool, typer.Option("--mixed", help="20 users; chats mixed with memory writes and enrollments, all read back at the end.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
) -> None:
    """Throughput and p50/p95 latency at 1, 4 and 16 clients on loopback, batched vs one-at-a-time."""
    from personalign.bench.serve import format_report, run_serve_bench

    try:
        levels = [int(c) for c in clients.split(",") if c.strip()]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        _fail(ValidationError("--clients", "must be positive integers separated by commas", "pass e.g. 1,4,16", clients))
    result = run_serve_bench(
        levels=levels, requests_per_client=requests, max_seconds=seconds, max_tokens=max_tokens, max_batch=max_batch,
        model=model, encoder=encoder, device=device, mixed=mixed,
    )
    typer.echo(format_report(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
