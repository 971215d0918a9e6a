"""Bad pixels, continuum normalisation and rest frame for survey spectra, and anna-infer on a real survey file."""

import csv
import os

import numpy as np
import pytest

from anna.badpixels import bad_on_grid, bad_runs, fill_bad, random_bad_mask
from anna.continuum import continuum_settings, normalise
from anna.survey import SurveySpectrum, read_survey_file
from anna.survey.prepare import survey_onto_grid

DATA = os.path.join(os.path.dirname(__file__), "data")
LRS_IMAGE = os.path.join(DATA, "spec-58397-EG014118N254444M01_sp03-031.cut.fits")
C_KMS = 299792.458


def line_spectrum(wavelength, centres, depths, width=0.8):
    profile = depths[:, None] * np.exp(-0.5 * ((wavelength[None, :] - centres[:, None]) / width) ** 2)
    return 1.0 - profile.sum(axis=0)


def test_fill_bad_interpolates_short_runs_and_sets_long_runs_and_ends_to_continuum():
    flux = np.arange(20, dtype=np.float64) + 10.0
    bad = np.zeros(20, dtype=bool)
    bad[[0, 4, 5, 9, 10, 11, 12, 13, 14, 19]] = True
    filled = fill_bad(flux, bad, "INTERPOLATE", max_gap=5)
    np.testing.assert_allclose(filled[[4, 5]], [14.0, 15.0])  # between 13 and 16
    assert (filled[[0, 9, 10, 11, 12, 13, 14, 19]] == 1.0).all()  # ends and a run of 6
    assert (fill_bad(flux, bad, "CONTINUUM")[bad] == 1.0).all()
    np.testing.assert_array_equal(filled[~bad], flux[~bad])


def loop_fill(flux, bad, max_gap=5):
    """INTERPOLATE run by run, as a plain loop: the reference the array form of fill_bad must equal exactly."""
    out = np.array(flux, copy=True)
    for row in range(out.shape[0]):
        starts, stops = bad_runs(bad[row])
        for start, stop in zip(starts, stops):
            if start == 0 or stop == out.shape[1] or stop - start > max_gap:
                out[row, start:stop] = 1.0
            else:
                left, right = float(out[row, start - 1]), float(out[row, stop])
                out[row, start:stop] = left + (right - left) * (np.arange(1, stop - start + 1) / (stop - start + 1))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fill_bad_equals_the_run_by_run_loop(dtype):
    rng = np.random.default_rng(8)
    flux = (1.0 + rng.normal(0.0, 0.05, (200, 301))).astype(dtype)
    bad = random_bad_mask(rng, flux.shape, 0.1)
    bad[0, :] = True  # a row with no good pixel
    bad[1, :] = False
    flux[bad] = np.nan  # never read
    filled = fill_bad(flux, bad, "INTERPOLATE")
    assert filled.dtype == dtype
    np.testing.assert_array_equal(filled, loop_fill(flux, bad))


def test_bad_on_grid_marks_neighbours_of_bad_samples_and_gaps():
    wave = np.concatenate([np.arange(100.0, 110.0), np.arange(120.0, 130.0)])
    bad = np.zeros(wave.size, dtype=bool)
    bad[3] = True
    grid = np.arange(100.25, 129.0, 0.5)
    marks = bad_on_grid(wave, bad, grid)
    expected = ((grid > 102) & (grid < 104)) | ((grid > 109) & (grid < 120))
    np.testing.assert_array_equal(marks, expected)


def test_random_bad_mask_fraction_and_runs():
    mask = random_bad_mask(np.random.default_rng(3), (400, 1000), 0.05)
    assert 0.04 < mask.mean() < 0.06
    runs = np.diff(mask.astype(np.int8), axis=1)
    assert (runs == 1).sum() < mask.sum() * 0.8  # many pixels come in runs


def test_masked_pixels_never_reach_the_network_real_lamost_file():
    """The real LAMOST file's masked pixels: every grid point beside one holds the neutral value, none holds the
    file's raw flux there."""
    _, (spectrum,) = read_survey_file(LRS_IMAGE)
    grid = np.arange(3760.0, 4440.0, 0.9)
    from anna.infer import spectra_onto_grid

    settings = continuum_settings("SPLINE")
    flux, flags, fraction, _, _ = survey_onto_grid([spectrum], grid, spectra_onto_grid, continuum=settings,
                                                   fill="CONTINUUM")
    # independent: grid points whose bracketing samples include a bad one
    right = np.searchsorted(spectrum.wavelength, grid, side="right")
    expected = spectrum.bad[right - 1] | spectrum.bad[right]
    assert expected.sum() > 5 and flags == [set()]
    assert (flux[0][expected] == 1.0).all()
    assert fraction[0] == pytest.approx(expected.mean())
    good = ~expected
    assert 0.3 < np.median(flux[0][good]) < 1.2  # normalised
    raw_normalised, _, _ = normalise(spectrum.wavelength, spectrum.flux, bad=spectrum.bad, settings=settings)
    bad_values = raw_normalised[spectrum.bad]
    assert not np.isin(flux[0][expected], bad_values[bad_values != 1.0]).any()


def test_continuum_round_trip_blackbody_within_half_percent():
    wave = np.linspace(4000.0, 8000.0, 4000)
    rng = np.random.default_rng(1)
    centres, depths = rng.uniform(4050, 7950, 60), rng.uniform(0.1, 0.7, 60)
    normalised = line_spectrum(wave, centres, depths)
    temperature = 5800.0
    centimetres = wave * 1e-8
    planck = 1.0 / (centimetres ** 5 * (np.exp(1.4388 / (centimetres * temperature)) - 1.0))
    continuum = planck / planck.mean()
    line_free = np.all(np.abs(wave[None, :] - centres[:, None]) > 4.0, axis=0)
    recovered, _, level = normalise(wave, normalised * continuum, settings=continuum_settings("SPLINE"))
    assert np.max(np.abs(level[line_free] / continuum[line_free] - 1)) < 0.005
    assert np.max(np.abs(recovered[line_free] - 1)) < 0.005
    # the running quantile is biased at the ends by its window; documented as the rougher method
    _, _, level = normalise(wave, normalised * continuum, settings=continuum_settings("QUANTILE"))
    assert np.max(np.abs(level[line_free] / continuum[line_free] - 1)) < 0.01


def test_rv_correct_moves_a_shifted_spectrum_to_the_rest_frame():
    from anna.infer import spectra_onto_grid

    rest = np.linspace(5000.0, 5100.0, 2000)
    centres, depths = np.linspace(5010, 5090, 9), np.full(9, 0.5)
    velocity = 87.5
    observed = rest * (1 + velocity / C_KMS)
    spectrum = SurveySpectrum(name="s", wavelength=observed, flux=line_spectrum(rest, centres, depths),
                              velocity=velocity, velocity_key="Z")
    grid = np.linspace(5005.0, 5095.0, 900)
    truth = line_spectrum(grid, centres, depths)
    shifted, _, _, used, _ = survey_onto_grid([spectrum], grid, spectra_onto_grid, rv_correct=True)
    unshifted, _, _, none, _ = survey_onto_grid([spectrum], grid, spectra_onto_grid, rv_correct=False)
    assert used[0] == velocity and np.isnan(none[0])
    assert np.max(np.abs(shifted[0] - truth)) < 2e-3
    assert np.max(np.abs(unshifted[0] - truth)) > 0.2


def test_anna_infer_on_a_real_survey_file(tmp_path):
    from anna.infer import run_infer
    from anna.model import NetworkSpec, build_network, save_frozen
    from toy_model import make_config

    grid = np.arange(3760.0, 4440.0, 1.0)
    spec = NetworkSpec(npix=grid.size, nout=2, conv_layers=((3, 4),), fc_dims=(8,))
    model_dir = save_frozen(str(tmp_path / "model"), build_network(spec), spec,
                            {"output_names": ["a", "b"], "wavelengths": list(grid), "min_params": [0, 0],
                             "max_params": [1, 1], "training_domain": None, "bad_pixel_fill": "INTERPOLATE",
                             "continuum": continuum_settings("SPLINE")})
    cfg = make_config(tmp_path, infer_model_loc=os.path.dirname(model_dir), infer_save_loc=tmp_path / "out",
                      infer_mode="FITS", infer_files=LRS_IMAGE, infer_batch_size=8, rv_correct="YES",
                      max_bad_pixel_fraction=0.01)
    written = run_infer(cfg, report=lambda line: None)
    with open(written[0], encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    row = rows[0]
    assert float(row["bad_pixel_fraction"]) > 0.01 and "many_bad_pixels" in row["flags"]
    assert float(row["rv_used"]) == pytest.approx(-1.919, abs=1e-3)
    assert np.isfinite(float(row["a"]))
    cfg = make_config(tmp_path, infer_model_loc=os.path.dirname(model_dir), infer_save_loc=tmp_path / "out2",
                      infer_mode="FITS", infer_files=LRS_IMAGE, continuum="QUANTILE")
    from anna.errors import AnnaInputError

    with pytest.raises(AnnaInputError, match="CONTINUUM SPLINE"):
        run_infer(cfg, report=lambda line: None)


def test_bad_pixel_fraction_augmentation_fills_like_inference():
    from anna.augment import NoiseModel, drop_pixels

    rng = np.random.default_rng(0)
    flux = (1.0 + rng.normal(0, 0.01, (300, 500))).astype(np.float32)
    noise = NoiseModel(np.ones(500), (50, 100), (0, 0), bad_pixel_fraction=0.05, bad_pixel_fill="CONTINUUM")
    dropped = drop_pixels(flux, noise, np.random.default_rng(1))
    assert dropped.dtype == np.float32 and 0.04 < np.mean(dropped == 1.0) < 0.06
    assert drop_pixels(flux, NoiseModel(np.ones(500), (50, 100), (0, 0)), rng) is flux


def test_anna_pack_from_a_survey_file_prepares_it_as_anna_infer_does(tmp_path):
    """Labels from an allStar-like FITS table matched by APOGEE id; the pack row equals anna-infer's grid flux."""
    from astropy.table import Table

    from anna.infer import spectra_onto_grid
    from anna.packer import build_pack_from_spectra
    from anna.packs import open_pack

    apstar = os.path.join(DATA, "apStar-r6-2M00452143+1634446.cut.fits")
    table = Table({"APOGEE_ID": ["2M00000000+0000000", "2M00452143+1634446"], "TEFF": [5000.0, 4321.5],
                   "LOGG": [3.0, 2.25], "X_H_SPEC": np.zeros((2, 3))})
    table.write(tmp_path / "allStar-like.fits")
    grid = np.arange(15300.0, 15400.0, 0.25)
    settings = continuum_settings("SPLINE")
    out = build_pack_from_spectra([apstar], tmp_path / "allStar-like.fits", grid, tmp_path / "train.pack",
                                  id_column="APOGEE_ID", label_columns=["TEFF", "LOGG"], continuum=settings)
    pack = open_pack(out)
    _, rows = read_survey_file(apstar)
    expected, _, fraction, _, _ = survey_onto_grid(rows[:1], grid, spectra_onto_grid, continuum=settings)
    ids, labels, flux = pack.read_rows(0, 1)
    np.testing.assert_allclose(labels, [[4321.5, 2.25]])
    np.testing.assert_allclose(flux[0], expected[0], rtol=1e-12, atol=1e-12)
    assert 0 < fraction[0] < 0.2 and 0.5 < np.median(flux) < 1.5


def test_anna_pack_asks_which_spectrum_of_a_multi_spectrum_file(tmp_path):
    from anna.errors import AnnaInputError
    from anna.packer import build_pack_from_spectra

    mrs = os.path.join(DATA, "med-58408-TD230151N343645T01_sp01-015.cut.fits")
    (tmp_path / "labels.csv").write_text("star_id,teff\n681001015,5800\n")
    with pytest.raises(AnnaInputError, match="choose one with --spectrum"):
        build_pack_from_spectra([mrs], tmp_path / "labels.csv", np.arange(5010.0, 5070.0, 0.2), tmp_path / "p")
    out = build_pack_from_spectra([mrs], tmp_path / "labels.csv", np.arange(5010.0, 5070.0, 0.2), tmp_path / "p",
                                  spectrum_name="COADD_B", continuum=continuum_settings("QUANTILE"))
    assert os.path.exists(out)



def test_training_producer_drops_pixels_as_bad_pixel_fraction_says(toy_packs):
    """The training batch producer itself (the path anna-train runs) with BAD_PIXEL_FRACTION 0.05."""
    from anna.augment import BatchProducer, NoiseModel, PackRows
    from anna.model import LabelScaler
    from anna.packs import open_pack

    pack = open_pack(toy_packs["train"])
    noise = NoiseModel(np.ones(pack.npix), (100.0, 200.0), (0.0, 0.0), bad_pixel_fraction=0.05,
                       bad_pixel_fill="CONTINUUM")
    producer = BatchProducer(PackRows(pack), LabelScaler([0, 10], [1, 30]), noise, batch_size=64, seed=3, stage=1,
                             fetch=512)
    flux, _, _ = producer._draw_chunk(0)
    assert 0.035 < np.mean(flux == 1.0) < 0.065
    plain = BatchProducer(PackRows(pack), LabelScaler([0, 10], [1, 30]),
                          NoiseModel(np.ones(pack.npix), (100.0, 200.0), (0.0, 0.0)), batch_size=64, seed=3,
                          stage=1, fetch=512)
    assert np.mean(plain._draw_chunk(0)[0] == 1.0) < 0.001
