"""Amplified comparisons: the generator's answers labelled by a user's inferred reward, for their LoRA."""

from __future__ import annotations

import math

import pydantic
import pytest

from personalign.adapters.amplify import AmplifyConfig, amplify
from personalign.errors import ValidationError
from personalign.eval.populations import SyntheticConfig, SyntheticPopulation
from personalign.personalizer import Personalizer
from personalign.preference import PAL, Featurizer
from personalign.preference.pal import PALConfig


def _pairs(comparisons):
    return [(c.prompt_text, c.chosen, c.rejected) for c in comparisons]


def test_golden_pairs_round_robin_over_prompts():
    answers = {"p": ["a", "bb", "ccc"], "q": ["x", "y"]}
    rewards = {"p": [0.0, 2.0, 1.0], "q": [0.5, 0.0]}
    # p: bb>a (margin 2), ccc>a (1), bb>ccc (1); q: x>y (0.5). Depth 0 of each prompt (best prompt first), then depth 1.
    assert _pairs(amplify(answers, rewards, AmplifyConfig(pairs=10, per_prompt=2))) == [
        ("p", "bb", "a"),
        ("q", "x", "y"),
        ("p", "ccc", "a"),
    ]
    assert _pairs(amplify(answers, rewards, AmplifyConfig(pairs=2, per_prompt=3))) == [
        ("p", "bb", "a"),
        ("q", "x", "y"),
    ]
    assert _pairs(amplify(answers, rewards, AmplifyConfig(pairs=10, min_margin=0.75))) == [
        ("p", "bb", "a"),
        ("p", "ccc", "a"),
        ("p", "bb", "ccc"),
    ]


def test_identical_empty_and_tied_answers_are_never_pairs():
    answers = {"p": ["same", "same ", "", "other"]}
    rewards = {"p": [1.0, 0.0, 5.0, 1.0]}
    # "same"/"same " are one answer, "" is no answer, "same" vs "other" is a tie: only "other" over "same "
    assert _pairs(amplify(answers, rewards)) == [("p", "other", "same ")]
    assert amplify(answers, {"p": [1.0, 1.0, 5.0, 1.0]}) == []


def test_bad_rewards_are_typed_errors():
    with pytest.raises(ValidationError, match=r"rewards\['p'\].*score every answer"):
        amplify({"p": ["a", "b"]}, {"p": [1.0]})
    with pytest.raises(ValidationError, match="NaN"):
        amplify({"p": ["a", "b"]}, {"p": [1.0, math.nan]})
    with pytest.raises(pydantic.ValidationError, match="pairs"):
        AmplifyConfig(pairs=0)


@pytest.fixture(scope="module")
def small():
    population = SyntheticPopulation(SyntheticConfig(n_users=24, n_prompts=6, candidates_per_prompt=4))
    return population, population.population(shots=4, held_out=2)


@pytest.fixture(scope="module")
def pal(encoder, small):
    return PAL(Featurizer(encoder), PALConfig(n_prototypes=2, epochs=1)).fit(small[1].population(), seed=0)


def test_amplified_adapter_trains_on_labelled_pairs_and_stores_none(lively, encoder, pal, small, tmp_path):
    population, eval_pop = small
    user = eval_pop.users[0]
    answers = {
        p: [c.chosen for c in population.population(shots=2, held_out=0).users[0].shots[:1]]
        + ["A short answer.", "A much longer answer that goes on and on about many things."]
        for p in population.prompts[:3]
    }
    with Personalizer(lively, encoder, tmp_path / "s", embedder=pal) as pz:
        pz.enroll(user.user, user.shots)
        extra = pz.amplified_comparisons(user.user, answers, {"pairs": 5})
        assert 0 < len(extra) <= 5
        for c in extra:  # each pair is ordered by the user's own inferred reward
            chosen, rejected = pz.reward(user.user, c.prompt_text, [c.chosen, c.rejected])
            assert chosen > rejected
        profile = pz.train_adapter(user.user, {"epochs": 1, "holdout_fraction": 0.0}, extra=extra)
        assert len(profile.comparisons) == len(user.shots)  # the amplified pairs are not stored
        assert profile.settings["adapter"]["pairs"] == len(user.shots) + len(extra)
        folder = pz.adapter_folder(user.user)
        assert (folder / "adapter_config.json").is_file()
        other = eval_pop.users[1]
        pz.enroll(other.user, other.shots)
        pz.import_adapter(other.user, folder)  # a plain PEFT folder: another user can run it
        with pytest.raises(ValidationError, match="has no adapter"):
            pz.adapter_folder("nobody-with-an-adapter")
        with pytest.raises(ValidationError, match="config"):
            pz.amplified_comparisons(user.user, answers, {"pairs": -1})
