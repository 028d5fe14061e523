"""Steering recipes: sample once from the frozen generator, then fit VAS value models or MODPO
objective adapters on those samples, and install them where the runtime finds them.

Reports and recorded configs name folders relative to ``out`` (``vas/verbosity``), so retrained
artefacts that are shipped carry no machine path. Under ``accelerate launch`` every process
trains (data-parallel, see :mod:`personalign.training.loop`) and only the main one writes.

``personalign train vas`` and ``personalign train modpo`` call these; the defaults finish on a
2-core CPU in well under an hour (sampling is most of it) and scale up by flags.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personalign.adapters.value import save_value_model
from personalign.steering.methods import MIX_DIR, VAS_DIR, VAS_MODEL_DIR
from personalign.steering.modpo import ModpoConfig, save_objective_adapter, train_modpo
from personalign.steering.prompts import split
from personalign.steering.vas import VasTrainConfig, train_vas
from personalign.training.loop import LoopConfig, is_main_process
from personalign.training.samples import Sample, load_samples, sample_responses, save_samples

SAMPLES_FILE = "samples.jsonl"


def get_samples(
    generator: Any,
    out: Path,
    samples_path: Path | None = None,
    n_per_prompt: int = 4,
    max_new_tokens: int = 160,
    seed: int = 0,
    progress: bool = True,
) -> list[Sample]:
    """Reuse ``samples_path`` (or ``out/samples.jsonl``) when present, else sample the training prompts."""
    path = samples_path or out / SAMPLES_FILE
    if path.is_file():
        return load_samples(path)
    train, _ = split()
    samples = sample_responses(
        generator,
        train,
        n_per_prompt=n_per_prompt,
        max_new_tokens=max_new_tokens,
        seed=seed,
        progress=progress,
    )
    if is_main_process():
        save_samples(samples, path)
    return samples


def train_vas_recipe(
    generator: Any,
    out: Path,
    objectives: Sequence[str],
    kinds: Sequence[str] = ("trunk", "gru"),
    samples: Sequence[Sample] = (),
    epochs: int = 12,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """One value model per objective and kind under ``out/vas/<objective>`` (trunk) and ``out/vas_model/<objective>`` (gru)."""
    report: dict[str, Any] = {}
    for kind in kinds:
        for objective in objectives:
            start = time.perf_counter()
            folder = out / (VAS_DIR if kind == "trunk" else VAS_MODEL_DIR) / objective
            loop = LoopConfig(
                epochs=epochs,
                learning_rate=2e-3,
                batch_size=16,
                seed=seed,
                progress=progress,
                checkpoint_dir=str(folder.with_name(folder.name + ".ckpt")),
                name=f"vas {kind} {objective}",
            )
            model, run = train_vas(
                generator, samples, VasTrainConfig(objective=objective, kind=kind, loop=loop)
            )
            if is_main_process():
                save_value_model(model, folder)
            report[f"{kind}/{objective}"] = {
                "epoch_loss": run.epoch_loss,
                "seconds": time.perf_counter() - start,
                "folder": relative(folder, out),
            }
    return report


def train_modpo_recipe(
    generator: Any,
    out: Path,
    objectives: Sequence[str],
    samples: Sequence[Sample] = (),
    margin_weight: float = 0.1,
    epochs: int = 3,
    max_pairs: int = 128,
    min_gap: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """One MODPO objective adapter per objective under ``out/mix/<objective>``; each uses the
    other listed objectives as margin rewards with weight ``margin_weight``."""
    report: dict[str, Any] = {}
    for objective in objectives:
        start = time.perf_counter()
        others = [o for o in objectives if o != objective]
        folder = out / MIX_DIR / objective
        loop = LoopConfig(
            epochs=epochs,
            learning_rate=5e-4,
            batch_size=4,
            seed=seed,
            progress=progress,
            checkpoint_dir=str(folder.with_name(folder.name + ".ckpt")),
            name=f"modpo {objective}",
        )
        config = ModpoConfig(
            objective=objective,
            margin_objectives=others,
            margin_weights=[margin_weight] * len(others),
            max_pairs=max_pairs,
            min_gap=min_gap,
            loop=loop,
        )
        model, name, run, pairs = train_modpo(generator, samples, config)
        recorded = config.model_copy(
            update={"loop": loop.model_copy(update={"checkpoint_dir": relative(loop.checkpoint_dir, out)})}
        )
        if is_main_process():
            save_objective_adapter(model, name, folder, recorded, generator.model_id, run, pairs)
        report[objective] = {
            "epoch_loss": run.epoch_loss,
            "pairs": pairs,
            "seconds": time.perf_counter() - start,
            "folder": relative(folder, out),
        }
    return report


def relative(path: Path | str, out: Path) -> str:
    """``path`` relative to ``out`` as a POSIX string (``mix/verbosity``), or as given when outside it."""
    try:
        return Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(path)


def write_report(out: Path, name: str, report: dict[str, Any]) -> None:
    if is_main_process():
        (out / f"{name}_report.json").write_text(json.dumps(report, indent=1))


def train_dpa_recipe(
    generator: Any,
    out: Path,
    objectives: Sequence[str],
    iterations: int = 2,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 160,
    epochs: int = 2,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    progress: Any = None,
    every_direction: bool = False,
    loss: str = "sft",
    beta: float = 0.1,
    line: str = "numbers",
) -> dict[str, Any]:
    """The DPA adapter under ``out/dpa`` (iterated rejection-sampling fine-tuning on the training prompts)."""
    from personalign.steering.dpa import DpaConfig, save_dpa, train_dpa
    from personalign.steering.methods import DPA_DIR

    start = time.perf_counter()
    chosen = list(prompts) if prompts is not None else split()[0]
    loop = LoopConfig(epochs=epochs, learning_rate=5e-4, batch_size=4, seed=seed, name=f"dpa {loss}")
    config = DpaConfig(
        objectives=list(objectives),
        iterations=iterations,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        every_direction=every_direction,
        loss=loss,
        beta=beta,
        line=line,
        loop=loop,
    )
    model, records = train_dpa(generator, chosen, config, seed=seed, progress=progress)
    folder = out / DPA_DIR
    if is_main_process():
        save_dpa(model, folder, config, generator.model_id, records, len(chosen))
    return {"iterations": records, "seconds": time.perf_counter() - start, "folder": relative(folder, out)}
