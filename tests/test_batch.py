"""Contract: a mixed batch of users equals each user's own run, token for token, under greedy decoding."""

from __future__ import annotations

import pytest

from personalign.errors import UnknownUserError, ValidationError


def _setup(pz):
    pz.enroll(
        "ana",
        [
            {
                "prompt": "How do I boil an egg?",
                "chosen": "Nine minutes.",
                "rejected": "A long story about eggs and water and time.",
            }
        ],
    )
    pz.enroll(
        "ben",
        [
            {
                "prompt": "Why is the sky blue?",
                "chosen": "Because of a long and detailed physical reason.",
                "rejected": "Scattering.",
            }
        ],
    )
    pz.remember("ben", "I am vegetarian and I cook for two.")


REQUESTS = [
    {"user": "ana", "messages": [{"role": "user", "content": "Plan my dinner."}], "max_new_tokens": 12},
    {
        "user": "ben",
        "messages": [{"role": "user", "content": "Plan my dinner for two people please."}],
        "max_new_tokens": 7,
    },
    {"user": None, "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 10},
    {
        "user": "ana",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "steer": {"verbosity": 2.0},
        "max_new_tokens": 9,
    },
]


def test_mixed_batch_equals_individual_runs(pz):
    _setup(pz)
    batch = pz.respond_batch(REQUESTS)
    for request, result in zip(REQUESTS, batch, strict=True):
        options = {k: v for k, v in request.items() if k not in ("user", "messages", "steer")}
        alone = pz.respond(request["user"], request["messages"], steer=request.get("steer"), **options)
        assert result == alone
    assert [r.user for r in batch] == ["ana", "ben", None, "ana"]
    assert batch[1].memories == ["I am vegetarian and I cook for two."]
    assert batch[0].steer["verbosity"] < 0 < batch[1].steer["verbosity"]


def test_sampling_groups_are_generated_separately(pz):
    _setup(pz)
    requests = [
        {**REQUESTS[0], "temperature": 0.7, "seed": 1},
        REQUESTS[2],
        {**REQUESTS[1], "temperature": 0.7, "seed": 1},
    ]
    results = pz.respond_batch(requests)
    assert [r.user for r in results] == ["ana", None, "ben"]
    assert results[1] == pz.respond(None, REQUESTS[2]["messages"], max_new_tokens=10)


def test_batch_validates_everything_first(pz):
    _setup(pz)
    with pytest.raises(UnknownUserError):
        pz.respond_batch([REQUESTS[0], {"user": "nobody", "messages": REQUESTS[0]["messages"]}])
    with pytest.raises(ValidationError, match=r"requests\[1\]"):
        pz.respond_batch([REQUESTS[0], {"user": "ana"}])
    with pytest.raises(ValidationError, match="requests"):
        pz.respond_batch([])
