"""Who a user is, from their comparisons: the preference embedders (registry
``EMBEDDER_CLASSES``: bt, meandiff, pal, vpl), the featurizer, item effects, active questions and
drift. (What goes into the prompt is :mod:`personalign.conditioning`.)

:func:`save_embedder` / :func:`load_embedder` store any embedder with its featurizer settings
and a provenance note, so a folder can be loaded without knowing which method wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from personalign.artefacts import atomic_write_text
from personalign.errors import ValidationError
from personalign.models import Encoder
from personalign.preference.base import (
    CONFIG_SUFFIX,
    Featurizer,
    FeaturizerConfig,
    PreferenceEmbedder,
    UserState,
)
from personalign.preference.bt import BradleyTerry
from personalign.preference.meandiff import MeanDiff
from personalign.preference.pal import PAL
from personalign.preference.vpl import VPL

EMBEDDER_CLASSES: dict[str, Any] = {"bt": BradleyTerry, "meandiff": MeanDiff, "pal": PAL, "vpl": VPL}
MANIFEST = "embedder.json"

__all__ = [
    "EMBEDDER_CLASSES",
    "PAL",
    "VPL",
    "BradleyTerry",
    "MeanDiff",
    "Featurizer",
    "FeaturizerConfig",
    "PreferenceEmbedder",
    "UserState",
    "default_embedder_dir",
    "load_embedder",
    "save_embedder",
]


def save_embedder(embedder: Any, directory: str | Path, provenance: Mapping[str, Any] | None = None) -> Path:
    """Save ``embedder`` (its own config + safetensors) and ``embedder.json`` naming the method and the data it saw."""
    directory = Path(directory)
    embedder.save(directory)
    manifest = {
        "method": embedder.name,
        "featurizer": embedder.featurizer.config.to_dict(),
        "provenance": dict(provenance or {}),
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; an unreadable or garbled file is a ``ValidationError`` naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValidationError(
            path.name, f"is unreadable ({err})", "re-save the embedder, or pass another folder", str(path)
        ) from None
    if not isinstance(value, dict):
        raise ValidationError(
            path.name, "is not a JSON object", "re-save the embedder, or pass another folder", str(path)
        )
    return value


def load_embedder(directory: str | Path, encoder: Encoder, generator: Any = None) -> Any:
    """Load the embedder saved in ``directory`` (any method), with the feature parts it was trained on.

    Raises ``ValidationError`` naming the file when the folder holds no embedder, or one made
    for another encoder or feature size.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        manifest = _read_json(manifest_path)
        method = manifest.get("method")
    else:
        found = [
            p.name[: -len(CONFIG_SUFFIX)]
            for p in directory.glob(f"*{CONFIG_SUFFIX}")
            if p.name[: -len(CONFIG_SUFFIX)] in EMBEDDER_CLASSES
        ]
        if len(found) != 1:
            raise ValidationError(
                "embedder",
                f"{directory} holds no single embedder ({found or 'nothing found'})",
                "pass a folder written by `personalign train pal|vpl`",
                str(directory),
            )
        method = found[0]
    if method not in EMBEDDER_CLASSES:
        raise ValidationError(
            f"{MANIFEST}.method", f"is {method!r}", f"expected one of {', '.join(EMBEDDER_CLASSES)}", method
        )
    config_path = directory / f"{method}{CONFIG_SUFFIX}"
    if not config_path.is_file():
        raise ValidationError(
            "embedder",
            f"{directory} has no {config_path.name}",
            "pass a folder written by `personalign train pal|vpl`",
            str(directory),
        )
    stamped = _read_json(config_path)
    parts = tuple(stamped.get("featurizer", {}).get("parts", ()))
    if "hidden" in parts and generator is None:
        raise ValidationError(
            "generator",
            f"is needed: {config_path.name} uses the generator's hidden states as features",
            "pass the generator it was trained with",
        )
    featurizer = Featurizer(
        encoder, FeaturizerConfig(parts=parts) if parts else None, generator if "hidden" in parts else None
    )
    return EMBEDDER_CLASSES[method].load(directory, featurizer)


def default_embedder_dir() -> Path:
    """The embedder shipped with the package: PAL fitted on the project's synthetic population only."""
    return Path(str(resources.files("personalign") / "data" / "embedder"))
