"""Packed oneDNN weights for the small multi-row matmuls of batched CPU decoding.

A decoding step of ``B`` rows multiplies a ``(B, 1, in)`` activation by every weight matrix.
With one row this is a matrix-vector product and PyTorch's default CPU BLAS (MKL) is as fast
as memory allows. With a few rows, MKL's fp32 GEMM on some CPUs (measured on this project's
AMD EPYC VM, ``personalign bench linear``) costs about one weight read per row instead of one
per step: SmolLM2-135M's 210 projections took 33 ms for 1 row and 67 ms for 3 (2 threads).
oneDNN, given the weight pre-packed in its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``), is memory-bound as it should be: 27 ms for 1
row, 30 ms for 3.

:func:`pack_linears` turns a model's ``nn.Linear`` layers into :class:`PackedLinear`, which
takes the packed path only for inference forwards (no autograd) of one decoding step,
``(B, 1, in)`` with ``MIN_ROWS <= B <= MAX_ROWS``, in float32 on CPU. Everything else, in
particular a single row and every prompt of more than one token, runs the stock ``F.linear``,
so a request alone in its batch (unsteered, or steered without extra rows) decodes bit for
bit as without packing. Packed rows agree with ``F.linear`` to float rounding (about 1e-6 relative),
not bit for bit. The packed copy is made on first use and remade when the weight changes
through the parameter (an in-place op under ``no_grad`` bumps its version; assigning
``weight.data`` moves its storage). An in-place write to ``weight.data`` itself (PEFT's
default ``merge_adapter``) is not seen: call :func:`clear_packed` after one. The copy costs
the weights' size again in memory (about 0.5 GB for SmolLM2-135M, head included).
``$PERSONALIGN_PACKED_LINEAR=0`` turns packing off.

Which row counts take the packed path is decided per machine when a model is first packed
(:func:`calibrate`): one decoding step's projections (every linear weight but the LM head, so
that the weights stream from memory as in decoding; one weight per shape fits in cache and
ranks the paths differently) are timed through the stock and the packed matmul, interleaved,
for :data:`CALIBRATION_ROWS`, and a row count takes the packed path only where packing took at
most :data:`FASTER` of the stock time (the largest calibrated count at or below it decides).
The decision is stored under ``$PERSONALIGN_CACHE/packed_linear.json`` by CPU model, PyTorch
version, thread count and weight shapes, so it is measured once per machine (about 3 s for
SmolLM2-135M). Measured reason: on the AMD EPYC packing won at 2-32 rows; on an Intel Xeon (AMX) the
stock matmul was faster at 2-4 rows (1.3-1.8x) and far slower at 8-16 (packed 0.15-0.24x),
``personalign bench linear``. ``$PERSONALIGN_PACKED_LINEAR=1`` skips the calibration and packs
every count from 2 to 32 (the earlier behaviour). A single row never changes path, so single-row
numerics do not depend on the machine's decision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MIN_ROWS, MAX_ROWS = 2, 32  # rows of one decoding step that may take the packed path
ENV = "PERSONALIGN_PACKED_LINEAR"
CALIBRATION_ROWS = (2, 3, 4, 8, 16, 32)
ALL_ROWS = frozenset(range(MIN_ROWS, MAX_ROWS + 1))
FASTER = 0.9  # packed must take at most this share of the stock time to be used
_decisions: dict[str, frozenset[int]] = {}  # per process: machine, threads and shapes -> rows


def packing_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear ops."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def step_rows(x: torch.Tensor) -> int:
    """Rows of a decoding-step input: ``B`` for ``(B, 1, in)``, else 0.

    Only the 3-D one-position form counts: a 2-D ``(N, in)`` input may be a flattened prefill
    (mixture-of-experts blocks flatten ``(B, T, H)`` to ``(B * T, H)``), which stays stock.
    """
    return x.shape[0] if x.dim() == 3 and x.shape[1] == 1 else 0


def _is_memory_error(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or "allocate" in str(err).lower()


class PackedLinear(torch.nn.Linear):
    """``nn.Linear`` whose few-row inference steps use a packed oneDNN weight (see module doc)."""

    _packed: tuple[torch.Tensor, int, Any] | None = None  # (the weight packed, its version then, packed copy)
    _packing_failed: bool = False

    def _packed_weight(self) -> Any:
        weight = self.weight
        cached = self.__dict__.get("_packed")  # read once: clear_packed may drop it meanwhile
        # The cache holds the packed weight's storage, so its address cannot be reused by a new
        # weight; a new storage (weight.data = ...) or an in-place op (version) means repacking.
        if cached is not None and cached[0].data_ptr() == weight.data_ptr() and cached[1] == weight._version:
            return cached[2]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self._packed = (weight.detach(), weight._version, packed)
        return packed

    def _takes_packed_path(self, x: torch.Tensor) -> bool:
        return (
            step_rows(x) in self.__dict__.get("_packed_rows", ALL_ROWS)
            and not self._packing_failed
            and not torch.is_grad_enabled()
            and x.shape[-1] == self.in_features
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not self.weight.is_inference()  # made under inference_mode: no version to key the cache on
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_packed_path(x):
            try:
                flat = x.reshape(x.shape[0], self.in_features).contiguous()  # (B, in)
                out = torch.ops.mkldnn._linear_pointwise(
                    flat, self._packed_weight(), self.bias, "none", [], ""
                )  # (B, out)
                return out.reshape(x.shape[0], 1, self.out_features)  # (B, 1, out)
            except RuntimeError as err:
                if not _is_memory_error(err):  # the ops refuse this layer: stock path from now on
                    logger.warning(
                        "packed linear turned off for a %dx%d layer: %s",
                        self.out_features,
                        self.in_features,
                        err,
                    )
                    self._packing_failed = True
                    self.__dict__.pop("_packed", None)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .half(), ...: the copy is stale
        self.__dict__.pop("_packed", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # the packed copy is a cache: not pickled or deep-copied
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def _linear_bytes(model: torch.nn.Module) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear
    )


def pack_linears(model: torch.nn.Module, enabled: bool | None = None, max_bytes: int | None = None) -> int:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`PackedLinear`; returns how many.

    ``enabled=None`` reads ``$PERSONALIGN_PACKED_LINEAR`` (on unless ``0``). Only CPU float32
    layers are packed; a build without oneDNN is left as it is. The packed copies double the
    linear weights' memory, so a model whose linear weights exceed ``max_bytes`` (default
    ``$PERSONALIGN_PACKED_LINEAR_MAX_GB``, 2 GB: models up to about 500M parameters in float32)
    is not packed, with a log line saying so.
    """
    setting = os.environ.get(ENV, "auto")
    if enabled is None:
        enabled = setting != "0"
    if not enabled or not packing_available():
        return 0
    if max_bytes is None:
        max_bytes = int(float(os.environ.get(ENV + "_MAX_GB", "2")) * 2**30)
    size = _linear_bytes(model)
    if size > max_bytes:
        logger.info(
            "not packing linear layers: %.1f GB of weights is over the %.1f GB limit ($%s_MAX_GB)",
            size / 2**30,
            max_bytes / 2**30,
            ENV,
        )
        return 0
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = ALL_ROWS if setting == "1" else calibrate([m for m in layers if m is not head])
    if not rows:
        logger.info("not packing linear layers: the stock matmul was as fast at every row count here")
        return 0
    for layer in layers:
        layer.__dict__["_packed_rows"] = rows
    pack_modules(layers)
    return len(layers)


def _decision_key(weights: list[torch.Tensor]) -> str:
    from personalign.models import cpu_model

    shapes = sorted(tuple(w.shape) for w in weights)
    text = json.dumps([cpu_model(), torch.__version__, torch.get_num_threads(), shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stored(key: str, rows: frozenset[int] | None = None) -> frozenset[int] | None:
    """Read (or, with ``rows``, write) the machine's stored decision for ``key``."""
    from personalign.models import cache_root

    path = cache_root() / "packed_linear.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if rows is None:
        found = table.get(key)
        return frozenset(found) if isinstance(found, list) else None
    table[key] = sorted(rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(path)
    except OSError as err:  # a read-only cache: measured again next time
        logger.info("could not store the packed-linear decision at %s: %s", path, err)
    return rows


def calibrate(layers: list[torch.nn.Linear], repeats: int = 4, store: bool = True) -> frozenset[int]:
    """The decoding-step row counts (2-32) at which packed weights beat the stock matmul here.

    Every distinct weight of ``layers`` (one decoding step's worth) goes through both paths for
    each of :data:`CALIBRATION_ROWS`, interleaved, median of ``repeats`` after a warm-up; a
    count is packed when packing took at most :data:`FASTER` of the stock time. Counts between
    calibrated ones follow the largest calibrated count below them. Remembered per process, and
    with ``store`` on disk per machine (see the module doc).
    """
    seen: set[int] = set()
    weights = []
    for layer in layers:
        if id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            weights.append(layer.weight.detach())
    key = _decision_key(weights)
    if key in _decisions:
        return _decisions[key]
    found = _stored(key) if store else None
    if found is not None:
        _decisions[key] = found
        return found
    with torch.inference_mode():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        inputs = {r: [torch.randn(r, w.shape[1]) for w in weights] for r in CALIBRATION_ROWS}

        def stock(r: int) -> float:
            start = time.perf_counter()
            for w, x in zip(weights, inputs[r], strict=True):
                F.linear(x, w)
            return time.perf_counter() - start

        def with_packed(r: int) -> float:
            start = time.perf_counter()
            for p, x in zip(packed, inputs[r], strict=True):
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
            return time.perf_counter() - start

        times: dict[tuple[bool, int], list[float]] = {}
        for rep in range(repeats + 1):  # the first round warms up
            for r in CALIBRATION_ROWS:
                order = (stock, with_packed) if (rep + r) % 2 else (with_packed, stock)
                for fn in order:
                    seconds = fn(r)
                    if rep:
                        times.setdefault((fn is with_packed, r), []).append(seconds)
    wins = [
        r
        for r in CALIBRATION_ROWS
        if statistics.median(times[(True, r)]) <= FASTER * statistics.median(times[(False, r)])
    ]
    rows = frozenset(n for n in ALL_ROWS if max(r for r in CALIBRATION_ROWS if r <= n) in wins)
    _decisions[key] = rows
    if store:
        _stored(key, rows)
    logger.info("packed linear for decoding steps of %s rows (calibrated here)", sorted(rows) or "no")
    return rows


def pack_modules(layers: list[torch.nn.Linear]) -> None:
    """Make exactly these ``nn.Linear`` layers packed (e.g. the ones :func:`unpack_linears` returned)."""
    for layer in layers:
        if type(layer) is not torch.nn.Linear:
            raise TypeError(f"pack_modules takes plain nn.Linear layers, got {type(layer).__name__}")
        layer.__class__ = PackedLinear


def clear_packed(model: torch.nn.Module) -> None:
    """Drop every packed copy in ``model`` (they are remade from the current weights on next use)."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.__dict__.pop("_packed", None)


def unpack_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Undo :func:`pack_linears` (drops the packed copies); returns the layers it unpacked."""
    layers = []
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__dict__.pop("_packed", None)
            module.__dict__.pop("_packing_failed", None)
            module.__class__ = torch.nn.Linear
            layers.append(module)
    return layers
