"""Responses sampled from the frozen generator, the training data of VAS and MODPO recipes.

Both recipes learn only from the base policy's own samples, labelled by the objective
scorers (:mod:`personalign.steering.objectives`); nothing external is needed. A sample keeps
its token ids so value targets line up with the tokens the generator produced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from personalign.errors import ValidationError


@dataclass(frozen=True)
class Sample:
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, the end-of-turn token included when reached
    text: str
    finished: bool


def chat_ids(tokenizer: Any, prompt: str, system: str = "") -> list[int]:
    """Token ids of ``prompt`` in the generator's chat template, ready for the answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` ids and mask, left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def right_pad(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + response`` rows: ids, attention mask, response mask, each ``(N, T)``."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.tensor([[*p, *r] + [pad] * (width - len(p) - len(r)) for p, r in rows])
    attention = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in rows])
    response = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in rows])
    return ids, attention, response


def sample_responses(
    generator: Any,
    prompts: Sequence[str],
    n_per_prompt: int = 4,
    max_new_tokens: int = 160,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> list[Sample]:
    """``n_per_prompt`` samples of every prompt from the generator as it is (no adapter, no steering).

    ``temperature=0`` decodes greedily (one answer per prompt is then enough).
    """
    if n_per_prompt < 1:
        raise ValidationError(
            "n_per_prompt", "must be at least 1", "sample one or more answers per prompt", n_per_prompt
        )
    from tqdm.auto import tqdm

    from personalign.steering.decoding import eos_token_ids

    tokenizer, model = generator.tokenizer, generator.model
    stops = set(eos_token_ids(tokenizer, model.generation_config))
    jobs = [p for p in prompts for _ in range(n_per_prompt)]
    out: list[Sample] = []
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress):
        chunk = jobs[start : start + batch_size]
        encoded = [chat_ids(tokenizer, p) for p in chunk]
        ids, mask = left_pad(encoded, tokenizer.pad_token_id)
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids.to(generator.device),
                attention_mask=mask.to(generator.device),
                **(
                    {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                    if temperature > 0
                    else {"do_sample": False}
                ),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        for prompt, prompt_ids, row in zip(chunk, encoded, output[:, ids.shape[1] :].tolist(), strict=True):
            end = next((i + 1 for i, t in enumerate(row) if t in stops), None)
            response = row[:end] if end is not None else row
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            out.append(Sample(prompt, prompt_ids, response, text, end is not None))
    return out


def save_samples(samples: Sequence[Sample], path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples))
    tmp.replace(path)


def load_samples(path: Path | str) -> list[Sample]:
    return [Sample(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
