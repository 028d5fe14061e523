"""Decode-time steering methods: golden values of the math, and contracts on a tiny model.

The tiny generator is built here (not the session fixture) because MODPO wraps it in PEFT.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from personalign.functional.dpo import dpo_loss
from personalign.functional.steering import (
    centred_topk,
    mix_logprobs,
    modpo_loss,
    td_lambda_returns,
    vas_logits,
)
from personalign.steering.decoding import (
    MixedHead,
    SteeringProcessor,
    head_mixable,
    mix_terms,
    top_p_sample,
)

# --- golden values ---------------------------------------------------------------------------


def test_td_lambda_golden():
    """rewards (0, 0, 1), values (0.5, 0.2, 0.4), gamma 1.

    lambda 1: the Monte-Carlo return, 1 everywhere. lambda 0: r_t + V_{t+1} = (0.2, 0.4, 1).
    lambda 0.5: deltas (-0.3, 0.2, 0.6); A = (-0.3 + 0.5 * 0.5, 0.2 + 0.5 * 0.6, 0.6) =
    (-0.05, 0.5, 0.6); R = A + V = (0.45, 0.7, 1.0).
    """
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.4]])
    m = torch.ones(1, 3)
    assert_close(td_lambda_returns(r, v, m, 1.0, 1.0), torch.tensor([[1.0, 1.0, 1.0]]))
    assert_close(td_lambda_returns(r, v, m, 1.0, 0.0), torch.tensor([[0.2, 0.4, 1.0]]))
    assert_close(td_lambda_returns(r, v, m, 1.0, 0.5), torch.tensor([[0.45, 0.7, 1.0]]))


def test_td_lambda_masks_padding():
    """A 2-step row padded to 3: rewards (0, 1), values (0.3, 0.6) (the 9 is padding).

    deltas (0.3, 0.4); lambda 0.5: A = (0.3 + 0.2, 0.4); R = (0.8, 1.0, 0).
    """
    out = td_lambda_returns(
        torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.3, 0.6, 9.0]]), torch.tensor([[1, 1, 0]]), 1.0, 0.5
    )
    assert_close(out, torch.tensor([[0.8, 1.0, 0.0]]))


def test_vas_logits_golden():
    """scores (1, 3, 2, 0): top-2 ids (1, 2); Q there (1, 3) centred (-1, 1); beta 2: (1, 1, 4, 0)."""
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    ids, q = centred_topk(scores, torch.tensor([[0.0, 1.0, 3.0, 5.0]]), 2)
    assert ids.tolist() == [[1, 2]]
    assert_close(vas_logits(scores, ids, q, 2.0), torch.tensor([[1.0, 1.0, 4.0, 0.0]]))
    # two objectives with per-row betas: the bonuses add
    two = torch.stack([q, -q], dim=-1)  # (1, 2, 2)
    assert_close(
        vas_logits(scores, ids, two, torch.tensor([[2.0, 1.0]])), torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    )


def test_mix_logprobs_golden():
    """base logits (0, ln 3): log p = (ln .25, ln .75); objective (ln 3, 0): (ln .75, ln .25).

    w = 0 gives the base; w = 1 the objective; w = 0.5 the mean, 0.5 ln(0.1875) for both tokens.
    """
    base = torch.tensor([[0.0, math.log(3.0)]])
    obj = torch.tensor([[[math.log(3.0), 0.0]]])
    assert_close(mix_logprobs(base, obj, torch.tensor([[0.0]])), torch.log(torch.tensor([[0.25, 0.75]])))
    assert_close(mix_logprobs(base, obj, torch.tensor([[1.0]])), torch.log(torch.tensor([[0.75, 0.25]])))
    half = 0.5 * math.log(0.1875)
    assert_close(mix_logprobs(base, obj, torch.tensor([[0.5]])), torch.tensor([[half, half]]))
    # a banned token (-inf, e.g. EOS under min_new_tokens) stays banned, never nan
    inf = float("-inf")
    banned = mix_logprobs(
        torch.tensor([[0.0, inf, 1.0]]), torch.tensor([[[1.0, inf, 0.0]]]), torch.tensor([[2.0]])
    )
    assert torch.isneginf(banned[0, 1]) and not banned.isnan().any()


def test_modpo_loss_golden_and_dpo_parity():
    """beta 0.1; logratio h = (-1 + 1.5) - (-2 + 1.5) = 1; margin (1 - 0) * 0.05; w_k 0.5:
    rho_w - rho_l = (0.1 - 0.05) / 0.5 = 0.1, loss = log(1 + e^-0.1) = 0.64439666."""
    one = torch.tensor
    loss = modpo_loss(
        one([-1.0]),
        one([-2.0]),
        one([-1.5]),
        one([-1.5]),
        one([[1.0]]),
        one([[0.0]]),
        0.5,
        one([0.05]),
        beta=0.1,
    )
    assert_close(loss, torch.tensor([0.6443966600735709]))
    # w_k = 1 and zero margin weights: exactly DPO
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) for _ in range(4))
    margins = torch.randn(6, 2, generator=g)
    assert_close(
        modpo_loss(pc, pr, rc, rr, margins, margins.flip(0), 1.0, torch.zeros(2), beta=0.2),
        dpo_loss(pc, pr, rc, rr, beta=0.2),
    )


def test_top_p_sample_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert top_p_sample(logits, torch.zeros(2), torch.ones(2)).tolist() == [1, 0]
    torch.manual_seed(0)
    # top_p tiny keeps only the most likely token even when sampling
    assert top_p_sample(logits, torch.ones(2), torch.full((2,), 1e-3)).tolist() == [1, 0]


# --- processor contracts on a tiny model -------------------------------------------------------


@pytest.fixture()
def fresh_generator():
    from conftest import build_tiny_llama, build_tokenizer
    from personalign.models import Generator

    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=3)
    return Generator(model, tokenizer, "tiny-llama-test")


def _greedy(model, ids, mask, processors=None, n=8):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            logits_processor=processors,
            pad_token_id=0,
        )


def test_processor_without_methods_is_identity(fresh_generator):
    from personalign.training.samples import chat_ids, left_pad

    tok = fresh_generator.tokenizer
    ids, mask = left_pad([chat_ids(tok, "Question one"), chat_ids(tok, "Task")], tok.pad_token_id)
    plain = _greedy(fresh_generator.model, ids, mask)
    same = _greedy(fresh_generator.model, ids, mask, [SteeringProcessor([[0], [1]])])
    assert torch.equal(plain, same)


def test_vas_trunk_and_gru_train_and_guide(fresh_generator, tmp_path):
    """Both value models learn from samples, survive save/load, and beta 0 changes nothing."""
    from personalign.adapters.value import GruValueModel, TrunkValueHead, load_value_model, save_value_model
    from personalign.steering.decoding import HiddenCapture
    from personalign.steering.vas import VasTrainConfig, train_vas
    from personalign.training.loop import LoopConfig
    from personalign.training.samples import chat_ids, left_pad, sample_responses

    samples = sample_responses(
        fresh_generator,
        ["Question one", "Task two", "Preferred"],
        n_per_prompt=4,
        max_new_tokens=12,
        batch_size=6,
    )
    tok = fresh_generator.tokenizer
    ids, mask = left_pad([chat_ids(tok, "Question one")], tok.pad_token_id)
    plain = _greedy(fresh_generator.model, ids, mask)
    for kind, cls in (("trunk", TrunkValueHead), ("gru", GruValueModel)):
        config = VasTrainConfig(
            objective="verbosity",
            kind=kind,
            rank=4,
            hidden=16,
            loop=LoopConfig(epochs=6, learning_rate=1e-2, batch_size=4),
        )
        model, report = train_vas(fresh_generator, samples, config)
        assert isinstance(model, cls) and report.epochs_run == 6
        assert report.epoch_loss[-1] < report.epoch_loss[0], report.epoch_loss
        loaded = load_value_model(save_value_model(model, tmp_path / kind), fresh_generator)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        capture = HiddenCapture(fresh_generator.model)
        try:
            zero = SteeringProcessor(
                [[0]], value_models=[loaded], betas=[[0.0]], capture=capture, prompt_ids=ids, prompt_mask=mask
            )
            assert torch.equal(_greedy(fresh_generator.model, ids, mask, [zero]), plain)
            strong = SteeringProcessor(
                [[0]],
                value_models=[loaded],
                betas=[[50.0]],
                capture=capture,
                prompt_ids=ids,
                prompt_mask=mask,
            )
            _greedy(fresh_generator.model, ids, mask, [strong])  # runs; the effect is measured in eval steer
        finally:
            capture.close()


def test_gru_scores_candidates_in_one_batched_call(fresh_generator):
    from personalign.adapters.value import ValueConfig, build_value_model

    model = build_value_model(
        ValueConfig(objective="verbosity", kind="gru", hidden=8, proj=8), fresh_generator.model
    )
    state = torch.randn(2, 8)
    calls = []
    handle = model.cell.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    q = model.q_candidates(state, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    handle.remove()
    assert q.shape == (2, 3) and calls == [torch.Size([6, 8])]
    one = model.value(model.step(state[:1], torch.tensor([2])))
    assert_close(q[0, 1], one[0])


def test_value_model_for_another_base_is_refused(fresh_generator, tmp_path):
    from personalign.adapters.value import (
        ValueConfig,
        ValueModelError,
        build_value_model,
        load_value_model,
        save_value_model,
    )

    model = build_value_model(
        ValueConfig(objective="verbosity", base_model="some/other-model"), fresh_generator.model
    )
    folder = save_value_model(model, tmp_path / "v")
    with pytest.raises(ValueModelError, match="other-model"):
        load_value_model(folder, fresh_generator)
    (folder / "value.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueModelError, match="unreadable"):
        load_value_model(folder, fresh_generator)


def test_mix_rows_match_single_adapter_runs(fresh_generator, tmp_path):
    """Mixing with weight 0 is the base policy; weight 1 on one objective is that adapter alone."""
    from personalign.adapters.batched import gathered_lora
    from personalign.adapters.store import BASE
    from personalign.steering.modpo import ModpoConfig, train_modpo
    from personalign.training.loop import LoopConfig
    from personalign.training.samples import chat_ids, left_pad, sample_responses

    samples = sample_responses(
        fresh_generator, ["Question one", "Task two"], n_per_prompt=4, max_new_tokens=10, batch_size=8
    )
    config = ModpoConfig(
        objective="verbosity",
        margin_objectives=["structure"],
        margin_weights=[0.1],
        min_gap=0.0,
        rank=2,
        loop=LoopConfig(epochs=2, learning_rate=5e-2, batch_size=4),
    )
    peft, name, report, pairs = train_modpo(fresh_generator, samples, config)
    assert pairs > 0 and report.epochs_run == 2
    tok = fresh_generator.tokenizer
    ids, mask = left_pad([chat_ids(tok, "Question one")], tok.pad_token_id)
    with peft.disable_adapter():
        base = _greedy(peft, ids, mask)
    peft.set_adapter(name)
    adapter_only = _greedy(peft, ids, mask)
    assert not torch.equal(base, adapter_only), "the trained adapter should change greedy output"
    rows, rmask = ids.repeat(2, 1), mask.repeat(2, 1)
    for premixed in (False, True):
        for weight, expected in ((0.0, base), (1.0, adapter_only)):
            # premixed: the rows' hidden states mixed before the head, 1 - w on the base row and w on the adapter's
            proc = SteeringProcessor([[0, 1]], mix_weights=None if premixed else [[weight]], base_rows=[None])
            head = MixedHead(peft, torch.tensor([[1.0 - weight, weight]]), [0, 0]) if premixed else None
            try:
                with peft.disable_adapter(), gathered_lora(peft, [BASE, name]):
                    out = _greedy(peft, rows, rmask, [proc])
            finally:
                if head is not None:
                    head.close()
            assert torch.equal(out[0], expected[0]) and torch.equal(out[1], out[0]), (weight, premixed)


def test_mix_terms_golden():
    """The rows a mixing request runs, with their logit coefficients (zero ones left out)."""
    assert mix_terms("__base__", [("v", 0.5), ("s", -1.0)]) == [("__base__", 1.5), ("v", 0.5), ("s", -1.0)]
    assert mix_terms("ana", [("v", 2.0), ("s", 0.25)]) == [
        ("ana", 1.0),
        ("__base__", -2.25),
        ("v", 2.0),
        ("s", 0.25),
    ]
    assert mix_terms("__base__", [("v", 0.5), ("s", 0.5)]) == [
        ("v", 0.5),
        ("s", 0.5),
    ]  # on the simplex: no base row
    assert mix_terms("__base__", [("v", 1.0), ("s", 0.0)]) == [("v", 1.0)]  # weight 1: the adapter alone
    assert mix_terms("ana", [("v", 0.5), ("s", -0.5)]) == [
        ("ana", 1.0),
        ("v", 0.5),
        ("s", -0.5),
    ]  # sum 0: no base row
    assert mix_terms("__base__", [("v", 0.0)]) == [("__base__", 1.0)]
    for own, objectives in (
        ("__base__", [("v", 0.3), ("s", -1.7)]),
        ("ana", [("v", 0.1), ("s", 0.2), ("t", 0.7)]),
    ):
        assert math.isclose(
            sum(c for _, c in mix_terms(own, objectives)), 1.0
        )  # so a head bias passes through


def test_mixing_before_the_head_equals_mixing_log_probs():
    """head(C @ h) and mix_logprobs(head(h)) give the same distribution (they differ by a constant per row)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)  # with a bias
    hidden = torch.randn(4, 1, 6)  # rows: primary, objective a, objective b, another request's row
    weights = [[0.7, -1.3]]
    model = _HeadOnly(head)
    coefficients = torch.tensor(
        [[1.0 - sum(weights[0]), *weights[0], 0.0], [0.0, 0.0, 0.0, 1.0]]
    )  # (R, N) as mix_terms gives them
    mixer = MixedHead(model, coefficients, [0, 0, 0, 1])
    try:
        premixed = head(hidden)[:, -1]  # (4, V): rows 0-2 carry request 0's mix, row 3 request 1's logits
    finally:
        mixer.close()
    logits = head(hidden)[:, -1]
    reference = mix_logprobs(logits[0:1], logits[1:3].unsqueeze(0), torch.tensor([weights[0]]))
    assert_close(torch.log_softmax(premixed[0:1], -1), torch.log_softmax(reference, -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(premixed[0], premixed[1]) and torch.equal(premixed[0], premixed[2])
    assert_close(premixed[3], logits[3])
    assert_close(head(hidden)[:, -1], logits)  # closed: the head is plain again


def test_head_mixable_only_for_an_affine_head():
    from personalign.packed_linear import pack_linears

    assert head_mixable(_HeadOnly(torch.nn.Linear(6, 11)))
    packed = torch.nn.Linear(6, 11)
    pack_linears(packed, enabled=True)
    assert head_mixable(_HeadOnly(packed))  # the packed head is the same affine map
    capped = _HeadOnly(torch.nn.Linear(6, 11))
    capped.config = type("Config", (), {"final_logit_softcapping": 30.0})()
    assert not head_mixable(capped)
    assert not head_mixable(_HeadOnly(torch.nn.Sequential(torch.nn.Linear(6, 11))))


class _HeadOnly(torch.nn.Module):
    """A stand-in model that only has an output head."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_dpa_every_direction_keeps_one_answer_per_prompt_and_direction(fresh_generator):
    from personalign.steering.dpa import DpaConfig, train_dpa
    from personalign.training.loop import LoopConfig

    config = DpaConfig(
        objectives=["verbosity", "structure"],
        iterations=1,
        samples_per_prompt=2,
        directions=4,
        max_new_tokens=8,
        every_direction=True,
        loop=LoopConfig(epochs=1, batch_size=4),
    )
    _, records = train_dpa(fresh_generator, ["Question one", "Task two"], config)
    assert (
        records[0]["answers"] == 4 and records[0]["kept"] == 8
    )  # 2 prompts x 4 directions (the drawn one only: 2)


def test_dpa_dpo_trains_on_best_and_worst_pairs(fresh_generator):
    from personalign.steering.dpa import DpaConfig, train_dpa
    from personalign.training.loop import LoopConfig

    config = DpaConfig(
        objectives=["verbosity", "structure"],
        iterations=1,
        samples_per_prompt=3,
        directions=4,
        max_new_tokens=8,
        every_direction=True,
        loss="dpo",
        loop=LoopConfig(epochs=2, batch_size=4),
    )
    model, records = train_dpa(fresh_generator, ["Question one", "Task two"], config)
    record = records[0]
    assert record["kept"] == 8 and 0 < record["pairs"] <= 8
    loss = record["dpo_loss"]
    assert len(loss) == 2 and loss[0] == pytest.approx(
        math.log(2), abs=0.05
    )  # the adapter starts as the reference
    assert loss[1] < loss[0]
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "steer_dpa" in n and "lora_B" in n)


def test_direction_lines_golden_and_the_installed_form_is_read_back(tmp_path, monkeypatch):
    import json

    from personalign.steering.dpa import direction_text, dpa_messages
    from personalign.steering.methods import dpa_line, steerable_by_method

    v = {"verbosity": 0.7071, "structure": -0.7071}
    assert direction_text(v) == "Preference direction: verbosity +0.71, structure -0.71."
    assert direction_text(v, "numbers+words") == (
        "Preference direction: verbosity +0.71, structure -0.71. Give a detailed, thorough answer. Write flowing paragraphs, no lists."
    )
    assert direction_text({"verbosity": -1.0, "structure": 0.0}, "numbers+words").endswith(
        "+0.00. Answer in one short sentence."
    )
    messages = dpa_messages(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}], v, "numbers+words"
    )
    assert messages[0]["content"].startswith("Preference direction: verbosity +0.71") and messages[0][
        "content"
    ].endswith("\nBe kind.")
    (tmp_path / "dpa").mkdir()
    meta = {"objectives": ["verbosity", "structure"], "base_model": "m", "config": {"line": "numbers+words"}}
    (tmp_path / "dpa" / "dpa_config.json").write_text(json.dumps(meta))
    monkeypatch.setenv("PERSONALIGN_STEERING_DIR", str(tmp_path))
    assert dpa_line("m") == "numbers+words" and steerable_by_method("m")["dpa"] == ("verbosity", "structure")
    assert dpa_line("another model") == "numbers"
    meta["config"] = {}  # adapters saved before the option: the paper's form
    (tmp_path / "dpa" / "dpa_config.json").write_text(json.dumps(meta))
    import os

    os.utime(tmp_path / "dpa" / "dpa_config.json", (1, 1))  # a new mtime, so the cached scan is redone
    assert dpa_line("m") == "numbers"
