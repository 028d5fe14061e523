"""Export to vLLM and LoRAX: every exported adapter loads with PEFT and equals the stored one."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from personalign.adapters.export import export_adapters
from personalign.errors import ValidationError
from personalign.models import load_generator
from personalign.personalizer import Personalizer

PAIRS = [
    {"prompt": f"Q{i}?", "chosen": "Short.", "rejected": "A much longer answer than that."} for i in range(3)
]


@pytest.fixture(scope="module")
def trained_store(tiny_model_dir, encoder, tmp_path_factory):
    store = tmp_path_factory.mktemp("export-store")
    with Personalizer(load_generator(str(tiny_model_dir), device="cpu"), encoder, store=store) as pz:
        for user in ("ana", "ben"):
            pz.enroll(
                user,
                PAIRS,
                adapter=True,
                adapter_config={"epochs": 1, "rank": 4, "seed": 1 if user == "ben" else 0},
            )
    return store


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
def test_exported_adapters_load_with_peft_and_equal_the_stored_ones(
    engine, trained_store, tiny_model_dir, tmp_path
):
    out = tmp_path / engine
    manifest = export_adapters(
        trained_store / "users", ["ana", "ben"], engine, out, base_model=str(tiny_model_dir)
    )
    assert set(manifest["adapters"]) == {"ana", "ben"}
    for user in ("ana", "ben"):
        config = json.loads((out / user / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_model_dir) and not config.get("modules_to_save")
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        peft = PeftModel.from_pretrained(base, str(out / user), adapter_name="x")
        stored = load_file(trained_store / "users" / user / "adapter" / "adapter_model.safetensors")
        loaded = {k.replace(".x.", "."): v for k, v in peft.state_dict().items() if ".x." in k}
        assert stored.keys() == loaded.keys()
        for key in stored:
            torch.testing.assert_close(loaded[key], stored[key], rtol=0, atol=0)
    if engine == "vllm":
        args = shlex.split(manifest["command"])
        assert args[:4] == ["vllm", "serve", str(tiny_model_dir), "--enable-lora"]
        assert f"ana={out.resolve() / 'ana'}" in args and "--max-lora-rank" in args
        assert (out / "serve.sh").read_text().strip().endswith(manifest["command"])
        modules = json.loads((out / "lora_modules.json").read_text())
        assert {m["name"] for m in modules} == {"ana", "ben"}
    else:
        lorax = json.loads((out / "lorax.json").read_text())
        assert lorax["adapters"]["ana"] == {
            "adapter_source": "local",
            "adapter_id": str((out / "ana").resolve()),
        }


def test_export_errors(trained_store, tmp_path):
    with pytest.raises(ValidationError, match="have no adapter"):
        export_adapters(trained_store / "users", ["ana", "nobody"], "vllm", tmp_path / "o", base_model="m")
    with pytest.raises(ValidationError, match="engine"):
        export_adapters(trained_store / "users", ["ana"], "tgi", tmp_path / "o", base_model="m")  # type: ignore[arg-type]
    assert not (tmp_path / "o").exists()
