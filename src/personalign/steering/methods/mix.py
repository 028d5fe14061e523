"""``mix``: MODPO objective adapters mixed at the logits. A request adds one row per objective
adapter (and the plain base when the user runs their own adapter); the rows share tokens and the
steering processor mixes their log-probabilities by the requested weights (or, with an affine
head, the hidden states are mixed before it)."""

from __future__ import annotations

from personalign.steering.methods.base import MIX_DIR, SteeringMethod, installed


class Mix(SteeringMethod):
    name = "mix"
    aliases = ("modpo",)
    auto_rank = 0
    mixes = True
    acts_on_logits = True
    trains_with = "personalign train modpo"

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        return installed(MIX_DIR, model_id)


METHODS = (Mix(),)
