"""Population references for rating data (eval/reference.py): golden values on hand-made ratings."""

from __future__ import annotations

import pytest

from personalign.errors import ValidationError
from personalign.eval.reference import fit_only_agreement, leave_one_out_agreement

# u1 rates a < b < c; u2 b < a < c; u3 a < c < b
RATINGS = [
    ("u1", "a", 1.0), ("u1", "b", 2.0), ("u1", "c", 3.0),
    ("u2", "a", 2.0), ("u2", "b", 1.0), ("u2", "c", 3.0),
    ("u3", "a", 1.0), ("u3", "b", 3.0), ("u3", "c", 2.0),
]  # fmt: skip


def test_leave_one_out_golden():
    """Other annotators' means: u1 sees a 1.5, b 2, c 2.5 (3 of 3 agree); u2 sees a 1, b 2.5,
    c 2.5 (a-c agrees, a-b does not, b-c ties); u3 sees a 1.5, b 1.5, c 3 (a-c agrees, b-c does
    not, a-b ties). 9 pairs, 2 tied: 5 of 7 with ties dropped, (5 + 1) of 9 with ties half."""
    assert leave_one_out_agreement(RATINGS, ties="drop") == (pytest.approx(5 / 7), 7)
    assert leave_one_out_agreement(RATINGS, ties="half") == (pytest.approx(6 / 9), 9)


def test_fit_only_golden():
    """Two users; whichever is held out, the item means come from the other."""
    same = [
        ("u1", "a", 1.0),
        ("u1", "b", 2.0),
        ("u1", "c", 3.0),
        ("u2", "a", 1.0),
        ("u2", "b", 2.0),
        ("u2", "c", 3.0),
    ]
    assert fit_only_agreement(same, held_out=0.5, seed=0) == (
        1.0,
        3,
    )  # shrunk means 1.5, 2, 2.5 keep the order
    reverse = [
        ("u1", "a", 1.0),
        ("u1", "b", 2.0),
        ("u1", "c", 3.0),
        ("u2", "a", 3.0),
        ("u2", "b", 2.0),
        ("u2", "c", 1.0),
    ]
    for seed in range(3):
        assert fit_only_agreement(reverse, held_out=0.5, seed=seed, prior=0.0) == (0.0, 3)
    unseen = [
        ("u1", "a", 1.0),
        ("u1", "b", 2.0),
        ("u2", "c", 1.0),
        ("u2", "d", 2.0),
    ]  # no overlap: every mean is global
    assert fit_only_agreement(unseen, held_out=0.5, seed=0) == (0.5, 1)  # the one pair ties: half


def test_bad_input_is_refused():
    with pytest.raises(ValidationError, match="ties"):
        leave_one_out_agreement(RATINGS, ties="skip")
    with pytest.raises(ValidationError, match="held_out"):
        fit_only_agreement(RATINGS, held_out=1.5)
    with pytest.raises(ValidationError, match="no pair"):
        leave_one_out_agreement([("u1", "a", 1.0), ("u1", "b", 1.0)])


def test_popquorn_reference_recomputes_the_readme_figure():
    from personalign.eval.populations import data_root
    from personalign.eval.reference import popquorn_reference

    if not (data_root(None) / "popquorn" / "offensiveness" / "raw_data.csv").is_file():
        pytest.skip("POPQUORN is not beside this checkout (../shared/data or $PERSONALIGN_DATA)")
    result = popquorn_reference(seeds=1)
    assert result["leave_one_out"]["pairs"] == 167632  # the README: 167,632 pairs, 78.2%
    assert result["leave_one_out"]["ties_dropped"] == pytest.approx(0.782, abs=5e-4)
    assert result["fit_users_only"]["mean"] < result["leave_one_out"]["ties_dropped"]
