"""Random PEFT LoRA folders for tests that need a user's adapter without training one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def random_lora(generator: Any, folder: Path, seed: int, scale: float = 0.1, rank: int = 8) -> Path:
    """A PEFT LoRA folder (q_proj, v_proj; ``rank``, alpha twice the rank) with random A and B
    (standard normal times ``scale``) for ``generator``'s model: it changes greedy answers, made
    without training and without touching the model."""
    import torch
    from safetensors.torch import save_file

    config = generator.model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * scale
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": generator.base_model_name_or_path,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder
