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


def _guidance_text(report: dict[str, Any] | None) -> str:
    """`, user-vas 3.0 (0.61/0.02/...)` or `, user-rerank: candidate 2 of 4`: the decode-time guidance that ran, if any."""
    if report and report.get("method") == "user-rerank":
        return f", user-rerank: candidate {report['picked'] + 1} of {report['candidates']}"
    if not report or "weights" not in report:
        return ""
    weights = "/".join(f"{w:.2f}" for w in report["weights"])
    return f", {report['method']} {report['strength']:g} (mixture {weights})"


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
    user_vas: Annotated[
        float | None,
        typer.Option(
            "--user-vas",
            min=0.0,
            help="Strength of the user-vas guidance (default: the shipped heads' own; 0: off).",
        ),
    ] = None,
    rerank: Annotated[
        int,
        typer.Option(
            min=0,
            max=16,
            help="Personal reranking: sample this many guided candidates per answer, the user's reward picks one (0: off).",
        ),
    ] = 0,
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
        texts: dict[str, list[str]] = {u: [] for u in [*users, "generic"]}
        for question in DEMO_QUESTIONS:
            typer.echo(f"\n=== {question}")
            answers = []
            for user in [*users, None]:
                result = pz.respond(
                    user,
                    [{"role": "user", "content": question}],
                    max_new_tokens=max_new_tokens,
                    repetition_penalty=1.1,
                    **({} if user_vas is None or user is None else {"user_vas": user_vas}),
                    **({"rerank": rerank, "seed": 0} if rerank >= 2 and user is not None else {}),
                )
                lengths[user or "generic"].append(word_count(result.text))
                texts[user or "generic"].append(result.text)
                used = (
                    f"[{len(result.shots)} shots, {len(result.memories)} memories, steer {_steer_text(result.steer)}"
                    f"{_guidance_text(result.personalization)}]"
                )
                answers.append(f"{(user or 'generic').upper()} {used} {result.text}")
            typer.echo(_columns(answers, width))
        typer.echo()
        agree = _print_measurement(users, preference, lengths)
        typer.echo()
        _print_attributes({u: [c for r, c in rows if r == u] for u in users}, texts)
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


def _print_attributes(comparisons: dict[str, list[Any]], texts: dict[str, list[str]]) -> list[str]:
    """Print, per measured attribute, what each user's comparisons prefer and what their answers
    show; returns the attributes besides length on which the users' answers are ordered as their
    comparisons are.

    A user's preference for an attribute is its mean over their chosen answers minus its mean over
    their rejected ones (``measure_attributes``: list lines, formal vs informal markers, jargon,
    sentiment and polite phrases per sentence). An attribute counts when the users' preferences
    point in different directions and the user who prefers more of it got more of it.
    """
    import numpy as np

    from personalign.eval.populations import ATTRIBUTES, measure_attributes

    users = list(comparisons)
    prefer = {
        u: np.mean([measure_attributes(c.chosen) - measure_attributes(c.rejected) for c in cs], axis=0)
        for u, cs in comparisons.items()
    }
    shown = {u: np.mean([measure_attributes(t) for t in ts], axis=0) for u, ts in texts.items()}
    typer.echo(
        f"{'attribute':<13}"
        + "".join(f"{u + ' prefers':>15}{u + ' answers':>15}" for u in users)
        + f"{'generic':>10}  ordered as preferred"
    )
    moved = []
    for k, name in enumerate(ATTRIBUTES):
        row = "".join(f"{prefer[u][k]:>+15.2f}{shown[u][k]:>15.2f}" for u in users)
        signs = {np.sign(round(float(prefer[u][k]), 2)) for u in users}
        if len(signs) < 2:
            typer.echo(f"{name:<13}{row}{shown['generic'][k]:>10.2f}  (the users agree: not a test)")
            continue
        by_preference = sorted(users, key=lambda u: prefer[u][k])
        by_answers = sorted(users, key=lambda u: shown[u][k])
        ok = by_preference == by_answers and len({round(float(shown[u][k]), 4) for u in users}) == len(users)
        if ok and name != "length":
            moved.append(name)
        typer.echo(f"{name:<13}{row}{shown['generic'][k]:>10.2f}  {'yes' if ok else 'NO'}")
    typer.echo(
        f"attributes besides length where the answers follow the users' comparisons: {', '.join(moved) or 'none'}"
    )
    return moved
