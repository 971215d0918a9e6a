"""anna-test: residual CSV, summary statistics, S/N bins, residual-trend correction, plots, input checks.

A tiny network is trained once per module on synthetic line spectra (64 px, three labels each setting one
line's depth), so every test runs a real frozen model end to end.
"""

import csv
import shutil
import json
from pathlib import Path

import numpy as np
import pytest

from anna.errors import AnnaInputError
from anna.correction import apply_correction, fit_correction, load_correction
from anna.evaluate import coverage_statistics, residual_statistics, run_test, sn_binned_statistics
from anna.packs import write_pack

from toy_model import NAMES, MINIMA, MAXIMA, WAVE, SHARED, toy_flux, toy_stars, train_tiny_model, make_config


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The suite's one tiny model (conftest.tiny_model_dir); the tests that fit a correction copy it first."""
    return tiny_model_dir


def make_test_config(tmp_path, model_dir, pack, **extra):
    return make_config(tmp_path, test_model_loc=model_dir, test_save_loc=tmp_path / "out", testing_data=pack,
                       test_batch_size=64, **extra)


def write_test_pack(path, n=300, seed=2, ids=None, transform=None):
    labels, flux, _ = toy_stars(n, seed)
    if transform is not None:
        labels = transform(labels)
    ids = np.arange(n) * 3.0 + 2**40 if ids is None else ids
    write_pack(path, WAVE, ids, labels, flux)
    return str(path), labels


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_stats_csv_and_summary_agree_with_numpy(tmp_path, model_dir):
    ids = np.r_[np.arange(298) + 2.0**52, 12.5, -3.0]
    pack, labels = write_test_pack(tmp_path / "test.pack", ids=ids)
    lines = []
    summary = run_test(make_test_config(tmp_path, model_dir, pack), report=lines.append)

    header, rows = read_csv(tmp_path / "out" / "test_stats.out")
    assert header == (["star_id"] + [f"true_{n}" for n in NAMES] + [f"inferred_{n}" for n in NAMES]
                      + [f"d{n}" for n in NAMES])
    assert len(rows) == 300
    assert [row[0] for row in rows[:2]] == ["4503599627370496", "4503599627370497"]
    assert [row[0] for row in rows[-2:]] == ["12.5", "-3"]
    table = np.array([[float(v) for v in row[1:]] for row in rows])
    true, inferred, d = table[:, :3], table[:, 3:6], table[:, 6:]
    np.testing.assert_array_equal(true, labels)
    np.testing.assert_array_equal(d, true - inferred)
    # the network learnt something: residuals far below the label ranges
    assert (np.sqrt(np.mean(d**2, axis=0)) < 0.15 * (MAXIMA - MINIMA)).all()

    stored = json.loads((tmp_path / "out" / "test_summary.json").read_text())
    assert stored == summary
    assert summary["n_stars"] == 300 and "sn_bins" not in summary and "correction" not in summary
    for k, name in enumerate(NAMES):
        entry, column = summary["labels"][name], d[:, k]
        assert entry["n"] == 300
        expected = {"bias_mean": column.mean(), "bias_median": np.median(column), "std": column.std(),
                    "mad_std": 1.4826 * np.median(np.abs(column - np.median(column))),
                    "mae": np.abs(column).mean(), "rms": np.sqrt((column**2).mean())}
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, key)
    table_text = "\n".join(lines)
    assert "bias_median" in table_text and "\n[Fe/H] " in table_text


def test_residual_statistics_by_hand():
    stats = residual_statistics([1.0, 2.0, 3.0, 4.0, 100.0, np.nan])
    assert stats["n"] == 5
    assert stats["bias_median"] == 3.0 and stats["bias_mean"] == 22.0
    assert stats["mad_std"] == pytest.approx(1.4826)  # |d - 3| = 2, 1, 0, 1, 97 -> median 1
    assert stats["mae"] == 22.0 and stats["rms"] == pytest.approx(np.sqrt(10030 / 5))
    assert np.isnan(residual_statistics([np.nan])["std"])


def test_coverage_statistics_of_gaussian_residuals_with_known_sigma():
    """Residuals drawn as d = sigma * N(0, 1), sigma log-uniform over 0.1-10 (median 1): the fractions within
    1, 2, 3 sigma are erf(k / sqrt 2) = 68.27, 95.45, 99.73 % within 4 binomial standard deviations and
    std(d / sigma) is 1 within 4 / sqrt(2n); with every sigma reported half as large they are
    erf(k / (2 sqrt 2)) = 38.29, 68.27, 86.64 % and std(d / sigma) is 2.  For one common sigma, the scatter
    (std) and 1.4826 MAD estimate it within 4 standard errors (sigma / sqrt(2n), 1.166 sigma / sqrt(n)).
    rms(d / sigma) equals std(d / sigma) without an offset and stays 1 with one that sigma includes.
    Pairs with NaN d, NaN sigma or sigma <= 0 are left out."""
    import math

    rng = np.random.default_rng(12)
    n = 200000
    sigma = 10.0 ** rng.uniform(-1.0, 1.0, n)
    d = sigma * rng.standard_normal(n)
    for reported, scale in ((sigma, 1.0), (0.5 * sigma, 2.0)):
        stats = coverage_statistics(d, reported)
        assert stats["n"] == n
        for k, fraction in zip((1, 2, 3), stats["coverage"]):
            expected = math.erf(k / (scale * math.sqrt(2.0)))
            assert abs(fraction - expected) <= 4.0 * math.sqrt(expected * (1 - expected) / n), (k, scale, fraction)
        assert abs(stats["z_std"] - scale) <= 4.0 * scale / math.sqrt(2 * n), (scale, stats["z_std"])
        assert abs(stats["z_rms"] - scale) <= 4.0 * scale / math.sqrt(2 * n), (scale, stats["z_rms"])
    # a common offset of 0.6 sigma_noise, with sigma reporting the whole error sqrt(1 + 0.6^2) sigma_noise:
    # rms(d / sigma) is 1, std(d / sigma) 1 / sqrt(1.36) = 0.857 (the offset left out)
    offset = d + 0.6 * sigma
    with_offset = coverage_statistics(offset, np.sqrt(1.36) * sigma)
    assert abs(with_offset["z_rms"] - 1.0) <= 4.0 / math.sqrt(2 * n), with_offset["z_rms"]
    assert abs(with_offset["z_std"] - 1.0 / math.sqrt(1.36)) <= 4.0 / math.sqrt(2 * n), with_offset["z_std"]
    # log-uniform sigma: median 1, density 1 / (ln 100) at 1, so the sample median's standard error is
    # ln(100) / (2 sqrt n)
    assert abs(stats["median_sigma"] / 0.5 - 1.0) <= 4.0 * math.log(100.0) / (2.0 * math.sqrt(n))

    common = 2.5
    d = common * rng.standard_normal(n)
    stats = coverage_statistics(d, np.full(n, common))
    assert abs(stats["scatter"] - common) <= 4.0 * common / math.sqrt(2 * n)
    assert abs(stats["mad_scatter"] - common) <= 4.0 * 1.166 * common / math.sqrt(n)
    assert stats["median_sigma"] == common

    gappy_d, gappy_sigma = d[:10].copy(), np.full(10, common)
    gappy_d[1], gappy_sigma[4], gappy_sigma[7] = np.nan, np.nan, 0.0
    assert coverage_statistics(gappy_d, gappy_sigma)["n"] == 7
    assert coverage_statistics([np.nan], [1.0])["n"] == 0


def test_sn_bins_partition_the_stars():
    rng = np.random.default_rng(0)
    true, inferred, sn = rng.normal(size=(100, 1)), rng.normal(size=(100, 1)), rng.uniform(10, 50, 100)
    bins = sn_binned_statistics(true, inferred, sn, ["x"], n_bins=5)
    assert len(bins) == 5 and sum(b["n"] for b in bins) == 100
    assert bins[0]["sn_low"] == sn.min() and bins[-1]["sn_high"] == sn.max()
    assert len(sn_binned_statistics(true, inferred, np.full(100, 30.0), ["x"])) == 1


def test_noised_test_repeats_and_reports_sn_bins(tmp_path, model_dir):
    pack, _ = write_test_pack(tmp_path / "test.pack")
    template = tmp_path / "sn.template"
    np.savetxt(template, np.c_[[5990.0, 6080.0], [0.8, 1.2]])
    noise = dict(preprocess_test="YES", sn_range_test="20, 80", rel_cont_e_test="-0.01, 0.01",
                 sn_template_test=template, seed=7)
    summary = run_test(make_test_config(tmp_path, model_dir, pack, **noise), report=lambda line: None)
    first = (tmp_path / "out" / "test_stats.out").read_text()
    header, rows = read_csv(tmp_path / "out" / "test_stats.out")
    assert header[-1] == "sn"
    sn = np.array([float(row[-1]) for row in rows])
    assert ((sn >= 20) & (sn <= 80)).all() and np.unique(sn).size == 300
    assert sum(b["n"] for b in summary["sn_bins"]) == 300 and len(summary["sn_bins"]) == 5

    run_test(make_test_config(tmp_path, model_dir, pack, **noise), report=lambda line: None)
    assert (tmp_path / "out" / "test_stats.out").read_text() == first
    run_test(make_test_config(tmp_path, model_dir, pack, **{**noise, "seed": 8}), report=lambda line: None)
    assert (tmp_path / "out" / "test_stats.out").read_text() != first


def test_correction_removes_planted_trend(tmp_path, model_dir):
    model_dir = shutil.copytree(model_dir, tmp_path / "model")
    slope, offset = np.array([1.3, 0.8, 1.2]), np.array([-900.0, 0.5, 0.3])
    pack, _ = write_test_pack(tmp_path / "test.pack", transform=lambda labels: offset + slope * labels)
    lines = []
    summary = run_test(make_test_config(tmp_path, model_dir, pack, fit_correction="YES", correction_degree=1),
                       report=lines.append)
    correction = summary["correction"]
    assert correction["path"] == str(Path(model_dir) / "correction.json") and correction["in_sample"]
    assert any("same test stars" in line for line in lines)
    polynomials = load_correction(model_dir, NAMES)
    for k, name in enumerate(NAMES):
        before, after = correction["labels"][name]["before"], correction["labels"][name]["after"]
        assert after["std"] < 0.5 * before["std"], name
        assert abs(after["bias_mean"]) < 1e-6 * (MAXIMA[k] - MINIMA[k])
        span = MAXIMA[k] - MINIMA[k]
        x = MINIMA[k] + 0.5 * span
        # the fitted relation recovers the planted one to within the network's own error
        assert polynomials[name](x) == pytest.approx(offset[k] + slope[k] * x, abs=0.1 * span)


def test_fit_correction_pure_function():
    rng = np.random.default_rng(3)
    inferred = rng.uniform(0, 10, size=(200, 2))
    true = np.c_[2.0 + 3.0 * inferred[:, 0], 1.0 - 0.5 * inferred[:, 1] + 0.1 * inferred[:, 1] ** 2]
    polynomials = fit_correction(true, inferred, ["a", "b"], degree=2)
    corrected, outside = apply_correction(polynomials, inferred, ["a", "b"])
    np.testing.assert_allclose(corrected, true, atol=1e-9)
    assert not outside.any()
    _, outside = apply_correction(polynomials, np.array([[11.0, 5.0], [5.0, 5.0]]), ["a", "b"])
    assert outside.tolist() == [True, False]
    with pytest.raises(AnnaInputError, match="CORRECTION_DEGREE: cannot fit a degree-2 correction for a"):
        fit_correction(true[:2], inferred[:2], ["a", "b"], degree=2)


def test_correction_inverts_an_exact_linear_distortion():
    """inferred = a * true + b exactly: whatever the degree, the least-squares correction is true =
    (inferred - b) / a (worked out by hand), so its power-series coefficients are -b/a, 1/a and zeros and it
    returns the true values to rounding (1e-10 of the label range), also between the fitted points; values
    outside the fitted inferred range, and only those, are marked."""
    rng = np.random.default_rng(6)
    slope, offset = np.array([0.9, 1.1, 0.8]), np.array([300.0, -0.2, 0.05])
    true = MINIMA + rng.uniform(0, 1, size=(250, 3)) * (MAXIMA - MINIMA)
    inferred = slope * true + offset
    span = MAXIMA - MINIMA
    for degree in (1, 2, 3):
        polynomials = fit_correction(true, inferred, NAMES, degree)
        for k, name in enumerate(NAMES):
            coef = polynomials[name].convert().coef  # power series in the inferred value
            assert coef[0] == pytest.approx(-offset[k] / slope[k], abs=1e-10 * span[k]), (degree, name)
            assert coef[1] == pytest.approx(1.0 / slope[k], rel=1e-10), (degree, name)
            scale = np.abs(inferred[:, k]).max()
            assert (np.abs(coef[2:]) * scale ** np.arange(2, degree + 1) <= 1e-10 * span[k]).all(), (degree, name)
        corrected, outside = apply_correction(polynomials, inferred, NAMES)
        np.testing.assert_allclose((corrected - true) / span, 0.0, atol=1e-10)
        assert not outside.any()
        between = MINIMA + rng.uniform(0.01, 0.99, size=(50, 3)) * span
        corrected, _ = apply_correction(polynomials, slope * between + offset, NAMES)
        np.testing.assert_allclose((corrected - between) / span, 0.0, atol=1e-10)
    beyond = inferred[:4].copy()
    beyond[1, 0] = inferred[:, 0].max() + 1.0
    beyond[3, 2] = inferred[:, 2].min() - 0.01
    assert apply_correction(polynomials, beyond, NAMES)[1].tolist() == [False, True, False, True]


def test_anna_test_fits_the_inverse_of_a_planted_linear_distortion(tmp_path, model_dir):
    """End to end: labels planted as an exact linear function of the network's own values (inferred = a * true
    + b), so anna-test's FIT_CORRECTION must save true = (inferred - b) / a, read here straight from
    correction.json with numpy, and report zero scatter after correction; the "before" statistics are those
    of d = true - inferred computed here."""
    model_dir = shutil.copytree(model_dir, tmp_path / "model")
    pack, _ = write_test_pack(tmp_path / "test.pack")
    run_test(make_test_config(tmp_path, model_dir, pack), report=lambda line: None)
    header, rows = read_csv(tmp_path / "out" / "test_stats.out")
    first = header.index(f"inferred_{NAMES[0]}")
    inferred = np.array([[float(v) for v in row[first:first + 3]] for row in rows])
    slope, offset = np.array([0.9, 1.1, 0.8]), np.array([300.0, -0.2, 0.05])
    planted_true = (inferred - offset) / slope
    _, flux, _ = toy_stars(300, 2)  # write_test_pack's spectra
    write_pack(tmp_path / "planted.pack", WAVE, np.arange(300), planted_true, flux)
    summary = run_test(make_test_config(tmp_path, model_dir, tmp_path / "planted.pack", fit_correction="YES",
                                        correction_degree=2), report=lambda line: None)
    stored = json.loads((Path(model_dir) / "correction.json").read_text())
    span = MAXIMA - MINIMA
    for k, name in enumerate(NAMES):
        entry = stored["labels"][name]
        polynomial = np.polynomial.Polynomial(entry["coef"], domain=entry["domain"], window=entry["window"])
        assert entry["domain"] == [inferred[:, k].min(), inferred[:, k].max()]
        x = np.linspace(*entry["domain"], 101)
        np.testing.assert_allclose((polynomial(x) - (x - offset[k]) / slope[k]) / span[k], 0.0, atol=1e-10)
        after, before = summary["correction"]["labels"][name]["after"], summary["correction"]["labels"][name]["before"]
        assert after["std"] <= 1e-10 * span[k] and abs(after["bias_mean"]) <= 1e-10 * span[k]
        d = planted_true[:, k] - inferred[:, k]
        assert before["std"] == pytest.approx(d.std(), rel=1e-9) and before["bias_mean"] == pytest.approx(d.mean())


def drawn_pixels(image):
    """(dark, coloured) pixel counts of an RGBA image in 0..1 on a white background: dark for axes and text,
    coloured (channels differing by > 0.15) for the plotted data."""
    rgb = image[..., :3]
    return int((rgb.max(axis=2) < 0.5).sum()), int((np.ptp(rgb, axis=2) > 0.15).sum())


def test_plots_and_tensorboard_images(tmp_path, model_dir):
    """Each PNG decodes to the figure's size (9 x 4 in at 90 dpi) and shows axes and the plotted stars (pixels
    in the data colour; a figure with empty axes has none); the TensorBoard event file holds one image per
    label under its tag, whose pixels are the PNG's."""
    import matplotlib.image
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pack, _ = write_test_pack(tmp_path / "test.pack", n=100)
    summary = run_test(make_test_config(tmp_path, model_dir, pack, log_loc=tmp_path / "logs"), report=lambda l: None)
    plots = summary["files"]["plots"]
    assert [Path(p).name for p in plots] == ["Teff_test.png", "logg_test.png", "Fe_H_test.png"]
    for plot in plots:
        image = matplotlib.image.imread(plot)
        assert image.shape == (360, 810, 4)
        dark, coloured = drawn_pixels(image)
        assert dark > 2000 and coloured > 400, (plot, dark, coloured)
    [events] = (tmp_path / "logs" / "test").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert sorted(accumulator.Tags()["tensors"]) == ["Fe_H", "Teff", "logg"]
    for tag, plot in zip(("Teff", "logg", "Fe_H"), plots):
        [event] = accumulator.Tensors(tag)
        width, height, png = tf.make_ndarray(event.tensor_proto)  # the image summary: width, height, PNG
        assert (int(width), int(height)) == (810, 360)
        logged = tf.image.decode_png(png, channels=4).numpy()
        on_disk = tf.image.decode_png(Path(plot).read_bytes(), channels=4).numpy()
        np.testing.assert_array_equal(logged, on_disk)


def test_grid_and_label_mismatches_are_refused(tmp_path, model_dir):
    labels, flux, _ = toy_stars(10, seed=4)
    shifted = tmp_path / "shifted.pack"
    write_pack(shifted, WAVE + 0.5, np.arange(10), labels, flux)
    with pytest.raises(AnnaInputError, match=r"TESTING_DATA: wavelengths differ .* largest difference 0.5 A"):
        run_test(make_test_config(tmp_path, model_dir, shifted), report=lambda line: None)
    short = tmp_path / "short.pack"
    write_pack(short, WAVE[:60], np.arange(10), labels, flux[:, :60])
    with pytest.raises(AnnaInputError, match="has 60 wavelengths .* the model grid has 64 wavelengths"):
        run_test(make_test_config(tmp_path, model_dir, short), report=lambda line: None)
    two_labels = tmp_path / "two.pack"
    write_pack(two_labels, WAVE, np.arange(10), labels[:, :2], flux)
    with pytest.raises(AnnaInputError, match="pack has 2 labels per star but the model predicts 3"):
        run_test(make_test_config(tmp_path, model_dir, two_labels), report=lambda line: None)


def test_nonfinite_flux_refused_without_partial_output(tmp_path, model_dir):
    labels, flux, _ = toy_stars(10, seed=4)
    flux[3, 7] = np.nan
    path = tmp_path / "nan.pack"
    write_pack(path, WAVE, np.arange(10), labels, flux)
    with pytest.raises(AnnaInputError, match="1 of 10 stars have NaN or infinite fluxes"):
        run_test(make_test_config(tmp_path, model_dir, path), report=lambda line: None)
    assert not (tmp_path / "out" / "test_stats.out").exists()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_reference_sn_template_on_its_own_grid(tmp_path):
    reference = SHARED / "reference"
    if not (reference / "wavelength.template").is_file() or not (reference / "sn.robo.template").is_file():
        pytest.skip("../shared/reference is not present beside this checkout")
    grid = np.loadtxt(reference / "wavelength.template")[:, 0]
    model_dir = train_tiny_model(tmp_path / "model", wave=grid, epochs=0)
    unit = np.random.default_rng(0).uniform(0, 1, size=(20, 3))
    path = tmp_path / "ref.pack"
    write_pack(path, grid, np.arange(20), MINIMA + unit * (MAXIMA - MINIMA), toy_flux(unit, grid))
    summary = run_test(make_test_config(tmp_path, model_dir, path, preprocess_test="YES", sn_range_test="50, 60",
                                   rel_cont_e_test="0, 0", sn_template_test=reference / "sn.robo.template"),
                       report=lambda line: None)
    assert summary["n_stars"] == 20 and sum(b["n"] for b in summary["sn_bins"]) == 20
