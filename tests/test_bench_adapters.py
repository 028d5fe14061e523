"""The adapter benchmark runs end to end on the tiny model and reports every figure."""

from personalign.bench.adapters import format_report, run_adapter_bench
from personalign.models import load_generator
from personalign.personalizer import Personalizer


def test_adapter_bench_reports_all_four_figures(tiny_model_dir, encoder, tmp_path):
    with Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, store=tmp_path / "s") as pz:
        result = run_adapter_bench(pz, max_new_tokens=4, repeats=1, resident_counts=(1, 3), epochs=1)
        assert len(pz.adapters.resident) <= pz.adapters.max_resident
    assert result["batch_8"]["eight_users_over_one_adapter"] > 0
    assert set(result["activation"]["by_resident"]) == {"1", "3"}
    assert result["activation"]["by_resident"]["3"]["resident"] == 3
    assert result["bytes_per_user"]["lora_rank8"] > 0 and result["enroll_16"]["with_adapter_s"] > 0
    report = format_report(result)
    assert "ratio 8 users / one adapter" in report and "N=3" in report and "bytes per user" in report
