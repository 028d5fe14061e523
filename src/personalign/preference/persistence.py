"""The preference-embedder artefact: ``<name>_config.json`` (stamped with the package version, the
encoder and the feature size) + ``<name>.safetensors``, written atomically and checked on load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from personalign.artefacts import atomic_save_safetensors, atomic_write_text
from personalign.errors import ValidationError
from personalign.preference.featurizer import Featurizer

FORMAT_VERSION = 1
CONFIG_SUFFIX = "_config.json"
WEIGHTS_SUFFIX = ".safetensors"


# --- artefacts -----------------------------------------------------------------------------------


def artefact_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """``(<dir>/<name>_config.json, <dir>/<name>.safetensors)``."""
    directory = Path(directory)
    return directory / f"{name}{CONFIG_SUFFIX}", directory / f"{name}{WEIGHTS_SUFFIX}"


def save_artefact(
    directory: str | Path,
    name: str,
    featurizer: Featurizer,
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
) -> Path:
    """Write the config (stamped with package version, encoder and feature size) and the weights.

    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """

    import torch

    from personalign import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = artefact_paths(directory, name)
    stamped = {
        "method": name,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "encoder": featurizer.encoder_name,
        "feature_dim": featurizer.dim,
        "featurizer": featurizer.config.to_dict(),
        "config": dict(config),
    }
    cpu = {}
    for key, value in tensors.items():
        tensor = torch.as_tensor(value).detach().to("cpu")
        cpu[key] = (
            tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        ).contiguous()  # integer keys stay exact
    metadata = {"method": name, "package_version": __version__, "encoder": featurizer.encoder_name}
    atomic_save_safetensors(weights_path, cpu, metadata)
    atomic_write_text(config_path, json.dumps(stamped, indent=2, sort_keys=True) + "\n")
    return directory


def load_artefact(
    directory: str | Path, name: str, featurizer: Featurizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check an artefact written by :func:`save_artefact`; return ``(config, tensors)``.

    Raises ``ValidationError`` when the files are missing, were written by another method or
    encoder, or hold features of another size than ``featurizer`` produces.
    """
    from safetensors.torch import load_file

    config_path, weights_path = artefact_paths(directory, name)
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValidationError(
                "directory", f"has no {path.name}", f"pass a folder written by {name}.save()", str(directory)
            )
    try:
        stamped = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValidationError(
            config_path.name,
            f"is unreadable ({err})",
            f"re-save the embedder ({name}.save())",
            str(directory),
        ) from None
    if not isinstance(stamped, dict):
        raise ValidationError(
            config_path.name, "is not a JSON object", f"re-save the embedder ({name}.save())", str(directory)
        )
    if stamped.get("method") != name:
        raise ValidationError(
            f"{config_path.name}.method",
            f"is {stamped.get('method')!r}, not {name!r}",
            "load it with the matching embedder class",
        )
    if stamped.get("encoder") != featurizer.encoder_name:
        raise ValidationError(
            f"{config_path.name}.encoder",
            f"was trained on encoder {stamped.get('encoder')!r}, the featurizer uses {featurizer.encoder_name!r}",
            "load it with the encoder it was trained with, or retrain",
        )
    saved_parts = tuple(stamped.get("featurizer", {}).get("parts", ()))
    if saved_parts and saved_parts != featurizer.config.parts:
        raise ValidationError(
            f"{config_path.name}.featurizer.parts",
            f"is {saved_parts}, the featurizer uses {featurizer.config.parts}",
            "build the Featurizer with the saved parts",
        )
    if stamped.get("feature_dim") != featurizer.dim:
        raise ValidationError(
            f"{config_path.name}.feature_dim",
            f"is {stamped.get('feature_dim')}, the featurizer gives {featurizer.dim}",
            "load it with the encoder and feature parts it was trained with, or retrain",
        )
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # truncated or corrupted: safetensors raises its own error types
        raise ValidationError(
            weights_path.name,
            f"is unreadable ({type(err).__name__}: {err})",
            f"re-save or retrain the {name} embedder",
            str(directory),
        ) from None
    return stamped["config"], tensors


def check_tensor_shapes(
    tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Every expected tensor is present with exactly the expected shape."""
    for key, shape in expected.items():
        if key not in tensors:
            raise ValidationError(
                f"{where}.{key}", "is missing", "pass a folder written by save() of the same version"
            )
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValidationError(
                f"{where}.{key}",
                f"has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}",
                "retrain, or load with the matching featurizer",
            )
