"""Cubic resampling: exact on cubics, handles non-uniform grids, and keeps line depth where linear smooths."""

import numpy as np

from anna.resample import cubic_resample, cubic_resample_rows


def test_exact_for_cubic_polynomials_on_a_nonuniform_grid():
    x = np.cumsum(np.random.default_rng(0).uniform(0.1, 0.3, 200)) + 6000
    poly = np.polynomial.Polynomial([1.0, -2e-3, 3e-6, -1e-9])
    grid = np.linspace(x[0], x[-1], 333)
    np.testing.assert_allclose(cubic_resample(x, poly(x - 6000), grid), poly(grid - 6000), rtol=1e-9, atol=1e-12)


def test_returns_samples_on_the_source_points():
    x = np.linspace(0, 10, 11)
    y = np.sin(x)
    np.testing.assert_allclose(cubic_resample(x, y, x), y, atol=1e-12)


def test_keeps_narrow_line_depth_where_linear_interpolation_smooths():
    """A line of FWHM ~3 pixels resampled from 0.18 to 0.2 A/px: cubic keeps its depth far better than linear."""
    def line(w):
        return 1 - 0.6 * np.exp(-0.5 * ((w - 6700.03) / 0.25) ** 2)

    source = np.arange(6650, 6750, 0.18)
    grid = np.arange(6660, 6740, 0.2)
    truth = line(grid)
    linear_error = np.abs(np.interp(grid, source, line(source)) - truth).max()
    cubic_error = np.abs(cubic_resample(source, line(source), grid) - truth).max()
    assert cubic_error < 0.3 * linear_error


def test_few_samples_fall_back_to_linear():
    np.testing.assert_allclose(cubic_resample([0.0, 1.0, 2.0], [0.0, 1.0, 4.0], [0.5, 1.5]), [0.5, 2.5])


def test_rows_equal_one_spectrum_at_a_time():
    """Many rows at once, each with its own sample range (and one too short for a cubic), equal cubic_resample
    of each row's own samples."""
    rng = np.random.default_rng(4)
    wavelength = np.sort(rng.uniform(6000, 6100, (5, 300)), axis=1)
    wavelength[:, 0], wavelength[:, -1] = 5990.0, 6110.0
    flux = 1.0 - 0.3 * rng.random((5, 300))
    first = np.array([0, 0, 10, 0, 148])
    last = np.array([299, 280, 299, 150, 150])
    grids = np.linspace(6020, 6040, 57)
    wavelength[4, 148:151] = [6010.0, 6030.0, 6050.0]
    got = cubic_resample_rows(wavelength, flux, first, last, grids)
    for row in range(5):
        expected = cubic_resample(wavelength[row, first[row]:last[row] + 1], flux[row, first[row]:last[row] + 1],
                                  grids)
        np.testing.assert_array_equal(got[row], expected)


def test_error_between_samples_within_the_cubic_interpolation_bound():
    """Targets between irregular samples (spacing 0.12-0.17 A) of f = 1 + A sin(2 pi x / P): the four-point
    interpolation error is at most max|f''''| / 4! * |prod (x - x_i)|, and with x between the middle two of
    four samples no more than h apart, |prod| <= (h/2)^2 * (2h)^2 = h^4, so |error| <= A (2 pi / P)^4 h^4 / 24
    (3.3e-4 here).  Linear interpolation's error reaches A (2 pi / P)^2 h^2 / 8 (3.6e-3), ten times that, so
    the bound tells the two apart; the error is not zero either (the targets are not on samples)."""
    amplitude, period = 0.1, 2.0

    def f(x):
        return 1.0 + amplitude * np.sin(2 * np.pi * (x - 6600.0) / period)

    rng = np.random.default_rng(8)
    x = 6600.0 + np.cumsum(rng.uniform(0.12, 0.17, 2000))
    h = np.diff(x).max()
    grid = np.arange(6625.0, 6825.0, 0.2)
    assert np.abs(grid[:, None] - x[None, :]).min() > 1e-4  # every target lies between samples
    bound = amplitude * (2 * np.pi / period) ** 4 * h**4 / 24
    error = np.abs(cubic_resample(x, f(x), grid) - f(grid))
    assert error.max() <= bound, (error.max(), bound)
    assert error.max() > bound / 100
    assert np.abs(np.interp(grid, x, f(x)) - f(grid)).max() > 3 * bound  # linear would fail the bound
