"""Golden values for the preference math, each derived by hand in the docstring."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from personalign.functional.preference import (
    binary_entropy,
    bradley_terry_log_likelihood,
    bradley_terry_loss,
    bradley_terry_prob,
    expected_information_gain,
    expected_win_probability,
    gaussian_kl_to_standard_normal,
    kl_anneal_weight,
    pal_mixture_scores,
    reparameterize,
    vpl_elbo_loss,
)

LOG_SIG_1 = -math.log1p(math.exp(-1.0))  # log sigma(1) = -0.3132616875...
LOG_HALF = -math.log(2.0)


def test_bradley_terry_log_likelihood_golden():
    """log sigma(1 - 0) = -log(1 + e^-1) = -0.31326; log sigma(0) = -log 2; log sigma(-1) = -1.31326."""
    out = bradley_terry_log_likelihood(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert_close(out, torch.tensor([LOG_SIG_1, LOG_HALF, LOG_SIG_1 - 1.0]))


def test_bradley_terry_loss_weighted_golden():
    """Weights (3, 1): (3 * 0.31326 + 1 * 0.69315) / 4 = 0.40823; unweighted: the plain mean."""
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    weighted = bradley_terry_loss(chosen, rejected, torch.tensor([3.0, 1.0]))
    assert_close(weighted, torch.tensor((-3 * LOG_SIG_1 - LOG_HALF) / 4))
    assert_close(bradley_terry_loss(chosen, rejected), torch.tensor((-LOG_SIG_1 - LOG_HALF) / 2))


def test_bradley_terry_loss_is_stable_for_large_margins():
    """-log sigma(-1000) = 1000 exactly in the limit; a naive log(sigmoid) would give inf."""
    loss = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert_close(loss, torch.tensor(1000.0))


def test_bradley_terry_prob():
    """sigma(log 3) = 3 / 4."""
    assert_close(bradley_terry_prob(torch.tensor([math.log(3.0)]), torch.tensor([0.0])), torch.tensor([0.75]))


def test_kl_of_standard_normal_is_zero():
    mu, logvar = torch.zeros(3, 5), torch.zeros(3, 5)
    assert_close(gaussian_kl_to_standard_normal(mu, logvar), torch.zeros(3))


def test_kl_golden():
    """mu = (1, 0), sigma^2 = (1, 2): 1/2 [(1 + 1 - 1 - 0) + (0 + 2 - 1 - log 2)] = 1 - log(2) / 2 = 0.65343."""
    kl = gaussian_kl_to_standard_normal(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]]))
    assert_close(kl, torch.tensor([1.0 - math.log(2.0) / 2]))


def test_kl_is_positive_away_from_prior():
    torch.manual_seed(0)
    kl = gaussian_kl_to_standard_normal(torch.randn(16, 4), torch.randn(16, 4))
    assert torch.all(kl > 0)


def test_reparameterize_shapes_and_moments():
    mu, logvar = torch.tensor([[2.0, -1.0]]), torch.tensor([[math.log(4.0), 0.0]])
    generator = torch.Generator().manual_seed(0)
    z = reparameterize(mu, logvar, n_samples=20000, generator=generator)
    assert z.shape == (20000, 1, 2)
    assert_close(z.mean(dim=0), mu, atol=0.05, rtol=0)
    assert_close(z.var(dim=0), torch.tensor([[4.0, 1.0]]), atol=0.1, rtol=0)
    assert reparameterize(mu, logvar).shape == (1, 2)


def test_reparameterize_is_differentiable_and_seeded():
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    z1 = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    z2 = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2)
    z1.sum().backward()
    assert_close(mu.grad, torch.ones(2, 3))


def test_kl_anneal_weight_golden():
    """Baseline 0.1 at the start of each cycle, 0.1 + 0.9 * (1 - cos(pi / 2)) / 2 = 0.55 half way."""
    assert kl_anneal_weight(0, 100) == pytest.approx(0.1)
    assert kl_anneal_weight(50, 100) == pytest.approx(0.55)
    assert kl_anneal_weight(100, 100) == pytest.approx(0.1)
    assert kl_anneal_weight(7, 0) == 1.0


def test_vpl_elbo_golden():
    """NLL = 0.31326 (margin 1); KL = 0.65343 (see test_kl_golden); loss = 0.31326 + 0.5 * 0.65343."""
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    loss, nll, kl = vpl_elbo_loss(torch.tensor([1.0]), torch.tensor([0.0]), mu, logvar, kl_weight=0.5)
    kl_expected = 1.0 - math.log(2.0) / 2
    assert_close(nll, torch.tensor(-LOG_SIG_1))
    assert_close(kl, torch.tensor(kl_expected))
    assert_close(loss, torch.tensor(-LOG_SIG_1 + 0.5 * kl_expected))


def test_pal_mixture_scores_golden():
    """Uniform mixture of (1, 3) is 2; logits (0, log 3) give weights (1/4, 3/4): 1/4 + 9/4 = 2.5."""
    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    assert_close(pal_mixture_scores(rewards, torch.zeros(2)), torch.tensor([2.0, 2.0]))
    assert_close(pal_mixture_scores(rewards, torch.tensor([0.0, math.log(3.0)])), torch.tensor([2.5, 2.0]))
    per_item = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    assert_close(pal_mixture_scores(rewards, per_item), torch.tensor([2.5, 2.0]))


def test_binary_entropy_golden():
    """H(1/2) = log 2; H(0) = H(1) = 0; H(3/4) = 3/4 log(4/3) + 1/4 log 4 = 0.56233."""
    out = binary_entropy(torch.tensor([0.5, 0.0, 1.0, 0.75]))
    assert_close(out, torch.tensor([math.log(2.0), 0.0, 0.0, 0.75 * math.log(4 / 3) + 0.25 * math.log(4.0)]))


def test_information_gain_golden():
    """Samples with margins +-log 3 give p = (3/4, 1/4): H(1/2) - H(3/4) = 0.69315 - 0.56233 = 0.13081.

    Agreeing samples (margins all 2) give 0; confident opposite samples (+-50) give log 2.
    """
    margins = torch.tensor([[math.log(3.0), 2.0, 50.0], [-math.log(3.0), 2.0, -50.0]])  # (S=2, B=3)
    gain = expected_information_gain(margins)
    h34 = 0.75 * math.log(4 / 3) + 0.25 * math.log(4.0)
    assert_close(gain, torch.tensor([math.log(2.0) - h34, 0.0, math.log(2.0)]), atol=1e-6, rtol=0)


def test_information_gain_bounds():
    torch.manual_seed(0)
    gain = expected_information_gain(3 * torch.randn(64, 100))
    assert torch.all(gain >= 0) and torch.all(gain <= math.log(2.0) + 1e-6)


def test_expected_win_probability_golden():
    """r = 0 against references (0, log 3): (sigma(0) + sigma(-log 3)) / 2 = (1/2 + 1/4) / 2 = 3/8."""
    out = expected_win_probability(torch.tensor([0.0, 100.0]), torch.tensor([0.0, math.log(3.0)]))
    assert_close(out, torch.tensor([0.375, 1.0]))
