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

The file's per-pixel errors follow the flux through the continuum (divided by the same level) and give the
spectrum's noise (:func:`file_noise`), which MC dropout's variance head reads instead of DER_SNR.
"""

import collections

import numpy as np

from anna.badpixels import bad_on_grid, fill_bad
from anna.continuum import fit_continuum
from anna.survey.registry import C_KMS


def rest_frame_wavelength(wavelength, velocity_kms):
    """Wavelengths moved to the rest frame of a source receding at ``velocity_kms``: lambda / (1 + v/c)."""
    return np.asarray(wavelength, dtype=np.float64) / (1.0 + float(velocity_kms) / C_KMS)


PreparedSpectrum = collections.namedtuple("PreparedSpectrum", "wavelength flux bad velocity error")
OnGrid = collections.namedtuple("OnGrid", "flux flags bad_fraction velocities noise")


def prepare_spectrum(spectrum, *, continuum=None, fill="INTERPOLATE", rv_correct=False):
    """A :class:`PreparedSpectrum` of one :class:`anna.survey.SurveySpectrum`: wavelength ascending, flux with
    bad pixels filled, bad (bool), velocity used or None, and the one-sigma error in the same (normalised)
    flux units, or None when the file gives none."""
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
    error = None if spectrum.error is None else np.asarray(spectrum.error, dtype=np.float64)[order]
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
            error = None if error is None else error / level
        bad |= ~np.isfinite(flux) | ~(level > 0)
    return PreparedSpectrum(wavelength, fill_bad(flux, bad, fill), bad, velocity, error)


def file_noise(wavelength, error, bad, grid):
    """The noise σ of one prepared spectrum from its file's own errors: the median of ``error`` (continuum-
    normalised flux units) over its good pixels inside the ``grid``'s wavelength range; NaN when the file has
    no errors (``error`` None) or no good pixel there has a finite, positive one.

    Why the median of σ: it is the quantity DER_SNR estimates, on the same scale, so the variance head (whose
    noise gain was learnt against DER_SNR on training spectra) reads a number of the meaning it was trained
    on.  DER_SNR is the median of |2 f_i − f_(i−2) − f_(i+2)| scaled to one sigma: for white noise of
    per-pixel σ it returns σ, and where σ varies across the spectrum (the S/N profile of the training noise
    model, the blaze of a real spectrograph) it lands near the median σ, not the mean, which a few pixels of
    huge error (line cores of faint stars, the edges of a detector) would drag up.  Unlike DER_SNR, it is not
    raised by lines or structure narrower than a few pixels.  The σ is the file's per-pixel error on its own pixels: where anna-infer resamples onto a finer or
    coarser grid the noise per grid point differs from it, as it differs from what DER_SNR sees."""
    if error is None:
        return np.nan
    grid = np.asarray(grid, dtype=np.float64)
    inside = (wavelength >= grid[0]) & (wavelength <= grid[-1])
    usable = error[inside & ~np.asarray(bad, dtype=bool)]
    usable = usable[np.isfinite(usable) & (usable > 0)]
    return float(np.median(usable)) if usable.size else np.nan


def survey_onto_grid(spectra, grid, onto_grid, *, continuum=None, fill="INTERPOLATE", rv_correct=False):
    """An :class:`OnGrid` for a list of SurveySpectrum: flux (n, npix), flag sets, bad fraction (n,), velocities
    used (n,) float (NaN where none) and the noise from the files' errors (n,) (:func:`file_noise`, NaN where
    none); ``onto_grid(pairs, grid)`` resamples (wavelength, flux) pairs and returns (flux, flags)."""
    grid = np.asarray(grid, dtype=np.float64)
    prepared = [prepare_spectrum(spectrum, continuum=continuum, fill=fill, rv_correct=rv_correct)
                for spectrum in spectra]
    flux, flags = onto_grid([(item.wavelength, item.flux) for item in prepared], grid)
    bad = np.zeros(flux.shape, dtype=bool)
    for row, item in enumerate(prepared):
        if item.wavelength.size >= 2:
            bad[row] = bad_on_grid(item.wavelength, item.bad, grid)
    flux = fill_bad(flux, bad, fill)
    velocities = np.array([np.nan if item.velocity is None else item.velocity for item in prepared])
    noise = np.array([file_noise(item.wavelength, item.error, item.bad, grid) for item in prepared])
    return OnGrid(flux, flags, bad.mean(axis=1), velocities, noise)
