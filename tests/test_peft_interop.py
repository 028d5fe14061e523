"""Per-user adapters as PEFT expects them: ``AutoPeftModelForCausalLM`` loads them, and adapters
trained with TRL/PEFT on the same base import.

The embedded generator is stood in for by the tiny model under the embedded id; a Hugging Face
cache built in the test holds the same tiny weights as ``HuggingFaceTB/SmolLM2-135M-Instruct``,
so PEFT resolves the real hub id offline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from personalign.adapters.lora import LoraTrainConfig
from personalign.adapters.store import META_FILE, AdapterError, AdapterManager
from personalign.models import EMBEDDED_GENERATOR, EMBEDDED_GENERATOR_HUB_ID, Generator, load_generator
from personalign.types import Comparison

PAIRS = [
    Comparison(
        prompt=f"Question number {i} about eggs?",
        chosen="Nine minutes.",
        rejected="It depends on many long things.",
    )
    for i in range(4)
]
FAST = LoraTrainConfig(epochs=2, rank=4, learning_rate=5e-3, seed=0)
DATA = Path(__file__).resolve().parents[1] / "src" / "personalign" / "data"


def _generator(tiny_model_dir, model_id=None) -> Generator:
    """A fresh copy of the tiny model (adapters wrap it in place), under ``model_id`` if given."""
    loaded = load_generator(str(tiny_model_dir), device="cpu")
    if model_id is None:
        return loaded
    return Generator(model=loaded.model, tokenizer=loaded.tokenizer, model_id=model_id, source=loaded.source)


@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir, tmp_path_factory) -> Path:
    """A Hugging Face cache holding the tiny model as ``HuggingFaceTB/SmolLM2-135M-Instruct``."""
    root = tmp_path_factory.mktemp("hf-cache")
    repo = root / f"models--{EMBEDDED_GENERATOR_HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def _logits(model, tokenizer, text="Question number 2 about eggs? Nine minutes."):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _active_logits(manager: AdapterManager, user: str):
    slot = manager.activate(user)
    manager.peft.set_adapter(slot)
    return _logits(manager.peft, manager.generator.tokenizer)


def test_embedded_user_adapter_names_the_hub_base_and_loads_in_auto_peft(tiny_model_dir, hub_cache, tmp_path):
    from peft import AutoPeftModelForCausalLM

    manager = AdapterManager(_generator(tiny_model_dir, EMBEDDED_GENERATOR), tmp_path / "users")
    meta = manager.train("kim", PAIRS, FAST)
    folder = manager.path("kim")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        config["base_model_name_or_path"] == EMBEDDED_GENERATOR_HUB_ID
    )  # a real model id, not the pseudo-id
    assert (
        meta["base_model"] == EMBEDDED_GENERATOR
        and meta["base_model_name_or_path"] == EMBEDDED_GENERATOR_HUB_ID
    )
    assert meta["base_fingerprint"] == manager.generator.fingerprint()
    assert json.loads((folder / META_FILE).read_text())["base_fingerprint"].startswith("sha256:")

    loaded = AutoPeftModelForCausalLM.from_pretrained(
        str(folder), cache_dir=str(hub_cache), local_files_only=True
    )
    torch.testing.assert_close(_logits(loaded, manager.generator.tokenizer), _active_logits(manager, "kim"))


def test_local_folder_adapter_loads_in_auto_peft(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    manager = AdapterManager(_generator(tiny_model_dir), tmp_path / "users")
    manager.train("lee", PAIRS, FAST)
    assert json.loads((manager.path("lee") / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_model_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(manager.path("lee")))
    torch.testing.assert_close(_logits(loaded, manager.generator.tokenizer), _active_logits(manager, "lee"))


def _peft_adapter(tiny_model_dir, folder: Path, base_name: str) -> Path:
    """An adapter as TRL/PEFT training writes it: base named by the model's ``name_or_path``."""
    from peft import LoraConfig, get_peft_model

    model = load_generator(str(tiny_model_dir), device="cpu").model
    model.name_or_path = model.config.name_or_path = base_name  # as if loaded with from_pretrained(base_name)
    peft = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    peft.save_pretrained(str(folder), save_embedding_layers=False)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == base_name
    return folder


def test_adapter_trained_on_the_hub_id_imports_onto_the_embedded_model(tiny_model_dir, tmp_path):
    trl_adapter = _peft_adapter(tiny_model_dir, tmp_path / "trl", EMBEDDED_GENERATOR_HUB_ID)
    manager = AdapterManager(_generator(tiny_model_dir, EMBEDDED_GENERATOR), tmp_path / "users")
    meta = manager.install("kim", trl_adapter)
    assert meta["base_fingerprint"] is None  # the weights it was trained on are not known
    assert (
        json.loads((manager.path("kim") / "adapter_config.json").read_text())["base_model_name_or_path"]
        == EMBEDDED_GENERATOR_HUB_ID
    )
    manager.activate("kim")
    other = _peft_adapter(tiny_model_dir, tmp_path / "other", "someone/another-model")
    with pytest.raises(AdapterError, match="was made for 'someone/another-model'"):
        manager.install("lee", other)


def _as_saved_before(folder: Path) -> None:
    """Rewrite a user adapter the way personalign saved it before: the pseudo-id everywhere, no fingerprint."""
    config = json.loads((folder / "adapter_config.json").read_text())
    meta = json.loads((folder / META_FILE).read_text())
    config["base_model_name_or_path"] = EMBEDDED_GENERATOR
    meta["base_model"] = EMBEDDED_GENERATOR
    for key in ("base_model_name_or_path", "base_fingerprint"):
        meta.pop(key)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / META_FILE).write_text(json.dumps(meta))


def test_adapters_saved_with_the_pseudo_id_still_load(tiny_model_dir, tmp_path):
    manager = AdapterManager(_generator(tiny_model_dir, EMBEDDED_GENERATOR), tmp_path / "users")
    manager.train("kim", PAIRS, FAST)
    expected = _active_logits(manager, "kim")
    manager.unload("kim")
    _as_saved_before(manager.path("kim"))
    torch.testing.assert_close(_active_logits(manager, "kim"), expected)
    # The alias works both ways: the hub id loaded directly accepts the old adapter too, and it imports.
    hub = AdapterManager(_generator(tiny_model_dir, EMBEDDED_GENERATOR_HUB_ID), tmp_path / "users")
    torch.testing.assert_close(_active_logits(hub, "kim"), expected)
    hub.install("lee", manager.path("kim"))
    assert (
        json.loads((hub.path("lee") / "adapter_config.json").read_text())["base_model_name_or_path"]
        == EMBEDDED_GENERATOR_HUB_ID
    )
    with pytest.raises(AdapterError, match="was trained on"):
        AdapterManager(_generator(tiny_model_dir, "someone/another-model"), tmp_path / "users").activate(
            "kim"
        )


def test_other_base_weights_are_logged_not_refused(tiny_model_dir, tmp_path, caplog):
    manager = AdapterManager(_generator(tiny_model_dir, EMBEDDED_GENERATOR), tmp_path / "users")
    manager.train("kim", PAIRS, FAST)
    meta = json.loads((manager.path("kim") / META_FILE).read_text())
    (manager.path("kim") / META_FILE).write_text(
        json.dumps({**meta, "base_fingerprint": "sha256:0000000000000000"})
    )
    with caplog.at_level(logging.WARNING, logger="personalign.adapters.store"):
        manager.activate("kim")
        manager.unload("kim")
        manager.activate("kim")
    warnings = [r for r in caplog.records if "base weights sha256:0000000000000000" in r.getMessage()]
    assert len(warnings) == 1  # once per adapter


def test_bank_adapter_names_the_hub_base(tiny_model_dir, tmp_path):
    from personalign.adapters.bank import LoraBank

    generator = _generator(tiny_model_dir, EMBEDDED_GENERATOR)
    bank = LoraBank.train(
        generator,
        {
            "short": PAIRS[:2],
            "long": [c.model_copy(update={"chosen": c.rejected, "rejected": c.chosen}) for c in PAIRS[:2]],
        },
        tmp_path / "bank",
        FAST,
    )
    folder = bank.write_adapter([0.5, 0.5], tmp_path / "combined")
    assert (
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        == EMBEDDED_GENERATOR_HUB_ID
    )
    assert (
        LoraBank.load(_generator(tiny_model_dir, EMBEDDED_GENERATOR_HUB_ID), tmp_path / "bank").names
        == bank.names
    )


def test_shipped_adapters_name_a_real_base_and_no_machine_paths():
    configs = sorted(DATA.rglob("adapter_config.json"))
    assert configs
    for path in configs:
        assert json.loads(path.read_text())["base_model_name_or_path"] == EMBEDDED_GENERATOR_HUB_ID, path
    for path in DATA.rglob("*.json"):
        text = path.read_text()
        for marker in ("/root/", "/home/", "/tmp/", "/work/", "/Users/", ".cache/personalign"):
            assert marker not in text, (path, marker)


def test_a_loaded_revision_is_recorded_for_peft(tiny_model_dir, tmp_path):
    loaded = load_generator(str(tiny_model_dir), device="cpu")
    generator = Generator(
        model=loaded.model, tokenizer=loaded.tokenizer, model_id=EMBEDDED_GENERATOR_HUB_ID, revision="v1.0"
    )
    manager = AdapterManager(generator, tmp_path / "users")
    manager.install("kim", _peft_adapter(tiny_model_dir, tmp_path / "trl", EMBEDDED_GENERATOR_HUB_ID))
    config = json.loads((manager.path("kim") / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (
        EMBEDDED_GENERATOR_HUB_ID,
        "v1.0",
    )  # what AutoPeftModel loads
