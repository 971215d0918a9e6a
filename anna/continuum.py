"""Continuum normalisation for spectra that are not normalised (LAMOST LRS, APOGEE apStar, SDSS).

``CONTINUUM: NONE | SPLINE | QUANTILE``.  Both methods fit only the good pixels (the bad-pixel mask of
:mod:`anna.badpixels`) and return the continuum at every pixel; the flux (and its error) are divided by it.

``SPLINE``   an iteratively, asymmetrically sigma-clipped least-squares cubic spline: knots every
             ``knot_spacing`` Angstrom; after each fit, pixels more than ``low_sigma`` robust sigmas below the
             fit (absorption lines) or ``high_sigma`` above it (cosmic rays, emission) are left out of the next
             fit; ``iterations`` fits.  Robust sigma = 1.4826 x the median residual of the kept pixels above
             the fit (below it, absorption lines widen the spread).
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


def _spline_continuum(wavelength, flux, good, settings):
    """The iterative fit.  The B-spline basis is evaluated once (four non-zero values a pixel); each iteration
    only reweights it, sums the small banded normal equations with bincount and solves them: 18 ms for a
    3909-pixel LAMOST spectrum, where refitting with scipy's make_lsq_spline each time took 100-290 ms.  A faint
    second-difference penalty on the coefficients (a P-spline term) keeps the equations solvable, and the curve
    smooth, when clipping empties a knot interval (a wide absorption line) instead of pulling it to zero there."""
    from scipy.interpolate import BSpline
    from scipy.linalg import solveh_banded

    order = np.argsort(wavelength)
    x, y, good_sorted = wavelength[order], flux[order], good[order]
    keep = good_sorted.copy()
    spacing = float(settings["knot_spacing"])
    inner = np.arange(x[0] + spacing, x[-1], spacing)
    # knots only where good pixels lie on both sides of them
    counts = np.histogram(x[keep], bins=np.concatenate([[x[0]], inner, [x[-1]]]))[0]
    inner = inner[(counts[:-1] >= 2) & (counts[1:] >= 2)]
    knots = np.concatenate([[x[0]] * 4, inner, [x[-1]] * 4])
    n_coefficients = len(knots) - 4
    basis = BSpline.design_matrix(x, knots, 3).tocsr()
    basis.sort_indices()
    first = basis.indices.reshape(-1, 4)[:, 0]  # each pixel's four basis functions are consecutive
    values = basis.data.reshape(-1, 4)
    scale = float(np.median(np.abs(y[keep]))) or 1.0
    target = y / scale
    # the second-difference penalty D^T D in LAPACK's upper banded form (rows: 3rd, 2nd, 1st super-diagonal, diagonal)
    penalty = np.zeros((4, n_coefficients))
    penalty[3] = 6.0
    penalty[3, [0, -1]] = 1.0
    penalty[3, [1, -2]] = 5.0
    penalty[2, 1:] = -4.0
    penalty[2, [1, -1]] = -2.0
    penalty[1, 2:] = 1.0
    fit = np.ones_like(target)
    for _ in range(int(settings["iterations"])):
        weight = keep.astype(np.float64)
        # cubic B-splines overlap their three neighbours, so the normal equations are banded: summed straight
        # into the banded form LAPACK's Cholesky solver takes (single-threaded; the dense solver's threads cost
        # 120 ms a call on a busy 2-core machine)
        banded = np.zeros((4, n_coefficients))
        rhs = np.zeros(n_coefficients)
        for a in range(4):
            rhs += np.bincount(first + a, weight * values[:, a] * target, minlength=n_coefficients)
            for b in range(a, 4):
                banded[3 - (b - a)] += np.bincount(first + b, weight * values[:, a] * values[:, b],
                                                   minlength=n_coefficients)
        banded += 1e-6 * max(banded[3].mean(), 1e-12) * penalty
        coefficients = solveh_banded(banded, rhs)
        fit = np.einsum("ij,ij->i", values, coefficients[first[:, None] + np.arange(4)])
        residual = target - fit
        # the noise is measured above the fit only: below it, absorption lines inflate the spread
        above = residual[keep & (residual > 0)]
        sigma = max(1.4826 * np.median(above) if above.size else 0.0, 1e-6)
        new = good_sorted & (residual > -settings["low_sigma"] * sigma) & (residual < settings["high_sigma"] * sigma)
        if new.sum() < 8 or (new == keep).all():
            break
        keep = new
    continuum = np.empty_like(flux)
    continuum[order] = fit * scale
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
