"""One basis LoRA of a :class:`~personalign.adapters.bank.LoraBank` as plain tensors, read from a PEFT
folder, and the bare layer tree PEFT combines the bases on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from personalign.adapters.store import AdapterError, read_lora_folder

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class Basis:
    """One basis LoRA as plain tensors: per module path, ``A`` ``(r, in)`` and ``B`` ``(out, r)``."""

    name: str
    rank: int
    scaling: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    @classmethod
    def load(cls, folder: Path, name: str | None = None) -> Basis:
        """Read a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        config, tensors = read_lora_folder(folder, "basis adapter", "Fix: retrain the bank")
        if (
            config.get("use_dora")
            or config.get("modules_to_save")
            or config.get("rank_pattern")
            or config.get("alpha_pattern")
        ):
            raise AdapterError(
                f"basis adapter at {folder} is not a plain LoRA (DoRA, patterns or modules_to_save). Fix: train plain LoRA bases"
            )
        rank = int(config["r"])
        scaling = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        a = {k[len(_PREFIX) : -len(_A)]: v.float() for k, v in tensors.items() if k.endswith(_A)}
        b = {k[len(_PREFIX) : -len(_B)]: v.float() for k, v in tensors.items() if k.endswith(_B)}
        if not a or a.keys() != b.keys() or any(a[m].shape[0] != rank or b[m].shape[1] != rank for m in a):
            raise AdapterError(
                f"basis adapter at {folder} has LoRA tensors that do not match its rank {rank}. Fix: retrain the bank"
            )
        return cls(name or folder.name, rank, scaling, a, b)

    def delta(self, module: str) -> torch.Tensor:
        """This basis's weight update of ``module``: ``s * B @ A`` ``(out, in)``."""
        return self.scaling * self.b[module] @ self.a[module]


def _skeleton(base: torch.nn.Module, modules: Sequence[str]) -> torch.nn.Module:
    """A module tree holding only ``modules`` of ``base`` (same paths) as bias-free ``nn.Linear``
    layers whose weights are ``base``'s own tensors (shared, not copied)."""
    root = torch.nn.Module()
    known = dict(base.named_modules())
    for path in modules:
        layer = known[path]
        weight = getattr(layer, "base_layer", layer).weight  # (out, in)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, linear)
    return root
