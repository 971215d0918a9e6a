"""LAMOST spectra: low-resolution (LRS) files in their image form and binary-table form, and medium-resolution
(MRS) files.

* **LRS, image form** (data releases up to DR8): the primary HDU is a 2-D image whose rows are flux, inverse
  variance, wavelength (Angstrom, vacuum, heliocentric), and-mask and or-mask (``EXTEN0`` lists them).  The
  wavelength row is what the pipeline wrote; the header's log-linear formula (``COEFF0``, ``COEFF1``) gives the
  same values.
* **LRS, table form** (DR9 and later): an empty primary HDU and, first, a ``COADD`` binary table of ONE row whose
  columns are arrays: ``FLUX``, ``IVAR``, ``WAVELENGTH``, ``ANDMASK``, ``ORMASK``, ``NORMALIZATION``.
* **MRS**: an empty primary HDU, the co-added blue and red arms ``COADD_B`` and ``COADD_R`` and one table per
  exposure and arm (``B-<minute>``, ``R-<minute>``), each with one row per pixel: ``FLUX``, ``IVAR``,
  ``LOGLAM`` (log10 of the wavelength) and ``ANDMASK``/``ORMASK`` (co-adds) or ``PIXMASK`` (exposures).
  Every extension is its own spectrum, named after the extension.

All three are told apart from other files by ``TELESCOP = 'LAMOST'`` in the primary header and their HDU layout.
A pixel is bad when its inverse variance is not positive or its and-mask (``PIXMASK`` for exposures) is non-zero:
LAMOST's mask bits (bad CCD, bad profile, no sky, bright sky, bad centre, no data) all mark unusable flux.
The redshift ``Z`` of the primary header (LRS pipeline) is the stated velocity, v = c z.
"""

import re

import numpy as np

from anna.errors import AnnaInputError
from anna.survey.registry import (C_KMS, SurveyFormat, SurveySpectrum, check_same_length, header_number,
                                  require_columns, sigma_from_ivar, table_columns)

LRS_IMAGE_ROWS = ("flux", "ivar", "wavelength", "andmask", "ormask")
MRS_EXTENSION = re.compile(r"^(COADD_[BR]|[BR]-\d+)$")


def _is_lamost(hdus):
    return str(hdus[0].header.get("TELESCOP", "")).strip().upper() == "LAMOST"


def _velocity(header):
    z = header_number(header, "Z")
    # LAMOST writes -9999 for a failed redshift
    return (C_KMS * z, "Z") if z is not None and abs(z) < 1 else (None, "")


def _bad(ivar, mask):
    bad = ~(np.isfinite(ivar) & (ivar > 0))
    if mask is not None:
        bad |= np.asarray(mask) != 0
    return bad


def identify_lrs_image(hdus):
    data = hdus[0].data
    return _is_lamost(hdus) and data is not None and data.ndim == 2 and data.shape[0] >= 3


def _lrs_spectrum(header, wavelength, flux, ivar, andmask):
    """The one spectrum of a LAMOST LRS file (image or table form), named by its OBSID."""
    velocity, key = _velocity(header)
    name = str(header.get("OBSID", "")).strip() or "1"
    columns = ("ivar", "andmask") if andmask is not None else ("ivar",)
    return SurveySpectrum(name=name, wavelength=wavelength, flux=flux, error=sigma_from_ivar(ivar),
                          bad=_bad(ivar, andmask), columns=columns, velocity=velocity, velocity_key=key,
                          object_id=name)


def read_lrs_image(hdus, path):
    header = hdus[0].header
    data = np.asarray(hdus[0].data, dtype=np.float64)
    flux, ivar, wavelength = data[0], data[1], data[2]
    andmask = data[3] if data.shape[0] > 3 else None
    return [_lrs_spectrum(header, wavelength, flux, ivar, andmask)]


def identify_lrs_table(hdus):
    if not _is_lamost(hdus) or len(hdus) < 2 or hdus[1].name.upper() != "COADD":
        return False
    columns = table_columns(hdus[1])
    return "WAVELENGTH" in columns and "FLUX" in columns


def read_lrs_table(hdus, path):
    table = hdus[1]
    flux_name, ivar_name, wave_name = require_columns(table, ("FLUX", "IVAR", "WAVELENGTH"), path,
                                                      "LAMOST LRS table")
    if len(table.data) != 1:
        raise AnnaInputError(f"LAMOST LRS table: COADD has {len(table.data)} rows, expected 1 (arrays of pixels)",
                             path=path)
    row = table.data[0]
    flux = np.asarray(row[flux_name], dtype=np.float64).reshape(-1)
    ivar = np.asarray(row[ivar_name], dtype=np.float64).reshape(-1)
    wavelength = np.asarray(row[wave_name], dtype=np.float64).reshape(-1)
    present = table_columns(table)
    andmask = np.asarray(row[present["ANDMASK"]]).reshape(-1) if "ANDMASK" in present else None
    check_same_length(path, "LAMOST LRS table", flux, IVAR=ivar, WAVELENGTH=wavelength, ANDMASK=andmask)
    header = hdus[0].header
    return [_lrs_spectrum(header, wavelength, flux, ivar, andmask)]


def identify_mrs(hdus):
    if not _is_lamost(hdus):
        return False
    return any(MRS_EXTENSION.match(hdu.name.upper()) and "LOGLAM" in table_columns(hdu) for hdu in hdus[1:])


def read_mrs(hdus, path):
    spectra = []
    object_id = str(hdus[0].header.get("OBSID", "")).strip()
    for hdu in hdus[1:]:
        name = hdu.name.upper()
        if not MRS_EXTENSION.match(name):
            continue
        flux_name, ivar_name, loglam_name = require_columns(hdu, ("FLUX", "IVAR", "LOGLAM"), path,
                                                            "LAMOST MRS")
        present = table_columns(hdu)
        mask_key = "ANDMASK" if "ANDMASK" in present else ("PIXMASK" if "PIXMASK" in present else None)
        flux = np.asarray(hdu.data[flux_name], dtype=np.float64).reshape(-1)
        ivar = np.asarray(hdu.data[ivar_name], dtype=np.float64).reshape(-1)
        loglam = np.asarray(hdu.data[loglam_name], dtype=np.float64).reshape(-1)
        mask = np.asarray(hdu.data[present[mask_key]]).reshape(-1) if mask_key else None
        check_same_length(path, f"LAMOST MRS {name}", flux, IVAR=ivar, LOGLAM=loglam, **{mask_key or "MASK": mask})
        columns = ("ivar", mask_key.lower()) if mask_key else ("ivar",)
        spectra.append(SurveySpectrum(name=hdu.name, wavelength=10.0 ** loglam, flux=flux,
                                      error=sigma_from_ivar(ivar), bad=_bad(ivar, mask), columns=columns,
                                      object_id=object_id))
    return spectra


FORMATS = (
    SurveyFormat("LAMOST MRS", identify_mrs, read_mrs, "co-added and per-exposure blue/red tables"),
    SurveyFormat("LAMOST LRS table", identify_lrs_table, read_lrs_table, "COADD table of one row of arrays"),
    SurveyFormat("LAMOST LRS image", identify_lrs_image, read_lrs_image, "5-row image: flux, ivar, wavelength, masks"),
)
