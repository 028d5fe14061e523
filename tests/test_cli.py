"""The CLI on the tiny model: enroll from JSONL, chat, remember, profile, forget, and typed errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from personalign.cli import app
from personalign.cli.core import parse_steer
from personalign.errors import ValidationError

runner = CliRunner()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {
        "user": "ana",
        "prompt": "How do I boil an egg?",
        "chosen": "Nine minutes.",
        "rejected": "It takes a long explanation of many steps.",
    },
    {
        "user": "ana",
        "prompt": "Why is the sky blue?",
        "chosen": "Scattering.",
        "rejected": "Because of a long and detailed reason.",
    },
]


def test_enroll_chat_profile_forget(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    data = _write(tmp_path / "c.jsonl", ROWS)
    common = ["--store", str(store)]
    out = runner.invoke(app, ["enroll", "--file", str(data), "--model", str(tiny_model_dir), *common])
    assert out.exit_code == 0, out.output
    assert "ana: +2 comparisons (2 stored)" in out.output

    out = runner.invoke(app, ["remember", "--user", "ana", "I am vegetarian.", *common])
    assert out.exit_code == 0, out.output

    out = runner.invoke(
        app,
        [
            "chat",
            "--user",
            "ana",
            "--message",
            "Plan dinner",
            "--max-new-tokens",
            "4",
            "--model",
            str(tiny_model_dir),
            *common,
        ],
    )
    assert out.exit_code == 0, out.output

    out = runner.invoke(app, ["profile", "--user", "ana", *common])
    profile = json.loads(out.output)
    assert len(profile["comparisons"]) == 2 and profile["settings"]["inferred_steer"]["verbosity"] < 0

    out = runner.invoke(app, ["forget", "--user", "ana", *common])
    assert out.exit_code == 0 and "1 memories deleted, profile deleted" in out.output
    out = runner.invoke(app, ["profile", "--user", "ana", *common])
    assert out.exit_code == 1 and "not enrolled" in out.output


def test_interactive_chat_reads_until_empty_line(tiny_model_dir, tmp_path):
    out = runner.invoke(
        app,
        ["chat", "--max-new-tokens", "3", "--model", str(tiny_model_dir), "--store", str(tmp_path / "s")],
        input="hello\nagain\n\n",
    )
    assert out.exit_code == 0, out.output
    assert out.output.count("bot> ") == 2


def test_enroll_rejects_mixed_users_and_stores_nothing(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    data = _write(tmp_path / "c.jsonl", [*ROWS, {**ROWS[0], "user": "bob"}])
    out = runner.invoke(
        app,
        [
            "enroll",
            "--user",
            "ana",
            "--file",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--store",
            str(store),
        ],
    )
    assert out.exit_code == 1
    assert "c.jsonl:3.user" in out.output and "Fix:" in out.output
    assert not (store / "users" / "ana").exists()


def test_bad_row_is_reported_with_its_line(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "c.jsonl", [ROWS[0], {**ROWS[1], "chosen": "   "}])
    out = runner.invoke(
        app, ["enroll", "--file", str(data), "--model", str(tiny_model_dir), "--store", str(tmp_path / "s")]
    )
    assert out.exit_code == 1 and "c.jsonl:2.chosen" in out.output


def test_parse_steer():
    assert parse_steer("verbosity=-0.5, structure=1") == {"verbosity": -0.5, "structure": 1.0}
    assert parse_steer(None) is None
    with pytest.raises(ValidationError, match="--steer"):
        parse_steer("verbosity")
    with pytest.raises(ValidationError, match="--steer"):
        parse_steer("verbosity=lots")


def test_chat_with_unknown_steer_objective_fails_cleanly(tiny_model_dir, tmp_path):
    out = runner.invoke(
        app,
        [
            "chat",
            "--message",
            "hi",
            "--steer",
            "charm=1",
            "--model",
            str(tiny_model_dir),
            "--store",
            str(tmp_path / "s"),
        ],
    )
    assert out.exit_code == 2 and "steer.charm" in out.output and "verbosity" in out.output


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = runner.invoke(
        app,
        ["demo", "--model", str(tiny_model_dir), "--max-new-tokens", "16", "--store", str(tmp_path / "s")],
    )
    # A random model's lengths say nothing, so the verdict may be either; the pipeline must run.
    assert out.exit_code in (0, 1), out.output
    assert "enrolled sam: 8 comparisons" in out.output and "enrolled robin: 8 comparisons" in out.output
    assert out.output.count("=== ") == 3 and "their comparisons point the same way" in out.output
    reranked = runner.invoke(
        app,
        ["demo", "--model", str(tiny_model_dir), "--max-new-tokens", "16", "--rerank", "2", "--width", "120"],
    )
    assert reranked.exit_code in (0, 1), reranked.output
    assert (
        reranked.output.count("user-rerank: candidate ") == 6
    )  # two users x three questions; generic is plain


def test_demo_says_which_guidance_ran():
    from personalign.cli.demo import _guidance_text

    assert _guidance_text(None) == ""
    assert _guidance_text({"method": "user-vas", "strength": 3.0, "weights": [0.5, 0.25]}) == (
        ", user-vas 3 (mixture 0.50/0.25)"
    )
    assert _guidance_text(
        {"method": "user-rerank", "candidates": 4, "picked": 1, "scores": [0, 1, 0, 0]}
    ) == (", user-rerank: candidate 2 of 4")
    assert _guidance_text({"method": None, "requested": "user-rerank", "reason": "no user"}) == ""


def test_demo_measurement_verdict(capsys):
    from personalign.cli.demo import _print_measurement

    preference = {"sam": (13.0, 107.0), "robin": (107.0, 13.0)}
    assert _print_measurement(
        ["sam", "robin"], preference, {"sam": [30, 40], "robin": [130, 120], "generic": [125, 135]}
    )
    assert "sam's answers are 0.28x the length of robin's" in capsys.readouterr().out
    assert not _print_measurement(
        ["sam", "robin"], preference, {"sam": [130, 140], "robin": [30, 20], "generic": [125, 135]}
    )
    assert "NO" in capsys.readouterr().out


def test_version():
    from personalign import __version__

    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"personalign {__version__}"


def test_a_missing_extra_is_named(capsys):
    """Without the [lab], [serve] or [postgres] extras a command says which extra to install, not a traceback."""
    import typer

    from personalign.cli._common import failing

    def needs(module):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    named = [("matplotlib.pyplot", "lab"), ("fastapi", "serve"), ("sqlalchemy.engine", "serve")]
    named += [("huey", "serve"), ("psycopg", "postgres")]
    for module, extra in named:
        with pytest.raises(typer.Exit) as exited, failing():
            needs(module)
        assert (
            exited.value.exit_code == 1 and f"pip install 'personalign[{extra}]'" in capsys.readouterr().err
        )
    with pytest.raises(ModuleNotFoundError), failing():  # not an extra's module: a real bug, re-raised
        needs("no_such_module")
