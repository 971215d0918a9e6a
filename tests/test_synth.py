"""Example-data generator: physics signatures of the teaching model, file products, anna-pack builder."""

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from anna import packer, synth
from anna.fits_io import WAT_CHARS_PER_CARD
from anna.errors import AnnaInputError
from anna.packs import open_pack

C_KMS = synth.SPEED_OF_LIGHT_KMS
FE_6678 = 6677.985  # strong, isolated Fe I line
WIDE = np.round(np.arange(6500.0, 6950.0, 0.05), 6)  # covers every line of the list plus broadening


def stars(*rows):
    return np.asarray(rows, dtype=np.float64)


def equivalent_width(wave, flux):
    return np.trapezoid(1.0 - flux, wave, axis=-1)


def depth_at(wave, flux, centre, half_width=0.6):
    window = np.abs(wave - centre) <= half_width
    return 1.0 - flux[..., window].min(axis=-1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("example")
    written = synth.make_example_data(outdir, seed=3, n_train=40, n_xval=10, n_test=12, n_apertures=7)
    return written


# ---------------------------------------------------------------------------------------------------------
# Physics of the teaching model


def test_default_grid_is_the_tutorial_grid():
    grid = synth.default_grid()
    assert grid.shape == (1001,)
    assert grid[0] == 6625.0 and grid[-1] == 6825.0 and grid[1] == 6625.2
    np.testing.assert_allclose(np.diff(grid), 0.2, atol=1e-9)


def test_fe_line_deepens_as_teff_falls_and_as_metallicity_rises():
    grid = synth.default_grid()
    teffs = [7000.0, 6250.0, 5500.0, 4750.0, 4000.0]
    by_teff = depth_at(grid, synth.synthesize(grid, stars(*[[t, 4.4, 0.0, 1.0, 2.0] for t in teffs])), FE_6678)
    assert (np.diff(by_teff) > 0.005).all(), by_teff
    metallicities = [-0.5, -0.25, 0.0, 0.2]
    by_feh = depth_at(grid, synth.synthesize(grid, stars(*[[5800.0, 4.4, m, 1.0, 2.0] for m in metallicities])),
                      FE_6678)
    assert (np.diff(by_feh) > 0.005).all(), by_feh


def test_hot_stars_have_weaker_metal_lines():
    flux = synth.synthesize(WIDE, stars([4500, 4.5, 0, 1, 2], [5500, 4.4, 0, 1, 2], [6800, 4.2, 0, 1, 2]))
    widths = equivalent_width(WIDE, flux)
    assert widths[0] > widths[1] > 1.5 * widths[2]


def test_ionised_line_weakens_with_gravity_while_fe_i_barely_moves():
    grid = synth.default_grid()
    flux = synth.synthesize(grid, stars([5800, 2.8, 0, 1, 0], [5800, 4.7, 0, 1, 0]))
    y_ii = depth_at(grid, flux, 6795.414, 0.3)
    fe_i = depth_at(grid, flux, 6703.566, 0.3)
    assert y_ii[0] > 1.8 * y_ii[1]
    assert abs(fe_i[0] / fe_i[1] - 1.0) < 0.35


def test_microturbulence_strengthens_saturated_lines_not_weak_ones():
    lines = synth._line_table()
    widths, _, _ = synth._line_parameters(stars([5800, 4.4, 0, 0.5, 0], [5800, 4.4, 0, 2.5, 0]), lines)
    strong = list(lines["wavelength"]).index(FE_6678)
    weak = list(lines["wavelength"]).index(6746.955)
    assert widths[1, strong] > 1.4 * widths[0, strong]
    assert abs(widths[1, weak] / widths[0, weak] - 1.0) < 0.03


def test_rotation_keeps_equivalent_width_and_lowers_depth():
    flux = synth.synthesize(WIDE, stars([5200, 4.5, 0.1, 1.2, 0.0], [5200, 4.5, 0.1, 1.2, 15.0],
                                        [5200, 4.5, 0.1, 1.2, 40.0]))
    widths = equivalent_width(WIDE, flux)
    np.testing.assert_allclose(widths[1:], widths[0], rtol=0.01)
    depths = depth_at(WIDE, flux, FE_6678)
    assert depths[0] > depths[1] > depths[2] and depths[2] < 0.6 * depths[0]


def test_instrumental_broadening_keeps_equivalent_width_and_lowers_depth():
    labels = stars([5200, 4.5, 0.1, 1.2, 3.0])
    flux = np.vstack([synth.synthesize(WIDE, labels, resolution=r) for r in (60000.0, 11000.0, 4000.0)])
    widths = equivalent_width(WIDE, flux)
    np.testing.assert_allclose(widths[1:], widths[0], rtol=0.01)
    depths = depth_at(WIDE, flux, FE_6678)
    assert depths[0] > depths[1] > depths[2]


def test_equivalent_width_equals_the_sum_of_line_widths():
    labels = stars([4800, 4.6, 0.0, 2.0, 10.0])
    lines = synth._line_table()
    widths, _, _ = synth._line_parameters(labels, lines)
    expected = float((widths[0] * lines["wavelength"] / C_KMS).sum())
    measured = float(equivalent_width(WIDE, synth.synthesize(WIDE, labels))[0])
    assert measured == pytest.approx(expected, rel=0.003)


def test_doppler_shift_moves_lines_by_v_over_c():
    labels = stars([5600, 4.3, -0.1, 1.0, 4.0], [5600, 4.3, -0.1, 1.0, 4.0])
    velocity = 30.0
    fine = np.round(np.arange(6660.0, 6700.0, 0.01), 6)
    flux = synth.synthesize(fine, labels, rv_kms=[0.0, velocity])
    window = (fine > 6674.0) & (fine < 6683.0)
    centroid = [np.sum(fine[window] * (1 - f[window])) / np.sum(1 - f[window]) for f in flux]
    assert centroid[1] - centroid[0] == pytest.approx(velocity / C_KMS * centroid[0], rel=0.01)
    # Exactly: the shifted spectrum at lambda is the rest spectrum at lambda / (1 + v/c).
    grid = synth.default_grid()
    shifted = synth.synthesize(grid, labels[:1], rv_kms=[velocity])
    rest_resampled = synth.synthesize(grid / (1.0 + velocity / C_KMS), labels[:1])
    np.testing.assert_allclose(shifted, rest_resampled, atol=2e-5)


def test_synthesize_is_vectorised_consistently_and_stays_physical():
    grid = synth.default_grid()
    labels = synth.draw_labels(64, np.random.default_rng(5))
    batch = synth.synthesize(grid, labels)
    assert batch.shape == (64, grid.size)
    assert np.isfinite(batch).all() and batch.min() > 0.1 and batch.max() <= 1.0 + 1e-9
    single = synth.synthesize(grid, labels[17:18])
    np.testing.assert_allclose(single[0], batch[17], atol=1e-5)
    per_row = synth.synthesize(np.vstack([grid, grid + 0.05]), labels[:2])
    np.testing.assert_allclose(per_row[0], batch[0], atol=1e-5)


def test_bad_arguments_are_refused():
    grid = synth.default_grid()
    with pytest.raises(AnnaInputError, match="labels"):
        synth.synthesize(grid, np.ones((3, 4)))
    with pytest.raises(AnnaInputError, match="vsini"):
        synth.synthesize(grid, stars([5000, 4, 0, 1, -3]))
    with pytest.raises(AnnaInputError, match="ascending"):
        synth.synthesize(grid[::-1], stars([5000, 4, 0, 1, 3]))
    with pytest.raises(AnnaInputError, match="resolution"):
        synth.synthesize(grid, stars([5000, 4, 0, 1, 3]), resolution=0)


def test_draw_labels_stays_in_ranges():
    labels = synth.draw_labels(500, np.random.default_rng(0))
    assert labels.shape == (500, 5)
    for column, (low, high) in enumerate(synth.DEFAULT_LABEL_RANGES):
        assert low <= labels[:, column].min() and labels[:, column].max() <= high
        assert labels[:, column].max() - labels[:, column].min() > 0.9 * (high - low)


# ---------------------------------------------------------------------------------------------------------
# Example data files


def test_example_data_is_byte_identical_for_a_seed(example, tmp_path):
    again = synth.make_example_data(tmp_path / "again", seed=3, n_train=40, n_xval=10, n_test=12, n_apertures=7)
    assert set(again) == set(example) == {"train", "xval", "test", "sn_template", "wavelength_template",
                                          "multispec", "star_labels"}
    for kind in example:
        assert Path(again[kind]).read_bytes() == Path(example[kind]).read_bytes(), kind
    other = synth.make_example_data(tmp_path / "other", seed=4, n_train=40, n_xval=10, n_test=12, n_apertures=7)
    assert Path(other["train"]).read_bytes() != Path(example["train"]).read_bytes()


def test_example_packs_are_readable_with_labels_in_range(example):
    grid = synth.default_grid()
    ids = []
    for kind, count in (("train", 40), ("xval", 10), ("test", 12)):
        pack = open_pack(example[kind], expected_npix=1001, expected_nout=5, check_flux=True)
        assert pack.n_stars == count
        np.testing.assert_array_equal(pack.wavelengths, grid)
        for column, (low, high) in enumerate(synth.DEFAULT_LABEL_RANGES):
            assert (pack.labels[:, column] >= low).all() and (pack.labels[:, column] <= high).all()
        assert (np.abs(pack.dummy) <= synth.RESIDUAL_RV_KMS).all() and np.abs(pack.dummy).max() > 0
        assert pack.flux.max() <= 1.0 + 1e-9 and pack.flux.min() > 0.1
        # The stored flux is the model at the stored labels and residual velocity.
        np.testing.assert_allclose(pack.flux[:2], synth.synthesize(grid, pack.labels[:2], rv_kms=pack.dummy[:2]),
                                   atol=1e-5)
        ids.extend(pack.ids.tolist())
    assert len(set(ids)) == len(ids)


def test_example_templates_and_star_labels(example):
    from anna.templates import read_wavelength_template, relative_sn_on_grid

    np.testing.assert_array_equal(read_wavelength_template(example["wavelength_template"]), synth.default_grid())
    rel_sn = relative_sn_on_grid(example["sn_template"], synth.default_grid())
    assert 0.8 < rel_sn.min() and rel_sn.max() <= 1.0
    star = json.loads(Path(example["star_labels"]).read_text())
    assert list(star) == list(synth.DEFAULT_LABEL_NAMES)
    assert [star[name] for name in synth.DEFAULT_LABEL_NAMES] == [5770.0, 4.44, 0.0, 1.0, 3.0]


def test_shipped_templates_are_the_generated_ones(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "templates"
    fresh = synth.write_project_templates(tmp_path)
    for name in ("sn.hydra.template", "wavelength.template"):
        ours = np.loadtxt(shipped / name)
        regenerated = np.loadtxt(tmp_path / name)
        np.testing.assert_array_equal(ours[:, 0], regenerated[:, 0])
        np.testing.assert_allclose(ours[:, 1], regenerated[:, 1], atol=2e-6)
    sn = np.loadtxt(fresh["sn_template"])
    assert sn[0, 0] == 6450.0 and sn[-1, 0] == 6850.0 and len(sn) == 2001
    assert sn[:, 1].max() == pytest.approx(1.0, abs=1e-6) and sn[:, 1].min() > 0.2
    assert len(np.loadtxt(fresh["wavelength_template"])) == 1001


def _raw_header_cards(path):
    """80-character card images of the primary header, read straight from the bytes."""
    raw = Path(path).read_bytes()
    cards = []
    for start in range(0, len(raw), 80):
        card = raw[start:start + 80].decode("ascii")
        cards.append(card)
        if card.startswith("END "):
            return cards
    raise AssertionError("no END card")


def _wat2_specs(path):
    """Reassemble WAT2_nnn (68 characters each, trailing spaces kept) and split it into specN strings."""
    wat2 = [card for card in _raw_header_cards(path) if card.startswith("WAT2_")]
    numbers = [int(card[5:8]) for card in wat2]
    assert numbers == list(range(1, len(wat2) + 1))
    values = [card[11:card.rindex("'")] for card in wat2]
    assert all(len(value) == WAT_CHARS_PER_CARD for value in values[:-1])
    text = "".join(values)
    assert text.startswith("wtype=multispec ")
    return dict(re.findall(r'spec(\d+)\s*=\s*"([^"]*)"', text))


def test_multispec_header_follows_iraf_convention(example):
    from astropy.io import fits

    specs = _wat2_specs(example["multispec"])
    assert sorted(int(number) for number in specs) == list(range(1, 8))
    with fits.open(example["multispec"]) as hdul:
        header, data = hdul[0].header, hdul[0].data
        assert data.shape == (7, header["NAXIS1"])
        assert header["WCSDIM"] == 2 and header["CTYPE1"] == "MULTISPE"
        assert header["WAT0_001"] == "system=multispec"
        assert header["WAT1_001"] == "wtype=multispec label=Wavelength units=angstroms"
        widths = []
        for row in range(7):
            fields = specs[str(row + 1)].split()
            assert len(fields) == 9 and fields[0] == str(row + 1) and fields[2] == "0" and fields[6] == "0."
            w1, dw, nw = float(fields[3]), float(fields[4]), int(fields[5])
            assert 6599.0 < w1 < 6601.0 and dw == pytest.approx(0.18, rel=1e-3)
            assert w1 <= 6625.0 and w1 + dw * (nw - 1) >= 6825.0  # covers the training grid
            assert (data[row, nw:] == 0).all() and (data[row, :nw] > 0.3).all()
            assert 0.95 < np.median(data[row, :nw]) < 1.02
            widths.append(nw)
        assert min(widths) < header["NAXIS1"]


def test_multispec_reads_back_with_the_project_reader(example):
    from anna.fits_io import read_spectra

    specs = _wat2_specs(example["multispec"])
    spectra = read_spectra(example["multispec"])
    assert len(spectra) == 7
    for row, spectrum in enumerate(spectra):
        fields = specs[str(row + 1)].split()
        w1, dw, nw = float(fields[3]), float(fields[4]), int(fields[5])
        assert len(spectrum.flux) == len(spectrum.wavelength) == nw
        np.testing.assert_allclose(spectrum.wavelength, w1 + dw * np.arange(nw), rtol=0, atol=1e-6)


def test_star_spectra_match_the_true_labels_within_the_noise(example):
    from astropy.io import fits

    specs = _wat2_specs(example["multispec"])
    with fits.open(example["multispec"]) as hdul:
        data = hdul[0].data.astype(np.float64)
    fields = specs["1"].split()
    w1, dw, nw = float(fields[3]), float(fields[4]), int(fields[5])
    wave = w1 + dw * np.arange(nw)
    model = synth.synthesize(wave, stars([5770.0, 4.44, 0.0, 1.0, 3.0]))[0]
    continuum = model > 0.998  # away from lines, where a residual velocity shift leaves no trace
    ratio = data[0, :nw][continuum] / model[continuum]
    trend = np.polyval(np.polyfit(wave[continuum], ratio, 1), wave[continuum])  # continuum error: offset, tilt
    assert np.abs(trend - 1.0).max() < 0.05
    sn = 1.0 / np.std(ratio / trend)
    expected = 200.0 * np.median(synth.fibre_relative_sn(wave[continuum]))
    assert 0.7 * expected < sn < 1.3 * expected


# ---------------------------------------------------------------------------------------------------------
# anna-pack: packs from spectrum files


def _write_text_spectra(folder, names, labels, start=6600.0, stop=6850.0, step=0.05):
    wave = np.round(np.arange(start, stop, step), 6)
    flux = synth.synthesize(wave, labels)
    paths = []
    for name, row in zip(names, flux):
        path = folder / name
        np.savetxt(path, np.c_[wave, row], header="wavelength flux")
        paths.append(str(path))
    return paths, wave, flux


def test_build_pack_from_text_spectra_round_trips(tmp_path):
    labels = stars([5000, 4.5, 0.0, 1.0, 2.0], [6100, 4.1, -0.3, 1.5, 12.0], [4500, 4.6, 0.1, 0.8, 1.0])
    paths, wave, flux = _write_text_spectra(tmp_path, ["1001.txt", "1002.txt", "1003.dat"], labels)
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["star_id", "teff", "logg", "feh", "vmic", "vsini"])
        for star_id, row in zip((1003, 1001, 1002), labels[[2, 0, 1]]):  # CSV order differs from file order
            writer.writerow([star_id, *row])
    grid = synth.default_grid()
    out = packer.build_pack_from_spectra(paths, table, grid, tmp_path / "built.pack")
    pack = open_pack(out, expected_npix=1001, expected_nout=5)
    np.testing.assert_array_equal(pack.ids, [1001, 1002, 1003])
    np.testing.assert_array_equal(pack.labels, labels)
    expected = np.array([np.interp(grid, wave, np.loadtxt(path)[:, 1]) for path in paths])
    np.testing.assert_allclose(pack.flux, expected, atol=0)
    np.testing.assert_allclose(pack.flux, synth.synthesize(grid, labels), atol=2e-3)
    assert not os.path.exists(str(out) + ".ids.csv")


def test_build_pack_with_file_column_and_text_ids(tmp_path):
    labels = stars([5000, 4.5, 0.0, 1.0, 2.0], [6100, 4.1, -0.3, 1.5, 12.0])
    paths, _, _ = _write_text_spectra(tmp_path, ["alpha.txt", "beta.txt"], labels)
    table = tmp_path / "labels.csv"
    table.write_text("file,star_id,teff,logg\nbeta.txt,HD 2,6100,4.1\nalpha,HD 1,5000,4.5\n")
    out = packer.build_pack_from_spectra(paths, table, synth.default_grid(), tmp_path / "named.pack",
                                        label_columns=["logg", "teff"])
    pack = open_pack(out)
    np.testing.assert_array_equal(pack.labels, [[4.5, 5000.0], [4.1, 6100.0]])
    np.testing.assert_array_equal(pack.ids, [1, 2])
    with open(str(out) + ".ids.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["pack_id", "file", "star_id"] and rows[1][2] == "HD 1" and rows[2][2] == "HD 2"


def test_build_pack_refuses_spectrum_not_covering_grid(tmp_path):
    labels = stars([5000, 4.5, 0.0, 1.0, 2.0], [6100, 4.1, -0.3, 1.5, 12.0])
    good, _, _ = _write_text_spectra(tmp_path, ["7.txt"], labels[:1])
    short, _, _ = _write_text_spectra(tmp_path, ["8.txt"], labels[1:], start=6640.0)
    table = tmp_path / "labels.csv"
    table.write_text("star_id,teff,logg,feh,vmic,vsini\n7,5000,4.5,0,1,2\n8,6100,4.1,-0.3,1.5,12\n")
    out = tmp_path / "refused.pack"
    with pytest.raises(AnnaInputError, match=r"8\.txt.*covers 6640\.000"):
        packer.build_pack_from_spectra(good + short, table, synth.default_grid(), out)
    assert not out.exists()


def test_build_pack_reports_csv_problems(tmp_path):
    paths, _, _ = _write_text_spectra(tmp_path, ["7.txt", "9.txt"], stars([5000, 4.5, 0, 1, 2], [5000, 4.5, 0, 1, 2]))
    table = tmp_path / "labels.csv"
    table.write_text("star_id,teff\n7,5000\n")
    with pytest.raises(AnnaInputError, match=r"9\.txt.*no row"):
        packer.build_pack_from_spectra(paths, table, synth.default_grid(), tmp_path / "x.pack")
    table.write_text("star_id,teff\n7,5000\n9,hot\n")
    with pytest.raises(AnnaInputError, match=r"labels\.csv:3: teff: label is not a number \(got 'hot'\)"):
        packer.build_pack_from_spectra(paths, table, synth.default_grid(), tmp_path / "x.pack")
    with pytest.raises(AnnaInputError, match="logg"):
        packer.build_pack_from_spectra(paths, table, synth.default_grid(), tmp_path / "x.pack",
                                      label_columns=["logg"])


def test_build_pack_reads_one_dimensional_fits_and_refuses_multispec(tmp_path, example):
    from astropy.io import fits

    wave = 6600.0 + 0.1 * np.arange(2500)
    flux = synth.synthesize(wave, stars([5300, 4.5, 0.0, 1.0, 2.0]))[0]
    hdu = fits.PrimaryHDU(flux)
    hdu.header.update(CRVAL1=6600.0, CDELT1=0.1, CRPIX1=1.0, CTYPE1="LINEAR", CUNIT1="Angstrom")
    hdu.writeto(tmp_path / "42.fits")
    table = tmp_path / "labels.csv"
    table.write_text("star_id,teff\n42,5300\nstar_multispec,5770\n")
    grid = synth.default_grid()
    pack = open_pack(packer.build_pack_from_spectra([tmp_path / "42.fits"], table, grid, tmp_path / "f.pack"))
    np.testing.assert_allclose(pack.flux[0], np.interp(grid, wave, flux), atol=1e-12)
    assert pack.ids[0] == 42 and pack.labels[0, 0] == 5300
    with pytest.raises(AnnaInputError, match="holds 7 spectra"):
        packer.build_pack_from_spectra([example["multispec"]], table, grid, tmp_path / "m.pack")
