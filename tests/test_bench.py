"""``personalign bench memory`` at a tiny size: the report's shape, exact counts, per-user isolation.
Also ``bench serve``'s worker options (``--workers``, ``--profiles-url``, ``--chroma-url``): they reach
the batched server only, and the CLI refuses them where they cannot apply."""

from __future__ import annotations

import json
import math
import random

import pytest

from personalign.bench.memory import FACT_TEMPLATES, TARGET, format_report, run_memory_bench, synthetic_texts
from personalign.errors import ValidationError
from personalign.memory.chroma import MemoryStore

TINY = {"users": 3, "memories": 40, "background_per_user": 5, "queries": 5, "adds": 5, "batch_size": 16}
STAT_KEYS = {"n", "p50", "p95", "mean", "min", "max"}


@pytest.fixture(scope="module")
def bench(encoder, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("bench") / "store"
    return store_dir, run_memory_bench(store_dir, **TINY, encoder=encoder, progress=False)


def test_report_structure(bench):
    _, result = bench
    assert set(result) == {"config", "build", "counts", "latency_ms", "ratios", "checks", "machine"}
    assert set(result["latency_ms"]) == {"add", "encode_add", "search", "encode_search"}
    for name, stats in result["latency_ms"].items():
        assert set(stats) == STAT_KEYS, name
        assert stats["n"] == TINY["adds" if "add" in name else "queries"]
        assert 0 < stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]
    assert set(result["ratios"]) == {
        "add_p50",
        "add_p95",
        "search_p50",
        "search_p95",
        "add_paired_p50",
        "search_paired_p50",
    }
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    latency = result["latency_ms"]
    assert result["ratios"]["search_p50"] == pytest.approx(
        latency["search"]["p50"] / latency["encode_search"]["p50"]
    )
    assert result["build"]["memories"] == TINY["memories"] + (TINY["users"] - 1) * TINY["background_per_user"]
    assert result["machine"]["torch_threads"] >= 1 and result["machine"]["platform"]
    json.dumps(result)  # the CLI writes it as JSON


def test_target_has_exactly_its_memories_and_searches_stay_inside_it(bench, encoder):
    store_dir, result = bench
    counts, checks = result["counts"], result["checks"]
    assert counts["target_at_search"] == TINY["memories"]
    assert counts["target_after_adds"] == TINY["memories"] + TINY["adds"]
    assert counts["background_total"] == (TINY["users"] - 1) * TINY["background_per_user"]
    assert checks["search_results"] == TINY["queries"] * 5 and checks["empty_searches"] == 0
    assert checks["foreign_results"] == 0
    # Re-opened from disk: the same counts, every record belongs to its user, all texts distinct.
    store = MemoryStore(encoder, path=store_dir)
    target = store.get_all(TARGET)["results"]
    assert len(target) == TINY["memories"] + TINY["adds"]
    others = [r for i in range(1, TINY["users"]) for r in store.get_all(f"user-{i:04d}")["results"]]
    assert len(others) == counts["background_total"]
    assert {r["user_id"] for r in target} == {TARGET}
    texts = [r["memory"] for r in target + others]
    assert len(set(texts)) == len(texts)
    found = store.search(TARGET, "Where does my sister live?", top_k=5)["results"]
    assert {r["id"] for r in found} <= {r["id"] for r in target}


def test_format_report_has_the_ratio_lines(bench):
    _, result = bench
    report = format_report(result)
    assert f"{TINY['memories']:,} memories among {TINY['users']} users" in report
    assert (
        f"add / encode: p50 {result['ratios']['add_p50']:.2f}x, p95 {result['ratios']['add_p95']:.2f}x"
        in report
    )
    assert f"search / encode: p50 {result['ratios']['search_p50']:.2f}x" in report
    assert "p50/encode" in report and "0 from other users" in report
    header = report.splitlines()[1]
    assert all(len(line) == len(header) for line in report.splitlines()[2:6])  # the table is aligned


def test_synthetic_texts_are_distinct_and_seeded():
    first = synthetic_texts(random.Random(0), 500, FACT_TEMPLATES, set())
    assert len(set(first)) == 500
    assert first == synthetic_texts(random.Random(0), 500, FACT_TEMPLATES, set())
    seen = set(first)
    more = synthetic_texts(random.Random(0), 50, FACT_TEMPLATES, seen)
    assert not set(more) & set(first)


def test_rejects_a_used_store_dir_and_bad_sizes(encoder, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "file").write_text("x")
    with pytest.raises(ValidationError, match="store_dir"):
        run_memory_bench(tmp_path / "old", encoder=encoder, progress=False)
    with pytest.raises(ValidationError, match="memories"):
        run_memory_bench(tmp_path / "new", memories=0, encoder=encoder, progress=False)


# --- bench serve --workers N --profiles-url ... --chroma-url ... ------------------------------------


def test_bench_serve_gives_the_worker_options_to_the_batched_server_only(pz, monkeypatch):
    """The servers are this process's threads standing in for `personalign serve` subprocesses; what
    each subprocess would have been started with is recorded."""
    from contextlib import contextmanager

    from personalign.bench import serve

    started = []

    @contextmanager
    def fake_subprocess_server(store, max_batch, model, encoder, device, extra=()):
        started.append((store.name, max_batch, list(extra)))
        with serve.thread_server(pz, max_batch) as url:
            yield url

    monkeypatch.setattr(serve, "subprocess_server", fake_subprocess_server)
    profiles, chroma = "postgresql://me:secret@127.0.0.1/db", "http://127.0.0.1:8001"
    result = serve.run_serve_bench(
        levels=(1, 2), requests_per_client=1, max_tokens=2, max_batch=4, workers=2, profiles_url=profiles, chroma_url=chroma
    )  # fmt: skip
    options = ["--workers", "2", "--profiles-url", profiles, "--chroma-url", chroma]
    assert started == [("batched", 4, options), ("one_at_a_time", 1, [])]
    batched, baseline = result["servers"]["batched"], result["servers"]["one_at_a_time"]
    assert batched["workers"] == 2 and baseline["workers"] == 1
    assert all(lv["errors"] == 0 and lv["requests"] == 8 for s in (batched, baseline) for lv in s["levels"])
    assert all(math.isnan(lv["mean_batch_size"]) for lv in batched["levels"])  # one worker's stats only
    assert baseline["levels"][1]["mean_batch_size"] == 1.0
    assert "secret" not in json.dumps(result["config"])  # the password is masked in what is reported
    report = serve.format_report(result)
    assert "batched (4) x2" in report and "answers per worker of batched (x2" in report
    assert "batched server: serve --workers 2 --profiles-url postgresql://me:***@" in report


def test_bench_serve_worker_options_are_checked_before_any_server_starts(pz):
    from typer.testing import CliRunner

    from personalign.bench.serve import run_serve_bench, server_plan, worker_options
    from personalign.cli import app

    assert worker_options() == [] and worker_options(3) == ["--workers", "3"]
    assert server_plan(8) == [("batched", 8, 1, []), ("one_at_a_time", 1, 1, [])]
    with pytest.raises(ValidationError, match="--workers: needs a store .* --chroma-url is not given"):
        server_plan(8, 2, "sqlite:///p.db")
    with pytest.raises(ValidationError, match="personalizer: serves in this process"):
        run_serve_bench(personalizer=pz, profiles_url="sqlite:///p.db")
    out = CliRunner().invoke(
        app, ["bench", "serve", "--workers", "2", "--chroma-url", "http://127.0.0.1:8001"]
    )
    assert out.exit_code == 2 and "--workers: needs a store" in out.output and "--profiles-url" in out.output
    out = CliRunner().invoke(app, ["bench", "serve", "--engines", "--profiles-url", "sqlite:///p.db"])
    assert (
        out.exit_code == 2 and "--profiles-url: applies to the batched-vs-one-at-a-time bench" in out.output
    )
