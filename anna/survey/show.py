"""What ``anna-spectra`` prints and writes for a spectrum file: every spectrum it holds, with its name, pixel
count, wavelength range and the error/mask columns found; ``--text`` writes wavelength, flux and error."""

import os

import numpy as np

from anna.atomic import atomic_output
from anna.spectra import spectrum_stem
from anna.survey.registry import identify_file, read_survey_file


def describe_survey_file(path):
    """A multi-line summary of a survey file, or None when no survey format recognises it (the caller then uses
    :func:`anna.fits_io.describe_file`)."""
    path = os.fspath(path)
    if identify_file(path) is None:  # not a survey file (or not FITS at all: fits_io says what is wrong)
        return None
    kind, spectra = read_survey_file(path)
    count = f"{len(spectra)} spectrum" if len(spectra) == 1 else f"{len(spectra)} spectra"
    lines = [path, f"  format: {kind}; {count}",
             f"  {'name':<16} {'pixels':>7} {'bad':>6}  {'wavelength range (A)':<22}  {'errors/mask':<16}  velocity"]
    for spectrum in spectra:
        wave = spectrum.wavelength[np.isfinite(spectrum.wavelength)]
        span = f"{wave.min():.3f} - {wave.max():.3f}" if wave.size else "none"
        bad = "-" if spectrum.bad is None else f"{np.mean(spectrum.bad):.1%}"
        velocity = "-" if spectrum.velocity is None else f"{spectrum.velocity:.3f} km/s ({spectrum.velocity_key})"
        if spectrum.rest_frame:
            velocity += ", rest frame"
        lines.append(f"  {spectrum.name:<16} {spectrum.flux.size:>7} {bad:>6}  {span:<22}  "
                     f"{', '.join(spectrum.columns) or '-':<16}  {velocity}")
    return "\n".join(lines)


def write_survey_text(path, outdir):
    """Write every spectrum of a survey file as text ``wavelength flux error`` (error NaN where the file has none,
    inf at bad pixels), one file ``<stem>.<name>.txt`` each, atomically; returns the paths written, or None when
    no survey format recognises the file."""
    path = os.fspath(path)
    if identify_file(path) is None:
        return None
    _, spectra = read_survey_file(path)
    stem = spectrum_stem(path)
    written = []
    for spectrum in spectra:
        target = os.path.join(os.fspath(outdir), f"{stem}.{spectrum.name}.txt")
        error = spectrum.error if spectrum.error is not None else np.full(spectrum.flux.size, np.nan)
        if spectrum.bad is not None:
            error = np.where(spectrum.bad, np.inf, error)
        with atomic_output(target, "w") as handle:
            handle.write("# wavelength flux error\n")
            np.savetxt(handle, np.column_stack([spectrum.wavelength, spectrum.flux, error]), fmt="%.17g")
        written.append(target)
    return written
