"""``personalign bench serve --engines``: personalign's layer on top of llama.cpp, side by side.

Three servers answer the same chat workload (the seeded users of ``bench serve``, greedy, fixed
``max_tokens``) on loopback, each in its own process:

- ``in-process``: ``personalign serve`` decoding with Hugging Face ``generate`` (the default backend);
- ``remote``: ``personalign serve --engine-url`` decoding on a llama.cpp server;
- ``llama.cpp``: that same llama.cpp server asked directly, no personalisation (no memories, no
  shots, no user state): what the engine alone costs.

At each concurrency level the three run one after another in a rotated order (the first server
of one level is the last of the next), so a load that drifts over the run spreads over all three.
Reported per level and server: throughput, p50/p95 latency; and ratios of ``remote`` over
``llama.cpp`` (the cost of personalign's layer) and ``in-process`` over ``remote``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personalign.bench.serve import USERS, _ratio, run_level, seed_users, subprocess_server
from personalign.models import cpu_model

SERVERS = ("in-process", "remote", "llama.cpp")


def run_engine_bench(
    levels: Sequence[int] = (1, 16),
    requests_per_client: int = 2,
    max_seconds: float = 120.0,
    max_tokens: int = 32,
    max_batch: int = 16,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure the three servers at every level (see the module docstring)."""
    from personalign.backends.llamacpp import LlamaServer
    from personalign.models import embedded_gguf_path

    root = Path(tempfile.mkdtemp(prefix="personalign-bench-engines-"))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    users = list(USERS)
    try:
        with (
            LlamaServer(embedded_gguf_path(), parallel=max(levels), threads=threads) as llama,
            subprocess_server(root / "local", max_batch, None, None, "cpu") as local,
            subprocess_server(
                root / "remote",
                max_batch,
                None,
                None,
                "cpu",
                extra=("--engine", "llama.cpp", "--engine-url", llama.url),
            ) as remote,
        ):
            urls = {"in-process": local, "remote": remote, "llama.cpp": llama.url}
            for name in ("in-process", "remote"):
                seed_users(urls[name])
            for url in urls.values():  # warm-up, not reported
                run_level(url, 1, 2, max_seconds, max_tokens, users)
            for index, clients in enumerate(levels):
                order = SERVERS[index % 3 :] + SERVERS[: index % 3]
                for name in order:
                    total = max(4, requests_per_client * clients)
                    results[name].append(
                        run_level(urls[name], clients, total, max_seconds, max_tokens, users)
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    by_level = {name: {lv["clients"]: lv for lv in results[name]} for name in SERVERS}
    ratios = {
        str(c): {
            "remote_over_llama_cpp_p50": _ratio(
                by_level["remote"][c]["p50_ms"], by_level["llama.cpp"][c]["p50_ms"]
            ),
            "in_process_over_remote_p50": _ratio(
                by_level["in-process"][c]["p50_ms"], by_level["remote"][c]["p50_ms"]
            ),
            "remote_over_in_process_throughput": _ratio(
                by_level["remote"][c]["requests_per_s"], by_level["in-process"][c]["requests_per_s"]
            ),
        }
        for c in levels
    }
    return {
        "config": {
            "levels": list(levels),
            "requests_per_client": requests_per_client,
            "max_tokens": max_tokens,
            "max_batch": max_batch,
            "llama_cpp_slots": max(levels),
            "threads": threads or "llama.cpp default",
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "model": "embedded SmolLM2-135M-Instruct (HF: de-quantised float32; llama.cpp: the Q4_1 GGUF)",
        },
        "servers": results,
        "ratios": ratios,
    }


def format_engine_report(result: dict[str, Any]) -> str:
    lines = [
        f"{'server':<12}{'clients':>8}{'requests':>10}{'errors':>8}{'req/s':>9}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
    ]
    for name, levels in result["servers"].items():
        for lv in levels:
            lines.append(
                f"{name:<12}{lv['clients']:>8}{lv['requests']:>10}{lv['errors']:>8}{lv['requests_per_s']:>9.2f}"
                f"{lv['tokens_per_s']:>9.1f}{lv['p50_ms']:>9.0f}{lv['p95_ms']:>9.0f}"
            )
    for clients, r in result["ratios"].items():
        lines.append(
            f"{clients} clients: remote / llama.cpp p50 {r['remote_over_llama_cpp_p50']:.2f}x, "
            f"in-process / remote p50 {r['in_process_over_remote_p50']:.2f}x, "
            f"remote / in-process throughput {r['remote_over_in_process_throughput']:.2f}x"
        )
    config = result["config"]
    lines.append(
        f"(model {config['model']}; max_tokens {config['max_tokens']}; CPU {config['cpu']}, {config['cpus']} cores)"
    )
    return "\n".join(lines)
