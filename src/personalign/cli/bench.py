"""``personalign bench ...``: benchmarks that interleave their cases and print ratios against a
baseline run side by side (the measuring code lives in ``personalign.bench``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from personalign.cli._common import (
    DeviceOpt,
    EncoderOpt,
    JsonOpt,
    ModelOpt,
    app,
    failing,
    int_list,
    open_personalizer,
    scratch,
    write_json,
)

bench_app = typer.Typer(
    help="Benchmarks that print ratios against a baseline run side by side.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@bench_app.command("adapters")
def bench_adapters(
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    json_out: JsonOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Mixed-user batches vs one adapter, activation cost vs adapters resident, enrolment time, bytes per user."""
    from personalign.bench.adapters import format_report, run_adapter_bench

    with (
        failing(),
        scratch(None, "personalign-bench-") as root,
        open_personalizer(root, model, None, device) as pz,
    ):
        result = run_adapter_bench(pz, max_new_tokens=max_new_tokens, repeats=repeats, epochs=epochs)
    typer.echo(format_report(result))
    write_json(json_out, result)


@bench_app.command("steer")
def bench_steer(
    max_new_tokens: Annotated[int, typer.Option(min=4)] = 48,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    batch: Annotated[int, typer.Option(min=2, help="Requests in the batched setting.")] = 4,
    stock_too: Annotated[
        bool,
        typer.Option(
            "--stock-too", help="Also run every case with stock F.linear (packing off), side by side."
        ),
    ] = False,
    json_out: JsonOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Tokens per second of plain generate vs VAS (trunk head, separate model) and two-adapter logit mixing."""
    from personalign.bench.steer import format_steer_bench, run_steer_bench

    with (
        failing(),
        scratch(None, "personalign-bench-") as root,
        open_personalizer(root, model, None, device) as pz,
    ):
        result = run_steer_bench(
            pz, max_new_tokens=max_new_tokens, repeats=repeats, batch=batch, stock_too=stock_too
        )
    typer.echo(format_steer_bench(result))
    write_json(json_out, result)


@bench_app.command("linear")
def bench_linear(
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    json_out: JsonOpt = None,
    model: ModelOpt = None,
) -> None:
    """One decoding step's projections on the generator's weights: stock F.linear vs packed oneDNN, per row count."""
    from personalign.bench.linear import format_linear_bench, run_linear_bench
    from personalign.models import load_generator

    with failing(RuntimeError):  # RuntimeError: no oneDNN packing on this CPU or build
        generator = load_generator(model, device="cpu", dtype="float32")
        result = run_linear_bench(generator.model, repeats=repeats)
    typer.echo(format_linear_bench(result))
    write_json(json_out, result)


@bench_app.command("generate")
def bench_generate(
    max_new_tokens: Annotated[int, typer.Option(min=4)] = 48,
    repeats: Annotated[int, typer.Option(min=1, help="Prompts (each runs every case once).")] = 3,
    fspo: Annotated[
        Path | None, typer.Option(help="FSPO adapter folder (default: the installed one, if any).")
    ] = None,
    pplug: Annotated[
        Path | None, typer.Option(help="Persona-Plug projector folder (default: the installed one, if any).")
    ] = None,
    user_vas: Annotated[
        Path | None,
        typer.Option("--user-vas", help="User-vas heads folder (default: the installed ones, if any fit)."),
    ] = None,
    json_out: JsonOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Tokens per second of chat with memory, FSPO shots, the FSPO adapter and the Persona-Plug token vs plain generate."""
    from personalign.bench.generate import format_generate_bench, run_generate_bench
    from personalign.models import load_encoder, load_generator
    from personalign.personalizer import Personalizer

    with failing(), scratch(None, "personalign-bench-") as root:
        pz = Personalizer(
            load_generator(model, device=device),
            load_encoder(None, device=device),
            root,
            fspo=fspo,
            user_vas=user_vas,
            **({"pplug": pplug} if pplug else {}),
        )
        with pz:
            result = run_generate_bench(pz, max_new_tokens=max_new_tokens, repeats=repeats)
    typer.echo(format_generate_bench(result))
    write_json(json_out, result)


@bench_app.command("decode")
def bench_decode(
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,4,16",
    tokens: Annotated[int, typer.Option(min=4, max=1024, help="New tokens per row.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repeats (the median is reported).")] = 3,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: torch's).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write tokens/s against batch size here (PNG).")] = None,
    compiled: Annotated[
        bool,
        typer.Option(
            "--compiled",
            help="Also float32 with a static cache and torch.compile'd steps (compiles once per batch size).",
        ),
    ] = False,
    json_out: JsonOpt = None,
) -> None:
    """Decoding tokens/s per precision and batch size, beside llama.cpp on the same GGUF and the bandwidth limit."""
    from personalign.bench.decode import format_decode_report, plot_decode, run_decode_bench
    from personalign.errors import ValidationError

    with failing(usage=True):
        sizes = tuple(int_list(batches, "--batches"))
        if min(sizes) < 1:
            raise ValidationError("--batches", "must be positive", "pass e.g. 1,4,16", batches)
    with failing():
        result = run_decode_bench(sizes, tokens, repeats, threads, compiled)
        if plot is not None:
            plot_decode(result, plot)
    typer.echo(format_decode_report(result))
    write_json(json_out, result)


@bench_app.command("ttft")
def bench_ttft(
    rounds: Annotated[
        int, typer.Option(min=1, help="Rounds over the 4 seeded users (after one warm-up).")
    ] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=256)] = 16,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads (llama.cpp's, or torch's with --engine local).")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(help="llamacpp (a llama-server) or local (in-process transformers, its prefix cache)."),
    ] = "llamacpp",
    context_turn: Annotated[
        str,
        typer.Option(
            help="Where memories and shots go: last (the latest user turn, the default) or first (the "
            "conversation's first user turn, the same for the whole conversation)."
        ),
    ] = "last",
    json_out: JsonOpt = None,
    model: ModelOpt = None,
) -> None:
    """Time to first token of a returning user's second turn, with and without the per-user prompt cache."""
    from personalign.bench.ttft import format_ttft_report, run_local_ttft_bench, run_ttft_bench

    if engine not in ("llamacpp", "local"):
        raise typer.BadParameter(f"{engine!r}: use llamacpp or local", param_hint="--engine")
    if model is not None and engine != "local":
        raise typer.BadParameter(
            "only with --engine local (llama.cpp runs the embedded GGUF)", param_hint="--model"
        )
    if context_turn not in ("last", "first"):
        raise typer.BadParameter(f"{context_turn!r}: use last or first", param_hint="--context-turn")
    with failing():
        if engine == "local":
            result = run_local_ttft_bench(rounds, max_new_tokens, threads, model, context_turn)
        else:
            result = run_ttft_bench(rounds, max_new_tokens, threads, context_turn)
    typer.echo(format_ttft_report(result))
    write_json(json_out, result)


@bench_app.command("enroll")
def bench_enroll(
    users: Annotated[int, typer.Option(min=2, help="Fresh synthetic users to enroll.")] = 20,
    shots: Annotated[int, typer.Option(min=1, help="Comparisons per user.")] = 8,
    json_out: JsonOpt = None,
    embedder: Annotated[Path | None, typer.Option(help="Embedder folder (default: the shipped PAL).")] = None,
    encoder: EncoderOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Inferring a user from their comparisons, as a ratio to encoding those comparisons' texts."""
    from personalign.bench.enroll import bench_store, format_enroll_report, run_enroll_bench
    from personalign.personalizer import Personalizer

    store = bench_store()
    try:
        with (
            failing(),
            Personalizer.load(
                model=model, encoder=encoder, device=device, store=store, embedder=embedder
            ) as pz,
        ):
            result = run_enroll_bench(pz, users=users + 1, shots=shots)
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    typer.echo(format_enroll_report(result))
    write_json(json_out, result)


@bench_app.command("memory")
def bench_memory(
    users: Annotated[int, typer.Option(min=1)] = 100,
    memories: Annotated[int, typer.Option(min=1)] = 10_000,
    queries: Annotated[int, typer.Option(min=1)] = 200,
    json_out: JsonOpt = None,
    store: Annotated[
        Path | None, typer.Option(help="Store directory (default: a temporary one, removed after).")
    ] = None,
) -> None:
    """add/search p50/p95 at N memories for one user among many, next to one encoder call."""
    from personalign.bench.memory import format_report, run_memory_bench

    with failing(), scratch(store, "personalign-bench-") as root:
        result = run_memory_bench(root, users=users, memories=memories, queries=queries, adds=queries)
    typer.echo(format_report(result))
    write_json(json_out, result)


@bench_app.command("serve")
def bench_serve(
    clients: Annotated[str, typer.Option(help="Concurrency levels to measure, comma-separated.")] = "1,4,16",
    requests: Annotated[
        int, typer.Option(min=1, help="Requests per client at each level (bounded by --seconds too).")
    ] = 4,
    seconds: Annotated[
        float, typer.Option(min=1.0, help="Most seconds of load per level and server.")
    ] = 60.0,
    max_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    max_batch: Annotated[
        int, typer.Option(min=2, max=256, help="Batch size of the batched server (the baseline uses 1).")
    ] = 16,
    model: ModelOpt = None,
    encoder: EncoderOpt = None,
    device: DeviceOpt = None,
    mixed: Annotated[
        bool,
        typer.Option(
            "--mixed",
            help="20 users; chats mixed with memory writes and enrollments, all read back at the end.",
        ),
    ] = False,
    engines: Annotated[
        bool,
        typer.Option(
            "--engines",
            help="Compare the in-process backend, the remote llama.cpp backend and plain llama.cpp (builds llama-server once).",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="With --engines: llama.cpp's CPU threads (default: its own choice)."),
    ] = None,
    training: Annotated[
        bool,
        typer.Option(
            "--training",
            help="Chat latency of other users while one user's adapter trains in serve's worker "
            "(idle, training, idle; --clients: its first level, --seconds: each idle phase).",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes of the batched server (above 1 needs --profiles-url and --chroma-url); "
            "the one-at-a-time baseline stays one process on an embedded store.",
        ),
    ] = 1,
    profiles_url: Annotated[
        str | None,
        typer.Option(help="The batched server's profiles database (sqlite:///path.db or postgresql://...)."),
    ] = None,
    chroma_url: Annotated[
        str | None,
        typer.Option(help="The batched server's Chroma server for memories (a running `chroma run`)."),
    ] = None,
    json_out: JsonOpt = None,
) -> None:
    """Throughput and p50/p95 latency at 1, 4 and 16 clients on loopback, batched vs one-at-a-time
    (``--engines``: personalign in process, personalign on llama.cpp, and llama.cpp alone).
    ``--workers N --profiles-url ... --chroma-url ...`` runs the batched server as N workers on shared state."""
    from personalign.bench.serve import format_report, run_serve_bench, server_plan
    from personalign.errors import ValidationError

    with failing(usage=True):
        levels = int_list(clients, "--clients")
        if min(levels) < 1:
            raise ValidationError(
                "--clients", "must be positive integers separated by commas", "pass e.g. 1,4,16", clients
            )
        shared = {"--workers": workers != 1, "--profiles-url": profiles_url, "--chroma-url": chroma_url}
        given = [option for option, value in shared.items() if value]
        if given and (engines or training):
            raise ValidationError(
                given[0],
                f"applies to the batched-vs-one-at-a-time bench, not to {'--engines' if engines else '--training'}",
                f"drop {', '.join(given)}, or run without {'--engines' if engines else '--training'}",
            )
        server_plan(max_batch, workers, profiles_url, chroma_url)  # several workers need both URLs
    if training:
        from personalign.bench.training import format_training_report, run_training_bench

        with failing():
            report = run_training_bench(clients=levels[0], idle_seconds=seconds, max_tokens=max_tokens)
        typer.echo(format_training_report(report))
        write_json(json_out, report)
        return
    if engines:
        from personalign.bench.engines import format_engine_report, run_engine_bench

        with failing():
            report = run_engine_bench(levels, requests, seconds, max_tokens, max_batch, threads)
        typer.echo(format_engine_report(report))
        write_json(json_out, report)
        return
    with failing():
        result = run_serve_bench(
            levels=levels,
            requests_per_client=requests,
            max_seconds=seconds,
            max_tokens=max_tokens,
            max_batch=max_batch,
            model=model,
            encoder=encoder,
            device=device,
            mixed=mixed,
            workers=workers,
            profiles_url=profiles_url,
            chroma_url=chroma_url,
        )
    typer.echo(format_report(result))
    write_json(json_out, result)
