"""MC dropout's noise from a file's own errors, and the bad-pixel fraction on every anna-infer row.

One small network with a variance head, untrained: its misfit and noise-gain layers start with zero kernels,
so the head's variance is exactly e^fit + e^gain · (σ² + NOISE_FLOOR²) with the starting biases, and the σ the
head read can be checked against a hand computation from the reported ``err_pred``.  The inputs: the real
LAMOST LRS file of tests/data (inverse variances), plain 1-D FITS files with an ERROR extension holding the
same noisy flux with stated errors of 0.01 and 0.03, and text spectra (no errors: DER_SNR).
"""

import csv
import os

import numpy as np
import pytest
from astropy.io import fits

from anna.continuum import continuum_settings, normalise
from anna.model import INITIAL_LOG_NOISE_GAIN, INITIAL_LOG_VARIANCE_FIT, NOISE_FLOOR

DATA = os.path.join(os.path.dirname(__file__), "data")
LRS_IMAGE = os.path.join(DATA, "spec-58397-EG014118N254444M01_sp03-031.cut.fits")
GRID = np.arange(3760.0, 4440.0, 1.0)
MAXIMA = np.array([1.0, 2.0])  # minima 0: the span of each label
SPLINE = continuum_settings("SPLINE")
SAMPLES = 8


def head_sigma(noise):
    """The untrained head's σ_pred in physical units (nout columns) for noise σ (n,), by hand."""
    variance = np.exp(INITIAL_LOG_VARIANCE_FIT) + np.exp(INITIAL_LOG_NOISE_GAIN) * (noise**2 + NOISE_FLOOR**2)
    return np.sqrt(variance)[:, None] * MAXIMA[None, :]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import keras

    from anna.model import NetworkSpec, build_network, save_frozen

    keras.utils.set_random_seed(3)
    spec = NetworkSpec(npix=GRID.size, nout=2, conv_layers=((3, 4),), fc_dims=(8,), heteroscedastic=True)
    folder = tmp_path_factory.mktemp("noise-model")
    save_frozen(str(folder), build_network(spec, dropout_rate=0.2), spec,
                {"output_names": ["a", "b"], "wavelengths": list(GRID), "min_params": [0, 0],
                 "max_params": list(MAXIMA), "training_domain": None, "bad_pixel_fill": "INTERPOLATE",
                 "continuum": SPLINE, "mc_dropout_rate": 0.2})
    return str(folder)


def line_flux(wavelength):
    centres = np.linspace(3800.0, 4400.0, 25)
    return 1.0 - 0.4 * np.exp(-0.5 * ((wavelength[:, None] - centres[None, :]) / 1.5) ** 2).sum(axis=1)


def write_plain_fits(path, start, step, flux, error):
    """A 1-D FITS spectrum (CRVAL1/CDELT1) with its one-sigma errors in an ERROR extension."""
    primary = fits.PrimaryHDU(flux.astype(np.float32))
    primary.header.update({"CRVAL1": start, "CDELT1": step, "CRPIX1": 1.0, "CTYPE1": "LINEAR", "DC-FLAG": 0})
    fits.HDUList([primary, fits.ImageHDU(error.astype(np.float32), name="ERROR")]).writeto(path)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def noise_by_hand(wavelength, flux, sigma, good):
    """Median of σ / continuum (the SPLINE continuum the model records) over the good pixels inside the grid."""
    _, scaled, _ = normalise(wavelength, flux, error=sigma, bad=~good, settings=SPLINE)
    inside = (wavelength >= GRID[0]) & (wavelength <= GRID[-1])
    return float(np.median(scaled[good & inside & np.isfinite(scaled)]))


def lamost_noise_by_hand():
    """:func:`noise_by_hand` of the LAMOST file, from its raw image rows (flux, ivar, wavelength, and-mask)."""
    with fits.open(LRS_IMAGE) as hdus:
        flux, ivar, wavelength, andmask = np.asarray(hdus[0].data[:4], dtype=np.float64)
    good = (ivar > 0) & (andmask == 0) & np.isfinite(flux)
    sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.inf)
    return noise_by_hand(wavelength, flux, sigma, good)


def test_the_variance_head_reads_the_files_own_errors_and_der_snr_without(tmp_path, model_dir):
    from anna.domain import der_snr_noise
    from anna.infer import run_infer, spectra_onto_grid
    from toy_model import make_config

    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(LRS_IMAGE, folder / "lamost.fits")
    wave = 3700.0 + 0.5 * np.arange(1500)
    noisy = line_flux(wave) + np.random.default_rng(1).normal(0.0, 0.01, wave.size)
    write_plain_fits(folder / "stated1.fits", wave[0], 0.5, noisy, np.full(wave.size, 0.01))
    write_plain_fits(folder / "stated3.fits", wave[0], 0.5, noisy, np.full(wave.size, 0.03))
    np.savetxt(folder / "plain.txt", np.c_[wave, noisy])
    holed = noisy.copy()
    holed[700] = np.nan  # 4050 A, a grid point (the stencils of the grid points around it read it too)
    np.savetxt(folder / "holed.txt", np.c_[wave, holed])
    cfg = make_config(tmp_path, infer_model_loc=model_dir, infer_save_loc=tmp_path / "out", infer_mode="FITS",
                      infer_files=folder / "*", mc_samples=SAMPLES, seed=4)
    run_infer(cfg, report=lambda line: None)
    out = {name: read_rows(tmp_path / "out" / f"{name}_infer.out")
           for name in ("lamost", "stated1", "stated3", "plain", "holed")}

    # the real LAMOST file: its ivar-derived noise, by hand, and the head's sigma from it
    [lamost] = out["lamost"]
    assert list(lamost)[:4] == ["star_id", "file", "spectrum", "rv_used"]
    assert list(lamost)[-5:] == ["b_err_pred", "noise", "noise_source", "bad_pixel_fraction", "flags"]
    assert lamost["noise_source"] == "errors"
    expected = lamost_noise_by_hand()
    assert 0.005 < expected < 0.5
    assert float(lamost["noise"]) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose([float(lamost["a_err_pred"]), float(lamost["b_err_pred"])],
                               head_sigma(np.array([expected]))[0], rtol=1e-5)
    assert float(lamost["bad_pixel_fraction"]) > 0.01

    # the same flux with stated errors of 0.01 and 0.03, and without errors (DER_SNR of the flux on the grid)
    rows = {name: out[name][0] for name in ("stated1", "stated3", "plain")}
    assert [rows[name]["noise_source"] for name in rows] == ["errors", "errors", "DER_SNR"]
    stored = noisy.astype(np.float32).astype(np.float64)  # the file holds float32
    by_hand = noise_by_hand(wave, stored, np.full(wave.size, np.float32(0.01), dtype=np.float64), np.ones(wave.size, bool))
    assert float(rows["stated1"]["noise"]) == pytest.approx(by_hand, rel=1e-6)
    assert float(rows["stated3"]["noise"]) == pytest.approx(3 * float(rows["stated1"]["noise"]), rel=1e-6)
    on_grid, _ = spectra_onto_grid([(wave, noisy)], GRID)
    assert float(rows["plain"]["noise"]) == pytest.approx(float(der_snr_noise(on_grid)[0]), rel=1e-5)
    for name, row in rows.items():
        np.testing.assert_allclose([float(row["a_err_pred"]), float(row["b_err_pred"])],
                                   head_sigma(np.array([float(row["noise"])]))[0], rtol=1e-5, err_msg=name)
    # larger stated errors, larger sigma; the labels themselves do not depend on the noise
    for label in ("a", "b"):
        assert float(rows["stated3"][f"{label}_err_pred"]) > 1.5 * float(rows["stated1"][f"{label}_err_pred"])
        assert float(rows["stated3"][f"{label}_err"]) > float(rows["stated1"][f"{label}_err"])
    # every row has its bad-pixel fraction: none here, and a text spectrum's one non-finite sample marks the grid
    # point it lies on (the rule of anna.badpixels.bad_on_grid) and makes the spectrum fatal
    assert [row["bad_pixel_fraction"] for row in rows.values()] == ["0.0000"] * 3
    [holed_row] = out["holed"]
    assert holed_row["flags"] == "nonfinite" and holed_row["noise"] == "nan"
    assert float(holed_row["bad_pixel_fraction"]) == pytest.approx(1 / GRID.size, abs=5e-5)


def test_without_file_errors_the_prediction_is_unchanged_bit_for_bit(model_dir):
    """A noise of NaN (no file errors) gives exactly the values of the DER_SNR-only sampling; a finite noise in
    one row changes that row's err_pred only."""
    from anna.domain import der_snr_noise
    from anna.model import load_frozen

    wave = GRID
    rng = np.random.default_rng(5)
    flux = (line_flux(wave)[None, :] + rng.normal(0.0, 0.02, (6, wave.size))).astype(np.float32)
    plain = load_frozen(model_dir, dropout_seed=0).predict_with_uncertainty(flux, samples=SAMPLES)
    unknown = load_frozen(model_dir, dropout_seed=0).predict_with_uncertainty(
        flux, samples=SAMPLES, noise=np.full(len(flux), np.nan))
    for key in ("value", "sigma_model", "sigma_pred", "sigma_total"):
        np.testing.assert_array_equal(unknown[key], plain[key], err_msg=key)
    np.testing.assert_allclose(unknown["noise"], der_snr_noise(flux), rtol=1e-5)
    given = np.full(len(flux), np.nan)
    given[2] = 0.2
    mixed = load_frozen(model_dir, dropout_seed=0).predict_with_uncertainty(flux, samples=SAMPLES, noise=given)
    np.testing.assert_array_equal(mixed["value"], plain["value"])
    np.testing.assert_array_equal(np.delete(mixed["sigma_pred"], 2, axis=0), np.delete(plain["sigma_pred"], 2, axis=0))
    assert mixed["noise"][2] == pytest.approx(0.2)
    np.testing.assert_allclose(mixed["sigma_pred"][2], head_sigma(np.array([0.2]))[0], rtol=1e-5)
    assert (mixed["sigma_pred"][2] > 3 * plain["sigma_pred"][2]).all()


def test_nonfinite_fraction_of_pack_rows():
    from anna.infer import grid_flags_and_bad_fraction

    flux = np.ones((300, 50), dtype=np.float32)
    flux[7, [3, 9, 11]] = np.nan
    flux[200, :] = np.inf
    flags, fraction = grid_flags_and_bad_fraction(flux)
    expected = np.zeros(300)
    expected[7], expected[200] = 3 / 50, 1.0
    np.testing.assert_array_equal(fraction, expected)
    assert [row for row, words in enumerate(flags) if words] == [7, 200]
    assert flags[7] == flags[200] == {"nonfinite"}
