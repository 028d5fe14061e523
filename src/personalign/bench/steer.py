"""``personalign bench steer``: tokens per second of steered decoding next to plain ``generate``.

Cases, run interleaved (plain, then each method, repeated) on the same prompts, one request
at a time and as one batch: plain decoding; VAS with the shared-trunk value head (a hook on
the LM head's input plus one ``(B, r) @ (r, V)`` matmul per step); VAS with the separate GRU
value model (one batched cell call for the top-k candidates per step); logit mixing of two
objective adapters (two extra rows per request in the same batch). Every case decodes
exactly ``max_new_tokens`` tokens (end-of-turn suppressed by ``min_new_tokens``), so the
ratios compare the same work. Decoding steps of several rows use packed weights
(:mod:`personalign.packed_linear`) when the generator has them; ``stock_too`` runs every
setting a second time with stock ``F.linear`` layers, each against its own plain baseline.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch

from personalign.steering.prompts import split

CASES: dict[str, dict[str, Any]] = {
    "plain generate": {},
    "VAS, trunk head": {"weights": {"verbosity": 0.5}, "method": "vas"},
    "VAS, separate value model": {"weights": {"verbosity": 0.5}, "method": "vas-model"},
    # weights on the simplex (sum 1): the base policy's coefficient is 0, so 2 rows per request
    "mix, 2 objective adapters": {"weights": {"verbosity": 0.5, "structure": 0.5}, "method": "mix"},
    # off the simplex: the base row is needed too, 3 rows per request
    "mix, 2 adapters + base": {"weights": {"verbosity": 0.5, "structure": 0.25}, "method": "mix"},
    # the same two adapters added in weight space: one row, one adapter (the DPA issue's 1.1x target)
    "weight-mix, 2 adapters": {"weights": {"verbosity": 0.5, "structure": 0.25}, "method": "weight-mix"},
}
TARGETS = {
    "VAS, trunk head": 1.15,
    "mix, 2 objective adapters": 1.6,
    "mix, 2 adapters + base": 1.6,
    "weight-mix, 2 adapters": 1.1,
}


def _timed(pz: Any, prompts: list[str], steer: dict[str, Any], max_new_tokens: int) -> tuple[float, int]:
    requests = [
        {
            "user": None,
            "messages": [{"role": "user", "content": p}],
            "steer": steer,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "memory": False,
            "shots": False,
        }
        for p in prompts
    ]
    start = time.perf_counter()
    results = pz.respond_batch(requests)
    return time.perf_counter() - start, sum(r.completion_tokens for r in results)


def run_steer_bench(
    pz: Any, max_new_tokens: int = 48, repeats: int = 3, batch: int = 4, stock_too: bool = False
) -> dict[str, Any]:
    """Seconds and tokens per second per case, for batch 1 and batch ``batch``; ratios to plain."""
    from personalign.packed_linear import PackedLinear, pack_modules, unpack_linears

    prompts = split()[1]
    model = pz.generator.model
    packed = any(isinstance(m, PackedLinear) for m in model.modules())
    out: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "packed_linear": packed,
        "settings": {},
    }
    settings = [("batch 1", 1, packed), (f"batch {batch}", batch, packed)]
    if stock_too and packed:
        settings += [("batch 1, stock linear", 1, False), (f"batch {batch}, stock linear", batch, False)]
    for label, size, use_packed in settings:
        unpacked = [] if use_packed else unpack_linears(model)
        try:
            out["settings"][label] = _setting(pz, prompts, size, max_new_tokens, repeats)
        finally:
            pack_modules(unpacked)  # exactly the layers that were packed
    return out


def _setting(pz: Any, prompts: list[str], size: int, max_new_tokens: int, repeats: int) -> dict[str, Any]:
    """Every case at ``size`` requests per batch: medians, tokens per second, ratios to plain."""
    _timed(pz, prompts[:size], {}, 4)  # warm-up
    for steer in CASES.values():
        _timed(pz, prompts[:size], steer, 4)  # loads the artefacts before timing
    times: dict[str, list[float]] = {name: [] for name in CASES}
    tokens: dict[str, int] = {}
    for r in range(repeats):
        chunk = prompts[(r * size) % len(prompts) :][:size] or prompts[:size]
        for name, steer in CASES.items():
            seconds, n = _timed(pz, chunk, steer, max_new_tokens)
            times[name].append(seconds)
            tokens[name] = n
    median = {name: statistics.median(v) for name, v in times.items()}
    plain = median["plain generate"]
    return {
        name: {
            "seconds": median[name],
            "tokens_per_second": tokens[name] / median[name],
            "ratio_to_plain": median[name] / plain,
            "target": TARGETS.get(name),
        }
        for name in CASES
    }


def format_steer_bench(result: dict[str, Any]) -> str:
    linear = "packed weights for several-row steps" if result.get("packed_linear") else "stock F.linear"
    lines = [
        f"bench steer: {result['max_new_tokens']} new tokens per request, median of {result['repeats']}, {result['threads']} threads, {linear}",
        "",
    ]
    lines += ["| setting | case | tokens/s | time vs plain | target |", "|---|---|---|---|---|"]
    for setting, cases in result["settings"].items():
        for name, c in cases.items():
            target = f"<= {c['target']:.2f}x" if c["target"] else ""
            lines.append(
                f"| {setting} | {name} | {c['tokens_per_second']:.1f} | {c['ratio_to_plain']:.2f}x | {target} |"
            )
    return "\n".join(lines)
