"""The contract every registered preference embedder keeps (parametrised from ``EMBEDDER_CLASSES``,
so a new embedder inherits these tests from its registry line): it beats chance on unseen users,
follows the protocol, saves and loads bit-equal, and refuses empty input with a typed error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import personalign
from personalign.errors import ValidationError
from personalign.preference import EMBEDDER_CLASSES
from personalign.preference.base import PreferenceEmbedder, UserState

SHOTS = 4


def held_out_accuracy(model: PreferenceEmbedder, users, shots: int) -> float:
    hits = []
    for user in users:
        state = model.infer(user.shots[:shots])
        pairs = user.held_out
        prompts = [c.prompt_text for c in pairs]
        chosen = model.reward(prompts, [c.chosen for c in pairs], state)
        rejected = model.reward(prompts, [c.rejected for c in pairs], state)
        hits.extend((chosen > rejected).tolist())
    return float(np.mean(hits))


@pytest.mark.parametrize("name", sorted(EMBEDDER_CLASSES))
def test_beats_chance_on_unseen_users(name, fitted, synthetic):
    _, _, test = synthetic
    n_pairs = sum(len(u.held_out) for u in test.users)
    accuracy = held_out_accuracy(fitted[name], test.users, SHOTS)
    # Chance is 0.5; with n_pairs held-out pairs 0.5 + 2 standard errors is about 0.56.
    assert accuracy > 0.5 + 2 * math.sqrt(0.25 / n_pairs), (name, accuracy)


@pytest.mark.parametrize("name", sorted(EMBEDDER_CLASSES))
def test_protocol_and_prob(name, fitted, synthetic):
    model = fitted[name]
    assert isinstance(model, PreferenceEmbedder)
    _, _, test = synthetic
    user = test.users[0]
    state = model.infer(user.shots[:SHOTS])
    assert state.method == name and state.n_comparisons == SHOTS
    c = user.held_out[0]
    p = model.prob(c.prompt_text, c.chosen, c.rejected, state)
    q = model.prob(c.prompt_text, c.rejected, c.chosen, state)
    assert 0.0 <= p <= 1.0 and p + q == pytest.approx(1.0, abs=1e-6)
    assert UserState.from_dict(json.loads(json.dumps(state.to_dict()))).to_dict() == state.to_dict()
    assert model.reward([c.prompt_text], [c.chosen], model.prior()).shape == (1,)


@pytest.mark.parametrize("name", sorted(EMBEDDER_CLASSES))
def test_save_load_round_trip_is_bit_equal(name, fitted, featurizer, synthetic, tmp_path):
    model = fitted[name]
    model.save(tmp_path)
    config = json.loads((tmp_path / f"{name}_config.json").read_text())
    assert config["package_version"] == personalign.__version__
    assert config["encoder"] == featurizer.encoder_name and config["feature_dim"] == featurizer.dim
    assert (tmp_path / f"{name}.safetensors").is_file()
    loaded = type(model).load(tmp_path, featurizer)
    if hasattr(model, "model"):
        before, after = model.model.state_dict(), loaded.model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _, _, test = synthetic
    user = test.users[1]
    s1, s2 = model.infer(user.shots[:SHOTS]), loaded.infer(user.shots[:SHOTS])
    assert np.array_equal(s1.vector, s2.vector)
    prompts = [c.prompt_text for c in user.held_out]
    responses = [c.chosen for c in user.held_out]
    assert np.array_equal(model.reward(prompts, responses, s1), loaded.reward(prompts, responses, s2))


@pytest.mark.parametrize("name", sorted(EMBEDDER_CLASSES))
def test_empty_comparisons_raise(name, fitted):
    with pytest.raises(ValidationError) as err:
        fitted[name].infer([])
    assert err.value.field == "comparisons" and err.value.fix
