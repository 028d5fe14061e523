"""``vas`` and ``vas-model``: value-augmented sampling. Value heads trained on the frozen
generator's own samples (``personalign train vas``, TD(lambda)) add ``beta * Q`` to the top-k
logits; ``vas`` reads the generator's hidden state, ``vas-model`` is a separate small GRU."""

from __future__ import annotations

from personalign.steering.methods.base import VAS_DIR, VAS_MODEL_DIR, SteeringMethod, installed


class Vas(SteeringMethod):
    name = "vas"
    aliases = ("trunk",)
    auto_rank = 1
    value_kind = VAS_DIR
    acts_on_logits = True
    trains_with = "personalign train vas --kinds trunk"

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        return installed(VAS_DIR, model_id)


class VasModel(SteeringMethod):
    name = "vas-model"
    aliases = ("gru", "vas_model")
    value_kind = VAS_MODEL_DIR
    acts_on_logits = True
    trains_with = "personalign train vas --kinds gru"

    def steerable(self, model_id: str | None = None) -> tuple[str, ...]:
        return installed(VAS_MODEL_DIR, model_id)


METHODS = (Vas(), VasModel())
