"""Tests for anna.fits_io: IRAF multispec / equispec / 1-D linear FITS readers.

Two kinds of evidence:
* real files (in the shared reference folder beside the checkout, skipped when absent) whose wavelengths
  were computed by IRAF itself; every aperture must agree to 1e-9 Angstrom (README's claim; the worst
  pixel of the fifteen files is 8.0e-10 A off, at 39 287 A in multispec-linear-log.fits);
* synthetic files written here with astropy, one per dispersion type and function, checked against
  wavelengths computed in this file straight from the specwcs formulas (numpy's own Chebyshev / Legendre
  series, np.interp, an explicit per-pixel spline loop), never through the reader's code.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from numpy.polynomial import chebyshev, legendre

from anna.errors import AnnaInputError
from anna.fits_io import Spectrum, describe_file, read_spectra, write_text_spectra

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "fits"
REFERENCE_FILES = sorted(p.name for p in REFERENCE.glob("*.fits")) if REFERENCE.is_dir() else []
TOLERANCE = 1e-9  # Angstrom

# Files where specutils 2.4.0 disagrees with IRAF: 1-D spectra with DC-FLAG = 1 (log-linear sampling), for
# which specutils returns log10(wavelength) without the antilog that IRAF's onedspec applies.
SPECUTILS_MISSES_DC_FLAG = {
    "astropy__specutils__UM669_nF.fits",
    "soar-telescope__goodman_pipeline__log-linear_fits_solution.fits",
}


def needs_reference():
    if not REFERENCE_FILES:
        pytest.skip("shared reference FITS folder is absent")


# ----------------------------------------------------------------------------------------------------------
# Real files against IRAF


@pytest.mark.parametrize("name", REFERENCE_FILES or ["(reference folder absent)"])
def test_reference_file_matches_iraf(name):
    needs_reference()
    path = REFERENCE / name
    reference = np.load(str(path) + ".ref.npz")
    iraf_wavelength, iraf_flux = reference["wavelength"], reference["flux"]
    spectra = read_spectra(path)
    is_multispec = b"system=multispec" in path.read_bytes()[:40 * 2880]
    assert len(spectra) == iraf_wavelength.shape[0]
    for row, spectrum in enumerate(spectra):
        assert isinstance(spectrum, Spectrum)
        assert spectrum.index == row and spectrum.source == str(path)
        assert spectrum.n_pixels == iraf_wavelength.shape[1]
        n_valid = len(spectrum.wavelength)
        assert spectrum.wavelength.dtype == np.float64 and spectrum.flux.dtype == np.float64
        assert len(spectrum.flux) == n_valid
        assert int(np.sum(np.isfinite(iraf_wavelength[row]))) >= n_valid > 0
        error = np.max(np.abs(spectrum.wavelength - iraf_wavelength[row, :n_valid]))
        assert error < TOLERANCE, f"row {row} aperture {spectrum.aperture}: {error} A from IRAF"
        np.testing.assert_array_equal(spectrum.flux, iraf_flux[row, :n_valid])
        if "aperture_numbers" in reference.files:
            assert spectrum.aperture == reference["aperture_numbers"][row]
        if is_multispec:
            assert spectrum.dtype in (0, 1, 2)
        else:
            assert spectrum.dtype is None


def test_reference_manifest_lists_every_file():
    needs_reference()
    manifest = json.loads((REFERENCE / "manifest.json").read_text())
    assert sorted(entry["file"] for entry in manifest) == REFERENCE_FILES
    assert len(REFERENCE_FILES) == 15


@pytest.mark.parametrize("name", REFERENCE_FILES or ["(reference folder absent)"])
def test_reference_file_against_specutils(name):
    """Where specutils produced wavelengths, we agree with it except on the DC-FLAG=1 files, where it
    forgets the antilog (and IRAF, whom we follow, applies it)."""
    needs_reference()
    reference = np.load(str(REFERENCE / name) + ".ref.npz")
    if "specutils_wavelength" not in reference.files:
        pytest.skip(f"specutils could not read {name}: {reference['specutils_status']}")
    specutils = reference["specutils_wavelength"]
    iraf_agrees = np.allclose(specutils, reference["wavelength"], rtol=0, atol=TOLERANCE, equal_nan=True)
    assert iraf_agrees == (name not in SPECUTILS_MISSES_DC_FLAG)
    for spectrum in read_spectra(REFERENCE / name):
        theirs = specutils[spectrum.index, :len(spectrum.wavelength)]
        if name in SPECUTILS_MISSES_DC_FLAG:
            theirs = 10.0 ** theirs
            np.testing.assert_allclose(spectrum.wavelength, theirs, rtol=1e-12)
        else:
            assert np.max(np.abs(spectrum.wavelength - theirs)) < TOLERANCE


def test_reference_reads_combined_weighted_functions():
    """Combined.fits spec1 is a Legendre (weight 2, zero point 1) + Chebyshev (weight 3) pair: IRAF returns
    the weighted mean, so the result lies between the two functions, not at their weighted sum."""
    needs_reference()
    spectrum = read_spectra(REFERENCE / "astropy__specutils__Combined.fits")[0]
    assert spectrum.function == "legendre+chebyshev"
    assert 3800 < spectrum.wavelength.min() and spectrum.wavelength.max() < 8500


# ----------------------------------------------------------------------------------------------------------
# Synthetic files


def _chunks(text, size=68):
    return [text[i:i + size] for i in range(0, len(text), size)]


def write_multispec(path, specs, flux, header_cards=(), wat_prefix="wtype=multispec"):
    """Write an IRAF-style multispec image: WAT2 cut into 68-character cards exactly as IRAF does."""
    flux = np.asarray(flux, dtype=np.float64)
    hdu = fits.PrimaryHDU(flux)
    header = hdu.header
    header["WCSDIM"] = max(flux.ndim, 2)
    header["CTYPE1"] = "MULTISPE"
    header["CTYPE2"] = "MULTISPE"
    header["CD1_1"] = 1.0
    header["CD2_2"] = 1.0
    header["LTM1_1"] = 1.0
    header["LTM2_2"] = 1.0
    header["WAT0_001"] = "system=multispec"
    header["WAT1_001"] = "wtype=multispec label=Wavelength units=angstroms"
    text = wat_prefix + "".join(f' spec{n} = "{spec}"' for n, spec in enumerate(specs, start=1))
    for number, chunk in enumerate(_chunks(text), start=1):
        header[f"WAT2_{number:03d}"] = chunk
    for key, value in header_cards:
        header[key] = value
    hdu.writeto(path, overwrite=True)
    return path


def spec_string(ap, dtype, w1, dw, nw, z=0.0, functions="", beam=None):
    w1, dw, z = float(w1), float(dw), float(z)
    text = f"{ap} {ap + 50 if beam is None else beam} {dtype} {w1!r} {dw!r} {nw} {z!r} 10.5 20.5"
    return text + (" " + functions if functions else "")


def numbers(values):
    return " ".join(repr(float(v)) for v in values)


NW = 64
PIXELS = np.arange(1, NW + 1, dtype=np.float64)


def read_single(tmp_path, spec, nw=NW, name="one.fits"):
    flux = np.linspace(1.0, 2.0, nw)
    write_multispec(tmp_path / name, [spec], flux[np.newaxis, :])
    spectra = read_spectra(tmp_path / name)
    assert len(spectra) == 1
    np.testing.assert_array_equal(spectra[0].flux, flux)
    return spectra[0]


def normalised(p, pmin, pmax):
    return (2 * p - (pmax + pmin)) / (pmax - pmin)


def test_linear_dispersion(tmp_path):
    spectrum = read_single(tmp_path, spec_string(7, 0, 4000.25, 0.125, NW))
    np.testing.assert_allclose(spectrum.wavelength, 4000.25 + 0.125 * (PIXELS - 1), rtol=0, atol=1e-9)
    assert (spectrum.aperture, spectrum.beam, spectrum.dtype) == (7, 57, 0)
    assert spectrum.function == "linear" and spectrum.n_pixels == NW


def test_log_linear_dispersion(tmp_path):
    spectrum = read_single(tmp_path, spec_string(1, 1, 3.6, 1e-4, NW))
    np.testing.assert_allclose(spectrum.wavelength, 10 ** (3.6 + 1e-4 * (PIXELS - 1)), rtol=1e-13)
    assert spectrum.dtype == 1 and spectrum.function == "log-linear"


def test_chebyshev(tmp_path):
    coefficients = [5000.0, 120.0, -3.5, 0.75, -0.125]
    pmin, pmax = 1.0, 64.0
    spec = spec_string(1, 2, 4880.0, 3.8, NW, functions=f"1. 0. 1 5 {pmin} {pmax} {numbers(coefficients)}")
    spectrum = read_single(tmp_path, spec)
    expected = chebyshev.chebval(normalised(PIXELS, pmin, pmax), coefficients)
    np.testing.assert_allclose(spectrum.wavelength, expected, rtol=0, atol=1e-9)
    assert spectrum.function == "chebyshev order 5" and spectrum.dtype == 2


def test_legendre_with_range_not_covering_the_pixels(tmp_path):
    """pmin/pmax narrower than the spectrum (real IRAF output does this): the polynomial extrapolates."""
    coefficients = [6000.0, 250.0, 4.0, -1.5]
    pmin, pmax = 10.3, 50.7
    spec = spec_string(3, 2, 5700.0, 8.0, NW, functions=f"1. 0. 2 4 {pmin} {pmax} {numbers(coefficients)}")
    spectrum = read_single(tmp_path, spec)
    expected = legendre.legval(normalised(PIXELS, pmin, pmax), coefficients)
    np.testing.assert_allclose(spectrum.wavelength, expected, rtol=0, atol=1e-9)
    assert spectrum.function == "legendre order 4"


def spline_expected(p, pmin, pmax, pieces, coefficients, cubic):
    """The specwcs spline formulas, pixel by pixel (no 1/6 factor in the cubic basis)."""
    out = []
    for value in p:
        s = (value - pmin) / (pmax - pmin) * pieces
        j = min(max(int(np.floor(s)), 0), pieces - 1)
        a, b = (j + 1) - s, s - j
        if cubic:
            basis = [a ** 3, 1 + 3 * a * (1 + a * b), 1 + 3 * b * (1 + a * b), b ** 3]
        else:
            basis = [a, b]
        out.append(sum(coefficients[j + i] * x for i, x in enumerate(basis)))
    return np.array(out)


def test_cubic_spline(tmp_path):
    pieces, pmin, pmax = 4, 1.0, 64.0
    coefficients = [700.0, 770.0, 845.0, 925.0, 1010.0, 1100.0, 1195.0]  # pieces + 3
    spec = spec_string(1, 2, 4600.0, 1.5, NW, functions=f"1. 0. 3 {pieces} {pmin} {pmax} {numbers(coefficients)}")
    spectrum = read_single(tmp_path, spec)
    expected = spline_expected(PIXELS, pmin, pmax, pieces, coefficients, cubic=True)
    np.testing.assert_allclose(spectrum.wavelength, expected, rtol=0, atol=1e-9)
    # With the conventional 1/6 normalisation the values would be six times smaller.
    assert spectrum.wavelength.min() > 4000
    assert spectrum.function == "cubic spline 4 pieces"


def test_linear_spline(tmp_path):
    pieces, pmin, pmax = 5, 0.5, 64.5
    coefficients = [5000.0, 5030.0, 5065.0, 5093.0, 5130.0, 5160.0]  # pieces + 1
    spec = spec_string(2, 2, 5000.0, 2.5, NW, functions=f"1. 0. 4 {pieces} {pmin} {pmax} {numbers(coefficients)}")
    spectrum = read_single(tmp_path, spec)
    expected = spline_expected(PIXELS, pmin, pmax, pieces, coefficients, cubic=False)
    np.testing.assert_allclose(spectrum.wavelength, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(expected, np.interp((PIXELS - pmin) / (pmax - pmin) * pieces,
                                                   np.arange(pieces + 1), coefficients), atol=1e-9)
    assert spectrum.function == "linear spline 5 pieces"


def test_pixel_table(tmp_path):
    rng = np.random.default_rng(5)
    table = 6000.0 + np.cumsum(rng.uniform(0.9, 1.1, NW))
    spec = spec_string(4, 2, table[0], 1.0, NW, functions=f"1. 0. 5 {NW} {numbers(table)}")
    spectrum = read_single(tmp_path, spec)
    np.testing.assert_allclose(spectrum.wavelength, table, rtol=0, atol=1e-9)
    assert spectrum.function == f"pixel table {NW} points"


@pytest.mark.parametrize("count_is_pairs", [False, True])
def test_sampled_table(tmp_path, count_is_pairs):
    """ftype 6: "n dummy p1 w1 p2 w2 ..."; IRAF's driver reads n as the number of values, the specwcs prose
    as the number of pairs: both are accepted."""
    sample_pixels = np.array([0.5, 9.0, 20.0, 33.5, 47.0, 64.5])
    sample_waves = np.array([7000.0, 7017.0, 7039.5, 7066.0, 7093.5, 7128.0])
    pairs = np.column_stack([sample_pixels, sample_waves]).ravel()
    count = len(sample_pixels) if count_is_pairs else len(pairs)
    spec = spec_string(5, 2, 7000.0, 2.0, NW, functions=f"1. 0. 6 {count} 0 {numbers(pairs)}")
    spectrum = read_single(tmp_path, spec)
    np.testing.assert_allclose(spectrum.wavelength, np.interp(PIXELS, sample_pixels, sample_waves),
                               rtol=0, atol=1e-9)
    assert spectrum.function == f"sampled table {len(sample_pixels)} points"


def test_weighted_functions_and_redshift(tmp_path):
    """Two functions: w = (wt1 (zp1 + W1) + wt2 (zp2 + W2)) / (wt1 + wt2), then divided by (1 + z)."""
    cheb, leg = [5000.0, 100.0, -2.0], [4990.0, 104.0, 1.0, 0.5]
    z = 0.0125
    functions = (f"2. 1.5 1 3 1. 64. {numbers(cheb)} "
                 f"3. -0.25 2 4 1. 64. {numbers(leg)}")
    spectrum = read_single(tmp_path, spec_string(1, 2, 4900.0, 3.2, NW, z=z, functions=functions))
    n = normalised(PIXELS, 1.0, 64.0)
    expected = (2 * (1.5 + chebyshev.chebval(n, cheb)) + 3 * (-0.25 + legendre.legval(n, leg))) / 5 / (1 + z)
    np.testing.assert_allclose(spectrum.wavelength, expected, rtol=0, atol=1e-9)
    assert spectrum.function == "chebyshev+legendre"


def test_redshift_on_linear_and_log_linear(tmp_path):
    """IRAF's driver divides by (1 + z) after the antilog for log-linear spectra."""
    z = -0.002
    specs = [spec_string(1, 0, 5000.0, 0.5, NW, z=z), spec_string(2, 1, 3.7, 2e-5, NW, z=z)]
    write_multispec(tmp_path / "z.fits", specs, np.ones((2, NW)))
    linear, log_linear = read_spectra(tmp_path / "z.fits")
    np.testing.assert_allclose(linear.wavelength, (5000.0 + 0.5 * (PIXELS - 1)) / (1 + z), rtol=1e-14)
    np.testing.assert_allclose(log_linear.wavelength, 10 ** (3.7 + 2e-5 * (PIXELS - 1)) / (1 + z), rtol=1e-13)


def test_wat_card_boundaries_keep_trailing_spaces(tmp_path):
    """A card that ends in a blank separates two numbers; stripping it (as astropy's Card.value does)
    would glue them together."""
    coefficients = [4000.5, 16.0, -0.25]
    spec = spec_string(1, 2, 4000.5, 0.5, NW, functions=f"1. 0. 1 3 1. 64. {numbers(coefficients)}")
    prefix = "wtype=multispec"
    while True:  # pad until the first card boundary falls just after a blank, before a digit
        text = prefix + f' spec1 = "{spec}"'
        if text[67] == " " and text[68].isdigit():
            break
        prefix += " "
        assert len(prefix) < 100
    write_multispec(tmp_path / "blank.fits", [spec], np.ones((1, NW)), wat_prefix=prefix)
    with fits.open(tmp_path / "blank.fits") as hdus:
        assert len(hdus[0].header["WAT2_001"]) < 68  # astropy drops the significant blank
    spectrum = read_spectra(tmp_path / "blank.fits")[0]
    expected = chebyshev.chebval(normalised(PIXELS, 1.0, 64.0), coefficients)
    np.testing.assert_allclose(spectrum.wavelength, expected, rtol=0, atol=1e-9)


def test_zero_padding_past_nw_is_trimmed_per_aperture(tmp_path):
    naxis1 = 80
    flux = np.zeros((3, naxis1))
    lengths = [80, 64, 50]
    for row, n in enumerate(lengths):
        flux[row, :n] = row + 1.0
    specs = [spec_string(row + 1, 0, 5000.0 + 100 * row, 0.5, n) for row, n in enumerate(lengths)]
    write_multispec(tmp_path / "padded.fits", specs, flux)
    spectra = read_spectra(tmp_path / "padded.fits")
    for row, (spectrum, n) in enumerate(zip(spectra, lengths)):
        assert len(spectrum.wavelength) == len(spectrum.flux) == n
        assert spectrum.n_pixels == naxis1
        assert np.all(spectrum.flux == row + 1.0)
        np.testing.assert_allclose(spectrum.wavelength, 5000.0 + 100 * row + 0.5 * np.arange(n), rtol=1e-14)


def test_three_d_image_reads_band_one(tmp_path):
    bands = np.stack([np.full((2, NW), 1.0), np.full((2, NW), 2.0), np.full((2, NW), 3.0)])
    bands[0, 1] = np.nan  # an all-NaN aperture is returned, not refused
    specs = [spec_string(11, 0, 4000.0, 1.0, NW), spec_string(12, 0, 4100.0, 1.0, NW)]
    write_multispec(tmp_path / "bands.fits", specs, bands)
    first, second = read_spectra(tmp_path / "bands.fits")
    assert np.all(first.flux == 1.0) and np.all(np.isnan(second.flux))
    assert (first.aperture, second.aperture) == (11, 12) and (first.index, second.index) == (0, 1)
    np.testing.assert_allclose(second.wavelength, 4100.0 + PIXELS - 1, rtol=1e-14)


def test_image_section_offsets_physical_pixels(tmp_path):
    """LTV1 = -10: image pixel 1 is physical pixel 11; only physical pixels up to nw hold data."""
    write_multispec(tmp_path / "section.fits", [spec_string(1, 0, 5000.0, 1.0, 60)], np.ones((1, NW)),
                    header_cards=[("LTV1", -10.0)])
    spectrum = read_spectra(tmp_path / "section.fits")[0]
    np.testing.assert_allclose(spectrum.wavelength, 5000.0 + np.arange(10, 60), rtol=1e-14)
    assert spectrum.n_pixels == NW


def test_one_dimensional_multispec(tmp_path):
    flux = np.linspace(0.5, 1.5, NW)
    write_multispec(tmp_path / "single.fits", [spec_string(9, 0, 4500.0, 0.5, NW)], flux,
                    header_cards=[("WAXMAP01", "1 0 0 0")])
    (spectrum,) = read_spectra(tmp_path / "single.fits")
    assert spectrum.aperture == 9
    np.testing.assert_array_equal(spectrum.flux, flux)


def write_linear(path, flux, cards):
    hdu = fits.PrimaryHDU(np.asarray(flux))
    for key, value in cards:
        hdu.header[key] = value
    hdu.writeto(path, overwrite=True)
    return path


def test_plain_one_dimensional_cdelt(tmp_path):
    flux = np.arange(100, dtype=np.float64)
    write_linear(tmp_path / "cdelt.fits", flux, [("CRVAL1", 6000.0), ("CDELT1", 0.2), ("CRPIX1", 11.0)])
    (spectrum,) = read_spectra(tmp_path / "cdelt.fits")
    np.testing.assert_allclose(spectrum.wavelength, 6000.0 + 0.2 * (np.arange(1, 101) - 11), rtol=1e-14)
    np.testing.assert_array_equal(spectrum.flux, flux)
    assert (spectrum.aperture, spectrum.beam, spectrum.dtype) == (None, None, None)
    assert spectrum.function == "1-D CRVAL1/CDELT1"


def test_plain_one_dimensional_cd_wins_and_crpix_defaults_to_zero(tmp_path):
    """CRPIX1 absent: 0 as in the FITS standard and IRAF, so pixel l has CRVAL1 + CD1_1 * l."""
    write_linear(tmp_path / "cd.fits", np.ones(50), [("CRVAL1", 6000.0), ("CDELT1", 9.9), ("CD1_1", 0.5)])
    (spectrum,) = read_spectra(tmp_path / "cd.fits")
    np.testing.assert_allclose(spectrum.wavelength, 6000.0 + 0.5 * np.arange(1, 51), rtol=1e-14)
    assert spectrum.function == "1-D CRVAL1/CD1_1"


def test_plain_one_dimensional_dc_flag_log(tmp_path):
    cards = [("CRVAL1", 3.5), ("CDELT1", 3e-5), ("CRPIX1", 1.0), ("DC-FLAG", 1), ("APNUM1", "3 7 10.0 20.0")]
    write_linear(tmp_path / "log.fits", np.ones(200), cards)
    (spectrum,) = read_spectra(tmp_path / "log.fits")
    np.testing.assert_allclose(spectrum.wavelength, 10 ** (3.5 + 3e-5 * np.arange(200)), rtol=1e-13)
    assert (spectrum.aperture, spectrum.beam) == (3, 7)
    assert "DC-FLAG=1" in spectrum.function


def test_gzip_compressed_file(tmp_path):
    write_linear(tmp_path / "packed.fits.gz", np.arange(40.0), [("CRVAL1", 5000.0), ("CDELT1", 0.5), ("CRPIX1", 1.0)])
    (spectrum,) = read_spectra(tmp_path / "packed.fits.gz")
    np.testing.assert_allclose(spectrum.wavelength, 5000.0 + 0.5 * np.arange(40), rtol=1e-14)
    np.testing.assert_array_equal(spectrum.flux, np.arange(40.0))


def test_equispec_two_dimensional(tmp_path):
    cards = [("WAT0_001", "system=equispec"), ("CRVAL1", 4000.0), ("CD1_1", 2.0), ("CRPIX1", 1.0),
             ("APNUM1", "41 3 7.37 13.48"), ("APNUM2", "15 1 28.04 34.15")]
    write_linear(tmp_path / "equi.fits", np.ones((2, 30)), cards)
    first, second = read_spectra(tmp_path / "equi.fits")
    np.testing.assert_array_equal(first.wavelength, second.wavelength)
    np.testing.assert_allclose(first.wavelength, 4000.0 + 2.0 * np.arange(30), rtol=1e-14)
    assert (first.aperture, second.aperture, second.beam) == (41, 15, 1)


def test_odd_headers_are_read(tmp_path):
    """P.I. keyword, a non-ASCII byte, BLANK on float data, no final padding: all read."""
    path = write_linear(tmp_path / "odd.fits", np.linspace(1, 2, 1000).astype(np.float32),
                        [("CRVAL1", 5000.0), ("CDELT1", 0.1), ("CRPIX1", 1.0)] + [("COMMENT", "placeholder")] * 3)
    raw = bytearray(path.read_bytes())
    replacements = [b"P.I.    = 'Latham  '", b"BLANK   =               -32768",
                    b"PARAM0  =               -106.2 / CCD Temperature,\xb0C"]
    for new in replacements:
        at = raw.index(b"COMMENT placeholder")
        raw[at:at + 80] = new.ljust(80)
    data_bytes = 1000 * 4
    header_bytes = len(raw) - ((data_bytes + 2879) // 2880) * 2880
    path.write_bytes(bytes(raw[:header_bytes + data_bytes]))  # drop the final padding
    (spectrum,) = read_spectra(path)
    np.testing.assert_allclose(spectrum.wavelength, 5000.0 + 0.1 * np.arange(1000), rtol=1e-14)
    np.testing.assert_array_equal(spectrum.flux, np.linspace(1, 2, 1000).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_not_a_fits_file(tmp_path):
    path = tmp_path / "notes.fits"
    path.write_text("wavelength flux\n5000 1.0\n")
    with pytest.raises(AnnaInputError, match="not a FITS file") as caught:
        read_spectra(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(AnnaInputError, match="not found"):
        read_spectra(tmp_path / "nowhere.fits")


def test_unsupported_function_type_is_named(tmp_path):
    spec = spec_string(1, 2, 5000.0, 1.0, NW, functions="1. 0. 7 3 1. 64. 5000. 30. 1.")
    write_multispec(tmp_path / "ftype7.fits", [spec], np.ones((1, NW)))
    with pytest.raises(AnnaInputError, match="unsupported dispersion function type 7") as caught:
        read_spectra(tmp_path / "ftype7.fits")
    assert "spec1" in str(caught.value) and "ftype7.fits" in str(caught.value)


def test_truncated_coefficients(tmp_path):
    spec = spec_string(1, 2, 5000.0, 1.0, NW, functions="1. 0. 2 5 1. 64. 5000. 30.")
    write_multispec(tmp_path / "short.fits", [spec], np.ones((1, NW)))
    with pytest.raises(AnnaInputError, match="legendre"):
        read_spectra(tmp_path / "short.fits")


def test_no_usable_wcs(tmp_path):
    write_linear(tmp_path / "bare.fits", np.ones(20), [])
    with pytest.raises(AnnaInputError, match="no usable WCS"):
        read_spectra(tmp_path / "bare.fits")
    write_multispec(tmp_path / "uncal.fits", [spec_string(1, -1, 1.0, 1.0, 20)], np.ones((1, 20)))
    with pytest.raises(AnnaInputError, match="not dispersion-calibrated"):
        read_spectra(tmp_path / "uncal.fits")


def test_empty_data(tmp_path):
    fits.PrimaryHDU().writeto(tmp_path / "empty.fits")
    with pytest.raises(AnnaInputError, match="no image data"):
        read_spectra(tmp_path / "empty.fits")


# ----------------------------------------------------------------------------------------------------------
# describe_file and write_text_spectra


def test_describe_file_names_apertures(tmp_path):
    specs = [spec_string(17, 0, 4000.0, 1.0, NW, beam=101),
             spec_string(23, 2, 4100.0, 1.0, NW, beam=102, functions="1. 0. 2 2 1. 64. 4131.5 31.5")]
    write_multispec(tmp_path / "two.fits", specs, np.ones((2, NW)))
    text = describe_file(tmp_path / "two.fits")
    lines = text.splitlines()
    assert "multispec" in lines[1] and "2 spectra" in lines[1]
    assert lines[3].split()[:5] == ["0", "17", "101", "0", "linear"]
    assert lines[4].split()[:7] == ["1", "23", "102", "2", "legendre", "order", "2"]
    assert "4000.0000 - 4063.0000" in lines[3] and f"{NW}/{NW}" in lines[3]


def test_write_text_spectra_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(11)
    flux = rng.normal(1.0, 0.1, (3, NW))
    flux[2, 5] = np.nan
    specs = [spec_string(1, 2, 4000.0, 1.0, NW, functions=f"1. 0. 1 3 1. 64. 4031.5 {np.pi!r} 1e-3"),
             spec_string(2, 1, 3.61, 1.7e-5, NW), spec_string(2, 0, 4100.1, 0.1, NW)]
    write_multispec(tmp_path / "star.fits", specs, flux)
    written = write_text_spectra(tmp_path / "star.fits", tmp_path / "out")
    spectra = read_spectra(tmp_path / "star.fits")
    assert len(written) == 3 and len(set(written)) == 3  # repeated aperture numbers do not collide
    for path, spectrum in zip(written, spectra):
        assert os.path.dirname(path) == str(tmp_path / "out")
        table = np.loadtxt(path)
        assert table.shape == (NW, 2)
        np.testing.assert_array_equal(table[:, 0], spectrum.wavelength)
        np.testing.assert_array_equal(table[:, 1], spectrum.flux)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in written)
