"""``weight-mix``: the MODPO objective adapters added in weight space, one adapter per direction.

For weights ``w`` the request's row runs one LoRA adapter whose update is
``sum_k w_k * dW_k`` (``dW_k = s_k B_k A_k``, each objective adapter's own update): PEFT's
``add_weighted_adapter(..., combination_type="cat")`` stacks the scaled ``A_k`` and the ``B_k``,
which is that sum exactly, negative weights included. It is the first-order counterpart of
``mix`` (``mix`` adds the adapters' log-probabilities, this adds their weight updates): one row
at the cost of one adapter instead of one row per objective. Built once per direction by the
steering runtime (:meth:`~personalign.steering.runtime.SteeringRuntime.weight_mix_adapter`) and
kept in a small LRU; like ``dpa`` it replaces the user's own adapter for that request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from personalign.steering.methods.base import MIX_DIR, SteeringMethod, installed


class WeightMix(SteeringMethod):
    name = "weight-mix"
    runs_adapter = True
    trains_with = "personalign train modpo"

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        return installed(MIX_DIR, model_id)

    def row_adapter(self, runtime: Any, own: str, weights: Mapping[str, float]) -> str:
        return runtime.weight_mix_adapter(weights)  # replaces the user's own adapter, as dpa does


METHODS = (WeightMix(),)
