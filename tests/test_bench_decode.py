"""`personalign bench decode`: a short real run (embedded models, llama.cpp) and its plot."""

from __future__ import annotations

import pytest


@pytest.mark.embedded
def test_a_short_decode_bench_measures_every_case(tmp_path):
    from personalign.bench.decode import format_decode_report, plot_decode, run_decode_bench

    result = run_decode_bench(batches=(1, 2), tokens=8, repeats=1, threads=1)
    cases = {(r["case"], r["batch"]) for r in result["rows"]}
    assert cases == {(c, b) for c in ("float32", "bfloat16", "llama.cpp Q4_1") for b in (1, 2)}
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["min"] <= row["tokens_per_s"] <= row["max"]
    sizes = {r["case"]: r["weight_gb"] for r in result["rows"]}
    assert sizes["float32"] == pytest.approx(2 * sizes["bfloat16"], rel=0.01)  # 4 bytes a parameter, 2
    assert sizes["llama.cpp Q4_1"] < sizes["bfloat16"]
    assert result["read_bandwidth_gb_s"] > 0.5
    assert "read bandwidth" in format_decode_report(result)
    png = plot_decode(result, tmp_path / "decode.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
