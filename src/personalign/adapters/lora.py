"""Per-user LoRA adapters trained with a DPO-family loss on the user's own comparisons.

The reference policy is the same weights with the adapter disabled (no second model copy);
reference log-probabilities are computed once before training. A held-out slice of the user's
pairs drives early stopping. Training is seeded and deterministic on CPU, and runs through
``accelerate`` so the same recipe runs on one GPU or several.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personalign.adapters.config import LoraTrainConfig  # noqa: F401 (its home before; imported from here)
from personalign.functional.dpo import dpo_loss, ipo_loss, reduce_pairs, sequence_logps, simpo_loss
from personalign.types import Comparison


@dataclass
class PairBatch:
    """Chosen rows then rejected rows, right-padded: ``input_ids``/``mask``/``completion`` are ``(2B, T)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    weights: torch.Tensor  # (B,)

    @property
    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scored tokens per response: chosen ``(B,)`` and rejected ``(B,)``."""
        return self.completion_mask[:, 1:].sum(dim=1).chunk(2)


def _prompt_messages(comparison: Comparison) -> list[dict[str, str]]:
    if isinstance(comparison.prompt, str):
        return [{"role": "user", "content": comparison.prompt}]
    return [m.model_dump() for m in comparison.prompt]


def encode_pair(
    tokenizer: Any, comparison: Comparison, max_length: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of prompt+chosen and prompt+rejected (each ending in EOS) and their completion masks.

    The prompt is kept whole and the response truncated when the pair is longer than ``max_length``.
    """
    prompt = tokenizer.apply_chat_template(
        _prompt_messages(comparison), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    prompt = list(prompt)[-(max_length // 2) :]
    out = []
    for response in (comparison.chosen, comparison.rejected):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[: max_length - len(prompt)]
        out.append((prompt + ids, [0] * len(prompt) + [1] * len(ids)))
    (chosen, chosen_mask), (rejected, rejected_mask) = out
    return chosen, chosen_mask, rejected, rejected_mask


def collate(tokenizer: Any, comparisons: Sequence[Comparison], max_length: int) -> PairBatch:
    encoded = [encode_pair(tokenizer, c, max_length) for c in comparisons]
    rows = [e[0] for e in encoded] + [e[2] for e in encoded]
    masks = [e[1] for e in encoded] + [e[3] for e in encoded]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (2B, T)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (2B, T)
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks])  # (2B, T)
    weights = torch.tensor([c.weight for c in comparisons], dtype=torch.float32)  # (B,)
    return PairBatch(input_ids, attention, completion, weights)


def batch_logps(model: Any, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs under ``model``: chosen ``(B,)`` and rejected ``(B,)``."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).logits  # (2B, T, V)
    logps = sequence_logps(logits, batch.input_ids.to(device), batch.completion_mask.to(device))  # (2B,)
    return logps.chunk(2)


def pair_losses(
    config: LoraTrainConfig,
    policy: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    batch: PairBatch,
) -> torch.Tensor:
    """Per-pair losses ``(B,)`` for the configured loss."""
    (pc, pr), (rc, rr) = policy, ref
    if config.loss == "dpo":
        return dpo_loss(pc, pr, rc, rr, beta=config.beta, label_smoothing=config.label_smoothing)
    len_c, len_r = (n.to(pc.device) for n in batch.lengths)
    if config.loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, beta=config.beta, chosen_lengths=len_c, rejected_lengths=len_r)
    return simpo_loss(
        pc,
        pr,
        len_c,
        len_r,
        beta=config.beta,
        gamma=config.simpo_gamma,
        label_smoothing=config.label_smoothing,
    )


def data_hash(comparisons: Sequence[Comparison]) -> str:
    """A stable digest of the training pairs (recorded beside the adapter)."""
    digest = hashlib.sha256()
    for c in comparisons:
        digest.update(
            json.dumps(c.model_dump(mode="json", exclude={"created_at", "metadata"}), sort_keys=True).encode()
        )
    return digest.hexdigest()


def split_holdout(n: int, config: LoraTrainConfig) -> tuple[list[int], list[int]]:
    """Seeded split of pair indices into (train, held-out); no hold-out for very few pairs."""
    order = list(range(n))
    random.Random(config.seed).shuffle(order)
    if n < config.min_holdout_pairs or config.holdout_fraction == 0:
        return order, []
    held = max(1, math.floor(n * config.holdout_fraction))
    return order[held:], order[:held]


@dataclass
class TrainReport:
    epochs_run: int
    best_epoch: int
    train_loss: list[float]
    holdout_loss: list[float]
    holdout_accuracy: list[float]
    pairs: int
    holdout_pairs: int


def train_adapter(
    peft_model: Any,
    adapter_name: str,
    tokenizer: Any,
    comparisons: Sequence[Comparison],
    config: LoraTrainConfig,
) -> TrainReport:
    """Train adapter ``adapter_name`` (already added to ``peft_model``) on ``comparisons``.

    Only that adapter's LoRA weights get gradients. The best weights by held-out loss are kept
    (the last ones when there is no hold-out). Under ``accelerate launch`` the run is
    data-parallel as in :func:`personalign.training.loop.train_loop`: the LoRA tensors are
    prepared as one module (DDP), each batch's pairs are split between the processes, and each
    process's loss is weighted by its share of the batch's pair weights, so every process ends
    with the same weights as one process would. Nothing is written here.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from personalign.training.loop import Trainable, share

    torch.manual_seed(config.seed)
    accelerator = Accelerator(cpu=next(peft_model.parameters()).device.type == "cpu")
    processes = accelerator.num_processes
    train_idx, held_idx = split_holdout(len(comparisons), config)
    groups = [train_idx[s : s + config.batch_size] for s in range(0, len(train_idx), config.batch_size)]
    collated: dict[tuple[int, ...], PairBatch] = {}

    def pairs(indices: Sequence[int]) -> PairBatch:
        key = tuple(indices)
        if key not in collated:
            collated[key] = collate(tokenizer, [comparisons[i] for i in indices], config.max_length)
        return collated[key]

    held = pairs(held_idx) if held_idx else None
    peft_model.set_adapter(adapter_name)
    named = {n: p for n, p in peft_model.named_parameters() if f".{adapter_name}." in n and "lora_" in n}
    for name, p in peft_model.named_parameters():
        p.requires_grad_(name in named)
    needs_ref = config.loss != "simpo"
    ref: dict[
        int, tuple[torch.Tensor, torch.Tensor]
    ] = {}  # comparison index -> reference log-probs (chosen, rejected)
    with torch.no_grad(), peft_model.disable_adapter():
        for group in groups if needs_ref else []:
            chosen, rejected = batch_logps(peft_model, pairs(group))
            ref.update({i: (c, r) for i, c, r in zip(group, chosen, rejected, strict=True)})
        held_ref = batch_logps(peft_model, held) if held is not None and needs_ref else (None, None)

    def batch_loss(indices: list[int]) -> torch.Tensor:
        batch = pairs(indices)
        refs = (
            (torch.stack([ref[i][0] for i in indices]), torch.stack([ref[i][1] for i in indices]))
            if needs_ref
            else (None, None)
        )
        return reduce_pairs(pair_losses(config, batch_logps(peft_model, batch), refs, batch), batch.weights)

    trainable = Trainable(named, batch_loss, distributed=processes > 1)
    optimizer = torch.optim.AdamW(named.values(), lr=config.learning_rate, weight_decay=0.0)
    model, optimizer = accelerator.prepare(trainable, optimizer, device_placement=[False, False])
    report = TrainReport(0, 0, [], [], [], len(train_idx), len(held_idx))
    best, best_state, stale = math.inf, None, 0
    rng = random.Random(config.seed)
    # Per step, with an ETA; early stopping may end it before the total.
    bar = tqdm(
        total=config.epochs * len(groups),
        desc=f"adapter {adapter_name}",
        unit="step",
        disable=not (config.progress and accelerator.is_main_process),
    )
    for epoch in range(config.epochs):
        peft_model.train()
        order = list(range(len(groups)))
        rng.shuffle(order)
        total = 0.0
        for step, g in enumerate(order, 1):
            group = groups[g]
            mine = share(group, accelerator.process_index, processes)
            # DDP averages the processes' gradients; weighting each by processes * its share of the
            # pair weights makes the average the gradient of the whole batch's weighted mean.
            weight = sum(comparisons[i].weight for i in group) or 1.0
            loss = model(mine, processes * sum(comparisons[i].weight for i in mine) / weight)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            total += float(accelerator.reduce(loss.detach(), reduction="mean"))
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{total / step:.4f}", refresh=False)
        peft_model.eval()
        report.train_loss.append(total / len(groups))
        report.epochs_run = epoch + 1
        if held is None:
            continue
        with torch.no_grad():
            policy = batch_logps(peft_model, held)
            losses = pair_losses(config, policy, held_ref, held)
            margin = (policy[0] - policy[1]) - ((held_ref[0] - held_ref[1]) if needs_ref else 0.0)
        report.holdout_loss.append(float(reduce_pairs(losses, held.weights)))
        report.holdout_accuracy.append(float((margin > 0).float().mean()))
        if report.holdout_loss[-1] < best - 1e-6:
            best, stale, report.best_epoch = report.holdout_loss[-1], 0, epoch + 1
            best_state = {n: p.detach().clone() for n, p in named.items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(best_state[name])
    elif held is None:
        report.best_epoch = report.epochs_run
    for p in named.values():
        p.requires_grad_(False)
    peft_model.eval()
    return report
