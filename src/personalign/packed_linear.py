"""Packed oneDNN weights for the small multi-row matmuls of batched CPU decoding.

A decoding step of ``B`` rows multiplies a ``(B, in)`` activation by every weight matrix.
With one row this is a matrix-vector product and PyTorch's default CPU BLAS (MKL) is as fast
as memory allows. With a few rows, MKL's fp32 GEMM on some CPUs (measured on this project's
AMD EPYC VM, ``bench/linear.py``) reads the weights once per row instead of once per step:
SmolLM2-135M's 210 projections took 31 ms for 1 row and 63 ms for 3 (2 threads). oneDNN,
given the weight pre-packed in its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``),
is memory-bound as it should be: 25 ms for 1 row, 29 ms for 3.

:func:`pack_linears` turns a model's ``nn.Linear`` layers into :class:`PackedLinear`, which
takes the packed path only for inference forwards (no autograd) of one decoding step of
``MIN_ROWS``..``MAX_ROWS`` rows in float32 on CPU. Everything else, and in particular a single
row and every prefill, runs the stock ``F.linear``, so a single request decodes bit for bit as
without packing. Packed rows agree with ``F.linear`` to float rounding (about 1e-6 relative),
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
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def step_rows(x: torch.Tensor) -> int:
    """Rows of a decoding-step input: ``B`` for ``(B, in)`` or ``(B, 1, in)``, else 0."""
    if x.dim() == 2:
        return x.shape[0]
    if x.dim() == 3 and x.shape[1] == 1:
        return x.shape[0]
    return 0


class PackedLinear(torch.nn.Linear):
    """``nn.Linear`` whose few-row inference steps use a packed oneDNN weight (see module doc)."""

    _packed: tuple[int, int, Any] | None = None  # (weight data_ptr, weight version, packed weight)
    _packing_failed: bool = False

    def _packed_weight(self) -> Any:
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[:2] != key:
            self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        return self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = step_rows(x)
        if (
            MIN_ROWS <= rows <= MAX_ROWS
            and not self._packing_failed
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
        ):
            try:
                flat = x.reshape(rows, self.in_features).contiguous()  # (B, in)
                out = torch.ops.mkldnn._linear_pointwise(flat, self._packed_weight(), self.bias, "none", [], "")  # (B, out)
                return out.reshape(*x.shape[:-1], self.out_features)
            except RuntimeError as err:  # an op this build lacks for these shapes: stock path from now on
                logger.warning("packed linear disabled for a %dx%d layer: %s", self.out_features, self.in_features, err)
                self._packing_failed = True
                self._packed = None
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self) -> dict[str, Any]:  # the packed copy is a cache: not pickled or deep-copied
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def pack_linears(model: torch.nn.Module, enabled: bool | None = None) -> int:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`PackedLinear`; returns how many.

    ``enabled=None`` reads ``$PERSONALIGN_PACKED_LINEAR`` (on unless ``0``). Only CPU float32
    models are packed; other models, or a build without oneDNN, are left as they are.
    """
    if enabled is None:
        enabled = os.environ.get(ENV, "1") != "0"
    if not enabled or not packing_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = PackedLinear
            count += 1
    return count


def clear_packed(model: torch.nn.Module) -> None:
    """Drop every packed copy in ``model`` (they are remade from the current weights on next use)."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.__dict__.pop("_packed", None)


def unpack_linears(model: torch.nn.Module) -> int:
    """Undo :func:`pack_linears` (drops the packed copies); returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__dict__.pop("_packed", None)
            module.__dict__.pop("_packing_failed", None)
            module.__class__ = torch.nn.Linear
            count += 1
    return count
