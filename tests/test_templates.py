"""S/N and wavelength templates: parsing, interpolation onto a grid, and every rejection."""

import numpy as np
import pytest

from anna.errors import AnnaInputError
from anna.templates import read_wavelength_template, relative_sn_on_grid


def test_relative_sn_interpolated_onto_grid(tmp_path):
    path = tmp_path / "sn.template"
    path.write_text("# wavelength rel_sn\n6600 0.5\n6700 1.5  # trailing comment\n\n")
    grid = np.array([6600.0, 6625.0, 6650.0, 6700.0])
    np.testing.assert_allclose(relative_sn_on_grid(path, grid), [0.5, 0.75, 1.0, 1.5])


@pytest.mark.parametrize("text, message", [
    ("6600 1.0\n", "1 data rows; at least 2"),
    ("6600 1.0\n6700 abc\n", r"sn.template:2: S/N template row is not numeric \(headers must start with '#'\) \(got '6700 abc'\)"),
    ("6600 1.0\n6700\n", r"sn.template:2: S/N template row needs two columns"),
    ("6600 1.0\n6700 0.0\n", "relative S/N must be positive; row 2"),
    ("6700 1.0\n6600 1.0\n", "not strictly ascending"),
])
def test_bad_templates(tmp_path, text, message):
    path = tmp_path / "sn.template"
    path.write_text(text)
    with pytest.raises(AnnaInputError, match=message):
        relative_sn_on_grid(path, np.array([6650.0]))


def test_template_must_cover_grid(tmp_path):
    path = tmp_path / "sn.template"
    path.write_text("6600 1.0\n6700 1.0\n")
    with pytest.raises(AnnaInputError, match="covers 6600.000-6700.000 A but the spectra span 6650.000-6710.000 A"):
        relative_sn_on_grid(path, np.array([6650.0, 6710.0]))


def test_non_utf8_template(tmp_path):
    path = tmp_path / "sn.template"
    path.write_bytes(b"6600 1.0\n\xff\xfe 1.0\n")
    with pytest.raises(AnnaInputError, match="not text"):
        relative_sn_on_grid(path, np.array([6650.0]))


def test_real_anna_templates(shared_reference):
    """ANNA's released templates parse and interoperate: the S/N template covers the 1001-px training grid."""
    grid = read_wavelength_template(shared_reference / "wavelength.template")
    assert len(grid) == 1001 and grid[0] == pytest.approx(6625.0) and grid[-1] == pytest.approx(6825.0)
    rel = relative_sn_on_grid(shared_reference / "sn.robo.template", grid)
    assert rel.shape == (1001,) and np.all(rel > 0) and 0.5 < np.median(rel) < 1.5
