"""Survey files and bad pixels (group ``bad_pixels``): how fast each survey format is read and prepared, and what
masking 5 % of the pixels costs in test scatter, with and without BAD_PIXEL_FRACTION training.

**Reading and preparing** (one pair of rows per format): every survey file of tests/data (real files, cut
down: their pixel counts are in the row names) plus a LAMOST LRS file in the DR9+ table form and a plain 1-D
FITS file with an IVAR extension, both built here from the real LAMOST file's arrays (no licence-compatible
public file of those forms was found; tests/data/README).  ``read``: spectra/s of
``anna.survey.read_survey_file`` against astropy opening the file and loading every HDU's data (what reading a
file costs at the least, without knowing its format).  ``read + prepare``: spectra/s of reading plus
``anna.survey.prepare.survey_onto_grid`` (CONTINUUM SPLINE, bad pixels set by INTERPOLATE, cubic resampling onto
a grid of 400 points inside each spectrum's range: anna-infer's and anna-pack's path) against reading plus the
same resampling of the raw flux alone (no continuum, no bad pixels).  Each figure is timed over repeated calls
for at least ``bad_pixel_read_seconds``.

**Masked pixels** (the product end to end): anna-train on the tutorial example data with configs/tutorial.param
for ``bad_pixel_iterations`` stage-1 iterations (stage 2: 2000/13000 of it), twice with the same SEED: without
dropped pixels and with ``BAD_PIXEL_FRACTION: 0.05`` (INTERPOLATE, the default fill).  The test pack is noised
once as the tutorial's test section says (S/N 175-250 with its S/N template, +-1 % continuum; fixed seed); then
5 % of its pixels are masked (``anna.badpixels.random_bad_mask``, single pixels and runs, fixed seed) and the
masked spectra go through ``survey_onto_grid`` with their masks, exactly as anna-infer prepares a survey file's
bad pixels (with each BAD_PIXEL_FILL).  The test sets are written as packs and run through anna-test (PREPROCESS_TEST NO, the noise
being already in them); the figure is anna-test's scatter (std of true - inferred) per label.  Rows: each
model on the masked set against itself on the clean set; the CONTINUUM fill against INTERPOLATE on the masked
set (model trained without dropped pixels); the model trained with dropped pixels against the one
without on the clean set; and the time of anna-train's stages with dropped pixels against without.
"""

import os
import time

import numpy as np

from harness import REPO_ROOT, TUTORIAL_CONFIG, TUTORIAL_ITERATIONS, Row
from rows_training import tutorial_config

DATA = os.path.join(REPO_ROOT, "tests", "data")
MASKED_FRACTION = 0.05
GRID_POINTS = 400


# ----------------------------------------------------------------------------------------------------------
# Reading and preparing each format


def built_files(folder):
    """A LAMOST LRS table-form file and a 1-D FITS file with an IVAR extension, built from the real LAMOST LRS
    image-form file's header and arrays; returns their paths."""
    from astropy.io import fits

    with fits.open(os.path.join(DATA, "spec-58397-EG014118N254444M01_sp03-031.cut.fits")) as hdus:
        header, rows = hdus[0].header.copy(), hdus[0].data.astype(np.float32)
    for key in ("NAXIS1", "NAXIS2"):
        header.remove(key, ignore_missing=True)
    header["NAXIS"] = 0
    columns = {"FLUX": rows[0], "IVAR": rows[1], "WAVELENGTH": rows[2], "ANDMASK": rows[3], "ORMASK": rows[4]}
    table = fits.BinTableHDU.from_columns([fits.Column(name=name, format=f"{len(values)}E", array=values[None, :])
                                           for name, values in columns.items()], name="COADD")
    lrs_table = os.path.join(folder, "lrs_table_built.fits")
    fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(lrs_table, overwrite=True)
    # the plain 1-D form wants a linear or log-linear WCS: the LRS pixels are log-linear
    loglam = np.log10(rows[2].astype(np.float64))
    primary = fits.PrimaryHDU(rows[0])
    primary.header.update({"CRVAL1": loglam[0], "CDELT1": (loglam[-1] - loglam[0]) / (loglam.size - 1),
                           "CRPIX1": 1.0, "DC-FLAG": 1})
    plain = os.path.join(folder, "plain_ivar_built.fits")
    fits.HDUList([primary, fits.ImageHDU(rows[1], name="IVAR")]).writeto(plain, overwrite=True)
    return [lrs_table, plain]


def _rate(function, count, seconds):
    """Calls of ``function`` (each handling ``count`` spectra) per second, times ``count``, over >= ``seconds``."""
    function()  # first call: imports, caches
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        function()
        calls += 1
    return calls * count / (time.perf_counter() - started)


def _grids(spectra):
    """{(first, last) wavelength: (grid of GRID_POINTS inside that range, [indices of the spectra])}: spectra of
    one file that share a range (the arms of LAMOST MRS differ) are prepared together."""
    groups = {}
    for index, spectrum in enumerate(spectra):
        wave = np.asarray(spectrum.wavelength)
        low, high = float(np.nanmin(wave)), float(np.nanmax(wave))
        key = (round(low, 1), round(high, 1))
        if key not in groups:
            margin = 0.02 * (high - low)
            groups[key] = (np.linspace(low + margin, high - margin, GRID_POINTS), [])
        groups[key][1].append(index)
    return list(groups.values())


def reading_rows(ctx):
    from astropy.io import fits

    from anna.continuum import continuum_settings
    from anna.infer import spectra_onto_grid
    from anna.survey import read_survey_file
    from anna.survey.prepare import survey_onto_grid

    seconds = ctx.sizes.bad_pixel_read_seconds
    spline = continuum_settings("SPLINE")
    paths = sorted(os.path.join(DATA, name) for name in os.listdir(DATA) if name.endswith(".fits"))
    paths += built_files(ctx.ws.fresh_dir("bad_pixels_files"))
    rows, details = [], {}
    note_read = ("spectra/s of anna.survey.read_survey_file; baseline: astropy opening the file and loading every "
                 "HDU's data; files of tests/data (cut down) and two built from the real LAMOST file")
    note_prepare = ("spectra/s of reading + survey_onto_grid (CONTINUUM SPLINE, INTERPOLATE, cubic resampling "
                    f"onto {GRID_POINTS} points); baseline: reading + the same resampling of the raw flux alone")
    for path in paths:
        kind, spectra = read_survey_file(path)
        count = len(spectra)
        groups = _grids(spectra)

        def astropy_read():
            with fits.open(path) as hdus:
                for hdu in hdus:
                    hdu.data  # noqa: B018  (loads it)

        def read():
            return read_survey_file(path)[1]

        def read_prepare():
            spectra = read()
            for grid, members in groups:
                survey_onto_grid([spectra[i] for i in members], grid, spectra_onto_grid, continuum=spline,
                                 fill="INTERPOLATE")

        def read_resample():
            spectra = read()
            for grid, members in groups:
                spectra_onto_grid([(spectra[i].wavelength, spectra[i].flux) for i in members], grid)

        pixels = int(np.median([np.asarray(s.flux).size for s in spectra]))
        figures = {"read": _rate(read, count, seconds), "astropy": _rate(astropy_read, count, seconds),
                   "prepare": _rate(read_prepare, count, seconds), "resample": _rate(read_resample, count, seconds)}
        name = f"{kind} ({count} spectra x {pixels} px, {os.path.basename(path)})"
        details[os.path.basename(path)] = {"format": kind, "spectra": count, "pixels": pixels, **figures}
        rows.append(Row("bad_pixels", f"read: {name}", figures["read"], "spectra/s", figures["astropy"],
                        note=note_read))
        rows.append(Row("bad_pixels", f"read + prepare: {name}", figures["prepare"], "spectra/s",
                        figures["resample"], note=note_prepare))
        note_read = note_prepare = ""
        ctx.log(f"  {kind}: read {figures['read']:,.0f}/s (astropy {figures['astropy']:,.0f}/s), prepared "
                f"{figures['prepare']:,.0f}/s (resampling alone {figures['resample']:,.0f}/s)")
    return rows, details


# ----------------------------------------------------------------------------------------------------------
# Masked pixels: anna-train with and without BAD_PIXEL_FRACTION, anna-test on clean and masked spectra


def test_sets(ctx):
    """({"clean": pack, "masked": pack, "masked_continuum": pack}, fraction masked): the example test pack noised
    as the tutorial's test section says, and the same noisy spectra with MASKED_FRACTION of their pixels masked
    and prepared as anna-infer prepares a survey file's bad pixels, with BAD_PIXEL_FILL INTERPOLATE (the
    default) and CONTINUUM."""
    from anna.augment import noisy_copy
    from anna.badpixels import random_bad_mask
    from anna.infer import spectra_onto_grid
    from anna.packs import open_pack, write_pack
    from anna.params import load_config
    from anna.survey import SurveySpectrum
    from anna.survey.prepare import survey_onto_grid
    from anna.templates import relative_sn_on_grid

    tutorial = load_config(TUTORIAL_CONFIG)
    example = ctx.data.example()
    pack = open_pack(example["test"])
    wave, labels, flux = pack.wavelengths, np.asarray(pack.labels), np.asarray(pack.flux)
    rel_sn = relative_sn_on_grid(os.path.join(REPO_ROOT, "templates", "sn.hydra.template"), wave)
    noisy, _ = noisy_copy(flux, rel_sn, tuple(tutorial.sn_range_test), tuple(tutorial.rel_cont_e_test),
                          seed=(14, 1))
    mask = random_bad_mask(np.random.default_rng((14, 2)), noisy.shape, MASKED_FRACTION)
    spectra = [SurveySpectrum(name=str(row), wavelength=wave, flux=noisy[row], bad=mask[row])
               for row in range(len(noisy))]
    masked = survey_onto_grid(spectra, wave, spectra_onto_grid, fill="INTERPOLATE")
    continuum = survey_onto_grid(spectra, wave, spectra_onto_grid, fill="CONTINUUM")
    folder = ctx.ws.fresh_dir("bad_pixels_test")
    paths = {}
    for name, values in (("clean", noisy), ("masked", masked.flux), ("masked_continuum", continuum.flux)):
        paths[name] = os.path.join(folder, f"{name}.pack")
        write_pack(paths[name], wave, np.asarray(pack.ids), labels, values)
    return paths, float(np.mean(masked.bad_fraction))


def _anna_test(ctx, model, pack, name):
    """anna-test's per-label scatter (std of true - inferred) of ``model`` on ``pack``, not noised."""
    from anna.evaluate import run_test
    from anna.params import load_config, validate_for_stage

    overrides = {"TEST_MODEL_LOC": model, "TEST_SAVE_LOC": ctx.ws.fresh_dir("bad_pixels_runs", name),
                 "TESTING_DATA": pack, "PREPROCESS_TEST": "NO"}
    cfg = load_config(TUTORIAL_CONFIG, overrides=[f"{key}={value}" for key, value in overrides.items()])
    validate_for_stage(cfg, "test")
    summary = run_test(cfg, report=ctx.log.anna)
    return {label: entry["std"] for label, entry in summary["labels"].items()}


def masked_pixel_rows(ctx):
    from anna.train import run_training

    first = ctx.sizes.bad_pixel_iterations
    second = max(1, round(first * TUTORIAL_ITERATIONS[1] / TUTORIAL_ITERATIONS[0]))
    models, walls = {}, {}
    for name, fraction in (("plain", 0.0), ("dropped", MASKED_FRACTION)):
        ctx.log(f"  anna-train, tutorial config, {first} + {second} iterations, BAD_PIXEL_FRACTION {fraction:g}")
        cfg = tutorial_config(ctx, f"bad_pixels_{name}", {"NUM_TRAIN_ITERS1": first, "NUM_TRAIN_ITERS2": second,
                                                          "BAD_PIXEL_FRACTION": fraction, "TBOARD_OUTPUT": "NO"})
        result = run_training(cfg, report=ctx.log.anna)
        models[name] = result["frozen_model"]
        # the stages' own time: the first run also times JIT_COMPILE AUTO's forms, which the second remembers
        walls[name] = sum(stage["seconds"] for stage in result["stages"])
    packs, covered = test_sets(ctx)
    ctx.log(f"  anna-test: 2 models x (clean, {covered:.1%} of the grid masked), and the CONTINUUM fill")
    scatter = {(name, kind): _anna_test(ctx, models[name], packs[kind], f"{name}_{kind}")
               for name in models for kind in ("clean", "masked")}
    scatter[("plain", "masked_continuum")] = _anna_test(ctx, models["plain"], packs["masked_continuum"],
                                                        "plain_masked_continuum")
    units = dict(zip(("teff", "logg", "feh", "vmic", "vsini"), ("K", "dex", "dex", "km/s", "km/s")))
    labels = list(scatter[("plain", "clean")])
    trained = f"{first}+{second} iterations of configs/tutorial.param, SEED 1"
    rows = []
    notes = {
        "plain": (f"anna-test scatter (std of true - inferred) on the tutorial test pack noised at S/N 175-250 with "
                  f"{covered:.1%} of its pixels masked (single pixels and runs) and prepared as anna-infer prepares "
                  f"a survey file; baseline: the same model on the same spectra unmasked; model trained {trained}, "
                  "without dropped pixels"),
        "dropped": "the same, model trained with BAD_PIXEL_FRACTION 0.05 (INTERPOLATE)"}
    for name, title in (("plain", "trained without dropped pixels"), ("dropped", "trained with BAD_PIXEL_FRACTION 0.05")):
        note = notes[name]
        for label in labels:
            rows.append(Row("bad_pixels", f"5 % masked vs clean, {title}: {label} scatter",
                            scatter[(name, "masked")][label], units.get(label, ""), scatter[(name, "clean")][label],
                            note=note, higher_is_better=False))
            note = ""
    note = ("the choice of BAD_PIXEL_FILL: the same masked spectra set to 1.0 (CONTINUUM) against bridged "
            "(INTERPOLATE, the default), model trained without dropped pixels")
    for label in labels:
        rows.append(Row("bad_pixels", f"5 % masked, fill CONTINUUM vs INTERPOLATE: {label} scatter",
                        scatter[("plain", "masked_continuum")][label], units.get(label, ""),
                        scatter[("plain", "masked")][label], note=note, higher_is_better=False))
        note = ""
    note = "clean test spectra: the model trained with BAD_PIXEL_FRACTION 0.05 against the one trained without"
    for label in labels:
        rows.append(Row("bad_pixels", f"clean, BAD_PIXEL_FRACTION 0.05 vs without: {label} scatter",
                        scatter[("dropped", "clean")][label], units.get(label, ""), scatter[("plain", "clean")][label],
                        note=note, higher_is_better=False))
        note = ""
    rows.append(Row("bad_pixels", "anna-train stage time, BAD_PIXEL_FRACTION 0.05 vs without", walls["dropped"], "s",
                    walls["plain"], note=f"the two runs above ({trained}), run one after the other: the time of "
                                         "their stages (the training loops, cross-validation included)",
                    higher_is_better=False))
    details = {"scatter": {f"{name}/{kind}": values for (name, kind), values in scatter.items()},
               "train_wall_s": walls, "masked_fraction_on_grid": covered, "iterations": [first, second]}
    return rows, details


def bad_pixels(ctx):
    """The group: reading rows, then the masked-pixel rows."""
    ctx.log("  reading and preparing each survey format")
    rows, reading = reading_rows(ctx)
    more, masked = masked_pixel_rows(ctx)
    return rows + more, {"reading": reading, "masked": masked}
