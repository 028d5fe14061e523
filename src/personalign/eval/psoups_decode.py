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

The parts: :mod:`personalign.eval.psoups_decode_scores` (the pure scoring pieces),
:mod:`personalign.eval.psoups_decode_judges` (the guidance and the judges) and
:mod:`personalign.eval.psoups_decode_report` (tables, pooling over seeds, the figure); every name
stays importable from here.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from personalign.errors import ValidationError
from personalign.eval.generate import personal_margins
from personalign.eval.population_base import EvalPopulation, EvalUser
from personalign.eval.population_sources import PSOUPS_FILES, load_psoups
from personalign.eval.psoups_decode_judges import (
    build_guidance,
    build_judges,
    guidance_accuracy,
    judge_accuracy,
)
from personalign.eval.psoups_decode_report import (
    format_psoups_decode,
    picks_differ,
    plot_psoups_decode,
    pool_psoups_decode,
    write_psoups_decode,
)
from personalign.eval.psoups_decode_scores import (
    OPPOSITE,
    STYLE_SHOWN,
    choose_users,
    judged,
    pick_by_reward,
    style_shift,
    summarise_scores,
    wilson_interval,
)
from personalign.preference.featurizer import DEFAULT_PARTS, FEATURE_PARTS

__all__ = [
    "OPPOSITE",
    "GUIDANCE",
    "STYLE_SHOWN",
    "Progress",
    "PsoupsDecodeConfig",
    "choose_users",
    "judged",
    "pick_by_reward",
    "style_shift",
    "wilson_interval",
    "summarise_scores",
    "build_guidance",
    "build_judges",
    "judge_accuracy",
    "guidance_accuracy",
    "run_psoups_decode",
    "format_psoups_decode",
    "picks_differ",
    "pool_psoups_decode",
    "plot_psoups_decode",
    "write_psoups_decode",
]


GUIDANCE = ("fit", "shipped")


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


# --- the run --------------------------------------------------------------------------------------


def _fit_population(fit: EvalPopulation, limit: int | None, seed: int) -> EvalPopulation:
    if limit is None or limit >= len(fit.users):
        return fit
    keep = sorted(
        int(i) for i in np.random.default_rng(seed).choice(len(fit.users), size=limit, replace=False)
    )
    return EvalPopulation(fit.name, [fit.users[i] for i in keep], fit.meta)


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
    from personalign.steering.row_decoding import derived_seed

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
