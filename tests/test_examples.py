"""Every example runs: each is executed in a subprocess on the tiny model with a few new tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_end_to_end(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, str(EXAMPLES / "quickstart.py"), "--model", str(tiny_model_dir), "--device", "cpu"]
    cmd += ["--store", str(store), "--max-new-tokens", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for marker in (
        "== enroll and remember",
        "ana: 3 comparisons",
        "ben: 3 comparisons",
        "== chat",
        "--- generic (user=None)",
        "memories: ['I am vegetarian and I cook for two.']",
        "steer:    {'verbosity': 1.0}",
        "== stream (ben)",
        "== profile (ana)",
        "forget: {'memories_deleted': 1, 'profile_deleted': True}",
        "ben's memories after forget: []",
        "ana's memories are untouched: ['I am vegetarian and I cook for two.']",
        "profile('ben') raises UnknownUserError",
        "users now: ['ana']",
        "done in",
    ):
        assert marker in out, f"{marker!r} missing from:\n{out}"
    # Opposite comparisons give opposite inferred verbosity weights.
    assert "inferred weights {'verbosity': -1.0" in out and "inferred weights {'verbosity': 1.0" in out
    # A store passed with --store is kept; forget removed ben's folder from it.
    assert (store / "users" / "ana" / "profile.json").is_file()
    assert not (store / "users" / "ben").exists()


def test_adapters_example_runs(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "adapters.py"
    out = subprocess.run(
        [
            sys.executable,
            str(example),
            "--model",
            str(tiny_model_dir),
            "--store",
            str(tmp_path / "s"),
            "--epochs",
            "1",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "enrolled terse" in out.stdout and "enrolled thorough" in out.stdout
    assert "[terse]" in out.stdout and "[thorough]" in out.stdout and "[generic]" in out.stdout
    assert (
        "enrolled newcomer through the bank: weights (terse, thorough) = (" in out.stdout
        and "[newcomer]" in out.stdout
    )


def test_enrollment_example_runs(tiny_model_dir, tmp_path):
    cmd = [
        sys.executable,
        str(EXAMPLES / "enrollment.py"),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--store",
        str(tmp_path / "store"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for marker in (
        "embedder: pal",
        "== cold start",
        "stored state: method=pal n_comparisons=3",
        "p(kim prefers the short basil answer)",
        "== the next question for kim",
        "short-answer preference learned: yes",
    ):
        assert marker in out, f"{marker!r} missing from:\n{out}"


def test_steering_example_runs(tiny_model_dir, tmp_path):
    example = EXAMPLES / "steering.py"
    done = subprocess.run(
        [sys.executable, str(example), "--model", str(tiny_model_dir), "--train", "--max-new-tokens", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "trained a VAS verbosity head on 12 samples" in out
    assert "methods that steer verbosity here: ['logit', 'prompt', 'vas']" in out
    for marker in ("== vas", "== logit", "== prompt", "verbosity -1.0:", "verbosity +1.0:", "done in"):
        assert marker in out, f"{marker!r} missing from:\n{out}"


def test_generation_example_runs(tmp_path):
    from conftest import build_tiny_llama, build_tokenizer

    tokenizer = (
        build_tokenizer()
    )  # a longer context than the shared tiny model: FSPO prompts hold whole answers
    model_dir = tmp_path / "tiny-long"
    build_tiny_llama(
        len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, max_positions=2048
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    example = EXAMPLES / "generation.py"
    done = subprocess.run(
        [
            sys.executable,
            str(example),
            "--model",
            str(model_dir),
            "--shots",
            "1",
            "--tasks",
            "4",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    for marker in (
        "== trained FSPO on",
        "== enrolled synth-",
        "--- generic (hidden reward",
        "--- shots only (hidden reward",
        "--- FSPO adapter (hidden reward",
        "done in",
    ):
        assert marker in out, f"{marker!r} missing from:\n{out}"


def test_batched_cpu_example_runs(tiny_model_dir):
    example = EXAMPLES / "batched_cpu.py"
    done = subprocess.run(
        [
            sys.executable,
            str(example),
            "--model",
            str(tiny_model_dir),
            "--rows",
            "3",
            "--max-new-tokens",
            "6",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "packed layers: 15" in done.stdout  # 2 layers x 7 projections + the head
    assert "same tokens: True" in done.stdout and "packed / stock:" in done.stdout


def test_personal_rerank_example_runs(tiny_model_dir, tmp_path):
    example = EXAMPLES / "personal_rerank.py"
    cmd = [
        sys.executable,
        str(example),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "6",
        "--per-prompt",
        "3",
        "--rerank",
        "2",
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PERSONALIGN_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    assert "PAL fitted on 160 users' comparisons" in out and "--- generic" in out
    assert (
        out.count("picked candidate") == 2
        and out.count("hidden reward: this answer") == 2
        and "done in" in out
    )


def test_personal_lora_example_runs(tiny_model_dir, tmp_path):
    example = EXAMPLES / "personal_lora.py"
    cmd = [
        sys.executable,
        str(example),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "6",
        "--per-prompt",
        "3",
        "--pairs",
        "4",
        "--epochs",
        "1",
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PERSONALIGN_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    assert "4 comparisons + 4 amplified -> adapter trained on 8 pairs" in out and "--- generic" in out
    assert "hidden reward: adapter answer" in out and "done in" in out


def test_memory_lifecycle_example_runs(tiny_model_dir, tmp_path):
    example = EXAMPLES / "memory_lifecycle.py"
    done = subprocess.run(
        [
            sys.executable,
            str(example),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    for marker in (
        "add: [('ADD', 'active', 'I moved to Berlin last spring.'), ('DELETE', 'superseded', 'I live in Paris.')]",
        "add: [('NONE', 'active', 'I am vegetarian.')]",
        "v2 UPDATE source=python: I moved to Berlin last spring, to Kreuzberg.",
        "conflicts: [('My favourite colour is blue.',",
        "search: ['I moved to Berlin last spring, to Kreuzberg.'",
        "memories used: ['I moved to Berlin last spring, to Kreuzberg.']",
        "export: 5 memories, 7 versions",
        "forget: {'memories_deleted': 5, 'profile_deleted': True}",
        "done in",
    ):
        assert marker in out, f"{marker!r} missing from:\n{out}"
