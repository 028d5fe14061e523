"""The contract every registered steering method keeps (parametrised from ``REGISTRY``): a name
and aliases that resolve to it, objectives it can steer that are known objectives, and the hooks
the runtime calls. Decoding contracts per method (zero weights reproduce plain decoding, trained
methods sample reproducibly, min_new_tokens holds) are in tests/test_steer_runtime.py, also
parametrised from ``REGISTRY``."""

from __future__ import annotations

import pytest

from personalign.steering.methods import (
    ALIASES,
    AUTO_ORDER,
    METHODS,
    REGISTRY,
    SteeringMethod,
    canonical,
    resolve_method,
)
from personalign.steering.objectives import OBJECTIVES
from personalign.steering.schema import parse_steering

ASK = [{"role": "user", "content": "How do I boil an egg?"}]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_a_registered_method_keeps_the_contract(name):
    method = REGISTRY[name]
    assert isinstance(method, SteeringMethod) and method.name == name and name in METHODS
    assert all(canonical(alias) == name for alias in method.aliases)
    steerable = method.steerable(None)
    assert isinstance(steerable, tuple) and set(steerable) <= set(OBJECTIVES)
    weights = dict.fromkeys(steerable[:1], 0.5)
    rewritten = method.conversation([dict(m) for m in ASK], weights, None)
    assert rewritten[-1] == ASK[-1]  # a prompt-level method adds a system line; the user's turn stays
    assert isinstance(method.eos_shift(weights), float)
    assert method.runs_adapter == (type(method).row_adapter is not SteeringMethod.row_adapter)
    if method.value_kind is not None or method.mixes:
        assert method.acts_on_logits
    if steerable:  # what it says it steers, a request with it accepts, and auto may pick it
        assert parse_steering({"weights": weights, "method": name}).method == name
        if method.auto_rank is not None:
            assert name in AUTO_ORDER and resolve_method("auto", list(weights), None) is not None


def test_aliases_name_one_method_each_and_are_not_method_names():
    assert set(ALIASES.values()) <= set(REGISTRY) and not set(ALIASES) & set(METHODS)
    assert (
        parse_steering({"weights": {"verbosity": 1.0}, "method": "modpo"}).method
        == canonical("modpo")
        == "mix"
    )
