"""The enrollment evaluation harness: held-out pairwise accuracy per method and shot count.

For each source and seed the users are split (seeded, by user) into *fit* users, on whom the
population models are trained, and *test* users, who are only ever enrolled: the first ``n``
of a test user's enrolment pool are their ``n`` shots, and the method predicts their held-out
comparisons. The split (seed, test users, comparisons removed from the fit side because they
share a prompt or pair with a test user's held-out items) is recorded in the result.

Methods:
    ``bt``        one population Bradley-Terry reward, no personalisation;
    ``meandiff``  zero training: the user's direction is the mean feature difference of their shots;
    ``pal``       K prototype rewards, the user is a mixture fitted to their shots;
    ``vpl``       a Gaussian posterior over a user latent from a pair-set encoder;
    ``oracle``    a Bradley-Terry reward fitted on the fit users *of the test user's hidden type*
                  (the upper reference "told who the user is"); sources without a type skip it;
    ``lora``      a per-user LoRA on the generator trained with DPO on the shots (implicit reward);
    ``bank``      K basis LoRAs on clusters of fit users; the user fits only K weights.

``--active`` (synthetic populations, whose users can answer any question) adds, for each
method with a posterior (``pal``, ``vpl``), the accuracy curve when each next question is the
candidate with the largest expected information gain, against questions drawn at random.

The parts: :mod:`personalign.eval.enroll_config` (method and source names, :class:`EnrollConfig`),
:mod:`personalign.eval.enroll_scoring` (held-out accuracy and its summary),
:mod:`personalign.eval.enroll_active` (active querying) and :mod:`personalign.eval.enroll_report`
(merging runs, the table, the figure); every name stays importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from personalign.errors import ValidationError
from personalign.eval.enroll_active import (
    active_curve,
    information_gains,
)
from personalign.eval.enroll_config import (
    ACTIVE_METHODS,
    EMBEDDERS,
    EXCLUDE,
    METHODS,
    SOURCES,
    EnrollConfig,
)
from personalign.eval.enroll_report import (
    METHOD_COLORS,
    format_table,
    merge_results,
    plot_enroll,
)
from personalign.eval.enroll_scoring import (
    evaluate_embedder,
    evaluate_oracle,
    held_out_correct,
    record,
    summarise,
)
from personalign.eval.population_base import EvalPopulation
from personalign.eval.populations import load_population
from personalign.eval.synthetic_users import SyntheticConfig, SyntheticPopulation
from personalign.models import Encoder
from personalign.preference.base import PreferenceEmbedder
from personalign.preference.bt import BradleyTerry, BradleyTerryConfig
from personalign.preference.featurizer import Featurizer, FeaturizerConfig
from personalign.preference.pal import PAL, PALConfig

__all__ = [
    "EMBEDDERS",
    "METHODS",
    "SOURCES",
    "ACTIVE_METHODS",
    "EXCLUDE",
    "Progress",
    "METHOD_COLORS",
    "EnrollConfig",
    "held_out_correct",
    "evaluate_embedder",
    "evaluate_oracle",
    "record",
    "summarise",
    "information_gains",
    "active_curve",
    "run_enroll",
    "merge_results",
    "plot_enroll",
    "format_table",
]


Progress = Callable[[str], None]


# --- the run --------------------------------------------------------------------------------------


def _warm_features(featurizer: Featurizer, population: EvalPopulation) -> None:
    """Featurize every comparison of ``population`` in one batched call, so per-user calls hit the caches."""
    items = [c for u in population.users for c in u.comparisons]
    if items:
        featurizer.pair_features(items)


def _make_embedder(method: str, featurizer: Featurizer, item_effects: bool = False) -> PreferenceEmbedder:
    """An unfitted embedder; ``item_effects`` turns on per-item offsets where the method has them (bt, pal)."""
    if item_effects and method == "bt":
        return BradleyTerry(featurizer, BradleyTerryConfig(item_effects=True))
    if item_effects and method == "pal":
        return PAL(featurizer, PALConfig(item_effects=True))
    return EMBEDDERS[method](featurizer)


def _load(source: str, config: EnrollConfig, seed: int) -> tuple[EvalPopulation, SyntheticPopulation | None]:
    if source == "synthetic":
        synth = SyntheticPopulation(SyntheticConfig(n_users=config.synthetic_users, seed=seed))
        return synth.population(), synth
    return load_population(source, config.data_root, seed=seed), None


def run_enroll(
    config: EnrollConfig, encoder: Encoder, generator: Any = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every (source, seed, method, shots) cell; return the JSON-ready result."""
    say = progress or (lambda _msg: None)
    if "hidden" in config.features and generator is None:
        raise ValidationError(
            "features",
            "include 'hidden' but no generator was given",
            "pass the generator whose hidden states are the features",
        )
    featurizer = Featurizer(
        encoder, FeaturizerConfig(parts=config.features), generator if "hidden" in config.features else None
    )
    # Every text of a population is featurized several times (fit, each test user, each method):
    # keep them all cached for the run, then restore the encoder's own limit.
    previous_cache = encoder.cache_size
    encoder.cache_size = max(previous_cache, 500_000)
    try:
        return _run(config, encoder, generator, featurizer, say)
    finally:
        encoder.cache_size = previous_cache


def _run(
    config: EnrollConfig, encoder: Encoder, generator: Any, featurizer: Featurizer, say: Progress
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    splits: dict[str, list[dict[str, Any]]] = {}
    active: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for source in config.data:
        shots = config.shots_for(source)
        for seed in range(config.seeds):
            population, synth = _load(source, config, seed)
            if config.fit_data:
                fit_pop, _ = _load(config.fit_data, config, seed)
                test_ids = {u.user for u in population.users}
                fit = EvalPopulation(
                    fit_pop.name, [u for u in fit_pop.users if u.user not in test_ids], fit_pop.meta
                )
                test = population
                split = {
                    "seed": seed,
                    "fit_data": config.fit_data,
                    "test_users": [u.user for u in test.users],
                }
            else:
                fit, test = population.split(
                    config.test_fraction, seed, exclude=EXCLUDE.get(source, "prompt")
                )
                split = dict(test.meta["split"])
            if not fit.users:
                raise ValidationError(
                    "data",
                    f"{source}: no fit user keeps a comparison once those sharing a prompt with a test user's held-out items are removed",
                    "use more users or more distinct prompts, or fit on another source with --fit-data",
                )
            split.update(fit_users=len(fit.users), test_users_count=len(test.users))
            splits.setdefault(source, []).append(split)
            say(f"{source} seed {seed}: {len(fit.users)} fit users, {len(test.users)} test users")
            _warm_features(featurizer, test)
            for method in config.methods:
                started = time.perf_counter()
                if method in EMBEDDERS:
                    embedder = _make_embedder(method, featurizer, config.item_effects).fit(
                        fit.population(), seed=seed
                    )
                    cells = evaluate_embedder(embedder, test, shots)
                    if config.active and synth is not None and method in ACTIVE_METHODS:
                        active.setdefault(source, {}).setdefault(method, []).append(
                            {
                                "seed": seed,
                                **active_curve(
                                    embedder,
                                    synth,
                                    test,
                                    config.active_steps,
                                    config.active_pool,
                                    config.active_users,
                                    seed,
                                ),
                            }
                        )
                elif method == "oracle":
                    found = evaluate_oracle(featurizer, fit, test, shots, seed)
                    if found is None:
                        if seed == 0:
                            notes.append(f"{source}: no hidden user type, so no oracle")
                        continue
                    cells = found
                else:
                    if seed >= config.adapter_seeds:
                        continue
                    cells = _adapter_cells(method, generator, encoder, fit, test, shots, seed, config, say)
                seconds = time.perf_counter() - started
                for n, (correct, total, users) in cells.items():
                    row = record(source, method, n, seed, correct, total, users, seconds)
                    records.append(row)
                    say(
                        f"  {method:9s} {n} shot(s): {row['accuracy']:.3f} ({correct:g}/{total}, {users} users)"
                    )
    from personalign import __version__

    return {
        "package_version": __version__,
        "encoder": encoder.name,
        "features": {source: list(config.features) for source in config.data},
        "config": {k: v for k, v in config.__dict__.items() if k != "data_root"},
        "splits": splits,
        "records": records,
        "summary": summarise(records),
        "active": active,
        "notes": notes,
    }


def _adapter_cells(
    method: str,
    generator: Any,
    encoder: Encoder,
    fit: EvalPopulation,
    test: EvalPopulation,
    shots: Sequence[int],
    seed: int,
    config: EnrollConfig,
    say: Progress,
) -> dict[int, tuple[float, int, int]]:
    """Per-user LoRA or LoRA bank on the first ``adapter_users`` test users (they are slow)."""
    from personalign.adapters.lora import LoraTrainConfig
    from personalign.eval.adapters import eval_bank, eval_lora

    if generator is None:
        raise ValidationError(
            "generator",
            f"is required for method {method!r}",
            "pass a Generator (the CLI loads the embedded one)",
        )
    users = [u for u in test.users if u.held_out][: config.adapter_users]
    subset = EvalPopulation(test.name, users, test.meta)
    if method == "lora":
        rows = eval_lora(generator, subset, shots, LoraTrainConfig(epochs=4, seed=seed), seed, progress=say)
    else:
        rows, _info = eval_bank(
            generator,
            encoder,
            fit,
            subset,
            shots,
            LoraTrainConfig(epochs=2, seed=seed),
            seed,
            k=config.bank_k,
            max_pairs=config.bank_pairs,
            progress=say,
        )
    out = {}
    for row in rows:
        eligible = sum(1 for u in users if u.shots)
        out[row["shots"]] = (float(row["correct"]), int(row["n"]), eligible)
    return out
