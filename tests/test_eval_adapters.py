"""The adapter methods' enrollment evaluation (per-user LoRA and the LoRA bank) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from personalign.adapters.lora import LoraTrainConfig
from personalign.eval.adapters import eval_bank, eval_lora, kmeans, wilson
from personalign.eval.populations import EvalPopulation, EvalUser
from personalign.models import load_generator
from personalign.types import Comparison

SHORT = [Comparison(prompt=f"Question {i} about eggs?", chosen="Nine minutes.", rejected="It depends on many long and winding things.") for i in range(8)]
LONG = [Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen) for c in SHORT]


def _population(n_users: int, offset: int = 0) -> EvalPopulation:
    users = []
    for u in range(n_users):
        pairs = SHORT if u % 2 == 0 else LONG
        users.append(EvalUser(f"u{u + offset}", pairs[:4], pairs[4:6], "short" if u % 2 == 0 else "long"))
    return EvalPopulation("toy", users)


def test_wilson_interval_golden_values():
    low, high = wilson(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson(10, 10)[1] == pytest.approx(1.0, abs=1e-12)


def test_kmeans_separates_two_obvious_groups():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    labels = kmeans(x, 2, seed=0)
    assert labels[0] == labels[1] == labels[4] and labels[2] == labels[3] and labels[0] != labels[2]


def test_bank_and_lora_records_on_a_toy_population(tiny_model_dir, encoder):
    generator = load_generator(str(tiny_model_dir), device="cpu")
    config = LoraTrainConfig(rank=4, alpha=8, epochs=4, learning_rate=5e-3, holdout_fraction=0.0, seed=0, target_modules=["q_proj", "v_proj"])
    fit, test = _population(4), _population(2, offset=10)
    records, info = eval_bank(generator, encoder, fit, test, [1, 4], config, seed=0, k=2, max_pairs=8)
    assert sorted(info["bases"].values()) == [8, 8]  # the two clusters are the two kinds of user
    assert [r["shots"] for r in records] == [1, 4] and all(r["n"] == 4 for r in records)
    assert records[-1]["accuracy"] == 1.0  # 4 shots pick the right basis for both users
    lora = eval_lora(generator, test, [2], config, seed=0)
    assert lora[0]["method"] == "lora" and lora[0]["n"] == 4 and 0.0 <= lora[0]["accuracy"] <= 1.0
    assert not hasattr(generator.model, "peft_config")  # the generator is left unwrapped
