"""``personalign bench linear``: one decoding step's projections, stock ``F.linear`` vs packed.

For each row count (the batch of one decoding step), every ``nn.Linear`` of the generator's
decoder layers (not the LM head, whose shape is reported) is run on a random ``(rows, in)`` input,
once through the stock ``F.linear`` (MKL on x86 builds) and once through the packed oneDNN
weight of :mod:`personalign.packed_linear`, interleaved, median of ``repeats``. The ratios say
what a step of ``rows`` costs against one row on the stock path, which is what single-request
decoding runs.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from personalign.packed_linear import PackedLinear, packing_available

ROWS = (1, 2, 3, 4, 8, 16, 32)


def _weights(model: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The decoder's projection weights (each once) and the LM head's weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = head.weight if head is not None else None
    seen: set[int] = set()
    weights = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and id(module.weight) not in seen:
            seen.add(id(module.weight))
            weights.append(module.weight.detach())
    return weights, (head_weight.detach() if head_weight is not None else None)


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_linear_bench(
    model: torch.nn.Module, rows: tuple[int, ...] = ROWS, repeats: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Milliseconds per step for stock and packed weights per row count; ratios to stock at 1 row."""
    if not packing_available():
        raise RuntimeError("this PyTorch build has no oneDNN linear ops; nothing to compare")
    if 1 not in rows:
        raise ValueError(f"rows {rows} must include 1, the baseline")
    used = next(
        (m.__dict__.get("_packed_rows", frozenset()) for m in model.modules() if isinstance(m, PackedLinear)),
        frozenset(),
    )  # the row counts this machine's calibration packs (none when the model is not packed)
    weights, head = _weights(model)
    weights = [w.float().cpu() for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    generator = torch.Generator().manual_seed(seed)
    inputs = {r: [torch.randn(r, w.shape[1], generator=generator) for w in weights] for r in rows}

    def stock(r: int) -> None:
        for w, x in zip(weights, inputs[r], strict=True):
            F.linear(x, w)

    def with_packed(r: int) -> None:
        for p, x in zip(packed, inputs[r], strict=True):
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for r in rows:  # warm-up
            stock(r)
            with_packed(r)
        for _ in range(repeats):
            for r in rows:
                times.setdefault(("stock", r), []).append(_time(lambda r=r: stock(r)))
                times.setdefault(("packed", r), []).append(_time(lambda r=r: with_packed(r)))
        error = max(
            (torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") - F.linear(x, w))
            .abs()
            .max()
            .item()
            for w, p, x in zip(weights, packed, inputs[max(rows)], strict=True)
        )
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    one = ms[("stock", 1)]
    table = [
        {
            "rows": r,
            "stock_ms": ms[("stock", r)],
            "packed_ms": ms[("packed", r)],
            "stock_vs_1_row": ms[("stock", r)] / one,
            "packed_vs_1_row": ms[("packed", r)] / one,
            "packed_vs_stock": ms[("packed", r)] / ms[("stock", r)],
            "used": "packed" if r in used else "stock",
        }
        for r in rows
    ]
    return {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "layers": len(weights),
        "parameters": sum(w.numel() for w in weights),
        "head": list(head.shape) if head is not None else None,
        "repeats": repeats,
        "max_abs_difference": error,
        "rows": table,
    }


def format_linear_bench(result: dict[str, Any]) -> str:
    lines = [
        f"bench linear: {result['layers']} projections ({result['parameters'] / 1e6:.0f}M weights, LM head apart), median of {result['repeats']}, {result['threads']} threads, {result['machine']}",
        "",
        "| rows | stock ms | packed ms | stock vs 1 row | packed vs 1 row (stock) | packed vs stock | decoding uses |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['rows']} | {row['stock_ms']:.1f} | {row['packed_ms']:.1f} | {row['stock_vs_1_row']:.2f}x | {row['packed_vs_1_row']:.2f}x | {row['packed_vs_stock']:.2f}x | {row['used']} |"
        )
    lines += [
        "",
        f"largest |packed - stock| at {result['rows'][-1]['rows']} rows: {result['max_abs_difference']:.2e}",
    ]
    return "\n".join(lines)
