"""Steering through ``Personalizer`` on a tiny model: trained VAS and MODPO artefacts in a
temporary steering folder, the zero-steering contract, mixed batches, errors, the harness."""

from __future__ import annotations

import json
import math

import pytest

from personalign.errors import ValidationError
from personalign.steering.methods import REGISTRY

ASK = [{"role": "user", "content": "Question one"}]


@pytest.fixture(scope="module")
def steering_root(tmp_path_factory, tiny_model_dir):
    """VAS heads (trunk and GRU) and MODPO adapters for the tiny model, trained on its samples."""
    from personalign.models import load_generator
    from personalign.steering.recipes import train_dpa_recipe, train_modpo_recipe, train_vas_recipe
    from personalign.training.samples import sample_responses

    root = tmp_path_factory.mktemp("steering")
    generator = load_generator(str(tiny_model_dir), device="cpu")
    samples = sample_responses(
        generator,
        ["Question one", "Task two", "Preferred", "Given the examples"],
        n_per_prompt=4,
        max_new_tokens=12,
        batch_size=16,
    )
    train_vas_recipe(
        generator, root, ["verbosity", "reading_level"], samples=samples, epochs=2, progress=False
    )
    train_modpo_recipe(
        generator,
        root,
        ["verbosity", "reading_level"],
        samples=samples,
        epochs=1,
        max_pairs=8,
        min_gap=0.0,
        progress=False,
    )
    report = train_dpa_recipe(
        generator,
        root,
        ["verbosity", "reading_level"],
        iterations=2,
        samples_per_prompt=2,
        max_new_tokens=8,
        epochs=1,
        prompts=["Question one", "Task two"],
    )
    assert [r["iteration"] for r in report["iterations"]] == [1, 2] and all(
        r["front"] for r in report["iterations"]
    )
    return root


def test_retrained_artefacts_name_the_real_base_and_no_machine_path(tiny_model_dir, tmp_path, monkeypatch):
    """What the recipes write (adapters, recorded configs, reports) names the base by its real id
    and folders relative to ``out``, so retraining the shipped steering data brings back no path."""
    from personalign import models
    from personalign.steering.recipes import (
        train_dpa_recipe,
        train_modpo_recipe,
        train_vas_recipe,
        write_report,
    )
    from personalign.training.samples import sample_responses

    monkeypatch.setitem(models.BASE_ALIASES, "embedded:tiny", "personalign-tests/tiny-llama")
    generator = models.load_generator(str(tiny_model_dir), device="cpu")
    generator.model_id = "embedded:tiny"  # loaded from a local folder, like the embedded model
    out = tmp_path / "steering"
    samples = sample_responses(
        generator, ["Question one", "Task two"], n_per_prompt=4, max_new_tokens=8, batch_size=8
    )
    vas = train_vas_recipe(
        generator, out, ["verbosity"], kinds=("trunk",), samples=samples, epochs=1, progress=False
    )
    modpo = train_modpo_recipe(
        generator,
        out,
        ["verbosity", "reading_level"],
        samples=samples,
        epochs=1,
        max_pairs=4,
        min_gap=0.0,
        progress=False,
    )
    dpa = train_dpa_recipe(
        generator,
        out,
        ["verbosity", "reading_level"],
        iterations=1,
        samples_per_prompt=2,
        max_new_tokens=8,
        epochs=1,
        prompts=["Question one"],
    )
    for name, report in (("vas", vas), ("modpo", modpo), ("dpa", dpa)):
        write_report(out, name, report)
    assert (
        vas["trunk/verbosity"]["folder"] == "vas/verbosity"
        and modpo["verbosity"]["folder"] == "mix/verbosity"
        and dpa["folder"] == "dpa"
    )
    configs = sorted(out.rglob("adapter_config.json"))
    assert [c.parent.relative_to(out).as_posix() for c in configs] == [
        "dpa",
        "mix/reading_level",
        "mix/verbosity",
    ]
    for path in configs:
        assert json.loads(path.read_text())["base_model_name_or_path"] == "personalign-tests/tiny-llama"
    mix_config = json.loads((out / "mix" / "verbosity" / "mix_config.json").read_text())
    assert (
        mix_config["base_model"] == "embedded:tiny"
        and mix_config["config"]["loop"]["checkpoint_dir"] == "mix/verbosity.ckpt"
    )
    written = [p for p in out.rglob("*.json") if not p.name.startswith("loop_state")]
    leaks = [
        p.relative_to(out).as_posix()
        for p in written
        if str(tmp_path) in p.read_text() or str(tiny_model_dir) in p.read_text()
    ]
    assert leaks == []


@pytest.fixture()
def spz(tiny_model_dir, encoder, tmp_path, steering_root, monkeypatch):
    from personalign.models import load_generator
    from personalign.personalizer import Personalizer

    monkeypatch.setenv("PERSONALIGN_STEERING_DIR", str(steering_root))
    with Personalizer(
        load_generator(str(tiny_model_dir), device="cpu"), encoder, store=tmp_path / "store"
    ) as pz:
        yield pz


def _reply(pz, steer, **options):
    return pz.respond(None, ASK, steer=steer, max_new_tokens=8, memory=False, shots=False, **options)


def test_installed_artefacts_are_found_for_their_model_only(spz, steering_root):
    from personalign.steering.methods import steerable_by_method

    mine = steerable_by_method(spz.generator.model_id)
    assert mine["vas"] == mine["vas-model"] == mine["mix"] == ("reading_level", "verbosity")
    assert mine["dpa"] == ("verbosity", "reading_level")
    other = steerable_by_method("someone/else")
    assert other["vas"] == () and other["mix"] == ()


@pytest.mark.parametrize("method", list(REGISTRY))
def test_zero_weights_reproduce_plain_decoding(spz, method):
    plain = _reply(spz, {})
    zero = _reply(spz, {"weights": {"verbosity": 0.0}, "method": method})
    assert zero.text == plain.text and zero.completion_tokens == plain.completion_tokens


@pytest.mark.parametrize("method", [name for name, m in REGISTRY.items() if m.trains_with])
def test_trained_methods_run_and_sample_reproducibly(spz, method):
    steer = {"weights": {"verbosity": -2.0, "reading_level": 1.0}, "method": method}
    first = _reply(spz, steer, temperature=0.9, seed=5)
    again = _reply(spz, steer, temperature=0.9, seed=5)
    assert first.text == again.text
    assert first.steer == {"verbosity": -2.0, "reading_level": 1.0}


def test_mixed_methods_batch_equals_single_runs(spz):
    """One batch with plain, vas, mix and logit requests (mix adds rows): each equals its own run."""
    steers = [
        {},
        {"weights": {"verbosity": 3.0}, "method": "vas"},
        {"weights": {"verbosity": 1.0, "reading_level": -1.0}, "method": "mix"},
        {"weights": {"verbosity": -1.0}, "method": "logit"},
        {"direction": {"verbosity": 1.0, "reading_level": 1.0}, "method": "dpa"},
        {"weights": {"verbosity": -1.0, "reading_level": 0.5}, "method": "weight-mix"},
    ]
    asks = [
        [{"role": "user", "content": q}]
        for q in ("Question one", "Task two", "Preferred", "Given the examples", "Question", "Task")
    ]
    requests = [
        {"user": None, "messages": a, "steer": s, "max_new_tokens": 8, "memory": False, "shots": False}
        for a, s in zip(asks, steers, strict=True)
    ]
    batch = spz.respond_batch(requests)
    for request, result in zip(requests, batch, strict=True):
        single = spz.respond(
            None, request["messages"], steer=request["steer"], max_new_tokens=8, memory=False, shots=False
        )
        assert result.text == single.text, request["steer"]


@pytest.mark.parametrize(
    "weights",
    [{"verbosity": 1.5, "reading_level": -0.5}, {"verbosity": 0.8}, {"verbosity": 2.0, "reading_level": 1.0}],
)
def test_mixing_before_the_head_decodes_as_mixing_logits(spz, monkeypatch, weights):
    """The default (mix the hidden states, one head row per request, no row whose coefficient
    is 0: here the base row for weights summing to 1) gives the same tokens as mixing every
    row's log-probabilities, alone and in a batch next to a plain request."""
    import personalign.steering.runtime as runtime

    assert runtime.head_mixable(spz.generator.model)
    steer = {"weights": weights, "method": "mix"}
    requests = [
        {"user": None, "messages": ASK, "steer": s, "max_new_tokens": 12, "memory": False, "shots": False}
        for s in ({}, steer)
    ]

    def run() -> list[str]:
        alone = spz.respond(None, ASK, steer=steer, max_new_tokens=12, memory=False, shots=False)
        return [alone.text, *(r.text for r in spz.respond_batch(requests))]

    premixed = run()
    monkeypatch.setattr(runtime, "head_mixable", lambda model: False)
    logits = run()
    assert premixed == logits
    assert premixed[0] == premixed[2]  # alone or next to a plain request


def test_weight_mix_adapter_is_the_weighted_sum_of_the_objective_updates(spz):
    """Golden: every LoRA layer's update of the built adapter is sum_k w_k dW_k (negative
    weights included), and weight 1 on one objective decodes as that objective's adapter
    (which is also what ``mix`` runs at weight 1)."""
    import torch
    from peft.tuners.lora.layer import LoraLayer

    runtime = spz.steering
    weights = {"verbosity": -0.7, "reading_level": 1.3}
    name = runtime.weight_mix_adapter(weights)
    assert runtime.weight_mix_adapter(dict(reversed(weights.items()))) == name  # one adapter per direction
    parts = {runtime.mix_adapter(k): w for k, w in weights.items()}
    layers = [m for m in spz.generator.model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    assert layers
    for layer in layers:
        expected = sum(w * layer.get_delta_weight(k) for k, w in parts.items() if k in layer.lora_A)
        torch.testing.assert_close(layer.get_delta_weight(name), expected, rtol=1e-5, atol=1e-6)
    one = _reply(spz, {"weights": {"verbosity": 1.0}, "method": "weight-mix"})
    mixed = _reply(spz, {"weights": {"verbosity": 1.0}, "method": "mix"})
    assert one.text == mixed.text


def test_weight_mix_adapters_are_bounded_and_a_batch_keeps_its_own(spz, monkeypatch):
    import personalign.steering.runtime as runtime_mod

    runtime = spz.steering
    monkeypatch.setattr(runtime_mod, "WEIGHT_MIX_RESIDENT", 2)
    steers = [{"weights": {"verbosity": w}, "method": "weight-mix"} for w in (0.2, 0.4, 0.6, 0.8)]
    requests = [
        {"user": None, "messages": ASK, "steer": s, "max_new_tokens": 8, "memory": False, "shots": False}
        for s in steers
    ]
    batch = spz.respond_batch(requests)  # four directions in one batch: none evicted while planned
    singles = [_reply(spz, s) for s in steers]
    assert [r.text for r in batch] == [r.text for r in singles]
    built = [n for n in spz.generator.model.peft_config if n.startswith("weightmix_")]
    assert len(built) <= 2 and len(runtime._weight_mixes) <= 2


def test_mix_composes_with_a_users_adapter(spz):
    from personalign.adapters.lora import LoraTrainConfig
    from personalign.types import Comparison

    pairs = [Comparison(prompt="Question one", chosen="Task", rejected="Preferred Response Dispreferred")] * 4
    spz.enroll(
        "ana", pairs, adapter=True, adapter_config=LoraTrainConfig(epochs=1, rank=2, holdout_fraction=0.0)
    )
    own = spz.respond("ana", ASK, steer={}, max_new_tokens=8, memory=False, shots=False)
    zero = spz.respond(
        "ana",
        ASK,
        steer={"weights": {"verbosity": 0.0}, "method": "mix"},
        max_new_tokens=8,
        memory=False,
        shots=False,
    )
    assert own.text == zero.text
    mix = {"weights": {"verbosity": 1.0}, "method": "mix"}
    mixed = spz.respond("ana", ASK, steer=mix, max_new_tokens=8, memory=False, shots=False)
    assert mixed.steer == {"verbosity": 1.0} and mixed.completion_tokens > 0
    # Composition: her request's rows are [her adapter, the plain base, the verbosity adapter], so the
    # mix acts on top of her adapter; a generic request mixes the plain base.
    from personalign.adapters.store import BASE

    hers = spz.engine.plan(
        [spz.engine.prepare("ana", ASK, mix, {"max_new_tokens": 8, "memory": False, "shots": False})]
    )
    generic = spz.engine.plan(
        [spz.engine.prepare(None, ASK, mix, {"max_new_tokens": 8, "memory": False, "shots": False})]
    )
    assert hers.names is not None and generic.names is not None
    assert hers.names[0].startswith("slot_") and hers.names[1:] == [
        BASE,
        "steer_verbosity",
    ]  # her adapter's slot first
    assert generic.names == ["steer_verbosity"]  # weights summing to 1: no base row (its coefficient is 0)


def test_stream_with_mix_rows_matches_respond(spz):
    steer = {"weights": {"verbosity": 1.0}, "method": "mix"}
    streamed = "".join(spz.stream(None, ASK, steer=steer, max_new_tokens=8, memory=False, shots=False))
    assert streamed.strip() == _reply(spz, steer).text


def test_method_without_artefact_for_this_model_is_refused(spz, monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONALIGN_STEERING_DIR", str(tmp_path / "empty"))
    with pytest.raises(ValidationError) as err:
        _reply(spz, {"weights": {"verbosity": 1.0}, "method": "vas"})
    assert err.value.field.startswith("steer")


def test_prompt_method_adds_the_instruction(spz):
    from personalign.steering.prompting import instruction, phrase
    from personalign.steering.runtime import steer_system

    assert phrase("verbosity", -1.0) == "Answer in one short sentence." and phrase("verbosity", 0.0) == ""
    assert phrase("verbosity", 0.34) == "Give a fairly detailed answer."
    messages = steer_system([{"role": "system", "content": "Be kind."}, *ASK], {"verbosity": -1.0})
    assert messages[0]["content"] == "Be kind.\n\n" + instruction({"verbosity": -1.0}) and messages[1:] == ASK
    plain = spz.engine.prepare(None, ASK, {}, {"memory": False, "shots": False})
    prompted = spz.engine.prepare(
        None, ASK, {"weights": {"verbosity": -1.0}, "method": "prompt"}, {"memory": False, "shots": False}
    )
    assert len(prompted.input_ids) > len(plain.input_ids) and prompted.steer_method == "prompt"


def test_eval_steer_harness_on_tiny_model(spz, tmp_path):
    from personalign.eval.steer import (
        SteerEvalConfig,
        dominates,
        format_steer,
        merge_steer,
        pareto_front,
        plot_steer,
        run_steer_eval,
        spearman,
    )

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, abs=1e-6)  # ties get average ranks
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert pareto_front([(0, 0), (1, 2), (2, 1), (1, 1)]) == [1, 2]
    assert dominates([(1, 2), (2, 1)], [(1, 1), (0.5, 2)]) and not dominates([(1, 2)], [(2, 0)])
    config = SteerEvalConfig(
        objectives=["-verbosity", "reading_level"],
        methods=["prompt", "logit", "vas", "mix"],
        sweep=3,
        directions=2,
        prompts=2,
        max_new_tokens=8,
    )
    result = run_steer_eval(config, spz)
    assert set(result["sweep"]) == {"prompt", "logit", "vas", "mix"}
    assert set(result["front"]) == {"prompt", "vas", "mix"}  # logit steers verbosity only
    assert all(len(s["means"]) == 3 for s in result["sweep"].values())
    assert "dominates_prompt" in result["front"]["vas"]
    assert "| vas |" in format_steer(result)
    assert plot_steer(result, tmp_path / "steer.png").stat().st_size > 1000
    other = run_steer_eval(config.model_copy(update={"methods": ["vas-model"]}), spz)
    merged = merge_steer([result, other])
    assert (
        set(merged["sweep"]) == {"prompt", "logit", "vas", "mix", "vas-model"}
        and "dominates_prompt" in merged["front"]["vas-model"]
    )
    assert merged["unsteered"] == result["unsteered"]  # same settings: the same unsteered answers
    with pytest.raises(ValidationError, match="twice"):
        merge_steer([result, result])
    two_seeds = run_steer_eval(
        config.model_copy(update={"methods": ["logit"], "seeds": 2, "front": False}), spz
    )
    assert (
        len(two_seeds["sweep"]["logit"]["points"]) == 3
        and "reading_level" in two_seeds["sweep"]["logit"]["max_drift_interval"]
    )
    low_point = two_seeds["sweep"]["logit"]["points"][0]
    estimate, low, high = low_point["drift"]["reading_level"]
    assert low <= estimate <= high
    with pytest.raises(ValidationError, match="seeds"):
        merge_steer([result, two_seeds])


def test_paired_drift_golden():
    from personalign.eval.steer import paired_drift

    # differences 1, 1, 4: mean 2, sd sqrt(3), half-width 1.96 * sqrt(3) / sqrt(3) = 1.96; base mean 10
    estimate, low, high = paired_drift([11.0, 21.0, 4.0], [10.0, 20.0, 0.0])
    assert estimate == pytest.approx(0.2) and low == pytest.approx(0.004) and high == pytest.approx(0.396)
    assert paired_drift([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0, 0.0)
    assert (
        paired_drift([0.0, 0.0], [0.0, 0.0])[0] == 0.0 and paired_drift([1.0, 1.0], [0.0, 0.0])[0] == math.inf
    )
    with pytest.raises(ValidationError, match="pair every"):
        paired_drift([1.0], [1.0, 2.0])


def test_bench_steer_on_tiny_model(spz, monkeypatch):
    from personalign.bench import steer as bench
    from personalign.packed_linear import PackedLinear

    monkeypatch.setitem(
        bench.CASES,
        "mix, 2 objective adapters",
        {"weights": {"verbosity": 0.5, "reading_level": 0.5}, "method": "mix"},
    )
    monkeypatch.setitem(
        bench.CASES,
        "mix, 2 adapters + base",
        {"weights": {"verbosity": 0.5, "reading_level": 0.25}, "method": "mix"},
    )
    monkeypatch.setitem(
        bench.CASES,
        "weight-mix, 2 adapters",
        {"weights": {"verbosity": 0.5, "reading_level": 0.25}, "method": "weight-mix"},
    )
    packed_before = [m for m in spz.generator.model.modules() if isinstance(m, PackedLinear)]
    result = bench.run_steer_bench(spz, max_new_tokens=4, repeats=1, batch=2, stock_too=True)
    assert set(result["settings"]) == {"batch 1", "batch 2", "batch 1, stock linear", "batch 2, stock linear"}
    assert result["packed_linear"] and packed_before == [
        m for m in spz.generator.model.modules() if isinstance(m, PackedLinear)
    ]  # the same layers packed again
    for cases in result["settings"].values():
        assert cases["plain generate"]["ratio_to_plain"] == 1.0
        assert all(c["tokens_per_second"] > 0 for c in cases.values())
    assert "VAS, trunk head" in bench.format_steer_bench(result)


@pytest.mark.parametrize("method", [name for name, m in REGISTRY.items() if m.acts_on_logits])
def test_min_new_tokens_holds_under_steering(spz, method):
    """min_new_tokens bans end-of-turn (-inf); steering must keep it banned (mixing once made it nan)."""
    reply = _reply(spz, {"weights": {"verbosity": -3.0}, "method": method}, min_new_tokens=8)
    assert reply.completion_tokens == 8
