"""The one training loop the steering recipes (VAS, MODPO) share.

Setup is the recipe's; the loop owns the optimiser, ``accelerate``, shuffling, a progress bar
and checkpoints: after every epoch the trainable tensors, optimiser state and losses go to
``checkpoint_dir/loop_state.pt`` (written atomically), and a run started with the same
``checkpoint_dir`` resumes after the last finished epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

STATE_FILE = "loop_state.pt"


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=4, ge=1, le=10_000)
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=16, ge=1, le=4096)
    seed: int = 0
    progress: bool = False
    checkpoint_dir: str | None = None
    name: str = "train"


@dataclass
class LoopReport:
    epoch_loss: list[float] = field(default_factory=list)
    epochs_run: int = 0
    resumed_from: int = 0


def train_loop(
    params: Mapping[str, torch.nn.Parameter],
    n_items: int,
    batch_loss: Callable[[list[int]], torch.Tensor],
    config: LoopConfig,
    on_epoch: Callable[[int], None] | None = None,
) -> LoopReport:
    """Minimise ``batch_loss(indices)`` over shuffled mini-batches of ``range(n_items)``.

    ``on_epoch(epoch)`` runs before each epoch (e.g. to refresh bootstrapped targets).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    tensors = list(params.values())
    accelerator = Accelerator(cpu=tensors[0].device.type == "cpu")
    optimizer = torch.optim.AdamW(tensors, lr=config.learning_rate, weight_decay=config.weight_decay)
    report = LoopReport()
    state_path = Path(config.checkpoint_dir) / STATE_FILE if config.checkpoint_dir else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        report.epoch_loss = list(state["epoch_loss"])
        report.epochs_run = report.resumed_from = int(state["epoch"])
    optimizer = accelerator.prepare(optimizer)
    torch.manual_seed(config.seed)
    for epoch in tqdm(range(report.epochs_run, config.epochs), desc=config.name, disable=not config.progress):
        if on_epoch is not None:
            on_epoch(epoch)
        order = list(range(n_items))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        total, batches = 0.0, 0
        for start in range(0, n_items, config.batch_size):
            loss = batch_loss(order[start : start + config.batch_size])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        report.epoch_loss.append(total / max(batches, 1))
        report.epochs_run = epoch + 1
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            snapshot = {n: p.detach().clone() for n, p in params.items()}
            torch.save({"params": snapshot, "optimizer": optimizer.state_dict(), "epoch": report.epochs_run, "epoch_loss": report.epoch_loss}, tmp)
            tmp.replace(state_path)
    return report
