"""Two-column text templates: the relative S/N profile (SN_TEMPLATE) and the wavelength grid (WAVE_TEMPLATE).

Both are whitespace-delimited text with wavelength (Angstrom) in the first column (guide section 4.1).  For an
S/N template the second column is the relative S/N, normalised near 1.0; for a wavelength template the second
column is an unused flux.  ``#`` starts a comment.
"""

import numpy as np

from anna.errors import AnnaInputError

MIN_TEMPLATE_ROWS = 2


def read_two_columns(path, what, *, ascending=True, finite=True):
    """Read a two-column numeric text file as two float64 arrays; errors name the file, line and text.

    Columns may be separated by whitespace or commas; further columns are ignored; ``#`` starts a comment.
    ``ascending`` requires strictly ascending wavelengths (templates); ``finite`` refuses NaN/inf values
    (spectra for inference keep them, to be flagged rather than refused).  ``what`` names the file's role in
    messages ("S/N template", "text spectrum", ...).
    """
    columns = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        raise AnnaInputError(f"{what} file does not exist", path=path) from None
    except UnicodeDecodeError as exc:
        raise AnnaInputError(f"{what} file is not text (undecodable byte at offset {exc.start})",
                             path=path) from None
    except OSError as exc:
        raise AnnaInputError(f"cannot read {what} file: {exc.strerror or exc}", path=path) from None
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].replace(",", " ").strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) < 2:
            raise AnnaInputError(f"{what} row needs two columns", path=path, line=number, value=text)
        try:
            columns.append((float(fields[0]), float(fields[1])))
        except ValueError:
            raise AnnaInputError(f"{what} row is not numeric (headers must start with '#')", path=path,
                                 line=number, value=text) from None
    if len(columns) < MIN_TEMPLATE_ROWS:
        raise AnnaInputError(f"{what} has {len(columns)} data rows; at least {MIN_TEMPLATE_ROWS} are needed",
                             path=path)
    table = np.asarray(columns, dtype=np.float64)
    wave, value = table[:, 0], table[:, 1]
    if finite and not np.isfinite(table).all():
        raise AnnaInputError(f"{what} holds NaN or infinite values", path=path)
    if ascending and not (np.diff(wave) > 0).all():
        where = int(np.argmax(np.diff(wave) <= 0)) + 1
        raise AnnaInputError(f"{what} wavelengths are not strictly ascending at row {where + 1}",
                             path=path, value=float(wave[where]))
    return wave, value


def read_wavelength_template(path):
    """Wavelength grid (Angstrom, ascending) from a WAVE_TEMPLATE file."""
    wave, _ = read_two_columns(path, "wavelength template")
    return wave


def relative_sn_on_grid(path, wavelengths):
    """Relative S/N from an SN_TEMPLATE file, linearly interpolated onto ``wavelengths`` (npix,).

    The template must cover the grid: extrapolating a spectrograph's response would invent noise levels, so a
    grid reaching past the template is an error that gives both ranges.  Non-positive relative S/N would mean
    infinite noise and is refused.
    """
    wave, rel_sn = read_two_columns(path, "S/N template")
    if (rel_sn <= 0).any():
        row = int(np.argmax(rel_sn <= 0))
        raise AnnaInputError(f"relative S/N must be positive; row {row + 1} at {wave[row]:.3f} A",
                             path=path, value=float(rel_sn[row]))
    grid = np.asarray(wavelengths, dtype=np.float64)
    if grid[0] < wave[0] or grid[-1] > wave[-1]:
        raise AnnaInputError(f"S/N template covers {wave[0]:.3f}-{wave[-1]:.3f} A but the spectra span "
                             f"{grid[0]:.3f}-{grid[-1]:.3f} A", path=path)
    return np.interp(grid, wave, rel_sn)
