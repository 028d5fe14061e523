"""Packed oneDNN weights for few-row decoding steps: same numbers as F.linear, stock path elsewhere."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from personalign.packed_linear import (
    MAX_ROWS,
    PackedLinear,
    clear_packed,
    pack_linears,
    pack_modules,
    packing_available,
    step_rows,
    unpack_linears,
)

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN linear ops")


def _layer(bias: bool = True, seed: int = 0) -> PackedLinear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(48, 40, bias=bias)
    assert pack_linears(layer, enabled=True) == 1
    return layer


def test_a_refusing_op_turns_packing_off_for_the_layer_and_a_memory_error_does_not(monkeypatch, caplog):
    layer = _layer()
    x = torch.randn(3, 1, 48)
    expected = F.linear(x, layer.weight, layer.bias)

    def refuse(self):
        raise RuntimeError(message)

    monkeypatch.setattr(PackedLinear, "_packed_weight", refuse)
    message = "DefaultCPUAllocator: can't allocate memory"
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert not layer._packing_failed and not caplog.records
    message = "mkldnn: unsupported shape"
    with torch.no_grad(), caplog.at_level("WARNING"):
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x), expected)
    assert layer._packing_failed and len(caplog.records) == 1


def test_a_wrong_width_raises_the_stock_error_and_keeps_packing():
    layer = _layer()
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(torch.randn(3, 1, 47))
    assert not layer._packing_failed


def test_moving_or_casting_drops_the_packed_copy_and_a_size_limit_skips_packing():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(3, 1, 48))
    assert layer._packed is not None
    layer.double()
    assert layer._packed is None
    with torch.no_grad():  # float64 now: the stock path
        x = torch.randn(3, 1, 48, dtype=torch.float64)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert pack_linears(torch.nn.Linear(48, 40), enabled=True, max_bytes=1000) == 0
    assert pack_linears(torch.nn.Linear(48, 40), enabled=True, max_bytes=48 * 40 * 4) == 1


def test_step_rows_counts_only_decoding_steps():
    assert step_rows(torch.zeros(3, 1, 8)) == 3
    assert step_rows(torch.zeros(3, 8)) == 0  # may be a flattened (B * T, H) prefill: stock path
    assert step_rows(torch.zeros(1, 5, 8)) == 0  # a prefill: stock path
    assert step_rows(torch.zeros(2, 2, 1, 8)) == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [2, 3, 4, MAX_ROWS])
def test_packed_rows_equal_f_linear_to_rounding(bias, rows):
    layer = _layer(bias)
    x = torch.randn(rows, 1, 48)
    with torch.no_grad():
        out = layer(x)
    assert layer._packed is not None  # the packed path ran
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape", [(1, 48), (3, 48), (1, 1, 48), (1, 7, 48), (3, 7, 48), (MAX_ROWS + 1, 1, 48)]
)
def test_single_rows_prefills_and_large_batches_take_the_stock_path_bit_for_bit(shape):
    layer = _layer()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._packed is None


def test_autograd_takes_the_stock_path():
    layer = _layer()
    x = torch.randn(3, 1, 48, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer._packed is None


def test_the_packed_copy_follows_weight_changes():
    layer = _layer()
    x = torch.randn(3, 1, 48)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2.0)  # in place through the parameter: its version moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight.data = layer.weight.data + 1.0  # new storage
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight.data += 1.0  # in place through .data: not seen until clear_packed (documented)
        assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))
        clear_packed(layer)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_copies_drop_the_packed_cache_and_keep_the_state_dict():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(3, 1, 48))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone, PackedLinear) and clone._packed is None
        assert torch.equal(clone.weight, layer.weight)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_pack_only_plain_cpu_float32_linears_and_unpack(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    monkeypatch.setenv("PERSONALIGN_PACKED_LINEAR", "0")
    assert pack_linears(model) == 0
    monkeypatch.setenv("PERSONALIGN_PACKED_LINEAR", "1")  # every row count, no calibration
    assert pack_linears(model) == linears > 0
    assert pack_linears(model) == 0  # already packed
    layers = unpack_linears(model)
    assert len(layers) == linears and all(type(m) is torch.nn.Linear for m in layers)
    assert all(type(m) is not PackedLinear for m in model.modules())
    pack_modules(layers[:2])  # exactly these
    assert sum(type(m) is PackedLinear for m in model.modules()) == 2
    unpack_linears(model)
    assert pack_linears(model.to(torch.bfloat16)) == 0


def test_batched_decoding_matches_the_unpacked_model(tiny_generator, tiny_model_dir):
    """The loaded generator is packed; greedy batched decoding gives the unpacked model's tokens,
    and one row gives its logits bit for bit."""
    from transformers import AutoModelForCausalLM

    packed = tiny_generator.model
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = tiny_generator.tokenizer
    asks = ["how do I cook rice", "tell me about cats", "why is the sky blue"]
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": a}], add_generation_prompt=True, tokenize=True
        )
        for a in asks
    ]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs = {
        "max_new_tokens": 12,
        "do_sample": False,
        "pad_token_id": pad,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.inference_mode():
        a = packed.generate(input_ids=ids, attention_mask=mask, **kwargs)
        b = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(a.sequences, b.sequences)
        for sa, sb in zip(a.scores, b.scores, strict=True):
            torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)
        one_a = packed.generate(input_ids=ids[:1, -len(rows[0]) :], **kwargs)
        one_b = stock.generate(input_ids=ids[:1, -len(rows[0]) :], **kwargs)
    assert all(torch.equal(sa, sb) for sa, sb in zip(one_a.scores, one_b.scores, strict=True))


def test_lora_layers_wrap_packed_layers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    packed = copy.deepcopy(stock)
    pack_linears(packed, enabled=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    stock, packed = get_peft_model(stock, config), get_peft_model(packed, copy.deepcopy(config))
    packed.load_state_dict(stock.state_dict())
    ids = torch.randint(3, 50, (3, 1))
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_bench_linear_on_tiny_model(tiny_generator):
    from personalign.bench.linear import format_linear_bench, run_linear_bench

    result = run_linear_bench(tiny_generator.model, rows=(1, 2, 3), repeats=1)
    assert [r["rows"] for r in result["rows"]] == [1, 2, 3]
    assert result["rows"][0]["stock_vs_1_row"] == 1.0 and result["rows"][0]["used"] == "stock"
    assert result["rows"][1]["used"] == "packed" and result["max_abs_difference"] < 1e-4
    assert all(r["stock_ms"] > 0 and r["packed_ms"] > 0 for r in result["rows"])
    assert "| 3 |" in format_linear_bench(result)


def test_gathered_lora_rows_on_a_packed_base_match_a_stock_base(tiny_model_dir):
    """The mixed-adapter batch (one gathered matmul per LoRA layer) adds its deltas to packed base outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from personalign.adapters.batched import gathered_lora
    from personalign.adapters.store import BASE

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    packed = copy.deepcopy(stock)
    pack_linears(packed, enabled=True)
    models = []
    for model in (stock, packed):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(1)
        peft = get_peft_model(model, config, adapter_name="first")
        torch.manual_seed(2)
        peft.add_adapter("second", config)
        models.append(peft.eval())
    names = ["first", BASE, "second"]
    ids = torch.randint(3, 50, (3, 6))
    outs = []
    with torch.no_grad():
        for model in models:
            with model.disable_adapter(), gathered_lora(model, names):
                out = model(input_ids=ids, use_cache=True)
                step = model(
                    input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True
                )  # (3, 1): a decoding step
            outs.append(step.logits)
    assert any(
        type(m) is PackedLinear and m._packed is not None for m in models[1].modules()
    )  # the step ran packed
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_calibration_packs_the_row_counts_where_packing_won(monkeypatch, tmp_path):
    """Golden with fake timings: counts between calibrated ones follow the one below; the
    decision is stored per machine and read back; a model where packing never wins is not
    packed; $PERSONALIGN_PACKED_LINEAR=1 skips calibrating."""
    import personalign.packed_linear as pl

    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(pl, "_decisions", {})
    calls: list[tuple[bool, int]] = []
    real_linear, real_pointwise = pl.F.linear, torch.ops.mkldnn._linear_pointwise
    clock = {"now": 0.0}

    def fake_time() -> float:
        return clock["now"]

    def stock(x, w, *args):  # stock costs 1 per call; packed 0.5, but 2 at 8 rows
        calls.append((False, x.shape[0]))
        clock["now"] += 1.0
        return real_linear(x, w, *args)

    def packed(x, p, *args):
        calls.append((True, x.shape[0]))
        clock["now"] += 2.0 if x.shape[0] == 8 else 0.5
        return real_pointwise(x, p, *args)

    monkeypatch.setattr(pl.time, "perf_counter", fake_time)
    monkeypatch.setattr(pl.F, "linear", stock)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", packed)
    layers = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), torch.nn.Linear(8, 16)]
    rows = pl.calibrate(layers, repeats=2)
    assert rows == pl.ALL_ROWS - set(range(8, 16))  # 8 lost; 9-15 follow 8; 16 won again
    assert {(packed_, r) for packed_, r in calls} == {
        (b, r) for b in (False, True) for r in pl.CALIBRATION_ROWS
    }
    assert len(calls) == 3 * len(pl.CALIBRATION_ROWS) * 3 * 2  # 3 weights, 3 rounds (one warm-up), both paths
    calls.clear()
    assert pl.calibrate(layers) == rows and not calls  # remembered in this process
    monkeypatch.setattr(pl, "_decisions", {})
    assert pl.calibrate(layers) == rows and not calls  # and on disk for this machine
    assert (tmp_path / "packed_linear.json").is_file()
    monkeypatch.setattr(pl, "_decisions", {})
    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(
        torch.ops.mkldnn,
        "_linear_pointwise",
        lambda x, p, *a: (clock.__setitem__("now", clock["now"] + 5.0), real_pointwise(x, p, *a))[1],
    )
    monkeypatch.setenv(pl.ENV, "auto")
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    assert pl.pack_linears(model) == 0  # packing never won here: left stock
    monkeypatch.setenv(pl.ENV, "1")
    assert pl.pack_linears(model) == 1 and model[0].__dict__["_packed_rows"] == pl.ALL_ROWS


def test_a_layer_takes_the_packed_path_only_at_its_calibrated_row_counts():
    layer = torch.nn.Linear(48, 40)
    assert (
        pack_linears(layer, enabled=True) == 1
    )  # the suite packs every count ($PERSONALIGN_PACKED_LINEAR=1)
    layer.__dict__["_packed_rows"] = frozenset({3})
    with torch.no_grad():
        layer(torch.randn(2, 1, 48))
        assert layer._packed is None  # 2 rows: stock
        layer(torch.randn(3, 1, 48))
        assert layer._packed is not None  # 3 rows: packed
