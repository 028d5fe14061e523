"""``personalign eval psoups-decode``: personal decoding judged on real data (P-SOUPS personas, read in place)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personalign.cli._common import DeviceOpt, EncoderOpt, ModelOpt, failing, split_list, write_json
from personalign.cli.eval import eval_app


@eval_app.command("psoups-decode")
def eval_psoups_decode(
    users: Annotated[
        int, typer.Option(min=4, help="Test users decoded, split evenly over the personas.")
    ] = 24,
    seed: Annotated[
        int, typer.Option(help="Seed of the user split, the decoded users and the candidates.")
    ] = 0,
    test_fraction: Annotated[
        float, typer.Option(help="Share of P-SOUPS users held out as test users.")
    ] = 0.2,
    files: Annotated[
        str, typer.Option(help="P-SOUPS files: student_phd, friendly_unfriendly.")
    ] = "student_phd,friendly_unfriendly",
    guidance: Annotated[
        str,
        typer.Option(
            help="'fit': PAL fitted on the fit users (MiniLM features); 'shipped': the installed PAL."
        ),
    ] = "fit",
    judge_features: Annotated[
        str, typer.Option(help="The judge's features, none shared with the guidance's: hidden and/or style.")
    ] = "hidden",
    fit_users: Annotated[
        int | None, typer.Option(min=2, help="Fit on at most this many fit users (default: all).")
    ] = None,
    rerank: Annotated[int, typer.Option(min=2, max=16, help="Candidates per answer for user-rerank.")] = 4,
    user_vas: Annotated[
        float, typer.Option(help="Strength of user-vas, run when the installed heads fit.")
    ] = 3.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder holding psoups_alignx/ (default: $PERSONALIGN_DATA).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the win-rate plot (PNG) here.")] = None,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Win rates of P-SOUPS test users' reranked answers over the generic one, by a per-persona judge."""
    from personalign.eval.psoups_decode import (
        PsoupsDecodeConfig,
        format_psoups_decode,
        plot_psoups_decode,
        run_psoups_decode,
    )

    with failing(usage=True):
        config = PsoupsDecodeConfig(
            users=users,
            seed=seed,
            test_fraction=test_fraction,
            files=tuple(split_list(files, "--files")),
            data_root=None if data_root is None else str(data_root),
            guidance=guidance,
            judge_features=tuple(split_list(judge_features, "--judge-features")),
            fit_users=fit_users,
            rerank=rerank,
            user_vas=user_vas,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    with failing():
        from personalign.models import load_encoder, load_generator

        generator = load_generator(model, device=device)
        result = run_psoups_decode(
            generator,
            load_encoder(encoder, device=device),
            config,
            progress=lambda line: typer.echo(line, err=True),
        )
    typer.echo(format_psoups_decode(result))
    if write_json(json_out, result):
        typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_psoups_decode(result, plot)}")


@eval_app.command("psoups-decode-pool")
def eval_psoups_decode_pool(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            exists=True, dir_okay=False, help="JSON files of `eval psoups-decode --json`, one per seed."
        ),
    ],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the pooled result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the pooled win-rate plot (PNG) here.")] = None,
) -> None:
    """Pool psoups-decode runs of several seeds: every judged answer, margins clustered by user."""
    import json

    from personalign.eval.psoups_decode import format_psoups_decode, plot_psoups_decode, pool_psoups_decode

    with failing():
        pooled = pool_psoups_decode([json.loads(p.read_text(encoding="utf-8")) for p in inputs])
    typer.echo(format_psoups_decode(pooled))
    if write_json(json_out, pooled):
        typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_psoups_decode(pooled, plot)}")
