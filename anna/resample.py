"""Resampling a spectrum onto another wavelength grid without smoothing its lines.

Why not ``np.interp``: linear interpolation between samples acts as a low-pass filter whenever the target grid
does not coincide with the source pixels.  Lines come out shallower and wider, which a network reads as extra
broadening: on the example star (R = 11000, 0.18 A/px resampled to 0.2 A/px) linear interpolation raised the
inferred v sin i from 3.3 to 6.9 km/s, while spectra made directly on the grid gave 3.3.

This module uses local four-point Lagrange (cubic) interpolation: each target point uses the two source samples
on either side, with weights computed from their actual wavelengths, so non-uniform grids (log-linear,
polynomial dispersions) are handled exactly.  It reproduces cubics exactly, does not ring like a global spline
across the whole spectrum, and is fully vectorised (as fast as ``np.interp`` to within a small factor; a global
``scipy`` cubic spline was 40x slower).
"""

import numpy as np


def cubic_resample(wavelength, flux, grid):
    """``flux`` sampled at ascending ``wavelength`` (n,), interpolated onto ``grid`` (m,) inside its range.

    Points of ``grid`` must lie within [wavelength[0], wavelength[-1]] (callers check coverage first); with
    fewer than four samples this falls back to linear interpolation.  Returns (m,) float64.
    """
    x = np.asarray(wavelength, dtype=np.float64)
    y = np.asarray(flux, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64)
    if x.size < 4:
        return np.interp(g, x, y)
    # left neighbour index i (x[i] <= g < x[i+1]); stencil i-1 .. i+2, shifted inwards at the ends
    i = np.clip(np.searchsorted(x, g, side="right") - 1, 1, x.size - 3)
    x0, x1, x2, x3 = x[i - 1], x[i], x[i + 1], x[i + 2]
    d0, d1, d2, d3 = g - x0, g - x1, g - x2, g - x3
    w0 = d1 * d2 * d3 / ((x0 - x1) * (x0 - x2) * (x0 - x3))
    w1 = d0 * d2 * d3 / ((x1 - x0) * (x1 - x2) * (x1 - x3))
    w2 = d0 * d1 * d3 / ((x2 - x0) * (x2 - x1) * (x2 - x3))
    w3 = d0 * d1 * d2 / ((x3 - x0) * (x3 - x1) * (x3 - x2))
    return w0 * y[i - 1] + w1 * y[i] + w2 * y[i + 1] + w3 * y[i + 2]
