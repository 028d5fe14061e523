"""Editing a user's comparisons: the inferred steering and state follow in the same write."""

from __future__ import annotations

import numpy as np
import pytest

from personalign.errors import ValidationError
from personalign.personalizer import Personalizer
from personalign.preference.service import STATE_KEY
from personalign.types import Comparison

SHORT = Comparison(
    prompt="How do I boil an egg?", chosen="Nine minutes.", rejected="Boiling an egg takes care. " * 12
)
LONG = Comparison(
    prompt="How do I boil an egg?", chosen="Boiling an egg takes care. " * 12, rejected="Nine minutes."
)


@pytest.fixture()
def pz(tiny_generator, encoder, tmp_path):
    with Personalizer(tiny_generator, encoder, tmp_path / "store") as personalizer:
        yield personalizer


def test_edits_recompute_steering_and_state_atomically(pz):
    pz.enroll("ana", [SHORT, SHORT, SHORT])
    before = pz.profile("ana")
    assert before.settings["inferred_steer"]["verbosity"] < 0
    edited = pz.edit_comparisons("ana", replace={0: LONG, 1: LONG, 2: LONG})
    assert [c.chosen for c in edited.comparisons] == [LONG.chosen] * 3
    assert edited.settings["inferred_steer"]["verbosity"] > 0  # she now prefers long answers
    stored = np.asarray(edited.settings[STATE_KEY]["vector"])
    np.testing.assert_allclose(
        stored, pz.refresh_state("ana").vector, rtol=1e-5
    )  # the stored state is the re-inferred one
    assert not np.allclose(stored, before.settings[STATE_KEY]["vector"])
    after = pz.edit_comparisons("ana", remove=[0, 1])
    assert len(after.comparisons) == 1


def test_bad_edits_change_nothing(pz):
    pz.enroll("ana", [SHORT, LONG])
    before = pz.profile("ana").model_dump(mode="json")
    for kwargs, field in (
        ({"remove": [5]}, "remove"),
        ({"replace": {-1: SHORT}}, "replace"),
        ({"replace": {0: {"prompt": "q", "chosen": " ", "rejected": "b"}}}, "replace"),
        ({"remove": [0], "replace": {0: SHORT}}, "replace"),
        ({}, "remove"),
    ):
        with pytest.raises(ValidationError) as err:
            pz.edit_comparisons("ana", **kwargs)
        assert err.value.field.startswith(field), (kwargs, err.value)
    assert pz.profile("ana").model_dump(mode="json") == before
