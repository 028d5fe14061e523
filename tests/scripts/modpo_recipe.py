"""Run the MODPO recipe on a tiny model, as ``python`` or under ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/modpo_recipe.py MODEL SAMPLES OUT

(``--multi_gpu`` picks accelerate's torchrun launcher; without GPUs the processes run on CPU with
gloo.) Each process writes what it trained to ``OUT/rank<i>.safetensors`` and its report to
``OUT/rank<i>.json``; the recipe itself writes the adapter under ``OUT/steering`` once.
Used by tests/test_accelerate_launch.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

from personalign.models import load_generator
from personalign.steering.recipes import train_modpo_recipe
from personalign.training.samples import load_samples


def main(model: str, samples: str, out: str) -> None:
    state = PartialState(cpu=True)  # as the loop's Accelerator for CPU tensors (the first call sets it up)
    torch.manual_seed(0)
    generator = load_generator(model, device="cpu")
    root = Path(out)
    report = train_modpo_recipe(
        generator,
        root / "steering",
        ["verbosity", "reading_level"],
        load_samples(samples),
        epochs=2,
        max_pairs=9,
        min_gap=0.0,
        progress=False,
    )
    trained = {n: p.detach().contiguous() for n, p in generator.model.named_parameters() if "lora_" in n}
    save_file(trained, str(root / f"rank{state.process_index}.safetensors"))
    summary = {
        "processes": state.num_processes,
        "loss": {k: v["epoch_loss"] for k, v in report.items()},
        "pairs": {k: v["pairs"] for k, v in report.items()},
    }
    (root / f"rank{state.process_index}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:4])
