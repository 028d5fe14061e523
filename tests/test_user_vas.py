"""User-conditioned value heads (``user-vas``) on the tiny random Llama and a small PAL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from personalign.errors import ValidationError
from personalign.eval.populations import SyntheticConfig, SyntheticPopulation
from personalign.functional.steering import vas_logits
from personalign.models import Generator
from personalign.personalizer import Personalizer
from personalign.preference import PAL, Featurizer
from personalign.preference.base import UserState
from personalign.preference.pal import PALConfig
from personalign.steering.uservas import (
    CONFIG_FILE,
    UserHeads,
    UserHeadsError,
    UserVasConfig,
    embedder_fingerprint,
    mixture,
    train_user_heads,
)
from personalign.training.loop import LoopConfig
from personalign.training.samples import sample_responses

ASK = [{"role": "user", "content": "How long should I boil an egg for?"}]


@pytest.fixture(scope="module")
def small():
    population = SyntheticPopulation(SyntheticConfig(n_users=24, n_prompts=6, candidates_per_prompt=4))
    return population, population.population(shots=4, held_out=2)


@pytest.fixture(scope="module")
def pal(encoder, small):
    return PAL(Featurizer(encoder), PALConfig(n_prototypes=2, epochs=1)).fit(small[1].population(), seed=0)


@pytest.fixture(scope="module")
def heads_dir(lively, pal, small, tmp_path_factory):
    samples = sample_responses(
        lively, small[0].prompts[:3], n_per_prompt=2, max_new_tokens=5, temperature=1.0
    )
    heads = train_user_heads(
        lively,
        samples,
        pal,
        UserVasConfig(rank=4, loop=LoopConfig(epochs=2, learning_rate=1e-2, batch_size=4, name="t")),
    )
    return heads.save(tmp_path_factory.mktemp("heads") / "user_vas")


def test_mixture_golden_values_and_nan_state():
    np.testing.assert_allclose(
        mixture(UserState(method="pal", vector=np.array([0.0, math.log(3.0)], np.float32))),
        [0.25, 0.75],
        rtol=1e-6,
    )
    with pytest.raises(ValidationError, match="refresh_state"):
        mixture(type("S", (), {"vector": np.array([np.nan, 0.0])})())


def test_guidance_is_the_users_mixture_of_the_heads():
    """VAS with K heads at betas beta * pi equals VAS with the mixed value sum_k pi_k Q_k at beta:
    centring on the top-k is linear, so l + beta * sum_k pi_k (Q_k - mean Q_k) either way."""
    torch.manual_seed(0)
    scores = torch.randn(2, 12)  # (R, V)
    q = torch.randn(3, 2, 12)  # (K, R, V): each head's values of every token

    class Head:
        def __init__(self, values):
            self.values = values

    pi = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])  # (R, K)
    beta = 2.5
    ids = scores.topk(4, dim=-1).indices  # (R, k)
    mixed = (pi.T[:, :, None] * q).sum(0).gather(-1, ids)  # (R, k)
    expected = vas_logits(scores, ids, mixed - mixed.mean(-1, keepdim=True), torch.full((2,), beta))
    per_head = torch.stack(
        [q[k].gather(-1, ids) - q[k].gather(-1, ids).mean(-1, keepdim=True) for k in range(3)], dim=-1
    )  # (R, k, K)
    got = vas_logits(scores, ids, per_head, beta * pi)
    torch.testing.assert_close(got, expected)


def test_heads_save_load_and_refuse_another_generator_or_embedder(heads_dir, lively, pal, encoder, small):
    meta = json.loads((heads_dir / CONFIG_FILE).read_text())
    assert (
        meta["prototypes"] == 2
        and meta["base_model"] == "tiny-lively"
        and meta["embedder"] == embedder_fingerprint(pal)
    )
    loaded = UserHeads.load(heads_dir, lively, pal)
    hidden = torch.randn(3, lively.model.config.hidden_size)
    assert len(loaded.heads) == 2 and loaded.heads[0].q_all(hidden).shape == (
        3,
        lively.model.config.vocab_size,
    )
    other = Generator(model=lively.model, tokenizer=lively.tokenizer, model_id="someone/else")
    with pytest.raises(UserHeadsError, match="trained for 'tiny-lively'.*personalign train user-vas"):
        UserHeads.load(heads_dir, other, pal)
    refit = PAL(Featurizer(encoder), PALConfig(n_prototypes=2, epochs=1)).fit(small[1].population(), seed=1)
    with pytest.raises(UserHeadsError, match="trained for embedder.*train heads for this embedder"):
        UserHeads.load(heads_dir, lively, refit)
    with pytest.raises(UserHeadsError, match="has no user_vas_config.json"):
        UserHeads.load(heads_dir.parent, lively, pal)


def test_user_vas_in_chat(heads_dir, lively, pal, encoder, small, tmp_path):
    population, pop = small
    user = pop.users[0]
    with Personalizer(lively, encoder, tmp_path / "s", embedder=pal, user_vas=heads_dir) as pz:
        pz.enroll(user.user, user.shots)
        base = {"max_new_tokens": 6, "memory": False, "shots": False, "steer": {}}
        plain = pz.respond(user.user, ASK, user_vas=0.0, **base)
        assert plain.personalization is None and plain.text == pz.respond(None, ASK, **base).text
        guided = pz.respond(user.user, ASK, user_vas=50.0, **base)
        report = guided.personalization
        assert report["method"] == "user-vas" and report["strength"] == 50.0 and len(report["weights"]) == 2
        np.testing.assert_allclose(report["weights"], mixture(pz.state(user.user)), atol=1e-4)
        assert guided.text != plain.text  # a strong guidance changes the greedy answer of the lively model
        default = pz.respond(user.user, ASK, **base)  # heads installed, user enrolled: on by default
        assert default.personalization["method"] == "user-vas" and default.personalization["strength"] == 3.0
        # a mixed batch: each row with its own user's guidance (or none) equals its single run
        batch = pz.respond_batch(
            [
                {"user": user.user, "messages": ASK, "user_vas": 50.0, **base},
                {"user": None, "messages": ASK, **base},
            ]
        )
        assert [r.text for r in batch] == [guided.text, plain.text]
        no_state = pz.respond(None, ASK, user_vas=5.0, **base)
        assert no_state.personalization["method"] is None and no_state.text == plain.text


def test_user_vas_without_heads_or_with_a_broken_state_is_a_typed_error(
    pal, lively, encoder, small, tmp_path
):
    user = small[1].users[0]
    with Personalizer(lively, encoder, tmp_path / "s", embedder=pal) as pz:
        pz.enroll(user.user, user.shots)
        assert pz.user_heads() is None
        assert pz.respond(user.user, ASK, max_new_tokens=4).personalization is None  # nothing installed: off
        with pytest.raises(ValidationError, match="user_vas.*personalign train user-vas"):
            pz.respond(user.user, ASK, user_vas=3.0, max_new_tokens=4)
        with pytest.raises(ValidationError, match="user_vas"):
            pz.respond(user.user, ASK, user_vas=-1.0, max_new_tokens=4)


def test_train_user_vas_command_writes_heads_that_load(tiny_model_dir, encoder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from personalign.cli import app
    from personalign.models import load_generator
    from personalign.preference import default_embedder_dir, load_embedder

    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "heads"
    args = [
        "train",
        "user-vas",
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--per-prompt",
        "2",
        "--max-new-tokens",
        "8",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "4 heads on" in done.output
    generator = load_generator(str(tiny_model_dir), device="cpu")
    heads = UserHeads.load(out, generator, load_embedder(default_embedder_dir(), encoder, generator))
    assert (
        len(heads.heads) == 4 and heads.meta["prompts"] == 45
    )  # the 5 held-out topics' 15 prompts never trained on
