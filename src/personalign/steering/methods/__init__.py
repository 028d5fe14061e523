"""The decode-time steering methods: one module per method in this package, one registry.

``logit`` (hand-written logits processors, no training), ``prompt`` (an instruction in the
system prompt), ``vas`` (value heads on the generator's hidden state that guide the top-k logits),
``vas-model`` (the same guidance from a separate small value model), ``mix`` (objective
adapters mixed at the logit level, MODPO-style), ``weight-mix`` (the same adapters added in weight
space: one adapter per direction), ``dpa`` (one direction-conditioned adapter,
the direction written into the system prompt). ``vas`` and ``mix`` steer the objectives
whose artefacts are installed: the package ships defaults under ``personalign/data/steering``
and :func:`steering_dir` can point elsewhere (``PERSONALIGN_STEERING_DIR``).

A method is a :class:`~personalign.steering.methods.base.SteeringMethod` in its own module here
(what it can steer, how it changes the conversation, which adapter its row runs, whether it adds
value guidance, rows or an end-of-sequence shift); :data:`REGISTRY` lists them, and the runtime,
the request schema, the CLI and the harnesses read it. Adding a method is one module and one line
in ``_MODULES``. This package imports without torch (the request schema depends on it).
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import import_module

from personalign.steering.methods.base import (
    DPA_DIR,
    LOGIT_STEERABLE,
    MAX_WEIGHT,
    MIX_DIR,
    VAS_DIR,
    VAS_MODEL_DIR,
    SteeringMethod,
    dpa_line,
    installed,
    steering_dir,
)

_MODULES = ("logit", "prompt", "vas", "mix", "weight_mix", "dpa")  # one line per method module
REGISTRY: dict[str, SteeringMethod] = {}
for _module in _MODULES:
    for _method in import_module(f"personalign.steering.methods.{_module}").METHODS:
        REGISTRY[_method.name] = _method

METHODS = ("auto", *REGISTRY)
# ``auto`` tries these in order and uses the first that steers every requested objective.
AUTO_ORDER = tuple(
    sorted(
        (m.name for m in REGISTRY.values() if m.auto_rank is not None), key=lambda n: REGISTRY[n].auto_rank
    )
)  # type: ignore[arg-type,return-value]
ALIASES = {alias: m.name for m in REGISTRY.values() for alias in m.aliases}


def canonical(name: str) -> str:
    """The method's one name for a documented alias (``modpo`` -> ``mix``, ``trunk`` -> ``vas``,
    ``gru``/``vas_model`` -> ``vas-model``); other names unchanged."""
    return ALIASES.get(name, name)


def steerable_by_method(model_id: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{method: objectives it can steer}`` for every concrete method (``auto`` excluded); with
    ``model_id``, only artefacts trained for that generator count."""
    return {name: method.steerable(model_id) for name, method in REGISTRY.items()}


def resolve_method(
    method: str, objectives: list[str], model_id: str | None = None, allowed: Collection[str] | None = None
) -> str | None:
    """The concrete method for ``method`` and the requested objectives (``None``: none can).

    ``allowed``: the methods the generation backend can run (``auto`` picks among them only).
    """
    table = steerable_by_method(model_id)
    if method != "auto":
        return method if set(objectives) <= set(table.get(method, ())) else None
    order = [m for m in AUTO_ORDER if allowed is None or m in allowed]
    return next((m for m in order if set(objectives) <= set(table[m])), None)


__all__ = [
    "ALIASES",
    "AUTO_ORDER",
    "DPA_DIR",
    "LOGIT_STEERABLE",
    "MAX_WEIGHT",
    "METHODS",
    "MIX_DIR",
    "REGISTRY",
    "VAS_DIR",
    "VAS_MODEL_DIR",
    "SteeringMethod",
    "canonical",
    "dpa_line",
    "installed",
    "resolve_method",
    "steerable_by_method",
    "steering_dir",
]
