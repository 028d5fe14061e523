"""Turns each request's steering into one ``generate`` call: rows, adapter names and processors.

``prompt`` steering changes the conversation (see :func:`steer_system`); the others act on
logits. ``mix`` adds rows: for a request with objective adapters ``k_1..k_n`` the batch gets
``[primary, (plain base if the primary runs a user's adapter), k_1, ..., k_n]``, all with the
same tokens, and the :class:`SteeringProcessor` forces them to the same next token.
``vas`` loads value models (``vas``: trunk heads on the generator's hidden state;
``vas-model``: a separate small GRU value model). A batch without any non-zero steering gets
no processor and no extra rows, so it decodes exactly as plain ``generate``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from personalign.adapters.store import BASE
from personalign.errors import ValidationError
from personalign.steering.decoding import (
    HiddenCapture,
    MixedHead,
    SteeringProcessor,
    eos_token_ids,
    head_mixable,
    mix_terms,
)
from personalign.steering.methods import (
    DPA_DIR,
    MIX_DIR,
    REGISTRY,
    VAS_DIR,
    resolve_method,
    steerable_by_method,
    steering_dir,
)
from personalign.steering.methods.dpa import dpa_direction  # noqa: F401 (re-exported)

WEIGHT_MIX_RESIDENT = 16  # weight-mix adapters kept built (LRU); each is rank sum(r_k), ~2 MB here


def steer_system(messages: list[dict[str, Any]], weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """``messages`` with the prompting baseline's instruction added to the system message."""
    return REGISTRY["prompt"].conversation(messages, weights, None)


@dataclass
class Plan:
    """One ``generate`` call: rows (request rows first), adapter names, processors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    names: list[str] | None
    processors: LogitsProcessorList
    primary: list[int]
    owner: list[int] = field(default_factory=list)  # the request each row belongs to
    greedy: bool = False
    capture: HiddenCapture | None = None
    mixer: MixedHead | None = None
    methods: list[str] = field(default_factory=list)


class SteeringRuntime:
    """Loads steering artefacts on first use and plans steered batches for one generator."""

    def __init__(self, generator: Any, adapters: Any = None, folder: Path | str | None = None) -> None:
        self.generator = generator
        self.adapters = adapters
        self.folder = Path(folder) if folder is not None else None
        self._values: dict[tuple[str, str], Any] = {}
        self._weight_mixes: OrderedDict[str, tuple[tuple[str, float], ...]] = OrderedDict()
        self._planning: set[str] = set()  # weight-mix adapters the batch being planned uses

    def root(self) -> Path:
        return self.folder if self.folder is not None else steering_dir()

    def method(
        self, requested: str, weights: Mapping[str, float], allowed: Collection[str] | None = None
    ) -> str | None:
        """The method that steers ``weights`` (``auto``: the first in order among ``allowed``)."""
        names = [k for k, v in weights.items() if v != 0.0]
        if not names:
            return None
        method = resolve_method(requested, names, self.generator.model_id, allowed)
        if method is None:
            table = steerable_by_method(self.generator.model_id)
            raise ValidationError(
                "steer.method",
                f"{requested!r} cannot steer {names} on {self.generator.model_id!r}",
                f"choose a method that can (here: {table}), or train one (personalign train vas|modpo)",
                requested,
            )
        return method

    def value_model(self, kind: str, objective: str) -> Any:
        from personalign.adapters.value import load_value_model

        key = (kind, objective)
        if key not in self._values:
            self._values[key] = load_value_model(self.root() / kind / objective, self.generator)
        return self._values[key]

    def _adapter(self, name: str, folder: Path, method: str) -> str:
        """Adapter ``name`` from ``folder`` in the adapter manager's PEFT model (loaded once)."""
        manager = self.adapters
        if manager is None:
            raise ValidationError(
                "steer.method", f"{method} needs the adapter manager", "use a Personalizer, or another method"
            )
        if manager.peft is None or name not in manager.peft.peft_config:
            with torch.inference_mode(False), torch.no_grad():
                manager._attach(name, folder)
        return name

    def mix_adapter(self, objective: str) -> str:
        """The MODPO objective adapter's name (loaded once)."""
        return self._adapter(f"steer_{objective}", self.root() / MIX_DIR / objective, "mix")

    def dpa_adapter(self) -> str:
        """The DPA adapter's name (loaded once)."""
        from personalign.steering.dpa import ADAPTER_NAME

        return self._adapter(ADAPTER_NAME, self.root() / DPA_DIR, "dpa")

    def weight_mix_adapter(self, weights: Mapping[str, float]) -> str:
        """The adapter ``sum_k w_k dW_k`` over the MODPO objective adapters (built once per direction).

        PEFT's ``add_weighted_adapter`` with ``combination_type="cat"`` concatenates the
        weighted ``A_k`` and the ``B_k``, so the new adapter's update is the weighted sum of the
        objective adapters' updates exactly. The least recently used one is deleted past
        :data:`WEIGHT_MIX_RESIDENT`, never one the batch being planned uses.
        """
        terms = tuple((self.mix_adapter(k), float(v)) for k, v in sorted(weights.items()) if v != 0.0)
        name = "weightmix_" + hashlib.sha256(repr(terms).encode()).hexdigest()[:16]
        self._planning.add(name)
        manager = self.adapters
        if name in self._weight_mixes and name in manager.peft.peft_config:
            self._weight_mixes.move_to_end(name)
        else:
            with torch.inference_mode(False), torch.no_grad():
                manager.peft.add_weighted_adapter(
                    [n for n, _ in terms], [w for _, w in terms], name, combination_type="cat"
                )
            self._weight_mixes[name] = terms
        for old in [n for n in self._weight_mixes if n not in self._planning]:
            if len(self._weight_mixes) <= WEIGHT_MIX_RESIDENT:
                break
            del self._weight_mixes[old]
            manager._drop(old)
        return name

    def plan(
        self,
        rows: Sequence[list[int]],
        adapter_names: Sequence[str] | None,
        steers: Sequence[tuple[Mapping[str, float], str]],
        temperature: Sequence[float],
        top_p: Sequence[float],
        pad: int,
        guides: Sequence[Sequence[float] | None] | None = None,
        guide_models: Sequence[Any] = (),
    ) -> Plan:
        """The batch for requests ``rows`` (prompt ids) with per-request ``(weights, method)``.

        ``guides``: per request, ``None`` or one guidance strength per model of ``guide_models``
        (trunk value heads; for ``user-vas`` the user's ``beta * pi_u`` over the prototype heads),
        added to the VAS guidance of that request's row.
        """
        guided = guides is not None and any(g is not None and any(g) for g in guides)
        self._planning = set()
        methods = [self.method(m, w) if w else None for w, m in steers]
        tokenizer = self.generator.tokenizer
        eos_ids = eos_token_ids(tokenizer, getattr(self.generator.model, "generation_config", None))
        names = list(adapter_names) if adapter_names is not None else None
        groups: list[list[int]] = []
        all_rows: list[list[int]] = []
        all_names: list[str] = []
        mix_weights: list[list[float]] = []
        base_rows: list[int | None] = []
        owner: list[int] = []
        mixes = [m is not None and REGISTRY[m].mixes for m in methods]
        mix_objectives = sorted(
            {
                k
                for (w, _), mixing in zip(steers, mixes, strict=True)
                if mixing
                for k, v in w.items()
                if v != 0.0
            }
        )
        # With an affine head the mix happens before it (MixedHead), and a request runs only the
        # rows whose coefficient is nonzero; otherwise every request has the fixed row layout
        # that SteeringProcessor mixes log-probabilities over.
        premixed = bool(mix_objectives) and head_mixable(self.generator.model)
        terms: list[list[tuple[int, float]]] = []  # per request: (row, coefficient) when premixed
        for i, (row, ((weights, _), method)) in enumerate(
            zip(rows, zip(steers, methods, strict=True), strict=True)
        ):
            own = names[i] if names is not None else BASE
            if method is not None:
                own = REGISTRY[method].row_adapter(self, own, weights)
            if premixed:
                objectives = (
                    [(self.mix_adapter(k), float(weights.get(k, 0.0))) for k in mix_objectives]
                    if mixes[i]
                    else []
                )
                group, request_terms = [], []
                for name, coefficient in mix_terms(own, objectives):
                    group.append(len(all_rows))
                    request_terms.append((len(all_rows), coefficient))
                    all_rows.append(row)
                    all_names.append(name)
                terms.append(request_terms)
                groups.append(group)
                owner += [i] * (len(all_rows) - len(owner))
                continue
            group = [len(all_rows)]
            all_rows.append(row)
            all_names.append(own)
            base_row: int | None = None
            if mixes[i]:
                if own != BASE:
                    base_row = len(all_rows)
                    group.append(base_row)
                    all_rows.append(row)
                    all_names.append(BASE)
                for objective in mix_objectives:
                    group.append(len(all_rows))
                    all_rows.append(row)
                    all_names.append(self.mix_adapter(objective))
                mix_weights.append([float(weights.get(k, 0.0)) for k in mix_objectives])
            else:
                mix_weights.append([0.0] * len(mix_objectives))
            base_rows.append(base_row)
            groups.append(group)
            owner += [i] * (len(all_rows) - len(owner))
        width = max(len(r) for r in all_rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in all_rows])  # (N, T)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in all_rows])  # (N, T)
        processors = LogitsProcessorList()
        uses_adapters = (
            names is not None
            or bool(mix_objectives)
            or any(m is not None and REGISTRY[m].runs_adapter for m in methods)
        )
        plan = Plan(
            input_ids,
            mask,
            all_names if uses_adapters else None,
            processors,
            [g[0] for g in groups],
            owner,
            methods=[m or "" for m in methods],
        )
        if not any(m is not None and REGISTRY[m].acts_on_logits for m in methods) and not guided:
            return plan
        kinds = [
            REGISTRY[m].value_kind if m is not None else None for m in methods
        ]  # per request: its value models' folder
        value_keys = sorted(
            {
                (kind, k)
                for (w, _), kind in zip(steers, kinds, strict=True)
                if kind
                for k, v in w.items()
                if v != 0.0
            }
        )
        value_models = [self.value_model(kind, k) for kind, k in value_keys]
        betas = [
            [
                float(w.get(k, 0.0)) * model.config.default_beta if own_kind == kind else 0.0
                for (kind, k), model in zip(value_keys, value_models, strict=True)
            ]
            for (w, _), own_kind in zip(steers, kinds, strict=True)
        ]
        if guided:
            value_models = [*value_models, *guide_models]
            betas = [
                b + (list(g) if g is not None else [0.0] * len(guide_models))
                for b, g in zip(betas, guides or [], strict=True)
            ]
        eos = [
            REGISTRY[m].eos_shift(w) if m is not None else 0.0
            for (w, _), m in zip(steers, methods, strict=True)
        ]
        if any(kind == VAS_DIR for kind, _ in value_keys) or guided:
            plan.capture = HiddenCapture(self.generator.model)
        if premixed and len(all_rows) > len(
            rows
        ):  # after the capture, whose value heads read the unmixed rows
            coefficients = torch.zeros(len(rows), len(all_rows))  # (R, N)
            for i, request_terms in enumerate(terms):
                for r, coefficient in request_terms:
                    coefficients[i, r] = coefficient
            plan.mixer = MixedHead(self.generator.model, coefficients, owner)
        processors.append(
            SteeringProcessor(
                groups,
                mix_weights=mix_weights if mix_objectives and not premixed else None,
                base_rows=base_rows,
                value_models=value_models,
                betas=betas if value_models else None,
                capture=plan.capture,
                prompt_ids=input_ids,
                prompt_mask=mask,
                eos_ids=eos_ids,
                eos_shift=eos,
                temperature=list(temperature),
                top_p=list(top_p),
            )
        )
        plan.greedy = len(all_rows) > len(rows)
        return plan
