"""Survey-size example data: APOGEE- and LAMOST-like grids, the survey line list, S/N templates, anna-synth --grid."""

import configparser
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anna import synth
from anna.errors import AnnaInputError
from anna.packs import open_pack
from anna.templates import read_two_columns, relative_sn_on_grid

ROOT = Path(__file__).resolve().parents[1]
LABELS = np.array([[5772.0, 4.44, 0.0, 1.0, 2.0], [4000.0, 2.7, -0.5, 0.0, 0.0], [7000.0, 4.8, 0.2, 3.0, 40.0],
                   [5100.0, 3.3, -0.2, 1.7, 11.0]])
VELOCITIES = [0.5, -1.9, 2.0, 0.0]


@pytest.fixture(scope="module")
def apogee():
    return synth.survey_grid("apogee")


# ---------------------------------------------------------------------------------------------------------
# Grids


def test_apogee_grid_is_three_log_linear_chips_of_7214_pixels():
    grid, resolution = synth.survey_grid("apogee")
    assert resolution == 22500.0
    assert grid.shape == (7214,)
    assert 15100.0 < grid[0] < 15200.0 and 16900.0 < grid[-1] < 16960.0
    steps = np.diff(np.log10(grid))
    gaps = np.flatnonzero(steps > 2 * synth.APOGEE_LOG_STEP)
    assert list(gaps + 1) == [2920, 5320]  # chips of 2920, 2400 and 1894 pixels
    inside = np.delete(steps, gaps)
    np.testing.assert_allclose(inside, synth.APOGEE_LOG_STEP, rtol=1e-7)
    # the gaps are whole numbers of apStar pixels: the chips sit on one log-linear lattice
    np.testing.assert_allclose(steps[gaps] / synth.APOGEE_LOG_STEP, [407.0, 365.0], atol=1e-6)
    np.testing.assert_array_equal(grid, synth.apogee_grid())


def test_lamost_grid_is_log_linear_3700_to_9100():
    grid, resolution = synth.survey_grid("lamost")
    assert resolution == 1800.0
    assert grid.shape == (3909,)
    assert grid[0] == pytest.approx(3700.0, abs=0.5) and grid[-1] == pytest.approx(9100.0, abs=1.5)
    np.testing.assert_allclose(np.diff(np.log10(grid)), 1e-4, rtol=1e-7)


def test_tutorial_grid_name_and_unknown_names():
    grid, resolution = synth.survey_grid("tutorial")
    np.testing.assert_array_equal(grid, synth.default_grid())
    assert resolution == 11000.0
    with pytest.raises(AnnaInputError, match="unknown grid"):
        synth.survey_grid("gaia")
    with pytest.raises(AnnaInputError, match="line_list"):
        synth.synthesize(grid, LABELS[:1], line_list="vald")


# ---------------------------------------------------------------------------------------------------------
# The tutorial model is untouched


TUTORIAL_SHA256 = "297db00f4ed3a7009834c89dce133a7d48c98ce79e5970f7afff025cfa4ec887"
TUTORIAL_SUMS = [993.1553634339832, 992.6633033630462, 994.2412249924057, 990.1162309970894]
TUTORIAL_PIXELS = [0, 137, 266, 391, 500, 613, 789, 1000]
TUTORIAL_VALUES = [
    [0.9828310626790663, 0.9999973275876288, 0.8460076400105753, 0.9795058284864864, 0.9918091973352164,
     0.9996865855246816, 0.9999630464208114, 0.9999945769142441],
    [0.9109005207049676, 0.9999897850347247, 0.8617039754011678, 0.9613611634535664, 0.9917806743149065,
     0.9994140449066166, 0.9998168800471907, 0.9999959993630314],
    [0.9986271330034, 0.9999994069249915, 0.8655207751733605, 0.9911468773359629, 0.995305161314468,
     0.9995240208527947, 0.9996053499616909, 0.9999977995246058],
    [0.9527363560285331, 0.9999967266023575, 0.811635481470055, 0.9587648349039456, 0.9871822174551959,
     0.9991239781061653, 0.9998141538995775, 0.9999963932776377]]


def test_tutorial_spectra_are_unchanged():
    """Values recorded with the generator as it was before the survey line list existed."""
    for line_list in ({}, {"line_list": "tutorial"}):
        flux = synth.synthesize(synth.default_grid(), LABELS, rv_kms=VELOCITIES, **line_list)
        digest = hashlib.sha256(np.ascontiguousarray(flux, dtype="<f8").tobytes()).hexdigest()
        if digest != TUTORIAL_SHA256:  # bit for bit where recorded; elsewhere BLAS/FFT rounding may differ
            np.testing.assert_allclose(flux.sum(axis=1), TUTORIAL_SUMS, rtol=1e-12)
            np.testing.assert_allclose(flux[:, TUTORIAL_PIXELS], TUTORIAL_VALUES, rtol=0, atol=1e-12)


def test_tutorial_line_list_leaves_survey_grids_bare():
    grid, resolution = synth.survey_grid("apogee")
    flux = synth.synthesize(grid[:50], LABELS[:1], resolution=resolution)
    np.testing.assert_array_equal(flux, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Survey line list


def test_survey_line_list_is_dense_mixed_and_deterministic():
    table = synth.survey_line_table()
    wave, species = table["wavelength"], table["species"]
    assert (np.diff(wave) >= 0).all()
    h_band = (wave > 15140.0) & (wave < 16960.0)
    optical = (wave > 3700.0) & (wave < 9100.0)
    assert 1000 < h_band.sum() < 4000 and 2000 < optical.sum() < 8000
    for name in ("Fe I", "Si I", "Mg I", "Ca I", "Ti I", "Al I", "Na I", "K I", "C I", "Mn I", "Ni I", "Cr I",
                 "CO", "OH", "CN", "H I"):
        assert (species[h_band] == name).any(), name
    for name in ("Fe I", "Fe II", "Mg I", "Ca I", "Ca II", "Na I", "K I", "Ti I", "Ti II", "Cr I", "Mn I",
                 "Ni I", "Sr II", "Ba II", "CH", "CN", "MgH", "TiO", "H I"):
        assert (species[optical] == name).any(), name
    # the tutorial window keeps exactly the tutorial's 58 real lines
    window = (wave >= 6590.0) & (wave <= 6860.0)
    np.testing.assert_array_equal(wave[window], [row[0] for row in synth.LINE_LIST])
    # hydrogen: Balmer and Brackett series at their air wavelengths
    hydrogen = wave[species == "H I"]
    assert np.abs(hydrogen - 6562.8).min() < 0.1 and np.abs(hydrogen - 16806.5).min() < 0.5  # Rydberg formula
    sub = synth.survey_line_table(15000.0, 16000.0)
    assert (sub["wavelength"] >= 15000.0).all() and (sub["wavelength"] <= 16000.0).all()
    np.testing.assert_array_equal(sub["log_gf"], table["log_gf"][(wave >= 15000.0) & (wave <= 16000.0)])


def test_pseudo_lines_are_calibrated_on_the_sun():
    """A pseudo line's log gf gives it its drawn solar width: the Sun's lines span 0.1-200 mA, and the
    strongest real lines come out with plausible solar equivalent widths."""
    table = synth.survey_line_table()
    width, _, _ = synth._survey_line_parameters(np.array([synth.SOLAR_LABELS]), table)
    ew_ma = 1e3 * width[0] * table["wavelength"] / synth.SPEED_OF_LIGHT_KMS
    by_line = dict(zip(np.round(table["wavelength"], 2), ew_ma))
    assert 3000 < by_line[6562.88] < 5000  # H alpha, about 4 A
    assert 5000 < by_line[3933.66] < 30000  # Ca II K
    assert 200 < by_line[5889.95] < 1500  # Na D2
    assert 20 < by_line[15163.07] < 400  # K I in the H band
    assert np.median(ew_ma) < 30.0


# ---------------------------------------------------------------------------------------------------------
# Survey-mode spectra


def test_every_label_moves_the_apogee_spectrum_above_noise_and_differently(apogee):
    grid, resolution = apogee
    base = np.array([5000.0, 3.5, -0.2, 1.5, 10.0])
    steps = [150.0, 0.25, 0.1, 0.5, 5.0]
    labels = np.vstack([base] + [base + step * np.eye(5)[j] for j, step in enumerate(steps)])
    flux = synth.synthesize(grid, labels, resolution=resolution, line_list="survey")
    assert np.isfinite(flux).all() and flux.min() > 0.0 and flux.max() <= 1.0
    change = flux[1:] - flux[0]
    # each label moves some pixels by more than 3 sigma of noise at S/N 100
    assert (np.abs(change).max(axis=1) > 0.03).all(), np.abs(change).max(axis=1)
    # and in its own pattern: no two labels' signatures are nearly proportional
    correlation = np.corrcoef(change)
    assert np.abs(correlation[np.triu_indices(5, 1)]).max() < 0.9, correlation


def test_label_signatures_follow_the_physics(apogee):
    grid, resolution = apogee
    table = synth.survey_line_table()

    def strongest(name, low=15168.0, high=16937.0):
        chosen = (table["species"] == name) & (table["wavelength"] > low) & (table["wavelength"] < high)
        return table["wavelength"][chosen]

    def depth(flux, centre):
        return 1.0 - flux[:, np.abs(grid - centre) < 0.25].min(axis=1)

    cool_hot = synth.synthesize(grid, np.array([[4200, 4.5, 0, 1, 3], [6500, 4.5, 0, 1, 3]]),
                                resolution=resolution, line_list="survey")
    oh = strongest("OH")
    assert np.mean([depth(cool_hot, w)[0] - depth(cool_hot, w)[1] for w in oh[:40]]) > 0.02  # molecules: cool
    brackett = synth.survey_line_table(16806.0, 16807.0)
    assert list(brackett["species"]) == ["H I"]
    width, _, _ = synth._survey_line_parameters(np.array([[4200, 4.5, 0, 1, 3], [6500, 4.5, 0, 1, 3],
                                                          [6500, 2.5, 0, 1, 3]]), brackett)
    assert width[1, 0] > 5 * width[0, 0] and width[2, 0] > 1.2 * width[1, 0]  # Brackett: hot stars, giants
    metal = synth.synthesize(grid, np.array([[5000, 3, -0.5, 1, 3], [5000, 3, 0.2, 1, 3]]),
                             resolution=resolution, line_list="survey")
    assert (1 - metal[1]).sum() > 1.5 * (1 - metal[0]).sum()  # [Fe/H]: line strengths
    rotation = synth.synthesize(grid, np.array([[5000, 3, 0, 1, 0], [5000, 3, 0, 1, 30]]),
                                resolution=resolution, line_list="survey")
    assert rotation[1].min() > rotation[0].min() + 0.05  # vsini: shallower lines...
    np.testing.assert_allclose((1 - rotation[1]).sum(), (1 - rotation[0]).sum(), rtol=0.02)  # ...same widths


def test_survey_segments_join_seamlessly(apogee):
    """Pixels are computed in segments; a sub-grid (other segment boundaries) gives the same flux."""
    grid, resolution = apogee
    full = synth.synthesize(grid[:1500], LABELS, resolution=resolution, rv_kms=VELOCITIES, line_list="survey")
    part = synth.synthesize(grid[37:1111], LABELS, resolution=resolution, rv_kms=VELOCITIES, line_list="survey")
    np.testing.assert_allclose(part, full[:, 37:1111], atol=3e-4)
    lamost, lamost_resolution = synth.survey_grid("lamost")
    full = synth.synthesize(lamost, LABELS, resolution=lamost_resolution, line_list="survey")
    part = synth.synthesize(lamost[1001:1400], LABELS, resolution=lamost_resolution, line_list="survey")
    np.testing.assert_allclose(part, full[:, 1001:1400], atol=3e-4)


def test_survey_mode_conserves_equivalent_width_and_shifts_with_rv():
    fine = np.round(np.arange(15340.0, 15560.0, 0.02), 6)
    labels = np.array([[5600.0, 4.3, 0.0, 1.2, 4.0]])
    flux = synth.synthesize(fine, labels, resolution=22500.0, line_list="survey")
    table = synth.survey_line_table(15400.0, 15500.0)
    width, _, _ = synth._survey_line_parameters(labels, table)
    expected = float((width[0] * table["wavelength"] / synth.SPEED_OF_LIGHT_KMS).sum())
    window = (fine >= 15400.0) & (fine <= 15500.0)
    measured = float(np.trapezoid(1.0 - flux[0, window], fine[window]))
    assert measured == pytest.approx(expected, rel=0.03)
    velocity = 25.0
    shifted = synth.synthesize(fine[window], labels, resolution=22500.0, rv_kms=[velocity], line_list="survey")
    rest = synth.synthesize(fine[window] / (1.0 + velocity / synth.SPEED_OF_LIGHT_KMS), labels, resolution=22500.0,
                            line_list="survey")
    np.testing.assert_allclose(shifted, rest, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------
# S/N templates and anna-synth


@pytest.mark.parametrize("name", ["apogee", "lamost"])
def test_committed_survey_sn_templates_match_the_generator(tmp_path, name):
    written = synth.write_project_templates(tmp_path)
    committed = ROOT / "templates" / f"sn.{name}.template"
    assert committed.read_bytes() == Path(written[f"sn_template_{name}"]).read_bytes()
    grid, _ = synth.survey_grid(name)
    rel_sn = relative_sn_on_grid(committed, grid)
    assert rel_sn.min() > 0.3 and rel_sn.max() == pytest.approx(1.0, abs=0.01)
    wave, values = read_two_columns(committed, "S/N template")
    assert values.max() <= 1.0 + 1e-6 and values.min() > 0.0


def test_sn_profiles_have_the_documented_shape():
    blue, green, red = (synth.apogee_relative_sn(np.array([w]))[0] for w in (15500.0, 16200.0, 16700.0))
    gap = synth.apogee_relative_sn(np.array([15840.0, 16460.0]))
    assert green > red > blue > 0.5 and (gap == 0.02).all()
    lamost = synth.lamost_relative_sn(np.array([3750.0, 5000.0, 5800.0, 7300.0, 9000.0]))
    assert lamost[3] == pytest.approx(1.0, abs=0.01)
    assert lamost[0] < lamost[1] and lamost[2] < lamost[1] and lamost[2] < lamost[4] < lamost[3]


def test_setup_cfg_installs_the_survey_templates():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    installed = config["options.data_files"]["share/anna-tf/templates"]
    for name in ("sn.apogee.template", "sn.lamost.template"):
        assert f"templates/{name}" in installed


def _anna_synth():
    script = Path(sys.executable).with_name("anna-synth")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from anna.cli import synth_main; sys.exit(synth_main())"]


def test_anna_synth_grid_apogee_writes_packs_the_reader_accepts(tmp_path):
    outdir = tmp_path / "apogee"
    result = subprocess.run(_anna_synth() + [str(outdir), "--grid", "apogee", "--n-train", "6", "--n-xval", "2",
                                             "--n-test", "2", "--n-apertures", "2", "--seed", "4"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    grid = synth.apogee_grid()
    for kind, count in (("train", 6), ("xval", 2), ("test", 2)):
        pack = open_pack(outdir / f"{kind}.pack", expected_npix=7214, expected_nout=5, check_flux=True)
        assert pack.n_stars == count
        np.testing.assert_array_equal(pack.wavelengths, grid)
        assert pack.flux.min() > 0.0 and pack.flux.max() <= 1.0 and (pack.flux < 0.97).any()
    rel_sn = relative_sn_on_grid(outdir / "sn.template", grid)  # covers the grid, else it raises
    assert rel_sn.min() > 0.3
    assert (outdir / "sn.template").read_bytes() == (ROOT / "templates" / "sn.apogee.template").read_bytes()
    wave, _ = read_two_columns(outdir / "wavelength.template", "wavelength template")
    np.testing.assert_array_equal(wave, grid)


def test_make_example_data_on_the_lamost_grid(tmp_path):
    written = synth.make_example_data(tmp_path, grid="lamost", n_train=3, n_xval=1, n_test=1, n_apertures=2)
    pack = open_pack(written["train"], expected_npix=3909, check_flux=True)
    labels = np.asarray(pack.labels)
    again = synth.synthesize(pack.wavelengths, labels[:2], resolution=1800.0, rv_kms=pack.dummy[:2],
                             line_list="survey")
    np.testing.assert_allclose(pack.flux[:2], again, atol=1e-12)
    relative_sn_on_grid(written["sn_template"], pack.wavelengths)
    from anna.fits_io import read_spectra

    spectra = read_spectra(written["multispec"])
    assert len(spectra) == 2
    assert spectra[0].wavelength[0] < pack.wavelengths[0] and spectra[0].wavelength[-1] > pack.wavelengths[-1]
