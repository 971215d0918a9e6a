"""anna-infer: every input mode, interpolation and flags, reruns, WAVE_TEMPLATE and APPLY_CORRECTION.

A tiny network is trained once per module on synthetic line spectra (64 px at 1 A, 6000-6063 A, three labels
each setting one line's depth); inputs are written on other samplings so interpolation is exercised.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from anna.errors import AnnaInputError
from anna.evaluate import run_test
from anna.infer import FATAL_FLAGS, output_path, run_infer, spectra_onto_grid, spectrum_onto_grid
from anna.packs import write_pack

from toy_model import NAMES, MINIMA, MAXIMA, SPAN, WAVE, SHARED, toy_flux, toy_stars, train_tiny_model, make_config


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The suite's one tiny model (conftest.tiny_model_dir): these tests only read it."""
    return tiny_model_dir


def infer_config(tmp_path, model_dir, **keys):
    return make_config(tmp_path, infer_model_loc=model_dir, infer_save_loc=tmp_path / "out", infer_batch_size=64,
                       **keys)


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def values_of(rows, first, count=3):
    return np.array([[float(v) for v in row[first:first + count]] for row in rows])


def assert_close_to_truth(predicted, true):
    """Within 5 % of each label's training range: the tiny network's accuracy, with margin."""
    error = np.abs(np.asarray(predicted) - np.asarray(true))
    assert (error <= 0.05 * SPAN).all(), (predicted, true)


def write_text_spectrum(path, wave, flux):
    np.savetxt(path, np.c_[wave, flux], header="wavelength flux")
    return str(path)


def write_multispec(path, flux_rows, specs):
    """IRAF multispec image: ``flux_rows`` (n, npix); ``specs`` (aperture, beam, w1, dw, nw) per row, linear."""
    header = fits.Header()
    header["WCSDIM"] = 2
    header["CTYPE1"] = "MULTISPE"
    header["CTYPE2"] = "MULTISPE"
    header["WAT0_001"] = "system=multispec"
    header["WAT1_001"] = "wtype=multispec label=Wavelength units=angstroms"
    text = "wtype=multispec " + " ".join(
        f'spec{row + 1} = "{ap} {beam} 0 {w1!r} {dw!r} {nw} 0. 0 0"'
        for row, (ap, beam, w1, dw, nw) in enumerate(specs))
    for number, start in enumerate(range(0, len(text), 68), start=1):
        header[f"WAT2_{number:03d}"] = text[start:start + 68]
    fits.PrimaryHDU(np.asarray(flux_rows, dtype=np.float64), header=header).writeto(path)
    return str(path)


def write_linear_fits(path, w1, dw, flux):
    header = fits.Header()
    header["CRVAL1"], header["CDELT1"], header["CRPIX1"] = w1, dw, 1.0
    fits.PrimaryHDU(np.asarray(flux, dtype=np.float64), header=header).writeto(path)
    return str(path)


def test_debug_mode_reproduces_anna_test_exactly(tmp_path, model_dir):
    labels, flux, _ = toy_stars(200, seed=2)
    ids = np.r_[np.arange(198) * 7.0 + 2.0**52, 12.5, -3.0]
    pack = tmp_path / "stars.pack"
    write_pack(pack, WAVE, ids, labels, flux)
    run_test(make_config(tmp_path, test_model_loc=model_dir, test_save_loc=tmp_path / "test", testing_data=pack,
                         test_batch_size=64), report=lambda line: None)
    lines = []
    written = run_infer(infer_config(tmp_path, model_dir, infer_mode="DEBUG", debug_data=pack), report=lines.append)
    assert written == [str(tmp_path / "out" / "stars_infer.out")]
    header, rows = read_csv(written[0])
    assert header == ["star_id", *NAMES, "bad_pixel_fraction", "flags"]
    _, tested = read_csv(tmp_path / "test" / "test_stats.out")
    assert [row[0] for row in rows] == [row[0] for row in tested]
    assert rows[-2][0] == "12.5" and rows[0][0] == "4503599627370496"
    assert [row[1:4] for row in rows] == [row[4:7] for row in tested]
    assert all(row[4:] == ["0.0000", ""] for row in rows)
    assert any("[1/1]" in line and "200 spectra" in line for line in lines)


def test_text_mode_interpolates_onto_model_grid(tmp_path, model_dir):
    labels, _, unit = toy_stars(3, seed=9)
    fine = np.arange(5990.0, 6075.0, 0.125)
    path = write_text_spectrum(tmp_path / "star.txt", fine, toy_flux(unit[1], fine)[0])
    written = run_infer(infer_config(tmp_path, model_dir, infer_mode="TEXT", text_image=path),
                        report=lambda line: None)
    header, rows = read_csv(written[0])
    assert Path(written[0]).name == "star_infer.out"
    assert header == ["star_id", *NAMES, "bad_pixel_fraction", "flags"] and len(rows) == 1
    assert rows[0][0] == "1" and rows[0][4:] == ["0.0000", ""]
    assert_close_to_truth(values_of(rows, 1)[0], labels[1])


def test_fits_mode_over_a_folder_and_rerun_skips(tmp_path, model_dir):
    labels, _, unit = toy_stars(4, seed=5)
    folder = tmp_path / "spectra"
    folder.mkdir()
    w1, dw, nw = 5995.0, 0.5, 151  # 5995-6070 A covers the 6000-6063 A grid
    wave = w1 + dw * np.arange(nw)
    rows = np.ones((3, nw))
    rows[0] = toy_flux(unit[0], wave)[0]
    rows[1, :80] = toy_flux(unit[1], wave[:80])[0]
    rows[1, 80:] = 0.0  # aperture 7 holds 80 valid pixels (to 6034.5 A) then zero padding
    rows[2] = toy_flux(unit[2], wave)[0]
    rows[2, 40] = np.nan  # 6015 A: on the grid
    write_multispec(folder / "night.fits", rows, [(5, 1, w1, dw, nw), (7, 1, w1, dw, 80), (9, 2, w1, dw, nw)])
    write_linear_fits(folder / "single.fits", w1, dw, toy_flux(unit[3], wave)[0])
    write_text_spectrum(folder / "star.dat", wave, toy_flux(unit[0], wave)[0])
    cfg = infer_config(tmp_path, model_dir, infer_mode="FITS", infer_files=folder / "*")

    written = run_infer(cfg, report=lambda line: None)
    out = tmp_path / "out"
    assert sorted(Path(p).name for p in written) == ["night_infer.out", "single_infer.out", "star_infer.out"]
    header, night = read_csv(out / "night_infer.out")
    assert header == ["star_id", "file", "aperture", "beam", *NAMES, "bad_pixel_fraction", "flags"]
    assert [row[:4] for row in night] == [["5", "night.fits", "5", "1"], ["7", "night.fits", "7", "1"],
                                          ["9", "night.fits", "9", "2"]]
    assert [row[-1] for row in night] == ["", "no_coverage", "nonfinite"]
    values = values_of(night, 4)
    assert_close_to_truth(values[0], labels[0])
    assert np.isnan(values[1:]).all()
    header, single = read_csv(out / "single_infer.out")
    assert header == ["star_id", *NAMES, "bad_pixel_fraction", "flags"] and single[0][0] == "1"
    assert single[0][4:] == ["0.0000", ""]
    assert_close_to_truth(values_of(single, 1)[0], labels[3])
    _, text = read_csv(out / "star_infer.out")
    # same flux and grid as aperture 5: the same prediction up to float32 rounding (batches differ)
    np.testing.assert_allclose(values_of(text, 1)[0], values[0], rtol=1e-5)

    lines = []
    assert run_infer(cfg, report=lines.append) == []
    assert lines == ["anna-infer (FITS): 3 input(s), skipped 3 done, 0 to do"]  # nothing timed or planned
    later = os.stat(out / "single_infer.out").st_mtime + 10
    os.utime(folder / "single.fits", (later, later))
    lines = []
    assert run_infer(cfg, report=lines.append) == [str(out / "single_infer.out")]
    assert "skipped 2 done" in lines[0]


def test_spectrum_onto_grid_flags():
    grid = np.array([10.0, 11.0, 12.0, 13.0])
    wave = np.arange(8.0, 15.5, 0.5)
    flux = 1.0 - 0.01 * wave
    on_grid, flags = spectrum_onto_grid(wave, flux, grid)
    np.testing.assert_allclose(on_grid, 1.0 - 0.01 * grid)
    assert flags == set()
    assert spectrum_onto_grid(wave[::-1], flux[::-1], grid)[0].tolist() == on_grid.tolist()
    padded = flux.copy()
    padded[:3], padded[-3:] = 0.0, 0.0  # zero padding at both ends, outside the grid: trimmed, fine
    assert spectrum_onto_grid(wave, padded, grid)[1] == set()
    padded[-5:] = 0.0  # padding reaching 13 A: the grid is not covered
    assert spectrum_onto_grid(wave, padded, grid)[1] == {"no_coverage"}
    assert spectrum_onto_grid(wave + 2.5, flux, grid)[1] == {"no_coverage"}
    assert spectrum_onto_grid(wave, np.zeros_like(flux), grid)[1] == {"all_zero"}
    holed = flux.copy()
    holed[0] = np.nan  # 8 A, far from the grid
    assert spectrum_onto_grid(wave, holed, grid)[1] == set()
    holed[2] = np.nan  # 9.0 A, outside the cubic stencil of the first grid point (9.5 .. 11 A)
    assert spectrum_onto_grid(wave, holed, grid)[1] == set()
    holed[3] = np.nan  # 9.5 A, inside that stencil: the result would be NaN, so it is flagged
    assert spectrum_onto_grid(wave, holed, grid)[1] == {"nonfinite"}
    holed[6] = np.nan  # 11 A
    result, flags = spectrum_onto_grid(wave, holed, grid)
    assert flags == {"nonfinite"} and np.isnan(result).all()
    gap = flux.copy()
    gap[7] = 0.0  # 11.5 A, interior zero
    assert spectrum_onto_grid(wave, gap, grid)[1] == {"zero_pixels"}
    shuffled = wave.copy()
    shuffled[[4, 5]] = shuffled[[5, 4]]
    assert spectrum_onto_grid(shuffled, flux, grid)[1] == {"bad_wavelength"}
    assert spectrum_onto_grid(grid * (1 + 1e-7), 1.0 - 0.01 * grid, grid)[1] == set()


def test_spectra_onto_grid_checks_each_spectrum_on_its_own():
    """A batch mixing lengths, directions and every flag gives, row by row, what each spectrum gives alone."""
    grid = np.array([10.0, 11.0, 12.0, 13.0])
    wave = np.arange(8.0, 15.5, 0.5)
    flux = 1.0 - 0.01 * wave
    holed, gap, padded, shuffled = flux.copy(), flux.copy(), flux.copy(), wave.copy()
    holed[3] = np.nan
    gap[7] = 0.0
    padded[:3], padded[-3:] = 0.0, 0.0
    shuffled[[4, 5]] = shuffled[[5, 4]]
    spectra = [(wave, flux), (wave[::-1], holed[::-1]), (wave, gap), (wave[:3], flux[:3]), (wave, padded),
               (shuffled, flux), (wave + 2.5, flux), (wave[::-1], flux[::-1]), (wave[2:], flux[2:] * 1.1),
               (wave, np.zeros_like(flux)), (wave[:1], flux[:1]), (wave, flux[:-1])]
    on_grid, flags = spectra_onto_grid(spectra, grid)
    assert [sorted(words) for words in flags] == [
        [], ["nonfinite"], ["zero_pixels"], ["no_coverage"], [], ["bad_wavelength"], ["no_coverage"], [], [],
        ["all_zero"], ["bad_wavelength"], ["bad_wavelength"]]
    for row, (wavelength, values) in enumerate(spectra):
        alone, words = spectrum_onto_grid(wavelength, values, grid)
        assert words == flags[row]
        np.testing.assert_array_equal(on_grid[row], alone)
    np.testing.assert_allclose(on_grid[8], 1.1 * (1.0 - 0.01 * grid))


def test_flagged_text_spectra_give_nan_rows(tmp_path, model_dir):
    wave = np.arange(5990.0, 6075.0, 0.5)
    folder = tmp_path / "in"
    folder.mkdir()
    write_text_spectrum(folder / "zero.txt", wave, np.zeros_like(wave))
    short = np.where(wave < 6050.0, 1.0, 0.0)
    write_text_spectrum(folder / "short.txt", wave, short)
    emission = toy_flux(np.full(3, -2.0), wave)[0]  # lines in emission: far outside the training labels
    write_text_spectrum(folder / "emission.txt", wave, emission)
    (tmp_path / "list.txt").write_text("in/zero.txt\nin/short.txt\n# a comment\nin/emission.txt\n")
    written = run_infer(infer_config(tmp_path, model_dir, infer_mode="TEXT", infer_files=tmp_path / "list.txt",
                                     range_margin=0.0), report=lambda line: None)
    assert len(written) == 3
    results = {Path(path).name: read_csv(path)[1][0] for path in written}
    assert results["zero_infer.out"][-1] == "all_zero" and results["short_infer.out"][-1] == "no_coverage"
    assert np.isnan(values_of([results["zero_infer.out"], results["short_infer.out"]], 1)).all()
    emitted = results["emission_infer.out"]
    assert emitted[-1] == "out_of_range|outside_training_domain"  # emission lines: nothing like the training set
    value = values_of([emitted], 1)[0]
    assert np.isfinite(value).all() and ((value < MINIMA) | (value > MAXIMA)).any()


def test_wave_template_must_match_model_grid(tmp_path, model_dir):
    labels, flux, _ = toy_stars(5, seed=3)
    pack = tmp_path / "stars.pack"
    write_pack(pack, WAVE, np.arange(5), labels, flux)
    template = tmp_path / "wave.template"
    np.savetxt(template, np.c_[WAVE, np.ones(64)])
    assert run_infer(infer_config(tmp_path, model_dir, infer_mode="DEBUG", debug_data=pack,
                                  wave_template=template), report=lambda line: None)
    np.savetxt(template, np.c_[WAVE[:63], np.ones(63)])
    with pytest.raises(AnnaInputError, match=r"wave.template: WAVE_TEMPLATE: .* has 63 wavelengths "
                                             r"6000.000000-6062.000000 A, the model grid has 64 wavelengths"):
        run_infer(infer_config(tmp_path, model_dir, infer_mode="DEBUG", debug_data=pack, wave_template=template),
                  report=lambda line: None)
    np.savetxt(template, np.c_[WAVE + 0.02, np.ones(64)])
    with pytest.raises(AnnaInputError, match="largest difference 0.02 A"):
        run_infer(infer_config(tmp_path, model_dir, infer_mode="DEBUG", debug_data=pack, wave_template=template),
                  report=lambda line: None)


def test_apply_correction_uses_the_saved_correction(tmp_path, model_dir):
    """The planted labels are an exact affine map of the network's own values (anna-test's inferred column),
    so the degree-2 correction fitted to them is that map, and the corrected outputs must equal it applied to
    the raw outputs, worked out here by hand, to rounding."""
    model_dir = str(shutil.copytree(model_dir, tmp_path / "model"))
    labels, flux, _ = toy_stars(150, seed=4)
    pack = tmp_path / "stars.pack"
    write_pack(pack, WAVE, np.arange(150), labels, flux)
    run_test(make_config(tmp_path, test_model_loc=model_dir, test_save_loc=tmp_path / "plain", testing_data=pack,
                         test_batch_size=64), report=lambda line: None)  # anna-infer's batches: same float32 sums
    header, tested = read_csv(tmp_path / "plain" / "test_stats.out")
    inferred = values_of(tested, header.index(f"inferred_{NAMES[0]}"))

    def planted_map(values):
        return MINIMA + 0.1 * SPAN + 0.8 * (values - MINIMA)

    planted = tmp_path / "planted.pack"
    write_pack(planted, WAVE, np.arange(150), planted_map(inferred), flux)
    run_test(make_config(tmp_path, test_model_loc=model_dir, test_save_loc=tmp_path / "test", testing_data=planted,
                         fit_correction="YES", correction_degree=2, test_batch_size=64), report=lambda line: None)
    raw = run_infer(infer_config(tmp_path, model_dir, infer_mode="DEBUG", debug_data=pack),
                    report=lambda line: None)
    corrected = run_infer(make_config(tmp_path, infer_model_loc=model_dir, infer_save_loc=tmp_path / "corrected",
                                      infer_mode="DEBUG", debug_data=pack, apply_correction="YES",
                                      infer_batch_size=64), report=lambda line: None)
    raw_values = values_of(read_csv(raw[0])[1], 1)
    corrected_values = values_of(read_csv(corrected[0])[1], 1)
    np.testing.assert_array_equal(raw_values, inferred)
    np.testing.assert_allclose((corrected_values - planted_map(raw_values)) / SPAN, 0.0, rtol=0, atol=1e-10)
    assert [row[-1] for row in read_csv(corrected[0])[1]] == [""] * 150  # all inside the fitted range
    assert_close_to_truth(corrected_values, planted_map(labels))

    correction = Path(model_dir) / "correction.json"
    data = json.loads(correction.read_text())
    correction.write_text(json.dumps({**data, "model_sha256": "0" * 64}))
    with pytest.raises(AnnaInputError, match="fitted for a different frozen model"):
        run_infer(make_config(tmp_path, infer_model_loc=model_dir, infer_save_loc=tmp_path / "again",
                              infer_mode="DEBUG", debug_data=pack, apply_correction="YES"), report=lambda line: None)
    correction.unlink()
    with pytest.raises(AnnaInputError, match="APPLY_CORRECTION: is YES but there is no .*correction.json"):
        run_infer(make_config(tmp_path, infer_model_loc=model_dir, infer_save_loc=tmp_path / "again",
                              infer_mode="DEBUG", debug_data=pack, apply_correction="YES"), report=lambda line: None)


def test_unreadable_input_does_not_stop_the_others(tmp_path, model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    wave = np.arange(5990.0, 6075.0, 0.5)
    write_text_spectrum(folder / "good.txt", wave, toy_flux(np.full(3, 0.5), wave)[0])
    (folder / "broken.txt").write_text("5990 1.0\n5991 oops\n")
    lines = []
    with pytest.raises(AnnaInputError, match="1 of 2 inputs could not be read"):
        run_infer(infer_config(tmp_path, model_dir, infer_mode="FITS", infer_files=folder / "*.txt"),
                  report=lines.append)
    assert (tmp_path / "out" / "good_infer.out").exists() and not (tmp_path / "out" / "broken_infer.out").exists()
    assert any("broken.txt:2: text spectrum row is not numeric" in line for line in lines)
    (folder / "good.dat").write_text("5990 1.0\n6080 1.0\n")
    with pytest.raises(AnnaInputError, match="would both write"):
        run_infer(infer_config(tmp_path, model_dir, infer_mode="FITS", infer_files=folder / "good*"),
                  report=lambda line: None)
    assert output_path("/x", "/data/a.fits.gz") == "/x/a_infer.out"


def test_reference_wavelength_template_interoperates(tmp_path):
    template = SHARED / "reference" / "wavelength.template"
    if not template.is_file():
        pytest.skip("../shared/reference is not present beside this checkout")
    grid = np.loadtxt(template)[:, 0]
    model_dir = train_tiny_model(tmp_path / "model", wave=grid, epochs=0)
    written = run_infer(infer_config(tmp_path, model_dir, infer_mode="TEXT", text_image=template,
                                     wave_template=template), report=lambda line: None)
    _, rows = read_csv(written[0])
    assert len(rows) == 1 and not set(rows[0][-1].split("|")) & FATAL_FLAGS
    assert np.isfinite(values_of(rows, 1)).all()


def test_a_model_lacking_parts_says_so_once_and_flags_every_star(tmp_path, model_dir):
    """A frozen model without training-domain statistics and (MC dropout, variance head) without σ calibration,
    as older versions and stopped runs left them: one line each at start, a flag on every star of anna-infer,
    and ``model_missing_parts`` in anna-test's summary.  The whole toy model gets none of it."""
    from anna.model import NetworkSpec, build_network, save_frozen

    spec = NetworkSpec(npix=len(WAVE), nout=3, conv_layers=((5, 4),), fc_dims=(32, 32), heteroscedastic=True)
    partial = tmp_path / "partial"
    partial.mkdir()
    save_frozen(str(partial), build_network(spec, dropout_rate=0.1), spec,
                {"output_names": list(NAMES), "wavelengths": list(WAVE), "min_params": list(MINIMA),
                 "max_params": list(MAXIMA), "mc_dropout_rate": 0.1, "training_domain": None,
                 "variance_calibration": None})
    labels, flux, _ = toy_stars(40, seed=4)
    write_pack(tmp_path / "stars.pack", WAVE, np.arange(1, 41), labels, flux)
    for folder, uncertainty, missing in ((partial, "MC_DROPOUT", ("training_domain", "variance_calibration")),
                                         (Path(model_dir), "NONE", ())):
        # the plain graph form: JIT_COMPILE AUTO would time both forward forms of each model at each batch for
        # these 40 stars (the module's other tests run AUTO's forward pass)
        cfg = make_config(tmp_path, infer_model_loc=folder, infer_mode="DEBUG", debug_data=tmp_path / "stars.pack",
                          infer_save_loc=tmp_path / f"infer_{folder.name}", uncertainty=uncertainty, mc_samples=10,
                          test_model_loc=folder, testing_data=tmp_path / "stars.pack",
                          test_save_loc=tmp_path / f"test_{folder.name}", jit_compile="NO")
        lines = []
        written = run_infer(cfg, report=lines.append)
        notes = [line for line in lines if line.startswith("note: model has no")]
        expected = {"training_domain": "note: model has no training-domain statistics: outside_training_domain is "
                                       "not checked",
                    "variance_calibration": "note: model has no uncertainty calibration: sigma not calibrated"}
        assert [note.split(" (")[0] for note in notes] == [expected[part] for part in missing]
        header, rows = read_csv(written[0])
        words = {"training_domain": "domain_unchecked", "variance_calibration": "sigma_uncalibrated"}
        # (an untrained network adds out_of_range; only the two words of missing parts are checked here)
        assert all(set(row[-1].split("|")) & set(words.values()) == {words[part] for part in missing}
                   for row in rows), rows[0]
        lines = []
        summary = run_test(cfg, report=lines.append)
        assert sorted(summary["model_missing_parts"]) == sorted(missing)
        assert len([line for line in lines if line.startswith("note: model has no")]) == len(missing)
        on_disk = json.loads((tmp_path / f"test_{folder.name}" / "test_summary.json").read_text())
        assert sorted(on_disk["model_missing_parts"]) == sorted(missing)
