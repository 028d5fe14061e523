"""``personalign bench generate``: tokens per second of ``chat`` with each conditioner on,
next to plain ``generate`` on the same prompts.

Cases, run interleaved (every case once per repeat) on the same held-out prompts for one
enrolled synthetic user, one request at a time: plain decoding (no user); memory retrieval
(search plus the memories in the prompt); FSPO shots in the prompt; the same shots through
the FSPO adapter; the Persona-Plug soft token; everything together; personal reranking with 2
and 4 candidates (sampled as rows of one batch, scored by the user's reward). Every case decodes
exactly ``max_new_tokens`` tokens (end-of-turn suppressed), so ratios compare the same
decoding work and the differences are retrieval, longer prompts, the adapter and the plug.
"FSPO adapter vs shots" isolates the adapter's own cost: the same prompt with and without it.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch

from personalign.eval.generate import generation_split, memory_items

OFF = {"memory": False, "shots": False, "fspo": False, "user_vas": 0.0}
CASES: dict[str, dict[str, Any]] = {
    "plain generate": {},
    "memory": {**OFF, "memory": True},
    "FSPO shots in the prompt": {**OFF, "shots": True},
    "FSPO shots + adapter": {**OFF, "shots": True, "fspo": True},
    "Persona-Plug token": {**OFF, "pplug": True},
    "all": {"memory": True, "shots": True, "fspo": True, "pplug": True},
    "user-rerank N=2": {**OFF, "pplug": False, "rerank": 2},
    "user-rerank N=4": {**OFF, "pplug": False, "rerank": 4},
    "user-vas": {**OFF, "pplug": False, "user_vas": 3.0},
}
NEEDS = {
    "FSPO shots + adapter": "fspo",
    "Persona-Plug token": "pplug",
    "all": "fspo+pplug",
    "user-vas": "heads",
}
BATCH = 8  # users in the mixed-batch comparison
USER = "bench-user"


def _available(pz: Any, name: str) -> bool:
    need = NEEDS.get(name, "")
    available = ("fspo" not in need or pz.fspo_folder is not None) and (
        "pplug" not in need or getattr(pz, "plug", None) is not None
    )
    return available and (need != "heads" or pz.user_heads() is not None)


def _timed_batch(
    pz: Any, users: list[str], prompts: list[str], options: dict[str, Any], max_new_tokens: int
) -> float:
    """Seconds for one mixed batch: request i is users[i] asking prompts[i] (all generic when options is empty)."""
    requests = [
        {
            "user": u if options else None,
            "messages": [{"role": "user", "content": p}],
            "steer": {},
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,
            "temperature": 0.0,
            **options,
        }
        for u, p in zip(users, prompts, strict=True)
    ]
    start = time.perf_counter()
    pz.respond_batch(requests)
    return time.perf_counter() - start


def _timed(pz: Any, prompt: str, options: dict[str, Any], max_new_tokens: int) -> tuple[float, int, int]:
    user = None if not options else USER
    start = time.perf_counter()
    # steer={}: the user's inferred steering default would add its own rows and processors
    result = pz.respond(
        user,
        [{"role": "user", "content": prompt}],
        steer={},
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        temperature=0.0,
        **options,
    )
    return time.perf_counter() - start, result.completion_tokens, result.prompt_tokens


def run_generate_bench(pz: Any, max_new_tokens: int = 48, repeats: int = 3, shots: int = 4) -> dict[str, Any]:
    """Median seconds, tokens per second, prompt tokens and the ratio to plain per case."""
    split = generation_split(shots=shots)
    user = split.test[0]
    pz.enroll(USER, user.shots)
    pz.remember(USER, memory_items(user))
    cases = {name: options for name, options in CASES.items() if _available(pz, name)}
    skipped = [name for name in CASES if name not in cases]
    prompts = split.prompts[:repeats]
    for options in cases.values():
        _timed(pz, prompts[0], options, 4)  # warm-up; loads the adapter and the projector
    times: dict[str, list[float]] = {name: [] for name in cases}
    tokens: dict[str, list[int]] = {name: [] for name in cases}
    prompt_tokens: dict[str, list[int]] = {name: [] for name in cases}
    for prompt in prompts:
        for name, options in cases.items():
            seconds, n, p = _timed(pz, prompt, options, max_new_tokens)
            times[name].append(seconds)
            tokens[name].append(n)
            prompt_tokens[name].append(p)
    plain = statistics.median(times["plain generate"])
    out: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "repeats": len(prompts),
        "skipped": skipped,
        "cases": {},
    }
    for name in cases:
        median = statistics.median(times[name])
        out["cases"][name] = {
            "seconds": median,
            "tokens_per_second": statistics.median(tokens[name]) / median,
            "prompt_tokens": statistics.median(prompt_tokens[name]),
            "ratio_to_plain": median / plain,
        }
    if "user-vas" in cases:  # a batch of 8 different users, each with their own guidance, vs 8 plain rows
        users = [f"bench-{u.user}" for u in split.test[:BATCH]]
        for name, u in zip(users, split.test[:BATCH], strict=True):
            pz.enroll(name, u.shots)
        batch_prompts = [split.prompts[i % len(split.prompts)] for i in range(len(users))]
        batch_times: dict[str, list[float]] = {"plain": [], "user-vas": []}
        _timed_batch(pz, users, batch_prompts, cases["user-vas"], 4)
        for _ in prompts:
            batch_times["plain"].append(_timed_batch(pz, users, batch_prompts, {}, max_new_tokens))
            batch_times["user-vas"].append(
                _timed_batch(pz, users, batch_prompts, cases["user-vas"], max_new_tokens)
            )
        out["mixed_batch"] = {
            "users": len(users),
            **{k: statistics.median(v) for k, v in batch_times.items()},
        }
        out["mixed_batch"]["ratio"] = out["mixed_batch"]["user-vas"] / out["mixed_batch"]["plain"]
    if "FSPO shots + adapter" in out["cases"]:
        out["fspo_adapter_vs_same_prompt"] = (
            out["cases"]["FSPO shots + adapter"]["seconds"]
            / out["cases"]["FSPO shots in the prompt"]["seconds"]
        )
    return out


def format_generate_bench(result: dict[str, Any]) -> str:
    lines = [
        f"bench generate: {result['max_new_tokens']} new tokens per request, median of {result['repeats']} prompts, {result['threads']} threads",
        "",
    ]
    lines += ["| case | prompt tokens | tokens/s | time vs plain |", "|---|---|---|---|"]
    for name, c in result["cases"].items():
        lines.append(
            f"| {name} | {c['prompt_tokens']:.0f} | {c['tokens_per_second']:.1f} | {c['ratio_to_plain']:.2f}x |"
        )
    if "fspo_adapter_vs_same_prompt" in result:
        lines.append(
            f"\nFSPO adapter vs the same shots without it: {result['fspo_adapter_vs_same_prompt']:.2f}x"
        )
    if "mixed_batch" in result:
        b = result["mixed_batch"]
        lines.append(
            f"\nmixed batch of {b['users']} users, each with their own user-vas guidance: {b['user-vas']:.2f} s vs {b['plain']:.2f} s plain ({b['ratio']:.2f}x)"
        )
    if result["skipped"]:
        lines.append(f"skipped (no artefact for this generator): {', '.join(result['skipped'])}")
    return "\n".join(lines)
