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
from anna.evaluate import (apply_correction, fit_correction, load_correction, residual_statistics, run_test,
                           sn_binned_statistics)
from anna.packs import write_pack

from toy_model import NAMES, MINIMA, MAXIMA, WAVE, SHARED, toy_flux, toy_stars, train_tiny_model, make_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("model"))


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


def test_plots_and_tensorboard_images(tmp_path, model_dir):
    pack, _ = write_test_pack(tmp_path / "test.pack", n=100)
    summary = run_test(make_test_config(tmp_path, model_dir, pack, log_loc=tmp_path / "logs"), report=lambda l: None)
    plots = summary["files"]["plots"]
    assert [Path(p).name for p in plots] == ["Teff_test.png", "logg_test.png", "Fe_H_test.png"]
    for plot in plots:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((tmp_path / "logs" / "test").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000


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
