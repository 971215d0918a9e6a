"""The S/N dependence of the σ calibration: levels, the minimum-CRPS factor of each level, its interpolation at
prediction, and the noise of a set at chosen S/N.  Small pure functions, tested alone; the trained model's use
of them is tested in tests/test_uncertainty.py."""

import numpy as np
import pytest
from scipy.stats import norm

from anna.augment import noisy_copy, noisy_copy_at
from anna.model import noise_variance_factor
from anna.train.variance import calibration_sn_levels, crps_variance_factor, noise_level_factors, pooled_noise_levels


def mean_crps(z, factor):
    """Mean CRPS of the forecasts N(0, factor) at normalised residuals z (closed form for a Gaussian)."""
    s = np.sqrt(factor)
    u = z / s
    return np.mean(s * (u * (2 * norm.cdf(u) - 1) + 2 * norm.pdf(u) - 1 / np.sqrt(np.pi)))


def test_levels_are_log_spaced_over_the_range_with_both_ends():
    levels = calibration_sn_levels((30.0, 200.0))
    assert len(levels) == 6 and levels[0] == pytest.approx(30.0) and levels[-1] == pytest.approx(200.0)
    np.testing.assert_allclose(np.diff(np.log(levels)), np.log(200.0 / 30.0) / 5)
    assert calibration_sn_levels((200.0, 30.0)) == levels  # either order
    assert calibration_sn_levels((50.0, 50.0)) == (50.0,)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_crps_factor_of_gaussian_residuals_is_their_variance(scale):
    z = np.random.default_rng(1).standard_normal(40000) * scale
    assert crps_variance_factor(z) == pytest.approx(scale**2, rel=0.03)


def test_crps_factor_is_the_minimum_of_the_mean_crps_and_lies_inside_the_likelihoods_for_heavy_tails():
    rng = np.random.default_rng(2)
    z = rng.standard_t(3, 20000) / np.sqrt(3.0)  # unit variance, heavy tails
    factor = crps_variance_factor(z)
    for step in (0.97, 1.03):
        assert mean_crps(z, factor) < mean_crps(z, factor * step)
    likelihood = np.mean(z**2)  # the Gaussian maximum-likelihood factor
    coverage = np.quantile(np.abs(z), norm.cdf(1) - norm.cdf(-1)) ** 2  # the factor that puts 68.3 % within 1σ
    assert coverage < factor < likelihood


def test_crps_factor_without_information_is_one():
    assert crps_variance_factor([]) == 1.0
    assert crps_variance_factor(np.zeros(10)) == 1.0


def test_level_factors_recover_a_known_sn_trend_and_ignore_absent_labels():
    rng = np.random.default_rng(3)
    per_level = 6000
    truth = np.array([[2.0, 0.5], [1.0, 1.0], [0.4, 3.0]])  # (level, label)
    level = np.repeat(np.arange(3), per_level)
    variance = rng.uniform(0.5, 2.0, size=(3 * per_level, 2))
    residual = rng.standard_normal(variance.shape) * np.sqrt(variance * truth[level])
    mask = np.ones_like(variance)
    mask[::3, 1] = 0
    residual[::3, 1] = 1e6  # an absent label must not count
    factors = noise_level_factors(residual**2, variance, level, 3, mask)
    np.testing.assert_allclose(factors, truth, rtol=0.06)


def test_factor_interpolates_in_log_noise_and_holds_the_end_values():
    levels = {"sn": [200.0, 60.0, 30.0], "log_noise_sq": [-10.0, -8.0, -6.0],
              "variance_factor": [[1.0, 0.5], [1.0, 1.0], [4.0, 2.0]]}
    x = np.array([-12.0, -10.0, -9.0, -7.0, -6.0, -3.0])
    factor = noise_variance_factor(levels, x)
    assert factor.shape == (6, 2)
    np.testing.assert_allclose(factor[:, 0], [1.0, 1.0, 1.0, 2.0, 4.0, 4.0])
    np.testing.assert_allclose(factor[:, 1], [0.5, 0.5, np.sqrt(0.5), np.sqrt(2.0), 2.0, 2.0])


def test_noise_at_chosen_sn_is_the_noise_model_of_a_drawn_sn():
    rng = np.random.default_rng(5)
    flux = 1.0 - 0.3 * rng.uniform(size=(50, 300))
    rel_sn = rng.uniform(0.5, 1.5, 300)
    drawn, sn = noisy_copy(flux, rel_sn, (20.0, 90.0), (-0.01, 0.01), seed=(7, 1))
    chosen_rng = np.random.default_rng((7, 1))
    chosen_rng.uniform(20.0, 90.0, size=50)  # what noisy_copy draws first
    np.testing.assert_array_equal(noisy_copy_at(flux, rel_sn, sn, (-0.01, 0.01), chosen_rng), drawn)
    # and the pixel noise is 1 / (S/N · rel_sn), continuum factors within the range
    at = noisy_copy_at(np.ones((4000, 300)), rel_sn, np.full(4000, 50.0), (0.0, 0.0), seed=3)
    np.testing.assert_allclose(np.std(at, axis=0) * 50.0 * rel_sn, 1.0, rtol=0.1)


def test_levels_the_noise_estimate_cannot_tell_apart_are_pooled_into_one_knot():
    rng = np.random.default_rng(6)
    level_sn = (20.0, 40.0, 80.0, 160.0)
    level = np.repeat(np.arange(4), 500)
    # a noise estimate that follows the S/N up to 40 and then saturates at a floor (lines, not noise)
    true_log = np.array([np.log(1 / 20.0**2), np.log(1 / 40.0**2), -8.50, -8.52])
    x = true_log[level] + 0.01 * rng.standard_normal(level.size)
    groups, knots = pooled_noise_levels(x, level, level_sn)
    assert groups == [[3, 2], [1], [0]]  # highest S/N first; 160 and 80 pooled
    assert np.all(np.diff(knots) >= 0.1)
    np.testing.assert_allclose(knots[1:], true_log[[1, 0]], atol=0.01)
    # separated levels stay alone, whatever order they are given in
    groups, _ = pooled_noise_levels(np.log(1 / np.asarray(level_sn)[level] ** 2), level, level_sn)
    assert groups == [[3], [2], [1], [0]]
