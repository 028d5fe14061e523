"""The POPQUORN email-rewriting harness on a tiny fixture CSV (same columns) and the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from personalign.errors import ValidationError
from personalign.eval.rewrite import (
    RewriteConfig,
    format_rewrite,
    heldout_users,
    history_comparisons,
    history_memories,
    lcs_length,
    load_email_rewrites,
    plot_rewrite,
    rouge_l_f1,
    run_rewrite,
    split_texts,
    target_user,
    targets_of,
)
from personalign.eval.stats import bootstrap_mean_ci, win_rate

COLUMNS = [
    "instance_id",
    "user_id",
    "original email",
    "revised email",
    "gender",
    "race",
    "age",
    "occupation",
    "education",
]


def write_popquorn(root: Path, users: int = 10, emails: int = 4) -> Path:
    """``users`` annotators (ids "0.0", "1.0", ...) with ``emails`` rewrites each, plus two unattributed rows."""
    folder = root / "popquorn" / "email_rewriting"
    folder.mkdir(parents=True)
    with (folder / "raw_data.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerow(
            {
                "instance_id": "900",
                "user_id": "",
                "original email": "send it now",
                "revised email": "Could you send it?",
            }
        )
        for u in range(users):
            for e in range(emails):
                writer.writerow(
                    {
                        "instance_id": str(100 * u + e),
                        "user_id": f"{u}.0",
                        "original email": f"give me report {e} now",
                        "revised email": f"Dear team, could you kindly send report {e}? Thanks, user {u}",
                        "gender": "x",
                    }
                )
        writer.writerow(
            {"instance_id": "901", "user_id": "", "original email": "stop", "revised email": "Please stop."}
        )
    return root


@pytest.fixture()
def data(tmp_path, monkeypatch) -> Path:
    root = write_popquorn(tmp_path / "data")
    monkeypatch.setenv("PERSONALIGN_DATA", str(root))
    return root


def test_rouge_l_golden_values():
    """rouge_score's README example: target "The quick brown fox jumps over the lazy dog" (9
    tokens), prediction "The quick brown dog jumps on the log." (8 tokens). LCS = "the quick
    brown jumps the" = 5, so P = 5/8, R = 5/9, F1 = 2PR/(P+R) = 10/17."""
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook CLRS example
    assert rouge_l_f1(
        "The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"
    ) == pytest.approx(10 / 17)
    assert rouge_l_f1("Hello, World!", "hello world") == 1.0  # case and punctuation do not count
    assert rouge_l_f1("", "hello") == 0.0 and rouge_l_f1("abc", "xyz") == 0.0


def test_bootstrap_and_win_rate_golden_values():
    assert bootstrap_mean_ci([0.3] * 7) == pytest.approx((0.3, 0.3))
    low, high = bootstrap_mean_ci([0.0, 1.0] * 50, seed=0)
    assert low < 0.5 < high and high - low == pytest.approx(
        2 * 1.96 * 0.05, abs=0.03
    )  # normal approx: sd/sqrt(n) = 0.05
    assert bootstrap_mean_ci([0.0, 1.0] * 50, seed=0) == (low, high)  # seeded
    # Clustered by group: two groups of identical values -> the interval spans both group means.
    clustered = bootstrap_mean_ci([0.0] * 10 + [1.0] * 10, groups=["a"] * 10 + ["b"] * 10)
    assert clustered == pytest.approx((0.0, 1.0))
    assert win_rate([1, 2, 3], [0, 2, 4]) == (1.5, 3)


def test_heldout_users_are_a_seeded_fifth_of_the_attributed_users(data):
    emails = load_email_rewrites()
    assert sorted(emails, key=float) == [f"{u}.0" for u in range(10)]  # the unattributed rows are dropped
    # Golden: default_rng(0).permutation(10) = [4, 6, 2, ...]; 20% of 10 = 2 users.
    assert heldout_users(list(emails), 0.2, seed=0) == ["4.0", "6.0"]
    assert heldout_users(list(emails), 0.2, seed=0) == heldout_users(
        list(reversed(list(emails))), 0.2, seed=0
    )


def test_a_targets_history_holds_the_users_other_emails_only(data):
    pairs = load_email_rewrites()["3.0"]
    targets = targets_of(pairs, 2, seed=0)
    assert len(targets) == 2 and targets == sorted(targets) and targets_of(pairs, 2, seed=0) == targets
    for t in targets:
        history = history_comparisons(pairs, t)
        assert len(history) == len(pairs) - 1 and pairs[t].revised not in {c.chosen for c in history}
        assert all(c.rejected in {p.original for p in pairs} for c in history)
        assert pairs[t].revised not in "".join(history_memories(pairs, t))
    assert target_user(pairs[0], 0) == "rewrite-3_0-0"


def test_run_scores_each_arm_and_no_target_sees_its_own_rewrite(pz, data, tmp_path):
    config = RewriteConfig(
        split="test",
        arms=["generic", "fspo-prompt", "memory"],
        k=2,
        n_shots=3,
        max_new_tokens=6,
        batch_size=3,
    )
    result = run_rewrite(config, pz)
    assert result["users"] == ["4.0", "6.0"] and len(result["records"]) == 4
    emails = load_email_rewrites()
    for row in result["records"]:
        pairs = emails[row["user_id"]]
        t = next(i for i, p in enumerate(pairs) if p.instance_id == row["instance_id"])
        stored = pz.profile(target_user(pairs[t], t)).comparisons
        assert pairs[t].revised not in {c.chosen for c in stored}
        assert pairs[t].revised not in {m["memory"] for m in pz.memories(target_user(pairs[t], t))["results"]}
        assert (
            row["generic"]["shots"] == 0
            and 1 <= row["fspo-prompt"]["shots"] <= 3
            and row["memory"]["memories"] >= 1
        )
        for arm in config.arms:
            assert 0.0 <= row[arm]["rouge_l"] <= 1.0 and -1.0 <= row[arm]["cosine"] <= 1.0001
    summary = result["summary"]
    assert set(summary["vs_generic"]) == {"fspo-prompt", "memory"}
    # The unrewritten email as the output: "give me report 1 now" (5 tokens) vs "Dear team, could
    # you kindly send report 1? Thanks, user 4" (11 tokens) share "report 1": P = 2/5, R = 2/11,
    # F1 = 2PR / (P + R) = 1/4, for every target here.
    assert result["records"][0]["copy"]["rouge_l"] == pytest.approx(0.25) and summary["copy"]["rouge_l"][
        "mean"
    ] == pytest.approx(0.25)
    diff = summary["vs_generic"]["fspo-prompt"]["rouge_l"]
    expected = np.mean([r["fspo-prompt"]["rouge_l"] - r["generic"]["rouge_l"] for r in result["records"]])
    assert (
        diff["difference"] == pytest.approx(expected)
        and diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1]
    )
    clean, texts = split_texts(result)
    assert "texts" not in clean and len(texts) == 4 and json.dumps(clean)
    assert "report" not in json.dumps(clean)  # scores and ids only: no email text in the result
    assert "fspo-prompt - generic, rouge_l" in format_rewrite(clean)
    assert plot_rewrite(clean, tmp_path / "r.png").stat().st_size > 1000


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="arms"):
        RewriteConfig(arms=["fspo-prompt"])  # generic is the baseline: always there
    with pytest.raises(ValidationError, match="split"):
        RewriteConfig(split="train")
    with pytest.raises(ValidationError, match="k"):
        RewriteConfig(k=0)


def test_cli_rewrite(tiny_model_dir, data, tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    out, texts = tmp_path / "r.json", tmp_path / "texts.jsonl"
    args = [
        "eval",
        "rewrite",
        "--model",
        str(tiny_model_dir),
        "--data-root",
        str(data),
        "--split",
        "dev",
        "--users",
        "2",
        "--k",
        "1",
        "--max-new-tokens",
        "4",
    ]
    result = CliRunner().invoke(
        app, [*args, "--json", str(out), "--texts", str(texts), "--plot", str(tmp_path / "p.png")]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert (
        saved["users"] == ["0.0", "1.0"] and "texts" not in saved and len(texts.read_text().splitlines()) == 2
    )
    bad = CliRunner().invoke(app, ["eval", "rewrite", "--arms", "fspo-prompt", "--data-root", str(data)])
    assert bad.exit_code == 2 and "arms" in bad.output
