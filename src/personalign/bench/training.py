"""``personalign bench serve --training``: chat latency while a user's adapter trains in the worker.

One ``personalign serve`` (jobs on: its ``personalign worker`` child trains adapters) with the
seeded users of ``bench serve``. Chats from ``clients`` threads for the other users are timed in
three phases: idle before, while one user's adapter trains (only chats that start and end while
the job is ``running`` count), and idle after. Reported: p50 of each phase and the ratio of the
training phase to the idle phases together; then the trained user's first chat after the job
(whether the profile notes the adapter and whether the answer changed from before training).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from personalign.bench.engines import cpu_model
from personalign.bench.serve import USERS, _request, percentile, seed_users, subprocess_server

TRAINEE = "robin"


def _chats(
    url: str, users: list[str], clients: int, stop: threading.Event, max_tokens: int
) -> list[tuple[float, float]]:
    """(start, end) of every chat sent by ``clients`` threads until ``stop`` is set."""
    import httpx

    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def loop(offset: int) -> None:
        index = offset
        with httpx.Client(base_url=url, timeout=600) as client:
            while not stop.is_set():
                started = time.monotonic()
                reply = client.post("/v1/chat/completions", json=_request(index, max_tokens, users))
                ended = time.monotonic()
                if reply.status_code == 200:
                    with lock:
                        spans.append((started, ended))
                index += clients

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return spans


def _phase(url: str, users: list[str], clients: int, seconds: float, max_tokens: int) -> list[float]:
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    spans = _chats(url, users, clients, stop, max_tokens)
    return [end - start for start, end in spans]


def run_training_bench(
    clients: int = 2, idle_seconds: float = 30.0, max_tokens: int = 16, epochs: int = 8, threads: int = 1
) -> dict[str, Any]:
    import httpx

    root = Path(tempfile.mkdtemp(prefix="personalign-bench-training-"))
    others = [u for u in USERS if u != TRAINEE]
    ask = {"model": "personalign", "user": TRAINEE, "max_tokens": 32, "temperature": 0}
    ask["messages"] = [{"role": "user", "content": "How do I boil an egg?"}]
    try:
        with subprocess_server(root / "store", 8, None, None, "cpu", jobs=True) as url:
            seed_users(url)
            http = httpx.Client(base_url=url, timeout=600)
            before_text = http.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"][
                "content"
            ]
            _phase(url, others, clients, 5.0, max_tokens)  # warm-up
            idle_before = _phase(url, others, clients, idle_seconds, max_tokens)
            job = http.post(f"/v1/users/{TRAINEE}/adapter", json={"config": {"epochs": epochs}}).json()
            stop = threading.Event()
            window: dict[str, float] = {}

            def watch() -> None:
                while True:
                    record = http.get(f"/v1/jobs/{job['id']}").json()
                    if record["status"] == "running" and "start" not in window:
                        window["start"] = time.monotonic()
                    if record["status"] in ("succeeded", "failed"):
                        window["end"] = time.monotonic()
                        window["status"] = record["status"]  # type: ignore[assignment]
                        stop.set()
                        return
                    time.sleep(0.2)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            spans = _chats(url, others, clients, stop, max_tokens)
            watcher.join()
            start = window.get("start", window["end"])
            during = [e - s for s, e in spans if s >= start and e <= window["end"]]
            idle_after = _phase(url, others, clients, idle_seconds, max_tokens)
            after_text = http.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"][
                "content"
            ]
            adapter_note = http.get(f"/v1/users/{TRAINEE}").json()["settings"].get("adapter")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    idle = idle_before + idle_after
    p50 = {
        name: percentile(v, 50) * 1000
        for name, v in (
            ("idle_before", idle_before),
            ("training", during),
            ("idle_after", idle_after),
            ("idle", idle),
        )
    }
    return {
        "config": {
            "clients": clients,
            "max_tokens": max_tokens,
            "epochs": epochs,
            "worker_threads": threads,
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
        },
        "job": {"status": window.get("status"), "training_seconds": window["end"] - start},
        "chats": {"idle_before": len(idle_before), "training": len(during), "idle_after": len(idle_after)},
        "p50_ms": p50,
        "p95_ms": {"idle": percentile(idle, 95) * 1000, "training": percentile(during, 95) * 1000},
        "mean_ms": {"idle": statistics.fmean(idle) * 1000 if idle else float("nan")},
        "training_over_idle_p50": p50["training"] / p50["idle"] if p50["idle"] else float("nan"),
        "trained_user": {
            "adapter_noted": adapter_note is not None,
            "answer_changed": before_text != after_text,
        },
    }


def format_training_report(result: dict[str, Any]) -> str:
    p50, chats = result["p50_ms"], result["chats"]
    user = result["trained_user"]
    return "\n".join(
        [
            f"{'phase':<14}{'chats':>7}{'p50 ms':>9}",
            f"{'idle before':<14}{chats['idle_before']:>7}{p50['idle_before']:>9.0f}",
            f"{'training':<14}{chats['training']:>7}{p50['training']:>9.0f}",
            f"{'idle after':<14}{chats['idle_after']:>7}{p50['idle_after']:>9.0f}",
            f"training / idle p50: {result['training_over_idle_p50']:.2f}x "
            f"(job {result['job']['status']} in {result['job']['training_seconds']:.0f} s)",
            f"trained user's first chat after the job: adapter noted {user['adapter_noted']}, answer changed {user['answer_changed']}",
            f"(clients {result['config']['clients']}, max_tokens {result['config']['max_tokens']}, "
            f"CPU {result['config']['cpu']}, {result['config']['cpus']} cores)",
        ]
    )
