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


def test_bench_users_are_cloned_through_any_profile_store(tmp_path):
    """The bench's copies of a user go through the profile store (JSON files or a database), and a
    profile's size is its JSON file's size whichever store holds it."""
    from personalign.adapters.store import ADAPTER_DIR
    from personalign.bench.adapters import _clone_adapter, _profile_bytes
    from personalign.memory.profiles import PROFILE_FILE, ProfileStore
    from personalign.memory.sql_profiles import SqlProfileStore
    from personalign.types import Comparison

    pair = Comparison(prompt="Eggs?", chosen="Nine minutes.", rejected="It depends.")
    json_store = ProfileStore(tmp_path / "json")
    sql_store = SqlProfileStore(f"sqlite:///{tmp_path / 'p.db'}", tmp_path / "sql")
    for profiles in (json_store, sql_store):
        profiles.update("bench-0", lambda p: p.model_copy(update={"comparisons": [pair]}))
        (profiles.user_dir("bench-0") / ADAPTER_DIR).mkdir(parents=True)
        (profiles.user_dir("bench-0") / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"weights")
        _clone_adapter(profiles, "bench-0", "bench-3")
        clone = profiles.get("bench-3")
        assert clone.user_id == "bench-3" and clone.comparisons == [pair]
        assert (
            profiles.user_dir("bench-3") / ADAPTER_DIR / "adapter_model.safetensors"
        ).read_bytes() == b"weights"
    sql_store.close()
    on_disk = (json_store.user_dir("bench-3") / PROFILE_FILE).stat().st_size
    assert _profile_bytes(json_store.get("bench-3")) == on_disk
