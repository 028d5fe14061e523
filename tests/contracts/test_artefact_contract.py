"""The contract every saved artefact keeps (parametrised over ``ARTEFACTS``): saved and loaded it
behaves the same; a truncated weights file or a missing config is a typed personalign error that
says how to fix it (never a raw exception); one made for another generator is refused; and saving
leaves no temporary files behind. A new artefact kind is one row here."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from personalign.errors import PersonalignError


@dataclass(frozen=True)
class Kind:
    build: Callable[[Any], Any]  # ctx -> artefact
    save: Callable[[Any, Path], Any]
    load: Callable[[Path, Any], Any]  # (folder, ctx) -> artefact
    tensors: Callable[[Any], dict[str, torch.Tensor]]
    weights: str
    config: str
    base_field: str | None  # the config field naming the generator it was made for


def _embedder(ctx):
    return ctx["fitted"]["pal"]


def _value_model(ctx):
    from personalign.adapters.value import ValueConfig, build_value_model

    gen = ctx["generator"]
    emb = gen.model.get_output_embeddings().weight
    config = ValueConfig(
        objective="verbosity", base_model=gen.model_id, embed_dim=emb.shape[1], vocab_size=emb.shape[0]
    )
    torch.manual_seed(0)
    return build_value_model(config, gen.model)


def _plug(ctx):
    from personalign.conditioning.pplug import build_plug

    return build_plug(ctx["generator"], ctx["encoder"], hidden=16)


def _load_embedder(folder, ctx):
    from personalign.preference import load_embedder

    return load_embedder(folder, ctx["encoder"])


def _load_value_model(folder, ctx):
    from personalign.adapters.value import load_value_model

    return load_value_model(folder, ctx["generator"])


def _load_plug(folder, ctx):
    from personalign.conditioning.pplug import load_plug

    gen = ctx["generator"]
    return load_plug(folder, model_id=gen.model_id)


def _save_embedder(artefact, folder):
    from personalign.preference import save_embedder

    return save_embedder(artefact, folder)


def _save_value_model(artefact, folder):
    from personalign.adapters.value import save_value_model

    return save_value_model(artefact, folder)


def _save_plug(artefact, folder):
    from personalign.conditioning.pplug import save_plug

    return save_plug(artefact, folder)


ARTEFACTS = {
    "embedder (pal)": Kind(
        _embedder,
        _save_embedder,
        _load_embedder,
        lambda a: a.model.state_dict(),
        "pal.safetensors",
        "pal_config.json",
        None,
    ),
    "value model (vas)": Kind(
        _value_model,
        _save_value_model,
        _load_value_model,
        lambda a: a.state_dict(),
        "value.safetensors",
        "value_config.json",
        "base_model",
    ),
    "persona-plug projector": Kind(
        _plug, _save_plug, _load_plug, lambda a: a.state_dict(), "plug.safetensors", "plug_config.json", None
    ),
}


@pytest.fixture()
def ctx(tiny_generator, encoder, fitted):
    return {"generator": tiny_generator, "encoder": encoder, "fitted": fitted}


@pytest.mark.parametrize("name", list(ARTEFACTS))
def test_round_trip_is_bit_equal_and_atomic(name, ctx, tmp_path):
    kind = ARTEFACTS[name]
    artefact = kind.build(ctx)
    kind.save(artefact, tmp_path / "a")
    assert (
        sorted(
            p.name for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")
        )
        == []
    )
    loaded = kind.load(tmp_path / "a", ctx)
    before, after = kind.tensors(artefact), kind.tensors(loaded)
    assert before.keys() == after.keys() and all(
        torch.equal(before[k].cpu().float(), after[k].cpu().float()) for k in before
    )


@pytest.mark.parametrize("name", list(ARTEFACTS))
@pytest.mark.parametrize("damage", ["truncated weights", "missing config", "garbled config"])
def test_damaged_folders_are_typed_errors(name, damage, ctx, tmp_path):
    kind = ARTEFACTS[name]
    folder = kind.save(kind.build(ctx), tmp_path / "a") or tmp_path / "a"
    if damage == "truncated weights":
        weights = tmp_path / "a" / kind.weights
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "missing config":
        (tmp_path / "a" / kind.config).unlink()
    else:
        (tmp_path / "a" / kind.config).write_text('{"half a json')
    with pytest.raises(PersonalignError) as err:
        kind.load(Path(folder), ctx)
    assert "Fix" in str(err.value) or getattr(err.value, "fix", None), str(err.value)


@pytest.mark.parametrize("name", [n for n, k in ARTEFACTS.items() if k.base_field])
def test_an_artefact_for_another_generator_is_refused(name, ctx, tmp_path):
    kind = ARTEFACTS[name]
    kind.save(kind.build(ctx), tmp_path / "a")
    config_path = tmp_path / "a" / kind.config
    config = json.loads(config_path.read_text())
    config[kind.base_field] = "someone/another-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(PersonalignError, match="another-model"):
        kind.load(tmp_path / "a", ctx)
