"""Learned reward heads (ArmoRM-style objectives): fit, calibration, save/load, registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personalign.errors import ValidationError
from personalign.steering.heads import (
    HeadError,
    RewardHead,
    expected_calibration_error,
    fit_head,
    head_features,
)


class FakeEncoder:
    """Deterministic unit vectors; texts containing "good" lean on axis 0."""

    name = "fake"

    def encode(self, texts):
        out = []
        for t in texts:
            rng = np.random.default_rng(abs(hash(t)) % (2**32))
            v = rng.normal(size=8)
            v[0] += 3.0 if "good" in t else -3.0
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32)


def _pairs(n):
    return [(f"question {i}", f"a good answer {i}", f"a poor answer {i}") for i in range(n)]


def test_ece_golden():
    """p = (0.9, 0.9): the doubled set is {0.9 -> 1, 0.9 -> 1, 0.1 -> 0, 0.1 -> 0}: bins 9 and 1,
    each half the mass, |0.9 - 1| and |0.1 - 0|: ECE = 0.1. p = 0.5 everywhere is perfectly calibrated
    (half the outcomes are 1): ECE 0."""
    assert expected_calibration_error(torch.tensor([0.9, 0.9])) == pytest.approx(0.1)
    assert expected_calibration_error(torch.tensor([0.5, 0.5, 0.5])) == pytest.approx(0.0)


def test_fit_learns_the_signal_and_round_trips(tmp_path):
    enc = FakeEncoder()
    head = fit_head(enc, "quality", _pairs(60), l2=1e-3, provenance={"data": "fake"})
    assert head.config.provenance["held_out_accuracy"] == 1.0 and head.config.provenance["data"] == "fake"
    assert head.config.dim == 16
    r = head.reward(enc, ["q", "q"], ["a good one", "a poor one"])
    assert r[0] > r[1]
    loaded = RewardHead.load(head.save(tmp_path / "h"))
    assert torch.equal(loaded.weight, head.weight) and loaded.config == head.config
    feats = head_features(enc, ["q"], ["a good one"])
    assert feats.shape == (1, 16)


def test_bad_inputs_are_typed(tmp_path):
    with pytest.raises(ValidationError, match="pairs"):
        fit_head(FakeEncoder(), "quality", _pairs(3))
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "head_config.json").write_text("{")
    with pytest.raises(HeadError, match="unreadable"):
        RewardHead.load(folder)


def test_registered_head_scores_with_the_prompt(tmp_path, monkeypatch):
    from personalign.steering import heads
    from personalign.steering.objectives import OBJECTIVES, measure, register_head, score

    enc = FakeEncoder()
    folder = fit_head(enc, "quality_test", _pairs(40)).save(tmp_path / "quality_test")
    monkeypatch.setattr(heads, "_encoder", lambda: enc)
    try:
        objective = register_head(folder)
        assert objective.learned
        got = score("question", "a good answer", ["quality_test", "verbosity"])
        assert got["quality_test"] > score("question", "a poor answer", ["quality_test"])["quality_test"]
        assert "quality_test" not in measure("a good answer")  # measure() is the measurable ones only
    finally:
        OBJECTIVES.pop("quality_test", None)


def test_shipped_heads_are_registered_with_their_provenance():
    import json

    from personalign.steering.heads import shipped_heads_dir
    from personalign.steering.objectives import OBJECTIVES

    for name in ("helpfulness", "harmlessness"):
        assert OBJECTIVES[name].learned
        config = json.loads((shipped_heads_dir() / name / "head_config.json").read_text())
        assert "MIT" in config["provenance"]["licence"] and config["provenance"]["held_out_accuracy"] > 0.55
