"""A LoRA bank: K basis adapters shared by everyone; a user is a weight vector over them.

The bank's basis LoRAs are trained once (one per cluster of population users, or one per
objective). A new user is enrolled without a single gradient step on the generator: only the
K weights ``w`` are fitted to the user's comparisons, and the user's adapter is the **exact**
weighted sum of the basis weight deltas,

    dW(w) = sum_k w_k * s_k * B_k @ A_k          (s_k = lora_alpha_k / r_k)

which is itself a LoRA of rank ``sum_k r_k``: ``A = [A_1; ...; A_K]`` stacked by rows and
``B = [w_1 s_1 B_1, ..., w_K s_K B_K]`` by columns, with scaling 1. Averaging the A and B
matrices separately instead (what P-Soups' released merge script and RecLoRA do) computes
``(sum w_k B_k)(sum w_k A_k)``, whose cross terms ``B_j A_k`` belong to no basis. The
written adapter is built by PEFT's ``add_weighted_adapter(..., combination_type="cat")``,
which computes this same sum (PEFT's docs call ``cat`` exact and ``linear`` approximate).

Fitting (the implicit-reward likelihood of DPO). Basis ``k``'s implicit reward of a response
is ``beta * (log pi_k(y|x) - log pi_ref(y|x))`` with the reference = the generator without
adapters. A user's reward is modelled as ``sum_k w_k r_k`` and ``w`` maximises

    sum_i log sigmoid(sum_k w_k * m_ik) - ||w||^2 / (2 prior_scale^2),   m_ik = r_k(x_i, y_w) - r_k(x_i, y_l)

(``fit="linear"``, a K-dimensional logistic regression: K + 1 forward passes per comparison,
no gradient through the generator). This is the first-order expansion of the combined
adapter's own implicit reward, exact at every basis vertex. ``fit="exact"`` starts from that
solution and maximises the combined adapter's own implicit-reward likelihood, with gradients
through the frozen generator into the K weights only.

A basis as tensors lives in :mod:`personalign.adapters.bank_basis`, fitting a user's weights in
:mod:`personalign.adapters.bank_fit`; every name stays importable from here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personalign.adapters.bank_basis import (
    _A,
    _B,
    _PREFIX,
    Basis,
    _skeleton,
)
from personalign.adapters.bank_fit import (
    BankFit,
    BankFitting,
)
from personalign.adapters.lora import LoraTrainConfig
from personalign.adapters.store import AdapterError
from personalign.artefacts import atomic_write_json
from personalign.errors import ValidationError
from personalign.models import Generator
from personalign.types import Comparison

__all__ = [
    "BANK_FILE",
    "Basis",
    "BankFit",
    "LoraBank",
]


BANK_FILE = "personalign_bank.json"


class LoraBank(BankFitting):
    """K basis LoRAs over one generator, combined per user by an exact weighted sum of deltas."""

    def __init__(
        self,
        generator: Generator,
        bases: Sequence[Basis],
        beta: float = 0.1,
        prior_scale: float = 3.0,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        if not bases:
            raise ValidationError("bases", "is empty", "give the bank at least one basis adapter")
        if beta <= 0 or not math.isfinite(beta):
            raise ValidationError(
                "beta",
                "must be a positive finite number",
                "use the beta the bases were trained with, e.g. 0.1",
                beta,
            )
        self.generator = generator
        self.bases = list(bases)
        self.beta = beta
        self.prior_scale = prior_scale
        self.provenance = dict(provenance or {})
        self.modules = sorted(set().union(*(b.a for b in self.bases)))
        base = self._base_model()
        known = dict(base.named_modules())
        for module in self.modules:
            layer = known.get(module)
            weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
            if weight is None:
                raise AdapterError(
                    f"basis module {module!r} is not a layer of {generator.model_id!r}. Fix: build the bank on this base model"
                )
            for basis in self.bases:
                if module in basis.a and (basis.a[module].shape[1], basis.b[module].shape[0]) != (
                    weight.shape[1],
                    weight.shape[0],
                ):
                    raise AdapterError(
                        f"basis {basis.name!r} has the wrong shape for {module!r}. Fix: build the bank on this base model"
                    )
        # Per module: A of every basis stacked by rows (R, in), B by columns (out, R); zeros where a basis skips the module.
        self._a_cat: dict[str, torch.Tensor] = {}
        self._b_cat: dict[str, torch.Tensor] = {}
        for module in self.modules:
            weight = getattr(known[module], "base_layer", known[module]).weight
            out_f, in_f = weight.shape
            self._a_cat[module] = torch.cat(
                [b.a.get(module, torch.zeros(b.rank, in_f)) for b in self.bases]
            ).to(weight.device)
            self._b_cat[module] = torch.cat(
                [b.b.get(module, torch.zeros(out_f, b.rank)) for b in self.bases], dim=1
            ).to(weight.device)
        self._ranks = torch.tensor([b.rank for b in self.bases])
        self._scales = torch.tensor([b.scaling for b in self.bases], dtype=torch.float32)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.bases]

    @property
    def k(self) -> int:
        return len(self.bases)

    def _base_model(self) -> torch.nn.Module:
        model = self.generator.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_folders(cls, generator: Generator, folders: Sequence[Path | str], **kwargs: Any) -> LoraBank:
        return cls(generator, [Basis.load(Path(f)) for f in folders], **kwargs)

    @classmethod
    def train(
        cls,
        generator: Generator,
        groups: Mapping[str, Sequence[Comparison]],
        out: Path | str,
        config: LoraTrainConfig | None = None,
        **kwargs: Any,
    ) -> LoraBank:
        """Train one basis LoRA per group of comparisons (DPO on the group's pairs) and save the bank to ``out``."""
        from peft import LoraConfig, get_peft_model

        config = config or LoraTrainConfig()
        if not groups:
            raise ValidationError(
                "groups", "is empty", "pass {basis_name: [comparisons, ...]} with at least one group"
            )
        if hasattr(generator.model, "peft_config"):
            raise ValidationError(
                "generator", "already carries adapters", "train the bank on a freshly loaded generator"
            )
        from personalign.adapters.lora import train_adapter
        from personalign.training.loop import is_main_process

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".bank-"))
        base = generator.model
        try:
            for name, comparisons in groups.items():
                if not comparisons:
                    raise ValidationError(
                        f"groups[{name!r}]", "is empty", "give every basis at least one comparison"
                    )
                torch.manual_seed(config.seed)
                lora = LoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    lora_dropout=config.dropout,
                    target_modules=list(config.target_modules),
                    task_type="CAUSAL_LM",
                )
                peft = get_peft_model(base, lora, adapter_name=name)
                try:
                    train_adapter(peft, name, generator.tokenizer, list(comparisons), config)
                    peft.save_pretrained(str(staging), selected_adapters=[name], safe_serialization=True)
                finally:
                    base = peft.unload()
                saved = staging / name if (staging / name / "adapter_config.json").is_file() else staging
                if saved == staging:  # PEFT writes the first (default-named) adapter at the top level
                    target = staging / name
                    target.mkdir()
                    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
                        if (staging / f).exists():
                            os.replace(staging / f, target / f)
            generator.model = base
            bank = cls.from_folders(generator, [staging / n for n in groups], **kwargs)
            bank.provenance = {
                "groups": {n: len(c) for n, c in groups.items()},
                "config": config.model_dump(mode="json"),
                **bank.provenance,
            }
            if is_main_process():  # under accelerate launch every process trains the same bank; one writes it
                bank._write_manifest(staging)
                if out.exists():
                    shutil.rmtree(out)
                os.replace(staging, out)
            return bank
        finally:
            generator.model = base
            shutil.rmtree(staging, ignore_errors=True)

    def _write_manifest(self, folder: Path) -> None:
        atomic_write_json(
            folder / BANK_FILE,
            {
                "format": 1,
                "base_model": self.generator.model_id,
                "bases": self.names,
                "beta": self.beta,
                "prior_scale": self.prior_scale,
                "provenance": self.provenance,
            },
        )

    @classmethod
    def load(cls, generator: Generator, folder: Path | str) -> LoraBank:
        """A bank saved by :meth:`train`: ``personalign_bank.json`` and one PEFT folder per basis."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / BANK_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AdapterError(
                f"no readable bank at {folder} ({err}). Fix: train one with LoraBank.train"
            ) from None
        if not generator.is_base(manifest.get("base_model")):
            raise AdapterError(
                f"bank at {folder} was trained on {manifest.get('base_model')!r}, not {generator.model_id!r}. Fix: load the model it was trained on"
            )
        bases = [Basis.load(folder / name, name) for name in manifest["bases"]]
        return cls(
            generator,
            bases,
            beta=manifest["beta"],
            prior_scale=manifest["prior_scale"],
            provenance=manifest.get("provenance"),
        )

    # --- the combined adapter ----------------------------------------------------------------

    def _check_weights(self, weights: Any) -> torch.Tensor:
        w = (
            weights.detach().float().cpu()
            if torch.is_tensor(weights)
            else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        )
        w = w.reshape(-1)
        if w.shape[0] != self.k:
            raise ValidationError(
                "weights",
                f"has {w.shape[0]} entries, the bank has {self.k} bases",
                f"give one weight per basis: {self.names}",
            )
        if not torch.isfinite(w).all():
            raise ValidationError("weights", "contains NaN or infinite values", "refit the user's weights")
        return w

    def _column_scale(self, w: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(w * self._scales.to(w.device), self._ranks.to(w.device))  # (R,)

    def delta(self, weights: Any, module: str) -> torch.Tensor:
        """The combined update of ``module`` computed term by term: ``sum_k w_k s_k B_k A_k``."""
        w = self._check_weights(weights)
        total = None
        for wk, basis in zip(w.tolist(), self.bases, strict=True):
            if module in basis.a:
                term = wk * basis.delta(module)
                total = term if total is None else total + term
        return total

    def lora_tensors(self, weights: Any) -> tuple[int, dict[str, torch.Tensor]]:
        """The combined adapter as one LoRA of rank ``sum r_k`` (scaling 1): its rank and PEFT state dict."""
        w = self._check_weights(weights)
        scale = self._column_scale(w)
        tensors = {}
        for module in self.modules:
            tensors[_PREFIX + module + _A] = self._a_cat[module].detach().cpu().contiguous()
            tensors[_PREFIX + module + _B] = (
                (self._b_cat[module] * scale.to(self._b_cat[module].device)).detach().cpu().contiguous()
            )
        return int(self._ranks.sum()), tensors

    def peft_cat_tensors(self, weights: Any) -> tuple[int, dict[str, torch.Tensor]]:
        """The combined adapter built by PEFT: ``add_weighted_adapter(..., combination_type="cat")``.

        PEFT's ``cat`` stacks ``w_k * s_k * A_k`` by rows and ``B_k`` by columns under scaling 1,
        the same exact sum ``sum_k w_k s_k B_k A_k`` as :meth:`lora_tensors` (which scales B
        instead of A). The bases are loaded as PEFT adapters into a skeleton of the target layers
        that shares the generator's weights (nothing is copied, the generator is not touched).
        With one basis PEFT switches to its ``linear`` rule (square roots of the weight on A and
        B, undefined for a negative weight), so one basis is combined by :meth:`lora_tensors`.
        """
        from peft import LoraConfig, get_peft_model

        w = self._check_weights(weights)
        if self.k == 1:
            return self.lora_tensors(w)
        skeleton = _skeleton(self._base_model(), self.modules)
        names = [f"basis_{i}" for i in range(self.k)]
        peft = None
        for name, basis in zip(names, self.bases, strict=True):
            # lora_alpha = s * r gives PEFT's scaling s (rsLoRA's alpha / sqrt(r) included).
            config = LoraConfig(
                r=basis.rank,
                lora_alpha=basis.scaling * basis.rank,
                lora_dropout=0.0,
                target_modules=sorted(basis.a),
            )
            if peft is None:
                peft = get_peft_model(skeleton, config, adapter_name=name)
            else:
                peft.add_adapter(name, config)
        assert peft is not None
        layers = dict(peft.base_model.model.named_modules())
        with torch.no_grad():
            for name, basis in zip(names, self.bases, strict=True):
                for module in basis.a:
                    layers[module].lora_A[name].weight.copy_(basis.a[module])
                    layers[module].lora_B[name].weight.copy_(basis.b[module])
        peft.add_weighted_adapter(names, w.tolist(), "combined", combination_type="cat")
        tensors = {}
        for module in self.modules:
            layer = layers[module]
            tensors[_PREFIX + module + _A] = layer.lora_A["combined"].weight.detach().cpu().contiguous()
            tensors[_PREFIX + module + _B] = layer.lora_B["combined"].weight.detach().cpu().contiguous()
        return peft.peft_config["combined"].r, tensors

    def write_adapter(self, weights: Any, folder: Path | str) -> Path:
        """Write the combined adapter (:meth:`peft_cat_tensors`) as a plain PEFT LoRA folder of
        rank ``sum r_k`` and scaling 1 (loads in PEFT, vLLM and LoRAX)."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        rank, tensors = self.peft_cat_tensors(weights)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        targets = sorted({m.rsplit(".", 1)[-1] for m in self.modules})
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.generator.base_model_name_or_path,
        )
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    @contextmanager
    def applied(self, weights: Any) -> Iterator[None]:
        """Run the generator with the combined adapter of ``weights`` (a tensor may carry gradients).

        Other adapters on the model are switched off for the duration; each basis module adds
        ``((x @ A_cat.T) * colscale(w)) @ B_cat.T``, which equals ``sum_k w_k s_k B_k A_k x``.
        """
        w = weights if torch.is_tensor(weights) and weights.requires_grad else self._check_weights(weights)
        model = self.generator.model
        known = dict(self._base_model().named_modules())
        handles = []
        scale = self._column_scale(w.to(self.generator.device))

        def make_hook(module: str) -> Any:
            a, b = self._a_cat[module], self._b_cat[module]

            def hook(layer: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = inputs[0].to(a.dtype)
                return output + (((x @ a.T) * scale) @ b.T).to(output.dtype)

            return hook

        disable = model.disable_adapter() if hasattr(model, "disable_adapter") else None
        try:
            if disable is not None:
                disable.__enter__()
            for module in self.modules:
                handles.append(known[module].register_forward_hook(make_hook(module)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            if disable is not None:
                disable.__exit__(None, None, None)
