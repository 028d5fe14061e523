"""``personalign bench ttft``: time to first token of a returning user's second turn, with and
without the engine's per-user prompt cache (llama.cpp backend).

Each user is enrolled (comparisons, memories) so their prompt carries shots and memories. For
each user in turn: the first turn is streamed (it fills a llama.cpp slot with the user's prefix),
then the second turn (the first question, the answer, a new question) is streamed twice: with the
prompt cache (only the new tokens are processed) and then without it (the whole prompt is), so
the uncached request never sees a warmer cache than the cached one. Time to first token is the
wall time from the call to the first text piece, personalign's retrieval and rendering included.
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
    pz: Any, user: str, messages: list[dict[str, str]], max_new_tokens: int
) -> tuple[float, str]:
    started = time.perf_counter()
    pieces = pz.stream(user, messages, max_new_tokens=max_new_tokens)
    first = next(pieces, "")
    elapsed = time.perf_counter() - started
    return elapsed, first + "".join(pieces)


def run_ttft_bench(rounds: int = 3, max_new_tokens: int = 16, threads: int | None = None) -> dict[str, Any]:
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
                    first = [{"role": "user", "content": QUESTIONS[0]}]
                    engine.cache_prompt = True
                    _, answer = _first_piece(pz, user, first, max_new_tokens)
                    second = [
                        *first,
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": QUESTIONS[1]},
                    ]
                    on, _ = _first_piece(pz, user, second, max_new_tokens)
                    engine.cache_prompt = False  # the whole prompt is processed again
                    off, _ = _first_piece(pz, user, second, max_new_tokens)
                    if round_:
                        cached.append(on)
                        uncached.append(off)
                        prompt_tokens.append(len(pz.engine.prepare(user, second, None, {}).input_ids))
    median_on, median_off = statistics.median(cached), statistics.median(uncached)
    return {
        "config": {
            "users": len(USERS),
            "rounds": rounds,
            "max_new_tokens": max_new_tokens,
            "threads": threads or "llama.cpp default",
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


def format_ttft_report(result: dict[str, Any]) -> str:
    t, c = result["ttft_ms"], result["config"]
    return "\n".join(
        [
            f"second turn, {result['second_turn_prompt_tokens']:.0f} prompt tokens (median), {c['users']} users x {c['rounds']} rounds:",
            f"  time to first token with the prompt cache    {t['cached']:7.0f} ms  ({t['cached_spread'][0]:.0f}-{t['cached_spread'][1]:.0f})",
            f"  time to first token without it               {t['uncached']:7.0f} ms  ({t['uncached_spread'][0]:.0f}-{t['uncached_spread'][1]:.0f})",
            f"  cached / uncached: {result['cached_over_uncached']:.2f}x",
            f"(llama.cpp backend; CPU {c['cpu']}, {c['cpus']} cores)",
        ]
    )
