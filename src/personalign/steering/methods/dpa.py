"""``dpa``: one direction-conditioned adapter (``personalign train dpa``); the request's direction
is written into the system prompt and the adapter replaces the user's own for that row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from personalign.steering.methods.base import SteeringMethod, dpa_line, dpa_objectives


def dpa_direction(weights: Mapping[str, float], objectives: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The unit direction over the DPA adapter's objectives (missing ones 0)."""
    norm = sum(weights.get(o, 0.0) ** 2 for o in objectives) ** 0.5 or 1.0
    return {o: weights.get(o, 0.0) / norm for o in objectives}


class Dpa(SteeringMethod):
    name = "dpa"
    runs_adapter = True
    trains_with = "personalign train dpa"

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        return dpa_objectives(model_id)

    def conversation(
        self, messages: list[dict[str, Any]], weights: Mapping[str, float], model_id: str | None
    ) -> list[dict[str, Any]]:
        from personalign.steering.dpa import dpa_messages

        return dpa_messages(messages, dpa_direction(weights, self.steerable(model_id)), dpa_line(model_id))  # type: ignore[arg-type]

    def row_adapter(self, runtime: Any, own: str, weights: Mapping[str, float]) -> str:
        return runtime.dpa_adapter()  # the direction-conditioned adapter replaces the user's own


METHODS = (Dpa(),)
