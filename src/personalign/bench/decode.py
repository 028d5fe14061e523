"""``personalign bench decode``: decoding tokens/s per precision and batch size, beside llama.cpp
decoding the same GGUF and the memory-bandwidth limit.

Cases, run interleaved (each repeat visits every case once, in a rotated order, so a load that
drifts over the run spreads over all of them): the generator as personalign loads it
(transformers, float32, the default), the same in bfloat16, and llama.cpp's ``llama-server``
(built by ``personalign engine build``) on the Q4_1 GGUF the package ships, at batch sizes 1, 4
and 16 (llama.cpp: that many concurrent requests on as many slots). Every row decodes exactly
``tokens`` new tokens after the same short prompt (end of sequence ignored), greedy, so the
cases do the same work.

The limit: at batch 1 every weight is read once per token, so tokens/s cannot exceed the
measured read bandwidth divided by the bytes of the weights (float32 4 bytes a parameter,
bfloat16 2, the GGUF file's size for llama.cpp). The bandwidth is measured here, in the same run,
by summing a 512 MiB array with torch on the same threads.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from personalign.bench.engines import cpu_model

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
PRECISIONS = ("float32", "bfloat16")


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Best read bandwidth in GB/s: a sum over a ``mib`` MiB float32 array (bigger than any cache)."""
    import torch

    data = torch.rand(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _hf_case(generator: Any, batch: int, tokens: int, static: bool = False) -> float:
    """Seconds for ``batch`` rows of exactly ``tokens`` greedy new tokens (prompt included)."""
    import torch

    ids = generator.tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    ids = ids.repeat(batch, 1).to(generator.device)
    with torch.inference_mode():
        started = time.perf_counter()
        generator.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=generator.tokenizer.pad_token_id,
            **({"cache_implementation": "static"} if static else {}),
        )
        return time.perf_counter() - started


def _llama_case(url: str, ids: list[int], batch: int, tokens: int) -> float:
    import httpx

    body = {"prompt": ids, "n_predict": tokens, "ignore_eos": True, "temperature": 0, "cache_prompt": False}

    def one(_: int) -> int:
        reply = httpx.post(f"{url}/completion", json=body, timeout=600).json()
        return int(reply["timings"]["predicted_n"])

    started = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        done = list(pool.map(one, range(batch)))
    elapsed = time.perf_counter() - started
    if min(done) != tokens:
        raise RuntimeError(f"llama.cpp decoded {done} tokens, not {tokens} each")
    return elapsed


COMPILED = "float32 compiled"


def run_decode_bench(
    batches: tuple[int, ...] = (1, 4, 16),
    tokens: int = 64,
    repeats: int = 3,
    threads: int | None = None,
    compiled: bool = False,
) -> dict[str, Any]:
    """``compiled``: also ``torch.compile``'d decoding steps with a static cache (float32); each
    batch size compiles once in the warm-up (about a minute each on 2 cores), not timed."""
    import torch

    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        return _measure(batches, tokens, repeats, threads, compiled)
    finally:
        torch.set_num_threads(before)  # the caller's setting (numerics depend on the thread count)


def _measure(
    batches: tuple[int, ...], tokens: int, repeats: int, threads: int, compiled: bool
) -> dict[str, Any]:
    import torch

    from personalign.backends.llamacpp import LlamaServer
    from personalign.models import embedded_gguf_path, load_generator

    generators = {p: load_generator(device="cpu", dtype=p) for p in PRECISIONS}
    if compiled:
        generators[COMPILED] = load_generator(device="cpu")
        model = generators[COMPILED].model
        model.forward = torch.compile(model.forward, dynamic=False)
    gguf = embedded_gguf_path()
    prompt_ids = list(
        generators["float32"].tokenizer.apply_chat_template(
            PROMPT, add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    cases = [(p, b) for p in (*generators, "llama.cpp Q4_1") for b in batches]
    seconds: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    with LlamaServer(gguf, parallel=max(batches), threads=threads, ctx_size=256 + tokens) as server:
        for case in cases:  # warm-up (and the compiled case's compilation), not reported
            _run(case, generators, server.url, prompt_ids, tokens if case[0] == COMPILED else 4)
        for repeat in range(repeats):
            shift = repeat % len(cases)
            for case in cases[shift:] + cases[:shift]:
                seconds[case].append(_run(case, generators, server.url, prompt_ids, tokens))
        bandwidth = read_bandwidth()
    sizes = {p: weight_bytes(g.model) for p, g in generators.items()} | {
        "llama.cpp Q4_1": gguf.stat().st_size
    }
    rows = []
    for (name, batch), times in seconds.items():
        rates = [batch * tokens / t for t in times]
        rows.append(
            {
                "case": name,
                "batch": batch,
                "tokens_per_s": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "weight_gb": sizes[name] / 1e9,
                "limit_batch1_tokens_per_s": bandwidth * 1e9 / sizes[name],
            }
        )
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["case"] == "float32"}
    for row in rows:
        row["over_float32"] = row["tokens_per_s"] / base[row["batch"]]
    return {
        "config": {
            "batches": list(batches),
            "tokens": tokens,
            "repeats": repeats,
            "threads": threads,
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gguf": Path(gguf).name,
        },
        "read_bandwidth_gb_s": bandwidth,
        "rows": rows,
    }


def _run(case: tuple[str, int], generators: dict[str, Any], url: str, ids: list[int], tokens: int) -> float:
    name, batch = case
    if name in generators:
        return _hf_case(generators[name], batch, tokens, static=name == COMPILED)
    return _llama_case(url, ids, batch, tokens)


def format_decode_report(result: dict[str, Any]) -> str:
    lines = [f"{'case':<16}{'batch':>6}{'tok/s':>9}{'min':>8}{'max':>8}{'vs f32':>8}{'GB':>7}{'limit@1':>9}"]
    for r in result["rows"]:
        lines.append(
            f"{r['case']:<16}{r['batch']:>6}{r['tokens_per_s']:>9.1f}{r['min']:>8.1f}{r['max']:>8.1f}"
            f"{r['over_float32']:>7.2f}x{r['weight_gb']:>7.3f}{r['limit_batch1_tokens_per_s']:>9.1f}"
        )
    c = result["config"]
    lines.append(
        f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s; {c['tokens']} tokens per row, median of "
        f"{c['repeats']} interleaved repeats; {c['threads']} threads; CPU {c['cpu']}, {c['cpus']} cores; torch {c['torch']}"
    )
    return "\n".join(lines)


def plot_decode(result: dict[str, Any], path: str | Path) -> Path:
    """tokens/s against batch size per case, with each case's batch-1 bandwidth limit (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["case"] for r in result["rows"]))
    for index, name in enumerate(names):
        rows = [r for r in result["rows"] if r["case"] == name]
        color = f"C{index}"
        ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", color=color, label=name)
        ax.axhline(rows[0]["limit_batch1_tokens_per_s"], color=color, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows decoded together)")
    ax.set_ylabel("generated tokens/s (all rows)")
    c = result["config"]
    ax.set_title(
        f"Decoding SmolLM2-135M on {c['cpus']} cores ({c['cpu']})\n"
        f"dotted: batch-1 limit = read bandwidth {result['read_bandwidth_gb_s']:.0f} GB/s / weight bytes",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
