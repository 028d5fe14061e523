"""``prompt``: the prompting baseline, an instruction per objective added to the system message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from personalign.steering.methods.base import SteeringMethod


class Prompt(SteeringMethod):
    name = "prompt"
    auto_rank = 3

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        from personalign.steering.prompting import PROMPTABLE

        return PROMPTABLE

    def conversation(
        self, messages: list[dict[str, Any]], weights: Mapping[str, float], model_id: str | None
    ) -> list[dict[str, Any]]:
        from personalign.steering.prompting import instruction

        text = instruction(weights)
        if not text:
            return messages
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}, *messages[1:]]
        return [{"role": "system", "content": text}, *messages]


METHODS = (Prompt(),)
