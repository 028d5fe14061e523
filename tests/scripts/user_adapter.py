"""Train one user's LoRA (``train_adapter``) on a tiny model, as ``python`` or under ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/user_adapter.py MODEL OUT

Each process writes the adapter's tensors to ``OUT/rank<i>.safetensors`` and its report to
``OUT/rank<i>.json``. Used by tests/test_accelerate_launch.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from personalign.adapters.lora import LoraTrainConfig, train_adapter
from personalign.models import load_generator
from personalign.types import Comparison

# Seven pairs with unequal weights, batches of 4 after a hold-out of 2: a batch of 4 and one of 1.
PAIRS = [
    Comparison(
        prompt=f"Question {i} about eggs?",
        chosen="Nine minutes.",
        rejected="It depends on many long and winding things.",
        weight=1.0 + 0.5 * (i % 3),
    )
    for i in range(7)
]


def main(model: str, out: str) -> None:
    state = PartialState(cpu=True)
    generator = load_generator(model, device="cpu")
    config = LoraTrainConfig(
        rank=4,
        alpha=8,
        epochs=3,
        learning_rate=5e-3,
        batch_size=4,
        holdout_fraction=0.3,
        min_holdout_pairs=4,
        seed=0,
        target_modules=["q_proj", "v_proj"],
    )
    torch.manual_seed(0)
    peft = get_peft_model(
        generator.model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        adapter_name="ana",
    )
    report = train_adapter(peft, "ana", generator.tokenizer, PAIRS, config)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: p.detach().contiguous() for n, p in peft.named_parameters() if "lora_" in n},
        str(root / f"rank{state.process_index}.safetensors"),
    )
    summary = {
        "processes": state.num_processes,
        "loss": {"train": report.train_loss, "holdout": report.holdout_loss},
        "pairs": report.pairs,
    }
    (root / f"rank{state.process_index}.json").write_text(json.dumps({**summary, "report": asdict(report)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
