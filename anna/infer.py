"""anna-infer: labels for spectra whose labels are unknown (guide 4.4).

Input modes (INFER_MODE, or the legacy DEBUG_MODE / SINGLE_MS_MODE flags):

``DEBUG``   a pack (DEBUG_DATA); its known labels are ignored and its ids kept exactly.  The pack's
            wavelengths must already be the model's grid: nothing is interpolated, so the results equal
            anna-test's inferred values for the same pack.
``MS_FITS`` IRAF multispec FITS (MS_FITS_IMAGE, or every file INFER_FILES names); one row per aperture.
``TEXT``    two-column text spectra, wavelength (Angstrom) and flux (TEXT_IMAGE, or INFER_FILES).
``FITS``    every file INFER_FILES names (a glob, or a list file); each may be multispec FITS, 1-D FITS or a
            text spectrum, told apart by :mod:`anna.spectra`'s rule (content first: a ``SIMPLE`` card, or
            gzip, bzip2 or zip taken as compressed FITS; failing that, the extension).  Files ending
            ``_infer.out`` (our own outputs) are never taken as inputs.

Every spectrum is resampled onto the frozen model's own wavelength grid by local cubic (four-point)
interpolation (:mod:`anna.resample`); WAVE_TEMPLATE, when given, is only checked against that grid.  Nothing
is extrapolated.  One output per input file,
``INFER_SAVE_LOC/<input stem>_infer.out``, written atomically, comma-separated, header
``star_id,<name>...,bad_pixel_fraction,flags`` (multispec outputs add ``file,aperture,beam`` before the names).
``star_id`` is the pack id (DEBUG), the aperture number where the file gives one, or else the 1-based row
number.  ``bad_pixel_fraction`` (every row): the fraction of the model grid's pixels that were bad: for survey
files masked, zero inverse variance or non-finite flux (:mod:`anna.survey.prepare`), for packs, text and
multispec FITS non-finite flux (a grid point beside such a sample); such a row is also flagged ``nonfinite``.

Flags (``|``-joined in this order, empty when the spectrum is fine).  Those marked *fatal* leave the
outputs NaN; the others are warnings next to a real prediction:

``no_coverage``  (fatal) the spectrum, after leading/trailing zero padding is dropped, does not span the whole
                 model grid.
``bad_wavelength`` (fatal) fewer than two samples, non-finite wavelengths, or wavelengths not monotonic.
``nonfinite``    (fatal) NaN or infinite flux on the grid, or in a sample that the grid interpolates from.
``all_zero``     (fatal) the flux on the grid is exactly zero everywhere.
``zero_pixels``  some flux on the grid, or a sample it is interpolated from, is exactly zero (gaps, masked
                 pixels): the prediction may be poor.
``out_of_range`` a reported value lies outside [MIN - m*(MAX-MIN), MAX + m*(MAX-MIN)] of the training label
                 ranges, m = RANGE_MARGIN: the network is extrapolating.
``large_sigma``  with MAX_REL_SIGMA set: some label's uncertainty σ_total exceeds MAX_REL_SIGMA × (MAX − MIN).
``outside_training_domain`` the spectrum is unlike every training spectrum (rule below).
``correction_extrapolated`` APPLY_CORRECTION used its polynomial outside the inferred-value range it was
                 fitted on.
``domain_unchecked`` the model has no training-domain statistics (an older model, or one whose run was stopped
                 before they were computed), so ``outside_training_domain`` could not be checked.
``sigma_uncalibrated`` with MC_DROPOUT: the model's σ was never calibrated (same cause).  Both are also
                 announced in one line at start; ``anna-train --finish`` completes such a model.

Uncertainties (UNCERTAINTY: MC_DROPOUT, for a model whose last training stage used dropout): the reported
value is the mean of MC_SAMPLES dropout passes and three columns per label follow the values, in the labels'
physical units: ``<name>_err`` (σ_total = sqrt(err_model² + err_pred²)), ``<name>_err_model`` (calibrated spread
of the dropout passes: the network's own uncertainty, largest for spectra unlike the training set) and
``<name>_err_pred`` (the variance head: label misfit plus propagated flux noise).  With a variance head two
columns follow the errors: ``noise``, the spectrum's noise σ (continuum-normalised flux, about 1/(S/N)) that
the variance head read, and ``noise_source``: ``errors`` when it comes from the file's own per-pixel errors
(survey files: the median σ over the good pixels in the grid's range, :func:`anna.survey.prepare.file_noise`),
``DER_SNR`` when it was estimated from the flux (every other input).  With APPLY_CORRECTION the
errors are multiplied by the slope |p'(x)| of the correction polynomial.  The dropout masks are seeded with
SEED (0 when empty), so a rerun gives the same numbers.

Training-domain rule (``outside_training_domain``): at the end of training the frozen model stores, from up to
4000 training spectra noised as in training, the mean spectrum of four fifths of them and its leading
principal components (up to 10), and for each of two statistics the value that 99.95 % of spectra like
those do not exceed (estimated out of sample: each fifth scored against the description of the other four
fifths).  A spectrum is flagged when either statistic exceeds its value, so about one spectrum in a thousand
that resembles the training set (0.05 % by each statistic) is flagged by chance; for one given model
anywhere from about 0.3 to 2 in a thousand, as its thresholds rest on the few most extreme of those 4000
spectra:

* *residual*: the RMS of the part of (spectrum − mean spectrum) that the principal components cannot
  reproduce, with the spectrum's own noise (DER_SNR estimate) removed in quadrature: features the training
  spectra never had (other lines, emission, broader lines, wrong normalisation or wavelength range);
* *Mahalanobis distance* of the principal-component coefficients from those of the training spectra:
  combinations of known features the training set never showed.

Reruns: an input is skipped when its output exists and is newer than the input, the frozen model and (when
applied) the correction, so a run killed part-way resumes where it stopped; the report says how many were
skipped.  Spectra go through the model INFER_BATCH_SIZE at a time and packs are read in such blocks with plain
reads, so memory stays bounded whatever the pack's size; INFER_BATCH_SIZE AUTO (the default) takes the largest
batch that keeps the process within MAX_MEMORY_GB (:mod:`anna.memory`), reported at start with the compiled
form of the forward pass (JIT_COMPILE AUTO: XLA or the plain graph, whichever is faster here).  In multi-file modes an unreadable file does not stop the others: its error is reported, and
after the last file an AnnaInputError lists how many failed.
"""

import csv
import dataclasses
import functools
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.correction import apply_correction, correction_location, correction_slopes, load_correction
from anna.domain import DomainScorer
from anna.frozen_file import resolve_model_path
from anna.model import ERROR_COLUMNS, load_frozen, mc_samples_for
from anna.progress import announce_total, count_done
from anna.resample import GRID_RELATIVE_TOLERANCE, check_same_grid, cubic_resample_rows
from anna.spectra import looks_like_fits, spectrum_stem
from anna.tables import csv_rows, format_star_id, value_texts

OUTPUT_SUFFIX = "_infer.out"
FLAG_ORDER = ("no_coverage", "bad_wavelength", "nonfinite", "all_zero", "zero_pixels", "out_of_range",
              "large_sigma", "outside_training_domain", "correction_extrapolated", "domain_unchecked",
              "sigma_uncalibrated", "many_bad_pixels")
FATAL_FLAGS = frozenset({"no_coverage", "bad_wavelength", "nonfinite", "all_zero"})
MULTISPEC_COLUMNS = ("file", "aperture", "beam")
# survey files (anna.survey): which spectrum of the file and the velocity its wavelengths were shifted by
# (RV_CORRECT; empty when none); the fraction of bad grid pixels is a column of every output (BAD_FRACTION_COLUMN)
SURVEY_COLUMNS = ("file", "spectrum", "rv_used")
BAD_FRACTION_COLUMN = "bad_pixel_fraction"
# with a variance head: the noise σ it read and where that came from (a file's errors or DER_SNR)
NOISE_COLUMNS = ("noise", "noise_source")
# The flag word each missing part of a frozen model (FrozenModel.missing_parts) puts on every star.
MISSING_PART_FLAGS = {"training_domain": "domain_unchecked", "variance_calibration": "sigma_uncalibrated"}
# spectra_onto_grid works on this many (spectrum x pixel) values at a time, so that its temporary arrays stay
# in the CPU cache: a whole multispec file at once (90 x 1000 values per array) ran 3.5x slower, 4096 values
# (too few rows to share the per-call cost) 1.6x slower (benchmarks/, FITS row).
ONTO_GRID_ELEMENTS = 16384
# The grid flags (_bad_and_zero_counts) are counted on this many spectra at a time.
FLAG_ROWS = 128
# Within one long input (a big DEBUG pack) a progress line is printed at most this often.
PROGRESS_SECONDS = 30.0


@dataclasses.dataclass
class GridBlock:
    """Spectra of one input already on the model grid, ready for the network.

    ``star_ids`` (n,) text; ``meta`` (n,) tuples matching ``meta_columns``; ``flux`` (n, npix) float32 or float64 on the
    model grid (rows with a fatal flag may hold anything); ``flags`` (n,) sets of flag words.
    """

    star_ids: list
    meta: list
    flux: np.ndarray
    flags: list
    meta_columns: tuple = ()
    bad_fraction: np.ndarray = None  # (n,) fraction of grid pixels that were bad (None: not known, empty column)
    noise: np.ndarray = None  # (n,) noise σ from the file's own errors, NaN where none (None: no errors at all)


# ----------------------------------------------------------------------------------------------------------
# Spectra onto the grid


def _bad_and_zero_counts(flux):
    """(non-finite, zero) pixel counts of each (n, npix) spectrum, FLAG_ROWS spectra at a time, so that the
    temporary masks stay small and in the CPU cache."""
    flux = np.asarray(flux)
    bad = np.empty(flux.shape[0], dtype=np.int64)
    zeros = np.empty(flux.shape[0], dtype=np.int64)
    for start in range(0, flux.shape[0], FLAG_ROWS):
        rows = flux[start:start + FLAG_ROWS]
        bad[start:start + FLAG_ROWS] = np.count_nonzero(~np.isfinite(rows), axis=1)
        zeros[start:start + FLAG_ROWS] = np.count_nonzero(rows == 0, axis=1)
    return bad, zeros


def _flags_from_counts(bad, zeros, npix):
    flags = [set() for _ in range(len(bad))]
    for row in np.flatnonzero((bad > 0) | (zeros > 0)):
        if bad[row]:
            flags[row].add("nonfinite")
        elif zeros[row] == npix:
            flags[row].add("all_zero")
        else:
            flags[row].add("zero_pixels")
    return flags


def grid_flux_flags(flux):
    """Flag sets for (n, npix) fluxes already on the grid: nonfinite, all_zero, zero_pixels."""
    flux = np.asarray(flux)
    return _flags_from_counts(*_bad_and_zero_counts(flux), flux.shape[1])


def grid_flags_and_bad_fraction(flux):
    """:func:`grid_flux_flags` of (n, npix) grid fluxes and the (n,) fraction of each spectrum's pixels that are
    not finite (the bad pixels of a spectrum already on the grid: a pack's block), from one pass over them."""
    flux = np.asarray(flux)
    bad, zeros = _bad_and_zero_counts(flux)
    return _flags_from_counts(bad, zeros, flux.shape[1]), bad / max(flux.shape[1], 1)


def nonfinite_fractions(spectra, flags, grid):
    """(n,) bad-pixel fraction on ``grid`` of (wavelength, flux) pairs that :func:`spectra_onto_grid` resampled
    into ``flags``: the grid points beside a non-finite flux sample (the rule of
    :func:`anna.badpixels.bad_on_grid`, on the samples left once zero padding is dropped).  Only spectra
    flagged ``nonfinite`` have any (a non-finite sample the grid reads is fatal); 0 for the others."""
    grid = np.asarray(grid, dtype=np.float64)
    fractions = np.zeros(len(spectra))
    for row, words in enumerate(flags):
        if "nonfinite" not in words:
            continue
        wavelength = np.asarray(spectra[row][0], dtype=np.float64).reshape(-1)
        flux = np.asarray(spectra[row][1], dtype=np.float64).reshape(-1)
        data = np.flatnonzero(flux != 0)
        wavelength, flux = wavelength[data[0]:data[-1] + 1], flux[data[0]:data[-1] + 1]
        order = np.argsort(wavelength, kind="stable")
        marks = np.interp(grid, wavelength[order], (~np.isfinite(flux[order])).astype(np.float64)) > 0
        fractions[row] = marks.mean()
    return fractions


def spectrum_onto_grid(wavelength, flux, grid):
    """One spectrum onto ``grid``: (flux (npix,), flags); see :func:`spectra_onto_grid`."""
    on_grid, flags = spectra_onto_grid([(wavelength, flux)], grid)
    return on_grid[0], flags[0]


def spectra_onto_grid(spectra, grid):
    """Cubic resampling (:mod:`anna.resample`) of (wavelength, flux) pairs onto ``grid`` (npix,), Angstrom.

    Returns (flux (n, npix) float64, list of n flag sets).  Leading and trailing runs of exactly zero flux are
    padding, not data, and are dropped first.  A spectrum that then does not span the grid (to
    GRID_RELATIVE_TOLERANCE) is flagged ``no_coverage`` rather than extrapolated; descending wavelengths are
    accepted and reversed.  Rows with a fatal flag hold NaN.  Spectra of equal length are checked and
    resampled together, as arrays: a multispec file's apertures cost one pass, not one pass each.
    """
    grid = np.asarray(grid, dtype=np.float64)
    on_grid = np.full((len(spectra), grid.size), np.nan)
    flags = [set() for _ in spectra]
    by_length = {}
    for row, (wavelength, flux) in enumerate(spectra):
        wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
        flux = np.asarray(flux, dtype=np.float64).reshape(-1)
        if wavelength.size != flux.size or wavelength.size < 2:
            flags[row].add("bad_wavelength")
        else:
            by_length.setdefault(wavelength.size, []).append((row, wavelength, flux))
    for length, members in by_length.items():
        step = max(1, ONTO_GRID_ELEMENTS // max(length, grid.size))
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            rows = np.array([row for row, _, _ in chunk])
            on_grid[rows], chunk_flags = _same_length_onto_grid(np.stack([w for _, w, _ in chunk]),
                                                                np.stack([f for _, _, f in chunk]), grid)
            for row, words in zip(rows, chunk_flags):
                flags[row] = words
    return on_grid, flags


def _same_length_onto_grid(wavelength, flux, grid):
    """:func:`spectra_onto_grid` for (k, n) wavelength and flux arrays, n >= 2: (flux (k, npix), flag sets)."""
    k, n = wavelength.shape
    columns = np.arange(n)
    fatal = np.full(k, "", dtype=object)

    def flag(condition, word):
        fatal[(fatal == "") & condition] = word

    data = flux != 0  # NaN counts as data here, so it is flagged below, not trimmed
    flag(~data.any(axis=1), "all_zero")
    first = np.argmax(data, axis=1)
    last = n - 1 - np.argmax(data[:, ::-1], axis=1)
    flag(last - first < 1, "no_coverage")
    inside = (columns >= first[:, None]) & (columns <= last[:, None])
    flag((~np.isfinite(wavelength) & inside).any(axis=1), "bad_wavelength")
    with np.errstate(invalid="ignore"):
        steps = np.diff(wavelength, axis=1)
    step_inside = inside[:, :-1] & (columns[:-1] < last[:, None])
    descending = ((steps < 0) | ~step_inside).all(axis=1)
    flag(~descending & ~((steps > 0) | ~step_inside).all(axis=1), "bad_wavelength")
    if descending.any():
        wavelength = np.where(descending[:, None], wavelength[:, ::-1], wavelength)
        flux = np.where(descending[:, None], flux[:, ::-1], flux)
        first, last = np.where(descending, n - 1 - last, first), np.where(descending, n - 1 - first, last)
        inside = (columns >= first[:, None]) & (columns <= last[:, None])
    tolerance = GRID_RELATIVE_TOLERANCE * np.abs(grid[[0, -1]])
    ends = np.arange(k)
    with np.errstate(invalid="ignore"):
        flag((wavelength[ends, first] > grid[0] + tolerance[0]) | (wavelength[ends, last] < grid[-1] - tolerance[1]),
             "no_coverage")
        # samples the cubic stencil reads: two on either side of each grid point
        stencil_first = first + np.maximum(((wavelength <= grid[0]) & inside).sum(axis=1) - 2, 0)
        stencil_end = first + np.minimum(((wavelength < grid[-1]) & inside).sum(axis=1) + 2, last - first + 1)
    stencil = (columns >= stencil_first[:, None]) & (columns < stencil_end[:, None])
    flag((~np.isfinite(flux) & stencil).any(axis=1), "nonfinite")
    zero_in_stencil = ((flux == 0) & stencil).any(axis=1)
    usable = fatal == ""
    on_grid = np.full((k, grid.size), np.nan)
    if usable.any():
        # linear interpolation would smooth the lines
        on_grid[usable] = cubic_resample_rows(wavelength[usable], flux[usable], first[usable], last[usable], grid)
    flags = [{word} if word else set() for word in fatal]
    for row, words in zip(np.flatnonzero(usable), grid_flux_flags(on_grid[usable])):
        if "all_zero" not in words and zero_in_stencil[row]:
            words.add("zero_pixels")
        flags[row] = words
    return on_grid, flags


def read_text_spectrum(path):
    """Wavelength and flux (float64 arrays) from a text spectrum: whitespace or comma separated columns,
    wavelength (Angstrom) first, flux second, further columns ignored, ``#`` comments.

    Non-finite values are kept (they become a ``nonfinite`` flag, not an error); non-numeric text is an
    error naming the line.
    """
    from anna.templates import read_two_columns

    return read_two_columns(path, "text spectrum", ascending=False, finite=False)


# ----------------------------------------------------------------------------------------------------------
# One reader per input kind: each yields GridBlocks


def read_debug_pack(path, model, batch_size):
    """DEBUG mode: blocks of ``batch_size`` pack rows; the pack grid must be the model grid (no interpolation).

    Rows are read with plain reads (:meth:`anna.packs.Pack.read_rows`), not through the memory map, so the
    process holds one block, however large the pack; the flux goes straight to float32, what the network
    reads (a value beyond float32's range becomes infinite there and is flagged ``nonfinite``)."""
    from anna.packs import open_pack

    pack = open_pack(path, check_labels=False)
    check_same_grid(pack.wavelengths, model.wavelengths, what="the DEBUG_DATA pack", path=pack.path,
                    key="DEBUG_DATA")
    for start, stop in pack.iter_chunks(int(batch_size)):
        yield pack_rows_block(pack, start, stop)


def pack_rows_block(pack, start, stop):
    """The GridBlock of stars ``start:stop`` of an open pack (already on the model's grid): ids, float32 flux
    (the network's precision), grid flags and bad-pixel fraction.  The one-process reader above and the Dask
    tasks (anna.infer_dask) build their blocks here."""
    ids, _, flux = pack.read_rows(start, stop, flux_dtype=np.float32)
    flags, bad_fraction = grid_flags_and_bad_fraction(flux)
    return GridBlock(star_ids=[format_star_id(value) for value in ids], meta=[()] * (stop - start), flux=flux,
                     flags=flags, bad_fraction=bad_fraction)


def read_multispec(path, model, options=None):
    """MS_FITS mode: every aperture of a multispec file; adds the file, aperture and beam columns."""
    return _fits_block(path, model, multispec=True, options=options)


def _survey_block(path, model, options):
    """One GridBlock of a survey file's spectra, prepared as :mod:`anna.survey.prepare` says with the model's
    recorded continuum method and bad-pixel fill; adds the SURVEY_COLUMNS."""
    from anna.survey import read_survey_file
    from anna.survey.prepare import survey_onto_grid

    _, spectra = read_survey_file(path)
    prepared = survey_onto_grid(
        spectra, model.wavelengths, spectra_onto_grid, continuum=model.metadata.get("continuum"),
        fill=model.metadata.get("bad_pixel_fill", "INTERPOLATE"), rv_correct=bool(options.get("rv_correct")))
    name = os.path.basename(path)
    meta = [(name, spectrum.name, "" if np.isnan(velocity) else f"{velocity:.3f}")
            for spectrum, velocity in zip(spectra, prepared.velocities)]
    return GridBlock(star_ids=[str(number) for number in range(1, len(spectra) + 1)], meta=meta,
                     flux=prepared.flux, flags=prepared.flags, meta_columns=SURVEY_COLUMNS,
                     bad_fraction=prepared.bad_fraction, noise=prepared.noise)


def read_text(path, model):
    """TEXT mode: one two-column text spectrum, star_id 1."""
    wavelength, flux = read_text_spectrum(path)
    on_grid, flags = spectrum_onto_grid(wavelength, flux, model.wavelengths)
    yield GridBlock(star_ids=["1"], meta=[()], flux=on_grid[None, :], flags=[flags],
                    bad_fraction=nonfinite_fractions([(wavelength, flux)], [flags], model.wavelengths))


def read_any_file(path, model, options=None):
    """FITS mode: multispec or 1-D FITS, or a text spectrum, decided by content and then extension."""
    if looks_like_fits(path):
        return _fits_block(path, model, multispec=None, options=options)
    return read_text(path, model)


def _fits_block(path, model, multispec, options=None):
    """Spectra of a FITS file.  ``multispec`` None: add file/aperture/beam columns when the file has apertures
    or more than one spectrum.  Survey files (:mod:`anna.survey`) go through :func:`_survey_block`."""
    from anna.fits_io import read_spectra
    from anna.survey.registry import identify_file

    if identify_file(path) is not None:
        yield _survey_block(path, model, options or {})
        return
    spectra = read_spectra(path)
    if multispec is None:
        multispec = len(spectra) > 1 or any(spectrum.aperture is not None for spectrum in spectra)
    pairs = [(spectrum.wavelength, spectrum.flux) for spectrum in spectra]
    flux, flags = spectra_onto_grid(pairs, model.wavelengths)
    star_ids, meta = [], []
    for spectrum in spectra:
        star_ids.append(str(spectrum.aperture) if spectrum.aperture is not None else str(spectrum.index + 1))
        if multispec:
            meta.append((os.path.basename(path), "" if spectrum.aperture is None else str(spectrum.aperture),
                         "" if spectrum.beam is None else str(spectrum.beam)))
        else:
            meta.append(())
    yield GridBlock(star_ids=star_ids, meta=meta, flux=flux, flags=flags,
                    meta_columns=MULTISPEC_COLUMNS if multispec else (),
                    bad_fraction=nonfinite_fractions(pairs, flags, model.wavelengths))


# ----------------------------------------------------------------------------------------------------------
# Which inputs


def list_inputs(cfg):
    """(input path, reader) pairs for the chosen mode; reader(path, model) yields GridBlocks, except DEBUG's
    :func:`read_debug_pack`, which also takes the batch size (the pack is read in blocks of a batch)."""
    mode = cfg.infer_mode
    if mode == "DEBUG":
        return [(cfg.debug_data, read_debug_pack)]
    readers = {"MS_FITS": (read_multispec, "ms_fits_image"), "TEXT": (read_text, "text_image"),
               "FITS": (read_any_file, None)}
    if mode not in readers:
        raise AnnaInputError("no inference input chosen: set INFER_MODE (DEBUG, MS_FITS, TEXT or FITS)",
                             path=cfg.source, key="INFER_MODE", value=mode)
    reader, single_key = readers[mode]
    if mode != "TEXT":  # survey files read with the parameter file's options
        reader = functools.partial(reader, options={"rv_correct": bool(cfg.rv_correct)})
    single = getattr(cfg, single_key) if single_key else None
    if single is not None:
        paths = [single]
    else:
        from anna.params import expand_infer_files

        if cfg.infer_files is None:
            raise cfg.error("INFER_FILES", f"required for {mode} inference, but not given")
        paths = [path for path in expand_infer_files(cfg) if not path.endswith(OUTPUT_SUFFIX)]
        if not paths:
            raise cfg.error("INFER_FILES", f"matches only earlier outputs (*{OUTPUT_SUFFIX}), no inputs")
    return [(path, reader) for path in paths]


def output_path(save_loc, input_path):
    """``save_loc/<stem>_infer.out``; the stem drops the extension (and a compression extension before it)."""
    return os.path.join(save_loc, spectrum_stem(input_path) + OUTPUT_SUFFIX)


def _check_distinct_outputs(cfg, pairs):
    seen = {}
    for input_path, output in pairs:
        if output in seen:
            raise cfg.error("INFER_FILES", f"inputs {seen[output]} and {input_path} would both write {output}; "
                                           "rename one or run them with different INFER_SAVE_LOC")
        seen[output] = input_path


def _is_done(output, dependencies):
    """True when ``output`` exists and is newer than every dependency (input, model, correction)."""
    if not os.path.exists(output):
        return False
    newest = max(os.stat(path).st_mtime_ns for path in dependencies)
    return os.stat(output).st_mtime_ns > newest


# ----------------------------------------------------------------------------------------------------------
# Shared predict-and-write path


# ----------------------------------------------------------------------------------------------------------
# Shared predict-and-write path


@dataclasses.dataclass
class Predictor:
    """The model plus what turns its outputs into reported values: uncertainties, correction and flags.

    ``mc_samples`` None: one deterministic pass; a number: MC dropout with that many passes (the model must
    have dropout).  ``max_rel_sigma`` None or the fraction of MAX − MIN above which σ_total is flagged.
    """

    model: object
    batch_size: int
    range_margin: float
    correction: dict = None
    mc_samples: int = None
    max_rel_sigma: float = None
    domain_pool: object = None  # an executor for the training-domain statistics; None: computed inline
    max_bad_pixel_fraction: float = None  # MAX_BAD_PIXEL_FRACTION: above it, many_bad_pixels

    def __post_init__(self):
        domain = self.model.metadata.get("training_domain")
        self.domain_scorer = DomainScorer(domain) if domain else None
        # what the model lacks is recorded on every star it predicts
        self.missing_flags = [MISSING_PART_FLAGS[part] for part in self.model.missing_parts(self.mc_samples)]

    @property
    def with_errors(self):
        return self.mc_samples is not None

    @property
    def with_noise(self):
        """Whether the outputs report the noise the variance head read (MC dropout, a model with the head)."""
        return self.with_errors and self.model.spec.heteroscedastic

    def predict(self, block):
        """Reported labels (n, nout) for a GridBlock and, with MC dropout, a dict of (n, nout) sigmas
        (``sigma_total``, ``sigma_model``, ``sigma_pred``; else None).  Adds warning flags to ``block.flags``."""
        usable = np.array([not (words & FATAL_FLAGS) for words in block.flags], dtype=bool)
        # Fatal rows go through as flat continuum so every batch has the same rows as the input: DEBUG results
        # then equal anna-test's exactly.  Their outputs are discarded.  The network reads float32.
        flux = np.asarray(block.flux, dtype=np.float32)
        if not usable.all():
            flux = np.where(usable[:, None], flux, np.float32(1.0))
        scorer = self.domain_scorer if usable.any() else None
        # the domain statistics in their own thread while the network predicts: +15 % spectra/s (benchmarks/)
        scored = flux if usable.all() else flux[usable]  # no copy of a block without fatal rows
        scoring = (self.domain_pool.submit(scorer.outside, scored)
                   if scorer is not None and self.domain_pool is not None else None)
        # the variance head reads a file's own noise where it has one (survey files with errors), else DER_SNR
        noise = None
        if self.with_noise:
            noise = np.full(len(flux), np.nan) if block.noise is None else np.asarray(block.noise, dtype=np.float64)
        labels, sigmas = self.model.predict_labels(flux, self.batch_size, self.mc_samples, noise=noise)
        for values in [labels, *(sigmas or {}).values()]:
            values[~usable] = np.nan
        names = self.model.output_names
        if self.correction is not None:
            if sigmas is not None:
                slopes = correction_slopes(self.correction, labels, names)
                sigmas = {key: values * slopes if key != "noise" else values for key, values in sigmas.items()}
            labels, outside = apply_correction(self.correction, labels, names)
            for row in np.flatnonzero(outside & usable):
                block.flags[row].add("correction_extrapolated")
        scaler = self.model.scaler
        low = scaler.minimum - self.range_margin * scaler.span
        high = scaler.maximum + self.range_margin * scaler.span
        outside_range = ((labels < low) | (labels > high)).any(axis=1)
        for row in np.flatnonzero(outside_range & usable):
            block.flags[row].add("out_of_range")
        if sigmas is not None and self.max_rel_sigma is not None:
            large = (sigmas["sigma_total"] > self.max_rel_sigma * scaler.span).any(axis=1)
            for row in np.flatnonzero(large & usable):
                block.flags[row].add("large_sigma")
        if scorer is not None:
            outside = scoring.result() if scoring is not None else scorer.outside(scored)
            for row in np.flatnonzero(usable)[outside]:
                block.flags[row].add("outside_training_domain")
        for word in self.missing_flags:
            for row in np.flatnonzero(usable):
                block.flags[row].add(word)
        if block.bad_fraction is not None and self.max_bad_pixel_fraction is not None:
            for row in np.flatnonzero(usable & (np.asarray(block.bad_fraction) > self.max_bad_pixel_fraction)):
                block.flags[row].add("many_bad_pixels")
        return labels, sigmas


def output_header(names, meta_columns, with_errors, with_noise=False):
    """Header of an ``_infer.out``: star_id, meta columns, values, [error columns, [noise columns,]]
    bad_pixel_fraction, flags."""
    errors = [f"{name}{suffix}" for suffix, _ in ERROR_COLUMNS for name in names] if with_errors else []
    return ["star_id", *meta_columns, *names, *errors, *(NOISE_COLUMNS if with_noise else ()), BAD_FRACTION_COLUMN,
            "flags"]


def format_flags(words):
    return "|".join(word for word in FLAG_ORDER if word in words)


def write_output(output, blocks, predictor, report, label):
    """Predict every block as it comes and write the CSV atomically; returns (spectra, flagged-fatal,
    flagged-any).  For one long input (a DEBUG pack), read block by block so memory stays bounded."""
    last_progress = time.monotonic()
    # While block k is written (Python, one core), block k+1 is already being predicted in a worker thread
    # (TensorFlow and most numpy calls release the interpreter lock), so both cores stay busy.
    with _OutputTable(output, predictor) as table, ThreadPoolExecutor(1) as worker:
        previous = None
        for block in itertools.chain(blocks, [None]):
            current = None if block is None else (block, worker.submit(predictor.predict, block))
            if previous is not None:
                table.write_block(previous[0], *previous[1].result())
            previous = current
            if time.monotonic() - last_progress > PROGRESS_SECONDS:
                report(f"  {label}: {table.counts[0]} spectra so far")
                last_progress = time.monotonic()
    return table.counts


class _OutputTable:
    """One ``_infer.out`` being written (atomically): header from the first block, one row per spectrum."""

    def __init__(self, output, predictor):
        self.output = output
        self.names = predictor.model.output_names
        self.with_errors = predictor.with_errors
        self.with_noise = predictor.with_noise
        self.counts = (0, 0, 0)

    @classmethod
    def rows_only(cls, predictor, stream):
        """A table that writes its rows, without the header, to an open text ``stream`` (a part of an output
        another process assembles: anna.infer_dask); not a context manager."""
        table = cls(None, predictor)
        table._handle = stream
        table._writer = csv.writer(stream, lineterminator="\n")
        table._header_written = True
        return table

    def __enter__(self):
        self._atomic = atomic_output(self.output, "w", newline="", encoding="utf-8")
        self._handle = self._atomic.__enter__()
        self._writer = csv.writer(self._handle, lineterminator="\n")
        self._header_written = False
        return self

    def write_block(self, block, labels, sigmas):
        if not self._header_written:
            self._writer.writerow(output_header(self.names, block.meta_columns, self.with_errors, self.with_noise))
            self._header_written = True
        spectra, fatal, flagged = self.counts
        values = value_texts(labels, *([sigmas[key] for _, key in ERROR_COLUMNS] if sigmas is not None else []))
        if self.with_noise:
            sources = ["DER_SNR"] * len(values) if block.noise is None else [
                "errors" if from_file else "DER_SNR" for from_file in np.isfinite(block.noise).tolist()]
            values = [f"{row},{noise!r},{source}" for row, noise, source in
                      zip(values, np.asarray(sigmas["noise"], dtype=np.float64).tolist(), sources)]
        fractions = ([""] * len(values) if block.bad_fraction is None else  # NaN (value != value): not known
                     ["" if value != value else f"{value:.4f}"
                      for value in np.asarray(block.bad_fraction, dtype=np.float64).tolist()])
        leading = csv_rows([(str(star_id), *map(str, meta)) for star_id, meta in zip(block.star_ids, block.meta)])
        flag_texts = {}  # a block's rows share few flag sets: each set's text is made once
        lines = []
        for first, row_values, fraction, words in zip(leading, values, fractions, block.flags):
            if words:
                key = frozenset(words)
                if key not in flag_texts:
                    flag_texts[key] = format_flags(words)
                lines.append(f"{first},{row_values},{fraction},{flag_texts[key]}\n")
                fatal, flagged = fatal + bool(words & FATAL_FLAGS), flagged + 1
            else:
                lines.append(f"{first},{row_values},{fraction},\n")
        self._handle.write("".join(lines))
        self.counts = (spectra + len(block.star_ids), fatal, flagged)

    def __exit__(self, *exc):
        if exc[0] is None and not self._header_written:
            self._writer.writerow(output_header(self.names, (), self.with_errors, self.with_noise))
        return self._atomic.__exit__(*exc)


def merge_blocks(blocks):
    """One GridBlock holding the rows of ``blocks`` in order.  The flag sets are the blocks' own objects, so
    flags the predictor adds to the merged block land in the original blocks."""
    return GridBlock(star_ids=[star for block in blocks for star in block.star_ids],
                     meta=[meta for block in blocks for meta in block.meta],
                     flux=np.concatenate([block.flux for block in blocks]),
                     flags=[words for block in blocks for words in block.flags],
                     bad_fraction=np.concatenate([np.full(len(block.star_ids), np.nan) if block.bad_fraction is None
                                                  else block.bad_fraction for block in blocks]),
                     noise=(None if all(block.noise is None for block in blocks) else np.concatenate(
                         [np.full(len(block.star_ids), np.nan) if block.noise is None else block.noise
                          for block in blocks])))


class _FileBatcher:
    """Many small inputs (multispec files of ~100 apertures, single text spectra) predicted together.

    The network handles a batch of thousands of spectra at several times the rate per spectrum of a batch
    of a hundred, so inputs are read until INFER_BATCH_SIZE spectra are waiting, those are predicted in one
    call, and then each input's output is written.  Outputs stay one per input and identical to predicting
    each file alone, to float32 rounding (a spectrum's result does not depend on its batch-mates).  The
    prediction runs in a worker thread while the next files are read, so reading and the network overlap.
    Use as a context manager: leaving it writes what is still waiting.
    """

    def __init__(self, predictor, report):
        self.predictor = predictor
        self.report = report
        self.pending = []  # (label, output, blocks, started)
        self.waiting = 0
        self.in_flight = None  # (pending list, future of predictor.predict) being predicted
        self.written = []

    def __enter__(self):
        self._worker = ThreadPoolExecutor(1)
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.flush()
                self._write_in_flight()
        finally:
            self._worker.shutdown()

    def add(self, label, output, blocks, started):
        self.pending.append((label, output, blocks, started))
        self.waiting += sum(len(block.star_ids) for block in blocks)
        if self.waiting >= self.predictor.batch_size:
            self.flush()

    def flush(self):
        """Start predicting what is waiting (after writing the previous batch's outputs)."""
        self._write_in_flight()
        if not self.pending:
            return
        blocks = [block for _, _, file_blocks, _ in self.pending for block in file_blocks]
        future = (self._worker.submit(self.predictor.predict, merge_blocks(blocks))
                  if any(block.star_ids for block in blocks) else None)
        self.in_flight = (self.pending, future)
        self.pending, self.waiting = [], 0

    def _write_in_flight(self):
        if self.in_flight is None:
            return
        pending, future = self.in_flight
        self.in_flight = None
        labels, sigmas = future.result() if future is not None else (None, None)
        offset = 0
        for label, output, file_blocks, started in pending:
            with _OutputTable(output, self.predictor) as table:
                for block in file_blocks:
                    rows = slice(offset, offset + len(block.star_ids))
                    offset = rows.stop
                    table.write_block(block, labels[rows],
                                      None if sigmas is None else {key: v[rows] for key, v in sigmas.items()})
            self.written.append(output)
            _report_written(self.report, label, table.counts, output, started)


def _report_written(report, label, counts, output, started):
    """The line anna-infer prints for each finished output (with a progress display: counted, shown if verbose)."""
    spectra, fatal, flagged = counts
    count_done(report, spectra, f"{label}: {spectra} spectra, {fatal} without result, {flagged} flagged -> "
                                f"{output} ({time.monotonic() - started:.1f} s)")


def _has_error_columns(output):
    """Whether an existing output has uncertainty columns (a rerun with another UNCERTAINTY redoes it)."""
    with open(output, encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    return any(column.endswith(ERROR_COLUMNS[0][0]) for column in header)


# ----------------------------------------------------------------------------------------------------------
# anna-infer


def run_infer(cfg, report=print):
    """anna-infer: write one ``<stem>_infer.out`` per input under INFER_SAVE_LOC; return the paths written.

    ``cfg`` is the resolved parameter file (anna.params.Config), already checked by
    ``validate_for_stage(cfg, "infer")`` (the stage does not check its keys again); ``report`` receives progress
    lines.
    """
    model = load_frozen(cfg.infer_model_loc, dropout_seed=cfg.seed or 0)
    mc_samples = mc_samples_for(cfg, model, report)
    if cfg.wave_template:
        from anna.templates import read_wavelength_template

        check_same_grid(read_wavelength_template(cfg.wave_template), model.wavelengths, what="WAVE_TEMPLATE",
                        path=cfg.wave_template, key="WAVE_TEMPLATE")
    dependencies = [resolve_model_path(cfg.infer_model_loc)]
    correction = None
    if cfg.apply_correction:
        correction = load_correction(cfg.infer_model_loc, model.output_names, source=cfg.source)
        dependencies.append(correction_location(cfg.infer_model_loc))
    _check_continuum(cfg, model)
    planned = [(path, reader, output_path(cfg.infer_save_loc, path)) for path, reader in list_inputs(cfg)]
    _check_distinct_outputs(cfg, [(path, output) for path, _, output in planned])
    todo = [item for item in planned if not (_is_done(item[2], [item[0], *dependencies])
                                             and _has_error_columns(item[2]) == (mc_samples is not None))]
    skipped = len(planned) - len(todo)
    report(f"anna-infer ({cfg.infer_mode}): {len(planned)} input(s), skipped {skipped} done, {len(todo)} to do"
           + (", correction applied" if correction is not None else "")
           + (f", MC-dropout uncertainties from {mc_samples} passes" if mc_samples else ""))
    for notice in model.missing_parts(mc_samples).values():
        report(f"note: {notice} (every star is flagged so; anna-train --finish with the model's parameter file "
               "completes the model)")
    os.makedirs(cfg.infer_save_loc, exist_ok=True)
    if not todo:
        return []
    plan = model.plan_batches(cfg.infer_batch_size, cfg.max_memory_gb, mc_samples, key="INFER_BATCH_SIZE")
    report(plan.text)
    if mc_samples is None:  # MC dropout runs its own sampled graph
        report(model.choose_forward_form(cfg.jit_compile, plan.batch, report))
    announce_total(report, len(todo))
    if cfg.infer_scheduler:  # the same work on a Dask cluster's workers (anna.infer_dask)
        from anna.infer_dask import infer_on_cluster

        written = infer_on_cluster(cfg, model, todo, len(planned), plan.batch, mc_samples, correction,
                                   dependencies, report)
    else:
        with ThreadPoolExecutor(1) as domain_pool:
            predictor = Predictor(model, plan.batch, float(cfg.range_margin), correction, mc_samples,
                                  cfg.max_rel_sigma, domain_pool, max_bad_pixel_fraction=cfg.max_bad_pixel_fraction)
            written = _infer_inputs(cfg, model, predictor, todo, len(planned), report)
    if cfg.infer_plots:
        from anna.plots import write_infer_histograms

        outputs = [output for _, _, output in planned]  # this run's and those done before
        report("label histograms in " + write_infer_histograms(outputs, model.output_names, model.scaler.minimum,
                                                               model.scaler.maximum, cfg.infer_save_loc))
    return written


def _check_continuum(cfg, model):
    """CONTINUUM in anna-infer's parameter file may only repeat what the model recorded (NONE: follow the model)."""
    recorded = (model.metadata.get("continuum") or {}).get("method", "NONE")
    if cfg.continuum != "NONE" and cfg.continuum != recorded:
        raise cfg.error("CONTINUUM", f"the model was trained with CONTINUUM {recorded}; anna-infer applies what "
                                     "training used (leave CONTINUUM out, or set it to that)")


def _infer_inputs(cfg, model, predictor, todo, n_planned, report):
    """run_infer's work once the model and predictor are ready: predict and write each input still to do."""
    failures = []
    if cfg.infer_mode == "DEBUG":  # one pack, possibly huge: streamed block by block
        written = []
        for number, (path, reader, output) in enumerate(todo, start=1):
            started = time.monotonic()
            label = f"[{number}/{len(todo)}] {path}"
            counts = write_output(output, reader(path, model, predictor.batch_size), predictor, report, label)
            written.append(output)
            _report_written(report, label, counts, output, started)
        return written
    with _FileBatcher(predictor, report) as batcher:
        for number, (path, reader, output) in enumerate(todo, start=1):
            started = time.monotonic()
            label = f"[{number}/{len(todo)}] {path}"
            try:
                blocks = list(reader(path, model))
            except AnnaInputError as error:
                if n_planned == 1:
                    raise
                failures.append(error)
                report(f"{label}: FAILED: {error}")
                continue
            batcher.add(label, output, blocks, started)
    written = batcher.written
    if failures:
        raise AnnaInputError(f"{len(failures)} of {len(todo)} inputs could not be read (the other outputs were "
                             f"written); first: {failures[0]}", path=cfg.source, key="INFER_FILES")
    return written
