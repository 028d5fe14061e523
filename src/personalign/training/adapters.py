"""The LoRA plumbing the MODPO, DPA and FSPO recipes share: add a trainable adapter to the
generator, and save one adapter as a plain PEFT folder with a recipe config beside its weights.

The saved ``adapter_config.json`` names the base by its real id
(:attr:`personalign.models.Generator.base_model_name_or_path`: the hub id for an embedded
model), never by the local folder the weights were loaded from, so a shipped adapter carries no
machine path and PEFT's ``AutoPeftModelForCausalLM`` finds its base.
"""

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

    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
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
    replacing what was there only once the new folder is complete.

    ``meta["base_model"]`` is personalign's id of the generator (how the runtime matches
    artefacts to it); ``adapter_config.json`` and ``config_file`` also name the base by its real
    id (:func:`personalign.models.hub_id`) as ``base_model_name_or_path``. Under ``accelerate
    launch`` only the main process writes.
    """
    from personalign.models import hub_id
    from personalign.training.loop import is_main_process

    folder = Path(folder)
    if not is_main_process():  # under accelerate launch the processes hold the same adapter: one writes it
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[name])
    inner = tmp / name if (tmp / name).is_dir() else tmp  # PEFT nests non-default adapters
    if meta.get("base_model"):
        base = hub_id(meta["base_model"])
        meta = {**meta, "base_model_name_or_path": base}
        adapter_config = inner / "adapter_config.json"
        adapter_config.write_text(
            json.dumps({**json.loads(adapter_config.read_text()), "base_model_name_or_path": base}, indent=2)
        )
    (inner / config_file).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    inner.replace(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder
