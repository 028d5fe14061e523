"""Gathered mixed-adapter forward: parity with PEFT's own per-row ``adapter_names`` path."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from personalign.adapters.batched import gathered_lora, supports_gathered
from personalign.adapters.store import BASE
from personalign.models import load_generator


@pytest.fixture()
def peft_model(tiny_model_dir):
    model = load_generator(str(tiny_model_dir), device="cpu").model
    torch.manual_seed(0)
    # init_lora_weights=False draws B at random too, so every adapter changes the output.
    peft = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        adapter_name="ua",
    )
    peft.add_adapter(
        "ub",
        LoraConfig(
            r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
        ),
    )
    peft.add_adapter("uc", LoraConfig(r=8, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False))
    return peft.eval()


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 200, (n, 7), generator=torch.Generator().manual_seed(1))


def test_gathered_equals_peft_mixed_batch_with_mixed_ranks_targets_and_base_rows(peft_model):
    names = ["ua", "ub", BASE, "uc", "ua", "ub"]
    ids = _ids(len(names))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, adapter_names=names).logits
        with peft_model.disable_adapter(), gathered_lora(peft_model, names):
            got = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2], base[2], rtol=0, atol=0)  # a base row is exactly the base model
    assert (got[0] - base[0]).abs().max() > 1e-2  # the adapters really change the output


def test_single_adapter_rows_equal_peft_active_adapter(peft_model):
    ids = _ids(3)
    peft_model.set_adapter("ub")
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter(), gathered_lora(peft_model, ["ub"] * 3):
            got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_hooks_are_removed_and_batch_size_is_checked(peft_model):
    ids = _ids(2)
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=ids).logits
        with (
            gathered_lora(peft_model, ["ua", "uc", "ub"]),
            pytest.raises(RuntimeError, match="batch of 3 rows, got 2"),
        ):
            peft_model(input_ids=ids)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_dora_is_not_gathered(tiny_model_dir):
    model = load_generator(str(tiny_model_dir), device="cpu").model
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), adapter_name="d")
    assert not supports_gathered(peft, ["d", BASE])
    assert not supports_gathered(peft, ["missing"])
