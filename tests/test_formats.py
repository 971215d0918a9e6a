"""Format rules with one owner each: anna.spectra (FITS or text, used by the readers, the parameter check,
--check and anna-pack) and anna.tables (ids and floats as CSV text that reads back exactly)."""

import bz2
import gzip
import io

import numpy as np
import pytest
from astropy.io import fits

from anna.errors import AnnaInputError
from anna.params import expand_infer_files, load_config
from anna.spectra import has_fits_name, is_fits_content, looks_like_fits, spectrum_stem


def _fits_bytes():
    """A small 1-D FITS spectrum (linear WCS), as the bytes of its file."""
    hdu = fits.PrimaryHDU(np.linspace(0.9, 1.0, 50))
    hdu.header["CRVAL1"], hdu.header["CDELT1"], hdu.header["CRPIX1"] = 5000.0, 0.5, 1.0
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("head, expected", [
    (b"SIMPLE  =                    T", True),
    (b"\x1f\x8b\x08\x00", True),          # gzip
    (b"BZh91AY&SY", True),                # bzip2
    (b"PK\x03\x04", True),                # zip
    (b"6600.0 0.98\n6600.2 0.97\n", False),
    (b"# wavelength flux\n", False),
    (b"", False),
])
def test_content_decides_first(head, expected):
    assert is_fits_content(head) is expected


@pytest.mark.parametrize("name, expected", [
    ("star.fits", True), ("star.FIT", True), ("star.fts", True), ("star.fits.gz", True), ("star.fits.fz", True),
    ("star.txt", False), ("star.dat.gz", False), ("fits", False), ("star.fits.txt", False),
])
def test_name_decides_when_content_does_not(name, expected):
    assert has_fits_name(name) is expected


def test_looks_like_fits_reads_the_content_before_the_name(tmp_path):
    data = _fits_bytes()
    (tmp_path / "named_as_text.dat").write_bytes(data)
    (tmp_path / "star.fits.gz").write_bytes(gzip.compress(data))
    (tmp_path / "star.fits.bz2").write_bytes(bz2.compress(data))
    (tmp_path / "spectrum.txt").write_text("6600.0 0.98\n6600.2 0.97\n")
    assert looks_like_fits(tmp_path / "named_as_text.dat")
    assert looks_like_fits(tmp_path / "star.fits.gz") and looks_like_fits(tmp_path / "star.fits.bz2")
    assert not looks_like_fits(tmp_path / "spectrum.txt")
    with pytest.raises(AnnaInputError) as info:
        looks_like_fits(tmp_path / "missing.fits")
    assert "missing.fits" in str(info.value)


@pytest.mark.parametrize("path, stem", [
    ("a/b/star.fits.gz", "star"), ("star.fits", "star"), ("star.fit", "star"), ("x/spec.txt", "spec"),
    ("spec.txt.gz", "spec"), ("noext", "noext"), ("two.dots.fits", "two.dots"),
])
def test_spectrum_stem_drops_folder_compression_and_extension(path, stem):
    assert spectrum_stem(path) == stem


def test_infer_files_naming_one_gzip_fits_file_is_that_input_not_a_list(tmp_path):
    star = tmp_path / "star.fits.gz"
    star.write_bytes(gzip.compress(_fits_bytes()))
    param = tmp_path / "infer.param"
    param.write_text("INFER_MODE: FITS\nINFER_FILES: star.fits.gz\n", encoding="utf-8")
    assert expand_infer_files(load_config(param)) == [str(star)]


def test_value_rows_write_floats_that_read_back_exactly_side_by_side():
    from anna.tables import format_star_id, value_rows

    rng = np.random.default_rng(3)
    labels, sigmas, sn = rng.normal(size=(4, 3)) * 1e3, rng.random((4, 3)), rng.random(4) * 100
    labels[1, 2] = np.nan
    rows = value_rows(labels, sigmas, sn)
    assert len(rows) == 4 and all(len(row) == 7 for row in rows)
    back = np.array([[float(text) for text in row] for row in rows])
    np.testing.assert_array_equal(back, np.column_stack([labels, sigmas, sn]))  # NaN compares equal here
    assert rows[1][2] == "nan" and value_rows(np.empty((0, 3))) == []
    assert [format_star_id(v) for v in (12.0, 2.0**53, 1.5, -3.0)] == ["12", repr(2.0**53), "1.5", "-3"]
