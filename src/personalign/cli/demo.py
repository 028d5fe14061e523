"""``personalign demo``: two users with opposite preferences answer the same questions, and the
printed measurement says whether their answers differ the way their comparisons do."""

from __future__ import annotations

import statistics
import textwrap
import time
from importlib import resources
from itertools import zip_longest
from pathlib import Path
from typing import Annotated, Any

import typer

from personalign.cli._common import DeviceOpt, EncoderOpt, ModelOpt, app, failing, open_personalizer, scratch

DEMO_MEMORIES = {
    "sam": "I am vegetarian and I cook for two.",
    "robin": "I am training for my first marathon.",
}


DEMO_QUESTIONS = [
    "Plan my dinner for tonight.",
    "How do I make my coffee taste better?",
    "What is a good way to relax after work?",
]


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
    store: Annotated[
        Path | None, typer.Option(help="Store directory (default: a temporary one, removed after).")
    ] = None,
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
    rows = demo_comparisons()
    users = list(dict.fromkeys(u for u, _ in rows if u))
    with (
        failing(),
        scratch(store, "personalign-demo-") as root,
        open_personalizer(root, model, encoder, device) as pz,
    ):
        typer.echo(
            f"models loaded in {time.perf_counter() - started:.1f} s ({pz.generator.model_id}, {pz.encoder.name})\n"
        )
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
                result = pz.respond(
                    user,
                    [{"role": "user", "content": question}],
                    max_new_tokens=max_new_tokens,
                    repetition_penalty=1.1,
                )
                lengths[user or "generic"].append(word_count(result.text))
                used = f"[{len(result.shots)} shots, {len(result.memories)} memories, steer {_steer_text(result.steer)}]"
                answers.append(f"{(user or 'generic').upper()} {used} {result.text}")
            typer.echo(_columns(answers, width))
        typer.echo()
        agree = _print_measurement(users, preference, lengths)
    typer.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    if not agree:
        raise typer.Exit(1)


def _print_measurement(
    users: list[str], preference: dict[str, tuple[float, float]], lengths: dict[str, list[int]]
) -> bool:
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
