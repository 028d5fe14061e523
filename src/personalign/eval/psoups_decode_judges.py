"""Who guides and who judges in :mod:`personalign.eval.psoups_decode`: the guidance embedder (PAL
fitted on the fit users, or the shipped one), one Bradley-Terry judge per persona, and the held-out
accuracy of each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from personalign.eval.enroll_scoring import evaluate_embedder, held_out_correct
from personalign.eval.population_base import EvalPopulation
from personalign.eval.psoups_decode_scores import wilson_interval
from personalign.preference.featurizer import DEFAULT_PARTS

if TYPE_CHECKING:
    from personalign.eval.psoups_decode import PsoupsDecodeConfig


def build_guidance(generator: Any, encoder: Any, fit: EvalPopulation, config: PsoupsDecodeConfig) -> Any:
    """The embedder that guides: PAL fitted on the fit users' comparisons only (``{user: comparisons}``,
    no persona), or the shipped PAL."""
    from personalign.preference import default_embedder_dir, load_embedder
    from personalign.preference.featurizer import Featurizer, FeaturizerConfig
    from personalign.preference.pal import PAL

    if config.guidance == "shipped":
        return load_embedder(default_embedder_dir(), encoder, generator)
    comparisons = {u.user: list(u.comparisons) for u in fit.users if u.comparisons}
    return PAL(Featurizer(encoder, FeaturizerConfig(parts=DEFAULT_PARTS))).fit(comparisons, seed=config.seed)


def build_judges(
    generator: Any, encoder: Any, fit: EvalPopulation, config: PsoupsDecodeConfig
) -> dict[str, Any]:
    """One Bradley-Terry reward per persona, fitted on that persona's fit users (one shared featurizer)."""
    from personalign.preference.bt import BradleyTerry
    from personalign.preference.featurizer import Featurizer, FeaturizerConfig

    featurizer = Featurizer(
        encoder,
        FeaturizerConfig(parts=config.judge_features),
        generator if "hidden" in config.judge_features else None,
    )
    judges = {}
    for persona in sorted({str(u.group) for u in fit.users}):
        members = {u.user: list(u.comparisons) for u in fit.users if u.group == persona and u.comparisons}
        judges[persona] = BradleyTerry(featurizer).fit(members, seed=config.seed)
    return judges


def judge_accuracy(judges: dict[str, Any], test: EvalPopulation) -> dict[str, Any]:
    """The judges' accuracy on every test user's held-out pair (the judge of their persona), per persona too."""
    per: dict[str, list[float]] = {}
    for u in test.users:
        if u.held_out and str(u.group) in judges:
            judge = judges[str(u.group)]
            correct, n = held_out_correct(judge, u, judge.prior())
            per.setdefault(str(u.group), []).append(correct / n)
    scores = [s for v in per.values() for s in v]
    return {
        "accuracy": float(np.mean(scores)),
        "ci": list(wilson_interval(sum(scores), len(scores))),
        "n": len(scores),
        "per_persona": {p: float(np.mean(v)) for p, v in sorted(per.items())},
    }


def guidance_accuracy(embedder: Any, test: EvalPopulation) -> dict[str, Any]:
    """The embedder's accuracy on the test users' held-out pairs, each enrolled on their shots."""
    correct, n, users = evaluate_embedder(embedder, test, [4])[4]
    return {"accuracy": correct / n, "ci": list(wilson_interval(correct, n)), "n": n, "users": users}
