"""Export users' adapters for serving engines: vLLM multi-LoRA and LoRAX.

Each adapter is copied unchanged apart from ``base_model_name_or_path`` (set to the base the
engine serves) into ``<out>/<user>/``, next to what the engine takes:

- vLLM: ``serve.sh``, ``vllm serve BASE --enable-lora --max-loras N --max-lora-rank R
  --lora-modules user=<out>/user ...``; a request selects a user with ``"model": "<user>"``.
  ``--max-lora-rank`` must be one of vLLM's ranks (:data:`VLLM_MAX_LORA_RANKS`), so the
  largest adapter rank is rounded up (:func:`vllm_max_lora_rank`). ``<out>`` is also laid out as
  the cache folder of vLLM's filesystem LoRA resolver (``<cache>/<lora_name>/``), so
  ``manifest["resolver_command"]`` serves any number of users loaded on first request.
- LoRAX: ``lorax.json`` (``lorax-launcher`` arguments and one local adapter per user),
  ``request_example.json`` (``POST /generate``) and ``chat_request_example.json``
  (``POST /v1/chat/completions``). LoRAX loads an adapter per request from
  ``adapter_id`` + ``adapter_source: "local"``; its launcher has no rank flag.

The base defaults to the one the adapters name (the hub id for the embedded model), so the
commands start on any machine that can download it; ``base_model`` overrides it. Nothing in the
written files names a path outside ``out`` except a ``base_model`` folder passed explicitly.
Argument sets were checked against vLLM's ``vllm/engine/arg_utils.py`` and
``vllm/entrypoints/openai/cli_args.py`` and LoRAX's ``launcher/src/main.rs`` (see
``tests/test_export.py``).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from personalign.adapters.store import ADAPTER_DIR, META_FILE
from personalign.artefacts import atomic_write_json
from personalign.errors import ValidationError
from personalign.models import EMBEDDED_GENERATOR_HUB_ID, hub_id
from personalign.types import validate_user_id

Engine = Literal["vllm", "lorax"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)
# vLLM's `MaxLoRARanks` (vllm/config/lora.py); versions before it accepted 8..512 only, so
# ranks are never rounded below 8 and the command starts on both.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MIN_PORTABLE_RANK = 8
VLLM_MAX_LORAS = 32  # adapters in one batch (GPU slots); the rest wait in the CPU cache
EMBEDDED_BASE_NOTE = (
    f"base model {EMBEDDED_GENERATOR_HUB_ID} is the hub's checkpoint; the adapters were trained on "
    "personalign's embedded copy (de-quantised from a 4-bit GGUF), whose weights differ slightly, "
    "so outputs are close to but not identical with personalign's. Pass --base-model <folder> with "
    "the converted weights (under $PERSONALIGN_CACHE/models/) to serve exactly those"
)


def vllm_max_lora_rank(rank: int, field: str = "rank") -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that fits adapters of rank ``rank``.

    vLLM takes only :data:`VLLM_MAX_LORA_RANKS`; the result is at least 8, the smallest rank
    every vLLM release with ``--max-lora-rank`` accepts. 1 -> 8, 9 -> 16, 257 -> 320.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValidationError(field, "must be a positive integer LoRA rank", "fix adapter_config.json", rank)
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= max(rank, VLLM_MIN_PORTABLE_RANK)]
    if not fits:
        raise ValidationError(
            field,
            f"is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
            "train the adapter with a smaller rank",
            rank,
        )
    return fits[0]


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest LoRA rank in a PEFT ``adapter_config.json``: ``r`` or any ``rank_pattern`` entry."""
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def lora_module_arg(name: str, path: str, base_model: str) -> str:
    """One ``--lora-modules`` item: ``name=path``, or vLLM's JSON form when the path holds ``=`` or ``,``.

    vLLM's ``LoRAParserAction`` reads an item with ``=`` and no ``,`` as ``name=path`` (split on
    every ``=``) and anything else as JSON.
    """
    if "=" in path or "," in path:
        return json.dumps({"name": name, "path": path, "base_model_name": base_model})
    return f"{name}={path}"


def vllm_serve_args(base_model: str, adapters: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``vllm serve`` arguments serving ``adapters`` (user -> {"path", "rank"}) on ``base_model``."""
    max_loras = min(len(adapters), VLLM_MAX_LORAS)
    args = ["vllm", "serve", base_model, "--enable-lora", "--max-loras", str(max_loras)]
    args += ["--max-lora-rank", str(vllm_max_lora_rank(max(a["rank"] for a in adapters.values())))]
    if len(adapters) > max_loras:
        args += ["--max-cpu-loras", str(len(adapters))]
    return args + [
        "--lora-modules",
        *(lora_module_arg(u, a["path"], base_model) for u, a in adapters.items()),
    ]


def vllm_resolver_env(out: Path) -> dict[str, str]:
    """Environment for vLLM's filesystem LoRA resolver over ``out`` (``<out>/<user>`` on first request)."""
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VLLM_PLUGINS": "lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(out),
    }


def lorax_launcher_args(base_model: str) -> list[str]:
    """``lorax-launcher`` arguments: the base, and local folders as the default adapter source."""
    return ["lorax-launcher", "--model-id", base_model, "--default-adapter-source", "local"]


def lorax_generate_payload(adapter_path: str, inputs: str = "Plan my dinner.") -> dict[str, Any]:
    """A LoRAX ``POST /generate`` body that runs ``inputs`` through the adapter folder ``adapter_path``."""
    return {
        "inputs": inputs,
        "parameters": {"adapter_id": adapter_path, "adapter_source": "local", "max_new_tokens": 128},
    }


def lorax_chat_payload(adapter_path: str, content: str = "Plan my dinner.") -> dict[str, Any]:
    """A LoRAX ``POST /v1/chat/completions`` body: the adapter folder is the ``model``."""
    return {
        "model": adapter_path,
        "adapter_source": "local",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 128,
    }


def _read_configs(users_dir: Path, users: Sequence[str]) -> dict[str, dict[str, Any]]:
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
    return {u: json.loads((users_dir / u / ADAPTER_DIR / "adapter_config.json").read_text()) for u in users}


def _choose_base(configs: Mapping[str, Mapping[str, Any]], base_model: str | None) -> tuple[str, list[str]]:
    """The base to serve and notes for the user: ``base_model``, else the one every adapter names."""
    if base_model is not None and hub_id(base_model) != base_model:
        raise ValidationError(
            "base_model",
            "is personalign's id, which no engine can load",
            f"pass the hub id {hub_id(base_model)!r} or a model folder",
            base_model,
        )
    named = {u: hub_id(str(c.get("base_model_name_or_path") or "")) for u, c in configs.items()}
    bases = set(named.values())
    if base_model is None:
        if len(bases) != 1 or "" in bases:
            raise ValidationError(
                "base_model",
                f"cannot be taken from the adapters, which name {sorted(bases)}",
                "pass base_model (--base-model) with the model the engine should serve",
            )
        base_model = bases.pop()
    elif bases != {base_model}:
        return base_model, [f"serving on {base_model!r}; the adapters name {named}"]
    return base_model, [EMBEDDED_BASE_NOTE] if base_model == EMBEDDED_GENERATOR_HUB_ID else []


def _copy_adapter(source: Path, target: Path, config: dict[str, Any], base_model: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, target / name)
    if hub_id(str(config.get("base_model_name_or_path") or "")) != base_model:
        config["revision"] = None  # a revision of another base means nothing for this one
    config["base_model_name_or_path"] = base_model
    atomic_write_json(target / "adapter_config.json", config)


def _write_vllm(out: Path, base_model: str, adapters: dict[str, dict[str, Any]], manifest: dict) -> None:
    args = vllm_serve_args(base_model, adapters)
    resolver = args[: args.index("--lora-modules")]
    manifest["command"] = shlex.join(args)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in vllm_resolver_env(out.resolve()).items())
    manifest["resolver_command"] = f"{env} {shlex.join(resolver)}"
    (out / "serve.sh").write_text(
        "#!/usr/bin/env bash\n"
        f'# Serve {len(adapters)} personalign users; select one per request with "model": "<user>".\n'
        "# Or load any user under this folder on first request (vLLM's filesystem LoRA resolver):\n"
        f"#   {manifest['resolver_command']}\n"
        f"{manifest['command']}\n"
    )
    (out / "serve.sh").chmod(0o755)


def _write_lorax(out: Path, base_model: str, adapters: dict[str, dict[str, Any]], manifest: dict) -> None:
    launcher = lorax_launcher_args(base_model)
    atomic_write_json(
        out / "lorax.json",
        {
            "launcher": launcher,
            "adapters": {
                u: {"adapter_id": a["path"], "adapter_source": "local"} for u, a in adapters.items()
            },
        },
    )
    first = next(iter(adapters.values()))["path"]
    atomic_write_json(out / "request_example.json", lorax_generate_payload(first))
    atomic_write_json(out / "chat_request_example.json", lorax_chat_payload(first))
    manifest["command"] = shlex.join(launcher)


def export_adapters(
    users_dir: Path, users: Sequence[str], engine: Engine, out: Path, base_model: str | None = None
) -> dict[str, Any]:
    """Copy ``users``' adapters to ``out`` and write the engine's serving config; returns a manifest.

    ``base_model`` is what the engine serves (a hub id or a folder); by default the base the
    adapters name. The manifest (also ``out/manifest.json``) holds ``engine``, ``base_model``,
    ``adapters`` (user -> path, rank, target modules), ``command`` (a shell command line),
    ``notes``, and for vLLM ``resolver_command``.
    """
    if engine not in ("vllm", "lorax"):
        raise ValidationError("engine", "is not a supported engine", "use 'vllm' or 'lorax'", engine)
    configs = _read_configs(users_dir, users)
    base, notes = _choose_base(configs, base_model)
    ranks = {u: adapter_rank(c) for u, c in configs.items()}
    if engine == "vllm":
        for user, rank in ranks.items():
            vllm_max_lora_rank(rank, f"users[{user!r}] rank")  # refuse before anything is written
    out.mkdir(parents=True, exist_ok=True)
    adapters: dict[str, dict[str, Any]] = {}
    for user, config in configs.items():
        _copy_adapter(users_dir / user / ADAPTER_DIR, out / user, config, base)
        adapters[user] = {
            "path": str((out / user).resolve()),
            "rank": ranks[user],
            "target_modules": config["target_modules"],
        }
    manifest: dict[str, Any] = {"engine": engine, "base_model": base, "adapters": adapters, "notes": notes}
    (_write_vllm if engine == "vllm" else _write_lorax)(out, base, adapters, manifest)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
