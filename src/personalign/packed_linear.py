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
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MIN_ROWS, MAX_ROWS = 2, 32  # rows of one decoding step that take the packed path
ENV = "PERSONALIGN_PACKED_LINEAR"


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
            MIN_ROWS <= step_rows(x) <= MAX_ROWS
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
    if enabled is None:
        enabled = os.environ.get(ENV, "1") != "0"
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
    pack_modules(layers)
    return len(layers)


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
