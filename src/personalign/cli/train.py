"""``personalign train ...``: the training recipes (per-user LoRA and bank, embedders, steering
artefacts, FSPO, Persona-Plug). Each command builds a config and calls its recipe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from personalign.cli._common import (
    DeviceOpt,
    EncoderOpt,
    FeaturesOpt,
    ModelOpt,
    StoreOpt,
    UserOpt,
    app,
    failing,
    open_personalizer,
    split_list,
)
from personalign.errors import ValidationError

train_app = typer.Typer(help="Training recipes.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("user-lora")
def train_user_lora(
    user: UserOpt,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", exists=True, dir_okay=False, help="New comparisons (JSONL) to add first."
        ),
    ] = None,
    loss: Annotated[str, typer.Option(help="dpo, ipo or simpo.")] = "dpo",
    rank: Annotated[int, typer.Option(min=1, max=256)] = 8,
    epochs: Annotated[int, typer.Option(min=1)] = 8,
    learning_rate: Annotated[float, typer.Option()] = 5e-4,
    beta: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train (or continue training) a user's LoRA adapter on all their comparisons."""
    from personalign.types import read_preferences

    config = {
        "loss": loss,
        "rank": rank,
        "epochs": epochs,
        "learning_rate": learning_rate,
        "beta": beta,
        "seed": seed,
        "progress": True,
    }
    with failing():
        new = [c for row_user, c in read_preferences(file) if row_user in (None, user)] if file else []
        with open_personalizer(store, model, encoder, device) as pz:
            if new:
                profile = pz.enroll(user, new, adapter=True, adapter_config=config)
            else:
                profile = pz.train_adapter(user, config)
            meta = pz.adapter_metadata(user)
            path = pz.adapter_folder(user)
        report = meta["report"]
        typer.echo(
            f"{user}: adapter trained on {meta['pairs']} pairs ({len(profile.comparisons)} stored), {report['epochs_run']} epochs, "
            f"held-out accuracy {report['holdout_accuracy'][-1:] or 'n/a'} -> {path}"
        )


@train_app.command("bank")
def train_bank(
    out: Annotated[
        Path, typer.Option(help="Folder for the bank (one PEFT folder per basis + personalign_bank.json).")
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Population to cluster: psoups, hh, popquorn, synthetic, or a .jsonl with a user column."
        ),
    ] = "synthetic",
    k: Annotated[int, typer.Option(min=1, max=64, help="Number of basis LoRAs (clusters of users).")] = 4,
    max_pairs: Annotated[int, typer.Option(min=1, help="Most comparisons a basis is trained on.")] = 48,
    rank: Annotated[int, typer.Option(min=1, max=256)] = 8,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    learning_rate: Annotated[float, typer.Option()] = 5e-4,
    beta: Annotated[float, typer.Option()] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train a LoRA bank: cluster users by their preference direction, one basis LoRA per cluster."""
    from personalign.adapters.bank import LoraBank
    from personalign.adapters.lora import LoraTrainConfig
    from personalign.eval.adapters import basis_groups
    from personalign.eval.populations import load_population
    from personalign.models import load_encoder, load_generator

    with failing():
        population = load_population(data, seed=seed)
        generator, enc = load_generator(model, device=device), load_encoder(encoder, device=device)
        groups = basis_groups(enc, population, k, max_pairs, seed)
        config = LoraTrainConfig(
            rank=rank,
            alpha=2 * rank,
            epochs=epochs,
            learning_rate=learning_rate,
            beta=beta,
            seed=seed,
            holdout_fraction=0.0,
            progress=True,
        )
        bank = LoraBank.train(generator, groups, out, config, beta=beta)
        bank.provenance["data"] = data
        bank._write_manifest(out)
        typer.echo(
            f"bank of {bank.k} bases on {generator.model_id}: "
            + ", ".join(f"{g} ({len(c)} pairs)" for g, c in groups.items())
            + f" -> {out}"
        )


@train_app.command("user-bank")
def train_user_bank(
    user: UserOpt,
    bank: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="A bank made by `personalign train bank`.")
    ],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", exists=True, dir_okay=False, help="New comparisons (JSONL) to add first."
        ),
    ] = None,
    store: StoreOpt = Path(".personalign"),
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Fit a user's weights over a LoRA bank (no training of the generator) and store the combined adapter."""
    from personalign.adapters.bank import LoraBank
    from personalign.types import read_preferences

    with failing():
        new = [c for row_user, c in read_preferences(file) if row_user in (None, user)] if file else []
        with open_personalizer(store, model, encoder, device) as pz:
            loaded = LoraBank.load(pz.generator, bank)
            comparisons = new or pz.profile(user).comparisons
            if new:
                comparisons = pz.enroll(user, new, adapter=loaded).comparisons
            else:
                pz.train_adapter(user, bank=loaded)
            summary = pz.adapter_metadata(user)["bank"]
        weights = ", ".join(
            f"{n}={w:+.2f}" for n, w in zip(summary["bases"], summary["weights"], strict=True)
        )
        typer.echo(
            f"{user}: weights {weights}; fit accuracy {summary['fit_accuracy']:.2f} on {len(comparisons)} comparisons"
        )


def _train_embedder(
    method: str, data: str, out: Path, seed: int, features: str, encoder: str | None, device: str | None
) -> None:
    from personalign.eval.populations import load_population
    from personalign.models import load_encoder, load_generator
    from personalign.preference import EMBEDDER_CLASSES, save_embedder
    from personalign.preference.base import Featurizer, FeaturizerConfig

    with failing():
        parts = tuple(split_list(features, "--features"))
        onpolicy = data in ("synthetic-onpolicy", "synthetic-both")
        generator = load_generator(None, device=device) if "hidden" in parts or onpolicy else None
        if onpolicy:
            from personalign.eval.onpolicy import answer_pool, onpolicy_population
            from personalign.eval.populations import SyntheticConfig, SyntheticPopulation

            synthetic = SyntheticPopulation(SyntheticConfig(seed=seed))
            population = onpolicy_population(
                synthetic, answer_pool(generator, synthetic.prompts), synthetic.prompts, seed=seed
            )
            rows = population.population()
            if (
                data == "synthetic-both"
            ):  # the generator's own answers and the templated candidates, the same users
                templated = synthetic.population(seed=seed).population()
                rows = {u: [*templated[u], *cs] for u, cs in rows.items()}
        else:
            population = load_population(data, seed=seed)
            rows = population.population()
        featurizer = Featurizer(
            load_encoder(encoder, device=device),
            FeaturizerConfig(parts=parts),
            generator if "hidden" in parts else None,
        )
        started = time.perf_counter()
        embedder = EMBEDDER_CLASSES[method](featurizer).fit(rows, seed=seed)
        provenance = {"data": data, "seed": seed, "users": len(population.users)}
        if onpolicy:
            provenance["generator"] = generator.model_id  # type: ignore[union-attr]
        save_embedder(embedder, out, provenance=provenance)
        typer.echo(
            f"{method} fitted on {len(population.users)} users of {data} in {time.perf_counter() - started:.1f} s -> {out}"
        )


TrainDataOpt = Annotated[
    str,
    typer.Option(
        help="Population: synthetic (project-made, templated answers), synthetic-onpolicy (the same users comparing the generator's own answers), synthetic-both, psoups, hh, popquorn, or a .jsonl with a user column."
    ),
]


EmbedderOutOpt = Annotated[
    Path, typer.Option(help="Output folder (<method>_config.json + <method>.safetensors + embedder.json).")
]


def _embedder_recipe(method: str, doc: str) -> Any:
    def recipe(
        out: EmbedderOutOpt,
        data: TrainDataOpt = "synthetic",
        seed: Annotated[int, typer.Option()] = 0,
        features: FeaturesOpt = "response,prompt_x_response,log_length",
        encoder: EncoderOpt = None,
        device: DeviceOpt = None,
    ) -> None:
        _train_embedder(method, data, out, seed, features, encoder, device)

    recipe.__doc__ = doc
    recipe.__name__ = f"train_{method}"
    return recipe


train_app.command("pal")(
    _embedder_recipe("pal", "Fit a PAL population model (K prototype rewards) for enrolling users.")
)


train_app.command("vpl")(
    _embedder_recipe(
        "vpl", "Fit a VPL model (pair-set encoder to a Gaussian user latent, latent-conditioned reward)."
    )
)


def _training_users(data: str, shots: int, why: str) -> tuple[dict[str, list[Any]], str]:
    """Users' comparisons for the FSPO and Persona-Plug recipes, and where they came from."""
    if data == "synthetic":
        from personalign.eval.generate import generation_split

        return generation_split(
            seed=0, shots=shots
        ).train, "synthetic population (project-made), training users and topics of eval generate's split"
    from personalign.types import read_preferences

    users: dict[str, list[Any]] = {}
    for index, (owner, comparison) in enumerate(read_preferences(Path(data))):
        if owner is None:
            raise ValidationError(
                f"{Path(data).name}:{index + 1}.user", "has no user", f"{why}: add a user column"
            )
        users.setdefault(owner, []).append(comparison)
    return users, str(data)


@train_app.command("fspo")
def train_fspo_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="Adapter folder (default: the installed data/fspo, which chat uses when present)."),
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="synthetic (the evaluation split's training users) or a .jsonl with a user column."
        ),
    ] = "synthetic",
    shots: Annotated[int, typer.Option(min=1, max=16, help="N: shots per task.")] = 4,
    sft_tasks: Annotated[int, typer.Option(min=1, help="Tasks in the SFT stage.")] = 128,
    ipo_tasks: Annotated[int, typer.Option(min=0, help="Tasks in the IPO stage (0 skips it).")] = 48,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per stage.")] = 1,
    beta: Annotated[float, typer.Option(help="IPO beta (target margin 1 / (2 beta)).")] = 0.01,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Resume from / checkpoint to this folder each epoch.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """FSPO meta-training: a LoRA that answers a user from N of their comparisons in the prompt (SFT, then IPO)."""
    from personalign.conditioning.fspo import FspoTrainConfig, fspo_dir, save_fspo, train_fspo
    from personalign.models import load_generator
    from personalign.training.loop import LoopConfig

    with failing():
        users, source = _training_users(data, shots, "FSPO learns per-user tasks")
        ckpt = str(checkpoint_dir) if checkpoint_dir else None
        config = FspoTrainConfig(
            shots=shots,
            sft_tasks=sft_tasks,
            ipo_tasks=ipo_tasks,
            beta=beta,
            seed=seed,
            sft=LoopConfig(
                epochs=epochs,
                learning_rate=5e-4,
                batch_size=2,
                name="fspo-sft",
                progress=True,
                checkpoint_dir=ckpt and ckpt + "/sft",
            ),
            ipo=LoopConfig(
                epochs=epochs,
                learning_rate=1e-4,
                batch_size=2,
                name="fspo-ipo",
                progress=True,
                checkpoint_dir=ckpt and ckpt + "/ipo",
            ),
        )
        generator = load_generator(model, device=device)
        started = time.perf_counter()
        peft_model, report = train_fspo(generator, users, config)
        folder = save_fspo(peft_model, out or fspo_dir(), generator.model_id, config, report, source)
        ipo = report.ipo.epoch_loss if report.ipo else []
        typer.echo(
            f"fspo: {report.tasks} tasks, SFT loss {report.sft.epoch_loss}, IPO loss {ipo}, {time.perf_counter() - started:.0f} s -> {folder}"
        )


@train_app.command("pplug")
def train_pplug_cmd(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Projector folder (default: the installed data/pplug, which chat uses when present)."
        ),
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="synthetic (the evaluation split's training users) or a .jsonl with a user column."
        ),
    ] = "synthetic",
    items: Annotated[
        int,
        typer.Option(
            min=1,
            help="History items per task: the preferred responses of this many of the user's comparisons.",
        ),
    ] = 4,
    per_user: Annotated[
        int, typer.Option(min=1, help="Tasks per user (each a different target comparison).")
    ] = 2,
    max_tasks: Annotated[int, typer.Option(min=2, help="Tasks at most (seeded subsample).")] = 320,
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    learning_rate: Annotated[float, typer.Option()] = 1e-3,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Resume from / checkpoint to this folder each epoch.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Persona-Plug: a projector from a user's history to one soft token for the frozen generator."""
    import random

    from personalign.conditioning.pplug import pplug_dir, save_plug
    from personalign.conditioning.pplug_train import PlugTask, PlugTrainConfig, train_plug
    from personalign.models import load_encoder, load_generator

    with failing():
        users, source = _training_users(data, items, "Persona-Plug learns from users' histories")
        rng = random.Random(seed)
        tasks = []
        for owner in sorted(users):
            comparisons = users[owner]
            if len(comparisons) <= items:
                continue
            history = tuple(c.chosen for c in comparisons[:items])
            for target in rng.sample(comparisons[items:], min(per_user, len(comparisons) - items)):
                tasks.append(PlugTask(history, target.prompt_text, target.chosen))
        rng.shuffle(tasks)
        tasks = tasks[:max_tasks]
        if len(tasks) < 2:
            raise ValidationError(
                "--data",
                f"gives {len(tasks)} tasks",
                f"give users more than --items {items} comparisons each",
            )
        generator, enc = load_generator(model, device=device), load_encoder(encoder, device=device)
        config = PlugTrainConfig(
            epochs=epochs,
            learning_rate=learning_rate,
            seed=seed,
            progress=True,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        )
        plug, report = train_plug(generator, enc, tasks, config)
        folder = save_plug(
            plug, out or pplug_dir(), {"data": source, "tasks": len(tasks), "report": report.to_dict()}
        )
        held = (
            f"held-out NLL {report.val_nll_base:.3f} (no token) -> {report.val_nll[-1]:.3f}, "
            if report.gain is not None
            else ""
        )
        typer.echo(f"pplug: {len(tasks)} tasks, {held}{report.seconds:.0f} s -> {folder}")
