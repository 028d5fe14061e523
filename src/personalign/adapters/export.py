"""Export users' adapters for serving engines: vLLM multi-LoRA and LoRAX.

Each adapter is copied unchanged apart from ``base_model_name_or_path`` (set to the base the
engine serves) into ``<out>/<user>/``, next to what the engine takes:

- vLLM: ``serve.sh`` (``vllm serve BASE --enable-lora --lora-modules user=path ...``) and
  ``lora_modules.json``; a request selects a user with ``"model": "<user>"``.
- LoRAX: ``lorax.json`` (launcher arguments and one local adapter id per user) and
  ``request_example.json``; a request selects a user with ``parameters.adapter_id``.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from personalign.adapters.store import ADAPTER_DIR, META_FILE
from personalign.artefacts import atomic_write_json
from personalign.errors import ValidationError
from personalign.types import validate_user_id

Engine = Literal["vllm", "lorax"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)


def _copy_adapter(source: Path, target: Path, base_model: str) -> dict[str, Any]:
    target.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, target / name)
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model
    atomic_write_json(target / "adapter_config.json", config)
    return config


def export_adapters(
    users_dir: Path, users: Sequence[str], engine: Engine, out: Path, base_model: str
) -> dict[str, Any]:
    """Copy ``users``' adapters to ``out`` and write the engine's serving config; returns a manifest."""
    if engine not in ("vllm", "lorax"):
        raise ValidationError("engine", "is not a supported engine", "use 'vllm' or 'lorax'", engine)
    if not users:
        raise ValidationError("users", "is empty", "name at least one user with an adapter")
    missing = [
        u
        for u in users
        if not (users_dir / validate_user_id(u) / ADAPTER_DIR / "adapter_config.json").is_file()
    ]
    if missing:
        raise ValidationError(
            "users",
            f"have no adapter: {missing}",
            "train one with enroll(..., adapter=True) or `personalign train user-lora`",
        )
    out.mkdir(parents=True, exist_ok=True)
    adapters: dict[str, dict[str, Any]] = {}
    for user in users:
        config = _copy_adapter(users_dir / user / ADAPTER_DIR, out / user, base_model)
        adapters[user] = {
            "path": str((out / user).resolve()),
            "rank": config["r"],
            "target_modules": config["target_modules"],
        }
    max_rank = max(a["rank"] for a in adapters.values())
    manifest: dict[str, Any] = {"engine": engine, "base_model": base_model, "adapters": adapters}
    if engine == "vllm":
        modules = [{"name": u, "path": a["path"], "base_model_name": base_model} for u, a in adapters.items()]
        atomic_write_json(out / "lora_modules.json", modules)
        args = [
            "vllm",
            "serve",
            base_model,
            "--enable-lora",
            "--max-loras",
            str(min(len(users), 32)),
            "--max-lora-rank",
            str(max_rank),
        ]
        args += ["--lora-modules", *(f"{u}={a['path']}" for u, a in adapters.items())]
        command = shlex.join(args)
        (out / "serve.sh").write_text(
            f'#!/usr/bin/env bash\n# Serve {len(users)} personalign users; select one per request with "model": "<user>".\n{command}\n'
        )
        (out / "serve.sh").chmod(0o755)
        manifest["command"] = command
    else:
        launcher = {"model_id": base_model, "max_lora_rank": max_rank}
        atomic_write_json(
            out / "lorax.json",
            {
                "launcher": launcher,
                "adapters": {
                    u: {"adapter_source": "local", "adapter_id": a["path"]} for u, a in adapters.items()
                },
            },
        )
        first = next(iter(adapters.values()))
        example = {
            "inputs": "Plan my dinner.",
            "parameters": {"adapter_source": "local", "adapter_id": first["path"], "max_new_tokens": 128},
        }
        atomic_write_json(out / "request_example.json", example)
        manifest["command"] = shlex.join(
            ["lorax-launcher", "--model-id", base_model, "--max-lora-rank", str(max_rank)]
        )
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
