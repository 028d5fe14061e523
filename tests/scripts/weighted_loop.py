"""The shared loop on a toy token-weighted least-squares problem, interrupted and resumed.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/weighted_loop.py OUT

Item i has ``count[i]`` "tokens"; the batch loss is their token mean, so the loop is told the
batch weight. The run stops after 2 epochs (checkpoint in ``OUT/ckpt``), then a fresh start
with the same folder resumes to epoch 4. Each process writes its final tensor and report to
``OUT/rank<i>.json``. Used by tests/test_accelerate_launch.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from personalign.training.loop import LoopConfig, train_loop

COUNT = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0, 1.0, 2.0])
ITEMS = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))


def run(epochs: int, folder: Path) -> tuple[torch.Tensor, object]:
    w = torch.nn.Parameter(torch.zeros(3))

    def batch_loss(idx: list[int]) -> torch.Tensor:
        return (COUNT[idx, None] * (ITEMS[idx] - w) ** 2).sum() / COUNT[idx].sum()

    config = LoopConfig(epochs=epochs, batch_size=3, learning_rate=0.1, checkpoint_dir=str(folder))
    report = train_loop(
        {"w": w},
        7,
        batch_loss,
        config,
        fingerprint={"toy": 7},
        batch_weight=lambda idx: float(COUNT[idx].sum()),
    )
    return w.detach(), report


def main(out: str) -> None:
    state = PartialState(cpu=True)
    root = Path(out)
    run(2, root / "ckpt")
    w, report = run(4, root / "ckpt")
    result = {
        "processes": state.num_processes,
        "w": w.tolist(),
        "loss": {"epochs": report.epoch_loss},
        "resumed_from": report.resumed_from,
    }
    (root / f"rank{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
