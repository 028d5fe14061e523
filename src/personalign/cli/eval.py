"""``personalign eval ...``: the evaluation harnesses (the measuring code lives in ``personalign.eval``;
they read external data in place and copy nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from personalign.cli._common import (
    DeviceOpt,
    EncoderOpt,
    FeaturesOpt,
    ModelOpt,
    app,
    failing,
    int_list,
    open_personalizer,
    scratch,
    split_list,
    write_json,
)
from personalign.errors import ValidationError

eval_app = typer.Typer(
    help="Evaluation harnesses (they read external data in place; nothing is copied).", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")


@eval_app.command("merge")
def eval_merge(
    inputs: Annotated[
        list[Path],
        typer.Argument(exists=True, dir_okay=False, help="JSON files written by `eval enroll --json`."),
    ],
    json_out: Annotated[Path, typer.Option("--json", help="Write the merged result here.")],
    plot: Annotated[Path | None, typer.Option(help="Write the merged plot (PNG) here.")] = None,
) -> None:
    """Merge enrollment results (e.g. each source run with its own features) into one JSON and one plot."""
    from personalign.eval.enroll import format_table, merge_results, plot_enroll

    with failing():
        merged = merge_results([json.loads(p.read_text(encoding="utf-8")) for p in inputs])
    write_json(json_out, merged)
    typer.echo(format_table(merged))
    typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_enroll(merged, plot)}")


@eval_app.command("enroll")
def eval_enroll(
    data: Annotated[
        str,
        typer.Option(
            help="Source name(s): psoups, hh, popquorn, prefeval, synthetic, or a .jsonl; comma-separated."
        ),
    ] = "synthetic",
    fit_data: Annotated[
        str | None,
        typer.Option(help="Fit the population models on this source instead of a user split of --data."),
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated: bt, meandiff, pal, vpl, oracle, lora, bank.")
    ] = "bt,meandiff,pal,vpl,oracle",
    shots: Annotated[
        str | None,
        typer.Option(help="Shot counts, e.g. 1,2,4,8 (default: 1,2,4 on psoups, 1,2,4,8 elsewhere)."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeded user splits per source.")] = 3,
    test_fraction: Annotated[float, typer.Option(help="Share of users held out for testing.")] = 0.2,
    features: Annotated[
        str,
        typer.Option(
            help="Featurizer parts: response, prompt_x_response, log_length, style, hidden (the generator's)."
        ),
    ] = "response,prompt_x_response,log_length",
    active: Annotated[
        bool, typer.Option("--active", help="Add active vs random questioning curves (synthetic sources).")
    ] = False,
    adapter_users: Annotated[
        int, typer.Option(min=1, help="Test users for the slow lora/bank methods.")
    ] = 20,
    bank_pairs: Annotated[
        int, typer.Option(min=1, help="Comparisons each basis LoRA of the bank is trained on.")
    ] = 32,
    item_effects: Annotated[
        bool,
        typer.Option(
            "--item-effects",
            help="bt and pal also learn an offset per item seen in fitting (sources where users judge the same items).",
        ),
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy-vs-shots plot (PNG) here.")] = None,
    encoder: EncoderOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Held-out pairwise accuracy of each enrollment method per shot count, with 95% intervals."""
    from personalign.eval.enroll import EnrollConfig, format_table, plot_enroll, run_enroll
    from personalign.models import load_encoder, load_generator

    with failing(usage=True):
        config = EnrollConfig(
            data=split_list(data, "--data"),
            methods=split_list(methods, "--methods"),
            shots=int_list(shots, "--shots") if shots else None,
            seeds=seeds,
            fit_data=fit_data,
            test_fraction=test_fraction,
            features=tuple(split_list(features, "--features")),
            active=active,
            adapter_users=adapter_users,
            bank_pairs=bank_pairs,
            item_effects=item_effects,
        )
    with failing():
        enc = load_encoder(encoder, device=device)
        generator = (
            load_generator(model, device=device)
            if {"lora", "bank"} & set(config.methods) or "hidden" in config.features
            else None
        )
        result = run_enroll(config, enc, generator, progress=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_table(result))
    if write_json(json_out, result):
        typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_enroll(result, plot)}")


@eval_app.command("generate-merge")
def eval_generate_merge(
    files: Annotated[
        list[Path], typer.Argument(help="eval generate JSON files of the same settings, different methods.")
    ],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the merged result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the merged plot (PNG) here.")] = None,
) -> None:
    """Merge eval generate runs of different methods into one result, table and plot."""
    from personalign.eval.generate import format_generate, merge_generate, write_generate

    with failing():
        result = merge_generate([json.loads(f.read_text()) for f in files])
        write_generate(result, json_out, plot)
        typer.echo(format_generate(result))


@eval_app.command("generate")
def eval_generate_cmd(
    methods: Annotated[
        str, typer.Option(help="Comma list of memory, fspo-prompt, fspo-trained, fspo-shuffled, pplug, all.")
    ] = "memory,fspo-prompt,fspo-trained,fspo-shuffled,pplug,all",
    population: Annotated[
        str, typer.Option(help="Only 'synthetic' (users with hidden rewards that judge the answers).")
    ] = "synthetic",
    users: Annotated[int, typer.Option(min=1, help="Test users (unseen in training).")] = 16,
    prompts_per_user: Annotated[int, typer.Option(min=1, help="Held-out-topic prompts per user.")] = 4,
    shots: Annotated[int, typer.Option(min=1, max=16, help="Enrolment comparisons per user.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 128,
    fspo: Annotated[
        Path | None, typer.Option(help="FSPO adapter folder (default: the installed one, if any).")
    ] = None,
    pplug: Annotated[
        Path | None, typer.Option(help="Persona-Plug projector folder (default: the installed one, if any).")
    ] = None,
    user_steering: Annotated[
        bool,
        typer.Option(
            help="Keep each user's inferred steering default on, as chat does (--no-user-steering isolates the conditioners)."
        ),
    ] = True,
    comparisons: Annotated[
        str,
        typer.Option(
            help="What users compare to enrol: onpolicy (the generator's own answers, as a chat app collects them) or templated."
        ),
    ] = "onpolicy",
    rerank: Annotated[int, typer.Option(min=2, max=16, help="Candidates per answer for user-rerank.")] = 4,
    embedder: Annotated[
        str,
        typer.Option(
            help="'fit': fit PAL on this split's training users (see --fit-on); 'shipped': the installed one; or an embedder folder."
        ),
    ] = "fit",
    fit_on: Annotated[
        str,
        typer.Option(
            help="With --embedder fit: the training users' templated, onpolicy or both kinds of comparisons."
        ),
    ] = "both",
    user_vas: Annotated[
        str,
        typer.Option(
            "--user-vas",
            help="Heads for the user-vas methods: 'fit' (trained for the embedder on the generator's samples, cached) or a heads folder.",
        ),
    ] = "fit",
    user_vas_beta: Annotated[float, typer.Option(help="Guidance strength of the user-vas methods.")] = 3.0,
    lora_pairs: Annotated[
        int, typer.Option(min=1, max=4096, help="Amplified comparisons per user for user-lora.")
    ] = 32,
    lora_epochs: Annotated[int, typer.Option(min=1, max=100, help="DPO epochs of user-lora.")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the win-rate plot (PNG) here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Win rates of personalised answers over the generic answer, judged by synthetic users' hidden rewards."""
    from personalign.eval.generate import GenerateConfig, format_generate, run_generate, write_generate

    with failing(usage=True):
        if population != "synthetic":
            raise ValidationError(
                "--population",
                f"{population!r} has no judge here",
                "use synthetic; real data: personalign eval prefeval / eval rewrite",
            )
        config = GenerateConfig(
            methods=split_list(methods, "--methods"),
            users=users,
            prompts_per_user=prompts_per_user,
            shots=shots,
            seed=seed,
            max_new_tokens=max_new_tokens,
            user_steering=user_steering,
            comparisons=comparisons,
            rerank=rerank,
            user_vas=user_vas_beta,
            lora_pairs=lora_pairs,
            lora_epochs=lora_epochs,
        )
    with failing():
        with scratch(None, "personalign-eval-generate-") as store:
            from personalign.eval.generate import USER_VAS
            from personalign.eval.onpolicy import fit_split_embedder, fit_user_heads
            from personalign.models import load_encoder, load_generator
            from personalign.personalizer import Personalizer
            from personalign.preference import default_embedder_dir, load_embedder

            generator, encoder = load_generator(model, device=device), load_encoder(None, device=device)
            if embedder == "fit":
                chosen: Any = fit_split_embedder(generator, encoder, config.seed, config.shots, fit_on)
            else:
                chosen = load_embedder(
                    default_embedder_dir() if embedder == "shipped" else Path(embedder), encoder, generator
                )
            heads = None
            if any(m in USER_VAS for m in config.methods):
                heads = fit_user_heads(generator, chosen) if user_vas == "fit" else Path(user_vas)
            pz = Personalizer(
                generator,
                encoder,
                store,
                fspo=fspo,
                embedder=chosen,
                user_vas=heads,
                **({"pplug": pplug} if pplug else {}),
            )
            with pz:
                result = run_generate(
                    pz,
                    config,
                    progress=lambda line: typer.echo(line, err=True),
                    on_method=lambda partial: write_generate(partial, json_out, None),
                )
        write_generate(result, json_out, plot)
        typer.echo(format_generate(result))


@eval_app.command("onpolicy")
def eval_onpolicy_cmd(
    embedders: Annotated[
        str, typer.Option(help="Comma list of pal, bt, meandiff, vpl.")
    ] = "pal,bt,meandiff,vpl",
    data: Annotated[
        str,
        typer.Option(
            help="Comma list of what the embedders are fitted and users enrolled on: templated, onpolicy, both (fitted on both, enrolled on-policy)."
        ),
    ] = "templated,onpolicy,both",
    seeds: Annotated[str, typer.Option(help="Comma list of split seeds.")] = "0,1",
    users: Annotated[int, typer.Option(min=1, help="Test users per seed.")] = 16,
    prompts_per_user: Annotated[int, typer.Option(min=1)] = 3,
    shots: Annotated[int, typer.Option(min=1, max=8, help="Enrolment comparisons per test user.")] = 4,
    best_of: Annotated[int, typer.Option(min=2, max=16)] = 8,
    enrol: Annotated[
        str,
        typer.Option(
            help="Comma list: random (the split's on-policy shots), active (chosen by information gain from pairs of the generator's answers)."
        ),
    ] = "random,active",
    features: FeaturesOpt = "response,prompt_x_response,log_length",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """The reward side on the generator's own answers: on-policy ranking accuracy and best-of-N picks vs the generic answer."""
    from personalign.eval.onpolicy import (
        PoolConfig,
        RankingConfig,
        format_ranking,
        format_summary,
        run_ranking,
    )
    from personalign.models import load_encoder, load_generator

    with failing(usage=True):
        config = RankingConfig(
            embedders=split_list(embedders, "--embedders"),
            data=split_list(data, "--data"),
            seeds=int_list(seeds, "--seeds"),
            shots=shots,
            users=users,
            prompts_per_user=prompts_per_user,
            best_of=best_of,
            enrol=split_list(enrol, "--enrol"),
            features=tuple(split_list(features, "--features")),
            pool=PoolConfig(n_per_prompt=max(8, best_of)),
        )
    with failing():
        result = run_ranking(
            load_generator(model, device=device),
            load_encoder(None, device=device),
            config,
            progress=lambda line: typer.echo(line, err=True),
        )
        write_json(json_out, result)
        typer.echo(format_ranking(result))
        typer.echo("\nmeans over seeds:")
        typer.echo(format_summary(result))


@eval_app.command("prefeval")
def eval_prefeval(
    split: Annotated[
        str, typer.Option(help="test (the 4 travel_* topics), dev (the 16 others) or both.")
    ] = "both",
    conditions: Annotated[
        str, typer.Option(help="Comma list of none, no-memory, memory, oracle.")
    ] = "none,no-memory,memory,oracle",
    filler_turns: Annotated[
        int,
        typer.Option(
            min=0, help="Filler (user, assistant) exchanges between the preference and the question."
        ),
    ] = 3,
    test_items: Annotated[
        int, typer.Option(min=0, help="Items per test topic, seeded sample (0: all).")
    ] = 10,
    dev_items: Annotated[int, typer.Option(min=0, help="Items per dev topic, seeded sample (0: all).")] = 2,
    n_memories: Annotated[
        int, typer.Option(min=1, max=100, help="Memories retrieved in the memory condition.")
    ] = 5,
    memory_threshold: Annotated[
        float, typer.Option(min=-1.0, max=1.0, help="Least cosine similarity of a retrieved memory.")
    ] = 0.2,
    memory_unit: Annotated[
        str, typer.Option(help="user (one memory per user turn) or exchange (per user+assistant exchange).")
    ] = "user",
    topics: Annotated[str | None, typer.Option(help="Only these topics, comma-separated.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy plot (PNG) here.")] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Folder holding prefeval/ (default: $PERSONALIGN_DATA, else ../shared/data)."),
    ] = None,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """PrefEval MCQ accuracy when the preference is in a long context, in memory, absent, or right before the question."""
    from personalign.eval.prefeval import PrefEvalConfig, format_prefeval, plot_prefeval, run_prefeval

    with failing(usage=True):
        config = PrefEvalConfig(
            split=split,
            conditions=split_list(conditions, "--conditions"),
            filler_turns=filler_turns,
            test_items=test_items or None,
            dev_items=dev_items or None,
            n_memories=n_memories,
            memory_threshold=memory_threshold,
            memory_unit=memory_unit,
            topics=split_list(topics, "--topics") if topics else None,
            seed=seed,
            data_root=str(data_root) if data_root else None,
        )
    with failing(), scratch(None, "personalign-eval-prefeval-") as root:
        with open_personalizer(root, model, encoder, device) as pz:
            result = run_prefeval(config, pz, progress=lambda line: typer.echo(line, err=True))
    typer.echo(format_prefeval(result))
    if write_json(json_out, result):
        typer.echo(f"json -> {json_out}")
    if plot is not None:
        typer.echo(f"plot -> {plot_prefeval(result, plot)}")


@eval_app.command("popquorn-reference")
def eval_popquorn_reference(
    seeds: Annotated[
        int, typer.Option(min=1, max=100, help="Seeded splits for the fit-users-only reference.")
    ] = 3,
    held_out: Annotated[float, typer.Option(min=0.01, max=0.99, help="Share of annotators held out.")] = 0.2,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Folder that holds popquorn/ (default: $PERSONALIGN_DATA or ../shared/data)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """How often POPQUORN's item means order a user's own pairs: the README's leave-one-out
    reference recomputed, and item means of the fit users only (what a deployed model knows)."""
    from personalign.eval.reference import popquorn_reference

    with failing():
        result = popquorn_reference(data_root, seeds=seeds, held_out=held_out)
    loo, fit = result["leave_one_out"], result["fit_users_only"]
    typer.echo(
        f"leave-one-out item means (all other annotators): {loo['ties_dropped']:.4f} over {loo['pairs']} pairs (ties dropped), {loo['ties_half']:.4f} over {loo['all_pairs']} (ties half)"
    )
    typer.echo(
        f"item means of the fit users only ({held_out:.0%} held out, ties half): {fit['mean']:.4f} (per seed {', '.join(f'{a:.4f}' for a in fit['per_seed'])})"
    )
    write_json(json_out, result)


@eval_app.command("rewrite")
def eval_rewrite(
    split: Annotated[
        str, typer.Option(help="test (the seeded 20% held-out users) or dev (the others).")
    ] = "test",
    arms: Annotated[
        str,
        typer.Option(
            help="Comma list: generic plus fspo-prompt, fspo-trained (needs an installed FSPO adapter), memory."
        ),
    ] = "generic,fspo-prompt",
    k: Annotated[int, typer.Option(min=1, help="Target emails per user.")] = 2,
    users: Annotated[int, typer.Option(min=0, help="Most users (0: all of the split).")] = 0,
    n_shots: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Most of the user's other emails put in the prompt (the most similar first)."
        ),
    ] = 3,
    n_memories: Annotated[
        int, typer.Option(min=1, max=100, help="Memories retrieved in the memory arm.")
    ] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per generate call.")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result here (scores only, no email text).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the plot (PNG) here.")] = None,
    texts: Annotated[
        Path | None,
        typer.Option(
            help="Write the emails, references and outputs here as JSONL (they quote the data: keep it out of the repository)."
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Folder holding popquorn/ (default: $PERSONALIGN_DATA, else ../shared/data)."),
    ] = None,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
) -> None:
    """POPQUORN email rewriting: ROUGE-L and embedding similarity to the user's own rewrite, personalised vs generic."""
    from personalign.eval.rewrite import RewriteConfig, format_rewrite, plot_rewrite, run_rewrite, split_texts

    with failing(usage=True):
        config = RewriteConfig(
            split=split,
            arms=split_list(arms, "--arms"),
            k=k,
            users=users or None,
            n_shots=n_shots,
            n_memories=n_memories,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            data_root=str(data_root) if data_root else None,
        )
    with failing(), scratch(None, "personalign-eval-rewrite-") as root:
        with open_personalizer(root, model, encoder, device) as pz:
            result, rows = split_texts(
                run_rewrite(config, pz, progress=lambda line: typer.echo(line, err=True))
            )
    typer.echo(format_rewrite(result))
    if write_json(json_out, result):
        typer.echo(f"json -> {json_out}")
    if texts is not None:
        texts.parent.mkdir(parents=True, exist_ok=True)
        texts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        typer.echo(f"texts -> {texts}")
    if plot is not None:
        typer.echo(f"plot -> {plot_rewrite(result, plot)}")


@eval_app.command("steer-merge")
def eval_steer_merge(
    files: Annotated[
        list[Path], typer.Argument(help="eval steer JSON files of the same settings, different methods.")
    ],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the merged result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the merged plot (PNG) here.")] = None,
) -> None:
    """Merge eval steer runs of different methods into one result, table and plot."""
    from personalign.eval.steer import format_steer, merge_steer, plot_steer

    with failing():
        result = merge_steer([json.loads(f.read_text()) for f in files])
    typer.echo(format_steer(result))
    write_json(json_out, result)
    if plot is not None:
        typer.echo(f"plot: {plot_steer(result, plot)}")


@eval_app.command("steer")
def eval_steer(
    objectives: Annotated[
        str,
        typer.Option(
            help="Swept objective first; a second one adds the two-objective front. A leading - means less is better."
        ),
    ] = "verbosity,-structure",
    methods: Annotated[
        str, typer.Option(help="Comma-separated: prompt, logit, vas, vas-model, mix.")
    ] = "prompt,logit,vas,vas-model,mix",
    sweep: Annotated[int, typer.Option(min=3, help="Requested weights, evenly over [-1, 1].")] = 7,
    directions: Annotated[
        int, typer.Option(min=2, help="Directions over [0, 90] degrees for the front.")
    ] = 5,
    prompts: Annotated[int, typer.Option(min=1, help="Held-out prompts per point.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=8)] = 128,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            max=16,
            help="Answers per prompt and point (seeds 0, 1, ...): more answers, tighter drift intervals.",
        ),
    ] = 1,
    no_front: Annotated[bool, typer.Option("--no-front", help="Only the sweep.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the sweep and front plot (PNG) here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Controllability (Spearman of requested vs measured), drift of the other objectives, and Pareto fronts per method."""
    from personalign.eval.steer import SteerEvalConfig, format_steer, plot_steer, run_steer_eval

    with failing(usage=True):
        config = SteerEvalConfig(
            objectives=split_list(objectives, "--objectives"),
            methods=split_list(methods, "--methods"),
            sweep=sweep,
            directions=directions,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            seeds=seeds,
            front=not no_front,
        )
    with failing(), scratch(None, "personalign-eval-steer-") as root:
        with open_personalizer(root, model, None, device) as pz:
            result = run_steer_eval(config, pz, progress=typer.echo)
    typer.echo(format_steer(result))
    write_json(json_out, result)
    if plot is not None:
        typer.echo(f"plot: {plot_steer(result, plot)}")
