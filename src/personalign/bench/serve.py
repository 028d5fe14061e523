"""``personalign bench serve``: the HTTP server under load, batched vs one request per ``generate``.

Two servers run on loopback in turn over the same model and the same seeded users: one with
batching (``--max-batch N``) and the baseline with ``--max-batch 1``. At each concurrency
level, C client threads send the same sequence of personalised chat requests (greedy, fixed
``max_tokens``) until ``requests_per_client * C`` are done or ``max_seconds`` pass. Reported per
level: throughput (requests/s and generated tokens/s), p50/p95 latency, errors, and the mean
batch size the server formed. Ratios: batched over baseline throughput at each level, and
batched throughput at the highest level over one client.

Several workers: ``workers``, ``profiles_url`` and ``chroma_url`` are passed to the batched server
only (``personalign serve --workers N --profiles-url ... --chroma-url ...``); the one-at-a-time
baseline stays one process on its own embedded store (JSON profiles, embedded Chroma), so
``batching_speedup`` then compares N batching workers on shared state with that one process. The
server's ``/v1/server/stats`` counts one worker's batches, so the mean batch size of a server with
several workers is not reported (NaN); each level reports instead how many answers each worker
gave (``answers_per_worker``, from the ``x-personalign-worker`` header).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from personalign.errors import ValidationError
from personalign.server.run import WORKER_HEADER, check_workers

USERS = {
    "sam": {
        "comparisons": [
            {
                "prompt": "How do I boil an egg?",
                "chosen": "Nine minutes in boiling water.",
                "rejected": "Eggs are a long story of heat, water and patience.",
            },
            {
                "prompt": "Why is the sky blue?",
                "chosen": "Air scatters blue light most.",
                "rejected": "It is a long and detailed tale of physics and light.",
            },
        ],
        "memories": ["I am vegetarian and I cook for two.", "I live in a small flat."],
    },
    "robin": {
        "comparisons": [
            {
                "prompt": "How do I boil an egg?",
                "chosen": "Bring water to a boil, lower the egg gently, wait nine minutes, then cool it in cold water.",
                "rejected": "Boil it.",
            },
            {
                "prompt": "What should I read?",
                "chosen": "Start with a long classic novel and take notes chapter by chapter.",
                "rejected": "A book.",
            },
        ],
        "memories": ["I am training for my first marathon.", "I drink a lot of coffee."],
    },
    "kim": {
        "comparisons": [
            {
                "prompt": "Plan my week.",
                "chosen": "Monday: rest. Tuesday: work.",
                "rejected": "Weeks are long and need a lot of careful planning.",
            }
        ],
        "memories": ["I work night shifts."],
    },
    "lee": {
        "comparisons": [
            {
                "prompt": "Give me a tip.",
                "chosen": "Drink water.",
                "rejected": "Here is a long list of many tips for many situations.",
            }
        ],
        "memories": ["I am learning the piano."],
    },
}
PROMPTS = [
    "Plan my dinner for tonight.",
    "How do I make my coffee taste better?",
    "What is a good way to relax after work?",
    "Suggest a weekend plan.",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


MIXED_USERS = 20
# The mixed workload repeats this cycle: 6 chats, 1 memory write, 1 enrollment of one comparison.
MIXED_CYCLE = ("chat", "chat", "memory", "chat", "chat", "chat", "enroll", "chat")


def bench_users(mixed: bool) -> dict[str, dict[str, Any]]:
    """The 4 hand-written users, plus generated ones up to 20 for the mixed workload."""
    users = dict(USERS)
    if mixed:
        for i in range(len(users), MIXED_USERS):
            wants_short = i % 2 == 0
            short, long = (
                "Keep it brief.",
                "Here is a long and careful answer that covers every detail you might need.",
            )
            comparison = {
                "prompt": f"Advice number {i}?",
                "chosen": short if wants_short else long,
                "rejected": long if wants_short else short,
            }
            users[f"user-{i:02d}"] = {"comparisons": [comparison], "memories": [f"My lucky number is {i}."]}
    return users


def _request(index: int, max_tokens: int, users: Sequence[str] | None = None) -> dict[str, Any]:
    users = list(users or USERS)
    return {
        "model": "personalign",
        "user": users[index % len(users)],
        "messages": [{"role": "user", "content": PROMPTS[(index // len(users)) % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def seed_users(
    url: str, headers: dict[str, str] | None = None, users: Mapping[str, Any] | None = None
) -> None:
    import httpx

    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for user, data in (users or USERS).items():
            client.delete(
                f"/v1/users/{user}"
            )  # start clean: a server over a reused store may know them (404 otherwise)
            client.post(
                f"/v1/users/{user}/comparisons", json={"comparisons": data["comparisons"]}
            ).raise_for_status()
            client.post(f"/v1/users/{user}/memories", json={"text": data["memories"]}).raise_for_status()


def _operation(
    client: Any, index: int, max_tokens: int, users: Sequence[str] | None, mixed: bool
) -> tuple[Any, int, str, str | None, str | None]:
    """Send operation ``index`` of the workload; returns (response, generated tokens, kind, write key, written marker)."""
    kind = MIXED_CYCLE[index % len(MIXED_CYCLE)] if mixed else "chat"
    if kind == "chat":
        response = client.post("/v1/chat/completions", json=_request(index, max_tokens, users))
        return (
            response,
            response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0,
            kind,
            None,
            None,
        )
    users = list(users or USERS)
    user = users[(index // len(MIXED_CYCLE)) % len(users)]
    marker = f"bench write {uuid.uuid4().hex[:12]} of {user}"
    if kind == "memory":
        response = client.post(f"/v1/users/{user}/memories", json={"text": marker})
    else:
        response = client.post(
            f"/v1/users/{user}/comparisons",
            json={"comparisons": [{"prompt": marker, "chosen": "Yes.", "rejected": "No, never."}]},
        )
    return response, 0, kind, f"{kind}:{user}", marker


def verify_writes(url: str, users: Mapping[str, Any], acked: Mapping[str, list[str]]) -> dict[str, int]:
    """Read every user back: each acknowledged write exactly once, nothing else beyond the seed data."""
    import httpx

    lost = duplicated = unexpected = checked = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for user, data in users.items():
            prompts = [c["prompt"] for c in client.get(f"/v1/users/{user}").json()["comparisons"]]
            memories = [m["memory"] for m in client.get(f"/v1/users/{user}/memories").json()["results"]]
            for stored, seeded, key in (
                (prompts, [c["prompt"] for c in data["comparisons"]], f"enroll:{user}"),
                (memories, data["memories"], f"memory:{user}"),
            ):
                expected, found = Counter([*seeded, *acked.get(key, [])]), Counter(stored)
                checked += sum(expected.values())
                lost += sum((expected - found).values())
                duplicated += sum(
                    min(found[x] - expected[x], found[x] - 1)
                    for x in found
                    if x in expected and found[x] > expected[x]
                )
                unexpected += sum(n for x, n in found.items() if x not in expected)
    return {"checked": checked, "lost": lost, "duplicated": duplicated, "unexpected": unexpected}


def run_level(
    url: str,
    clients: int,
    total: int,
    max_seconds: float,
    max_tokens: int,
    users: Sequence[str] | None = None,
    acked: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """``clients`` threads share ``total`` operations (fewer if ``max_seconds`` runs out): chats,
    or with ``acked`` the mixed cycle of chats, memory writes and enrollments (acknowledged
    writes are recorded in ``acked``)."""
    import httpx

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    kinds: dict[str, int] = {}
    by_worker: Counter[str] = Counter()  # answers per worker process (several-worker servers only)
    lock = threading.Lock()
    next_index = [0]
    deadline = time.monotonic() + max_seconds

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=max(max_seconds, 10.0) + 60) as client:
            while time.monotonic() < deadline:
                with lock:
                    if next_index[0] >= total:
                        return
                    index = next_index[0]
                    next_index[0] += 1
                started = time.perf_counter()
                try:
                    response, generated, kind, key, marker = _operation(
                        client, index, max_tokens, users, acked is not None
                    )
                    ok = response.status_code == 200
                    detail = "" if ok else f"{response.status_code} {response.text[:200]}"
                    worker = response.headers.get(WORKER_HEADER)
                except httpx.HTTPError as err:
                    ok, detail, generated, kind, key, marker, worker = (
                        False,
                        f"{type(err).__name__}: {err}",
                        0,
                        "error",
                        None,
                        None,
                        None,
                    )
                elapsed = time.perf_counter() - started
                with lock:
                    if worker is not None:
                        by_worker[worker] += 1
                    if ok:
                        latencies.append(elapsed)
                        tokens.append(generated)
                        kinds[kind] = kinds.get(kind, 0) + 1
                        if key is not None and acked is not None:
                            acked.setdefault(key, []).append(marker)
                    else:
                        errors.append(detail)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": wall,
        "requests_per_s": len(latencies) / wall if wall > 0 else 0.0,
        "tokens_per_s": sum(tokens) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "operations": kinds,
        "answers_per_worker": sorted(by_worker.values(), reverse=True),
    }


def _stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/v1/server/stats", timeout=30).json()


@contextmanager
def subprocess_server(
    store: Path,
    max_batch: int,
    model: str | None,
    encoder: str | None,
    device: str | None,
    start_timeout: float = 600,
    extra: Sequence[str] = (),
    jobs: bool = False,
) -> Iterator[str]:
    """``personalign serve`` in a child process on a free loopback port; yields its URL."""
    import httpx

    from personalign.server.run import bound_socket

    with bound_socket() as probe:
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "personalign.cli", "serve", "--store", str(store), "--port", str(port)]
    command += [
        "--max-batch",
        str(max_batch),
        "--log-level",
        "warning",
        "--jobs" if jobs else "--no-jobs",
        *extra,
    ]
    for flag, value in (("--model", model), ("--encoder", encoder), ("--device", device)):
        if value is not None:
            command += [flag, value]
    process = subprocess.Popen(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it answered")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {start_timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def thread_server(personalizer: Any, max_batch: int) -> Iterator[str]:
    """The app in a background thread of this process (for tests: shares the GIL with the clients)."""
    from personalign.server.app import create_app
    from personalign.server.config import ServerConfig
    from personalign.server.run import ServerThread

    with ServerThread(create_app(personalizer, ServerConfig(max_batch=max_batch))) as server:
        yield server.url


def worker_options(
    workers: int = 1, profiles_url: str | None = None, chroma_url: str | None = None
) -> list[str]:
    """The ``personalign serve`` options that run a server as ``workers`` processes on shared state."""
    options = ["--workers", str(workers)] if workers != 1 else []
    options += ["--profiles-url", profiles_url] if profiles_url is not None else []
    options += ["--chroma-url", chroma_url] if chroma_url is not None else []
    return options


def server_plan(
    max_batch: int, workers: int = 1, profiles_url: str | None = None, chroma_url: str | None = None
) -> list[tuple[str, int, int, list[str]]]:
    """``(label, --max-batch, workers, extra serve options)`` of the servers measured in turn: the
    batched one with the worker options, then the one-at-a-time baseline, one process on its own
    embedded store whatever the worker options."""
    check_workers(workers, chroma_url, profiles_url)
    return [
        ("batched", max_batch, workers, worker_options(workers, profiles_url, chroma_url)),
        ("one_at_a_time", 1, 1, []),
    ]


def run_serve_bench(
    levels: Sequence[int] = (1, 4, 16),
    requests_per_client: int = 4,
    max_seconds: float = 60.0,
    max_tokens: int = 32,
    max_batch: int = 16,
    model: str | None = None,
    encoder: str | None = None,
    device: str | None = None,
    personalizer: Any = None,
    mixed: bool = False,
    workers: int = 1,
    profiles_url: str | None = None,
    chroma_url: str | None = None,
) -> dict[str, Any]:
    """Measure both servers at every level. With ``personalizer`` the servers run in this process
    (threads) over it and its store; otherwise each is a ``personalign serve`` subprocess.

    ``mixed``: 20 users, and each client's operations cycle through chats, memory writes and
    enrollments (:data:`MIXED_CYCLE`); every server is read back at the end and every
    acknowledged write must be there exactly once (``writes`` in the result).

    ``workers``, ``profiles_url``, ``chroma_url``: the batched server's (see the module docstring);
    several workers need both URLs (``ValidationError`` naming ``--workers`` otherwise)."""
    plan = server_plan(max_batch, workers, profiles_url, chroma_url)
    if personalizer is not None and plan[0][3]:
        raise ValidationError(
            "personalizer",
            "serves in this process, so it takes no worker options",
            "drop personalizer (servers then run as subprocesses) or workers/profiles_url/chroma_url",
        )
    root = Path(tempfile.mkdtemp(prefix="personalign-bench-serve-"))
    servers: dict[str, Any] = {}
    try:
        for label, batch, processes, extra in plan:
            if personalizer is not None:
                context = thread_server(personalizer, batch)
            else:
                context = subprocess_server(root / label, batch, model, encoder, device, extra=extra)
            users = bench_users(mixed)
            acked: dict[str, list[str]] | None = {} if mixed else None
            with context as url:
                seed_users(url, users=users)
                run_level(url, 1, 2, max_seconds, max_tokens, list(users))  # warm-up (chats), not reported
                measured = []
                for clients in levels:
                    before = _stats(url)
                    level = run_level(
                        url,
                        clients,
                        max(8, requests_per_client * clients),
                        max_seconds,
                        max_tokens,
                        list(users),
                        acked,
                    )
                    after = _stats(url)
                    batches = after["batches"] - before["batches"]
                    level["mean_batch_size"] = (
                        (after["requests"] - before["requests"]) / batches if batches else 0.0
                    )
                    if processes > 1:  # the stats came from whichever worker answered, not the server
                        level["mean_batch_size"] = math.nan
                    measured.append(level)
                writes = verify_writes(url, users, acked) if acked is not None else None
            servers[label] = {"max_batch": batch, "workers": processes, "levels": measured, "writes": writes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    batched = {lv["clients"]: lv for lv in servers["batched"]["levels"]}
    baseline = {lv["clients"]: lv for lv in servers["one_at_a_time"]["levels"]}
    speedup = {str(c): _ratio(batched[c]["requests_per_s"], baseline[c]["requests_per_s"]) for c in levels}
    low, high = min(levels), max(levels)
    return {
        "config": {
            "levels": list(levels),
            "requests_per_client": requests_per_client,
            "max_seconds": max_seconds,
            "max_tokens": max_tokens,
            "max_batch": max_batch,
            "model": model
            or ("in-process" if personalizer is not None else "embedded SmolLM2-135M-Instruct"),
            "device": device or "auto",
            "cpus": os.cpu_count(),
            "workload": "mixed: 20 users, cycle " + "/".join(MIXED_CYCLE) if mixed else "chats: 4 users",
            "workers": workers,
            # the batched server's serve options (password masked); the baseline never has any
            "batched_options": worker_options(
                workers, _shown(profiles_url) if profiles_url is not None else None, chroma_url
            ),
        },
        "servers": servers,
        "batching_speedup": speedup,
        "scaling": {
            "batched": _ratio(batched[high]["requests_per_s"], batched[low]["requests_per_s"]),
            "one_at_a_time": _ratio(baseline[high]["requests_per_s"], baseline[low]["requests_per_s"]),
            "from_clients": low,
            "to_clients": high,
        },
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _shown(url: str) -> str:
    from personalign.memory.sql_profiles import shown

    return shown(url)


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"{'server':<19}{'clients':>5}{'requests':>10}{'errors':>8}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'batch':>7}"
    ]
    for label, server in result["servers"].items():
        processes = server.get("workers", 1)
        name = f"{label.replace('_', '-')} ({server['max_batch']})" + (
            f" x{processes}" if processes > 1 else ""
        )
        for lv in server["levels"]:
            batch = "-" if math.isnan(lv["mean_batch_size"]) else f"{lv['mean_batch_size']:.1f}"
            lines.append(
                f"{name:<19}{lv['clients']:>5}{lv['requests']:>10}{lv['errors']:>8}{lv['requests_per_s']:>9.2f}"
                f"{lv['tokens_per_s']:>9.1f}{lv['p50_ms']:>9.0f}{lv['p95_ms']:>9.0f}{batch:>7}"
            )
    speedups = ", ".join(f"{c} clients {v:.2f}x" for c, v in result["batching_speedup"].items())
    scaling = result["scaling"]
    lines.append(f"batching speed-up over one-at-a-time (throughput): {speedups}")
    lines.append(
        f"throughput at {scaling['to_clients']} clients over {scaling['from_clients']}: "
        f"batched {scaling['batched']:.2f}x, one-at-a-time {scaling['one_at_a_time']:.2f}x"
    )
    for label, server in result["servers"].items():
        if server.get("writes"):
            w = server["writes"]
            lines.append(
                f"writes read back from {label.replace('_', '-')}: {w['checked']} expected, {w['lost']} lost, {w['duplicated']} duplicated, {w['unexpected']} unexpected"
            )
    for label, server in result["servers"].items():
        if server.get("workers", 1) > 1:
            spread = "; ".join(
                f"{lv['clients']} clients {'/'.join(map(str, lv.get('answers_per_worker', [])))}"
                for lv in server["levels"]
            )
            lines.append(
                f"answers per worker of {label.replace('_', '-')} (x{server['workers']}, busiest first): {spread}"
                " (the batch column needs one process: each worker keeps its own stats)"
            )
    config = result["config"]
    if config.get("batched_options"):
        lines.append(
            f"(batched server: serve {' '.join(config['batched_options'])}; "
            "one-at-a-time: one process on an embedded store)"
        )
    lines.append(
        f"(workload {config['workload']}; model {config['model']}, device {config['device']}, max_tokens {config['max_tokens']}, {config['cpus']} CPUs)"
    )
    return "\n".join(lines)
