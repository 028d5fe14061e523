"""Mixed-adapter batches in one gathered matmul per layer (the Punica / S-LoRA idea).

PEFT's ``adapter_names`` path loops, in every LoRA layer of every decoding step, over the
adapters present in the batch and runs each on its own slice of rows: with 8 users in a
batch of 8 that is 8 tiny matmul pairs plus indexing per layer, and the Python overhead
dominates a small model on CPU. Here the batch's adapters are stacked once per ``generate``
call and each LoRA layer adds

    delta[b] = (x[b] @ A[slot(b)].T) @ (scaling[slot(b)] * B[slot(b)]).T

for all rows at once with two batched matmuls (``torch.bmm``) over gathered weights. Rows
without an adapter gather an all-zero slot, so they compute exactly the base layer.

Adapters of different ranks share one stack: a rank-r adapter is zero-padded to the batch's
largest rank, which adds exact zeros. A layer an adapter does not target gets zeros for that
adapter. DoRA and other LoRA variants are not handled here; :func:`supports_gathered` says
when the caller must fall back to PEFT's own path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from personalign.adapters.store import BASE


def _lora_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora.layer import LoraLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)
    ]


def supports_gathered(model: torch.nn.Module, names: Sequence[str]) -> bool:
    """Whether every named adapter is plain LoRA on ``nn.Linear`` layers (no DoRA, no variants)."""
    wanted = {n for n in names if n != BASE}
    for layer in _lora_layers(model):
        for name in wanted & set(layer.lora_A):
            if layer.use_dora.get(name, False) or getattr(layer, "lora_variant", {}).get(name) is not None:
                return False
    peft_config = getattr(model, "peft_config", {})
    return all(name in peft_config for name in wanted)


def _stack(layer: Any, slots: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``A`` as ``(S + 1, r, in)`` and ``scaling * B`` as ``(S + 1, out, r)``; the last slot is zeros."""
    present = [s for s in slots if s in layer.lora_A]
    if not present:
        return None
    weight = layer.base_layer.weight
    rank = max(layer.r[s] for s in present)
    a = weight.new_zeros(len(slots) + 1, rank, layer.in_features)
    b = weight.new_zeros(len(slots) + 1, layer.out_features, rank)
    for i, slot in enumerate(slots):
        if slot in layer.lora_A:
            r = layer.r[slot]
            a[i, :r] = layer.lora_A[slot].weight
            b[i, :, :r] = layer.lora_B[slot].weight * layer.scaling[slot]
    return a, b


@contextmanager
def gathered_lora(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run ``model`` with row ``i`` of every batch on adapter ``names[i]`` (``"__base__"``: none).

    Use it around a forward or ``generate`` call of a PEFT model whose adapters are disabled
    (``with model.disable_adapter(), gathered_lora(model, names): model.generate(...)``): the
    LoRA layers then return the base output and a forward hook adds each row's own delta.
    The batch size of every forward must be ``len(names)``.
    """
    slots = list(dict.fromkeys(n for n in names if n != BASE))
    index = {slot: i for i, slot in enumerate(slots)}
    handles = []
    device = None
    try:
        for layer in _lora_layers(model):
            stacked = _stack(layer, slots)
            if stacked is None:
                continue
            a, b = stacked
            if device is None:
                device = a.device
                rows = torch.tensor([index.get(n, len(slots)) for n in names], device=device)
            a_rows, b_rows = a[rows], b[rows]  # (B, r, in), (B, out, r): gathered once per call

            def hook(
                module: Any,
                inputs: tuple[Any, ...],
                output: torch.Tensor,
                a_rows: torch.Tensor = a_rows,
                b_rows: torch.Tensor = b_rows,
            ) -> torch.Tensor:
                x = inputs[0]
                if x.shape[0] != a_rows.shape[0]:
                    raise RuntimeError(
                        f"gathered_lora was set up for a batch of {a_rows.shape[0]} rows, got {x.shape[0]}"
                    )
                flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype)  # (B, T, in)
                delta = torch.bmm(
                    torch.bmm(flat, a_rows.transpose(1, 2)), b_rows.transpose(1, 2)
                )  # (B, T, out)
                return output + delta.reshape(output.shape).to(output.dtype)

            handles.append(layer.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
