"""The survey-format registry: which reader a FITS file needs, told from the file's own structure.

Each format is a :class:`SurveyFormat`: a name, an ``identify(hdus)`` function that looks only at the opened
file (HDU names and kinds, header keywords, table columns; never the file name) and a ``read(hdus, path)``
function that returns :class:`SurveySpectrum` objects.  :func:`identify` asks every registered format in
order and returns the first that recognises the file, so more specific formats are registered before more
general ones (the plain 1-D reader with an error extension comes last).  A file no format recognises is left
to :mod:`anna.fits_io` (IRAF multispec and plain 1-D spectra), which is what :func:`read_survey_file` does.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from anna.errors import AnnaInputError

C_KMS = 299792.458


@dataclass(frozen=True)
class SurveySpectrum:
    """One spectrum of a file, as the file gives it.

    ``wavelength``, ``flux`` (n,) float64, wavelengths in Angstrom (vacuum or air as the survey gives them);
    ``error`` (n,) one-sigma flux error or None when the file has none (inverse variances are converted:
    sigma = 1/sqrt(ivar), infinite where ivar is 0); ``bad`` (n,) bool, the pixels the file marks unusable
    (mask bits the survey documents as bad, zero inverse variance), or None.  ``columns`` names what was read
    besides wavelength and flux (for anna-spectra).  ``velocity`` the radial velocity (km/s) the file states
    for this spectrum, ``velocity_key`` where it came from; ``rest_frame`` True when the wavelengths are
    already in the star's rest frame (APOGEE apStar, aspcapStar).  ``normalised`` True when the flux is
    already continuum-normalised (aspcapStar).  ``object_id`` the survey's id of the star (LAMOST OBSID, SDSS
    plate-MJD-fibre, APOGEE 2MASS-style id), which anna-pack matches labels by.
    """

    name: str
    wavelength: np.ndarray
    flux: np.ndarray
    error: np.ndarray = None
    bad: np.ndarray = None
    columns: tuple = ()
    velocity: float = None
    velocity_key: str = ""
    rest_frame: bool = False
    normalised: bool = False
    object_id: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SurveyFormat:
    name: str
    identify: object
    read: object
    description: str = ""


def sigma_from_ivar(ivar):
    """One-sigma errors from inverse variances: 1/sqrt(ivar), +inf where ivar <= 0 or is not finite."""
    ivar = np.asarray(ivar, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = 1.0 / np.sqrt(ivar)
    sigma[~(np.isfinite(ivar) & (ivar > 0))] = np.inf
    return sigma


def table_columns(hdu):
    """Upper-case column names of a binary table HDU ({} for anything else)."""
    columns = getattr(hdu, "columns", None)
    if columns is None or not hasattr(columns, "names"):
        return {}
    return {name.upper(): name for name in columns.names}


def require_columns(hdu, names, path, what):
    """The actual column names for ``names`` (upper case) in ``hdu``; an input error naming the missing ones."""
    present = table_columns(hdu)
    missing = [name for name in names if name not in present]
    if missing:
        raise AnnaInputError(f"{what}: extension {hdu.name or '?'} lacks column(s) {', '.join(missing)}; it has "
                             f"{', '.join(present.values()) or 'none'}", path=path)
    return [present[name] for name in names]


def check_same_length(path, name, reference, **arrays):
    """Refuse per-pixel arrays whose length differs from the flux's (e.g. an ivar of the wrong length)."""
    for key, values in arrays.items():
        if values is not None and np.asarray(values).shape != np.asarray(reference).shape:
            raise AnnaInputError(f"{name}: {key} has {np.asarray(values).size} values but the flux has "
                                 f"{np.asarray(reference).size}", path=path)


def header_number(header, key):
    """A finite float header value, or None."""
    value = header.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])")
_BYTES = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16, "P": 8, "Q": 16}
_SCALAR = {"B": ">u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def first_row_value(hdus, index, column):
    """The value of ``column`` in the first row of binary-table HDU ``index``, read from its bytes, or None.

    Why not ``hdus[index].data``: astropy builds every column's description first, which for an SDSS file's
    232-column SPALL table took 0.5 s, a hundred times the rest of the file.  Only numbers and text, repeat 1
    (text: its width)."""
    header = hdus[index].header
    if header.get("XTENSION", "").strip() != "BINTABLE":
        return None
    offset, found = 0, None
    for number in range(1, int(header.get("TFIELDS", 0)) + 1):
        match = _TFORM.match(str(header.get(f"TFORM{number}", "")))
        if match is None:
            return None
        repeat, code = int(match.group(1) or 1), match.group(2)
        if str(header.get(f"TTYPE{number}", "")).strip().upper() == column.upper():
            found = (repeat, code)
            break
        offset += (repeat + 7) // 8 if code == "X" else repeat * _BYTES[code]
    if found is None or int(header.get("NAXIS2", 0)) < 1:
        return None
    repeat, code = found
    hdu = hdus[index]
    # hdus.fileinfo() would give the same two things, but re-serialises every header to get them (90 ms)
    handle, start = getattr(hdu, "_file", None), getattr(hdu, "_data_offset", None)
    if handle is None or start is None:
        info = hdus.fileinfo(index)
        handle, start = info["file"], info["datLoc"]
    handle.seek(start + offset)
    if code == "A":
        return handle.read(repeat).decode("ascii", "replace").strip()
    if code not in _SCALAR or repeat != 1:
        return None
    return np.frombuffer(handle.read(np.dtype(_SCALAR[code]).itemsize), dtype=_SCALAR[code])[0].item()


def open_fits(path):
    """The HDU list of a FITS file, with astropy's warnings about odd headers off.  HDUs are parsed as they are
    reached and their data read when a reader asks (an SDSS file's 232-column SPALL table, or its exposures, cost
    nothing unless used): use it as a context manager and read inside it."""
    from astropy.io import fits

    if not os.path.exists(path):
        raise AnnaInputError("FITS file not found", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdus = fits.open(path, ignore_missing_end=True, memmap=False)
            _ = hdus[0].header  # not a FITS file: the error surfaces here
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise AnnaInputError(f"cannot read FITS file: {exc}", path=path) from None
    return hdus


def registered_formats():
    """The formats in the order they are asked (specific first)."""
    from anna.survey import apogee, lamost, plain, sdss

    return (*lamost.FORMATS, *sdss.FORMATS, *apogee.FORMATS, *plain.FORMATS)


def identify(hdus):
    """The first registered :class:`SurveyFormat` that recognises ``hdus``, or None."""
    for survey_format in registered_formats():
        try:
            if survey_format.identify(hdus):
                return survey_format
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            continue
    return None


def identify_file(path):
    """The name of the survey format of the FITS file ``path``, or None (also when astropy cannot open it: the
    multispec reader then reports the problem).  Opens the file memory-mapped, so a multispec file costs its
    headers, not its data."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(os.fspath(path), ignore_missing_end=True, memmap=True) as hdus:
                survey_format = identify(hdus)
    except (OSError, ValueError, TypeError, IndexError):
        return None
    return None if survey_format is None else survey_format.name


def read_survey_file(path):
    """(format name or None, list of SurveySpectrum) for a FITS file.

    Survey formats are read by their own reader; anything else by :func:`anna.fits_io.read_spectra` (IRAF
    multispec, 1-D FITS), each of its spectra becoming a SurveySpectrum without errors or mask.
    """
    path = os.fspath(path)
    hdus = open_fits(path)
    with hdus:
        survey_format = identify(hdus)
        if survey_format is not None:
            spectra = survey_format.read(hdus, path)
            if not spectra:
                raise AnnaInputError(f"{survey_format.name} file holds no spectrum", path=path)
            return survey_format.name, spectra
    from anna.fits_io import read_spectra

    spectra = []
    for spectrum in read_spectra(path):
        name = str(spectrum.aperture) if spectrum.aperture is not None else str(spectrum.index + 1)
        spectra.append(SurveySpectrum(name=name, wavelength=spectrum.wavelength, flux=spectrum.flux,
                                      meta={"aperture": spectrum.aperture, "beam": spectrum.beam}))
    return None, spectra
