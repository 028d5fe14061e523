"""Per-user LoRA adapters on the tiny model: PEFT contract, training, batches, LRU, faults."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from personalign.adapters.lora import LoraTrainConfig, batch_logps, collate
from personalign.adapters.store import META_FILE, AdapterError
from personalign.models import load_generator
from personalign.personalizer import Personalizer

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))

SHORT = [
    {
        "prompt": f"Question number {i} about eggs?",
        "chosen": "Nine minutes.",
        "rejected": "It depends on many long and winding things.",
    }
    for i in range(6)
]
LONG = [{**c, "chosen": c["rejected"], "rejected": c["chosen"]} for c in SHORT]
FAST = {"epochs": 4, "rank": 4, "learning_rate": 5e-3, "seed": 0}
ASK = [{"role": "user", "content": "Question number 3 about eggs?"}]


@pytest.fixture()
def apz(tiny_model_dir, encoder, tmp_path):
    """A Personalizer with its own copy of the tiny model (adapters wrap the model in place)."""
    with Personalizer(
        load_generator(str(tiny_model_dir), device="cpu"), encoder, store=tmp_path / "store", max_resident=2
    ) as pz:
        yield pz


def _margin(pz, user, comparisons):
    """Mean (log pi(chosen) - log pi(rejected)) with the user's adapter on, minus the same with it off."""
    batch = collate(pz.generator.tokenizer, pz.profile(user).comparisons, 128)
    slot = pz.adapters.activate(user)
    peft = pz.adapters.peft
    peft.set_adapter(slot)
    with torch.no_grad():
        on = batch_logps(peft, batch)
        with peft.disable_adapter():
            off = batch_logps(peft, batch)
    return float(((on[0] - on[1]) - (off[0] - off[1])).mean())


def test_adapter_is_a_plain_peft_folder_with_metadata(apz):
    profile = apz.enroll("ana", SHORT, adapter=True, adapter_config=FAST)
    folder = apz.adapters.path("ana")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config.get("modules_to_save") and config["r"] == 4
    assert (folder / "adapter_model.safetensors").is_file()
    meta = json.loads((folder / META_FILE).read_text())
    assert (
        meta["base_model"] == apz.generator.model_id and meta["pairs"] == 6 and len(meta["data_hash"]) == 64
    )
    assert profile.settings["adapter"]["pairs"] == 6
    # The stored weights are the in-memory ones, bit for bit.
    stored = load_file(folder / "adapter_model.safetensors")
    name = apz.adapters.activate("ana")
    live = {k: v for k, v in apz.adapters.peft.state_dict().items() if f".{name}." in k}
    assert len(stored) == len(live) > 0
    for key, value in live.items():
        torch.testing.assert_close(stored[key.replace(f".{name}.", ".")], value, rtol=0, atol=0)


def test_training_moves_the_margin_toward_the_users_choices(apz):
    apz.enroll("ana", SHORT, adapter=True, adapter_config=FAST)
    apz.enroll("ben", LONG, adapter=True, adapter_config=FAST)
    assert _margin(apz, "ana", SHORT) > 0.5
    assert _margin(apz, "ben", LONG) > 0.5
    report = apz.adapters.metadata("ana")["report"]
    assert report["holdout_pairs"] == 1 and report["epochs_run"] >= 1


def test_training_is_deterministic(tiny_model_dir, encoder, tmp_path):
    weights = []
    for run in range(2):
        with Personalizer(
            load_generator(str(tiny_model_dir), device="cpu"), encoder, store=tmp_path / f"s{run}"
        ) as pz:
            pz.enroll("ana", SHORT, adapter=True, adapter_config=FAST)
            weights.append(load_file(pz.adapters.path("ana") / "adapter_model.safetensors"))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)


def test_disabled_adapter_equals_base_and_mixed_batch_equals_individual_runs(apz, tiny_generator):
    base_reply = apz.respond("ana" if False else None, ASK, max_new_tokens=10)
    apz.enroll("ana", SHORT, adapter=True, adapter_config=FAST)
    apz.enroll("ben", LONG, adapter=True, adapter_config=FAST)
    apz.enroll("cam", SHORT[:2])  # no adapter
    assert apz.respond(None, ASK, max_new_tokens=10) == base_reply  # wrapped model, adapters off == base
    requests = [
        {"user": "ana", "messages": ASK, "max_new_tokens": 10, "steer": {}, "shots": False, "memory": False},
        {"user": "ben", "messages": ASK, "max_new_tokens": 10, "steer": {}, "shots": False, "memory": False},
        {"user": None, "messages": ASK, "max_new_tokens": 10},
        {"user": "cam", "messages": ASK, "max_new_tokens": 6},
    ]
    batch = apz.respond_batch(requests)
    assert apz.chat_batch(requests) == [r.text for r in batch]
    for request, result in zip(requests, batch, strict=True):
        options = {k: v for k, v in request.items() if k not in ("user", "messages", "steer")}
        assert result == apz.respond(
            request["user"], request["messages"], steer=request.get("steer"), **options
        )
    without = apz.respond("ana", ASK, max_new_tokens=10, steer={}, shots=False, memory=False, adapter=False)
    assert without.text == apz.respond(None, ASK, max_new_tokens=10).text  # adapter=False is the base model


def test_lru_keeps_at_most_max_resident_and_hot_swaps_slots(apz):
    for user, pairs in (("ana", SHORT), ("ben", LONG), ("cam", SHORT[:3])):
        apz.enroll(user, pairs, adapter=True, adapter_config={**FAST, "epochs": 2})
    assert not apz.adapters.resident  # trained adapters wait on disk until a request needs them
    first = {u: apz.respond(u, ASK, max_new_tokens=5, steer={}, shots=False) for u in ("ana", "ben")}
    assert apz.adapters.resident_slots() == {"slot_0", "slot_1"}
    for user in ("cam", "ana", "ben", "cam", "ben"):
        apz.respond(user, ASK, max_new_tokens=5)
        assert len(apz.adapters.resident) <= 2 and apz.adapters.resident_slots() == {"slot_0", "slot_1"}
    # A refilled slot computes exactly what a fresh load of the same adapter does.
    for user in ("ana", "ben"):
        assert apz.respond(user, ASK, max_new_tokens=5, steer={}, shots=False) == first[user]


def test_failed_training_keeps_the_previous_adapter(apz, monkeypatch):
    apz.enroll("ana", SHORT, adapter=True, adapter_config=FAST)
    before = (apz.adapters.path("ana") / "adapter_model.safetensors").read_bytes()
    reply = apz.respond("ana", ASK, max_new_tokens=6)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr("personalign.adapters.store.train_adapter", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        apz.enroll("ana", LONG[:2], adapter=True, adapter_config=FAST)
    assert (apz.adapters.path("ana") / "adapter_model.safetensors").read_bytes() == before
    assert apz.respond("ana", ASK, max_new_tokens=6) == reply


def test_corrupt_or_foreign_adapters_give_typed_errors(apz):
    apz.enroll("ana", SHORT, adapter=True, adapter_config={**FAST, "epochs": 1})
    apz.enroll("ben", SHORT, adapter=True, adapter_config={**FAST, "epochs": 1})
    apz.adapters.unload("ana")
    apz.adapters.unload("ben")
    weights = apz.adapters.path("ana") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(AdapterError, match="cannot be loaded"):
        apz.respond("ana", ASK, max_new_tokens=3)
    meta_path = apz.adapters.path("ben") / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base_model": "some/other-model"}))
    with pytest.raises(AdapterError, match="some/other-model"):
        apz.respond("ben", ASK, max_new_tokens=3)
    assert apz.respond(None, ASK, max_new_tokens=3).completion_tokens >= 1  # the model still works


def test_forget_removes_and_unloads_the_adapter(apz):
    apz.enroll("ana", SHORT, adapter=True, adapter_config={**FAST, "epochs": 1})
    apz.forget("ana")
    apz.enroll("ben", SHORT, adapter=True, adapter_config={**FAST, "epochs": 1})
    slot = apz.adapters.activate("ben")
    apz.forget("ben")
    assert not apz.adapters.path("ana").exists() and not apz.adapters.resident
    assert (
        slot not in apz.adapters.resident_slots() and apz.adapters.peft is None
    )  # unwrapped back to the base model


def test_bad_adapter_config_is_a_validation_error(apz):
    from personalign.errors import ValidationError

    with pytest.raises(ValidationError, match="adapter_config.rank"):
        apz.enroll("ana", SHORT, adapter=True, adapter_config={"rank": 0})
    assert LoraTrainConfig().loss == "dpo"


def test_importing_bad_adapters_is_refused_and_the_previous_one_stays(apz, tmp_path):
    apz.enroll("ana", SHORT, adapter=True, adapter_config=FAST)
    apz.enroll("ben", LONG, adapter=True, adapter_config=FAST)
    before = apz.respond("ana", ASK, max_new_tokens=6, steer={}, shots=False, memory=False)
    stored = (apz.adapters.path("ana") / "adapter_model.safetensors").read_bytes()
    source = apz.adapters.path("ben")

    def variant(name, config_update=None, weights=None):
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((source / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **(config_update or {})}))
        (folder / "adapter_model.safetensors").write_bytes(
            weights if weights is not None else (source / "adapter_model.safetensors").read_bytes()
        )
        return folder

    cases = {
        "truncated": (
            variant("truncated", weights=(source / "adapter_model.safetensors").read_bytes()[:200]),
            "unreadable",
        ),
        "rank": (variant("rank", {"r": 8}), r"expected \(8, "),
        "targets": (variant("targets", {"target_modules": ["q_proj"]}), "outside its target_modules"),
        "foreign": (variant("foreign", {"base_model_name_or_path": "someone/else-7b"}), "someone/else-7b"),
        "modules_to_save": (variant("modules_to_save", {"modules_to_save": ["lm_head"]}), "not a plain LoRA"),
    }
    for name, (folder, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            apz.import_adapter("ana", folder)
        assert (apz.adapters.path("ana") / "adapter_model.safetensors").read_bytes() == stored, name
        assert apz.respond("ana", ASK, max_new_tokens=6, steer={}, shots=False, memory=False) == before, name
    # A good folder from elsewhere (here: ben's adapter) replaces ana's and answers as ben's does.
    profile = apz.import_adapter("ana", variant("good"))
    assert profile.settings["adapter"]["kind"] == "imported"
    assert (
        apz.respond("ana", ASK, max_new_tokens=6, steer={}, shots=False, memory=False).text
        == apz.respond("ben", ASK, max_new_tokens=6, steer={}, shots=False, memory=False).text
    )
