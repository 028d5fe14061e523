"""Personal reranking (``rerank=N``) and the on-policy reward side, on the tiny random Llama."""

from __future__ import annotations

import math

import numpy as np
import pytest

from personalign.errors import ContextLengthError, ValidationError
from personalign.eval import generate as generate_mod
from personalign.eval.generate import GenerateConfig, personal_margins, run_generate
from personalign.eval.onpolicy import (
    PoolConfig,
    _pairwise_accuracy,
    answer_pool,
    bayes_weights,
    best_of_n,
    onpolicy_population,
)
from personalign.eval.populations import SyntheticPopulation
from personalign.personalizer import Personalizer
from personalign.steering.decoding import derived_seed
from personalign.steering.rerank import pick

EGG = {
    "prompt": "How do I boil an egg?",
    "chosen": "Nine minutes.",
    "rejected": "It depends on many things about the egg, and here is a long story.",
}
ASK = [{"role": "user", "content": "How long should I boil an egg for?"}]


@pytest.fixture()
def lively_pz(lively, encoder, tmp_path):
    with Personalizer(lively, encoder, store=tmp_path / "store") as personalizer:
        yield personalizer


def test_pick_golden_values():
    assert pick([0.1, 0.7, -2.0, 0.7]) == 1  # the first of equal best scores
    assert pick([-1.0]) == 0
    with pytest.raises(ValidationError, match="NaN.*refresh_state"):
        pick([0.1, math.nan])
    with pytest.raises(ValidationError, match="empty"):
        pick([])


def test_rerank_returns_the_candidate_the_users_reward_scores_highest(lively_pz):
    pz = lively_pz
    pz.enroll("ana", [EGG])
    opts = {"max_new_tokens": 8, "temperature": 0.8, "seed": 3, "memory": False, "shots": False, "steer": {}}
    # candidate j samples with seed derived_seed(3, j), as the rerank rows do
    candidates = [
        r.text
        for r in pz.respond_batch(
            [{"user": "ana", "messages": ASK, **opts, "seed": derived_seed(3, j)} for j in range(4)]
        )
    ]
    assert len(set(candidates)) > 1  # the lively model samples different answers
    rewards = pz.reward("ana", ASK[0]["content"], [c or " " for c in candidates])
    result = pz.respond("ana", ASK, rerank=4, **opts)
    assert result.text == candidates[int(np.argmax(rewards))]
    report = result.personalization
    assert (
        report["method"] == "user-rerank"
        and report["candidates"] == 4
        and report["picked"] == int(np.argmax(rewards))
    )
    np.testing.assert_allclose(report["scores"], rewards, atol=1e-3)
    # in a batch with other requests it samples the same candidates (seeds are per row) and picks the same one
    batch = pz.respond_batch(
        [{"user": "ana", "messages": ASK, "rerank": 4, **opts}, {"user": None, "messages": ASK, **opts}]
    )
    assert (
        batch[0].text == result.text
        and batch[0].personalization["picked"] == report["picked"]
        and batch[1].personalization is None
    )
    # a stream gets the picked reply whole
    assert "".join(pz.stream("ana", ASK, rerank=4, **opts)) == result.text


def test_rerank_of_a_greedy_request_samples_at_the_rerank_temperature(lively_pz, monkeypatch):
    pz = lively_pz
    pz.enroll("ana", [EGG])
    seen = []
    real = pz.generator.model.generate

    def spy(*args, **kwargs):
        decoder = kwargs["logits_processor"][
            -1
        ]  # RowDecoder: each row sampled by its own settings, generate greedy
        seen.append(
            (kwargs["input_ids"].shape[0], kwargs.get("do_sample"), [c.temperature for c in decoder.controls])
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(pz.generator.model, "generate", spy)
    result = pz.respond(
        "ana", ASK, rerank=3, rerank_temperature=0.6, max_new_tokens=4, memory=False, shots=False, steer={}
    )
    assert seen == [(3, False, [0.6] * 3)] and result.personalization["temperature"] == 0.6


def test_rerank_without_a_state_gives_the_plain_answer_and_says_so(lively_pz):
    pz = lively_pz
    plain = pz.respond(None, ASK, max_new_tokens=6)
    generic = pz.respond(None, ASK, max_new_tokens=6, rerank=4)
    assert (
        generic.text == plain.text
        and generic.personalization["method"] is None
        and "no user" in generic.personalization["reason"]
    )
    pz.remember("bo", "I like eggs.")  # a user with memories but no comparisons
    result = pz.respond("bo", ASK, max_new_tokens=6, rerank=4, memory=False, shots=False, steer={})
    assert result.text == plain.text and "no comparisons" in result.personalization["reason"]


def test_rerank_bad_input_is_typed_and_a_corrupt_state_stores_nothing(lively_pz):
    pz = lively_pz
    pz.enroll("ana", [EGG])
    for bad in (17, -1, "four"):
        with pytest.raises(ValidationError, match="rerank"):
            pz.respond("ana", ASK, rerank=bad, max_new_tokens=4)

    def corrupt(profile):
        profile.settings["state"] = {
            **profile.settings["state"],
            "vector": [math.nan] * len(profile.settings["state"]["vector"]),
        }
        return profile

    pz.profiles.update("ana", corrupt, create=False)
    before = pz.profile("ana").model_dump()
    with pytest.raises(ValidationError, match="refresh_state"):
        pz.respond("ana", ASK, rerank=4, max_new_tokens=4)
    assert pz.profile("ana").model_dump() == before
    pz.refresh_state("ana")
    assert (
        pz.respond("ana", ASK, rerank=2, max_new_tokens=4, temperature=0.8, seed=1).personalization["method"]
        == "user-rerank"
    )


def test_onpolicy_population_labels_the_pooled_answers_by_the_hidden_reward():
    population = SyntheticPopulation()
    prompts = population.prompts[:3]
    pool = {p: population.candidates[p][:5] for p in prompts}  # stands in for the generator's samples
    pop = onpolicy_population(population, pool, prompts, shots=2, held_out=3, seed=0)
    assert len(pop.users) == len(population.user_ids)
    for u in pop.users[:20]:
        for c in u.comparisons:
            assert (
                c.prompt_text in pool
                and c.chosen in pool[c.prompt_text]
                and c.rejected in pool[c.prompt_text]
            )
    # labels follow the hidden reward most of the time (Bradley-Terry, rationality 3)
    agree = [
        population.true_reward(u.user, [c.chosen])[0] > population.true_reward(u.user, [c.rejected])[0]
        for u in pop.users
        for c in u.comparisons
    ]
    assert np.mean(agree) > 0.75
    with pytest.raises(ValidationError, match="no pooled answers"):
        onpolicy_population(population, pool, population.prompts[:4])


def test_ranking_helpers_golden_values():
    # hidden order 3 > 2 > 1; inferred swaps the first two: pairs (0,1) agree? hidden 1<2, inferred 2>1: no
    assert _pairwise_accuracy(np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 3.0])) == (2, 3)
    assert _pairwise_accuracy(np.array([1.0, 1.0, 3.0]), np.array([0.0, 5.0, 9.0])) == (
        2,
        2,
    )  # hidden tie skipped
    population = SyntheticPopulation()
    user, prompt = population.user_ids[0], population.prompts[0]
    texts = population.candidates[prompt][:4]
    hidden = population.true_reward(user, texts)
    generic = texts[int(np.argsort(hidden)[1])]  # the second worst
    assert best_of_n(population, user, prompt, texts, hidden, generic) == 1.0
    assert best_of_n(population, user, prompt, texts, -hidden, generic) == 0.0
    assert (
        best_of_n(
            population, user, prompt, texts, (np.arange(4) == np.argsort(hidden)[1]).astype(float), generic
        )
        == 0.5
    )


def test_bayes_ceiling_is_the_prior_mean_without_shots_and_finds_the_user_with_many():
    population = SyntheticPopulation()
    cfg = population.config
    prior = bayes_weights(population, [])
    # no shots: the prior mean, the average of the type centroids (equal type shares)
    np.testing.assert_allclose(prior, population.type_centroids.mean(axis=0), atol=0.05)
    user = population.user_ids[3]
    rng = np.random.default_rng(0)
    shots = [population.answer(user, p, a, b, rng) for p, a, b in population.candidate_pairs(60, rng)]
    posterior = bayes_weights(population, shots)
    truth = population.user_weights[3]
    own_type = population.type_centroids[population.user_types[3]]
    # many shots pin the user's type: the posterior mean sits near their own centroid and weights
    assert np.linalg.norm(posterior - own_type) < cfg.type_scale
    assert np.corrcoef(posterior, truth)[0, 1] > 0.95
    # a shot of weight 2 counts as the same shot twice (weighted Bradley-Terry likelihood)
    doubled = [c.model_copy(update={"weight": 2.0}) for c in shots[:3]]
    np.testing.assert_allclose(
        bayes_weights(population, doubled), bayes_weights(population, [*shots[:3], *shots[:3]]), atol=1e-9
    )


def test_personal_margins_pair_own_and_shuffled():
    methods = {
        "user-rerank": {"scores": [1.0, 1.0, 0.5, 0.0]},
        "user-rerank-shuffled": {"scores": [0.0, 1.0, 0.5, 0.0]},
        "pplug": {"scores": [1.0] * 4},
    }
    margins = personal_margins(methods, ["a", "a", "b", "b"])
    assert set(margins) == {"user-rerank"} and margins["user-rerank"]["margin"] == pytest.approx(0.25)
    low, high = margins["user-rerank"]["ci"]
    assert low <= 0.25 <= high


def test_answer_pool_is_cached_and_refuses_a_bad_config(lively, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path))
    prompts = ["How do I boil an egg?", "Why is the sky blue?"]
    pool = answer_pool(lively, prompts, PoolConfig(n_per_prompt=3, max_new_tokens=6))
    assert set(pool) == set(prompts) and all(2 <= len(v) <= 3 for v in pool.values())
    assert answer_pool(lively, prompts, PoolConfig(n_per_prompt=3, max_new_tokens=6)) == pool
    assert len(list((tmp_path / "onpolicy").glob("pool-*.json"))) == 1
    with pytest.raises(ValidationError, match="n_per_prompt"):
        PoolConfig(n_per_prompt=1)


def test_guidance_never_reads_the_hidden_weights(lively, encoder, tmp_path, monkeypatch):
    """Flip every synthetic user's hidden weights after enrolment: the guided answers stay the same
    (only the judge's verdicts may change)."""
    made = []
    real_split = generate_mod.generation_split

    def keep(*args, **kwargs):
        made.append(real_split(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(generate_mod, "generation_split", keep)
    config = GenerateConfig(
        methods=["user-rerank", "user-rerank-shuffled"],
        users=2,
        prompts_per_user=1,
        shots=2,
        max_new_tokens=6,
        rerank=3,
    )
    answers = []
    for flip in (False, True):
        with Personalizer(lively, encoder, store=tmp_path / f"s{flip}") as pz:
            real_batch = pz.respond_batch

            def batch(requests, real_batch=real_batch, flip=flip):
                if flip:
                    made[-1].population.user_weights *= -1.0
                return real_batch(requests)

            pz.respond_batch = batch
            result = run_generate(pz, config)
        answers.append([result["methods"][m]["example"]["answer"] for m in config.methods])
        assert set(result["margins"]) == {"user-rerank"}
    assert answers[0] == answers[1]


def test_a_long_or_blank_last_message_still_chats(lively_pz):
    """The memory search reads at most a memory's length of the message, and nothing of a blank one."""
    pz = lively_pz
    pz.remember("ana", "I like eggs.")
    long = [{"role": "user", "content": "How long should I boil an egg? " * 400}]  # about 12,800 characters
    searched = []
    real = pz.memory.search
    pz.memory.search = lambda user, query, **kw: searched.append(query) or real(user, query, **kw)
    with pytest.raises(
        ContextLengthError
    ):  # the tiny model's 512-token context, not the memory search, refuses it
        pz.respond("ana", long, max_new_tokens=3)
    assert len(searched[0]) == 8000
    blank = [{"role": "user", "content": "   "}]
    assert pz.respond("ana", blank, max_new_tokens=3).memories == []
