"""``eval psoups-decode`` (issue 17, item 6) on the tiny random Llama and a few P-SOUPS users.

The data is read in place; every test here is skipped when the P-SOUPS folder is missing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from personalign.errors import ValidationError
from personalign.eval import psoups_decode as mod
from personalign.eval.adapters import wilson
from personalign.eval.populations import EvalPopulation, EvalUser, data_root, load_psoups
from personalign.eval.psoups_decode import (
    OPPOSITE,
    PsoupsDecodeConfig,
    choose_users,
    format_psoups_decode,
    run_psoups_decode,
    wilson_interval,
    write_psoups_decode,
)
from personalign.types import Comparison

HAVE_DATA = (data_root() / "psoups_alignx" / "student_phd.json").is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="P-SOUPS data (psoups_alignx) not found; set $PERSONALIGN_DATA"
)
SMALL = {"users": 4, "test_fraction": 0.05, "fit_users": 24, "max_new_tokens": 6, "batch_size": 8}


def _user(name: str, group: str) -> EvalUser:
    pair = Comparison(prompt=f"Question of {name}?", chosen="Yes.", rejected="No.")
    return EvalUser(name, [pair], [pair], group)


def test_wilson_interval_matches_the_whole_number_helper_and_takes_half_wins():
    """For whole wins it is scipy's Wilson interval (adapters.wilson); 2.5 of 5 is centred on 0.5."""
    for wins, n in ((0, 5), (3, 5), (5, 5), (17, 24)):
        np.testing.assert_allclose(wilson_interval(wins, n), wilson(wins, n), atol=1e-9)
    low, high = wilson_interval(2.5, 5)
    assert low < 0.5 < high and abs((low + high) / 2 - 0.5) < 1e-9
    assert all(np.isnan(wilson_interval(0, 0)))


def test_choose_users_pairs_each_user_with_the_opposite_persona_and_ignores_which_side_is_which():
    test = [_user(f"u{i}", g) for i, g in enumerate(["elementary", "phd", "friendly", "unfriendly"] * 5)]
    pairs = choose_users(test, 8, seed=3)
    assert len(pairs) == 8
    assert all(OPPOSITE[u.group] == d.group for u, d in pairs)
    assert {u.group for u, _ in pairs} == set(OPPOSITE)
    swapped = [EvalUser(u.user, u.shots, u.held_out, OPPOSITE[u.group]) for u in test]
    assert {(u.user, d.user) for u, d in choose_users(swapped, 8, seed=3)} == {
        (u.user, d.user) for u, d in pairs
    }
    with pytest.raises(ValidationError, match="personas"):
        choose_users([u for u in test if u.group != "phd"], 8, seed=0)


def test_config_is_validated_early_with_the_field_named():
    for bad, field in (
        ({"guidance": "mine"}, "guidance"),
        ({"judge_features": ("response",)}, "judge_features"),
        ({"judge_features": ("nope",)}, "judge_features"),
        ({"users": 2}, "users"),
        ({"rerank": 1}, "rerank"),
        ({"files": ("x",)}, "files"),
    ):
        with pytest.raises(ValidationError, match=field):
            PsoupsDecodeConfig(**bad)


@pytest.fixture(scope="module")
def small_run(lively, encoder):
    return run_psoups_decode(lively, encoder, PsoupsDecodeConfig(**SMALL))


@needs_data
def test_psoups_decode_structure_and_controls(small_run, tmp_path):
    r = small_run
    assert set(r["methods"]) == {
        "user-rerank",
        "user-rerank-shuffled",
    }  # user-vas: the shipped heads fit neither the tiny model nor the fitted PAL
    assert "user-vas" in r["skipped"]
    assert set(r["references"]) == {"judge-pick", "random-candidate"}
    assert r["split"]["decoded_users"] == 4 and r["split"]["fit_users"] == 24
    for m in r["methods"].values():
        assert m["n"] == 4 and 0.0 <= m["win_rate"] <= 1.0 and m["ci"][0] <= m["win_rate"] <= m["ci"][1]
        assert set(m["scores"]) <= {0.0, 0.5, 1.0}
    margin = r["margins"]["user-rerank"]
    diff = np.subtract(r["methods"]["user-rerank"]["scores"], r["methods"]["user-rerank-shuffled"]["scores"])
    assert (
        margin["margin"] == pytest.approx(diff.mean())
        and margin["ci"][0] <= margin["margin"] <= margin["ci"][1]
    )
    # the picks come from the shared candidates; the decoy is a test user of the opposite persona
    for row, own, other in zip(
        r["users"],
        r["methods"]["user-rerank"]["picked"],
        r["methods"]["user-rerank-shuffled"]["picked"],
        strict=True,
    ):
        assert 0 <= own < 4 and 0 <= other < 4 and len(r["candidates"][row["prompt"]]) == 4
        decoy = next(u for u in r["users"] if u["user"] == row["decoy"])
        assert OPPOSITE[row["persona"]] == decoy["persona"]
    # judge-pick is the ceiling of reranking
    assert r["references"]["judge-pick"]["win_rate"] >= r["methods"]["user-rerank"]["win_rate"]
    assert 0.0 <= r["judge"]["accuracy"] <= 1.0 and r["judge"]["n"] == r["split"]["test_users"]
    assert r["judge"]["features"] == ["hidden"] and not set(r["judge"]["features"]) & set(
        r["guidance"]["features"]
    )
    write_psoups_decode(r, tmp_path / "r.json", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["methods"].keys() == r["methods"].keys()
    assert (tmp_path / "r.png").stat().st_size > 1000
    table = format_psoups_decode(r)
    assert "| user-rerank |" in table and "(judge-pick)" in table and "held-out accuracy" in table


@needs_data
def test_the_rerank_pick_is_what_personalizer_respond_rerank_returns(lively, encoder, tmp_path):
    """The harness samples the candidates once for own and shuffled; they are the rows
    ``respond(..., rerank=4, seed=...)`` samples, and the pick is the one it returns."""
    from personalign.personalizer import Personalizer

    config = PsoupsDecodeConfig(**SMALL)
    population = load_psoups(None, config.files)
    fit, test = population.split(config.test_fraction, config.seed, exclude="prompt")
    fit = mod._fit_population(fit, config.fit_users, config.seed)
    (user, _), *_ = choose_users(test.users, config.users, config.seed)
    prompt = user.held_out[0].prompt_text
    with Personalizer(
        lively, encoder, store=tmp_path / "store", embedder=mod.build_guidance(lively, encoder, fit, config)
    ) as pz:
        pz.enroll(user.user, user.shots)
        ask = [{"role": "user", "content": prompt}]
        off = {"memory": False, "shots": False, "steer": {}, "max_new_tokens": 6}
        from personalign.steering.decoding import derived_seed

        rows = [
            {"user": None, "messages": ask, "temperature": 0.8, "seed": derived_seed(0, j), **off}
            for j in range(4)
        ]
        candidates = pz.chat_batch(rows)
        best = mod.pick_by_reward(pz.reward(user.user, prompt, [t or " " for t in candidates]), candidates)
        result = pz.respond(user.user, ask, rerank=4, seed=0, user_vas=0.0, **off)
    assert result.personalization["picked"] == best and result.text == candidates[best]


@needs_data
def test_the_persona_label_never_reaches_the_guidance(lively, encoder, small_run, monkeypatch):
    """Relabel every fit user at random and swap every test user's persona for its opposite: the
    judges change (they are fitted per label), the guidance cannot (it sees only comparisons), so
    the same users are decoded and every user's own pick and its shuffled control's pick stay the same."""
    real = load_psoups

    def relabelled(root, files):
        population = real(root, files)
        fit, test = population.split(SMALL["test_fraction"], 0, exclude="prompt")
        test_ids = {u.user for u in test.users}
        rng = np.random.default_rng(7)
        labels = list(OPPOSITE)
        users = [
            EvalUser(
                u.user,
                u.shots,
                u.held_out,
                OPPOSITE[u.group] if u.user in test_ids else labels[int(rng.integers(4))],
            )
            for u in population.users
        ]
        return EvalPopulation(population.name, users, population.meta)

    monkeypatch.setattr(mod, "load_psoups", relabelled)
    again = run_psoups_decode(lively, encoder, PsoupsDecodeConfig(**SMALL))
    assert {(u["user"], u["decoy"]) for u in again["users"]} == {
        (u["user"], u["decoy"]) for u in small_run["users"]
    }
    own = {
        u["user"]: (p, q)
        for u, p, q in zip(
            small_run["users"],
            small_run["methods"]["user-rerank"]["picked"],
            small_run["methods"]["user-rerank-shuffled"]["picked"],
            strict=True,
        )
    }
    relabelled_picks = {
        u["user"]: (p, q)
        for u, p, q in zip(
            again["users"],
            again["methods"]["user-rerank"]["picked"],
            again["methods"]["user-rerank-shuffled"]["picked"],
            strict=True,
        )
    }
    assert relabelled_picks == own
    assert again["guidance"]["accuracy"] == small_run["guidance"]["accuracy"]


@needs_data
def test_pooling_seeds_concatenates_the_judged_answers_and_refuses_other_settings(small_run):
    from personalign.eval.psoups_decode import picks_differ, pool_psoups_decode

    other = json.loads(json.dumps({**small_run, "config": {**small_run["config"], "seed": 1}}))
    pooled = pool_psoups_decode([small_run, other])
    assert pooled["seeds"] == [0, 1] and pooled["split"]["decoded_users"] == 8
    own = pooled["methods"]["user-rerank"]
    assert own["n"] == 8 and own["win_rate"] == pytest.approx(small_run["methods"]["user-rerank"]["win_rate"])
    assert pooled["margins"]["user-rerank"]["margin"] == pytest.approx(
        small_run["margins"]["user-rerank"]["margin"]
    )
    assert pooled["judge"]["n"] == 2 * small_run["judge"]["n"] and pooled["references"]["random-candidate"][
        "ci"
    ] == [None, None]
    assert sum(d for d, _ in picks_differ(pooled, "user-rerank", "user-rerank-shuffled").values()) == 2 * sum(
        d for d, _ in picks_differ(small_run, "user-rerank", "user-rerank-shuffled").values()
    )
    assert "| user-rerank |" in format_psoups_decode(pooled)
    with pytest.raises(ValidationError, match="other settings"):
        pool_psoups_decode([small_run, {**other, "config": {**other["config"], "rerank": 8}}])
