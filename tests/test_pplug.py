"""Persona-Plug: golden values of the pooling, the soft-token contract on the tiny model, training,
and the projector artefact.

A fake encoder (hashed unit vectors) stands in for MiniLM: the plug only needs fixed vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from personalign.conditioning.pplug import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EmptyHistoryError,
    PersonaPlug,
    PlugConfig,
    PlugError,
    PlugFileError,
    PlugMismatchError,
    build_plug,
    embed_user,
    embed_users,
    input_embedding_norm,
    load_plug,
    plug_input_ids,
    plug_inputs,
    save_plug,
)
from personalign.conditioning.pplug_train import (
    PlugTask,
    PlugTrainConfig,
    evaluate_plug,
    synthetic_tasks,
    train_plug,
)
from personalign.errors import PersonalignError, ValidationError
from personalign.functional.plug import plug_attention, rescale_to_norm


class FakeEncoder:
    """Deterministic unit vectors from a hash of the text (no model)."""

    name = "fake-encoder"
    dim = 16

    def encode(self, texts):
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


@pytest.fixture(scope="module")
def fake_encoder():
    return FakeEncoder()


@pytest.fixture(scope="module")
def plug(tiny_generator, fake_encoder):
    return build_plug(tiny_generator, fake_encoder, hidden=24, seed=0)


TASKS = [
    PlugTask(
        ("I love cats.", "Cats are the best pets."),
        "How do I boil an egg?",
        "Put the egg in boiling water for nine minutes.",
    ),
    PlugTask(
        ("I am vegetarian.",), "Plan my dinner for tonight please.", "I am vegetarian and I cook for two."
    ),
    PlugTask(
        ("Short answers please.",), "Why is the sky blue?", "Air scatters blue light more than red light."
    ),
    PlugTask(
        ("I like lists.", "Numbered steps help me."),
        "How do I boil an egg?",
        "1. First step. 2. Second step.",
    ),
    PlugTask(
        ("The quick brown fox.",), "Why is the sky blue?", "The quick brown fox jumps over the lazy dog."
    ),
    PlugTask(
        ("Question Preferred Response",),
        "Plan my dinner for tonight please.",
        "Given the examples above, generate",
    ),
]


# --- golden values -----------------------------------------------------------------------------


def _identity_plug(embed_norm: float = 5.0) -> PersonaPlug:
    """d_enc = model_dim = hidden = 2; both MLP layers identity with zero bias, so MLP(h) = GELU(h)."""
    config = PlugConfig(encoder_dim=2, model_dim=2, base_model="m", encoder="e", embed_norm=embed_norm)
    plug = PersonaPlug(config)
    with torch.no_grad():
        for layer in (plug.project[0], plug.project[2]):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return plug


def test_attention_pooling_and_scale_golden():
    """Items h1 = (1, 0), h2 = (0, 1), query q = (ln 3, 0); W_q = I at init.

    Dot products (ln 3, 0), so a = softmax = (3/4, 1/4). MLP(h) = GELU(h): g = GELU(1) on one
    axis, GELU(0) = 0 on the other, so P = g (3/4, 1/4), and P_u = 5 (3, 1) / sqrt(10) whatever g
    is. A third, masked item with a huge dot product gets weight exactly 0 and changes nothing.
    """
    plug = _identity_plug()
    assert plug.config.hidden == 2  # defaults to model_dim
    items = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    query = torch.tensor([[math.log(3.0), 0.0]])
    assert_close(plug.attention(items, mask, query), torch.tensor([[0.75, 0.25, 0.0]]))
    out = plug(items, mask, query)
    assert_close(out, 5.0 * torch.tensor([[3.0, 1.0]]) / math.sqrt(10.0))
    assert_close(out.norm(dim=-1), torch.tensor([5.0]))
    assert_close(plug(items[:, :2], mask[:, :2], query), out)  # padding is inert


def test_functional_golden():
    """Pure functions: masked softmax of dot products; rescale (3, 4) to norm 10 is (6, 8); 0 stays 0."""
    w = plug_attention(
        torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]),
        torch.tensor([[True, True]]),
        torch.tensor([[math.log(4.0), 7.0]]),
    )
    assert_close(w, torch.tensor([[0.8, 0.2]]))
    assert_close(
        rescale_to_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 10.0), torch.tensor([[6.0, 8.0], [0.0, 0.0]])
    )


def test_zero_items_is_a_typed_error(plug, fake_encoder):
    items, query = torch.zeros(2, 3, 16), torch.ones(2, 16)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(EmptyHistoryError, match=r"items\[1\]: has no history items"):
        plug(items, mask, query)
    with pytest.raises(EmptyHistoryError) as info:
        embed_user(plug, fake_encoder, [], "Hello?")
    assert isinstance(info.value, ValidationError) and isinstance(info.value, ValueError)
    with pytest.raises(EmptyHistoryError, match=r"tasks\[0\]\.items"):
        train_plug(None, fake_encoder, [((), "prompt", "response")])


def test_embed_user_norm_batching_and_recency(tiny_generator, fake_encoder):
    """Norm = the measured embedding norm; batched equals one at a time; only the last max_items count."""
    plug = build_plug(tiny_generator, fake_encoder, max_items=2, seed=1)
    embed = tiny_generator.model.get_input_embeddings().weight.detach()
    assert plug.config.embed_norm == pytest.approx(float(embed.norm(dim=1).mean()), rel=1e-5)
    assert plug.config.embed_norm == pytest.approx(input_embedding_norm(tiny_generator.model))
    histories = [["a", "b", "c"], ["d"]]
    queries = ["How do I boil an egg?", "Why is the sky blue?"]
    both = embed_users(plug, fake_encoder, histories, queries)
    assert both.shape == (2, plug.config.model_dim)
    assert_close(both.norm(dim=-1), torch.full((2,), plug.config.embed_norm))
    assert_close(both[0], embed_user(plug, fake_encoder, ["b", "c"], queries[0]))
    assert_close(both[1], embed_user(plug, fake_encoder, ["d"], queries[1]))
    assert not torch.allclose(both[0], embed_user(plug, fake_encoder, ["a", "b"], queries[0]))


# --- the soft token in generation ------------------------------------------------------------------


def _left_padded(tokenizer, prompts):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_plug_inputs_none_rows_generate_exactly_as_plain(tiny_generator, plug, fake_encoder):
    model, tok = tiny_generator.model, tiny_generator.tokenizer
    batch = _left_padded(
        tok, ["How do I boil an egg?", "Why is the sky blue? Air scatters blue light.", "Plan my dinner"]
    )
    settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tok.pad_token_id}
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**batch, **settings)[:, width:]
        embeds, mask = plug_inputs(model, batch["input_ids"], batch["attention_mask"], None)
        assert embeds.shape[:2] == (3, width + 1) and mask[:, 0].sum() == 0
        unplugged = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)  # only new tokens
        assert torch.equal(unplugged, plain)
        soft = embed_user(
            plug, fake_encoder, ["I love cats.", "Numbered steps help me."], "Why is the sky blue?"
        )
        embeds, mask = plug_inputs(model, batch["input_ids"], batch["attention_mask"], [None, soft, None])
        mixed = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
        single = model.generate(
            input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], **settings
        )[:, width:]
        embeds1, mask1 = plug_inputs(model, batch["input_ids"][:1], batch["attention_mask"][:1], [None])
        single_embeds = model.generate(inputs_embeds=embeds1, attention_mask=mask1, **settings)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
    assert not torch.equal(mixed[1], plain[1])
    assert torch.equal(single_embeds, single)


def test_plug_input_ids_keep_the_repetition_penalty_exact(tiny_generator, plug, fake_encoder):
    """With ``input_ids=plug_input_ids(...)`` beside the embeddings, processors that read the prompt
    (the repetition penalty) see the same token ids, so rows without a plug still match plain
    ``generate``; the output is then those ids followed by the new tokens."""
    model, tok = tiny_generator.model, tiny_generator.tokenizer
    batch = _left_padded(
        tok, ["How do I boil an egg?", "Why is the sky blue? Air scatters blue light.", "Plan my dinner"]
    )
    settings = {
        "max_new_tokens": 10,
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
        "repetition_penalty": 1.5,
    }
    ids, mask = batch["input_ids"], batch["attention_mask"]
    soft = [None, embed_user(plug, fake_encoder, ["I love cats."], "Why is the sky blue?"), None]
    with torch.no_grad():
        plain = model.generate(**batch, **settings)[:, ids.shape[1] :]
        embeds, plugged_mask = plug_inputs(model, ids, mask, soft)
        plugged_ids = plug_input_ids(ids, mask, soft)
        out = model.generate(
            input_ids=plugged_ids, inputs_embeds=embeds, attention_mask=plugged_mask, **settings
        )
    assert torch.equal(out[:, : ids.shape[1] + 1], plugged_ids)
    new = out[:, ids.shape[1] + 1 :]
    assert torch.equal(new[0], plain[0]) and torch.equal(new[2], plain[2])
    assert not torch.equal(new[1], plain[1])


def test_plug_inputs_layout(tiny_generator):
    """Left padding: ``[pad, P, t1, t2]`` with mask (0, 1, 1, 1); None: ``[0, pad, t1, t2]``, mask (0, 0, 1, 1)."""
    model = tiny_generator.model
    embed = model.get_input_embeddings()
    ids = torch.tensor([[0, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    soft = torch.full((model.config.hidden_size,), 0.5)
    out, out_mask = plug_inputs(model, ids, mask, [soft, None])
    assert out_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    with torch.no_grad():
        tokens = embed(ids[0])
    assert_close(out[0], torch.stack([tokens[0], soft, tokens[1], tokens[2]]))
    assert_close(out[1], torch.cat([torch.zeros(1, soft.shape[0]), tokens]))
    assert plug_input_ids(ids, mask, [soft, None]).tolist() == [[0, 5, 5, 6], [0, 0, 5, 6]]
    with pytest.raises(ValidationError, match="padding inside the prompt"):
        plug_inputs(model, ids, torch.tensor([[1, 0, 1], [0, 1, 1]]), None)
    with pytest.raises(PlugMismatchError):
        plug_inputs(model, ids, mask, torch.zeros(2, 7))


# --- training -------------------------------------------------------------------------------------


FAST = {"learning_rate": 3e-2, "batch_size": 3, "val_fraction": 0.0, "max_length": 48}


def test_training_lowers_the_training_nll(tiny_generator, fake_encoder):
    model = tiny_generator.model
    flags = [p.requires_grad for p in model.parameters()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = PlugTrainConfig(epochs=4, **FAST)
    start = build_plug(tiny_generator, fake_encoder, hidden=32, seed=0)
    before = evaluate_plug(tiny_generator, fake_encoder, TASKS, start, config)
    trained, report = train_plug(tiny_generator, fake_encoder, TASKS, config, plug=start)
    after = evaluate_plug(tiny_generator, fake_encoder, TASKS, trained, config)
    assert after < before - 0.1, (before, after, report.train_nll)
    assert report.train_nll[-1] < report.train_nll[0]
    assert report.epochs_run == 4 and report.n_train == len(TASKS) and report.n_val == 0
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # generator frozen


def test_validation_reports_the_frozen_base(tiny_generator, fake_encoder):
    config = PlugTrainConfig(epochs=1, learning_rate=1e-2, batch_size=4, max_length=48, val_fraction=0.34)
    _, report = train_plug(tiny_generator, fake_encoder, TASKS, config)
    assert (report.n_train, report.n_val) == (4, 2)
    assert len(report.val_nll) == 1 and report.val_nll_base > 0 and report.val_nll_start > 0
    assert report.to_dict()["gain"] == pytest.approx(report.val_nll_base - report.val_nll[0])


def test_resume_equals_an_uninterrupted_run(tiny_generator, fake_encoder, tmp_path):
    straight, full = train_plug(tiny_generator, fake_encoder, TASKS, PlugTrainConfig(epochs=2, **FAST))
    folder = str(tmp_path / "ckpt")
    train_plug(tiny_generator, fake_encoder, TASKS, PlugTrainConfig(epochs=1, checkpoint_dir=folder, **FAST))
    resumed, report = train_plug(
        tiny_generator, fake_encoder, TASKS, PlugTrainConfig(epochs=2, checkpoint_dir=folder, **FAST)
    )
    assert (report.resumed_from, report.epochs_run) == (1, 2)
    assert report.train_nll == pytest.approx(full.train_nll)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert_close(a, b, msg=name)
    with pytest.raises(ValidationError, match="checkpoint_dir"):
        train_plug(
            tiny_generator, fake_encoder, TASKS[:5], PlugTrainConfig(epochs=3, checkpoint_dir=folder, **FAST)
        )


def test_synthetic_tasks():
    from personalign.eval.populations import SyntheticConfig, SyntheticPopulation

    population = SyntheticPopulation(
        SyntheticConfig(n_users=5, n_prompts=6, candidates_per_prompt=4)
    ).population(shots=3, held_out=4)
    tasks = synthetic_tasks(population, users=4, n_per_user=2, seed=0)
    assert len(tasks) == 8 and tasks == synthetic_tasks(population, users=4, n_per_user=2, seed=0)
    first = population.users[0]
    assert tasks[0].items == tuple(c.chosen for c in first.shots)
    assert (tasks[0].prompt, tasks[0].response) in {(c.prompt_text, c.chosen) for c in first.held_out}
    assert len(synthetic_tasks(population, users=[population.users[2].user])) == 1
    with pytest.raises(ValidationError, match="users"):
        synthetic_tasks(population, users=["nobody"])


# --- the artefact ---------------------------------------------------------------------------------


def _dims(generator, encoder):
    return {
        "model_id": generator.model_id,
        "encoder_name": encoder.name,
        "model_dim": generator.model.config.hidden_size,
        "encoder_dim": encoder.dim,
    }


def test_save_load_round_trip(tiny_generator, plug, fake_encoder, tmp_path):
    save_plug(plug, tmp_path / "plug", provenance={"tasks": 6})
    loaded = load_plug(tmp_path / "plug", **_dims(tiny_generator, fake_encoder))
    assert loaded.config == plug.config and not loaded.training
    for (name, a), b in zip(plug.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    args = (fake_encoder, ["I love cats."], "How do I boil an egg?")
    assert torch.equal(embed_user(plug, *args), embed_user(loaded, *args))
    stamped = json.loads((tmp_path / "plug" / CONFIG_FILE).read_text())
    assert (
        stamped["config"]["base_model"] == tiny_generator.model_id
        and stamped["package_version"]
        and stamped["provenance"] == {"tasks": 6}
    )
    assert set(os.listdir(tmp_path / "plug")) == {CONFIG_FILE, WEIGHTS_FILE}


def test_load_refuses_another_generator_or_encoder(tiny_generator, plug, fake_encoder, tmp_path):
    save_plug(plug, tmp_path)
    right = _dims(tiny_generator, fake_encoder)
    with pytest.raises(
        PlugMismatchError,
        match=r"trained for base model .* this generator is 'other/model'.*personalign train pplug --model other/model",
    ):
        load_plug(tmp_path, **{**right, "model_id": "other/model"})
    for key, value in [("encoder_name", "other-encoder"), ("model_dim", 64), ("encoder_dim", 384)]:
        with pytest.raises(PlugMismatchError, match=key.replace("_name", "")) as info:
            load_plug(tmp_path, **{**right, key: value})
        assert isinstance(info.value, PersonalignError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["truncate", "flip", "config", "missing"])
def test_damaged_files_are_typed_errors(plug, tmp_path, damage):
    save_plug(plug, tmp_path)
    weights, config = tmp_path / WEIGHTS_FILE, tmp_path / CONFIG_FILE
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    elif damage == "config":
        config.write_text("{not json")
    else:
        weights.unlink()
    with pytest.raises(PlugFileError):
        load_plug(tmp_path)


def test_failed_save_leaves_the_previous_projector(tiny_generator, plug, fake_encoder, tmp_path, monkeypatch):
    save_plug(plug, tmp_path)
    other = build_plug(tiny_generator, fake_encoder, hidden=24, seed=7)
    with torch.no_grad():
        other.project[0].weight[0, 0] = float("nan")
    with pytest.raises(PlugError, match="NaN"):
        save_plug(other, tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_plug(build_plug(tiny_generator, fake_encoder, hidden=24, seed=8), tmp_path)
    monkeypatch.undo()
    assert set(os.listdir(tmp_path)) == {CONFIG_FILE, WEIGHTS_FILE}  # no temp files left
    loaded = load_plug(tmp_path)
    for a, b in zip(plug.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
