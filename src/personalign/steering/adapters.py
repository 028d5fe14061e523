"""The LoRA plumbing the MODPO and DPA recipes share: add a trainable adapter to the generator,
and save one adapter as a plain PEFT folder with a recipe config beside its weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_lora(generator: Any, name: str, rank: int, alpha: float, target_modules: Sequence[str]) -> Any:
    """Add adapter ``name`` to the generator (wrapping it in PEFT once), make it active, and
    return the PEFT model (also set as ``generator.model``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM")
    model = generator.model
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora)
    else:
        model = get_peft_model(model, lora, adapter_name=name)
    model.set_adapter(name)
    generator.model = model
    return model


def save_adapter(model: Any, name: str, folder: Path | str, config_file: str, meta: dict[str, Any]) -> Path:
    """Write adapter ``name`` to ``folder`` (``adapter_config.json`` + weights + ``config_file``),
    replacing what was there only once the new folder is complete."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[name])
    inner = tmp / name if (tmp / name).is_dir() else tmp  # PEFT nests non-default adapters
    (inner / config_file).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    inner.replace(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder
