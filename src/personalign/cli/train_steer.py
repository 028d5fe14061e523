"""``personalign train vas|user-vas|modpo|dpa``: the steering artefacts' recipes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from personalign.cli._common import DeviceOpt, ModelOpt, failing, split_list
from personalign.cli.train import train_app
from personalign.errors import ValidationError

SteerOutOpt = Annotated[
    Path | None,
    typer.Option(
        help="Artefact root (vas/, vas_model/, mix/ under it); default: the installed steering folder."
    ),
]


ObjectivesOpt = Annotated[str, typer.Option(help="Comma-separated objectives, e.g. verbosity,structure.")]


def _steer_samples(
    generator: Any, out: Path, samples: Path | None, per_prompt: int, max_new_tokens: int, seed: int
) -> Any:
    from personalign.steering.recipes import get_samples

    out.mkdir(parents=True, exist_ok=True)
    return get_samples(
        generator, out, samples, n_per_prompt=per_prompt, max_new_tokens=max_new_tokens, seed=seed
    )


@train_app.command("vas")
def train_vas_cmd(
    out: SteerOutOpt = None,
    objectives: ObjectivesOpt = "verbosity,structure",
    kinds: Annotated[
        str,
        typer.Option(
            help="trunk (head on the generator's hidden state), gru (separate small value model), or both."
        ),
    ] = "trunk,gru",
    samples: Annotated[
        Path | None,
        typer.Option(help="Reuse a samples.jsonl (default: OUT/samples.jsonl, sampled when missing)."),
    ] = None,
    per_prompt: Annotated[int, typer.Option(min=1, help="Samples per training prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 160,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """VAS value models per objective, trained only on the frozen generator's own samples (TD(lambda))."""
    from personalign.models import load_generator
    from personalign.steering.methods import steering_dir
    from personalign.steering.recipes import train_vas_recipe, write_report

    with failing():
        root = out or steering_dir()
        generator = load_generator(model, device=device)
        data = _steer_samples(generator, root, samples, per_prompt, max_new_tokens, seed)
        report = train_vas_recipe(
            generator,
            root,
            split_list(objectives, "--objectives"),
            kinds=split_list(kinds, "--kinds"),
            samples=data,
            epochs=epochs,
            seed=seed,
        )
        write_report(root, "vas", report)
        for name, r in report.items():
            typer.echo(
                f"{name}: loss {r['epoch_loss'][0]:.4f} -> {r['epoch_loss'][-1]:.4f} in {r['seconds']:.0f} s -> {root / r['folder']}"
            )


@train_app.command("user-vas")
def train_user_vas_cmd(
    out: Annotated[Path, typer.Option(help="Output folder (user_vas_config.json + head-<k>/).")],
    embedder: Annotated[
        Path | None, typer.Option(help="The PAL embedder folder the heads follow (default: the shipped one).")
    ] = None,
    per_prompt: Annotated[int, typer.Option(min=2, max=64, help="Sampled answers per training prompt.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 128,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    beta: Annotated[float, typer.Option(help="Default guidance strength.")] = 3.0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train user-conditioned value heads: one VAS head per PAL prototype, on the frozen generator's own samples."""
    from personalign.eval.onpolicy import PoolConfig, train_heads_on_pool
    from personalign.models import load_encoder, load_generator
    from personalign.preference import default_embedder_dir, load_embedder
    from personalign.steering.uservas import UserVasConfig
    from personalign.training.loop import LoopConfig

    with failing():
        started = time.perf_counter()
        generator, encoder = load_generator(model, device=device), load_encoder(None, device=device)
        folder = embedder or default_embedder_dir()
        pal = load_embedder(folder, encoder, generator)
        config = UserVasConfig(
            default_beta=beta,
            loop=LoopConfig(epochs=epochs, learning_rate=2e-3, batch_size=16, name="user-vas"),
        )
        heads = train_heads_on_pool(
            generator,
            pal,
            PoolConfig(n_per_prompt=per_prompt, max_new_tokens=max_new_tokens),
            config,
            provenance={"embedder_folder": str(folder.name)},
        )
        heads.save(out)
        typer.echo(
            f"{len(heads.heads)} heads on {heads.meta['samples']} samples in {time.perf_counter() - started:.0f} s, final losses {heads.meta['final_losses']} -> {out}"
        )


@train_app.command("modpo")
def train_modpo_cmd(
    out: SteerOutOpt = None,
    objectives: ObjectivesOpt = "verbosity,structure",
    margin_weight: Annotated[
        float, typer.Option(help="Weight of the other objectives' rewards in each adapter's MODPO margin.")
    ] = 0.1,
    samples: Annotated[
        Path | None,
        typer.Option(help="Reuse a samples.jsonl (default: OUT/samples.jsonl, sampled when missing)."),
    ] = None,
    per_prompt: Annotated[
        int, typer.Option(min=2, help="Samples per training prompt (pairs come from the same prompt).")
    ] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 160,
    max_pairs: Annotated[int, typer.Option(min=1)] = 128,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """MODPO objective adapters (one LoRA per objective) for multi-objective logit mixing."""
    from personalign.models import load_generator
    from personalign.steering.methods import steering_dir
    from personalign.steering.recipes import train_modpo_recipe, write_report

    with failing():
        root = out or steering_dir()
        generator = load_generator(model, device=device)
        data = _steer_samples(generator, root, samples, per_prompt, max_new_tokens, seed)
        report = train_modpo_recipe(
            generator,
            root,
            split_list(objectives, "--objectives"),
            samples=data,
            margin_weight=margin_weight,
            epochs=epochs,
            max_pairs=max_pairs,
            seed=seed,
        )
        write_report(root, "modpo", report)
        for name, r in report.items():
            typer.echo(
                f"{name}: {r['pairs']} pairs, loss {r['epoch_loss'][0]:.4f} -> {r['epoch_loss'][-1]:.4f} in {r['seconds']:.0f} s -> {root / r['folder']}"
            )


@train_app.command("dpa")
def train_dpa_cmd(
    out: SteerOutOpt = None,
    objectives: Annotated[
        str, typer.Option(help="The two objectives of the direction, e.g. verbosity,structure.")
    ] = "verbosity,structure",
    iterations: Annotated[int, typer.Option(min=1, help="Rejection-sampling fine-tuning rounds.")] = 2,
    per_prompt: Annotated[
        int, typer.Option(min=2, help="Answers generated per prompt and direction; the best is kept.")
    ] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 160,
    epochs: Annotated[int, typer.Option(min=1, help="SFT epochs per round.")] = 2,
    every_direction: Annotated[
        bool,
        typer.Option(
            "--every-direction",
            help="Teach every direction its own best answer per prompt, not only the drawn direction.",
        ),
    ] = False,
    loss: Annotated[
        str,
        typer.Option(
            help="sft (the paper: fine-tune on the best answers) or dpo (DPO on best vs worst under the same direction line)."
        ),
    ] = "sft",
    beta: Annotated[float, typer.Option(help="DPO's beta (--loss dpo).")] = 0.1,
    line: Annotated[
        str,
        typer.Option(
            help="How the direction is written: numbers (the paper) or numbers+words (adds the prompting phrases)."
        ),
    ] = "numbers",
    seed: Annotated[int, typer.Option()] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """A DPA direction-conditioned adapter: sample directions, keep the best of n answers, fine-tune, repeat."""
    from personalign.models import load_generator
    from personalign.steering.methods import steering_dir
    from personalign.steering.recipes import train_dpa_recipe, write_report

    with failing():
        if loss not in ("sft", "dpo"):
            raise ValidationError("--loss", "is not a DPA loss", "use sft or dpo", loss)
        if not beta > 0.0:
            raise ValidationError("--beta", "must be positive", "use e.g. 0.1", beta)
        if line not in ("numbers", "numbers+words"):
            raise ValidationError(
                "--line", "is not a direction line form", "use numbers or numbers+words", line
            )
        root = out or steering_dir()
        root.mkdir(parents=True, exist_ok=True)
        generator = load_generator(model, device=device)
        report = train_dpa_recipe(
            generator,
            root,
            split_list(objectives, "--objectives"),
            iterations=iterations,
            samples_per_prompt=per_prompt,
            max_new_tokens=max_new_tokens,
            epochs=epochs,
            every_direction=every_direction,
            loss=loss,
            beta=beta,
            line=line,
            seed=seed,
            progress=typer.echo,
        )
        write_report(root, "dpa", report)
        typer.echo(f"dpa adapter in {report['seconds']:.0f} s -> {root / report['folder']}")
