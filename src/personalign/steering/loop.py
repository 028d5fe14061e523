"""The one training loop the recipes share (VAS, MODPO, DPA, FSPO, Persona-Plug).

Setup is the recipe's; the loop owns the optimiser (AdamW), ``accelerate``, shuffling,
optional gradient clipping, a per-step progress bar with the running loss and an ETA
(``progress=True``), a divergence check and checkpoints: after every
epoch the trainable tensors, optimiser state, losses, the ``after_epoch`` metrics and the
caller's ``extra`` state go to ``checkpoint_dir/loop_state.pt`` (written atomically), and a run
started with the same ``checkpoint_dir`` resumes after the last finished epoch, unless the
checkpoint's ``fingerprint`` (what the caller says identifies the run) differs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ValidationError

STATE_FILE = "loop_state.pt"


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=4, ge=1, le=10_000)
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=16, ge=1, le=4096)
    max_grad_norm: float | None = Field(default=None, gt=0.0, description="clip the gradients' global norm to this (None: no clipping)")
    seed: int = 0
    progress: bool = False
    checkpoint_dir: str | None = None
    name: str = "train"


@dataclass
class LoopReport:
    epoch_loss: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # after_epoch's values, one per epoch
    epochs_run: int = 0
    resumed_from: int = 0


def _resume(state_path: Path, params: Mapping[str, torch.nn.Parameter], optimizer: Any, report: LoopReport, fingerprint: Any, extra: dict[str, Any] | None) -> None:
    state = torch.load(state_path, weights_only=False)
    if state.get("fingerprint") != fingerprint or set(state.get("params", {})) != set(params):
        raise ValidationError(
            "checkpoint_dir",
            f"holds a run with other data or settings ({state_path})",
            "use a new checkpoint_dir, or delete the old one to start over",
            str(state_path.parent),
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    report.epoch_loss = list(state["epoch_loss"])
    report.metrics = {k: list(v) for k, v in state.get("metrics", {}).items()}
    report.epochs_run = report.resumed_from = int(state["epoch"])
    if extra is not None:
        extra.update(state.get("extra", {}))


def _checkpoint(state_path: Path, params: Mapping[str, torch.nn.Parameter], optimizer: Any, report: LoopReport, fingerprint: Any, extra: dict[str, Any] | None) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    state = {"params": snapshot, "optimizer": optimizer.state_dict(), "epoch": report.epochs_run, "epoch_loss": report.epoch_loss, "metrics": report.metrics, "fingerprint": fingerprint, "extra": dict(extra or {})}
    torch.save(state, tmp)
    tmp.replace(state_path)


def train_loop(
    params: Mapping[str, torch.nn.Parameter],
    n_items: int,
    batch_loss: Callable[[list[int]], torch.Tensor],
    config: LoopConfig,
    on_epoch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int], Mapping[str, float] | None] | None = None,
    fingerprint: Any = None,
    extra: dict[str, Any] | None = None,
) -> LoopReport:
    """Minimise ``batch_loss(indices)`` over shuffled mini-batches of ``range(n_items)``.

    ``on_epoch(epoch)`` runs before each epoch (e.g. to refresh bootstrapped targets, or set
    train mode); ``after_epoch(epoch)`` after it, and the metrics it returns (e.g. a validation
    loss) are kept per epoch in ``report.metrics`` and the checkpoint. ``fingerprint``: any
    picklable value; resuming from a checkpoint with another one is a ``ValidationError``.
    ``extra``: the caller's own state, saved with each checkpoint and updated in place on resume.
    A non-finite epoch loss or metric stops the run with a ``ValidationError`` on
    ``learning_rate``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    tensors = list(params.values())
    accelerator = Accelerator(cpu=tensors[0].device.type == "cpu")
    optimizer = torch.optim.AdamW(tensors, lr=config.learning_rate, weight_decay=config.weight_decay)
    report = LoopReport()
    state_path = Path(config.checkpoint_dir) / STATE_FILE if config.checkpoint_dir else None
    if state_path is not None and state_path.is_file():
        _resume(state_path, params, optimizer, report, fingerprint, extra)
    optimizer = accelerator.prepare(optimizer)
    torch.manual_seed(config.seed)
    steps = math.ceil(n_items / config.batch_size)
    bar = tqdm(total=config.epochs * steps, initial=report.epochs_run * steps, desc=config.name, unit="step", disable=not config.progress)
    for epoch in range(report.epochs_run, config.epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        order = list(range(n_items))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        total, batches = 0.0, 0
        for start in range(0, n_items, config.batch_size):
            loss = batch_loss(order[start : start + config.batch_size])
            optimizer.zero_grad()
            accelerator.backward(loss)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(tensors, config.max_grad_norm)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{total / batches:.4f}", refresh=False)
        report.epoch_loss.append(total / max(batches, 1))
        metrics = dict(after_epoch(epoch) or {}) if after_epoch is not None else {}
        for key, value in metrics.items():
            report.metrics.setdefault(key, []).append(float(value))
        report.epochs_run = epoch + 1
        if not all(math.isfinite(v) for v in [report.epoch_loss[-1], *metrics.values()]):
            raise ValidationError("learning_rate", f"made the loss diverge in epoch {epoch + 1} of {config.name}", "lower the learning rate", config.learning_rate)
        if state_path is not None:
            _checkpoint(state_path, params, optimizer, report, fingerprint, extra)
    bar.close()
    return report
