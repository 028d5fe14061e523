"""The LoRA bank: exact weighted sums of basis deltas, fitting a user's K weights, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from personalign.adapters.bank import LoraBank
from personalign.adapters.lora import LoraTrainConfig
from personalign.adapters.store import AdapterError
from personalign.errors import ValidationError
from personalign.models import load_generator
from personalign.personalizer import Personalizer
from personalign.types import Comparison

SHORT = [
    Comparison(
        prompt=f"Question number {i} about eggs?",
        chosen="Nine minutes.",
        rejected="It depends on many long and winding things.",
    )
    for i in range(6)
]
LONG = [Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen) for c in SHORT]
FAST = LoraTrainConfig(
    epochs=6, rank=4, alpha=8, learning_rate=5e-3, seed=0, target_modules=["q_proj", "v_proj"]
)


@pytest.fixture(scope="module")
def trained_bank_dir(tiny_model_dir, tmp_path_factory):
    """Two bases trained in opposite directions (short answers vs long answers)."""
    out = tmp_path_factory.mktemp("bank") / "bank"
    LoraBank.train(
        load_generator(str(tiny_model_dir), device="cpu"), {"short": SHORT[:4], "long": LONG[:4]}, out, FAST
    )
    return out


@pytest.fixture()
def random_bank(tiny_model_dir, tmp_path):
    """Three bases with random A and B (different ranks and targets) saved by PEFT."""
    folders = []
    for i, (rank, targets) in enumerate(
        ((2, ["q_proj", "v_proj"]), (4, ["v_proj", "o_proj"]), (3, ["q_proj"]))
    ):
        model = load_generator(str(tiny_model_dir), device="cpu").model
        torch.manual_seed(i)
        peft = get_peft_model(
            model,
            LoraConfig(r=rank, lora_alpha=2 * rank + i, target_modules=targets, init_lora_weights=False),
        )
        peft.save_pretrained(str(tmp_path / f"b{i}"))
        folders.append(tmp_path / f"b{i}")
    generator = load_generator(str(tiny_model_dir), device="cpu")
    return LoraBank.from_folders(generator, folders), folders


def _merged(tiny_model_dir, folder):
    """PEFT's own merge of one adapter folder: the full weight matrices after merge_and_unload."""
    model = load_generator(str(tiny_model_dir), device="cpu").model
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return {n: p.detach().clone() for n, p in merged.named_parameters()}


def test_combined_adapter_is_the_exact_weighted_sum_of_peft_merged_deltas(
    random_bank, tiny_model_dir, tmp_path
):
    bank, folders = random_bank
    w = [0.7, -1.3, 2.0]
    base = {
        n: p.detach().clone()
        for n, p in load_generator(str(tiny_model_dir), device="cpu").model.named_parameters()
    }
    merged = [_merged(tiny_model_dir, f) for f in folders]
    combined = _merged(tiny_model_dir, bank.write_adapter(w, tmp_path / "combined"))
    changed = 0
    for name, weight in base.items():
        expected = weight + sum(wk * (m[name] - weight) for wk, m in zip(w, merged, strict=True))
        torch.testing.assert_close(combined[name], expected, rtol=1e-5, atol=1e-5)
        changed += int(not torch.equal(combined[name], weight))
    assert changed == 3 * 2  # q, v, o projections of both layers
    module = bank.modules[0]
    manual = sum(
        wk * (m[module + ".weight"] - base[module + ".weight"]) for wk, m in zip(w, merged, strict=True)
    )
    torch.testing.assert_close(bank.delta(w, module), manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w", [[0.7, -1.3, 2.0], [1.0, 0.0, 0.0], [-0.5, -0.5, 3.0]])
def test_peft_cat_computes_the_same_sum_as_the_hand_stacked_lora(random_bank, w):
    """PEFT's ``add_weighted_adapter(combination_type="cat")`` scales A by ``w_k s_k``, the hand
    stacking scales B: per module both give ``sum_k w_k s_k B_k A_k`` at rank ``sum r_k`` (2 + 4 + 3)."""
    bank, _ = random_bank
    rank, peft_tensors = bank.peft_cat_tensors(w)
    hand_rank, hand_tensors = bank.lora_tensors(w)
    assert rank == hand_rank == 9 and peft_tensors.keys() == hand_tensors.keys()
    generator_weights = {n: p.detach().clone() for n, p in bank.generator.model.named_parameters()}
    for module in bank.modules:
        a, b = (f"base_model.model.{module}.lora_{x}.weight" for x in "AB")
        assert (
            peft_tensors[a].shape == hand_tensors[a].shape and peft_tensors[b].shape == hand_tensors[b].shape
        )
        expected = bank.delta(w, module)  # (out, in), term by term
        torch.testing.assert_close(peft_tensors[b] @ peft_tensors[a], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hand_tensors[b] @ hand_tensors[a], expected, rtol=1e-5, atol=1e-6)
    assert all(
        torch.equal(p, generator_weights[n]) for n, p in bank.generator.model.named_parameters()
    )  # untouched


def test_one_basis_is_combined_without_peft_square_roots(random_bank, tiny_model_dir):
    """With one adapter PEFT uses its ``linear`` rule (sqrt of the weight): a negative weight still works."""
    _, folders = random_bank
    bank = LoraBank.from_folders(load_generator(str(tiny_model_dir), device="cpu"), folders[:1])
    rank, tensors = bank.peft_cat_tensors([-2.0])
    module = bank.modules[0]
    delta = (
        tensors[f"base_model.model.{module}.lora_B.weight"]
        @ tensors[f"base_model.model.{module}.lora_A.weight"]
    )
    torch.testing.assert_close(delta, bank.delta([-2.0], module), rtol=1e-5, atol=1e-6)


def test_averaging_a_and_b_separately_is_not_the_weighted_delta(random_bank):
    bank, _ = random_bank
    module = next(m for m in bank.modules if all(m in b.a for b in bank.bases[:2]))
    b0, b1 = bank.bases[:2]
    if b0.rank != b1.rank:  # separate averaging needs equal ranks: compare on the common rank slice
        r = min(b0.rank, b1.rank)
        a0, a1, bb0, bb1 = b0.a[module][:r], b1.a[module][:r], b0.b[module][:, :r], b1.b[module][:, :r]
    else:
        a0, a1, bb0, bb1 = b0.a[module], b1.a[module], b0.b[module], b1.b[module]
    separate = (0.5 * bb0 + 0.5 * bb1) @ (0.5 * a0 + 0.5 * a1)
    exact = 0.5 * bb0 @ a0 + 0.5 * bb1 @ a1
    assert (separate - exact).abs().max() > 1e-3  # the cross terms B_0 A_1 and B_1 A_0


def test_applied_forward_equals_peft_loading_the_combined_adapter(random_bank, tiny_model_dir, tmp_path):
    bank, _ = random_bank
    w = [1.5, 0.25, -0.5]
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    peft = PeftModel.from_pretrained(
        load_generator(str(tiny_model_dir), device="cpu").model, str(bank.write_adapter(w, tmp_path / "c"))
    )
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        with bank.applied(w):
            got = bank.generator.model(input_ids=ids).logits
        plain = bank.generator.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - got).abs().max() > 1e-2  # the hooks are gone after the block


def test_fit_margins_matches_the_stationary_point_found_by_bisection(random_bank):
    bank, _ = random_bank
    bank.prior_scale = 1.0
    margins = np.array([[2.0, 0.0, 0.0], [0.5, -1.0, 0.0]])
    w = bank.fit_margins(margins)
    # Coordinate 3 sees no data: the prior keeps it at 0. Check stationarity of the log posterior.
    p = 1 / (1 + np.exp(-(margins @ w)))
    grad = margins.T @ (1 - p) - w
    assert np.abs(grad).max() < 1e-8 and w[2] == 0.0
    # One-dimensional golden value: argmax log sigmoid(2w) - w^2/2, by bisection on 2(1 - sigmoid(2w)) - w.
    lo, hi = 0.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 2 * (1 - 1 / (1 + math.exp(-2 * mid))) - mid > 0 else (lo, mid)
    w1 = bank.fit_margins(np.array([[2.0, 0.0, 0.0]]))
    assert w1[0] == pytest.approx(lo, abs=1e-9) and w1[0] == pytest.approx(
        0.5213, abs=1e-4
    )  # 2 * (1 - sigmoid(1.0426)) = 0.5213


def test_trained_bank_fits_users_to_the_right_basis_and_exact_refinement_helps(
    trained_bank_dir, tiny_model_dir
):
    bank = LoraBank.load(load_generator(str(tiny_model_dir), device="cpu"), trained_bank_dir)
    assert bank.names == ["short", "long"] and bank.provenance["groups"] == {"short": 4, "long": 4}
    margins = bank.basis_margins(SHORT[4:])
    assert (margins[:, 0] > 0).all() and (
        margins[:, 1] < 0
    ).all()  # each basis learned its side on unseen prompts
    fit = bank.fit(SHORT[:3])
    assert fit.weights[0] > 0 and fit.accuracy == 1.0
    assert (
        bank.margins_under(SHORT[4:], fit.weights) > 0
    ).all()  # the combined adapter itself prefers short answers
    opposite = bank.fit(LONG[:3])
    assert (bank.margins_under(LONG[4:], opposite.weights) > 0).all()
    exact = bank.fit(SHORT[:3], method="exact", steps=5, learning_rate=0.05)
    assert exact.history[-1] <= exact.history[0] and exact.log_likelihood >= fit.log_likelihood - 0.02


def test_enroll_with_a_bank_stores_a_plain_adapter_used_in_mixed_batches(
    trained_bank_dir, tiny_model_dir, encoder, tmp_path
):
    generator = load_generator(str(tiny_model_dir), device="cpu")
    with Personalizer(generator, encoder, store=tmp_path / "store") as pz:
        bank = LoraBank.load(generator, trained_bank_dir)
        profile = pz.enroll("ana", [c.model_dump() for c in SHORT[:3]], adapter=bank)
        assert profile.settings["adapter"]["kind"] == "bank" and profile.settings["adapter"]["bases"] == [
            "short",
            "long",
        ]
        config = json.loads((pz.adapters.path("ana") / "adapter_config.json").read_text())
        assert config["r"] == 8 and not config.get("modules_to_save")
        pz.enroll(
            "ben",
            [c.model_dump() for c in LONG[:4]],
            adapter=True,
            adapter_config={"epochs": 2, "rank": 4, "seed": 0},
        )
        ask = [{"role": "user", "content": "Question number 5 about eggs?"}]
        requests = [
            {"user": u, "messages": ask, "max_new_tokens": 6, "steer": {}, "shots": False, "memory": False}
            for u in ("ana", "ben", None)
        ]
        batch = pz.respond_batch(requests)
        for request, result in zip(requests, batch, strict=True):
            assert (
                result.text
                == pz.respond(
                    request["user"], ask, max_new_tokens=6, steer={}, shots=False, memory=False
                ).text
            )


def test_bad_banks_and_weights_get_typed_errors(random_bank, trained_bank_dir, tiny_model_dir, tmp_path):
    bank, folders = random_bank
    with pytest.raises(ValidationError, match="weights"):
        bank.write_adapter([1.0, 2.0], tmp_path / "x")
    with pytest.raises(ValidationError, match="NaN"):
        bank.delta([1.0, float("nan"), 0.0], bank.modules[0])
    with pytest.raises(ValidationError, match="comparisons"):
        bank.fit([])
    with pytest.raises(ValidationError, match="method"):
        bank.fit(SHORT[:1], method="magic")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((folders[0] / "adapter_config.json").read_text())
    (truncated / "adapter_model.safetensors").write_bytes(
        (folders[0] / "adapter_model.safetensors").read_bytes()[:100]
    )
    with pytest.raises(AdapterError, match="unreadable"):
        LoraBank.from_folders(bank.generator, [truncated])
    other = tmp_path / "other_bank"
    other.mkdir()
    manifest = json.loads((trained_bank_dir / "personalign_bank.json").read_text())
    (other / "personalign_bank.json").write_text(json.dumps({**manifest, "base_model": "someone/else"}))
    with pytest.raises(AdapterError, match="someone/else"):
        LoraBank.load(bank.generator, other)


def test_cli_trains_a_bank_from_a_population_and_fits_a_user(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from personalign.cli import app

    rows = []
    for u in range(4):
        pairs = SHORT if u % 2 == 0 else LONG
        rows += [
            {"user": f"u{u}", **c.model_dump(mode="json", include={"prompt", "chosen", "rejected"})}
            for c in pairs[:4]
        ]
    data = tmp_path / "population.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    model = ["--model", str(tiny_model_dir)]
    out = runner.invoke(
        app,
        [
            "train",
            "bank",
            "--data",
            str(data),
            "--k",
            "2",
            "--rank",
            "2",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "bank"),
            *model,
        ],
    )
    assert out.exit_code == 0, out.output
    assert "bank of 2 bases" in out.output and (tmp_path / "bank" / "personalign_bank.json").is_file()
    user_file = tmp_path / "alice.jsonl"
    user_file.write_text(
        "".join(
            json.dumps(c.model_dump(mode="json", include={"prompt", "chosen", "rejected"})) + "\n"
            for c in SHORT[:3]
        )
    )
    store = ["--store", str(tmp_path / "store")]
    out = runner.invoke(
        app,
        [
            "train",
            "user-bank",
            "--user",
            "alice",
            "--bank",
            str(tmp_path / "bank"),
            "--file",
            str(user_file),
            *store,
            *model,
        ],
    )
    assert out.exit_code == 0, out.output
    assert "alice: weights cluster-" in out.output and "on 3 comparisons" in out.output
    out = runner.invoke(
        app, ["train", "user-bank", "--user", "nobody", "--bank", str(tmp_path / "bank"), *store, *model]
    )
    assert out.exit_code != 0 and "nobody" in out.output
