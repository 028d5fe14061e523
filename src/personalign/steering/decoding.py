"""Decode-time steering as ``transformers`` logits processors.

``VerbosityProcessor`` steers length by shifting the end-of-turn logits:
``logits[:, eos] -= strength * w`` for verbosity weight ``w`` (``w < 0``: shorter answers,
ending at natural stops; ``w > 0``: longer). A zero weight builds no processor at all, so
unsteered decoding is exactly plain ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from personalign.errors import ValidationError

STEERABLE = ("verbosity",)
MAX_WEIGHT = 10.0
DEFAULT_VERBOSITY_STRENGTH = 4.0


def eos_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Token ids that end a turn: the tokenizer's EOS and any in the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return sorted(ids)


def eos_shift(scores: torch.Tensor, eos_ids: list[int], shift: float | torch.Tensor) -> torch.Tensor:
    """``scores`` with ``shift`` added to the EOS columns.

    Args:
        scores: ``(batch, vocab)`` next-token logits.
        eos_ids: end-of-turn token ids.
        shift: a float, or ``(batch,)`` for one shift per row.
    Returns:
        ``(batch, vocab)``, a new tensor.
    """
    out = scores.clone()
    if isinstance(shift, torch.Tensor):
        out[:, eos_ids] += shift.to(out.dtype).unsqueeze(1)  # (B, 1) broadcast over the EOS columns
    else:
        out[:, eos_ids] += shift
    return out


class VerbosityProcessor(LogitsProcessor):
    """Shift end-of-turn logits by ``-strength * weight`` (one weight, or one per batch row)."""

    def __init__(self, eos_ids: list[int], weight: float | list[float], strength: float = DEFAULT_VERBOSITY_STRENGTH) -> None:
        if not eos_ids:
            raise ValidationError("eos_ids", "is empty", "give the tokenizer an eos_token")
        self.eos_ids = list(eos_ids)
        if isinstance(weight, list):
            self.shift: float | torch.Tensor = -strength * torch.tensor(weight, dtype=torch.float32)  # (B,)
        else:
            self.shift = -strength * weight

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if isinstance(self.shift, torch.Tensor) and self.shift.shape[0] != scores.shape[0]:
            # generate() expands rows for num_return_sequences / beams: repeat each row's shift.
            self.shift = self.shift.repeat_interleave(scores.shape[0] // self.shift.shape[0])
        return eos_shift(scores, self.eos_ids, self.shift.to(scores.device) if isinstance(self.shift, torch.Tensor) else self.shift)


def validate_steer(steer: Mapping[str, Any] | None, field: str = "steer") -> dict[str, float]:
    """Check a ``{objective: weight}`` request: known steerable names, finite numbers."""
    if steer is None:
        return {}
    if not isinstance(steer, Mapping):
        raise ValidationError(field, "must be a mapping of objective name to weight", 'pass e.g. {"verbosity": -0.5}', steer)
    clean: dict[str, float] = {}
    for name, value in steer.items():
        if name not in STEERABLE:
            from personalign.steering.objectives import OBJECTIVES

            problem = "is measured but has no decode-time steering method yet" if name in OBJECTIVES else "is not a known objective"
            raise ValidationError(f"{field}.{name}", problem, f"use a steerable objective, one of {list(STEERABLE)} (known objectives: {sorted(OBJECTIVES)})", name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationError(f"{field}.{name}", "must be a finite number", "pass a weight such as -0.5 or 1.0", value)
        if abs(value) > MAX_WEIGHT:
            raise ValidationError(f"{field}.{name}", f"must be within [-{MAX_WEIGHT}, {MAX_WEIGHT}]", "use a smaller weight", value)
        clean[name] = float(value)
    return clean


def steering_processors(
    steer: Mapping[str, float] | Sequence[Mapping[str, float]], tokenizer: Any, model_config: Any = None
) -> LogitsProcessorList:
    """The processors for validated steering: one request, or one per batch row.

    Empty when every weight is zero, so unsteered decoding runs no processor at all.
    """
    processors = LogitsProcessorList()
    if isinstance(steer, Mapping):
        weight = steer.get("verbosity", 0.0)
        if weight != 0.0:
            processors.append(VerbosityProcessor(eos_token_ids(tokenizer, model_config), weight))
        return processors
    weights = [row.get("verbosity", 0.0) for row in steer]
    if any(w != 0.0 for w in weights):
        processors.append(VerbosityProcessor(eos_token_ids(tokenizer, model_config), weights))
    return processors
