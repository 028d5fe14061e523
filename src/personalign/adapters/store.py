"""Per-user adapters on disk and in memory.

On disk, a user's adapter is a plain PEFT LoRA folder, ``users/<id>/adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``, no ``modules_to_save``) that vLLM,
LoRAX and PEFT's ``AutoPeftModelForCausalLM`` load unchanged, plus ``personalign_adapter.json``
beside those files (base model id, package version, training-data hash, training report).
``adapter_config.json`` names a real base, ``base_model_name_or_path``: the hub id for the
embedded model (``HuggingFaceTB/SmolLM2-135M-Instruct``), else the id or folder the generator
was loaded from; ``personalign_adapter.json`` adds the base weights' fingerprint
(:func:`personalign.models.weights_fingerprint`). A new adapter replaces the old one
atomically, so a failed training or a crash leaves the previous adapter usable.

An adapter fits a generator when its base names the same model (:meth:`Generator.is_base`):
adapters saved with the embedded pseudo-id ``embedded:smollm2-135m-instruct`` (all adapters saved before real base ids)
and adapters trained with TRL/PEFT on ``HuggingFaceTB/SmolLM2-135M-Instruct`` both fit the
embedded model. A recorded fingerprint that differs from the loaded weights (the hub's
bfloat16 weights against the embedded de-quantised copy, or a changed local folder) is logged
as a warning, not refused.

In memory, at most ``max_resident`` adapters are loaded into one PEFT model (least recently
used ones are unloaded), and a batch mixes users through PEFT's per-row ``adapter_names``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from personalign.adapters.lora import LoraTrainConfig, TrainReport, data_hash, train_adapter
from personalign.artefacts import atomic_write_json
from personalign.errors import (
    AdapterError,  # noqa: F401 (re-exported)
    ValidationError,
)
from personalign.models import Generator
from personalign.types import Comparison, validate_user_id

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
META_FILE = "personalign_adapter.json"
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def adapter_name(user: str) -> str:
    """A PEFT-safe module key for a user (no dots)."""
    return "u_" + hashlib.sha256(validate_user_id(user).encode()).hexdigest()[:20]


def read_lora_folder(folder: Path, label: str, fix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA folder's config and tensors; :class:`AdapterError` naming ``label`` and ``fix``
    when a file is missing, truncated or corrupt."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as err:  # missing, truncated or corrupt files
        raise AdapterError(
            f"{label} at {folder} is unreadable ({type(err).__name__}: {err}). {fix}"
        ) from None
    return config, tensors


class AdapterManager:
    """Trains, stores, loads and evicts users' LoRA adapters on one generator."""

    def __init__(self, generator: Generator, users_dir: Path, max_resident: int = 8) -> None:
        if max_resident < 1:
            raise ValidationError(
                "max_resident", "must be at least 1", "keep at least one adapter in memory", max_resident
            )
        self.generator = generator
        self.users_dir = users_dir
        self.max_resident = max_resident
        self.base_model = generator.model
        self.peft: Any = None
        self.resident: OrderedDict[str, str] = OrderedDict()  # user -> adapter name, oldest first
        self.swaps = 0  # adapters loaded from disk (new slot or in-place refill)
        self._slot_index: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._warned: set[str] = set()  # artefacts already logged for a fingerprint mismatch

    # --- disk ------------------------------------------------------------------------------

    def path(self, user: str) -> Path:
        return self.users_dir / validate_user_id(user) / ADAPTER_DIR

    def has_adapter(self, user: str) -> bool:
        return (self.path(user) / "adapter_config.json").is_file()

    def metadata(self, user: str) -> dict[str, Any]:
        return json.loads((self.path(user) / META_FILE).read_text())

    def _check(self, user: str, folder: Path) -> None:
        """Refuse adapters made for another base model or with a broken contract."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AdapterError(
                f"adapter of {user!r} at {folder} is unreadable ({err}). Fix: retrain it with enroll(..., adapter=True)"
            ) from None
        if not self.generator.is_base(meta.get("base_model")):
            raise AdapterError(
                f"adapter of {user!r} was trained on {meta.get('base_model')!r}, not {self.generator.model_id!r}. "
                "Fix: retrain it on this model (enroll(..., adapter=True)) or load the model it was trained on"
            )
        if config.get("modules_to_save"):
            raise AdapterError(
                f"adapter of {user!r} has modules_to_save. Fix: retrain it; personalign adapters are plain LoRA"
            )
        self._check_fingerprint(meta.get("base_fingerprint"), f"adapter of {user!r} at {folder}")

    def _check_fingerprint(self, recorded: str | None, what: str) -> None:
        """Log (once per artefact) when the base weights an artefact records differ from the loaded ones."""
        if recorded is None or what in self._warned:
            return
        current = self.generator.fingerprint()
        if recorded != current:
            self._warned.add(what)
            logger.warning(
                "%s was trained on base weights %s, but %r has %s (another copy or revision of the same model); "
                "it is used as it is. Retrain it on these weights to match them exactly",
                what, recorded, self.generator.model_id, current,
            )  # fmt: skip

    # --- memory ----------------------------------------------------------------------------

    def _attach(
        self, name: str, folder: Path | None = None, config: Any = None, trainable: bool = False
    ) -> None:
        """Add adapter ``name`` from ``folder`` (or a fresh one from ``config``), wrapping the model once."""
        from peft import PeftModel, get_peft_model

        if self.peft is None:
            if folder is not None:
                self.peft = PeftModel.from_pretrained(
                    self.base_model, str(folder), adapter_name=name, is_trainable=trainable
                )
            else:
                self.peft = get_peft_model(self.base_model, config, adapter_name=name)
            self.peft.eval()
            self.generator.model = self.peft
        elif folder is not None:
            self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
        else:
            self.peft.add_adapter(name, config)

    def _drop(self, name: str) -> None:
        """Delete adapter ``name`` from the PEFT model (its weights leave memory)."""
        if self.peft is None or name not in self.peft.peft_config:
            return
        self._slot_index.pop(name, None)
        remaining = [n for n in self.peft.peft_config if n != name]
        if not remaining:
            # PEFT cannot work with zero adapters: unwrap back to the plain base model.
            self.base_model = self.peft.unload()
            self.peft = None
            self.generator.model = self.base_model
            return
        if self.peft.active_adapter == name:
            self.peft.set_adapter(remaining[0])  # PEFT requires a live active adapter
        self.peft.delete_adapter(name)

    def _free_slot(self) -> str:
        taken = set(self.peft.peft_config) if self.peft is not None else set()
        return next(f"slot_{i}" for i in range(len(taken) + 1) if f"slot_{i}" not in taken)

    def _slot_params(self, slot: str) -> dict[str, torch.nn.Parameter]:
        """The slot's LoRA parameters by their on-disk key, indexed once per slot (not per swap)."""
        if slot not in self._slot_index:
            marker = f".{slot}."
            self._slot_index[slot] = {
                n.replace(marker, "."): p for n, p in self.peft.named_parameters() if marker in n
            }
        return self._slot_index[slot]

    def _swap(self, slot: str, folder: Path) -> None:
        """Copy the adapter in ``folder`` into ``slot``'s tensors in place.

        The cost is that of reading and copying one adapter, whatever the number of slots.
        Raises ``ValueError`` when the adapter's shape differs from the slot's (rank, alpha,
        target modules, or LoRA variant).
        """
        from safetensors.torch import load_file

        new = json.loads((folder / "adapter_config.json").read_text())
        current = self.peft.peft_config[slot]
        same = (
            new.get("r") == current.r
            and new.get("lora_alpha") == current.lora_alpha
            and sorted(new.get("target_modules") or []) == sorted(current.target_modules or [])
            and bool(new.get("use_rslora")) == bool(current.use_rslora)
            and bool(new.get("use_dora")) == bool(current.use_dora)
        )
        if not same:
            raise ValueError("adapter shape differs from the slot's")
        weights = load_file(str(folder / "adapter_model.safetensors"), device=str(self.generator.device))
        params = self._slot_params(slot)
        if weights.keys() != params.keys():
            raise ValueError("adapter tensors differ from the slot's")
        for key, value in weights.items():
            params[key].copy_(value)

    def _load_into_slot(self, folder: Path) -> str:
        """Load ``folder`` into a free slot, or copy it into the least recently used one."""
        if len(self.resident) < self.max_resident:
            slot = self._free_slot()
            self._attach(slot, folder=folder)
            self._slot_params(slot)  # index now, while creating the slot, so later swaps stay flat
            return slot
        victim, slot = next(iter(self.resident.items()))
        del self.resident[victim]
        try:
            self._swap(slot, folder)
        except ValueError:
            # Another rank, alpha or target modules: replace the slot instead of refilling it.
            self._drop(slot)
            self._attach(slot, folder=folder)
        return slot

    def activate(self, user: str) -> str:
        """Make the user's adapter resident and return its slot name.

        A new user takes a free slot, or the least recently used user's slot is refilled in place.
        """
        if user in self.resident:
            self.resident.move_to_end(user)
            return self.resident[user]
        folder = self.path(user)
        self._check(user, folder)
        try:
            # Weights loaded under a caller's inference_mode would become inference tensors that
            # PEFT can no longer modify (set_adapter, hot-swap): load them as normal tensors.
            with torch.inference_mode(False), torch.no_grad():
                slot = self._load_into_slot(folder)
        except Exception as err:  # PEFT/safetensors raise many types for corrupt or mismatched files
            raise AdapterError(
                f"adapter of {user!r} at {folder} cannot be loaded ({type(err).__name__}: {err}). Fix: retrain it"
            ) from None
        if self.peft.active_adapter not in self.peft.peft_config:
            self.peft.set_adapter(slot)
        self.resident[user] = slot
        self.swaps += 1
        return slot

    def unload(self, user: str) -> None:
        """Free ``user``'s slot (the adapter stays on disk)."""
        slot = self.resident.pop(user, None)
        if slot is not None:
            self._drop(slot)

    def adapter_names(self, users: Sequence[str | None]) -> list[str] | None:
        """PEFT ``adapter_names`` for a batch, activating users' adapters as needed.

        ``None`` when no row needs an adapter and none is resident: the plain base model runs.
        """
        if self.peft is None and all(u is None for u in users):
            return None
        return [self.activate(u) if u is not None else BASE for u in users]

    def resident_slots(self) -> set[str]:
        """Names of the adapters loaded in the PEFT model (empty when it is unwrapped)."""
        return set(self.peft.peft_config) if self.peft is not None else set()

    # --- training --------------------------------------------------------------------------

    def train(self, user: str, comparisons: Sequence[Comparison], config: LoraTrainConfig) -> dict[str, Any]:
        """Train (or continue training) the user's adapter on ``comparisons`` and store it atomically.

        Training uses its own temporary adapter (from the stored weights when there are some);
        the user's slot is freed first and refilled from disk on the next request.
        """
        from peft import LoraConfig

        name = "train_" + adapter_name(user)
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        )
        self.unload(user)
        torch.manual_seed(config.seed)  # LoRA initialisation draws from the global generator
        try:
            if self.has_adapter(user):
                self._check(user, self.path(user))
                self._attach(
                    name, folder=self.path(user), trainable=True
                )  # incremental: continue from the stored weights
            else:
                self._attach(name, config=lora)
            report = train_adapter(self.peft, name, self.generator.tokenizer, comparisons, config)
            return self._save(user, name, comparisons, config, report)
        finally:
            self._drop(
                name
            )  # half-trained or saved, the training copy leaves memory; the stored adapter is the truth

    def _save(
        self,
        user: str,
        name: str,
        comparisons: Sequence[Comparison],
        config: LoraTrainConfig,
        report: TrainReport,
    ) -> dict[str, Any]:
        def write(staging: Path) -> Path:
            self.peft.save_pretrained(str(staging), selected_adapters=[name], safe_serialization=True)
            return staging / name if (staging / name / "adapter_config.json").is_file() else staging

        return self._publish(
            user, write, comparisons, {"config": config.model_dump(mode="json"), "report": asdict(report)}
        )

    def _publish(
        self, user: str, write: Any, comparisons: Sequence[Comparison], extra: dict[str, Any]
    ) -> dict[str, Any]:
        """Write an adapter with ``write(staging) -> folder`` and swap it in atomically as the user's."""
        from personalign import __version__

        target = self.path(user)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".adapter-"))
        try:
            saved = write(staging)
            config_path = saved / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = self.generator.base_model_name_or_path
            adapter_config["revision"] = self.generator.revision
            config_path.write_text(json.dumps(adapter_config, indent=2))
            meta = {
                "user": user,
                "base_model": self.generator.model_id,
                "base_model_name_or_path": self.generator.base_model_name_or_path,
                "base_fingerprint": self.generator.fingerprint(),
                "personalign_version": __version__,
                "data_hash": data_hash(comparisons),
                "pairs": len(comparisons),
                "trained_at": time.time(),
                **extra,
            }
            atomic_write_json(saved / META_FILE, meta)
            old = target.with_name(f".adapter-old-{time.time_ns()}")
            if target.exists():
                os.replace(target, old)
            os.replace(saved, target)
            shutil.rmtree(old, ignore_errors=True)
            return meta
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def validate_folder(self, folder: Path, label: str = "adapter") -> dict[str, Any]:
        """Check a PEFT LoRA folder against this generator before anything is stored; its config.

        Refused with :class:`AdapterError`: missing, corrupt or truncated files; an adapter for
        another base model; ``modules_to_save``; tensors whose rank differs from the config's
        ``r``; LoRA weights for modules the model lacks, outside ``target_modules``, or of the
        wrong shape. A final trial load into a scratch PEFT adapter catches anything else.
        """
        fix = "Fix: export the adapter again from PEFT (save_pretrained) for this base model"
        config, tensors = read_lora_folder(folder, label, fix)
        base = config.get("base_model_name_or_path")
        if base not in (None, "") and not self.generator.is_base(base):
            raise AdapterError(
                f"{label} at {folder} was made for {base!r}, not {self.generator.base_model_name_or_path!r}. {fix}"
            )
        if config.get("peft_type", "LORA") != "LORA" or config.get("modules_to_save"):
            raise AdapterError(
                f"{label} at {folder} is not a plain LoRA (peft_type {config.get('peft_type')!r}, modules_to_save {config.get('modules_to_save')!r}). {fix}"
            )
        rank = config.get("r")
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        modules = (
            dict(self.base_model.named_modules())
            if self.peft is None
            else dict(self.peft.get_base_model().named_modules())
        )
        found = 0
        for key, value in tensors.items():
            if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
                continue
            found += 1
            path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            layer = modules.get(path)
            weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
            if weight is None:
                raise AdapterError(
                    f"{label} at {folder} has weights for {path!r}, which {self.generator.model_id!r} does not have. {fix}"
                )
            if targets and path.rsplit(".", 1)[-1] not in targets:
                raise AdapterError(
                    f"{label} at {folder} has weights for {path!r}, outside its target_modules {targets}. {fix}"
                )
            out_f, in_f = weight.shape
            want = (rank, in_f) if key.endswith(".lora_A.weight") else (out_f, rank)
            if tuple(value.shape) != want:
                raise AdapterError(
                    f"{label} at {folder}: {key} has shape {tuple(value.shape)}, expected {want} (rank r={rank}). {fix}"
                )
        if not found:
            raise AdapterError(f"{label} at {folder} holds no LoRA weights. {fix}")
        name = "check_" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._attach(name, folder=folder)
        except Exception as err:
            raise AdapterError(
                f"{label} at {folder} cannot be loaded ({type(err).__name__}: {err}). {fix}"
            ) from None
        finally:
            self._drop(name)
        return config

    def install(
        self, user: str, folder: Path | str, comparisons: Sequence[Comparison] = ()
    ) -> dict[str, Any]:
        """Store an adapter trained elsewhere (a PEFT LoRA folder) as ``user``'s, after validating it.

        Nothing changes when validation fails: the user's previous adapter stays in place.
        """
        folder = Path(folder)
        self.validate_folder(folder)

        def write(staging: Path) -> Path:
            target = staging / "imported"
            target.mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(folder / name, target / name)
            return target

        # The weights it was trained on are unknown here: no fingerprint is recorded for an import.
        meta = self._publish(
            user, write, comparisons, {"imported_from": str(folder.resolve()), "base_fingerprint": None}
        )
        self.unload(user)  # the next request loads the new weights
        return meta

    def install_bank(
        self, user: str, bank: Any, comparisons: Sequence[Comparison], method: str = "linear"
    ) -> dict[str, Any]:
        """Fit the user's weights over ``bank``'s bases and store the combined adapter as theirs.

        No gradient step touches the generator; the stored adapter is the exact weighted sum of
        the basis deltas, a plain PEFT LoRA like a trained one.
        """
        self.unload(user)  # the fit must see the base model plus the bank only
        fit = bank.fit(comparisons, method=method)
        bank_meta = {
            "bases": bank.names,
            "weights": [float(w) for w in fit.weights],
            "method": fit.method,
            "fit_accuracy": fit.accuracy,
            "log_likelihood": fit.log_likelihood,
            "provenance": bank.provenance,
        }
        return self._publish(
            user,
            lambda staging: bank.write_adapter(fit.weights, staging / "bank"),
            comparisons,
            {"bank": bank_meta},
        )
