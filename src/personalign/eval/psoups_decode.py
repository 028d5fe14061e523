"""Personal decoding on real data: P-SOUPS personas, unseen users, held-out prompts.

Setup (issue 17, item 6):

- P-SOUPS (AlignX packaging, :func:`~personalign.eval.populations.load_psoups`, read in place) has
  one user per item: up to 4 de-duplicated comparisons of one persona (elementary / PhD reader,
  friendly / unfriendly tone) and one held-out comparison. Users are split by a seed into fit
  users and test users (:meth:`EvalPopulation.split` with ``exclude="prompt"``: no fit comparison
  shares a prompt with any test user's held-out comparison, so the prompts answered here are
  unseen in fitting).
- Guidance: a PAL on the default MiniLM features fitted on the fit users' comparisons (``guidance
  ="fit"``), or the shipped PAL (``"shipped"``; synthetic data only). Test users are enrolled on
  their shots. Nothing on the guidance side reads the persona label: the embedder sees only
  ``{user: comparisons}``, the store only the comparisons.
- Judge: per persona (the hidden ``ground_truth_persona``), a Bradley-Terry reward fitted on that
  persona's fit users, on features the guidance does not use (default: the generator's hidden
  states). Its own accuracy on the test users' held-out pairs is reported beside the win rates.
- Answers, for each decoded test user and their held-out prompt: the generic answer (greedy, no
  user); ``user-rerank``: ``rerank`` sampled candidates (the rows ``Personalizer.respond(...,
  rerank=N, seed=seed)`` samples) of which the user's inferred reward picks one, as
  ``Personalizer`` does; ``user-rerank-shuffled``: the same candidates, picked by a test user of the
  opposite persona; ``user-vas`` and its shuffled control when the installed heads fit the
  generator and the guidance. Each is judged against the generic answer by the judge of the user's
  persona (ties half): Wilson intervals, and the personal margin (own minus shuffled) with a
  paired bootstrap clustered by user. References, not methods: the judge's own pick among the
  candidates (the ceiling of reranking) and a random candidate (the mean over candidates).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.enroll import evaluate_embedder, held_out_correct
from personalign.eval.generate import personal_margins
from personalign.eval.populations import PSOUPS_FILES, EvalPopulation, EvalUser, load_psoups
from personalign.preference.base import DEFAULT_PARTS, FEATURE_PARTS
from personalign.preference.style import STYLE_FEATURES, style_features

OPPOSITE = {"elementary": "phd", "phd": "elementary", "friendly": "unfriendly", "unfriendly": "friendly"}
GUIDANCE = ("fit", "shipped")
STYLE_SHOWN = (
    "words",
    "syllables_per_word",
    "long_word_share",
    "exclamations",
    "warm_words",
    "cold_words",
    "second_person",
)
Progress = Callable[[str], None]


@dataclass
class PsoupsDecodeConfig:
    """One run. ``users``: test users decoded, split evenly over the personas of ``files``;
    ``fit_users``: fit on at most this many fit users (seeded sample; ``None``: all)."""

    users: int = 24
    seed: int = 0
    test_fraction: float = 0.2
    files: tuple[str, ...] = PSOUPS_FILES
    data_root: str | None = None
    guidance: str = "fit"
    judge_features: tuple[str, ...] = ("hidden",)
    fit_users: int | None = None
    rerank: int = 4
    rerank_temperature: float = 0.8
    user_vas: float = 3.0
    max_new_tokens: int = 128
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.files, self.judge_features = tuple(self.files), tuple(self.judge_features)
        if self.guidance not in GUIDANCE:
            raise ValidationError(
                "guidance", f"is {self.guidance!r}", f"use one of {list(GUIDANCE)}", self.guidance
            )
        unknown = [f for f in self.files if f not in PSOUPS_FILES]
        if unknown or not self.files:
            raise ValidationError(
                "files", f"has {unknown or 'nothing'}", f"use some of {list(PSOUPS_FILES)}", list(self.files)
            )
        bad = [p for p in self.judge_features if p not in FEATURE_PARTS]
        if bad or not self.judge_features:
            raise ValidationError(
                "judge_features",
                f"has {bad or 'nothing'}",
                f"use some of {list(FEATURE_PARTS)}, e.g. hidden",
                list(self.judge_features),
            )
        shared = sorted(set(self.judge_features) & set(DEFAULT_PARTS))
        if shared:
            raise ValidationError(
                "judge_features",
                f"shares {shared} with the guidance's features {list(DEFAULT_PARTS)}",
                "judge on other features: hidden or style",
                list(self.judge_features),
            )
        if self.users < 2 * len(self.files):
            raise ValidationError(
                "users",
                f"is {self.users}, fewer than one per persona",
                f"use at least {2 * len(self.files)}",
                self.users,
            )
        if not 2 <= self.rerank <= 16:
            raise ValidationError("rerank", "must be in [2, 16]", "use e.g. 4", self.rerank)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValidationError("test_fraction", "must be in (0, 1)", "use e.g. 0.2", self.test_fraction)
        if self.fit_users is not None and self.fit_users < 2:
            raise ValidationError(
                "fit_users", "must be at least 2 (or None: all)", "use e.g. 200", self.fit_users
            )
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValidationError(
                "max_new_tokens",
                "and batch_size must be at least 1",
                "use e.g. 128 and 8",
                (self.max_new_tokens, self.batch_size),
            )


# --- pure pieces ----------------------------------------------------------------------------------


def choose_users(test: Sequence[EvalUser], users: int, seed: int) -> list[tuple[EvalUser, EvalUser]]:
    """``(user, decoy)`` pairs: in a seeded order of ``test``, the first ``users // personas`` test
    users of each persona; each user's decoy is the selected user of the opposite persona with the
    same rank. Swapping every label for its opposite selects the same users and pairs."""
    personas = sorted({str(u.group) for u in test if u.group in OPPOSITE and u.shots and u.held_out})
    if not personas or any(OPPOSITE[p] not in personas for p in personas):
        raise ValidationError(
            "test",
            f"has personas {personas}",
            "use both files' personas in pairs (elementary/phd, friendly/unfriendly)",
        )
    quota = users // len(personas)
    order = np.random.default_rng(seed).permutation(len(test))
    chosen: dict[str, list[EvalUser]] = {p: [] for p in personas}
    for i in order:
        u = test[int(i)]
        if u.group in chosen and u.shots and u.held_out and len(chosen[u.group]) < quota:
            chosen[u.group].append(u)
    quota = min(len(v) for v in chosen.values())  # a persona with fewer test users bounds all
    return [(chosen[p][k], chosen[OPPOSITE[p]][k]) for p in personas for k in range(quota)]


def judged(judge_rewards: np.ndarray) -> float:
    """1 / 0.5 / 0: does the answer (``judge_rewards[0]``) beat the generic answer (``[1]``)?"""
    mine, theirs = float(judge_rewards[0]), float(judge_rewards[1])
    return 1.0 if mine > theirs else 0.5 if mine == theirs else 0.0


def pick_by_reward(scores: Sequence[float], texts: Sequence[str]) -> int:
    """As ``Personalizer`` reranks: the highest score, an empty candidate never picked over a real one."""
    from personalign.steering.rerank import pick

    return pick([s if t.strip() else -np.inf for s, t in zip(scores, texts, strict=True)])


def style_shift(answers: Sequence[str], generics: Sequence[str]) -> dict[str, float]:
    """Mean stylometric difference answer minus generic for a few features (:data:`STYLE_SHOWN`)."""
    index = [STYLE_FEATURES.index(name) for name in STYLE_SHOWN]
    diff = np.stack(
        [style_features(a)[index] - style_features(g)[index] for a, g in zip(answers, generics, strict=True)]
    )  # (n, 7)
    return {name: round(float(v), 4) for name, v in zip(STYLE_SHOWN, diff.mean(axis=0), strict=True)}


def wilson_interval(wins: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of ``wins`` of ``n`` (ties counted half, so ``wins`` may end in .5):
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, ``p = wins / n``; for whole
    ``wins`` it equals :func:`personalign.eval.adapters.wilson`. ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = wins / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (
        float(max((centre - half) / (1 + z * z / n), 0.0)),
        float(min((centre + half) / (1 + z * z / n), 1.0)),
    )


def summarise_scores(
    scores: Sequence[float], users: Sequence[str], personas: Sequence[str]
) -> dict[str, Any]:
    """Win rate, Wilson interval, per persona and per user, from one score per judged answer."""
    wins = float(sum(scores))
    per_user: dict[str, list[float]] = {}
    per_persona: dict[str, list[float]] = {}
    for s, u, p in zip(scores, users, personas, strict=True):
        per_user.setdefault(u, []).append(s)
        per_persona.setdefault(p, []).append(s)
    return {
        "win_rate": wins / len(scores),
        "ci": list(wilson_interval(wins, len(scores))),
        "n": len(scores),
        "per_persona": {p: float(np.mean(v)) for p, v in sorted(per_persona.items())},
        "per_user": {u: float(np.mean(v)) for u, v in per_user.items()},
        "scores": list(scores),
    }


# --- the run --------------------------------------------------------------------------------------


def _fit_population(fit: EvalPopulation, limit: int | None, seed: int) -> EvalPopulation:
    if limit is None or limit >= len(fit.users):
        return fit
    keep = sorted(
        int(i) for i in np.random.default_rng(seed).choice(len(fit.users), size=limit, replace=False)
    )
    return EvalPopulation(fit.name, [fit.users[i] for i in keep], fit.meta)


def build_guidance(generator: Any, encoder: Any, fit: EvalPopulation, config: PsoupsDecodeConfig) -> Any:
    """The embedder that guides: PAL fitted on the fit users' comparisons only (``{user: comparisons}``,
    no persona), or the shipped PAL."""
    from personalign.preference import default_embedder_dir, load_embedder
    from personalign.preference.base import Featurizer, FeaturizerConfig
    from personalign.preference.pal import PAL

    if config.guidance == "shipped":
        return load_embedder(default_embedder_dir(), encoder, generator)
    comparisons = {u.user: list(u.comparisons) for u in fit.users if u.comparisons}
    return PAL(Featurizer(encoder, FeaturizerConfig(parts=DEFAULT_PARTS))).fit(comparisons, seed=config.seed)


def build_judges(
    generator: Any, encoder: Any, fit: EvalPopulation, config: PsoupsDecodeConfig
) -> dict[str, Any]:
    """One Bradley-Terry reward per persona, fitted on that persona's fit users (one shared featurizer)."""
    from personalign.preference.base import Featurizer, FeaturizerConfig
    from personalign.preference.bt import BradleyTerry

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


def _generate(
    pz: Any, requests: list[dict[str, Any]], batch_size: int, progress: Progress, label: str
) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(requests), batch_size):
        texts += pz.chat_batch(requests[start : start + batch_size])
        progress(f"{label}: {len(texts)}/{len(requests)}")
    return texts


def run_psoups_decode(
    generator: Any, encoder: Any, config: PsoupsDecodeConfig, progress: Progress | None = None
) -> dict[str, Any]:
    """Win rates over the generic answer of P-SOUPS test users' reranked (and user-vas) answers."""
    say = progress or (lambda _msg: None)
    clock = {"start": time.perf_counter()}
    population = load_psoups(config.data_root, config.files)
    fit, test = population.split(config.test_fraction, config.seed, exclude="prompt")
    fit = _fit_population(fit, config.fit_users, config.seed)
    pairs = choose_users(test.users, config.users, config.seed)
    say(f"{len(fit.users)} fit users, {len(test.users)} test users, {len(pairs)} decoded")
    guidance = build_guidance(generator, encoder, fit, config)
    judges = build_judges(generator, encoder, fit, config)
    result: dict[str, Any] = {
        "config": {
            **asdict(config),
            "files": list(config.files),
            "judge_features": list(config.judge_features),
            "data_root": None,
        },
        "split": {
            "seed": config.seed,
            "fit_users": len(fit.users),
            "test_users": len(test.users),
            "decoded_users": len(pairs),
            "fit_comparisons_removed": test.meta["split"]["fit_comparisons_removed"],
            "dropped": population.meta["dropped"],
        },
        "guidance": {
            "embedder": f"pal ({config.guidance})",
            "features": list(guidance.featurizer.config.parts),
            **guidance_accuracy(guidance, test),
        },
        "judge": {
            "model": "bradley-terry per persona, fitted on the fit users",
            "features": list(config.judge_features),
            **judge_accuracy(judges, test),
        },
    }
    if config.guidance == "fit":  # the alternative, for the record: the shipped PAL on the same users
        from personalign.preference import default_embedder_dir, load_embedder

        result["guidance"]["shipped_accuracy"] = guidance_accuracy(
            load_embedder(default_embedder_dir(), encoder, generator), test
        )["accuracy"]
    say(
        f"guidance held-out acc {result['guidance']['accuracy']:.3f}, judge held-out acc {result['judge']['accuracy']:.3f}"
    )
    with tempfile.TemporaryDirectory(prefix="personalign-psoups-") as store:
        result.update(_decode(generator, encoder, guidance, judges, pairs, config, store, say))
    result["seconds"]["total"] = time.perf_counter() - clock["start"]
    return result


def _decode(
    generator: Any,
    encoder: Any,
    guidance: Any,
    judges: dict[str, Any],
    pairs: list[tuple[EvalUser, EvalUser]],
    config: PsoupsDecodeConfig,
    store: str,
    say: Progress,
) -> dict[str, Any]:
    """Every answer (:func:`_answers`) in a scratch store, then every judgement (:func:`_judge`)."""
    from personalign.personalizer import Personalizer

    prompts = [u.held_out[0].prompt_text for u, _ in pairs]
    with Personalizer(generator, encoder, store=store, embedder=guidance) as pz:
        for u, _ in pairs:
            pz.enroll(u.user, u.shots)
        out = _answers(pz, pairs, prompts, config, say)
    picked = out.pop("picked")
    out.update(_judge(judges, pairs, prompts, out["generic"], out["candidates"], out.pop("answers"), config))
    for method, picks in picked.items():
        out["methods"][method]["picked"] = picks  # which candidate each user's reward (own, decoy's) chose
    out["users"] = [
        {"user": u.user, "persona": u.group, "decoy": d.user, "shots": len(u.shots), "prompt": p}
        for (u, d), p in zip(pairs, prompts, strict=True)
    ]
    return out


def _answers(
    pz: Any,
    pairs: list[tuple[EvalUser, EvalUser]],
    prompts: list[str],
    config: PsoupsDecodeConfig,
    say: Progress,
) -> dict[str, Any]:
    """The generic answers, the shared candidates, each method's answer per (user, prompt)."""
    from personalign.steering.decoding import derived_seed

    unique = list(dict.fromkeys(prompts))
    ask = {p: [{"role": "user", "content": p}] for p in unique}
    off = {"memory": False, "shots": False, "steer": {}, "max_new_tokens": config.max_new_tokens}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    generic = dict(
        zip(
            unique,
            _generate(
                pz,
                [{"user": None, "messages": ask[p], "temperature": 0.0, **off} for p in unique],
                config.batch_size,
                say,
                "generic",
            ),
            strict=True,
        )
    )
    seconds["generic"] = time.perf_counter() - started
    started = time.perf_counter()
    # the rows Personalizer.respond(..., rerank=N, seed=seed) samples: sampled once, picked from by own and decoy
    rows = [
        {
            "user": None,
            "messages": ask[p],
            "temperature": config.rerank_temperature,
            "seed": derived_seed(config.seed, j),
            **off,
        }
        for p in unique
        for j in range(config.rerank)
    ]
    flat = _generate(pz, rows, config.batch_size, say, "candidates")
    candidates = {p: flat[i * config.rerank : (i + 1) * config.rerank] for i, p in enumerate(unique)}
    seconds["candidates"] = time.perf_counter() - started
    answers: dict[str, list[str]] = {"user-rerank": [], "user-rerank-shuffled": []}
    picks: dict[str, list[int]] = {"user-rerank": [], "user-rerank-shuffled": []}
    for (u, decoy), p in zip(pairs, prompts, strict=True):
        for method, who in (("user-rerank", u), ("user-rerank-shuffled", decoy)):
            best = pick_by_reward(pz.reward(who.user, p, [t or " " for t in candidates[p]]), candidates[p])
            picks[method].append(best)
            answers[method].append(candidates[p][best])
    skipped = {}
    if pz.user_heads() is None:
        skipped["user-vas"] = (
            f"no user-vas heads fit this generator ({pz.generator.model_id}) and the {config.guidance} PAL (the shipped heads are for the shipped PAL and the embedded SmolLM2)"
        )
    else:
        for method, shuffled in (("user-vas", False), ("user-vas-shuffled", True)):
            started = time.perf_counter()
            requests = [
                {
                    "user": (d if shuffled else u).user,
                    "messages": ask[p],
                    "temperature": 0.0,
                    "user_vas": config.user_vas,
                    **off,
                }
                for (u, d), p in zip(pairs, prompts, strict=True)
            ]
            answers[method] = _generate(pz, requests, config.batch_size, say, method)
            seconds[method] = time.perf_counter() - started
    return {
        "generic": generic,
        "candidates": candidates,
        "answers": answers,
        "picked": picks,
        "skipped": skipped,
        "seconds": seconds,
    }


def _judge(
    judges: dict[str, Any],
    pairs: list[tuple[EvalUser, EvalUser]],
    prompts: list[str],
    generic: dict[str, str],
    candidates: dict[str, list[str]],
    answers: dict[str, list[str]],
    config: PsoupsDecodeConfig,
) -> dict[str, Any]:
    """Each answer against the generic one by the judge of the user's persona; the references; the margins."""
    users, personas = [u.user for u, _ in pairs], [str(u.group) for u, _ in pairs]

    def rewards(persona: str, prompt: str, texts: Sequence[str]) -> np.ndarray:
        judge = judges[persona]
        return judge.reward([prompt] * len(texts), list(texts), judge.prior())  # (len(texts),)

    methods, shift = {}, {}
    for method, texts in answers.items():
        scores = [
            judged(rewards(q, p, [t, generic[p]])) for q, p, t in zip(personas, prompts, texts, strict=True)
        ]
        methods[method] = summarise_scores(scores, users, personas)
        methods[method]["example"] = {
            "user": users[0],
            "persona": personas[0],
            "prompt": prompts[0],
            "answer": texts[0],
            "generic": generic[prompts[0]],
        }
        shift[method] = {
            q: style_shift(
                [t for t, x in zip(texts, personas, strict=True) if x == q],
                [generic[p] for p, x in zip(prompts, personas, strict=True) if x == q],
            )
            for q in sorted(set(personas))
        }
    judge_pick, random_pick = [], []
    for q, p in zip(personas, prompts, strict=True):
        r = rewards(q, p, [*candidates[p], generic[p]])  # (N + 1,): the candidates, then the generic answer
        judge_pick.append(judged(np.array([r[:-1].max(), r[-1]])))
        random_pick.append(float(np.mean([judged(np.array([x, r[-1]])) for x in r[:-1]])))
    references = {
        "judge-pick": summarise_scores(judge_pick, users, personas),
        "random-candidate": {**summarise_scores(random_pick, users, personas), "ci": [None, None]},
    }  # a mean, not a count
    return {
        "methods": methods,
        "references": references,
        "margins": personal_margins(methods, users),
        "style_shift": shift,
    }


# --- report ---------------------------------------------------------------------------------------


def format_psoups_decode(result: dict[str, Any]) -> str:
    """The markdown table: each method's win rate over the generic answer, its control and margin."""
    judge, guide = result["judge"], result["guidance"]
    lines = [
        f"judge: {judge['model']} on {'+'.join(judge['features'])}; held-out accuracy {judge['accuracy']:.3f} [{judge['ci'][0]:.2f}, {judge['ci'][1]:.2f}] (n = {judge['n']} test users' held-out pairs)",
        f"guidance: {guide['embedder']} on {'+'.join(guide['features'])}; held-out accuracy {guide['accuracy']:.3f} (n = {guide['n']})"
        + (f", the shipped PAL {guide['shipped_accuracy']:.3f}" if "shipped_accuracy" in guide else ""),
        "",
        "| method | win rate over generic | 95% CI | n | "
        + " | ".join(sorted(next(iter(result["methods"].values()))["per_persona"]))
        + " | margin own - shuffled [95% CI] |",
    ]
    personas = sorted(next(iter(result["methods"].values()))["per_persona"])
    lines.append("|---" * (5 + len(personas)) + "|")
    rows = {**result["methods"], **{f"({name})": r for name, r in result["references"].items()}}
    for name, r in rows.items():
        m = result["margins"].get(name)
        margin = f"{m['margin']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]" if m else ""
        ci = "" if _no_interval(r) else f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
        cells = " | ".join(f"{r['per_persona'].get(p, float('nan')):.2f}" for p in personas)
        lines.append(f"| {name} | {r['win_rate']:.3f} | {ci} | {r['n']} | {cells} | {margin} |")
    for method, control in (("user-rerank", "user-rerank-shuffled"), ("user-vas", "user-vas-shuffled")):
        if method in result["methods"] and "picked" in result["methods"][method]:
            differ = picks_differ(result, method, control)
            lines.append(
                f"{method}: own and opposite-persona picks differ for "
                + ", ".join(f"{p} {d}/{n}" for p, (d, n) in differ.items())
            )
    for method, why in result.get("skipped", {}).items():
        lines.append(f"({method} not run: {why})")
    return "\n".join(lines)


def picks_differ(result: dict[str, Any], method: str, control: str) -> dict[str, tuple[int, int]]:
    """Per persona: for how many users the own pick and the control's pick differ (of how many)."""
    out: dict[str, list[int]] = {}
    for u, a, b in zip(
        result["users"],
        result["methods"][method]["picked"],
        result["methods"][control]["picked"],
        strict=True,
    ):
        out.setdefault(str(u["persona"]), []).append(int(a != b))
    return {p: (sum(v), len(v)) for p, v in sorted(out.items())}


def _no_interval(row: dict[str, Any]) -> bool:
    low = row["ci"][0]
    return low is None or (isinstance(low, float) and np.isnan(low))


def pool_psoups_decode(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs on different seeds with the same settings: every judged answer pooled,
    margins by a paired bootstrap clustered by user over all runs, the judge's and the guidance's
    held-out accuracies pooled over the runs' test users."""
    if not results:
        raise ValidationError("results", "is empty", "pass eval psoups-decode results of several seeds")
    keys = (
        "users",
        "files",
        "guidance",
        "judge_features",
        "fit_users",
        "rerank",
        "max_new_tokens",
        "test_fraction",
    )
    first = results[0]["config"]
    for index, r in enumerate(results):
        if any(r["config"][k] != first[k] for k in keys):
            raise ValidationError(
                f"results[{index}]",
                "was run with other settings",
                f"pool runs that differ only in seed (same {', '.join(keys)})",
            )
    users = [u["user"] for r in results for u in r["users"]]
    personas = [str(u["persona"]) for r in results for u in r["users"]]

    def pooled(section: str, name: str) -> dict[str, Any]:
        row = summarise_scores([s for r in results for s in r[section][name]["scores"]], users, personas)
        return {**row, "ci": [None, None]} if any(_no_interval(r[section][name]) for r in results) else row

    names = [m for m in results[0]["methods"] if all(m in r["methods"] for r in results)]
    methods = {m: pooled("methods", m) for m in names}
    for m in names:
        if all("picked" in r["methods"][m] for r in results):
            methods[m]["picked"] = [i for r in results for i in r["methods"][m]["picked"]]

    def accuracy(part: str) -> dict[str, Any]:
        correct, n = (
            sum(r[part]["accuracy"] * r[part]["n"] for r in results),
            sum(r[part]["n"] for r in results),
        )
        return {
            **results[0][part],
            "accuracy": correct / n,
            "ci": list(wilson_interval(round(correct), n)),
            "n": n,
            "per_seed": [r[part]["accuracy"] for r in results],
        }

    guidance = accuracy("guidance")
    if all("shipped_accuracy" in r["guidance"] for r in results):
        guidance["shipped_accuracy"] = (
            sum(r["guidance"]["shipped_accuracy"] * r["guidance"]["n"] for r in results) / guidance["n"]
        )
    return {
        "seeds": [r["config"]["seed"] for r in results],
        "config": {k: first[k] for k in keys},
        "split": {"decoded_users": len(users), "per_seed": [r["split"] for r in results]},
        "guidance": guidance,
        "judge": accuracy("judge"),
        "users": [u for r in results for u in r["users"]],
        "methods": methods,
        "references": {name: pooled("references", name) for name in results[0]["references"]},
        "margins": personal_margins(methods, users),
        "skipped": results[0].get("skipped", {}),
    }


def plot_psoups_decode(result: dict[str, Any], path: str | Path) -> Path:
    """Bars: each method's win rate over the generic answer with its Wilson interval (the controls
    grey), then the references (the judge's own pick of the candidates, a random candidate)."""
    from personalign.eval.stats import new_figure, save_figure

    rows = {**result["methods"], **{f"({name})": r for name, r in result["references"].items()}}
    names = list(rows)
    rates = np.array([rows[n]["win_rate"] for n in names])
    fig, ax = new_figure(figsize=(7, 3.8))
    colors = [
        "#8c8c8c" if n.endswith("-shuffled") else "#4c72b0" if n in result["methods"] else "#dd8452"
        for n in names
    ]
    ax.bar(names, rates, color=colors)
    for x, n in enumerate(names):
        if not _no_interval(rows[n]):
            low, high = rows[n]["ci"]
            ax.errorbar(
                x,
                rows[n]["win_rate"],
                yerr=[[rows[n]["win_rate"] - low], [high - rows[n]["win_rate"]]],
                color="black",
                capsize=4,
            )
    ax.axhline(0.5, color="grey", linestyle=":", label="no better than generic")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate over the generic answer")
    judge = result["judge"]
    seeds = f"seeds {result['seeds']}, " if "seeds" in result else ""
    ax.set_title(
        f"P-SOUPS test users ({seeds}{result['split']['decoded_users']}), held-out prompts; judge acc {judge['accuracy']:.2f} ({'+'.join(judge['features'])})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.tick_params(axis="x", labelrotation=20)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return save_figure(fig, path, dpi=120)


def write_psoups_decode(
    result: dict[str, Any], json_path: str | Path | None, plot_path: str | Path | None
) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if plot_path:
        plot_psoups_decode(result, plot_path)
