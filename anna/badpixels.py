"""Bad pixels: which pixels a spectrum cannot be trusted at, and the neutral value the network reads there.

A pixel is bad when the file's mask marks it, its inverse variance is zero (infinite error) or its flux is not
finite.  Such values are never fed to the network as they are: they are replaced by a neutral value, the same
way at inference and in training augmentation (BAD_PIXEL_FRACTION), so the network learns what a replaced
pixel looks like.  Two rules (BAD_PIXEL_FILL):

``CONTINUUM``    every bad pixel reads 1.0, the continuum of a normalised spectrum.
``INTERPOLATE``  a run of at most ``max_gap`` bad pixels with good pixels on both sides is bridged by straight
                 interpolation between those two neighbours; longer runs and runs at either end read 1.0.

Which is better was measured (benchmarks/rows_bad_pixels.py; docs in README): see ``DEFAULT_FILL``.

On a model grid, a grid point is bad when either source sample it lies between is bad, or when those two samples
are further apart than GAP_FACTOR times the median sample spacing (a detector-chip gap: interpolating across it
would invent flux).
"""

import numpy as np

FILL_METHODS = ("CONTINUUM", "INTERPOLATE")
DEFAULT_FILL = "INTERPOLATE"
DEFAULT_MAX_GAP = 5
GAP_FACTOR = 3.0
NEUTRAL = 1.0


def bad_runs(bad):
    """Start and stop indices (exclusive) of the runs of True in the 1-D bool array ``bad``."""
    edges = np.diff(np.concatenate([[False], np.asarray(bad, dtype=bool), [False]]).astype(np.int8))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def fill_bad(flux, bad, method=DEFAULT_FILL, max_gap=DEFAULT_MAX_GAP):
    """A copy of ``flux`` (n, npix) or (npix,) with the pixels where ``bad`` is True set by ``method``.

    Keeps ``flux``'s dtype.  Never reads the replaced values themselves (they may be NaN or anything)."""
    flux = np.asarray(flux)
    bad = np.asarray(bad, dtype=bool)
    out = np.array(flux, copy=True)
    if not bad.any():
        return out
    if method == "CONTINUUM":
        out[bad] = NEUTRAL
        return out
    if method != "INTERPOLATE":
        raise ValueError(f"unknown bad-pixel fill {method!r}; use one of {FILL_METHODS}")
    rows_out = out.reshape(-1, out.shape[-1])
    rows_bad = bad.reshape(-1, bad.shape[-1])
    last = rows_out.shape[1]
    # For every pixel, the nearest good pixel at or before it and at or after it (-1 / last when none): a bad
    # pixel's run is bridged when both exist and lie at most max_gap + 1 apart.  Whole arrays at once: the loop
    # over runs this replaces took 0.4-0.8 s per 1000 spectra of 1001 pixels at BAD_PIXEL_FRACTION 0.05, more
    # than the training steps those spectra feed (benchmarks/, group bad_pixels).
    columns = np.arange(last, dtype=np.int32)
    left = np.maximum.accumulate(np.where(rows_bad, -1, columns), axis=1)
    right = np.minimum.accumulate(np.where(rows_bad, last, columns)[:, ::-1], axis=1)[:, ::-1]
    row, column = np.nonzero(rows_bad)
    start, stop = left[row, column], right[row, column]
    bridged = (start >= 0) & (stop < last) & (stop - start - 1 <= max_gap)
    values = np.full(row.size, NEUTRAL)
    low = rows_out[row[bridged], start[bridged]].astype(np.float64)
    high = rows_out[row[bridged], stop[bridged]].astype(np.float64)
    values[bridged] = low + (high - low) * ((column[bridged] - start[bridged]) / (stop[bridged] - start[bridged]))
    rows_out[row, column] = values
    return out


def bad_on_grid(wavelength, bad, grid):
    """(npix,) bool: grid points of ``grid`` that lie beside a bad sample of the spectrum sampled at ascending
    ``wavelength`` (n,), or inside a gap between samples wider than GAP_FACTOR median spacings.  Points outside
    the sampled range are not marked here (coverage is a separate, fatal check)."""
    wavelength = np.asarray(wavelength, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    marks = np.interp(grid, wavelength, np.asarray(bad, dtype=np.float64)) > 0
    right = np.clip(np.searchsorted(wavelength, grid, side="right"), 1, wavelength.size - 1)
    spacing = wavelength[right] - wavelength[right - 1]
    steps = np.diff(wavelength)
    return marks | (spacing > GAP_FACTOR * np.median(steps[steps > 0]))


def random_bad_mask(rng, shape, fraction, max_run=8):
    """Bad-pixel masks for training augmentation: (n, npix) bool, on average ``fraction`` of each row.

    Half of the expected count are single pixels at random, half come in runs of 2..``max_run`` pixels (dead
    columns, cosmic-ray tracks, masked sky lines), so the network meets both shapes that real masks have."""
    n, npix = shape
    mask = rng.random((n, npix)) < fraction / 2
    mean_run = (2 + max_run) / 2
    runs_per_row = rng.poisson(fraction / 2 * npix / mean_run, size=n)
    total = int(runs_per_row.sum())
    if total:
        rows = np.repeat(np.arange(n), runs_per_row)
        lengths = rng.integers(2, max_run + 1, size=total)
        starts = rng.integers(0, npix, size=total)
        for row, start, length in zip(rows, starts, lengths):
            mask[row, start:start + length] = True
    return mask
