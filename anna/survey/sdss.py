"""SDSS/BOSS ``spec-PLATE-MJD-FIBER.fits`` files: the co-added spectrum in the ``COADD`` binary table, one row per
pixel, with ``loglam`` (log10 of the vacuum wavelength in Angstrom), ``flux``, ``ivar`` and ``and_mask``; the
pipeline's redshift ``Z`` in the one-row ``SPALL`` table (older files: ``SPECOBJ``).

Told apart from a LAMOST LRS table (also called ``COADD``) by its per-pixel rows and the ``loglam`` column.  A
pixel is bad when its inverse variance is not positive or any and-mask bit is set (the bit is set only when the
problem affected every exposure, which is the SDSS's own recommendation for masking the co-add).
"""

import numpy as np

from anna.survey.registry import (C_KMS, SurveyFormat, SurveySpectrum, check_same_length, first_row_value,
                                  header_number, require_columns, sigma_from_ivar, table_columns)


def identify_spec(hdus):
    # the data model puts COADD first and SPALL second; looking only there spares parsing the exposures' headers
    if len(hdus) < 2 or hdus[1].name.upper() != "COADD":
        return False
    columns = table_columns(hdus[1])
    return {"LOGLAM", "FLUX"} <= set(columns)  # a missing ivar is then an error naming it


def _redshift(hdus):
    if len(hdus) > 2 and hdus[2].name.upper() in ("SPALL", "SPECOBJ"):
        z = first_row_value(hdus, 2, "Z")
        if z is not None and np.isfinite(z):
            return float(z), f"{hdus[2].name.upper()}.Z"
    z = header_number(hdus[0].header, "Z")
    return (z, "Z") if z is not None else (None, "")


def read_spec(hdus, path):
    table = hdus[1]
    loglam_name, flux_name, ivar_name = require_columns(table, ("LOGLAM", "FLUX", "IVAR"), path, "SDSS spec")
    present = table_columns(table)
    loglam = np.asarray(table.data[loglam_name], dtype=np.float64).reshape(-1)
    flux = np.asarray(table.data[flux_name], dtype=np.float64).reshape(-1)
    ivar = np.asarray(table.data[ivar_name], dtype=np.float64).reshape(-1)
    and_mask = np.asarray(table.data[present["AND_MASK"]]).reshape(-1) if "AND_MASK" in present else None
    check_same_length(path, "SDSS spec", flux, loglam=loglam, ivar=ivar, and_mask=and_mask)
    bad = ~(np.isfinite(ivar) & (ivar > 0))
    if and_mask is not None:
        bad |= and_mask != 0
    z, key = _redshift(hdus)
    header = hdus[0].header
    name = "-".join(str(header.get(key_, "")).strip() for key_ in ("PLATEID", "MJD", "FIBERID")).strip("-") or "1"
    return [SurveySpectrum(name=name, wavelength=10.0 ** loglam, flux=flux, error=sigma_from_ivar(ivar), bad=bad,
                           columns=("ivar", "and_mask") if and_mask is not None else ("ivar",),
                           velocity=None if z is None else C_KMS * z, velocity_key=key, object_id=name)]


FORMATS = (SurveyFormat("SDSS spec", identify_spec, read_spec, "COADD table: loglam, flux, ivar, and_mask"),)
