"""Enrollment accuracy of generator-side methods: a per-user LoRA and the LoRA bank.

Both predict a held-out comparison by the sign of an implicit reward (DPO's
``beta * (log pi(y|x) - log pi_ref(y|x))``, reference = the generator without adapters):

- ``lora``: a LoRA trained with DPO on the user's first ``n`` shots only;
- ``bank``: K basis LoRAs trained once on clusters of the *fit* users (never the test users),
  then only the user's K weights are fitted to the same ``n`` shots (linear implicit-reward
  model, see :mod:`personalign.adapters.bank`); predictions use the combined adapter's own
  margins.

Clusters come from the fit users' mean-difference directions on the frozen encoder's features
(k-means, seeded), so no hidden user type is used. Records have the same fields as the
embedders' harness (``method``, ``shots``, ``seed``, ``correct``, ``n``, ``accuracy``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personalign.adapters.bank import LoraBank
from personalign.adapters.lora import LoraTrainConfig, batch_logps, collate, train_adapter
from personalign.eval.populations import EvalPopulation
from personalign.models import Encoder, Generator
from personalign.types import Comparison

ADAPTER_METHODS = ("lora", "bank")


def wilson(correct: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` successes in ``n`` trials (95% by default).

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = correct / n`` and
    ``z`` the normal quantile, within [0, 1]. A whole number of successes goes to
    ``scipy.stats.binomtest(correct, n).proportion_ci(method="wilson")``; a fractional count
    (ties scored as half a win), which scipy does not take, to the same closed form.
    ``(nan, nan)`` when ``n`` is 0.
    """
    from scipy.stats import binomtest, norm

    if n == 0:
        return (math.nan, math.nan)
    if float(correct).is_integer():
        ci = binomtest(int(correct), n).proportion_ci(confidence_level=confidence, method="wilson")
        return (float(ci.low), float(ci.high))
    z = float(norm.ppf(0.5 + confidence / 2))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(centre - half, 0.0), min(centre + half, 1.0))


def user_directions(encoder: Encoder, population: EvalPopulation) -> np.ndarray:
    """``(users, d)``: each user's mean feature difference (chosen - rejected), unit length."""
    rows = []
    for user in population.users:
        comps = user.comparisons
        chosen = encoder.encode([f"{c.prompt_text}\n{c.chosen}" for c in comps])
        rejected = encoder.encode([f"{c.prompt_text}\n{c.rejected}" for c in comps])
        direction = np.asarray(chosen - rejected, dtype=np.float64).mean(axis=0)
        rows.append(direction / max(np.linalg.norm(direction), 1e-12))
    return np.stack(rows)


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 10) -> np.ndarray:
    """``(rows,)`` cluster labels of the rows of ``x`` (``sklearn.cluster.KMeans``: k-means++
    starts, the best of ``n_init`` seeded runs; cosine-friendly for unit rows)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(np.asarray(x, dtype=np.float64))


def basis_groups(
    encoder: Encoder, fit: EvalPopulation, k: int, max_pairs: int, seed: int
) -> dict[str, list[Comparison]]:
    """``k`` groups of fit users' comparisons (at most ``max_pairs`` each, seeded sample)."""
    labels = kmeans(user_directions(encoder, fit), k, seed)
    rng = np.random.default_rng(seed)
    groups = {}
    for j in range(k):
        pairs = [
            c for user, label in zip(fit.users, labels, strict=True) if label == j for c in user.comparisons
        ]
        if not pairs:
            continue
        pick = rng.permutation(len(pairs))[:max_pairs]
        groups[f"cluster-{j}"] = [pairs[i] for i in sorted(pick)]
    return groups


def _margins(
    generator: Generator, comparisons: Sequence[Comparison], beta: float, max_length: int
) -> np.ndarray:
    """Implicit-reward margins of the PEFT model's active adapter against the same model with adapters off."""
    model = generator.model
    batch = collate(generator.tokenizer, comparisons, max_length)
    with torch.no_grad():
        pc, pr = batch_logps(model, batch)
        with model.disable_adapter():
            rc, rr = batch_logps(model, batch)
    return (beta * ((pc - rc) - (pr - rr))).double().cpu().numpy()


def eval_lora(
    generator: Generator,
    test: EvalPopulation,
    shots: Sequence[int],
    config: LoraTrainConfig,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train a fresh LoRA per test user and shot count; score the user's held-out comparisons."""
    from peft import LoraConfig, get_peft_model

    records = []
    base = generator.model
    for n in shots:
        correct = total = 0
        started = time.perf_counter()
        for user in test.users:
            if not user.shots or not user.held_out:  # a shorter pool: enrolled from all of it
                continue
            torch.manual_seed(seed)
            lora = LoraConfig(
                r=config.rank,
                lora_alpha=config.alpha,
                lora_dropout=config.dropout,
                target_modules=list(config.target_modules),
            )
            peft = get_peft_model(base, lora, adapter_name="user_lora")
            generator.model = peft
            try:
                train_adapter(
                    peft,
                    "user_lora",
                    generator.tokenizer,
                    user.shots[:n],
                    config.model_copy(update={"seed": seed}),
                )
                margins = _margins(generator, user.held_out, config.beta, config.max_length)
            finally:
                base = peft.unload()
                generator.model = base
            correct += int((margins > 0).sum())
            total += len(margins)
        records.append(_record("lora", n, seed, correct, total, time.perf_counter() - started))
        if progress:
            progress(f"lora shots={n} seed={seed}: {correct}/{total}")
    return records


def eval_bank(
    generator: Generator,
    encoder: Encoder,
    fit: EvalPopulation,
    test: EvalPopulation,
    shots: Sequence[int],
    config: LoraTrainConfig,
    seed: int,
    k: int = 4,
    max_pairs: int = 48,
    bank_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train K bases on clusters of fit users, then fit K weights per test user and shot count."""
    started = time.perf_counter()
    groups = basis_groups(encoder, fit, k, max_pairs, seed)
    out = bank_dir or Path(tempfile.mkdtemp(prefix="personalign-bank-")) / "bank"
    bank = LoraBank.train(generator, groups, out, config.model_copy(update={"seed": seed}), beta=config.beta)
    train_s = time.perf_counter() - started
    if progress:
        progress(
            f"bank: {len(groups)} bases trained in {train_s:.0f} s ({ {g: len(c) for g, c in groups.items()} })"
        )
    records = []
    cache: dict[str, np.ndarray] = {}
    for n in shots:
        correct = total = 0
        t0 = time.perf_counter()
        for user in test.users:
            if not user.shots or not user.held_out:  # a shorter pool: enrolled from all of it
                continue
            if user.user not in cache:  # basis margins of every shot and held-out pair, once per user
                cache[user.user] = bank.basis_margins(
                    [*user.shots, *user.held_out], max_length=config.max_length
                )
            m = cache[user.user]
            w = bank.fit_margins(m[:n])
            margins = bank.margins_under(user.held_out, w, max_length=config.max_length)
            correct += int((margins > 0).sum())
            total += len(margins)
        records.append(_record("bank", n, seed, correct, total, time.perf_counter() - t0))
        if progress:
            progress(f"bank shots={n} seed={seed}: {correct}/{total}")
    info = {
        "bases": {g: len(c) for g, c in groups.items()},
        "train_seconds": train_s,
        "k": k,
        "max_pairs": max_pairs,
    }
    return records, info


def _record(method: str, shots: int, seed: int, correct: int, n: int, seconds: float) -> dict[str, Any]:
    low, high = wilson(correct, n)
    return {
        "method": method,
        "shots": shots,
        "seed": seed,
        "correct": correct,
        "n": n,
        "accuracy": correct / n if n else math.nan,
        "ci95": [low, high],
        "seconds": seconds,
    }
