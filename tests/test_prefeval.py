"""The PrefEval harness on tiny fixture files (same JSON layout as PrefEval) and the tiny model.

Nothing here reads the real data: every test writes its own ``prefeval/benchmark_dataset`` tree.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from personalign.errors import ValidationError
from personalign.eval.prefeval import (
    ACKNOWLEDGEMENT,
    PrefEvalConfig,
    PrefEvalItem,
    add_shift,
    condition_messages,
    format_prefeval,
    list_topics,
    load_filler,
    load_items,
    mean_logprob,
    memory_texts,
    option_scores,
    permutation,
    plot_prefeval,
    question_turn,
    run_prefeval,
    score_item,
    split_topics,
)

TOPICS = {
    "lifestyle_dietary": [
        ("I am vegan.", "Suggest a dinner.", ["Lentil curry.", "Beef stew.", "Roast chicken.", "Salmon."])
    ],
    "shop_fashion": [
        (
            "I only wear wool.",
            "Pick a scarf.",
            ["A wool scarf.", "A silk scarf.", "A nylon scarf.", "A cotton scarf."],
        )
    ],
    "travel_hotel": [
        (
            "I avoid nightlife.",
            "Pick a hotel.",
            ["A quiet spa.", "A party hotel.", "A casino.", "A club hotel."],
        ),
        (
            "I need a pool.",
            "Pick a hotel.",
            ["Hotel with pool.", "Hotel with bar.", "Hotel with gym.", "Hotel with golf."],
        ),
    ],
    "travel_restaurant": [
        (
            "I hate spicy food.",
            "Pick a restaurant.",
            ["A mild bistro.", "A chili house.", "A hot wings bar.", "A curry den."],
        )
    ],
}
FILLER = [
    {
        "conversation": [
            {"role": "user", "content": "Convert this code to Go."},
            {"role": "assistant", "content": "Here it is in Go."},
        ]
    },
    {
        "conversation": [
            {"role": "user", "content": "Write two tests."},
            {"role": "assistant", "content": "Two tests written."},
            {"role": "user", "content": "Explain ingress " + "very " * 400 + "slowly."},
            {"role": "assistant", "content": "An ingress routes traffic."},
        ]
    },
]


def write_prefeval(root: Path) -> Path:
    """A tiny PrefEval tree under ``root`` (explicit preferences, MCQ options, filler, a stray copy)."""
    base = root / "prefeval" / "benchmark_dataset"
    for folder in ("explicit_preference", "mcq_options"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for topic, items in TOPICS.items():
        explicit = [{"preference": p, "question": q, "explanation": "x"} for p, q, _ in items]
        mcq = [
            {
                "preference": p,
                "question": q,
                "explanation": "x",
                "violation_probability": 1.0,
                "classification_task_options": o,
            }
            for p, q, o in items
        ]
        (base / "explicit_preference" / f"{topic}.json").write_text(json.dumps(explicit))
        (base / "mcq_options" / f"{topic}.json").write_text(json.dumps(mcq))
    (base / "mcq_options" / "travel_hotel copy.json").write_text("[]")
    (base / "filtered_inter_turns.json").write_text(json.dumps(FILLER))
    return root


@pytest.fixture()
def data(tmp_path, monkeypatch) -> Path:
    root = write_prefeval(tmp_path / "data")
    monkeypatch.setenv("PERSONALIGN_DATA", str(root))
    return root


def test_travel_topics_are_the_test_split_and_never_dev(data):
    topics = list_topics()
    assert topics == sorted(TOPICS)  # the stray "travel_hotel copy" is skipped
    dev, test = split_topics(topics)
    assert test == ["travel_hotel", "travel_restaurant"] and dev == ["lifestyle_dietary", "shop_fashion"]
    assert not any(t.startswith("travel_") for t in dev)
    from personalign.eval.prefeval import _plan

    splits, plan = _plan(PrefEvalConfig(split="dev", dev_items=None))
    assert set(splits) == {"dev"} and {item.topic for _, item in plan} == {
        "lifestyle_dietary",
        "shop_fashion",
    }
    splits, plan = _plan(PrefEvalConfig(split="both", test_items=1, dev_items=1))
    assert {s: sorted({i.topic for p, i in plan if p == s}) for s in splits} == {
        "test": ["travel_hotel", "travel_restaurant"],
        "dev": ["lifestyle_dietary", "shop_fashion"],
    }


def test_option_shuffle_is_seeded_per_item_and_recorded(data):
    """Golden: default_rng([0, crc32("travel_hotel"), 1]).permutation(4) = [1, 3, 0, 2]; the
    aligned option (file index 0) is shown third, as C."""
    item = load_items("travel_hotel")[1]
    assert item.user == "prefeval-travel_hotel-1" and item.options[0] == "Hotel with pool."
    perm = permutation(item, seed=0)
    assert (
        perm
        == [1, 3, 0, 2]
        == np.random.default_rng([0, zlib.crc32(b"travel_hotel"), 1]).permutation(4).tolist()
    )
    assert permutation(item, seed=0) == perm and permutation(item, seed=1) != perm
    text = question_turn(item, perm)["content"]
    assert (
        text.startswith("Pick a hotel.\n\n")
        and "A. Hotel with bar.\nB. Hotel with golf.\nC. Hotel with pool.\nD. Hotel with gym.\n" in text
    )


def test_mean_logprob_golden():
    """Row 0: uniform over 3 -> log(1/3); row 1: logits (ln 2, 0, 0), target 0 -> log(2/4).
    Mean: (log(1/3) + log(1/2)) / 2 = -0.94856."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    value = mean_logprob(logits, torch.tensor([2, 0]))
    torch.testing.assert_close(value, torch.tensor((math.log(1 / 3) + math.log(1 / 2)) / 2))


def test_option_scores_equal_full_forward_passes(tiny_generator):
    """The cached, batched option scoring equals scoring prompt + option from scratch."""
    model = tiny_generator.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 300, (40,), generator=g).tolist()
    options = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    fast = option_scores(model, prompt, options)
    with torch.inference_mode():
        full = [
            float(
                mean_logprob(
                    model(input_ids=torch.tensor([prompt + o])).logits[0, len(prompt) - 1 : -1],
                    torch.tensor(o),
                )
            )
            for o in options
        ]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(full), atol=1e-5, rtol=1e-5)


def test_conditions_build_the_documented_conversations(data):
    item = load_items("travel_hotel")[0]
    filler = load_filler(2)
    perm = permutation(item, 0)
    question = question_turn(item, perm)
    assert condition_messages("none", item, perm, filler) == [question]
    assert condition_messages("memory", item, perm, filler) == [question]
    assert condition_messages("oracle", item, perm, filler) == [
        {"role": "user", "content": "I avoid nightlife."},
        {"role": "assistant", "content": ACKNOWLEDGEMENT},
        question,
    ]
    long = condition_messages("no-memory", item, perm, filler)
    assert (
        long[:2] == condition_messages("oracle", item, perm, filler)[:2]
        and long[2:-1] == filler
        and long[-1] == question
    )
    assert memory_texts(item, filler) == [
        "I avoid nightlife.",
        "Convert this code to Go.",
        "Write two tests.",
    ]
    assert (
        memory_texts(item, filler, "exchange")[1]
        == "User: Convert this code to Go.\nAssistant: Here it is in Go."
    )
    with pytest.raises(ValidationError, match="filler_turns"):
        load_filler(4)


def test_choice_is_the_best_score_and_shift_is_the_gain_over_none():
    perm = [2, 0, 3, 1]  # the aligned option (file index 0) is shown second
    none = {"condition": "none", "permutation": perm, "scores": [-1.0, -2.0, -3.0, -4.0]}
    oracle = {"condition": "oracle", "permutation": perm, "scores": [-0.9, -1.5, -3.0, -4.0]}
    add_shift([none, oracle])
    # Raw choice: position 0 (file index 2, wrong); the largest gain is position 1 (+0.5, aligned).
    assert (
        int(np.argmax(oracle["scores"])) == 0
        and oracle["shift_correct"] is True
        and "shift_correct" not in none
    )


def test_memory_condition_never_sees_another_items_memories(pz, data):
    items = load_items("travel_hotel")
    filler = load_filler(1)
    config = PrefEvalConfig(n_memories=100, memory_threshold=None)
    for item in items:
        pz.remember(item.user, memory_texts(item, filler))
    for item in items:
        record = score_item(pz, item, "memory", filler, config)
        own = memory_texts(item, filler)
        # Every memory of this item and nothing else (an unknown memory would be index -1).
        assert sorted(record["retrieved"]) == list(range(len(own))) and record["preference_retrieved"]
        other = next(o for o in items if o is not item)
        found = pz.search_memories(item.user, other.preference, top_k=50)["results"]
        assert other.preference not in {r["memory"] for r in found}


def test_too_long_a_history_is_refused_before_scoring(pz, data):
    with pytest.raises(ValidationError, match="filler_turns"):
        run_prefeval(PrefEvalConfig(split="test", filler_turns=3, test_items=1), pz)


def test_run_writes_results_per_split_condition_and_topic(pz, data, tmp_path):
    config = PrefEvalConfig(split="both", filler_turns=2, test_items=None, dev_items=1)
    result = run_prefeval(config, pz)
    assert {r["split"] for r in result["records"]} == {"test", "dev"}
    assert len(result["records"]) == 5 * 4  # 3 test + 2 dev items, 4 conditions
    for r in result["records"]:
        assert r["correct"] == (r["permutation"][r["choice"]] == 0) and r["choice"] == int(
            np.argmax(r["scores"])
        )
        assert r["aligned_position"] == r["permutation"].index(0)
    overall = {(r["split"], r["condition"]): r for r in result["summary"] if r["topic"] == "all"}
    assert overall[("test", "memory")]["n"] == 3 and overall[("dev", "oracle")]["n"] == 2
    assert (
        "shift_accuracy" in overall[("test", "oracle")] and "shift_accuracy" not in overall[("test", "none")]
    )
    assert {(d["a"], d["b"]) for d in result["differences"]} >= {
        ("memory", "no-memory"),
        ("oracle", "no-memory"),
    }
    json.dumps(result)  # JSON-ready
    assert "test (2 topics, 3 items)" in format_prefeval(result)
    assert plot_prefeval(result, tmp_path / "p.png").stat().st_size > 1000
    assert not any(
        isinstance(v, str) and "nightlife" in v for r in result["records"] for v in r.values()
    )  # no data text in the result


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="conditions"):
        PrefEvalConfig(conditions=["none", "telepathy"])
    with pytest.raises(ValidationError, match="split"):
        PrefEvalConfig(split="train")
    with pytest.raises(ValidationError, match="memory_unit"):
        PrefEvalConfig(memory_unit="sentence")


def test_cli_prefeval(tiny_model_dir, data, tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    out = tmp_path / "r.json"
    args = [
        "eval",
        "prefeval",
        "--model",
        str(tiny_model_dir),
        "--data-root",
        str(data),
        "--split",
        "test",
        "--filler-turns",
        "1",
        "--test-items",
        "1",
        "--conditions",
        "none,oracle",
    ]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["config"]["conditions"] == ["none", "oracle"] and len(saved["records"]) == 4
    bad = CliRunner().invoke(
        app, ["eval", "prefeval", "--conditions", "none,psychic", "--data-root", str(data)]
    )
    assert bad.exit_code == 2 and "conditions" in bad.output


def test_item_users_are_distinct():
    a = PrefEvalItem("travel_hotel", 1, "p", "q", ("a", "b", "c", "d"))
    b = PrefEvalItem("travel_hotel", 2, "p", "q", ("a", "b", "c", "d"))
    assert a.user != b.user


def test_example_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """examples/prefeval_memory.py end to end, in this process (a subprocess would re-import torch)."""
    import runpy

    example = Path(__file__).resolve().parents[1] / "examples" / "prefeval_memory.py"
    monkeypatch.setattr(
        "sys.argv",
        [str(example), "--model", str(tiny_model_dir), "--store", str(tmp_path / "s"), "--filler-turns", "0"],
    )
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    for marker in (
        "remembered 1 user turn(s) for prefeval-example-0",
        "none      (",
        "no-memory (",
        "memory    (",
        "oracle    (",
        "memories retrieved: [",
        "done in",
    ):
        assert marker in out, f"{marker!r} missing from:\n{out}"
