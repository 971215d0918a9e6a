"""A survey file's spectra made ready for the network: rest frame, continuum, bad pixels, model grid.

The order matters and is the same for every input:

1. **Rest frame** (RV_CORRECT): wavelengths divided by (1 + v/c), v the velocity the file states (LAMOST and
   SDSS redshifts as v = c z, APOGEE apVisit VREL/VRAD).  Spectra already in the rest frame (apStar,
   aspcapStar) are not shifted and report 0.
2. **Continuum** (the frozen model's record, :mod:`anna.continuum`): fitted to the good pixels and divided
   out; files that are already normalised (aspcapStar) are left as they are.
3. **Bad pixels** (:mod:`anna.badpixels`): masked, zero inverse variance or non-finite flux; set to the neutral
   value on the file's own pixels, so that no bad value enters the cubic resampling stencil.
4. **Onto the grid** (``onto_grid``, anna-infer's own :func:`anna.infer.spectra_onto_grid`, handed in so this
   module stays below the stages); grid points beside a bad pixel, or inside a detector gap, are bad too and
   get the neutral value again, on the grid.  The fraction of bad grid points is reported per spectrum.
"""

import numpy as np

from anna.badpixels import bad_on_grid, fill_bad
from anna.continuum import fit_continuum
from anna.survey.registry import C_KMS


def rest_frame_wavelength(wavelength, velocity_kms):
    """Wavelengths moved to the rest frame of a source receding at ``velocity_kms``: lambda / (1 + v/c)."""
    return np.asarray(wavelength, dtype=np.float64) / (1.0 + float(velocity_kms) / C_KMS)


def prepare_spectrum(spectrum, *, continuum=None, fill="INTERPOLATE", rv_correct=False):
    """(wavelength ascending, flux with bad pixels filled, bad (bool), velocity used or None) of one
    :class:`anna.survey.SurveySpectrum`."""
    wavelength = np.asarray(spectrum.wavelength, dtype=np.float64)
    flux = np.asarray(spectrum.flux, dtype=np.float64)
    velocity = None
    if rv_correct:
        if spectrum.rest_frame:
            velocity = 0.0
        elif spectrum.velocity is not None:
            wavelength = rest_frame_wavelength(wavelength, spectrum.velocity)
            velocity = float(spectrum.velocity)
    order = np.argsort(wavelength, kind="stable")
    wavelength, flux = wavelength[order], flux[order]
    bad = ~np.isfinite(flux)
    if spectrum.bad is not None:
        bad |= np.asarray(spectrum.bad, dtype=bool)[order]
    if continuum and continuum.get("method", "NONE") != "NONE" and not spectrum.normalised:
        try:
            level = fit_continuum(wavelength, flux, bad, continuum)
        except ValueError:  # too few good pixels: nothing of this spectrum can be trusted
            level = np.full_like(flux, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = flux / level
        bad |= ~np.isfinite(flux) | ~(level > 0)
    return wavelength, fill_bad(flux, bad, fill), bad, velocity


def survey_onto_grid(spectra, grid, onto_grid, *, continuum=None, fill="INTERPOLATE", rv_correct=False):
    """(flux (n, npix), flag sets, bad fraction (n,), velocities used (n,) float, NaN where none) for a list of
    SurveySpectrum; ``onto_grid(pairs, grid)`` resamples (wavelength, flux) pairs and returns (flux, flags)."""
    grid = np.asarray(grid, dtype=np.float64)
    prepared = [prepare_spectrum(spectrum, continuum=continuum, fill=fill, rv_correct=rv_correct)
                for spectrum in spectra]
    flux, flags = onto_grid([(wavelength, values) for wavelength, values, _, _ in prepared], grid)
    bad = np.zeros(flux.shape, dtype=bool)
    for row, (wavelength, _, source_bad, _) in enumerate(prepared):
        if wavelength.size >= 2:
            bad[row] = bad_on_grid(wavelength, source_bad, grid)
    flux = fill_bad(flux, bad, fill)
    velocities = np.array([np.nan if velocity is None else velocity for _, _, _, velocity in prepared])
    return flux, flags, bad.mean(axis=1), velocities
