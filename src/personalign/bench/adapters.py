"""``personalign bench adapters``: the cost of per-user adapters, each next to its baseline.

(a) one batch of 8 requests from 8 different users vs the same batch all on one adapter, and vs
    the plain base (the three cases interleaved, in a rotated order per repeat; every row decodes
    exactly ``max_new_tokens``);
(b) time to make a new user's adapter active when all of 1, 10 or 100 slots are taken;
(c) enrolment wall time for 16 comparisons (adapter training included) vs storing them only;
(d) bytes on disk per user: a rank-8 LoRA folder vs the profile the embedders work from.

The adapters of (a) and (b) are copies of one trained adapter under different users: the cost
of mixing and loading depends on how many distinct adapters there are, not on their values.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from typing import Any

import torch

from personalign.adapters.store import ADAPTER_DIR
from personalign.memory.profiles import Profiles
from personalign.types import UserProfile


def _pairs(n: int) -> list[dict[str, str]]:
    topics = ["eggs", "sleep", "groceries", "the sky", "running", "languages", "houseplants", "interviews"]
    return [
        {
            "prompt": f"Give me advice about {topics[i % len(topics)]} (case {i}).",
            "chosen": f"Keep it simple with {topics[i % len(topics)]}: one clear step.",
            "rejected": f"There are many considerations about {topics[i % len(topics)]}. First, think about context. "
            "Second, consider the details. Third, review everything again carefully before acting on it.",
        }
        for i in range(n)
    ]


def _clone_adapter(profiles: Profiles, source_user: str, user: str) -> None:
    """``user`` as a copy of ``source_user``: adapter folder and profile (in any profile store)."""
    target = profiles.user_dir(user) / ADAPTER_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(profiles.user_dir(source_user) / ADAPTER_DIR, target, dirs_exist_ok=True)
    copy = profiles.get(source_user).model_dump_json().replace(source_user, user)
    profiles.update(user, lambda _: UserProfile.model_validate_json(copy))


def _profile_bytes(profile: UserProfile) -> int:
    """The profile's size as the JSON store writes it (``profile.json``), whatever store holds it."""
    return len(json.dumps(profile.model_dump(mode="json"), ensure_ascii=False, indent=1).encode("utf-8"))


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def run_adapter_bench(
    pz: Any,
    max_new_tokens: int = 32,
    repeats: int = 3,
    resident_counts: tuple[int, ...] = (1, 10, 100),
    epochs: int = 4,
) -> dict[str, Any]:
    """Run (a)-(d) on an open Personalizer (its store is filled with bench users)."""
    profiles = pz.profiles
    pairs = _pairs(16)
    result: dict[str, Any] = {
        "model": pz.generator.model_id,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }

    # (c) enrolment: store only vs store + train a rank-8 adapter.
    started = time.perf_counter()
    pz.enroll("bench-plain", pairs)
    store_only = time.perf_counter() - started
    started = time.perf_counter()
    pz.enroll("bench-0", pairs, adapter=True, adapter_config={"rank": 8, "epochs": epochs, "seed": 0})
    with_adapter = time.perf_counter() - started
    result["enroll_16"] = {
        "store_only_s": store_only,
        "with_adapter_s": with_adapter,
        "ratio": with_adapter / max(store_only, 1e-9),
        "epochs": epochs,
    }

    # (d) bytes on disk.
    adapter_bytes = sum(f.stat().st_size for f in (profiles.user_dir("bench-0") / ADAPTER_DIR).iterdir())
    profile_bytes = _profile_bytes(profiles.get("bench-plain"))
    result["bytes_per_user"] = {
        "lora_rank8": adapter_bytes,
        "profile": profile_bytes,
        "ratio": adapter_bytes / profile_bytes,
    }

    # (a) 8 requests from 8 users vs the same 8 requests all on one user's adapter.
    users = [f"bench-{i}" for i in range(8)]
    for user in users[1:]:
        _clone_adapter(profiles, "bench-0", user)
    pz.adapters.max_resident = max(pz.adapters.max_resident, max(resident_counts) + 1, len(users))
    question = [{"role": "user", "content": "Give me advice about cooking dinner."}]
    # every row decodes exactly max_new_tokens, so the three cases do the same decoding work
    fixed = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "shots": False,
        "memory": False,
    }
    fixed["steer"] = {}
    mixed = [{"user": u, "messages": question, **fixed} for u in users]
    single = [{"user": users[0], "messages": question, **fixed} for _ in users]
    base = [{"user": None, "messages": question, **fixed} for _ in users]
    pz.respond_batch(mixed)  # warm-up: loads all eight adapters
    cases = [("base", base), ("one_adapter", single), ("eight_users", mixed)]
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for repeat in range(repeats):  # interleaved, in a rotated order: a drifting load spreads over all
        shift = repeat % len(cases)
        for name, reqs in cases[shift:] + cases[:shift]:
            times[name] += _timed(lambda r=reqs: pz.respond_batch(r), 1)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result["batch_8"] = {
        "median_s": medians,
        "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
        "repeats": repeats,
        "eight_users_over_one_adapter": medians["eight_users"] / medians["one_adapter"],
        "one_adapter_over_base": medians["one_adapter"] / medians["base"],
        "max_new_tokens": max_new_tokens,
    }

    # (b) making a new user's adapter active when all N slots are taken (a hot-swap into the LRU slot).
    activation = {}
    probes = [f"bench-p{i}" for i in range(repeats + 1)]
    for count in resident_counts:
        for user in [*(f"bench-r{i}" for i in range(count)), *probes]:
            if not (profiles.user_dir(user) / ADAPTER_DIR).exists():
                _clone_adapter(profiles, "bench-0", user)
        for user in list(pz.adapters.resident):
            pz.adapters.unload(user)
        pz.adapters.max_resident = count
        for i in range(count):
            pz.adapters.activate(f"bench-r{i}")
        samples = []
        for probe in probes[1:]:
            started = time.perf_counter()
            pz.adapters.activate(probe)
            samples.append(time.perf_counter() - started)
        activation[str(count)] = {
            "median_ms": 1000 * statistics.median(samples),
            "resident": len(pz.adapters.resident),
        }
    first = activation[str(resident_counts[0])]["median_ms"]
    result["activation"] = {
        "by_resident": activation,
        "last_over_first": activation[str(resident_counts[-1])]["median_ms"] / first,
    }
    return result


def format_report(result: dict[str, Any]) -> str:
    batch, act, enroll, size = (
        result["batch_8"],
        result["activation"],
        result["enroll_16"],
        result["bytes_per_user"],
    )
    lines = [
        f"personalign bench adapters  ({result['model']}, {result['torch_threads']} threads)",
        f"(a) batch of 8, {batch['max_new_tokens']} new tokens   base {batch['median_s']['base']:.2f} s | one adapter "
        f"{batch['median_s']['one_adapter']:.2f} s | 8 users {batch['median_s']['eight_users']:.2f} s",
        f"    ratio 8 users / one adapter: {batch['eight_users_over_one_adapter']:.2f}x (target <= 1.5); one adapter / base: {batch['one_adapter_over_base']:.2f}x",
        "    spread (s): "
        + ", ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in batch["spread_s"].items())
        + f" over {batch['repeats']} interleaved repeats",
        "(b) activate a new user's adapter with N slots full: "
        + ", ".join(f"N={n}: {v['median_ms']:.1f} ms" for n, v in act["by_resident"].items())
        + f"; last/first {act['last_over_first']:.2f}x (flat = 1)",
        f"(c) enrol 16 comparisons: store only {enroll['store_only_s']:.2f} s, with rank-8 adapter ({enroll['epochs']} epochs) "
        f"{enroll['with_adapter_s']:.1f} s ({enroll['ratio']:.0f}x)",
        f"(d) bytes per user: LoRA rank 8 {size['lora_rank8'] / 1e6:.2f} MB vs profile {size['profile'] / 1e3:.1f} kB ({size['ratio']:.0f}x)",
    ]
    return "\n".join(lines)
