"""Enrollment through the facade (reward, predict, next_question, persisted state) and the harness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from personalign import Comparison
from personalign.errors import UnknownUserError, ValidationError

SHORT_FIRST = [
    Comparison(
        prompt="What is a good first pet?",
        chosen="A goldfish: cheap and easy.",
        rejected="It depends on your lifestyle, budget, space and time; dogs need walks and attention several times a day, cats are more independent, and fish need a cycled tank and regular water changes.",
    ),
    Comparison(
        prompt="How do I boil an egg?",
        chosen="Boil it for nine minutes.",
        rejected="Cover the eggs with cold water by an inch, bring to a rolling boil, turn off the heat, cover, wait nine to twelve minutes depending on the yolk you like, then move them to iced water and peel under running water.",
    ),
]
LONG_FIRST = [Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen) for c in SHORT_FIRST]
PROMPT = "How do I keep basil alive?"
SHORT = "Sun, water when dry, pinch the tips."
LONG = "Basil wants six hours of direct sun, so use your brightest window; water deeply when the top of the soil is dry, let the pot drain, pinch off the top leaves weekly so it branches instead of flowering, and turn the pot every few days."
CANDIDATES = [
    {
        "prompt": "How do I fix a squeaky door?",
        "a": "Oil the hinges.",
        "b": "Lift each hinge pin, clean off old grease and rust, coat the pin in silicone lubricant, tap it back in and swing the door to spread it.",
    },
    {"prompt": "Name a sci-fi book.", "a": "Dune.", "b": "Hyperion."},
    (
        "How should I start running?",
        "Run slowly three times a week.",
        "Begin with a run-walk plan of one minute jogging and two walking, for twenty minutes, three days a week, increasing the running share over eight weeks.",
    ),
]


def test_enroll_persists_the_state_and_predictions_follow_the_user(pz):
    profile = pz.enroll("short", SHORT_FIRST)
    state = profile.settings["state"]
    assert state["method"] == "pal" and state["n_comparisons"] == 2 and state["embedder"].startswith("pal:")
    assert len(state["vector"]) == pz.embedder.config.n_prototypes and all(v > 0 for v in state["variance"])
    pz.enroll("long", LONG_FIRST)
    p_short, p_long = pz.predict("short", PROMPT, SHORT, LONG), pz.predict("long", PROMPT, SHORT, LONG)
    assert p_short > 0.5 > p_long
    rewards = pz.reward("short", PROMPT, [SHORT, LONG])
    assert len(rewards) == 2 and rewards[0] > rewards[1]
    # The prediction is the Bradley-Terry probability of the reward difference.
    assert p_short == pytest.approx(1 / (1 + math.exp(-(rewards[0] - rewards[1]))), abs=1e-5)


def test_state_updates_incrementally(pz):
    first = pz.enroll("u", SHORT_FIRST[:1]).settings["state"]
    second = pz.enroll("u", SHORT_FIRST[1:]).settings["state"]
    assert first["n_comparisons"] == 1 and second["n_comparisons"] == 2
    assert first["vector"] != second["vector"]
    # The stored state is what state() returns, and equals a fresh inference on all comparisons.
    stored = pz.state("u")
    fresh = pz.embedder.infer(pz.profile("u").comparisons)
    np.testing.assert_allclose(stored.vector, fresh.vector, atol=1e-5)


def test_next_question_ranks_by_information_gain(pz):
    cold = pz.next_question("nobody-yet", CANDIDATES)
    assert [q["index"] for q in cold] and sorted(q["index"] for q in cold) == [0, 1, 2]
    gains = [q["gain"] for q in cold]
    assert gains == sorted(gains, reverse=True) and all(0 <= g <= math.log(2) + 1e-6 for g in gains)
    assert not pz.profiles.exists("nobody-yet")  # asking stores nothing
    assert len(pz.next_question("nobody-yet", CANDIDATES, top_k=1)) == 1
    pz.enroll("short", SHORT_FIRST)
    warm = {q["index"]: q for q in pz.next_question("short", CANDIDATES)}
    # The user's answer to the short-vs-long door question is now predictable, so it teaches less.
    assert warm[0]["p_a"] > 0.5
    assert warm[0]["gain"] < {q["index"]: q for q in cold}[0]["gain"]


@pytest.mark.parametrize(
    "candidates, field",
    [
        ([], "candidates"),
        ("How?", "candidates"),
        ([{"prompt": "p", "a": "x"}], "candidates[0].b"),
        ([{"prompt": "p", "a": "x", "b": "x"}], "candidates[0]"),
        ([{"prompt": "p", "a": "x", "b": "y", "c": "z"}], "candidates[0]"),
        ([("p", "a")], "candidates[0]"),
    ],
)
def test_bad_candidates_are_typed_errors(pz, candidates, field):
    with pytest.raises(ValidationError) as err:
        pz.next_question("u", candidates)
    assert err.value.field == field


def test_bad_input_changes_nothing(pz):
    with pytest.raises(UnknownUserError):
        pz.predict("ghost", PROMPT, SHORT, LONG)
    with pytest.raises(UnknownUserError):
        pz.reward("ghost", PROMPT, [SHORT])
    pz.enroll("u", SHORT_FIRST)
    with pytest.raises(ValidationError) as err:
        pz.reward("u", PROMPT, [])
    assert err.value.field == "responses"
    with pytest.raises(ValidationError):
        pz.predict("u", "", SHORT, LONG)
    with pytest.raises(ValidationError):
        pz.next_question("u", CANDIDATES, top_k=0)
    # A corrupt stored state (NaN) is a typed error naming the field; the file is not touched.
    path = pz.profiles.user_dir("u") / "profile.json"
    data = json.loads(path.read_text())
    data["settings"]["state"]["vector"][0] = float("nan")
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(ValidationError) as err:
        pz.predict("u", PROMPT, SHORT, LONG)
    assert "settings.state" in err.value.field and "refresh_state" in err.value.fix
    assert path.read_bytes() == before
    pz.refresh_state("u")
    assert pz.predict("u", PROMPT, SHORT, LONG) > 0.5


def test_a_custom_embedder_folder_is_used_and_its_feature_size_checked(tiny_generator, encoder, tmp_path):
    from personalign.eval.populations import SyntheticConfig, SyntheticPopulation
    from personalign.personalizer import Personalizer
    from personalign.preference import load_embedder, save_embedder
    from personalign.preference.base import Featurizer, FeaturizerConfig
    from personalign.preference.pal import PAL, PALConfig

    population = SyntheticPopulation(
        SyntheticConfig(n_users=24, n_prompts=6, candidates_per_prompt=6)
    ).population(shots=4, held_out=2)
    featurizer = Featurizer(encoder, FeaturizerConfig(parts=("response", "log_length", "style")))
    pal = PAL(featurizer, PALConfig(n_prototypes=3, pref_dim=8, epochs=2)).fit(population.population())
    folder = save_embedder(pal, tmp_path / "emb", provenance={"data": "synthetic"})
    loaded = load_embedder(folder, encoder)
    assert (
        loaded.featurizer.config.parts == ("response", "log_length", "style")
        and loaded.config.n_prototypes == 3
    )
    with Personalizer(tiny_generator, encoder, store=tmp_path / "store", embedder=folder) as pz:
        state = pz.enroll("u", SHORT_FIRST).settings["state"]
        assert len(state["vector"]) == 3
    # A config claiming another feature size is refused with the file named.
    config_path = folder / "pal_config.json"
    config = json.loads(config_path.read_text())
    config["feature_dim"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValidationError) as err:
        load_embedder(folder, encoder)
    assert "feature_dim" in err.value.field


def test_style_features_are_bounded_and_respond_to_style():
    from personalign.preference.style import STYLE_FEATURES, style_features

    friendly = style_features("Haha, you're going to love this! It's super fun, my friend :)")
    curt = style_features("Obviously. Figure it out yourself.")
    assert friendly.shape == (len(STYLE_FEATURES),) and np.all(np.isfinite(friendly))
    idx = {n: i for i, n in enumerate(STYLE_FEATURES)}
    assert friendly[idx["exclamations"]] > curt[idx["exclamations"]]
    assert (
        friendly[idx["warm_words"]] > curt[idx["warm_words"]]
        and curt[idx["cold_words"]] > friendly[idx["cold_words"]]
    )
    assert np.all(np.isfinite(style_features("")))


def test_hidden_state_features(tiny_generator, encoder):
    from personalign.preference.base import Featurizer, FeaturizerConfig

    with pytest.raises(ValidationError):
        Featurizer(encoder, FeaturizerConfig(parts=("hidden",)))
    featurizer = Featurizer(encoder, FeaturizerConfig(parts=("hidden", "log_length")), tiny_generator)
    assert featurizer.dim == tiny_generator.model.config.hidden_size + 1
    feats = featurizer.features(
        ["q", "q", "other"], ["a short answer", "a much longer answer than that", "a short answer"]
    )
    assert feats.shape == (3, featurizer.dim)
    np.testing.assert_allclose(np.linalg.norm(feats[:, :-1], axis=1), 1.0, atol=1e-5)
    # The prompt conditions the hidden state; the same pair twice is served from the cache bit-equal.
    assert not np.allclose(feats[0], feats[2])
    np.testing.assert_array_equal(featurizer.features(["q"], ["a short answer"])[0], feats[0])
    assert "+" in featurizer.encoder_name


def test_pal_information_gain_golden_properties(encoder):
    """PAL's gain is 0 when prototypes agree on a candidate and largest under the prior's spread."""
    import torch

    from personalign.preference.base import Featurizer, FeaturizerConfig, UserState
    from personalign.preference.pal import PAL, PALConfig

    featurizer = Featurizer(encoder, FeaturizerConfig(parts=("log_length",)))
    pal = PAL(featurizer, PALConfig(n_prototypes=2, pref_dim=1))
    with torch.no_grad():
        pal.model.proj.weight.fill_(1.0)
        pal.model.prototypes.copy_(torch.tensor([[4.0], [-4.0]]))  # prototype 0 likes length, 1 dislikes it
    pal.fitted = True
    a, b = "word " * 40, "word"
    prior = pal.prior()
    gain_split = pal.information_gain(["p"], [a], [b], prior, n_samples=4000)[0]
    gain_same = pal.information_gain(["p"], [a], [a + " "], prior, n_samples=4000)[0]
    assert gain_split > 0.2 and gain_same < 1e-3
    certain = UserState("pal", np.array([6.0, -6.0]), np.array([1e-4, 1e-4]))
    assert pal.information_gain(["p"], [a], [b], certain)[0] < 1e-3


def test_harness_on_a_small_synthetic_population(encoder, tmp_path):
    from personalign.eval.enroll import EnrollConfig, format_table, merge_results, plot_enroll, run_enroll

    config = EnrollConfig(
        data=["synthetic"],
        methods=["bt", "meandiff", "pal", "oracle"],
        shots=[1, 4],
        seeds=1,
        synthetic_users=40,
        active=True,
        active_users=3,
        active_pool=6,
        active_steps=2,
        features=("response", "log_length", "style"),
    )
    result = run_enroll(config, encoder)
    split = result["splits"]["synthetic"][0]
    assert split["test_users_count"] == 8 and split["fit_users"] == 32 and len(set(split["test_users"])) == 8
    cells = {(r["method"], r["shots"]): r for r in result["records"]}
    assert set(cells) == {(m, n) for m in ("bt", "meandiff", "pal", "oracle") for n in (1, 4)}
    for row in result["records"]:
        assert (
            row["n"] == 8 * 16
            and 0 <= row["accuracy"] <= 1
            and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        )
    # The unpersonalised baseline does not depend on the shots; the oracle is told the type.
    assert cells[("bt", 1)]["accuracy"] == cells[("bt", 4)]["accuracy"]
    assert cells[("oracle", 4)]["accuracy"] > 0.6
    curves = result["active"]["synthetic"]["pal"][0]
    assert [p["questions"] for p in curves["active"]] == [1, 2] and curves["users"] == 3
    png = plot_enroll(result, tmp_path / "enroll.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "synthetic: held-out pairwise accuracy" in format_table(result)
    with pytest.raises(ValidationError):
        merge_results([result, result])
    other = {
        **result,
        "records": [{**r, "data": "other"} for r in result["records"]],
        "splits": {"other": []},
        "features": {"other": ["response"]},
    }
    merged = merge_results([result, other])
    assert {r["data"] for r in merged["summary"]} == {"synthetic", "other"} and merged["features"][
        "other"
    ] == ["response"]


def test_harness_config_errors():
    from personalign.eval.enroll import EnrollConfig

    with pytest.raises(ValidationError) as err:
        EnrollConfig(data=["nowhere"])
    assert err.value.field == "data"
    with pytest.raises(ValidationError) as err:
        EnrollConfig(data=["synthetic"], methods=["magic"])
    assert "bt" in err.value.fix
    with pytest.raises(ValidationError):
        EnrollConfig(data=["synthetic"], shots=[0])
    with pytest.raises(ValidationError):
        EnrollConfig(data=["synthetic"], features=("colour",))


def test_eval_enroll_cli_on_a_jsonl_population(tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app
    from personalign.eval.populations import SyntheticConfig, SyntheticPopulation
    from personalign.types import write_preferences

    population = SyntheticPopulation(SyntheticConfig(n_users=20, candidates_per_prompt=6)).population(
        shots=4, held_out=4
    )
    data = tmp_path / "prefs.jsonl"
    write_preferences(data, population.rows())
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "enroll",
            "--data",
            str(data),
            "--methods",
            "bt,meandiff",
            "--shots",
            "1,2",
            "--seeds",
            "1",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert {r["method"] for r in saved["summary"]} == {"bt", "meandiff"} and (tmp_path / "p.png").is_file()
    bad = CliRunner().invoke(app, ["eval", "enroll", "--data", str(data), "--shots", "one"])
    assert bad.exit_code == 2 and "--shots" in bad.output
    # Users sharing every prompt leave nothing to fit on: a clear error, not a crash.
    tiny = SyntheticPopulation(SyntheticConfig(n_users=10, n_prompts=1, candidates_per_prompt=6)).population(
        shots=2, held_out=2
    )
    write_preferences(data, tiny.rows())
    empty = CliRunner().invoke(
        app, ["eval", "enroll", "--data", str(data), "--methods", "bt", "--seeds", "1"]
    )
    assert empty.exit_code == 1 and "--fit-data" in empty.output


def test_bench_enroll_reports_ratios(pz):
    from personalign.bench.enroll import format_enroll_report, run_enroll_bench

    result = run_enroll_bench(pz, users=3, shots=2)
    assert result["users"] == 2 and set(result["ratio_to_encode"]) == {"infer", "infer_warm", "enroll"}
    assert all(v > 0 for v in result["median_ms"].values())
    assert "x encode" in format_enroll_report(result)
    assert set(pz.users()) == {"bench-0", "bench-1"}


def test_item_effects_golden_value_and_round_trip(encoder, tmp_path):
    """Three wins of a over b and one loss, no prior: the offset gap is log 3 (sigma(d) = 3/4)."""
    from personalign.preference.base import Featurizer, FeaturizerConfig
    from personalign.preference.bt import BradleyTerry, BradleyTerryConfig
    from personalign.preference.items import ItemEffects, item_keys

    ka, kb = item_keys(["q", "q"], ["a", "b"])
    chosen = np.array([ka, ka, ka, kb])
    rejected = np.array([kb, kb, kb, ka])
    effects = ItemEffects.fit(chosen, rejected, np.zeros(4), np.ones(4), l2=1e-8)
    a, b = effects.lookup(np.array([ka, kb]))
    assert a - b == pytest.approx(math.log(3), abs=1e-3)
    # With a prior worth l2 comparisons the gap shrinks; unseen items get 0.
    shrunk = ItemEffects.fit(chosen, rejected, np.zeros(4), np.ones(4), l2=2.0)
    assert 0 < shrunk.lookup(np.array([ka]))[0] - shrunk.lookup(np.array([kb]))[0] < math.log(3)
    assert effects.offsets(["q"], ["never seen"])[0] == 0.0
    # A BT with item effects saves its 63-bit keys exactly.
    population = {
        "u1": [Comparison(prompt="Rate it", chosen="You are an idiot.", rejected="Nice weather today.")] * 3,
        "u2": [Comparison(prompt="Rate it", chosen="Go away, loser.", rejected="Thanks for sharing!")] * 2,
    }
    bt = BradleyTerry(
        Featurizer(encoder, FeaturizerConfig(parts=("log_length",))), BradleyTerryConfig(item_effects=True)
    ).fit(population)
    assert len(bt.items) == 4
    bt.save(tmp_path / "bt")
    loaded = BradleyTerry.load(tmp_path / "bt", bt.featurizer)
    np.testing.assert_array_equal(loaded.items.keys, bt.items.keys)
    np.testing.assert_array_equal(
        loaded.reward(["Rate it"] * 2, ["You are an idiot.", "Nice weather today."], loaded.prior()),
        bt.reward(["Rate it"] * 2, ["You are an idiot.", "Nice weather today."], bt.prior()),
    )
    assert bt.prob("Rate it", "You are an idiot.", "Nice weather today.", bt.prior()) > 0.5


def test_train_pal_recipe_and_pal_item_effects_round_trip(encoder, tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app
    from personalign.eval.populations import SyntheticConfig, SyntheticPopulation
    from personalign.preference import load_embedder
    from personalign.preference.base import Featurizer, FeaturizerConfig
    from personalign.preference.pal import PAL, PALConfig
    from personalign.types import write_preferences

    population = SyntheticPopulation(
        SyntheticConfig(n_users=16, n_prompts=8, candidates_per_prompt=6)
    ).population(shots=4, held_out=2)
    data = tmp_path / "users.jsonl"
    write_preferences(data, population.rows())
    result = CliRunner().invoke(
        app,
        [
            "train",
            "pal",
            "--data",
            str(data),
            "--features",
            "response,log_length",
            "--out",
            str(tmp_path / "pal"),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "pal" / "embedder.json").read_text())
    assert manifest["method"] == "pal" and manifest["provenance"]["users"] == 16
    assert load_embedder(tmp_path / "pal", encoder).featurizer.config.parts == ("response", "log_length")
    # PAL with item effects: offsets are saved and loaded exactly, rewards unchanged by the round trip.
    featurizer = Featurizer(encoder, FeaturizerConfig(parts=("log_length",)))
    pal = PAL(featurizer, PALConfig(n_prototypes=2, pref_dim=1, epochs=1, item_effects=True)).fit(
        population.population()
    )
    assert len(pal.items) > 0
    pal.save(tmp_path / "pal_items")
    loaded = PAL.load(tmp_path / "pal_items", featurizer)
    user = population.users[0]
    state = pal.infer(user.shots)
    np.testing.assert_array_equal(loaded.items.values, pal.items.values)
    texts = [c.chosen for c in user.held_out]
    prompts = [c.prompt_text for c in user.held_out]
    np.testing.assert_allclose(
        loaded.reward(prompts, texts, state), pal.reward(prompts, texts, state), rtol=1e-6
    )


def test_a_write_between_inference_and_storing_is_not_lost_from_the_state(pz, monkeypatch):
    pz.enroll("race", SHORT_FIRST[:1])
    embedder = pz.embedder
    real_infer = embedder.infer
    calls = []

    def infer_with_interleaved_write(comparisons):
        if not calls:  # another request stores a comparison while this one infers outside the lock

            def add(profile):
                profile.comparisons.append(LONG_FIRST[1].stamped(1.0))
                return profile

            pz.profiles.update("race", add)
        calls.append(len(comparisons))
        return real_infer(comparisons)

    monkeypatch.setattr(embedder, "infer", infer_with_interleaved_write)
    profile = pz.enroll("race", SHORT_FIRST[1:])
    assert len(profile.comparisons) == 3 and calls == [2, 3]  # inferred again, inside the lock, on all three
    assert profile.settings["state"]["n_comparisons"] == 3
