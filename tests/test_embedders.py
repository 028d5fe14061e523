"""Preference embedders on a small synthetic population: accuracy, artefact contract, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from personalign.errors import ValidationError
from personalign.eval.populations import SyntheticConfig, SyntheticPopulation, load_psoups, measure_attributes
from personalign.preference.base import (
    Featurizer,
    FeaturizerConfig,
    PreferenceEmbedder,
    UserState,
    as_population,
)
from personalign.preference.pal import PAL
from personalign.preference.vpl import VPL
from personalign.types import Comparison

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


def test_personalised_methods_beat_the_population_baseline(featurizer, build_embedder):
    """Where users disagree (a shared taste half the size of their own), 8 shots must beat one
    population reward by a margin. (On the module's population, whose shared taste dominates,
    the best personal method was within a pair or two of Bradley-Terry, and which side won
    depended on the number of threads.)"""
    config = SyntheticConfig(
        n_users=60, n_types=3, shared_scale=0.5, candidates_per_prompt=5, n_prompts=12, seed=0
    )
    fit, test = (
        SyntheticPopulation(config)
        .population(shots=8, held_out=16, seed=1)
        .split(0.3, seed=0, exclude="pair")
    )
    models = {
        name: build_embedder(name, featurizer).fit(fit.population(), seed=0)
        for name in ("bt", "meandiff", "pal")
    }
    baseline = held_out_accuracy(models["bt"], test.users, SHOTS)
    best = max(held_out_accuracy(models[name], test.users, 8) for name in ("meandiff", "pal"))
    # measured: bt 0.608; meandiff 0.677, pal 0.674-0.684 (1 or 2 threads), over 288 held-out pairs
    assert best > baseline + 0.03, (best, baseline)


def test_vpl_posterior_and_information_gain(fitted, synthetic):
    vpl = fitted["vpl"]
    world, _, test = synthetic
    user = test.users[0]
    prior, posterior = vpl.prior(), vpl.infer(user.shots)
    assert posterior.variance is not None and np.all(posterior.variance > 0)
    candidates = world.candidate_pairs(12, np.random.default_rng(0))
    prompts, a, b = zip(*candidates, strict=True)
    gain = vpl.information_gain(list(prompts), list(a), list(b), prior)
    assert gain.shape == (12,) and np.all(gain >= 0) and np.all(gain <= math.log(2) + 1e-6)
    assert np.array_equal(gain, vpl.information_gain(list(prompts), list(a), list(b), prior))  # seeded
    with pytest.raises(ValidationError, match="candidates"):
        vpl.information_gain([], [], [], prior)


# --- bad input ----------------------------------------------------------------------------------


def test_nan_state_raises(fitted):
    with pytest.raises(ValidationError, match="NaN"):
        UserState("pal", np.array([0.0, float("nan"), 0.0]))
    with pytest.raises(ValidationError, match="NaN"):
        UserState.from_dict({"method": "vpl", "vector": [float("nan")] * 4, "variance": [1.0] * 4})
    with pytest.raises(ValidationError, match="variance"):
        UserState("vpl", np.zeros(4), np.array([1.0, 1.0, 0.0, 1.0]))


def test_state_of_another_method_raises(fitted, synthetic):
    _, _, test = synthetic
    state = fitted["pal"].infer(test.users[0].shots[:SHOTS])
    with pytest.raises(ValidationError, match="state.method"):
        fitted["vpl"].reward(["q"], ["a"], state)


def test_unfitted_model_raises(featurizer):
    with pytest.raises(ValidationError, match="not fitted"):
        PAL(featurizer).infer([Comparison(prompt="q", chosen="a", rejected="b")])


def test_mismatched_feature_dims_on_load_raise(fitted, featurizer, encoder, tmp_path):
    fitted["pal"].save(tmp_path)
    narrow = Featurizer(encoder, FeaturizerConfig(parts=("response",)))
    with pytest.raises(ValidationError, match="featurizer.parts"):
        PAL.load(tmp_path, narrow)
    config_path = tmp_path / "pal_config.json"
    config = json.loads(config_path.read_text())
    config["feature_dim"] = featurizer.dim + 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="feature_dim"):
        PAL.load(tmp_path, featurizer)
    config["feature_dim"] = featurizer.dim
    config["config"]["pref_dim"] = 7  # tensors on disk no longer match the config
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="shape"):
        PAL.load(tmp_path, featurizer)
    with pytest.raises(ValidationError, match="no vpl_config.json"):
        VPL.load(tmp_path, featurizer)


def test_population_validation():
    c = Comparison(prompt="q", chosen="a", rejected="b")
    assert as_population([("u1", c), ("u2", c), ("u1", c)]) == {"u1": [c, c], "u2": [c]}
    with pytest.raises(ValidationError, match="user"):
        as_population([(None, c)])
    with pytest.raises(ValidationError, match="empty"):
        as_population({})
    with pytest.raises(ValidationError, match="user"):
        as_population([("../etc", c)])


# --- populations ----------------------------------------------------------------------------------


def test_synthetic_population_is_seeded_and_knows_the_truth():
    config = SyntheticConfig(n_users=5, candidates_per_prompt=3, n_prompts=4, seed=3)
    one, two = SyntheticPopulation(config).population(2, 2), SyntheticPopulation(config).population(2, 2)
    assert [u.comparisons for u in one.users] == [u.comparisons for u in two.users]
    world = SyntheticPopulation(config)
    user = world.user_ids[0]
    prompt = world.prompts[0]
    a, b = world.candidates[prompt][:2]
    assert world.prob(user, a, b) + world.prob(user, b, a) == pytest.approx(1.0)
    assert (world.prob(user, a, b) > 0.5) == (
        world.true_reward(user, [a])[0] > world.true_reward(user, [b])[0]
    )


def test_measure_attributes():
    plain = measure_attributes("Do it.")
    listed = measure_attributes(
        "Certainly. Furthermore:\n1. Benchmark the latency.\n2. Calibrate the parameters.\nI hope this helps!"
    )
    length, structure, formality, technicality, sentiment, politeness = range(6)
    assert listed[length] > plain[length] and listed[structure] > 0 == plain[structure]
    assert listed[technicality] > plain[technicality] and listed[politeness] > plain[politeness]
    assert (
        measure_attributes("Honestly it is wonderful, I love it.")[sentiment]
        > 0
        > measure_attributes("This is boring and painful.")[sentiment]
    )
    assert (
        measure_attributes("Certainly, therefore.")[formality]
        > 0
        > measure_attributes("Hey, gonna be awesome!")[formality]
    )


def test_split_is_by_user_and_excludes_test_prompts():
    world = SyntheticPopulation(SyntheticConfig(n_users=20, candidates_per_prompt=3, n_prompts=6, seed=0))
    population = world.population(4, 4)
    fit, test = population.split(0.25, seed=0, exclude="prompt")
    assert not {u.user for u in fit.users} & {u.user for u in test.users}
    banned = {c.prompt_text for u in test.users for c in u.held_out}
    assert all(c.prompt_text not in banned for u in fit.users for c in u.comparisons)
    again, _ = population.split(0.25, seed=0, exclude="prompt")
    assert [u.user for u in again.users] == [u.user for u in fit.users]
    with pytest.raises(ValidationError, match="exclude"):
        population.split(0.25, seed=0, exclude="everything")


def test_psoups_loader():
    try:
        population = load_psoups()
    except ValidationError:
        pytest.skip("the P-SOUPS data folder is not available")
    assert population.meta["dropped"]["test_prompt_in_history"] == 4
    assert population.groups() == {"elementary": 300, "phd": 297, "friendly": 300, "unfriendly": 299}
    for user in population.users:
        assert len(user.held_out) == 1 and 1 <= len(user.shots) <= 4
        keys = [(c.prompt_text, c.chosen, c.rejected) for c in user.shots]
        assert len(set(keys)) == len(keys)
        assert user.held_out[0].prompt_text not in {c.prompt_text for c in user.shots}
