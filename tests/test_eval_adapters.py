"""The adapter methods' enrollment evaluation (per-user LoRA and the LoRA bank) on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from personalign.adapters.lora import LoraTrainConfig
from personalign.eval.adapters import eval_bank, eval_lora, kmeans, wilson
from personalign.eval.populations import EvalPopulation, EvalUser
from personalign.models import load_generator
from personalign.types import Comparison

SHORT = [
    Comparison(
        prompt=f"Question {i} about eggs?",
        chosen="Nine minutes.",
        rejected="It depends on many long and winding things.",
    )
    for i in range(8)
]
LONG = [Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen) for c in SHORT]


def _population(n_users: int, offset: int = 0) -> EvalPopulation:
    users = []
    for u in range(n_users):
        pairs = SHORT if u % 2 == 0 else LONG
        users.append(EvalUser(f"u{u + offset}", pairs[:4], pairs[4:6], "short" if u % 2 == 0 else "long"))
    return EvalPopulation("toy", users)


def test_wilson_interval_golden_values():
    """8 of 10, z = 1.959964: p = 0.8, denominator 1 + z^2/10 = 1.38415, centre
    (0.8 + z^2/20) / 1.38415 = 0.71671, half z sqrt(0.016 + z^2/400) / 1.38415 = 0.22653."""
    low, high = wilson(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert (
        wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    )  # exact at the ends (the hand-written form gave -2.8e-17)
    assert wilson(8.0, 10) == wilson(8, 10)  # counts summed as floats
    assert all(math.isnan(v) for v in wilson(0, 0))
    low, high = wilson(7.5, 10)  # ties as half wins: the closed form, between its neighbours
    assert wilson(7, 10)[0] < low < wilson(8, 10)[0] and wilson(7, 10)[1] < high < wilson(8, 10)[1]


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 3), (5, 10), (17, 40), (99, 100)])
def test_wilson_matches_the_closed_form(k, n):
    z = 1.959963984540054  # the 97.5% normal quantile
    p = k / n
    denom = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    assert wilson(k, n) == pytest.approx((max(centre - half, 0.0), min(centre + half, 1.0)), abs=1e-12)
    assert wilson(k + 1e-9, n) == pytest.approx(
        wilson(k, n), abs=1e-8
    )  # the fractional path agrees with scipy


def test_kmeans_separates_two_obvious_groups():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    labels = kmeans(x, 2, seed=0)
    assert labels[0] == labels[1] == labels[4] and labels[2] == labels[3] and labels[0] != labels[2]
    assert np.array_equal(kmeans(x, 2, seed=0), labels)  # seeded


def test_kmeans_finds_three_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(scale=0.3, size=(20, 2)) for c in centres])
    labels = kmeans(x, 3, seed=1)
    assert all(len(set(labels[i * 20 : (i + 1) * 20])) == 1 for i in range(3)) and len(set(labels)) == 3


def test_bank_and_lora_records_on_a_toy_population(tiny_model_dir, encoder):
    generator = load_generator(str(tiny_model_dir), device="cpu")
    config = LoraTrainConfig(
        rank=4,
        alpha=8,
        epochs=4,
        learning_rate=5e-3,
        holdout_fraction=0.0,
        seed=0,
        target_modules=["q_proj", "v_proj"],
    )
    fit, test = _population(4), _population(2, offset=10)
    records, info = eval_bank(generator, encoder, fit, test, [1, 4], config, seed=0, k=2, max_pairs=8)
    assert sorted(info["bases"].values()) == [8, 8]  # the two clusters are the two kinds of user
    assert [r["shots"] for r in records] == [1, 4] and all(r["n"] == 4 for r in records)
    assert records[-1]["accuracy"] == 1.0  # 4 shots pick the right basis for both users
    lora = eval_lora(generator, test, [2], config, seed=0)
    assert lora[0]["method"] == "lora" and lora[0]["n"] == 4 and 0.0 <= lora[0]["accuracy"] <= 1.0
    assert not hasattr(generator.model, "peft_config")  # the generator is left unwrapped
