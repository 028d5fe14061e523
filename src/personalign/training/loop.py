"""The one training loop the recipes share (VAS, MODPO, DPA, FSPO, Persona-Plug).

Setup is the recipe's; the loop owns the optimiser (AdamW), ``accelerate``, shuffling,
optional gradient clipping, a per-step progress bar with the running loss and an ETA
(``progress=True``), a divergence check and checkpoints.

Under ``accelerate launch`` (several processes) the run is data-parallel and gives the same
result as one process, up to float rounding: the trainable tensors are prepared as one module
(DDP: every process starts from the main process's values and gradients are all-reduced), each
global mini-batch is split between the processes (``split_between_processes``), and each
process's loss is weighted by its share of the batch so that the reduced gradient is the
gradient of the whole batch's mean loss. Every process must hold the model on its own device
(``Accelerator().device``).

Checkpoints: after every epoch ``checkpoint_dir`` gets ``accelerator.save_state`` (the
trainable tensors as ``trainable.safetensors`` by name, the optimiser and each process's RNG
states, loaded back with ``weights_only``) in a folder per epoch, then ``loop_state.json``
(epoch, losses, the ``after_epoch`` metrics, the ``fingerprint`` and the caller's ``extra``
state) naming that folder; only the main process writes shared files. A run started with the
same ``checkpoint_dir`` resumes after the last finished epoch with the same RNG state, unless
the checkpoint's ``fingerprint`` (what the caller says identifies the run) differs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ValidationError

STATE_FILE = "loop_state.json"  # its presence means a checkpoint to resume from
TENSORS_FILE = "trainable.safetensors"
_STATE_PREFIX = "epoch-"  # checkpoint_dir/epoch-<n>/: accelerate's save_state after epoch n
_OLD_STATE_FILE = "loop_state.pt"  # before accelerate's save_state: a pickle, refused rather than unpickled


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=4, ge=1, le=10_000)
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=16, ge=1, le=4096)
    max_grad_norm: float | None = Field(
        default=None, gt=0.0, description="clip the gradients' global norm to this (None: no clipping)"
    )
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


class Trainable(torch.nn.Module):
    """The trainable tensors as one module, so accelerate can prepare, synchronise and save them.

    ``forward(indices, scale)`` is the caller's ``batch_loss(indices) * scale``. Under several
    processes every tensor joins each step's graph (with a zero term), so DDP's all-reduce never
    waits for a tensor a batch did not use, and a process whose share of a batch is empty still
    takes part.
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        batch_loss: Callable[[list[int]], torch.Tensor],
        distributed: bool,
    ) -> None:
        super().__init__()
        self.names = list(params)
        self.tensors = torch.nn.ParameterList(params.values())  # the caller's Parameter objects, not copies
        self._batch_loss = batch_loss
        self._distributed = distributed

    def forward(self, indices: list[int], scale: float) -> torch.Tensor:
        touch = sum(p.sum() for p in self.tensors) * 0.0 if self._distributed else None
        if not indices:
            assert touch is not None  # only a process of a distributed run gets an empty share
            return touch
        loss = self._batch_loss(indices) * scale
        return loss if touch is None else loss + touch.to(loss.device)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors, strict=True))


def is_main_process() -> bool:
    """Whether this process writes shared files: always in a plain run, only the main process
    under ``accelerate launch`` (read from the launcher's environment: nothing is initialised)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"], 0) == 0


def share(batch: list[int], index: int, processes: int) -> list[int]:
    """The part of ``batch`` process ``index`` of ``processes`` trains on: contiguous, the first
    ``len(batch) % processes`` processes take one more (``accelerate``'s ``split_between_processes``)."""
    size, extra = divmod(len(batch), processes)
    start = index * size + min(index, extra)
    return batch[start : start + size + (index < extra)]


def _read_state(folder: Path, names: list[str], fingerprint: Any) -> dict[str, Any]:
    path = folder / STATE_FILE
    state = json.loads(path.read_text())
    if state.get("fingerprint") != _jsonable(fingerprint) or state.get("params") != names:
        raise ValidationError(
            "checkpoint_dir",
            f"holds a run with other data or settings ({path})",
            "use a new checkpoint_dir, or delete the old one to start over",
            str(folder),
        )
    return state


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(value))


def _hooks(accelerator: Any, trainable: Trainable) -> None:
    """Save the trainable tensors by name (``TENSORS_FILE``) instead of accelerate's wrapper-keyed
    model file, so a checkpoint does not depend on DDP's ``module.`` prefix or the process count."""
    from safetensors.torch import load_file, save_file

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in trainable.named_tensors().items()},
                str(Path(output_dir) / TENSORS_FILE),
            )
        weights.clear()  # accelerate writes no model file

    def load(models: list[Any], input_dir: str) -> None:
        saved = load_file(str(Path(input_dir) / TENSORS_FILE))
        with torch.no_grad():
            for name, tensor in trainable.named_tensors().items():
                tensor.copy_(saved[name])
        models.clear()  # loaded here

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _checkpoint(
    accelerator: Any,
    folder: Path,
    report: LoopReport,
    names: list[str],
    fingerprint: Any,
    extra: dict[str, Any] | None,
) -> None:
    """accelerate's state in ``epoch-<n>/``, then ``loop_state.json`` naming it (the last write:
    an interrupted save leaves the previous checkpoint in force), then older folders go."""
    from personalign.artefacts import atomic_write_json

    name = f"{_STATE_PREFIX}{report.epochs_run}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "epoch": report.epochs_run,
            "state_dir": name,
            "params": names,
            "epoch_loss": report.epoch_loss,
            "metrics": report.metrics,
            "fingerprint": fingerprint,
            "extra": dict(extra or {}),
        }
        atomic_write_json(folder / STATE_FILE, state)
        for old in folder.glob(f"{_STATE_PREFIX}*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train_loop(
    params: Mapping[str, torch.nn.Parameter],
    n_items: int,
    batch_loss: Callable[[list[int]], torch.Tensor],
    config: LoopConfig,
    on_epoch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int], Mapping[str, float] | None] | None = None,
    fingerprint: Any = None,
    extra: dict[str, Any] | None = None,
    batch_weight: Callable[[list[int]], float] | None = None,
) -> LoopReport:
    """Minimise ``batch_loss(indices)`` over shuffled mini-batches of ``range(n_items)``.

    ``batch_loss`` is a mean over what ``batch_weight(indices)`` counts: the items by default,
    or e.g. the scored tokens for a token-level mean. Several processes weight their shares of a
    batch by it, which makes the run equal to one process's.

    ``on_epoch(epoch)`` runs before each epoch (e.g. to refresh bootstrapped targets, or set
    train mode); ``after_epoch(epoch)`` after it, and the metrics it returns (e.g. a validation
    loss) are kept per epoch in ``report.metrics`` and the checkpoint. ``fingerprint``: any
    JSON value; resuming from a checkpoint with another one is a ``ValidationError``.
    ``extra``: the caller's own state (JSON values), saved with each checkpoint and updated in
    place on resume. A non-finite epoch loss or metric stops the run with a ``ValidationError``
    on ``learning_rate``. Every process of a distributed run returns the same report.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    tensors = list(params.values())
    accelerator = Accelerator(cpu=tensors[0].device.type == "cpu")
    processes, distributed = accelerator.num_processes, accelerator.num_processes > 1
    trainable = Trainable(params, batch_loss, distributed)
    optimizer = torch.optim.AdamW(tensors, lr=config.learning_rate, weight_decay=config.weight_decay)
    # The tensors stay where the recipe put them; DDP starts every process from the main one's values.
    model, optimizer = accelerator.prepare(trainable, optimizer, device_placement=[False, False])
    _hooks(accelerator, trainable)
    report = LoopReport()
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if folder is not None and (folder / _OLD_STATE_FILE).is_file() and not (folder / STATE_FILE).is_file():
        raise ValidationError(
            "checkpoint_dir",
            f"holds a checkpoint in the old pickled format ({_OLD_STATE_FILE}), which is not read",
            "use a new checkpoint_dir, or delete the old one to start over",
            str(folder),
        )
    if folder is not None and (folder / STATE_FILE).is_file():
        state = _read_state(folder, trainable.names, fingerprint)
        accelerator.load_state(str(folder / state["state_dir"]))  # tensors, optimiser, RNG as they were
        report.epoch_loss = list(state["epoch_loss"])
        report.metrics = {k: list(v) for k, v in state["metrics"].items()}
        report.epochs_run = report.resumed_from = int(state["epoch"])
        if extra is not None:
            extra.update(state["extra"])
    else:
        torch.manual_seed(config.seed)
    steps = math.ceil(n_items / config.batch_size)
    weigh = batch_weight or len
    bar = tqdm(
        total=config.epochs * steps,
        initial=report.epochs_run * steps,
        desc=config.name,
        unit="step",
        disable=not (config.progress and accelerator.is_main_process),
    )
    for epoch in range(report.epochs_run, config.epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        order = list(range(n_items))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        total, batches = 0.0, 0
        for start in range(0, n_items, config.batch_size):
            batch = order[start : start + config.batch_size]
            mine = share(batch, accelerator.process_index, processes)
            # DDP averages the processes' gradients: weighting each by processes * its share makes
            # the average the gradient of the whole batch's mean loss.
            loss = model(mine, processes * (weigh(mine) if mine else 0.0) / (weigh(batch) or 1.0))
            optimizer.zero_grad()
            accelerator.backward(loss)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    tensors, config.max_grad_norm
                )  # after the all-reduce: the same on every process
            optimizer.step()
            total += float(accelerator.reduce(loss.detach(), reduction="mean"))  # the batch's mean loss
            batches += 1
            bar.update(1)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{config.epochs}", loss=f"{total / batches:.4f}", refresh=False
            )
        report.epoch_loss.append(total / max(batches, 1))
        metrics = dict(after_epoch(epoch) or {}) if after_epoch is not None else {}
        for key, value in metrics.items():
            report.metrics.setdefault(key, []).append(float(value))
        report.epochs_run = epoch + 1
        if not all(math.isfinite(v) for v in [report.epoch_loss[-1], *metrics.values()]):
            raise ValidationError(
                "learning_rate",
                f"made the loss diverge in epoch {epoch + 1} of {config.name}",
                "lower the learning rate",
                config.learning_rate,
            )
        if folder is not None:
            _checkpoint(accelerator, folder, report, trainable.names, fingerprint, extra)
    bar.close()
    return report
