"""Golden values for the objectives and the decode-time steering processors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from personalign.errors import ValidationError
from personalign.steering.decoding import (
    DEFAULT_VERBOSITY_STRENGTH,
    MAX_WEIGHT,
    STEERABLE,
    VerbosityProcessor,
    eos_shift,
    eos_token_ids,
    steering_processors,
    validate_steer,
)
from personalign.steering.objectives import (
    OBJECTIVES,
    infer_weights,
    measure,
    structure,
    verbosity,
    word_count,
)
from personalign.types import Comparison

# --- objectives ------------------------------------------------------------------------------


def test_word_count():
    """``\\b\\w+\\b`` words: "Hello", "world", "It", "s", "3pm" -> 5 (the apostrophe splits "It's")."""
    assert word_count("Hello, world! It's 3pm.") == 5
    assert word_count("") == 0
    assert word_count("  ...  !! ") == 0
    assert word_count("one\ntwo\tthree") == 3


def test_verbosity_is_log1p_words():
    """verbosity = log(1 + words): 3 words -> log 4; 0 words -> 0; 7 words -> log 8 = 3 log 2."""
    assert verbosity("one two three") == pytest.approx(math.log(4), abs=1e-12)
    assert verbosity("") == 0.0
    assert verbosity("a b c d e f g") == pytest.approx(3 * math.log(2), abs=1e-12)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # 3 list lines (and 3 inline "N." markers); words 1 Boil water 2 Add egg 3 Wait = 8 -> 100 * 3 / 8
        ("1. Boil water\n2. Add egg\n3. Wait", 37.5),
        # no list lines; inline "First," and "Second," = 2; 4 words -> 100 * 2 / 4
        ("First, boil. Second, wait.", 50.0),
        # heading + 2 bullets = 3 lines; words Title a b = 3 -> 100 * 3 / 3
        ("# Title\n- a\n- b", 100.0),
        # one bullet line over 20 words -> 100 * 1 / 20
        ("- " + " ".join(["w"] * 20), 5.0),
        ("plain prose without steps", 0.0),
        ("", 0.0),
    ],
)
def test_structure_golden(text, expected):
    assert structure(text) == pytest.approx(expected, abs=1e-12)


def test_measure_names_every_objective():
    measurable = {n for n, o in OBJECTIVES.items() if not o.learned}
    assert (
        set(measure("a b"))
        == measurable
        >= {"verbosity", "structure", "reading_level", "formality", "sentiment", "politeness"}
    )
    assert measure("a b")["verbosity"] == pytest.approx(math.log(3))


def test_infer_weights_golden():
    """``w_k = tanh(mean_i(weight_i * (a_k(chosen_i) - a_k(rejected_i))) / scale_k)``, mean over total weight.

    c1 (weight 1): chosen "- w x20" vs rejected "w x20": same 20 words, so verbosity diff 0;
        structure 5.0 - 0.0 = 5.
    c2 (weight 3): chosen "one" (1 word) vs "one two three" (3 words): verbosity diff
        log 2 - log 4 = -log 2; structure 0 - 0.
    total weight 4.
    verbosity: mean = 3 * (-log 2) / 4, / 0.5 = -1.5 log 2, tanh(-1.5 log 2) with x = 2^-1.5:
        (x - 1/x) / (x + 1/x) = (2^-3 - 1) / (2^-3 + 1) = -7/9.
    structure: mean = 5 / 4 = 1.25, / 2.0 = 0.625, tanh(0.625) = 0.5545997223493823.
    """
    c1 = Comparison(prompt="p", chosen="- " + " ".join(["w"] * 20), rejected=" ".join(["w"] * 20))
    c2 = Comparison(prompt="q", chosen="one", rejected="one two three", weight=3)
    weights = infer_weights([c1, c2])
    assert set(weights) == {n for n, o in OBJECTIVES.items() if not o.learned}
    assert weights["verbosity"] == pytest.approx(-7 / 9, abs=1e-12)
    assert weights["structure"] == pytest.approx(0.5545997223493823, abs=1e-12)
    assert weights["structure"] == pytest.approx(math.tanh(0.625), abs=1e-15)


def test_infer_weights_edges():
    assert infer_weights([]) == {n: 0.0 for n, o in OBJECTIVES.items() if not o.learned}
    # swapping chosen and rejected flips the sign
    short = Comparison(prompt="p", chosen="Nine minutes.", rejected="It depends on a great many things.")
    long = Comparison(prompt="p", chosen=short.rejected, rejected=short.chosen)
    assert infer_weights([short])["verbosity"] == pytest.approx(-infer_weights([long])["verbosity"])
    assert infer_weights([short])["verbosity"] < 0
    # opposite pairs of equal weight cancel; weights are bounded by tanh
    assert infer_weights([short, long])["verbosity"] == pytest.approx(0.0, abs=1e-12)
    huge = Comparison(prompt="p", chosen=" ".join(["w"] * 5000), rejected="w")
    assert 0.99 < infer_weights([huge])["verbosity"] <= 1.0


# --- decoding --------------------------------------------------------------------------------


def test_eos_shift_adds_exactly_to_eos_columns_only():
    scores = torch.arange(12, dtype=torch.float32).view(2, 6)  # (batch=2, vocab=6)
    before = scores.clone()
    out = eos_shift(scores, [2, 5], 1.5)
    expected = torch.tensor([[0.0, 1.0, 3.5, 3.0, 4.0, 6.5], [6.0, 7.0, 9.5, 9.0, 10.0, 12.5]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(scores, before, rtol=0, atol=0)  # input untouched: a new tensor
    torch.testing.assert_close(eos_shift(scores, [2, 5], 0.0), scores, rtol=0, atol=0)


def test_eos_shift_per_row():
    scores = torch.zeros(2, 4)
    out = eos_shift(scores, [3], torch.tensor([1.0, -2.0]))  # one shift per row
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -2.0]]), rtol=0, atol=0
    )


def test_verbosity_processor_shift():
    """shift = -strength * weight: weight 0.5 at the default strength 4 lowers EOS by 2."""
    processor = VerbosityProcessor([1, 3], weight=0.5)
    scores = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    out = processor(torch.zeros(3, 2, dtype=torch.long), scores)
    expected = scores.clone()
    expected[:, [1, 3]] -= 0.5 * DEFAULT_VERBOSITY_STRENGTH
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out[:, [0, 2, 4]], scores[:, [0, 2, 4]], rtol=0, atol=0)
    shorter = VerbosityProcessor([1], weight=-1.0, strength=2.0)(torch.zeros(3, 2, dtype=torch.long), scores)
    torch.testing.assert_close(shorter[:, 1], scores[:, 1] + 2.0)
    with pytest.raises(ValidationError, match="eos_ids"):
        VerbosityProcessor([], weight=1.0)


def test_eos_token_ids():
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert eos_token_ids(tokenizer) == [7]
    assert eos_token_ids(tokenizer, SimpleNamespace(eos_token_id=[9, 7])) == [7, 9]
    assert eos_token_ids(tokenizer, SimpleNamespace(eos_token_id=3)) == [3, 7]
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=None)) == []


def test_zero_weight_builds_no_processor():
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert len(steering_processors({}, tokenizer)) == 0
    assert len(steering_processors({"verbosity": 0.0}, tokenizer)) == 0
    assert len(steering_processors([{}, {"verbosity": 0.0}], tokenizer)) == 0
    [processor] = steering_processors({"verbosity": 0.25}, tokenizer, SimpleNamespace(eos_token_id=[7, 8]))
    assert isinstance(processor, VerbosityProcessor)
    assert processor.eos_ids == [7, 8] and processor.shift == -0.25 * DEFAULT_VERBOSITY_STRENGTH


def test_validate_steer_accepts():
    assert validate_steer(None) == {}
    assert validate_steer({}) == {}
    clean = validate_steer({"verbosity": -1})
    assert clean == {"verbosity": -1.0} and isinstance(clean["verbosity"], float)
    assert validate_steer({"verbosity": MAX_WEIGHT}) == {"verbosity": MAX_WEIGHT}


@pytest.mark.parametrize(
    ("steer", "field", "words"),
    [
        ({"humour": 1.0}, "steer.humour", "is not a known objective"),
        ({"verbosity": math.nan}, "steer.verbosity", "finite number"),
        ({"verbosity": -math.inf}, "steer.verbosity", "finite number"),
        ({"verbosity": True}, "steer.verbosity", "finite number"),
        ({"verbosity": "1"}, "steer.verbosity", "finite number"),
        ({"verbosity": None}, "steer.verbosity", "finite number"),
        ({"verbosity": MAX_WEIGHT + 0.5}, "steer.verbosity", "within"),
        ([("verbosity", 1.0)], "steer", "must be a mapping"),
    ],
)
def test_validate_steer_errors(steer, field, words):
    with pytest.raises(ValidationError) as info:
        validate_steer(steer)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field and words in err.problem and "Fix: " in str(err)


def test_unknown_objective_lists_allowed_names():
    with pytest.raises(ValidationError) as info:
        validate_steer({"humour": 1.0}, field="body.steer")
    assert info.value.field == "body.steer.humour"
    assert all(name in info.value.fix for name in STEERABLE)


def test_measurable_objectives_golden_values():
    """Hand-computed values of the measurable objectives on fixed texts."""
    from personalign.steering.objectives import formality, politeness, reading_level, score, sentiment

    # 2 sentences, 6 words, syllables 1+1+1 + 1+1+2 = 7: 0.39 * 3 + 11.8 * 7/6 - 15.59
    assert reading_level("The cat sat. The dog barked.") == pytest.approx(0.39 * 3 + 11.8 * 7 / 6 - 15.59)
    assert reading_level("") == 0.0
    # "Furthermore" formal (+1); "don't" contraction and "!" informal (-2); 6 words -> 100 * (1 - 2) / 6
    assert formality("Furthermore, we don't stop here now!") == pytest.approx(100 * (1 - 2) / 7)
    assert sentiment("A great and fun day. A bad one.") == pytest.approx((2 - 1) / 2)
    assert politeness("Thanks! I hope this helps.") == pytest.approx(2 / 2)
    scored = score("q", "Please read it. Thank you.")
    assert set(scored) == set(OBJECTIVES) and scored["politeness"] == pytest.approx(1.0)
    assert set(score("q", "x", ["verbosity"])) == {"verbosity"}


def test_objective_registry_errors_list_the_known_objectives():
    from personalign.errors import ValidationError
    from personalign.steering.decoding import validate_steer
    from personalign.steering.objectives import Objective, register, score

    with pytest.raises(ValidationError) as err:
        score("q", "a", ["humour"])
    assert "verbosity" in err.value.fix
    assert validate_steer({"formality": 0.5}) == {"formality": 0.5}  # auto: the prompting baseline steers it
    with pytest.raises(ValidationError) as err:
        validate_steer({"weights": {"formality": 0.5}, "method": "logit"})
    assert "cannot be steered by method 'logit'" in str(err.value) and "formality" in err.value.fix
    with pytest.raises(ValidationError) as err:
        validate_steer({"humour": 0.5})
    assert "not a known objective" in str(err.value)
    with pytest.raises(ValidationError):
        register(Objective("verbosity", len, 1.0, "dup"))
    with pytest.raises(ValidationError):
        register(Objective("Bad Name", len, 1.0, "x"))
    custom = register(
        Objective("exclamations", lambda t: float(t.count("!")), 1.0, "'!' count"), replace=True
    )
    try:
        assert score("q", "Wow! Yes!", ["exclamations"]) == {"exclamations": 2.0}
        with pytest.raises(ValidationError) as err:
            validate_steer({"exclamations": 0.5})  # measured, but no method steers it
        assert "no decode-time steering method" in str(err.value) and err.value.field == "steer.exclamations"
    finally:
        OBJECTIVES.pop(custom.name)
