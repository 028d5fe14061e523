"""``personalign bench memory``: MemoryStore ``add``/``search`` latency next to one encoder call.

Setup: a fresh embedded store with ``users`` users. The target user (``user-0000``) gets
``memories`` memories; each of the other users gets ``background_per_user`` (100 by default:
at 100 users that is 9,900 more records in 99 more collections, about as many as the target's
own 10,000, which keeps the build at about twice the target's size). Every text is a distinct
synthetic fact drawn from templates with a seeded RNG. The build goes through
``MemoryStore.add`` in batches of ``batch_size`` and is timed on its own.

Measured, on texts and queries never seen before (evicted from the encoder cache first, so
every call runs the model): ``search`` (top 5) and single-item ``add`` for the target user, the
two taking turns (round i runs search i and add i, which one first alternating), so load from
other jobs falls on both alike. Timing starts at exactly ``memories`` records; the adds grow the
count by ``adds`` (search i sees i more). The baseline is one uncached encoder call,
``encoder.encode_uncached([text])``, on the same text, timed right beside each operation (the two
alternate which runs first). The figure is the
ratio: ``add_p50 / encode_p50`` and ``search_p50 / encode_p50`` (and the p95 ones), i.e. what
the store costs on top of embedding the text; a ratio near 1 means the database is free. The
median of the per-pair ratios is reported too: it is steadier when other load comes and goes.
"""

from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from personalign.bench.serve import percentile
from personalign.errors import ValidationError

TARGET = "user-0000"
TOP_K = 5
WARMUP = 5
# Small enough for a test (a few seconds on a laptop CPU); the CLI defaults are the full size.
QUICK_CONFIG: dict[str, int] = {
    "users": 5,
    "memories": 200,
    "background_per_user": 20,
    "queries": 20,
    "adds": 20,
}

_WORDS = {
    "name": "Ana Ben Chloe Dev Elif Farid Greta Hugo Ines Jonas Kemal Lena Malik Nora Omar Priya Quinn Rosa Sami Tara Uma Viktor Wen Yusuf Zoe".split(),
    "city": "Lisbon Oslo Porto Lyon Leeds Kyoto Austin Quito Lagos Perth Bergen Turin Ghent Krakow Dublin Seville Utrecht Tartu Hanoi Denver".split(),
    "food": "mushrooms peanuts shellfish lentils aubergine coriander olives tofu salmon chickpeas spinach kimchi halloumi quinoa beetroot".split(),
    "drink": [
        "green tea",
        "black coffee",
        "oat lattes",
        "mint tea",
        "hot chocolate",
        "espresso",
        "kombucha",
        "rooibos",
    ],
    "sport": "running swimming cycling climbing rowing tennis yoga boxing hiking skating".split(),
    "job": "nurse teacher plumber architect pharmacist baker translator electrician librarian paramedic accountant gardener".split(),
    "relation": "sister brother mother father partner cousin neighbour daughter son grandmother uncle flatmate".split(),
    "pet": "cat dog rabbit parrot tortoise hamster goldfish ferret".split(),
    "colour": "red blue green grey black white ginger spotted".split(),
    "instrument": "piano violin cello guitar drums flute trumpet ukulele".split(),
    "lang": "Spanish Japanese Polish Arabic Dutch Korean Greek Swahili Turkish Finnish".split(),
    "day": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "month": "January February March April May June July August September October November December".split(),
}
FACT_TEMPLATES = (
    "My {relation} {name} lives in {city}.",
    "I am allergic to {food} and I avoid it when eating out in {city}.",
    "I go {sport} every {day} with my {relation}.",
    "I have a {colour} {pet} called {name}.",
    "I work as a {job} in {city}.",
    "I have been learning {lang} for {n} months.",
    "I drink {drink} every morning before I start work as a {job}.",
    "My favourite meal is {food} with {food2}.",
    "I play the {instrument} in a band on {day} evenings.",
    "I moved to {city} {n} years ago with my {pet}.",
    "My {relation}'s birthday is on {month} {n}.",
    "I stopped eating {food} after a trip to {city}.",
    "I want to run a race in {city} next {month}.",
    "{name} taught me the {instrument} when I was {n}.",
    "I speak {lang} with my {relation} {name}.",
)
QUERY_TEMPLATES = (
    "What should I cook for {name} on {day}?",
    "Where does my {relation} live, and is it near {city}?",
    "Which sport could I do with {name} on {day}?",
    "Can you suggest a {lang} course that fits a {job}?",
    "What gift should I buy my {relation} in {month}?",
    "Is {food} a good idea for dinner in {city}?",
    "How can I practise the {instrument} for {n} minutes a day?",
    "What drink goes with {food} on a cold {day}?",
)


def _fill(rng: random.Random, template: str) -> str:
    words = {key: rng.choice(values) for key, values in _WORDS.items()}
    food2 = rng.choice([f for f in _WORDS["food"] if f != words["food"]])
    return template.format(**words, food2=food2, n=rng.randint(2, 28))


def synthetic_texts(rng: random.Random, count: int, templates: Sequence[str], seen: set[str]) -> list[str]:
    """``count`` texts from ``templates``, none in ``seen`` and none repeated (``seen`` grows)."""
    out: list[str] = []
    while len(out) < count:
        for _ in range(50):
            text = _fill(rng, rng.choice(templates))
            if text not in seen:
                break
        else:  # the template space is nearly used up: make it unique by hand
            text = f"{text} (note {len(seen)})"
        seen.add(text)
        out.append(text)
    return out


def _stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean/min/max of ``seconds``, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "mean": sum(ms) / len(ms) if ms else math.nan,
        "min": min(ms, default=math.nan),
        "max": max(ms, default=math.nan),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def _pair(encoder: Any, text: str, op: Callable[[str], Any], op_first: bool) -> tuple[float, float, Any]:
    """Seconds of ``op(text)`` and of ``encoder.encode_uncached([text])`` back to back, and op's output."""
    encoder.evict([text])  # the op's own encode must run the model too
    if op_first:
        spent, out = _timed(op, text)
        encoded = _timed(encoder.encode_uncached, [text])[0]
    else:
        encoded = _timed(encoder.encode_uncached, [text])[0]
        spent, out = _timed(op, text)
    return spent, encoded, out


def _interleaved(
    encoder: Any, cases: Sequence[tuple[Sequence[str], Callable[[str], Any]]]
) -> list[tuple[list[float], list[float], list[Any]]]:
    """Per case ``(texts, op)``: op seconds, encoder seconds and op outputs, one pair per text.

    The cases take turns: round i times text i of every case, which case first rotating each
    round, and op and encoder alternate which runs first.
    """
    timings: list[tuple[list[float], list[float], list[Any]]] = [([], [], []) for _ in cases]
    for i in range(max(len(texts) for texts, _ in cases)):
        for k in range(len(cases)):
            case = (i + k) % len(cases)
            texts, op = cases[case]
            if i < len(texts):
                spent, encoded, out = _pair(encoder, texts[i], op, op_first=i % 2 == 0)
                for column, value in zip(timings[case], (spent, encoded, out), strict=True):
                    column.append(value)
    return timings


def _check_config(
    users: int, memories: int, background_per_user: int, queries: int, adds: int, batch_size: int
) -> None:
    for field, value, low in (
        ("users", users, 1),
        ("memories", memories, 1),
        ("background_per_user", background_per_user, 0),
        ("queries", queries, 1),
        ("adds", adds, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValidationError(
                field, f"must be an integer >= {low}", f"pass e.g. {field}={max(low, 1)}", value
            )


def _build(
    store: Any, plan: Sequence[tuple[str, list[str]]], batch_size: int, progress: bool
) -> dict[str, Any]:
    """Add every user's texts in batches; returns seconds per user group and the ids written."""
    total = sum(len(texts) for _, texts in plan)
    done, ids, seconds = 0, {}, {}
    started = time.perf_counter()
    next_report = 0.1
    for user, texts in plan:
        user_started = time.perf_counter()
        ids[user] = []
        for start in range(0, len(texts), batch_size):
            added = store.add(user, texts[start : start + batch_size])
            ids[user].extend(r["id"] for r in added["results"])
            done += len(added["results"])
            if progress and done / total >= next_report:
                spent = time.perf_counter() - started
                print(
                    f"built {done:,}/{total:,} memories ({spent:.1f} s, {done / spent:.0f}/s)",
                    file=sys.stderr,
                    flush=True,
                )
                next_report = math.floor(done / total * 10) / 10 + 0.1
        seconds[user] = time.perf_counter() - user_started
    return {"ids": ids, "seconds": seconds, "total_seconds": time.perf_counter() - started}


def _machine(encoder: Any) -> dict[str, Any]:
    import chromadb
    import torch

    import personalign

    device = getattr(encoder.model, "device", None)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "chromadb": chromadb.__version__,
        "personalign": personalign.__version__,
        "encoder": encoder.name,
        "encoder_device": str(device) if device is not None else "unknown",
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def run_memory_bench(
    store_dir: str | Path,
    users: int = 100,
    memories: int = 10_000,
    background_per_user: int = 100,
    queries: int = 200,
    adds: int = 200,
    batch_size: int = 256,
    encoder: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the store in ``store_dir`` (new or empty), then time search and add beside the encoder.

    Returns a JSON-serialisable dict: ``config``, ``build``, ``counts``, ``latency_ms`` (``add``,
    ``search``, and their baselines ``encode_add``/``encode_search``, each with n/p50/p95/mean/
    min/max), ``ratios`` (``add_p50`` = add p50 / encode p50 on the same texts, and so on),
    ``checks`` (search results that were not the target's: must be 0) and ``machine``.
    """
    from personalign.memory.chroma import MemoryStore
    from personalign.models import load_encoder

    _check_config(users, memories, background_per_user, queries, adds, batch_size)
    root = Path(store_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValidationError(
            "store_dir",
            "must be a new or empty directory",
            "pass a fresh path; the bench builds its own store",
            str(root),
        )
    encoder = encoder if encoder is not None else load_encoder()
    load_before = _load_average()

    rng = random.Random(seed)
    seen: set[str] = set()
    background = [f"user-{i:04d}" for i in range(1, users)]
    plan = [(TARGET, synthetic_texts(rng, memories, FACT_TEMPLATES, seen))]
    plan += [
        (user, synthetic_texts(rng, background_per_user, FACT_TEMPLATES, seen))
        for user in background
        if background_per_user
    ]
    warmup = min(WARMUP, max(1, queries // 4))
    query_texts = synthetic_texts(rng, warmup + queries, QUERY_TEMPLATES, seen)
    add_texts = synthetic_texts(rng, warmup + adds, FACT_TEMPLATES, seen)

    store = MemoryStore(encoder, path=root)
    batch_size = min(batch_size, store.client.get_max_batch_size())
    built = _build(store, plan, batch_size, progress)
    target_ids = set(built["ids"][TARGET])
    target_count = store.count(TARGET)

    # Warm-up (not timed): the model, the target's index, and the write path (on another user
    # when there is one; the warm-up records are deleted again so every count stays exact).
    for text in query_texts[:warmup]:
        encoder.encode_uncached([text])
        store.search(TARGET, text, top_k=TOP_K)
    warm_user = background[0] if background else TARGET
    for text in add_texts[:warmup]:
        store.delete(warm_user, store.add(warm_user, text)["results"][0]["id"])

    if progress:
        print(f"timing {queries} searches and {adds} adds for {TARGET}", file=sys.stderr, flush=True)
    (search_s, encode_search_s, found), (add_s, encode_add_s, added) = _interleaved(
        encoder,
        [
            (query_texts[warmup:], lambda q: store.search(TARGET, q, top_k=TOP_K)),
            (add_texts[warmup:], lambda t: store.add(TARGET, t)),
        ],
    )
    target_ids |= {r["id"] for out in added for r in out["results"]}  # a search may find a new one
    results = [r for out in found for r in out["results"]]
    foreign = sum(1 for r in results if r["id"] not in target_ids or r["user_id"] != TARGET)

    latency = {
        "add": _stats(add_s),
        "encode_add": _stats(encode_add_s),
        "search": _stats(search_s),
        "encode_search": _stats(encode_search_s),
    }
    built_total = sum(len(texts) for _, texts in plan)
    return {
        "config": {
            "users": users,
            "memories": memories,
            "background_per_user": background_per_user,
            "queries": queries,
            "adds": adds,
            "batch_size": batch_size,
            "top_k": TOP_K,
            "warmup": warmup,
            "seed": seed,
            "target_user": TARGET,
        },
        "build": {
            "memories": built_total,
            "seconds": built["total_seconds"],
            "per_second": _ratio(built_total, built["total_seconds"]),
            "target_seconds": built["seconds"][TARGET],
            "background_seconds": built["total_seconds"] - built["seconds"][TARGET],
        },
        "counts": {
            "target_at_search": target_count,
            "target_after_adds": store.count(TARGET),
            "background_total": sum(store.count(user) for user in background),
        },
        "latency_ms": latency,
        "ratios": {
            "add_p50": _ratio(latency["add"]["p50"], latency["encode_add"]["p50"]),
            "add_p95": _ratio(latency["add"]["p95"], latency["encode_add"]["p95"]),
            "search_p50": _ratio(latency["search"]["p50"], latency["encode_search"]["p50"]),
            "search_p95": _ratio(latency["search"]["p95"], latency["encode_search"]["p95"]),
            # Median of op/encode over back-to-back pairs: steadier when other load comes and goes.
            "add_paired_p50": percentile(
                [_ratio(a, e) for a, e in zip(add_s, encode_add_s, strict=True)], 50
            ),
            "search_paired_p50": percentile(
                [_ratio(q, e) for q, e in zip(search_s, encode_search_s, strict=True)], 50
            ),
        },
        "checks": {
            "search_results": len(results),
            "foreign_results": foreign,
            "empty_searches": sum(not out["results"] for out in found),
        },
        "machine": {
            **_machine(encoder),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
    }


def format_report(result: dict[str, Any]) -> str:
    """A small aligned table: p50/p95 per operation and each one's ratio to its encoder baseline."""
    config, latency, ratios = result["config"], result["latency_ms"], result["ratios"]
    rows = (
        ("encode (facts)", latency["encode_add"], 1.0, 1.0),
        ("add", latency["add"], ratios["add_p50"], ratios["add_p95"]),
        ("encode (queries)", latency["encode_search"], 1.0, 1.0),
        (f"search (top {config['top_k']})", latency["search"], ratios["search_p50"], ratios["search_p95"]),
    )
    lines = [
        f"memory bench: {config['target_user']} with {result['counts']['target_at_search']:,} memories among "
        f"{config['users']} users ({config['users'] - 1} x {config['background_per_user']} background)",
        f"{'operation':<18}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p50/encode':>12}{'p95/encode':>12}",
    ]
    for name, stats, r50, r95 in rows:
        lines.append(
            f"{name:<18}{stats['n']:>6}{stats['p50']:>10.2f}{stats['p95']:>10.2f}{r50:>11.2f}x{r95:>11.2f}x"
        )
    for op in ("add", "search"):
        lines.append(
            f"{op} / encode: p50 {ratios[op + '_p50']:.2f}x, p95 {ratios[op + '_p95']:.2f}x "
            f"(median of paired ratios {ratios[op + '_paired_p50']:.2f}x)"
        )
    build, checks, machine = result["build"], result["checks"], result["machine"]
    lines.append(
        f"build: {build['memories']:,} memories in {build['seconds']:.1f} s ({build['per_second']:.0f}/s; "
        f"target's {config['memories']:,} in {build['target_seconds']:.1f} s)"
    )
    lines.append(
        f"searches: {checks['search_results']:,} results, {checks['foreign_results']} from other users"
    )
    load = (
        ""
        if machine["load_average_before"] is None
        else f", load {machine['load_average_before']:.1f} -> {machine['load_average_after']:.1f}"
    )
    lines.append(
        f"({machine['encoder']} on {machine['encoder_device']}, torch {machine['torch']} with {machine['torch_threads']} threads, "
        f"{machine['cpus']} CPUs, chromadb {machine['chromadb']}, {machine['platform']}{load})"
    )
    return "\n".join(lines)
