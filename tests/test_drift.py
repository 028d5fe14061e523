"""A user state that follows drift: recency weights, the surprise test, the change detector, and
the ``eval drift`` harness on a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from personalign.errors import ValidationError
from personalign.preference.base import UserState
from personalign.preference.drift import (
    STATIC,
    DriftConfig,
    agreement,
    change_point,
    infer_state,
    recency_weights,
    surprise_z,
    weighted,
)
from personalign.types import Comparison

LONG, SHORT = "A long and detailed answer.", "Short."


class ToyEmbedder:
    """One feature (+1 for the long answer, -1 for the short one); the state is 4 times the
    weighted mean of the user's choices on it, so reward(long) - reward(short) = 8 * mean."""

    name = "toy"

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def prior(self) -> UserState:
        return UserState(self.name, np.zeros(1))

    def infer(self, comparisons):
        weights = np.array([c.weight for c in comparisons])
        self.calls.append(weights.tolist())
        signs = np.array([1.0 if c.chosen == LONG else -1.0 for c in comparisons])
        return UserState(
            self.name,
            np.array([4.0 * (weights * signs).sum() / weights.sum()]),
            n_comparisons=len(comparisons),
        )

    def reward(self, prompts, responses, state):
        return np.array([state.vector[0] * (1.0 if r == LONG else -1.0) for r in responses])


def _history(longs: int, shorts: int) -> list[Comparison]:
    long_first = [Comparison(prompt=f"q{i}?", chosen=LONG, rejected=SHORT) for i in range(longs)]
    return long_first + [Comparison(prompt=f"r{i}?", chosen=SHORT, rejected=LONG) for i in range(shorts)]


def test_recency_weights_golden():
    """0.5 ** (age / half_life), oldest first: n=3, half_life=1 -> 1/4, 1/2, 1; half_life=2 -> 1/2, 1/sqrt(2), 1."""
    np.testing.assert_allclose(recency_weights(3, 1.0), [0.25, 0.5, 1.0])
    np.testing.assert_allclose(recency_weights(3, 2.0), [0.5, 2**-0.5, 1.0])
    np.testing.assert_allclose(recency_weights(4, None), [1.0, 1.0, 1.0, 1.0])
    scaled = weighted([Comparison(prompt="p", chosen="a", rejected="b", weight=2.0)] * 2, 1.0)
    assert [c.weight for c in scaled] == [1.0, 2.0]


def test_surprise_z_golden():
    """One choice the state gave p = 0.1: log-likelihood ln 0.1 = -2.302585; its mean under the state
    0.1 ln 0.1 + 0.9 ln 0.9 = -0.325083; variance 0.1 * 0.9 * ln(1/9)^2 = 0.434502; z = -1.977502 / 0.659168 = -3.0000."""
    assert surprise_z(np.array([0.1])) == pytest.approx(-3.0, abs=1e-4)
    assert surprise_z(np.array([0.9])) == pytest.approx((math.log(0.9) + 0.325083) / 0.659168, abs=1e-4)
    assert surprise_z(np.array([0.5, 0.5])) == 0.0  # no information, no surprise
    assert surprise_z(np.array([0.9, 0.9, 0.9])) > 0  # expected choices are not surprising


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"half_life": 0}, "drift.half_life"),
        ({"half_life": -1.0}, "drift.half_life"),
        ({"half_life": math.inf}, "drift.half_life"),
        ({"threshold": 0.0}, "drift.threshold"),
        ({"min_recent": 0}, "drift.min_recent"),
        ({"min_recent": 4, "max_recent": 2}, "drift.max_recent"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        DriftConfig(**kwargs)
    assert info.value.field == field


def test_static_is_exactly_plain_inference():
    toy, history = ToyEmbedder(), _history(10, 3)
    assert infer_state(toy, history, STATIC).vector.tolist() == toy.infer(history).vector.tolist()
    assert "drift" not in infer_state(toy, history, STATIC).extra


def test_detector_finds_the_switch_and_leaves_a_steady_user_alone():
    toy = ToyEmbedder()
    config = DriftConfig(detect=True, threshold=3.0, on_change_half_life=None)
    steady = infer_state(toy, _history(14, 0), config)
    assert steady.extra["drift"]["change_at"] is None and steady.vector[0] == pytest.approx(4.0)
    t, z = change_point(toy, _history(12, 4), config)
    assert t == 12 and z < -3.0
    switched = infer_state(toy, _history(12, 4), config)
    assert switched.extra["drift"]["change_at"] == 12 and switched.vector[0] == pytest.approx(
        -4.0
    )  # only the recent choices
    static = infer_state(toy, _history(12, 4), STATIC)
    assert static.vector[0] > 0  # the static state still prefers the old answers
    decayed = infer_state(toy, _history(12, 4), DriftConfig(detect=True, on_change_half_life=2.0))
    assert toy.calls[-1] == pytest.approx(recency_weights(16, 2.0).tolist()) and decayed.vector[0] < 0


def test_agreement_is_positive_only_when_the_recent_choices_predict_each_other_better():
    toy = ToyEmbedder()
    before = toy.infer(_history(12, 0))
    shorts = _history(0, 3)
    assert (
        agreement(toy, shorts, before) > 5.0
    )  # each recent choice is predicted by the others, not by the past
    longs = [Comparison(prompt=f"s{i}?", chosen=LONG, rejected=SHORT) for i in range(3)]
    assert agreement(toy, longs, before) == pytest.approx(0.0, abs=1e-3)  # nothing the past did not predict


def test_recency_weights_reach_the_embedder():
    toy = ToyEmbedder()
    state = infer_state(toy, _history(2, 1), DriftConfig(half_life=1.0, detect=False))
    assert toy.calls[-1] == [0.25, 0.5, 1.0]
    assert state.vector[0] == pytest.approx(4.0 * (0.25 + 0.5 - 1.0) / 1.75)


def test_personalizer_state_follows_the_drift_settings(tiny_generator, encoder, tmp_path):
    from personalign.personalizer import Personalizer

    toy = ToyEmbedder()
    with Personalizer(tiny_generator, encoder, store=tmp_path / "s", embedder=toy) as pz:
        pz.enroll("ana", [c.model_dump() for c in _history(12, 0)])
        pz.enroll("ana", [c.model_dump() for c in _history(0, 4)])
        assert pz.state("ana").vector[0] > 0  # the default: every comparison counts the same
        pz.preferences.drift = DriftConfig(detect=True, on_change_half_life=None)
        assert pz.state("ana").vector[0] == pytest.approx(-4.0)  # the stored static state is not reused
        assert pz.refresh_state("ana").extra["drift"]["change_at"] == 12
        stored = pz.profile("ana").settings["state"]
        assert stored["extra"]["drift"]["change_at"] == 12 and pz.export("ana")["state"] == stored


def test_run_drift_writes_json_and_png(encoder, tmp_path):
    from personalign.eval.drift import MEMORY_MODES, DriftEvalConfig, run_drift

    config = DriftEvalConfig(
        ks=[1, 2], pre=4, held_out=4, synthetic_users=20, memory_people=1, memory_distractors=2
    )
    result = run_drift(config, encoder, out=tmp_path)
    saved = json.loads((tmp_path / "drift.json").read_text())
    assert saved["preference"] == result["preference"] and (tmp_path / "drift.png").stat().st_size > 1000
    for scenario in ("switch", "stay"):
        cell = result["preference"][scenario]["2"]
        assert {"static", "recency", "detector", "fresh", "detector_fired"} <= set(cell) and 0.0 <= cell[
            "static"
        ] <= 1.0
    assert "recency_minus_static_ci95" in result["preference"]["stay"]["1"]
    assert set(result["memory"]) == set(MEMORY_MODES)
    assert (
        result["memory"]["keys"]["superseded_outranks_current"] == 0.0
    )  # superseded facts are never searched
    with pytest.raises(ValidationError):
        DriftEvalConfig(ks=[0])


def test_eval_drift_command_rejects_bad_options(tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    out = CliRunner().invoke(app, ["eval", "drift", "--ks", "1,x", "--out", str(tmp_path / "o")])
    assert out.exit_code == 2 and "--ks" in out.output and not (tmp_path / "o").exists()
