"""DPA recipe: a direction-conditioned adapter by iterated rejection-sampling fine-tuning.

The direction ``v`` (a unit vector over the objectives) is written into the system prompt
(:func:`direction_text`). Each iteration: draw a direction per training prompt, generate ``n``
answers with the current adapter, keep the answer with the best direction-weighted score
``v . z(answer)`` (``z``: objective scores standardised over the iteration's answers), and
fine-tune the adapter on the kept answers (SFT on response tokens). With ``every_direction``
(``--every-direction``) each of the ``directions`` angles keeps its own best of a prompt's ``n``
answers, taught under its own direction line, so opposite directions get opposite answers to
the same prompt and only the line tells them apart. On SmolLM2-135M neither form learned to
follow the line: with one drawn direction per prompt (2 iterations) the adapter shortened
answers whatever the direction, and with every direction (1 iteration, 384 kept answers)
likewise (mean verbosity 4.08 for negative and 4.10 for positive weights; docs/steering.md).
``loss="dpo"`` instead trains DPO on each prompt's best against its worst answer under the same
line (its loss stayed above ln 2 on SmolLM2-135M), and ``line="numbers+words"`` adds the
prompting baseline's phrases to the line (:func:`direction_text`). Each iteration's front
(mean measured scores per direction) is recorded. Decoding uses the adapter as the request's
row and the direction in the system prompt. Wang et al. 2024, "Arithmetic Control of LLMs
for Diverse User Preferences: Directional Preference Alignment".
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalign.errors import ValidationError
from personalign.functional.dpo import dpo_loss, sequence_logps
from personalign.steering.objectives import OBJECTIVES
from personalign.training.adapters import add_lora, save_adapter
from personalign.training.loop import LoopConfig, train_loop
from personalign.training.samples import chat_ids, left_pad, right_pad

DPA_CONFIG = "dpa_config.json"
ADAPTER_NAME = "steer_dpa"


DirectionLine = Literal["numbers", "numbers+words"]


def direction_text(direction: Mapping[str, float], line: DirectionLine = "numbers") -> str:
    """The system-prompt line that conditions the DPA adapter on a direction.

    ``numbers`` (the paper's form): "Preference direction: verbosity +0.71, structure -0.71.";
    ``numbers+words`` adds the prompting baseline's phrase for each component
    (:func:`personalign.steering.prompting.instruction`), which a small model can read.
    """
    text = (
        "Preference direction: "
        + ", ".join(f"{name} {value:+.2f}" for name, value in direction.items())
        + "."
    )
    if line == "numbers+words":
        from personalign.steering.prompting import instruction

        words = instruction({k: v for k, v in direction.items() if abs(v) >= 1e-3})
        text = f"{text} {words}" if words else text
    return text


def dpa_messages(
    messages: list[dict[str, Any]], direction: Mapping[str, float], line: DirectionLine = "numbers"
) -> list[dict[str, Any]]:
    """``messages`` with the direction line first in the system message."""
    line = direction_text(direction, line)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{line}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": line}, *messages]


def unit_direction(objectives: Sequence[str], angle_degrees: float) -> dict[str, float]:
    """The unit vector at ``angle`` in the plane of two objectives (``cos``, ``sin``)."""
    t = math.radians(angle_degrees)
    return {objectives[0]: round(math.cos(t), 4), objectives[1]: round(math.sin(t), 4)}


class DpaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objectives: list[str] = Field(
        default_factory=lambda: ["verbosity", "structure"], min_length=2, max_length=2
    )
    iterations: int = Field(default=2, ge=1, le=100)
    samples_per_prompt: int = Field(default=4, ge=2, le=64)
    directions: int = Field(
        default=8, ge=2, le=360, description="evenly spaced angles a direction is drawn from"
    )
    max_new_tokens: int = Field(default=160, ge=8)
    temperature: float = Field(default=1.0, gt=0.0)
    line: DirectionLine = Field(
        default="numbers", description="how the direction is written in the system prompt (direction_text)"
    )
    every_direction: bool = Field(
        default=False,
        description="train every direction on its best answer per prompt, not only the drawn one (the direction line is then the only thing that tells a prompt's kept answers apart)",
    )
    loss: Literal["sft", "dpo"] = Field(
        default="sft",
        description="sft: fine-tune on the kept (best) answers, as in the paper; dpo: DPO on (best, worst) of the same answers under the same direction line, against the base model",
    )
    beta: float = Field(default=0.1, gt=0.0, description="DPO's beta (loss='dpo')")
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    loop: LoopConfig = Field(
        default_factory=lambda: LoopConfig(epochs=2, learning_rate=5e-4, batch_size=4, name="dpa sft")
    )


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    directions: Sequence[dict[str, float]],
    config: DpaConfig,
    batch_size: int = 32,
) -> list[tuple[list[int], list[int], str]]:
    """``samples_per_prompt`` answers per (prompt, direction): (prompt ids, response ids, text)."""
    from personalign.steering.decoding import eos_token_ids

    stops = set(eos_token_ids(tokenizer, model.generation_config))
    jobs = [
        (p, d) for p, d in zip(prompts, directions, strict=True) for _ in range(config.samples_per_prompt)
    ]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        encoded = [chat_ids(tokenizer, p, system=direction_text(d, config.line)) for p, d in chunk]
        ids, mask = left_pad(encoded, tokenizer.pad_token_id)
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=config.temperature,
                top_k=0,
                max_new_tokens=config.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        for prompt_ids, row in zip(encoded, gen[:, ids.shape[1] :].tolist(), strict=True):
            end = next((i + 1 for i, t in enumerate(row) if t in stops), None)
            response = row[:end] if end is not None else row
            out.append((prompt_ids, response, tokenizer.decode(response, skip_special_tokens=True).strip()))
    return out


def _sft_batch_loss(model: Any, kept: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any]:
    """Mean negative log-likelihood per response token of the kept answers, and the batch's
    scored tokens (what the mean is over: the loop's ``batch_weight``)."""
    ids, attention, completion = right_pad(kept, pad)

    def tokens(idx: list[int]) -> float:
        return float(completion[idx][:, 1:].sum())

    def batch_loss(idx: list[int]) -> torch.Tensor:
        logits = model(input_ids=ids[idx], attention_mask=attention[idx]).logits  # (B, T, V)
        return -sequence_logps(logits, ids[idx], completion[idx]).sum() / max(tokens(idx), 1.0)

    return batch_loss, tokens


def _dpo_batch_loss(
    model: Any, pairs: Sequence[tuple[list[int], list[int], list[int]]], pad: int, beta: float
) -> Any:
    """DPO on (best, worst) under the same direction line; the reference is the base model."""
    if not pairs:
        raise ValidationError(
            "samples_per_prompt",
            "gave no (best, worst) pair that scores apart",
            "sample more answers per prompt or use loss='sft'",
        )
    ids, attention, completion = right_pad(
        [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad
    )  # chosen rows, then rejected
    n = len(pairs)
    with torch.no_grad(), model.disable_adapter():
        ref = torch.cat(
            [
                sequence_logps(
                    model(input_ids=ids[i : i + 8], attention_mask=attention[i : i + 8]).logits,
                    ids[i : i + 8],
                    completion[i : i + 8],
                )
                for i in range(0, 2 * n, 8)
            ]
        )  # (2n,)

    def batch_loss(idx: list[int]) -> torch.Tensor:
        rows = idx + [n + i for i in idx]
        logps = sequence_logps(
            model(input_ids=ids[rows], attention_mask=attention[rows]).logits, ids[rows], completion[rows]
        )  # (2B,)
        chosen, rejected = logps.chunk(2)
        return dpo_loss(chosen, rejected, ref[idx], ref[[n + i for i in idx]], beta).mean()

    return batch_loss


def train_dpa(
    generator: Any, prompts: Sequence[str], config: DpaConfig, seed: int = 0, progress: Any = None
) -> tuple[Any, list[dict[str, Any]]]:
    """Add and train ``steer_dpa`` on ``generator``; returns (peft model, per-iteration records)."""
    for name in config.objectives:
        if name not in OBJECTIVES:
            raise ValidationError(
                "objectives", f"{name!r} is not a known objective", f"use some of {sorted(OBJECTIVES)}", name
            )
    say = progress or (lambda _: None)
    torch.manual_seed(seed)
    model = add_lora(generator, ADAPTER_NAME, config.rank, config.alpha, config.target_modules)
    model.eval()
    tokenizer, pad = generator.tokenizer, generator.tokenizer.pad_token_id
    angles = [360.0 * i / config.directions for i in range(config.directions)]
    rng = random.Random(seed)
    records = []
    for iteration in range(config.iterations):
        drawn = [rng.choice(angles) for _ in prompts]
        directions = [unit_direction(config.objectives, a) for a in drawn]
        answers = _generate(model, tokenizer, prompts, directions, config)
        raw = {o: [OBJECTIVES[o].measure(text) for _, _, text in answers] for o in config.objectives}
        stats = {o: (statistics.fmean(v), statistics.pstdev(v) or 1.0) for o, v in raw.items()}
        kept = []  # (prompt ids, best response, text) per prompt and taught direction
        pairs = []  # (prompt ids, best response, worst response) where they score apart
        n = config.samples_per_prompt
        for j, (prompt, drawn_direction) in enumerate(zip(prompts, directions, strict=True)):
            group = range(j * n, (j + 1) * n)
            targets = (
                [unit_direction(config.objectives, a) for a in angles]
                if config.every_direction
                else [drawn_direction]
            )
            for direction in targets:
                score = [
                    sum(direction[o] * (raw[o][i] - stats[o][0]) / stats[o][1] for o in config.objectives)
                    for i in group
                ]
                best, worst = max(range(n), key=lambda k: score[k]), min(range(n), key=lambda k: score[k])
                prompt_ids, response, text = answers[j * n + best]
                if direction != drawn_direction:  # the same answer, taught under this direction's line
                    prompt_ids = chat_ids(tokenizer, prompt, system=direction_text(direction, config.line))
                kept.append((prompt_ids, response, text))
                if score[best] > score[worst]:
                    pairs.append((prompt_ids, response, answers[j * n + worst][1]))
        front = {}
        for angle in angles:
            idx = [j * n + k for j, a in enumerate(drawn) if a == angle for k in range(n)]
            if idx:
                front[f"{angle:g}"] = {o: statistics.fmean(raw[o][i] for i in idx) for o in config.objectives}
        for name, p in model.named_parameters():
            p.requires_grad_(f".{ADAPTER_NAME}." in name and "lora_" in name)
        params = {n_: p for n_, p in model.named_parameters() if p.requires_grad}
        if config.loss == "dpo":
            (batch_loss, weight), items = (_dpo_batch_loss(model, pairs, pad, config.beta), None), len(pairs)
        else:
            (batch_loss, weight), items = _sft_batch_loss(model, [(p, r) for p, r, _ in kept], pad), len(kept)
        model.train()
        loop = config.loop.model_copy(
            update={"seed": seed + iteration, "name": f"dpa {config.loss} {iteration + 1}"}
        )
        report = train_loop(params, items, batch_loss, loop, batch_weight=weight)
        model.eval()
        for p in params.values():
            p.requires_grad_(False)
        records.append(
            {
                "iteration": iteration + 1,
                "answers": len(answers),
                "kept": len(kept),
                "pairs": len(pairs),
                "front": front,
                f"{config.loss}_loss": report.epoch_loss,
            }
        )
        say(f"dpa iteration {iteration + 1}: front {front}")
    return model, records


def save_dpa(
    model: Any,
    folder: Path | str,
    config: DpaConfig,
    generator_id: str,
    records: list[dict[str, Any]],
    prompts: int,
) -> Path:
    """A plain PEFT folder for ``steer_dpa`` plus ``dpa_config.json`` (objectives, iterations' fronts)."""
    meta = {
        "objectives": config.objectives,
        "base_model": generator_id,
        "config": config.model_dump(),
        "prompts": prompts,
        "iterations": records,
        "data": "the generator's own answers on project-written prompts",
    }
    return save_adapter(model, ADAPTER_NAME, folder, DPA_CONFIG, meta)
