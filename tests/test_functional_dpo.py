"""DPO-family losses: golden values derived by hand, and parity with TRL on the same log-probabilities."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from personalign.functional.dpo import dpo_loss, ipo_loss, reduce_pairs, sequence_logps, simpo_loss

# policy chosen/rejected, reference chosen/rejected (sequence sums)
PC, PR, RC, RR = (torch.tensor(v) for v in ([-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0], [-11.0, -2.0]))


def test_dpo_golden():
    """h = (PC - RC) - (PR - RR) = (1 - (-1), 1 - (-1)) = (2, 2); beta = 0.5 -> beta h = 1.
    L = -log sigma(1) = log(1 + e^-1) = 0.313262; with eps = 0.1:
    0.9 * 0.313262 + 0.1 * log(1 + e^1) = 0.281936 + 0.131326 = 0.413262."""
    assert_close(dpo_loss(PC, PR, RC, RR, beta=0.5), torch.full((2,), math.log1p(math.exp(-1))))
    expected = 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1))
    assert_close(dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1), torch.full((2,), expected))


def test_ipo_golden():
    """Summed: h = 2, beta = 0.25 -> 1/(2 beta) = 2 -> L = 0. Length-normalised with
    |y_w| = 2, |y_l| = 4: chosen 1/2, rejected -1/4, h = 0.75 -> (0.75 - 2)^2 = 1.5625."""
    assert_close(ipo_loss(PC, PR, RC, RR, beta=0.25), torch.zeros(2))
    lengths_w, lengths_l = torch.tensor([2, 2]), torch.tensor([4, 4])
    assert_close(
        ipo_loss(PC, PR, RC, RR, beta=0.25, chosen_lengths=lengths_w, rejected_lengths=lengths_l),
        torch.full((2,), 1.5625),
    )


def test_simpo_golden():
    """Row 0: -10/5 - (-12/4) = -2 + 3 = 1; gamma/beta = 0.5/2 = 0.25 -> m = 0.75, beta m = 1.5:
    L = log(1 + e^-1.5) = 0.201413."""
    out = simpo_loss(PC[:1], PR[:1], torch.tensor([5]), torch.tensor([4]), beta=2.0, gamma=0.5)
    assert_close(out, torch.tensor([math.log1p(math.exp(-1.5))]))


def test_reduce_pairs_weights():
    """(1*1 + 3*2) / (1 + 3) = 1.75; no weights: mean 1.5."""
    losses = torch.tensor([1.0, 2.0])
    assert_close(reduce_pairs(losses, torch.tensor([1.0, 3.0])), torch.tensor(1.75))
    assert_close(reduce_pairs(losses), torch.tensor(1.5))


def test_sequence_logps_golden():
    """Uniform logits over 4 tokens: every scored token has log(1/4); 2 scored tokens -> 2 log(1/4)."""
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[0, 0, 1, 1]])
    assert_close(sequence_logps(logits, labels, mask), torch.tensor([2 * math.log(0.25)]))


# --- parity with TRL ------------------------------------------------------------------------

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def _trl_dpo_loss(
    loss_type: str, beta: float, label_smoothing: float, per_token_logps, completion_mask, ref_c, ref_r
):
    """Run TRL's own DPOTrainer._compute_loss on given per-token log-probs (no model, no data)."""
    batch = completion_mask.shape[0]
    outputs = SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps),
        is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(batch, completion_mask.shape[1], dtype=torch.long),
        "attention_mask": torch.ones(batch, completion_mask.shape[1], dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    return trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)


def _random_case(seed: int = 0, pairs: int = 5, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2 * pairs, length, generator=gen) > 0.3).long()
    mask[:, 0] = 0
    mask[:, 1] = 1  # at least one scored token per row
    shifted = mask[:, 1:]
    # (2B, T-1), chosen rows first; zero off the completion, as TRL's fused head returns for label -100
    per_token = -torch.rand(2 * pairs, length - 1, generator=gen) * 3 * shifted
    logps = per_token.sum(dim=1)
    ref = logps + torch.randn(2 * pairs, generator=gen)
    return per_token, mask, logps.chunk(2), ref.chunk(2), shifted.sum(dim=1).chunk(2)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_matches_trl(label_smoothing):
    per_token, mask, (pc, pr), (rc, rr), _ = _random_case()
    expected = _trl_dpo_loss(
        "robust" if label_smoothing else "sigmoid", 0.3, label_smoothing, per_token, mask, rc, rr
    )
    ours = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=label_smoothing).mean()
    if label_smoothing:
        # TRL's "robust" loss is the unbiased variant: (conservative terms with the flipped term subtracted) / (1 - 2 eps).
        h = (pc - rc) - (pr - rr)
        clean = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(0.3 * h)
        flipped = -label_smoothing * torch.nn.functional.logsigmoid(-0.3 * h)
        assert_close(((clean - flipped) / (1 - 2 * label_smoothing)).mean(), expected)
        assert_close(ours, (clean + flipped).mean())
    else:
        assert_close(ours, expected)


def test_ipo_matches_trl_length_normalised():
    per_token, mask, (pc, pr), (rc, rr), (len_c, len_r) = _random_case(seed=1)
    # TRL normalises by the completion mask of the unshifted sequence.
    full_c, full_r = mask.sum(dim=1).chunk(2)
    expected = _trl_dpo_loss("ipo", 0.1, 0.0, per_token, mask, rc, rr)
    ours = ipo_loss(pc, pr, rc, rr, beta=0.1, chosen_lengths=full_c, rejected_lengths=full_r).mean()
    assert_close(ours, expected)


def test_simpo_matches_trl_cpo():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    _, _, (pc, pr), _, (len_c, len_r) = _random_case(seed=2)
    fake = SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.7,
        loss_type="simpo",
        label_smoothing=0.1,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    expected, _, _ = cpo.CPOTrainer.cpo_loss(
        fake, pc / len_c, pr / len_r
    )  # CPO passes length-averaged log-probs for SimPO
    assert_close(simpo_loss(pc, pr, len_c, len_r, beta=2.0, gamma=0.7, label_smoothing=0.1), expected)
