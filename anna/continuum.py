"""Continuum normalisation for spectra that are not normalised (LAMOST LRS, APOGEE apStar, SDSS).

``CONTINUUM: NONE | SPLINE | QUANTILE``.  Both methods fit only the good pixels (the bad-pixel mask of
:mod:`anna.badpixels`) and return the continuum at every pixel; the flux (and its error) are divided by it.

``SPLINE``   an iteratively, asymmetrically sigma-clipped least-squares cubic spline: knots every
             ``knot_spacing`` Angstrom; after each fit, pixels more than ``low_sigma`` robust sigmas below the
             fit (absorption lines) or ``high_sigma`` above it (cosmic rays, emission) are left out of the next
             fit; ``iterations`` fits.  Robust sigma = 1.4826 x the median residual of the kept pixels above the fit (below it, absorption
             lines widen the spread).
             Default: 50 A knots, low 1.5, high 3, 8 iterations.
``QUANTILE`` a running quantile: the ``quantile`` (default 0.9) of the good pixels in a window of ``window``
             Angstrom (default 50) centred on each pixel, then smoothed by a running mean over the same window.
             Faster, no iteration, but biased high by the noise (the 0.9 quantile of noise about a flat
             continuum sits about 1.3 sigma above it), so best for high S/N.

The method and its parameters are recorded in the frozen model (``continuum`` in its metadata) and anna-infer
applies exactly that; anna-pack applies the same function when it builds a pack from survey files.
"""

import numpy as np

METHODS = ("NONE", "SPLINE", "QUANTILE")
DEFAULTS = {"SPLINE": {"knot_spacing": 50.0, "low_sigma": 1.5, "high_sigma": 3.0, "iterations": 8},
            "QUANTILE": {"window": 50.0, "quantile": 0.9}}


def continuum_settings(method, **parameters):
    """The record a frozen model and a pack keep: {"method": ..., parameters...} (defaults filled in)."""
    method = str(method).upper()
    if method not in METHODS:
        raise ValueError(f"unknown continuum method {method!r}; use one of {METHODS}")
    return {"method": method, **DEFAULTS.get(method, {}), **parameters}


def fit_continuum(wavelength, flux, bad=None, settings=None):
    """The continuum (n,) of one spectrum; ``settings`` from :func:`continuum_settings`.  None or NONE: ones."""
    settings = settings or {"method": "NONE"}
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    good = np.isfinite(flux) & np.isfinite(wavelength)
    if bad is not None:
        good &= ~np.asarray(bad, dtype=bool)
    method = settings["method"]
    if method == "NONE":
        return np.ones_like(flux)
    if good.sum() < 8:
        raise ValueError("too few good pixels to fit a continuum")
    if method == "SPLINE":
        return _spline_continuum(wavelength, flux, good, settings)
    if method == "QUANTILE":
        return _quantile_continuum(wavelength, flux, good, settings)
    raise ValueError(f"unknown continuum method {method!r}")


def normalise(wavelength, flux, error=None, bad=None, settings=None):
    """(flux / continuum, error / continuum or None, continuum)."""
    continuum = fit_continuum(wavelength, flux, bad, settings)
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(continuum > 0, continuum, np.nan)
        return flux / safe, (None if error is None else error / safe), continuum


def _spline_fit(x, y, knots):
    """Least-squares cubic spline through (x, y), x ascending; inner knots without data on both sides dropped
    (the Schoenberg-Whitney condition a least-squares spline needs)."""
    from scipy.interpolate import make_lsq_spline

    inner = knots[(knots > x[0]) & (knots < x[-1])]
    edges = np.concatenate([[x[0]], inner, [x[-1]]])
    counts = np.histogram(x, bins=edges)[0]
    # a knot stays when the intervals on both sides hold at least 2 points each
    keep = (counts[:-1] >= 2) & (counts[1:] >= 2)
    inner = inner[keep]
    t = np.concatenate([[x[0]] * 4, inner, [x[-1]] * 4])
    return make_lsq_spline(x, y, t, k=3)


def _spline_continuum(wavelength, flux, good, settings):
    order = np.argsort(wavelength)
    x, y, keep = wavelength[order], flux[order], good[order].copy()
    spacing = float(settings["knot_spacing"])
    knots = np.arange(x[0] + spacing, x[-1], spacing)
    spline = None
    for _ in range(int(settings["iterations"])):
        try:
            spline = _spline_fit(x[keep], y[keep], knots)
        except (ValueError, np.linalg.LinAlgError):
            knots = knots[::2]
            spline = _spline_fit(x[keep], y[keep], knots)
        residual = y - spline(x)
        # the noise is measured above the fit only: below it, absorption lines inflate the spread
        above = residual[keep & (residual > 0)]
        sigma = max(1.4826 * np.median(above) if above.size else 0.0, 1e-6 * abs(float(np.median(y[keep]))))
        if not np.isfinite(sigma) or sigma == 0:
            break
        new = good[order] & (residual > -settings["low_sigma"] * sigma) & (residual < settings["high_sigma"] * sigma)
        if new.sum() < 8 or (new == keep).all():
            break
        keep = new
    continuum = np.empty_like(flux)
    continuum[order] = spline(x)
    return continuum


def _quantile_continuum(wavelength, flux, good, settings):
    from scipy.ndimage import percentile_filter, uniform_filter1d

    order = np.argsort(wavelength)
    x, y, ok = wavelength[order], flux[order], good[order]
    step = np.median(np.diff(x))
    width = max(3, int(round(float(settings["window"]) / step)) | 1)
    # bad pixels take the value of their nearest good neighbour, so they neither pull nor push the quantile
    filled = np.interp(x, x[ok], y[ok])
    level = percentile_filter(filled, 100.0 * float(settings["quantile"]), size=width, mode="nearest")
    level = uniform_filter1d(level, size=width, mode="nearest")
    continuum = np.empty_like(flux)
    continuum[order] = level
    return continuum
