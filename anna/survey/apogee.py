"""APOGEE spectra: ``apStar`` (combined and per-visit spectra of one star), ``aspcapStar`` (its continuum-
normalised combined spectrum) and ``apVisit`` (one visit, three detector chips).

* **apStar**: an empty primary HDU, then image HDUs of the same shape: 1 flux, 2 error (one sigma), 3 pixel mask
  (integer bits), then sky, telluric and so on.  With more than one visit the image has NVISITS + 2 rows: the
  two combined spectra (pixel-weighted, then global-weighted) and one row per visit; with one visit a single
  row.  Wavelengths are log-linear, ``10**(CRVAL1 + CDELT1 (i + 1 - CRPIX1))`` for pixel i = 0..N-1, in the
  star's rest frame (each visit has been shifted by its own velocity), vacuum.  ``VHELIO`` is reported.
* **aspcapStar**: an empty primary HDU, 1 the normalised combined spectrum, 2 its error, 3 ASPCAP's best-fit
  model, 4 a table of results; the same wavelength header.  It has no mask: pixels with zero flux (the chip
  gaps) or a non-positive error are bad.
* **apVisit**: an empty primary HDU, then images of 3 chips x 4096 pixels: 1 flux, 2 error, 3 mask, 4 wavelength
  (Angstrom, vacuum, observed frame; descending along each chip).  The three chips are joined into one spectrum
  in ascending wavelength; the velocity is ``VREL`` (``VRAD`` in older files): the star's velocity in the
  frame of the observed wavelengths.

Bad pixels: mask bits 0-7 (BADPIX, CRPIX, SATPIX, UNFIXABLE, BADDARK, BADFLAT, BADERR, NOSKY: the pixel holds
no usable flux) and bit 12 (SIG_SKYLINE: a strong sky line), a non-finite or non-positive error, or an error of
1e9 or more (the pipeline's "bad error" value is 1e10).
"""

import numpy as np

from anna.errors import AnnaInputError
from anna.survey.registry import SurveyFormat, SurveySpectrum, check_same_length, first_row_value, header_number

BAD_MASK_BITS = sum(1 << bit for bit in (0, 1, 2, 3, 4, 5, 6, 7, 12))
BAD_ERROR = 1e9


def _image(hdus, index):
    return hdus[index].data if len(hdus) > index and hdus[index].is_image else None


def _log_linear(header, count):
    """Wavelengths (Angstrom) from the log-linear header, or None when it lacks the keywords."""
    start, step = header_number(header, "CRVAL1"), header_number(header, "CDELT1")
    reference = header_number(header, "CRPIX1") or 1.0
    if start is None or step is None:
        return None
    return 10.0 ** (start + step * (np.arange(count) + 1.0 - reference))


def _bad(flux, error, mask):
    bad = ~(np.isfinite(flux) & np.isfinite(error) & (error > 0) & (error < BAD_ERROR))
    if mask is not None:
        bad |= (np.asarray(mask).astype(np.int64) & BAD_MASK_BITS) != 0
    return bad


def _empty_primary(hdus):
    return hdus[0].data is None or hdus[0].data.size == 0


def identify_apstar(hdus):
    flux, mask = _image(hdus, 1), _image(hdus, 3)
    return (_empty_primary(hdus) and flux is not None and mask is not None and flux.dtype.kind == "f"
            and mask.dtype.kind in "iu" and mask.shape == flux.shape and _log_linear(hdus[1].header, 1) is not None)


def read_apstar(hdus, path):
    flux = np.atleast_2d(np.asarray(hdus[1].data, dtype=np.float64))
    error = np.atleast_2d(np.asarray(_image(hdus, 2), dtype=np.float64))
    mask = np.atleast_2d(np.asarray(hdus[3].data))
    check_same_length(path, "APOGEE apStar", flux, error=error, mask=mask)
    wavelength = _log_linear(hdus[1].header, flux.shape[1])
    primary = hdus[0].header
    visits = int(header_number(primary, "NVISITS") or 0)
    if flux.shape[0] == 1:
        names = ["combined"]
    elif flux.shape[0] == visits + 2:
        names = ["combined_pixel", "combined_global", *[f"visit{i}" for i in range(1, visits + 1)]]
    else:
        names = [f"row{i}" for i in range(1, flux.shape[0] + 1)]
    velocity = header_number(primary, "VHELIO")
    return [SurveySpectrum(name=name, wavelength=wavelength, flux=flux[row], error=error[row],
                           bad=_bad(flux[row], error[row], mask[row]), columns=("error", "mask"),
                           velocity=velocity, velocity_key="VHELIO" if velocity is not None else "",
                           rest_frame=True, object_id=str(primary.get("OBJID", "")).strip())
            for row, name in enumerate(names)]


def identify_aspcapstar(hdus):
    flux, error, model = _image(hdus, 1), _image(hdus, 2), _image(hdus, 3)
    return (_empty_primary(hdus) and flux is not None and flux.ndim == 1 and error is not None and model is not None
            and error.shape == flux.shape == model.shape and model.dtype.kind == "f"
            and _log_linear(hdus[1].header, 1) is not None)


def read_aspcapstar(hdus, path):
    flux = np.asarray(hdus[1].data, dtype=np.float64)
    error = np.asarray(hdus[2].data, dtype=np.float64)
    check_same_length(path, "APOGEE aspcapStar", flux, error=error)
    bad = _bad(flux, error, None) | (flux == 0)
    velocity = header_number(hdus[0].header, "VHELIO")
    object_id = (first_row_value(hdus, 4, "APOGEE_ID") if len(hdus) > 4 else None) or ""
    return [SurveySpectrum(name="combined", wavelength=_log_linear(hdus[1].header, flux.size), flux=flux,
                           error=error, bad=bad, columns=("error",), velocity=velocity,
                           velocity_key="VHELIO" if velocity is not None else "", rest_frame=True, normalised=True,
                           object_id=object_id)]


def identify_apvisit(hdus):
    flux, mask, wavelength = _image(hdus, 1), _image(hdus, 3), _image(hdus, 4)
    return (_empty_primary(hdus) and flux is not None and flux.ndim == 2 and mask is not None
            and mask.dtype.kind in "iu" and wavelength is not None and wavelength.shape == flux.shape
            and wavelength.dtype.kind == "f" and float(np.nanmin(wavelength)) > 1000.0)


def read_apvisit(hdus, path):
    flux = np.asarray(hdus[1].data, dtype=np.float64)
    error = np.asarray(_image(hdus, 2), dtype=np.float64)
    mask = np.asarray(hdus[3].data)
    wavelength = np.asarray(hdus[4].data, dtype=np.float64)
    check_same_length(path, "APOGEE apVisit", flux, error=error, mask=mask, wavelength=wavelength)
    wavelength, flux, error, mask = (values.reshape(-1) for values in (wavelength, flux, error, mask))
    order = np.argsort(wavelength, kind="stable")
    wavelength, flux, error, mask = wavelength[order], flux[order], error[order], mask[order]
    if (np.diff(wavelength) <= 0).any():
        raise AnnaInputError("APOGEE apVisit: the chips' wavelengths overlap or repeat", path=path)
    primary = hdus[0].header
    key = "VREL" if header_number(primary, "VREL") is not None else "VRAD"
    velocity = header_number(primary, key)
    return [SurveySpectrum(name="visit", wavelength=wavelength, flux=flux, error=error, bad=_bad(flux, error, mask),
                           columns=("error", "mask"), velocity=velocity,
                           velocity_key=key if velocity is not None else "",
                           object_id=str(primary.get("OBJID", "")).strip())]


FORMATS = (
    SurveyFormat("APOGEE apVisit", identify_apvisit, read_apvisit, "3 chips: flux, error, mask, wavelength"),
    SurveyFormat("APOGEE aspcapStar", identify_aspcapstar, read_aspcapstar, "normalised flux, error, model"),
    SurveyFormat("APOGEE apStar", identify_apstar, read_apstar, "combined and visit rows: flux, error, mask"),
)
