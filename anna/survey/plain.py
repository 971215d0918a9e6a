"""A plain 1-D FITS spectrum (linear or log-linear WCS, read by :mod:`anna.fits_io`) with its per-pixel errors in
an image extension of the same length named ``ERROR``, ``ERR``, ``SIGMA``, ``STDDEV`` (one sigma), ``IVAR``,
``INVVAR`` (inverse variance) or ``VAR``/``VARIANCE``, and optionally a ``MASK`` extension (non-zero = bad).
"""

import numpy as np

from anna.errors import AnnaInputError
from anna.survey.registry import SurveyFormat, SurveySpectrum, sigma_from_ivar

SIGMA_NAMES = ("ERROR", "ERR", "SIGMA", "STDDEV", "UNCERTAINTY")
IVAR_NAMES = ("IVAR", "INVVAR")
VARIANCE_NAMES = ("VAR", "VARIANCE")


def _flux_hdu(hdus):
    for hdu in hdus:
        if hdu.is_image and hdu.data is not None and hdu.data.size:
            return hdu
    return None


def _error_hdu(hdus):
    for hdu in hdus[1:]:
        if hdu.is_image and hdu.name.upper() in SIGMA_NAMES + IVAR_NAMES + VARIANCE_NAMES:
            return hdu
    return None


def identify_plain(hdus):
    flux = _flux_hdu(hdus)
    return flux is not None and flux.data.ndim == 1 and _error_hdu(hdus) is not None


def read_plain(hdus, path):
    from anna.fits_io import spectra_from_image

    flux_hdu = _flux_hdu(hdus)
    spectrum = spectra_from_image(flux_hdu.header, np.asarray(flux_hdu.data, dtype=np.float64), path)[0]
    error_hdu = _error_hdu(hdus)
    values = np.asarray(error_hdu.data, dtype=np.float64).reshape(-1)
    if values.size != flux_hdu.data.size:
        raise AnnaInputError(f"extension {error_hdu.name} has {values.size} values but the flux has "
                             f"{flux_hdu.data.size}", path=path)
    kind = error_hdu.name.upper()
    if kind in IVAR_NAMES:
        error = sigma_from_ivar(values)
    elif kind in VARIANCE_NAMES:
        error = sigma_from_ivar(1.0 / np.where(values > 0, values, np.nan))
    else:
        error = np.where(np.isfinite(values) & (values > 0), values, np.inf)
    bad = ~np.isfinite(error)
    columns = [kind.lower()]
    names = [hdu.name.upper() for hdu in hdus]
    if "MASK" in names:
        mask = np.asarray(hdus["MASK"].data).reshape(-1)
        if mask.size != values.size:
            raise AnnaInputError(f"extension MASK has {mask.size} values but the flux has {values.size}", path=path)
        bad |= mask != 0
        columns.append("mask")
    keep = slice(0, spectrum.flux.size)  # fits_io trims padding past the data
    return [SurveySpectrum(name="1", wavelength=spectrum.wavelength, flux=spectrum.flux, error=error[keep],
                           bad=bad[keep], columns=tuple(columns))]


FORMATS = (SurveyFormat("1-D FITS with errors", identify_plain, read_plain, "1-D image and an error/ivar extension"),)
