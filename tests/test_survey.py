"""Survey readers on real files (tests/data/README names their sources): identification from structure,
wavelengths against the header formulas written out here, errors and masks as the files hold them."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from anna.errors import AnnaInputError
from anna.survey import read_survey_file

DATA = os.path.join(os.path.dirname(__file__), "data")
LRS_IMAGE = os.path.join(DATA, "spec-58397-EG014118N254444M01_sp03-031.cut.fits")
MRS = os.path.join(DATA, "med-58408-TD230151N343645T01_sp01-015.cut.fits")
SDSS = os.path.join(DATA, "spec-4055-55359-0010.cut.fits")
APSTAR = os.path.join(DATA, "apStar-r6-2M00452143+1634446.cut.fits")
ASPCAP = os.path.join(DATA, "aspcapStar-r6-l30e.2-2M00452143+1634446.cut.fits")
APVISIT = os.path.join(DATA, "apVisit-2M00452143+1634446-0.cut.fits")
C_KMS = 299792.458


def test_lamost_lrs_image_real_file():
    kind, spectra = read_survey_file(LRS_IMAGE)
    assert kind == "LAMOST LRS image" and len(spectra) == 1
    with fits.open(LRS_IMAGE) as hdus:
        header, rows = hdus[0].header, hdus[0].data.astype(np.float64)
    # LAMOST's log-linear formula: log10(lambda_i) = COEFF0 + COEFF1 * i, i = 0..N-1
    formula = 10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(rows.shape[1]))
    spectrum = spectra[0]
    np.testing.assert_allclose(spectrum.wavelength, formula, rtol=1e-6)  # the file's row is float32
    np.testing.assert_array_equal(spectrum.flux, rows[0])
    ivar, andmask = rows[1], rows[3]
    np.testing.assert_array_equal(spectrum.bad, (ivar <= 0) | (andmask != 0))
    good = ivar > 0
    np.testing.assert_allclose(spectrum.error[good], 1 / np.sqrt(ivar[good]))
    assert np.isinf(spectrum.error[~good]).all() and spectrum.bad.sum() > 0
    assert spectrum.velocity == pytest.approx(C_KMS * header["Z"]) and spectrum.velocity_key == "Z"
    assert spectrum.name == str(header["OBSID"])


def _built_lrs_table(tmp_path, ivar_length=None, drop=()):
    """A LAMOST LRS file in the DR9+ table form, BUILT here from the real DR7 image-form file's header and arrays
    (no public MIT-compatible file of this form was found; see tests/data/README)."""
    with fits.open(LRS_IMAGE) as hdus:
        header, rows = hdus[0].header.copy(), hdus[0].data.astype(np.float32)
    for key in ("NAXIS1", "NAXIS2"):
        header.remove(key, ignore_missing=True)
    header["NAXIS"] = 0
    npix = rows.shape[1]
    ivar = rows[1] if ivar_length is None else np.resize(rows[1], ivar_length)
    columns = {"FLUX": rows[0], "IVAR": ivar, "WAVELENGTH": rows[2], "ANDMASK": rows[3], "ORMASK": rows[4]}
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name=name, format=f"{len(values)}E", array=values[None, :])
         for name, values in columns.items() if name not in drop], name="COADD")
    path = tmp_path / "lrs_table_built.fits"
    fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(path)
    return path, rows, npix


def test_lamost_lrs_table_form_on_built_file(tmp_path):
    path, rows, _ = _built_lrs_table(tmp_path)
    kind, spectra = read_survey_file(path)
    assert kind == "LAMOST LRS table"
    np.testing.assert_array_equal(spectra[0].wavelength, rows[2].astype(np.float64))
    np.testing.assert_array_equal(spectra[0].flux, rows[0].astype(np.float64))
    np.testing.assert_array_equal(spectra[0].bad, (rows[1] <= 0) | (rows[3] != 0))


def test_lamost_mrs_real_file_every_extension_is_a_spectrum():
    kind, spectra = read_survey_file(MRS)
    assert kind == "LAMOST MRS"
    assert [spectrum.name for spectrum in spectra] == ["COADD_B", "COADD_R", "B-84107311", "R-84107311"]
    with fits.open(MRS) as hdus:
        for spectrum in spectra:
            table = hdus[spectrum.name].data
            np.testing.assert_allclose(spectrum.wavelength, np.power(10.0, table["LOGLAM"].astype(np.float64)))
            mask = table["ANDMASK"] if "ANDMASK" in table.names else table["PIXMASK"]
            np.testing.assert_array_equal(spectrum.bad, (table["IVAR"] <= 0) | (mask != 0))
            assert 4800 < spectrum.wavelength[0] < 6900
    assert spectra[3].bad.any()  # the red exposure has a masked pixel in the kept rows


def test_sdss_spec_real_file():
    kind, spectra = read_survey_file(SDSS)
    assert kind == "SDSS spec" and len(spectra) == 1
    with fits.open(SDSS) as hdus:
        coadd, z = hdus["COADD"].data, float(hdus["SPALL"].data["Z"][0])
    spectrum = spectra[0]
    np.testing.assert_allclose(spectrum.wavelength, 10.0 ** coadd["loglam"].astype(np.float64))
    np.testing.assert_array_equal(spectrum.bad, (coadd["ivar"] <= 0) | (coadd["and_mask"] != 0))
    good = coadd["ivar"] > 0
    np.testing.assert_allclose(spectrum.error[good], 1 / np.sqrt(coadd["ivar"][good].astype(np.float64)))
    assert spectrum.velocity == pytest.approx(C_KMS * z) and spectrum.velocity_key == "SPALL.Z"


def test_apogee_apstar_real_file_combined_and_visit_rows():
    kind, spectra = read_survey_file(APSTAR)
    assert kind == "APOGEE apStar"
    assert [spectrum.name for spectrum in spectra] == ["combined_pixel", "combined_global", "visit1", "visit2",
                                                        "visit3"]
    with fits.open(APSTAR) as hdus:
        header = hdus[1].header
        flux, error, mask = hdus[1].data, hdus[2].data, hdus[3].data
        vhelio = hdus[0].header["VHELIO"]
    pixels = np.arange(flux.shape[1])
    formula = 10.0 ** (header["CRVAL1"] + header["CDELT1"] * (pixels + 1 - header["CRPIX1"]))
    for row, spectrum in enumerate(spectra):
        np.testing.assert_allclose(spectrum.wavelength, formula, rtol=1e-12)
        np.testing.assert_array_equal(spectrum.error, error[row])
        bad_bits = (mask[row].astype(np.int64) & 0b1_0000_1111_1111) != 0
        assert (spectrum.bad >= bad_bits).all()
        assert spectrum.rest_frame and spectrum.velocity == pytest.approx(vhelio)
    assert spectra[0].bad.any() and not spectra[0].bad.all()


def test_apogee_aspcapstar_real_file():
    kind, spectra = read_survey_file(ASPCAP)
    assert kind == "APOGEE aspcapStar" and len(spectra) == 1
    with fits.open(ASPCAP) as hdus:
        header, flux = hdus[1].header, hdus[1].data
    formula = 10.0 ** (header["CRVAL1"] + header["CDELT1"] * np.arange(flux.size))
    np.testing.assert_allclose(spectra[0].wavelength, formula, rtol=1e-12)
    assert spectra[0].normalised and 0.5 < np.median(spectra[0].flux[~spectra[0].bad]) < 1.2
    assert (spectra[0].bad >= (flux == 0)).all()


def test_apogee_apvisit_real_file_joins_chips_ascending():
    kind, spectra = read_survey_file(APVISIT)
    assert kind == "APOGEE apVisit" and len(spectra) == 1
    with fits.open(APVISIT) as hdus:
        wave, flux, velocity = hdus[4].data.reshape(-1), hdus[1].data.reshape(-1), hdus[0].header["VRAD"]
    order = np.argsort(wave)
    np.testing.assert_array_equal(spectra[0].wavelength, wave[order])
    np.testing.assert_array_equal(spectra[0].flux, flux[order].astype(np.float64))
    assert (np.diff(spectra[0].wavelength) > 0).all() and spectra[0].velocity == pytest.approx(velocity)


def test_plain_1d_fits_with_ivar_extension_built_file(tmp_path):
    flux = np.linspace(1.0, 2.0, 50)
    ivar = np.full(50, 4.0)
    ivar[7] = 0
    primary = fits.PrimaryHDU(flux)
    primary.header.update(CRVAL1=5000.0, CDELT1=0.5, CRPIX1=1.0)
    path = tmp_path / "plain.fits"
    fits.HDUList([primary, fits.ImageHDU(ivar, name="IVAR")]).writeto(path)
    kind, spectra = read_survey_file(path)
    assert kind == "1-D FITS with errors"
    np.testing.assert_allclose(spectra[0].wavelength, 5000.0 + 0.5 * np.arange(50))
    assert np.flatnonzero(spectra[0].bad).tolist() == [7] and spectra[0].error[0] == 0.5


def test_identification_ignores_the_file_name(tmp_path):
    renamed = tmp_path / "spectrum_without_hint.dat"
    shutil.copy(APSTAR, renamed)
    assert read_survey_file(renamed)[0] == "APOGEE apStar"


def _spectra_command(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from anna.cli import spectra_main; "
                           "sys.exit(spectra_main())", *map(str, args)], capture_output=True, text=True)


def test_anna_spectra_lists_every_spectrum_and_writes_errors(tmp_path):
    result = _spectra_command(MRS, APSTAR, "--text", tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("COADD_B", "COADD_R", "B-84107311", "R-84107311", "combined_pixel", "visit3"):
        assert name in result.stdout
    assert "ivar, andmask" in result.stdout and "error, mask" in result.stdout
    table = np.loadtxt(tmp_path / "med-58408-TD230151N343645T01_sp01-015.cut.COADD_B.txt")
    assert table.shape == (600, 3) and np.isfinite(table[:, 2]).all()


def test_bad_survey_files_give_one_line_and_exit_2(tmp_path):
    path, _, npix = _built_lrs_table(tmp_path, ivar_length=100)
    result = _spectra_command(path)
    assert result.returncode == 2 and "IVAR has 100 values but the flux has 800" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    with fits.open(SDSS) as hdus:
        coadd = hdus["COADD"]
        columns = [column for column in coadd.columns if column.name != "ivar"]
        broken = fits.HDUList([hdus[0].copy(), fits.BinTableHDU.from_columns(columns, name="COADD")])
        broken.writeto(tmp_path / "no_ivar.fits")
    result = _spectra_command(tmp_path / "no_ivar.fits")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no_ivar.fits" in result.stderr and "lacks column(s) IVAR" in result.stderr


def test_required_columns_missing_names_them(tmp_path):
    path, _, _ = _built_lrs_table(tmp_path, drop=("IVAR",))
    with pytest.raises(AnnaInputError, match="lacks column\\(s\\) IVAR"):
        read_survey_file(path)
