"""Which decode-time steering methods exist and which objectives each one can steer.

``logit`` (hand-written logits processors, no training), ``prompt`` (an instruction in the
system prompt), ``vas`` (value heads on the generator's hidden state that guide the top-k logits),
``vas-model`` (the same guidance from a separate small value model), ``mix`` (objective
adapters mixed at the logit level, MODPO-style), ``dpa`` (one direction-conditioned adapter,
the direction written into the system prompt). ``vas`` and ``mix`` steer the objectives
whose artefacts are installed: the package ships defaults under ``personalign/data/steering``
and :func:`steering_dir` can point elsewhere (``PERSONALIGN_STEERING_DIR``).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

METHODS = ("auto", "logit", "prompt", "vas", "vas-model", "mix", "dpa")
LOGIT_STEERABLE = ("verbosity",)
MAX_WEIGHT = 10.0  # the largest |steering weight|; here, not in decoding.py, so the request schema imports without torch
VAS_DIR = "vas"
VAS_MODEL_DIR = "vas_model"
MIX_DIR = "mix"
DPA_DIR = "dpa"
# ``auto`` tries these in order and uses the first that steers every requested objective.
AUTO_ORDER = ("mix", "vas", "logit", "prompt")


def steering_dir() -> Path:
    """Folder holding the trained steering artefacts (``vas/``, ``mix/``)."""
    override = os.environ.get("PERSONALIGN_STEERING_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("personalign") / "data" / "steering"))


ARTEFACT_CONFIG = {VAS_DIR: "value_config.json", VAS_MODEL_DIR: "value_config.json", MIX_DIR: "mix_config.json"}


def _base_model(folder: Path, kind: str) -> str | None:
    try:
        return json.loads((folder / ARTEFACT_CONFIG[kind]).read_text()).get("base_model")
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


@lru_cache(maxsize=64)
def _scan(folder: Path, kind: str, model_id: str | None, mtime: float) -> tuple[str, ...]:
    """The artefact scan behind :func:`_installed`; ``mtime`` keys the cache (an install or
    removal changes the folder's modification time)."""
    if not folder.is_dir():
        return ()
    found = [p for p in folder.iterdir() if p.is_dir() and (p / ARTEFACT_CONFIG[kind]).is_file()]
    return tuple(sorted(p.name for p in found if model_id is None or _base_model(p, kind) == model_id))


def _installed(kind: str, model_id: str | None = None) -> tuple[str, ...]:
    """Objectives with a trained artefact (one sub-folder per objective), for ``model_id`` if given."""
    folder = steering_dir() / kind
    return _scan(folder, kind, model_id, _mtime(folder))


@lru_cache(maxsize=16)
def _dpa_scan(config: Path, model_id: str | None, mtime: float) -> tuple[tuple[str, ...], str]:
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        return (), "numbers"
    if model_id is not None and meta.get("base_model") != model_id:
        return (), "numbers"
    return tuple(meta.get("objectives", ())), str(meta.get("config", {}).get("line", "numbers"))


def _dpa_objectives(model_id: str | None = None) -> tuple[str, ...]:
    """The objectives the installed DPA adapter was trained on (one adapter for all of them)."""
    config = steering_dir() / DPA_DIR / "dpa_config.json"
    return _dpa_scan(config, model_id, _mtime(config))[0]


def dpa_line(model_id: str | None = None) -> str:
    """How the installed DPA adapter was taught the direction (``DpaConfig.line``; older ones: numbers)."""
    config = steering_dir() / DPA_DIR / "dpa_config.json"
    return _dpa_scan(config, model_id, _mtime(config))[1]


def steerable_by_method(model_id: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{method: objectives it can steer}`` for every concrete method (``auto`` excluded); with
    ``model_id``, only artefacts trained for that generator count."""
    from personalign.steering.prompting import PROMPTABLE

    return {
        "logit": LOGIT_STEERABLE,
        "prompt": PROMPTABLE,
        "vas": _installed(VAS_DIR, model_id),
        "vas-model": _installed(VAS_MODEL_DIR, model_id),
        "mix": _installed(MIX_DIR, model_id),
        "dpa": _dpa_objectives(model_id),
    }


def resolve_method(method: str, objectives: list[str], model_id: str | None = None) -> str | None:
    """The concrete method for ``method`` and the requested objectives (``None``: none can)."""
    table = steerable_by_method(model_id)
    if method != "auto":
        return method if set(objectives) <= set(table.get(method, ())) else None
    return next((m for m in AUTO_ORDER if set(objectives) <= set(table[m])), None)
