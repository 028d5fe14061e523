"""What every steering method declares, and where the trained artefacts live on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

LOGIT_STEERABLE = ("verbosity",)
MAX_WEIGHT = 10.0  # the largest |steering weight|; here, not in decoding.py, so the request schema imports without torch
VAS_DIR = "vas"
VAS_MODEL_DIR = "vas_model"
MIX_DIR = "mix"
DPA_DIR = "dpa"
ARTEFACT_CONFIG = {
    VAS_DIR: "value_config.json",
    VAS_MODEL_DIR: "value_config.json",
    MIX_DIR: "mix_config.json",
}


class SteeringMethod:
    """One decode-time steering method. A subclass sets what applies and overrides the hooks it needs.

    Class attributes:
        name: the one name used everywhere (Python, CLI, HTTP, eval method names).
        aliases: older spellings accepted at the edges (``parse_steering``, the CLI).
        auto_rank: position in ``auto``'s order (lower first), ``None``: never chosen by ``auto``.
        value_kind: the artefact folder of value models whose guidance this method adds (VAS).
        mixes: whether a request adds one row per objective adapter, mixed at the logits (MODPO).
        runs_adapter: whether the request's row runs an adapter of the method's (``row_adapter``).
        acts_on_logits: whether the batch needs the steering logits processor for it.
        trains_with: the command that trains its artefacts (for messages and docs).
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    auto_rank: int | None = None
    value_kind: str | None = None
    mixes: bool = False
    runs_adapter: bool = False
    acts_on_logits: bool = False
    trains_with: str | None = None

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        """The objectives this method can steer (with ``model_id``: artefacts for that generator only)."""
        raise NotImplementedError

    def conversation(
        self, messages: list[dict[str, Any]], weights: Mapping[str, float], model_id: str | None
    ) -> list[dict[str, Any]]:
        """The conversation the generator sees (prompt-level methods rewrite it)."""
        return messages

    def row_adapter(self, runtime: Any, own: str, weights: Mapping[str, float]) -> str:
        """The adapter a request's row runs (``own``: the user's, or the plain base) for ``weights``."""
        return own

    def eos_shift(self, weights: Mapping[str, float]) -> float:
        """Added to the end-of-sequence logits (the hand-written verbosity processor)."""
        return 0.0

    def __repr__(self) -> str:
        return f"<steering method {self.name}>"


def steering_dir() -> Path:
    """Folder holding the trained steering artefacts (``vas/``, ``mix/``)."""
    override = os.environ.get("PERSONALIGN_STEERING_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("personalign") / "data" / "steering"))


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
    """The artefact scan behind :func:`installed`; ``mtime`` keys the cache (an install or
    removal changes the folder's modification time)."""
    if not folder.is_dir():
        return ()
    found = [p for p in folder.iterdir() if p.is_dir() and (p / ARTEFACT_CONFIG[kind]).is_file()]
    return tuple(sorted(p.name for p in found if model_id is None or _base_model(p, kind) == model_id))


def installed(kind: str, model_id: str | None = None) -> tuple[str, ...]:
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


def dpa_objectives(model_id: str | None = None) -> tuple[str, ...]:
    """The objectives the installed DPA adapter was trained on (one adapter for all of them)."""
    config = steering_dir() / DPA_DIR / "dpa_config.json"
    return _dpa_scan(config, model_id, _mtime(config))[0]


def dpa_line(model_id: str | None = None) -> str:
    """How the installed DPA adapter was taught the direction (``DpaConfig.line``; older ones: numbers)."""
    config = steering_dir() / DPA_DIR / "dpa_config.json"
    return _dpa_scan(config, model_id, _mtime(config))[1]
