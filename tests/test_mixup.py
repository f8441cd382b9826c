import numpy as np
import pytest
import torch

from mofe_ood.mixup import (DynamicBetaMixup, Mixup, class_alphas, class_difficulty, sample_beta,
                            soft_targets)


def test_difficulty_from_counts_matches_hand_computed_values():
    # min 10, max 100: d = 1 - (n - 10) / 90
    d = class_difficulty(counts=[100, 50, 10, 100])
    np.testing.assert_allclose(d, [0.0, 5 / 9, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(class_alphas(d, 0.1, 1.0), [0.1, 0.6, 1.0, 0.1], atol=1e-6)


def test_difficulty_from_accuracies_and_power():
    # min 0.6, max 0.9: d = 1 - (a - 0.6) / 0.3 -> [0, 1, 1/3]
    d = class_difficulty(accuracies=[0.9, 0.6, 0.8])
    np.testing.assert_allclose(d, [0.0, 1.0, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(class_difficulty(accuracies=[0.9, 0.6, 0.8], power=2.0), [0.0, 1.0, 1 / 9],
                               atol=1e-6)
    np.testing.assert_allclose(class_difficulty(accuracies=[0.9, 0.6, 0.8], power=0.5), [0.0, 1.0, 3 ** -0.5],
                               atol=1e-3)  # sqrt(eps / range) ~ 2e-4 at the easiest class
    np.testing.assert_allclose(class_alphas([0.0, 1.0, 1 / 3], 0.2, 0.8), [0.2, 0.8, 0.4], atol=1e-9)


def test_all_equal_classes_are_all_hard():
    np.testing.assert_array_equal(class_difficulty(counts=[7, 7, 7]), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(class_difficulty(accuracies=[0.5, 0.5], power=3.0), [1.0, 1.0])
    np.testing.assert_array_equal(class_alphas(class_difficulty(counts=[3, 3]), 0.1, 0.7), [0.7, 0.7])


def test_difficulty_rejects_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        class_difficulty()
    with pytest.raises(ValueError, match="exactly one"):
        class_difficulty(counts=[1, 2], accuracies=[0.1, 0.2])
    with pytest.raises(ValueError, match="alpha_min <= alpha_max"):
        class_alphas([0.5], 1.0, 0.1)


def test_sample_beta_has_the_beta_moments():
    gen = torch.Generator().manual_seed(0)
    for alpha in (0.1, 1.0, 4.0):
        lam = sample_beta(torch.full((20000,), alpha), gen)
        assert ((lam >= 0) & (lam <= 1)).all()
        assert abs(lam.mean().item() - 0.5) < 0.015
        assert abs(lam.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.01


def plain_mixup(x, y, num_classes, alpha, smoothing, gen):
    """Textbook per-sample mixup with the reversed batch as partner, written out by hand."""
    lam = sample_beta(torch.full((len(x),), alpha, dtype=torch.float64), gen)
    t = torch.nn.functional.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    lx = lam.float().view(-1, *([1] * (x.ndim - 1)))
    lt = lam.float().view(-1, 1)
    return lx * x + (1 - lx) * x.flip(0), lt * t + (1 - lt) * t.flip(0), lam


@pytest.mark.parametrize("shape", [(8, 5), (8, 3, 4, 4)])  # feature vectors and images
def test_equal_alpha_bounds_reduce_exactly_to_plain_mixup(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    dyn = DynamicBetaMixup(4, 0.3, 0.3, label_smoothing=0.1, counts=[5, 1, 9, 2])
    dyn.update([0.9, 0.1, 0.5, 0.7])  # difficulty varies; the alphas cannot
    got = dyn(x, y, generator=torch.Generator().manual_seed(7))
    want = plain_mixup(x, y, 4, 0.3, 0.1, torch.Generator().manual_seed(7))
    plain = Mixup(4, 0.3, label_smoothing=0.1)(x, y, generator=torch.Generator().manual_seed(7))
    for a, b, c in zip(got, want, plain, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_mixing_is_the_reversed_batch_with_smoothed_targets():
    x = torch.arange(12.0).view(4, 3)
    y = torch.tensor([0, 1, 1, 2])
    mix = DynamicBetaMixup(3, 0.1, 1.0, label_smoothing=0.2)
    xm, tm, lam = mix(x, y, generator=torch.Generator().manual_seed(3))
    t = soft_targets(y, 3, 0.2)
    np.testing.assert_allclose(t[0].numpy(), [0.8 + 0.2 / 3, 0.2 / 3, 0.2 / 3], rtol=1e-6)
    for i in range(4):
        w = lam[i].float()
        assert torch.allclose(xm[i], w * x[i] + (1 - w) * x[3 - i])
        assert torch.allclose(tm[i], w * t[i] + (1 - w) * t[3 - i])
    assert torch.allclose(tm.sum(1), torch.ones(4))


def test_hard_classes_get_larger_alpha_and_stronger_mixing():
    mix = DynamicBetaMixup(2, 0.1, 2.0)
    mix.update([1.0, 0.5])  # class 1 is hard
    np.testing.assert_allclose(mix.alphas, [0.1, 2.0], atol=1e-6)
    y = torch.tensor([0, 1]).repeat(5000)
    _, _, lam = mix(torch.zeros(len(y), 1), y, generator=torch.Generator().manual_seed(0))
    spread = (lam - 0.5).abs()
    assert spread[y == 1].mean() < 0.2 < spread[y == 0].mean()  # hard: near 0.5; easy: near 0 or 1


def test_accuracy_ema_is_updated_every_epoch():
    mix = DynamicBetaMixup(3, 0.1, 1.0, momentum=0.5)
    np.testing.assert_allclose(mix.alphas, [1.0, 1.0, 1.0])  # nothing known: all equal
    mix.update([0.9, 0.6, 0.8])
    mix.update([0.5, 0.6, 0.8])  # EMA: [0.7, 0.6, 0.8] -> d = [0.5, 1, 0]
    np.testing.assert_allclose(mix.accuracy_ema, [0.7, 0.6, 0.8])
    np.testing.assert_allclose(mix.alphas, [0.55, 1.0, 0.1], atol=1e-6)
    mix.update([np.nan, 0.6, 0.8])  # a class without samples keeps its estimate
    np.testing.assert_allclose(mix.accuracy_ema, [0.7, 0.6, 0.8])
    restored = DynamicBetaMixup(3, 0.1, 1.0, momentum=0.5)
    restored.load_state_dict(mix.state_dict())
    np.testing.assert_array_equal(restored.alphas, mix.alphas)


def test_count_based_alphas_stay_fixed():
    mix = DynamicBetaMixup(3, 0.1, 1.0, counts=[100, 10, 55], difficulty="counts")
    before = mix.alphas.copy()
    mix.update([0.1, 0.9, 0.5])
    np.testing.assert_array_equal(mix.alphas, before)
    np.testing.assert_allclose(before, [0.1, 1.0, 0.55], atol=1e-6)


def test_same_generator_same_draws():
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    mix = DynamicBetaMixup(3, 0.2, 1.5)
    a = mix(x, y, generator=torch.Generator().manual_seed(5))
    b = mix(x, y, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
