"""``personalign bench ttft``: time to first token of a returning user's second turn, with and
without the engine's per-user prompt cache (llama.cpp backend, or ``engine="local"``: the
in-process backend's :mod:`personalign.prefix_cache`).

Each user is enrolled (comparisons, memories) so their prompt carries shots and memories. For
each user in turn: the first turn is streamed (it fills a llama.cpp slot with the user's prefix),
then the second turn (the first question, the answer, a new question) is streamed twice: with the
prompt cache (only the tokens after the longest prefix a slot holds are processed) and then
without it (the whole prompt is), so the uncached request never sees a warmer cache than the
cached one. Every round asks a first question of its own, so no slot ever holds the same
second-turn prompt from an earlier round. Time to first token is the
wall time from the call to the first text piece, personalign's retrieval and rendering included.

In process (:func:`run_local_ttft_bench`) the user's cache entries are dropped before each first
turn, so the second turn can only reuse what the first turn left (never the same conversation's
prompt from the round before), and the order of the cached and uncached second turn alternates
by round. A third call repeats the second turn's prompt (a retry), which is all in the cache.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from personalign.bench.engines import cpu_model
from personalign.bench.serve import USERS

QUESTIONS = ("Plan my dinner for tonight.", "And what should I have for breakfast tomorrow?")


def _first_piece(
    pz: Any, user: str, messages: list[dict[str, str]], max_new_tokens: int, context_turn: str = "last"
) -> tuple[float, str]:
    started = time.perf_counter()
    pieces = pz.stream(user, messages, max_new_tokens=max_new_tokens, context_turn=context_turn)
    first = next(pieces, "")
    elapsed = time.perf_counter() - started
    return elapsed, first + "".join(pieces)


def run_ttft_bench(
    rounds: int = 3, max_new_tokens: int = 16, threads: int | None = None, context_turn: str = "last"
) -> dict[str, Any]:
    from personalign.backends.llamacpp import LlamaServer
    from personalign.backends.remote import RemoteEngine
    from personalign.models import embedded_gguf_path, load_encoder, load_generator
    from personalign.personalizer import Personalizer

    cached: list[float] = []
    uncached: list[float] = []
    prompt_tokens: list[int] = []
    generator, encoder = load_generator(device="cpu"), load_encoder(device="cpu")
    with (
        tempfile.TemporaryDirectory(prefix="personalign-bench-ttft-") as root,
        LlamaServer(embedded_gguf_path(), parallel=len(USERS), threads=threads) as server,
    ):
        engine = RemoteEngine(server.url, server=server)
        with Personalizer(generator, encoder, store=root, backend=engine) as pz:
            for user, data in USERS.items():
                pz.enroll(user, data["comparisons"])
                pz.remember(user, data["memories"])
            for round_ in range(rounds + 1):  # round 0 warms up, not reported
                for user in USERS:
                    # A question new to every round: a slot must never hold this very second-turn
                    # prompt from an earlier round (llama.cpp would reuse all of it).
                    first = [{"role": "user", "content": f"{QUESTIONS[0]} (day {round_ + 1})"}]
                    engine.cache_prompt = True
                    _, answer = _first_piece(pz, user, first, max_new_tokens, context_turn)
                    second = [
                        *first,
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": QUESTIONS[1]},
                    ]
                    on, _ = _first_piece(pz, user, second, max_new_tokens, context_turn)
                    engine.cache_prompt = False  # the whole prompt is processed again
                    off, _ = _first_piece(pz, user, second, max_new_tokens, context_turn)
                    if round_:
                        cached.append(on)
                        uncached.append(off)
                        prompt_tokens.append(
                            len(
                                pz.engine.prepare(
                                    user, second, None, {"context_turn": context_turn}
                                ).input_ids
                            )
                        )
    median_on, median_off = statistics.median(cached), statistics.median(uncached)
    return {
        "config": {
            "users": len(USERS),
            "rounds": rounds,
            "max_new_tokens": max_new_tokens,
            "threads": threads or "llama.cpp default",
            "context_turn": context_turn,
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
        },
        "second_turn_prompt_tokens": statistics.median(prompt_tokens),
        "ttft_ms": {
            "cached": median_on * 1000,
            "uncached": median_off * 1000,
            "cached_spread": [min(cached) * 1000, max(cached) * 1000],
            "uncached_spread": [min(uncached) * 1000, max(uncached) * 1000],
        },
        "cached_over_uncached": median_on / median_off,
    }


def _spread(times: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times) * 1000, "spread": [min(times) * 1000, max(times) * 1000]}


def run_local_ttft_bench(
    rounds: int = 3,
    max_new_tokens: int = 16,
    threads: int | None = None,
    model: str | None = None,
    context_turn: str = "last",
) -> dict[str, Any]:
    """Second-turn time to first token on the in-process backend, with and without its prompt
    cache (see the module docstring); ``model``: a generator id or path (default: SmolLM2)."""
    import torch

    from personalign.models import load_encoder, load_generator
    from personalign.personalizer import Personalizer

    if threads is not None:
        torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"cached": [], "uncached": [], "retry": []}
    prompt_tokens: list[int] = []
    reused: list[int] = []
    generator, encoder = load_generator(model, device="cpu"), load_encoder(device="cpu")
    with (
        tempfile.TemporaryDirectory(prefix="personalign-bench-ttft-") as root,
        Personalizer(generator, encoder, store=root) as pz,
    ):
        backend = pz.backend
        cache = backend.prefix_cache
        for user, data in USERS.items():
            pz.enroll(user, data["comparisons"])
            pz.remember(user, data["memories"])
        for round_ in range(rounds + 1):  # round 0 warms up, not reported
            for user in USERS:
                cache.forget(user)  # the second turn may reuse only what this first turn left
                first = [{"role": "user", "content": QUESTIONS[0]}]
                _, answer = _first_piece(pz, user, first, max_new_tokens, context_turn)
                second = [
                    *first,
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": QUESTIONS[1]},
                ]
                took: dict[str, float] = {}
                for case in ("cached", "uncached") if round_ % 2 else ("uncached", "cached"):
                    backend.prefix_cache = cache if case == "cached" else None
                    before = cache.reused_tokens
                    took[case], _ = _first_piece(pz, user, second, max_new_tokens, context_turn)
                    if case == "cached":
                        reused_now = cache.reused_tokens - before
                backend.prefix_cache = cache
                took["retry"], _ = _first_piece(pz, user, second, max_new_tokens, context_turn)
                if round_:
                    for case, value in took.items():
                        times[case].append(value)
                    prompt_tokens.append(
                        len(pz.engine.prepare(user, second, None, {"context_turn": context_turn}).input_ids)
                    )
                    reused.append(reused_now)
    median_on, median_off = statistics.median(times["cached"]), statistics.median(times["uncached"])
    return {
        "config": {
            "engine": "local",
            "model": generator.model_id,
            "users": len(USERS),
            "rounds": rounds,
            "max_new_tokens": max_new_tokens,
            "threads": torch.get_num_threads(),
            "context_turn": context_turn,
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
        },
        "second_turn_prompt_tokens": statistics.median(prompt_tokens),
        "second_turn_reused_tokens": statistics.median(reused),
        "ttft_ms": {
            "cached": median_on * 1000,
            "uncached": median_off * 1000,
            "retry": statistics.median(times["retry"]) * 1000,
            "cached_spread": _spread(times["cached"])["spread"],
            "uncached_spread": _spread(times["uncached"])["spread"],
            "retry_spread": _spread(times["retry"])["spread"],
        },
        "cached_over_uncached": median_on / median_off,
        "retry_over_uncached": statistics.median(times["retry"]) / median_off,
    }


def format_ttft_report(result: dict[str, Any]) -> str:
    t, c = result["ttft_ms"], result["config"]
    if c.get("engine") == "local":
        return "\n".join(
            [
                f"second turn, {result['second_turn_prompt_tokens']:.0f} prompt tokens, "
                f"{result['second_turn_reused_tokens']:.0f} of them from the first turn's cache (medians), "
                f"{c['users']} users x {c['rounds']} rounds:",
                f"  time to first token with the prompt cache    {t['cached']:7.0f} ms  ({t['cached_spread'][0]:.0f}-{t['cached_spread'][1]:.0f})",
                f"  time to first token without it               {t['uncached']:7.0f} ms  ({t['uncached_spread'][0]:.0f}-{t['uncached_spread'][1]:.0f})",
                f"  the same prompt again (retry), cached        {t['retry']:7.0f} ms  ({t['retry_spread'][0]:.0f}-{t['retry_spread'][1]:.0f})",
                f"  cached / uncached: {result['cached_over_uncached']:.2f}x; retry / uncached: {result['retry_over_uncached']:.2f}x",
                f"(in-process backend, {c['model']}, {c['threads']} torch threads, context_turn {c.get('context_turn', 'last')}; "
                f"CPU {c['cpu']}, {c['cpus']} cores)",
            ]
        )
    return "\n".join(
        [
            f"second turn, {result['second_turn_prompt_tokens']:.0f} prompt tokens (median), {c['users']} users x {c['rounds']} rounds:",
            f"  time to first token with the prompt cache    {t['cached']:7.0f} ms  ({t['cached_spread'][0]:.0f}-{t['cached_spread'][1]:.0f})",
            f"  time to first token without it               {t['uncached']:7.0f} ms  ({t['uncached_spread'][0]:.0f}-{t['uncached_spread'][1]:.0f})",
            f"  cached / uncached: {result['cached_over_uncached']:.2f}x",
            f"(llama.cpp backend, context_turn {c.get('context_turn', 'last')}; CPU {c['cpu']}, {c['cpus']} cores)",
        ]
    )
