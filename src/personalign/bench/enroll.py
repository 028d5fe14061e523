"""``personalign bench enroll``: inferring a user from 8 comparisons, next to encoding their 16 texts.

For each of ``users`` synthetic users (never seen before, so nothing is cached) the bench
times, side by side and alternating which runs first:

- ``encode``: one uncached encoder call on the 8 comparisons' 16 response texts plus their
  prompts (what feature extraction has to embed), the baseline;
- ``infer``: the embedder's ``infer`` on the 8 comparisons with the encoder cache emptied of
  those texts first (feature extraction plus the embedder's own work);
- ``infer_warm``: ``infer`` again with the features cached (the embedder's own work alone);
- ``enroll``: ``Personalizer.enroll`` of the 8 comparisons into a fresh store (validation,
  inference and the atomic profile write), texts evicted first.

The figures are ratios of medians against ``encode``: how much enrolling costs beyond
embedding the texts it has to embed anyway.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from personalign.eval.populations import SyntheticConfig, SyntheticPopulation


def _texts(comparisons: list[Any]) -> list[str]:
    return list(
        dict.fromkeys(
            [
                *(c.chosen for c in comparisons),
                *(c.rejected for c in comparisons),
                *(c.prompt_text for c in comparisons),
            ]
        )
    )


def run_enroll_bench(pz: Any, users: int = 20, shots: int = 8, seed: int = 0) -> dict[str, Any]:
    """Time encode / infer / infer_warm / enroll for ``users`` fresh synthetic users."""
    embedder = pz.embedder
    encoder = pz.encoder
    synth = SyntheticPopulation(SyntheticConfig(n_users=users, seed=seed + 1000, candidates_per_prompt=24))
    population = synth.population(shots=shots, held_out=1, seed=seed)
    warm = population.users[0].shots
    embedder.infer(warm)  # load everything once
    times: dict[str, list[float]] = {"encode": [], "infer": [], "infer_warm": [], "enroll": []}
    for i, user in enumerate(population.users[1:]):
        comps = user.shots
        texts = _texts(comps)

        def encode(_texts: list[str] = texts) -> None:
            encoder.encode_uncached(_texts)

        def infer(_comps: list[Any] = comps, _texts: list[str] = texts) -> None:
            encoder.evict(_texts)
            embedder.infer(_comps)

        steps = (
            [("encode", encode), ("infer", infer)] if i % 2 == 0 else [("infer", infer), ("encode", encode)]
        )
        for name, fn in steps:
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
        started = time.perf_counter()
        embedder.infer(comps)
        times["infer_warm"].append(time.perf_counter() - started)
        encoder.evict(texts)
        started = time.perf_counter()
        pz.enroll(f"bench-{i}", comps)
        times["enroll"].append(time.perf_counter() - started)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "embedder": embedder.name,
        "features": list(embedder.featurizer.config.parts),
        "users": len(times["encode"]),
        "shots": shots,
        "texts_per_user": float(np.mean([len(_texts(u.shots)) for u in population.users[1:]])),
        "median_ms": {k: 1000 * v for k, v in median.items()},
        "ratio_to_encode": {k: v / median["encode"] for k, v in median.items() if k != "encode"},
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
    }


def format_enroll_report(result: dict[str, Any]) -> str:
    ms, ratio = result["median_ms"], result["ratio_to_encode"]
    lines = [
        f"enroll bench: {result['embedder']} on {result['features']}, {result['users']} fresh users x {result['shots']} comparisons "
        f"({result['texts_per_user']:.1f} distinct texts each), medians",
        f"  encode the texts (baseline)   {ms['encode']:8.1f} ms",
        f"  infer (features + embedder)   {ms['infer']:8.1f} ms   {ratio['infer']:.2f}x encode",
        f"  infer, features cached        {ms['infer_warm']:8.1f} ms   {ratio['infer_warm']:.2f}x encode",
        f"  Personalizer.enroll           {ms['enroll']:8.1f} ms   {ratio['enroll']:.2f}x encode",
    ]
    return "\n".join(lines)


def bench_store() -> Path:
    return Path(tempfile.mkdtemp(prefix="personalign-bench-enroll-")) / "store"
