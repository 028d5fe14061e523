"""``logit``: a hand-written logits processor, no training. It steers verbosity by shifting the
end-of-sequence logit (negative weight: end sooner)."""

from __future__ import annotations

from collections.abc import Mapping

from personalign.steering.methods.base import LOGIT_STEERABLE, SteeringMethod


class Logit(SteeringMethod):
    name = "logit"
    auto_rank = 2
    acts_on_logits = True

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        return LOGIT_STEERABLE

    def eos_shift(self, weights: Mapping[str, float]) -> float:
        from personalign.steering.decoding import DEFAULT_VERBOSITY_STRENGTH

        return -DEFAULT_VERBOSITY_STRENGTH * float(weights.get("verbosity", 0.0))


METHODS = (Logit(),)
