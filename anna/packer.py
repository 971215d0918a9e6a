"""anna-pack: a training pack from real spectra — a folder of spectrum files (text or FITS, one spectrum each)
and a CSV of their labels, resampled onto one wavelength grid and written in ANNA's pack format.

Survey files (LAMOST, SDSS/BOSS, APOGEE: :mod:`anna.survey`) are prepared exactly as anna-infer prepares them
(:mod:`anna.survey.prepare`: continuum normalisation, bad pixels set to the neutral value on the file's pixels
and on the grid), and matched to their labels by the survey's object id as well as by file name; labels may
then come from a FITS table (an APOGEE allStar-like catalogue) instead of a CSV.  The pack does not record the
continuum method: train with the same CONTINUUM and BAD_PIXEL_FILL that the pack was built with, so the frozen
model records them and anna-infer applies them.
"""

import csv
import math
import os

import numpy as np

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.packs import write_pack
from anna.progress import announce_total, count_done
from anna.resample import cubic_resample
from anna.spectra import looks_like_fits, spectrum_stem
from anna.templates import read_two_columns


LARGEST_EXACT_ID = 2 ** 53
"""Integers up to this size survive as float64 pack ids; larger ones (e.g. Gaia source_id) do not."""


def _read_one_spectrum(path):
    """(wavelength, flux) of the single spectrum in a text or FITS file, sorted by wavelength."""
    if looks_like_fits(path):
        from anna.fits_io import read_spectra

        spectra = read_spectra(path)
        if len(spectra) != 1:
            raise AnnaInputError(f"file holds {len(spectra)} spectra; a pack row needs exactly one spectrum per "
                                 "file (split multispec files with anna-spectra --text first)", path=path)
        wave = np.asarray(spectra[0].wavelength, dtype=np.float64)
        flux = np.asarray(spectra[0].flux, dtype=np.float64)
        good = np.isfinite(wave) & np.isfinite(flux)
        wave, flux = wave[good], flux[good]
    else:
        wave, flux = read_two_columns(path, "spectrum", ascending=False)
    order = np.argsort(wave, kind="stable")
    wave, flux = wave[order], flux[order]
    if wave.size < 2 or (np.diff(wave) == 0).any():
        raise AnnaInputError("spectrum wavelengths must be distinct (repeated wavelength found)", path=path)
    return wave, flux


def _read_fits_table(path):
    """(column names, rows as (row number, {column: text})) of the first table of a FITS file; array columns
    (spectra, per-element flags) are left out."""
    from astropy.table import Table

    try:
        table = Table.read(path)
    except (OSError, ValueError, TypeError) as exc:
        raise AnnaInputError(f"cannot read labels table: {exc}", path=path) from None
    names = [name for name in table.colnames if table[name].ndim == 1]
    rows = []
    for number, row in enumerate(table, start=1):
        values = {}
        for name in names:
            value = row[name]
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            values[name] = "" if np.ma.is_masked(value) else str(value).strip()
        rows.append((number, values))
    return names, rows


def _read_label_table(labels_csv, id_column, label_columns):
    """Rows of the labels CSV (or FITS table) as (line number, dict); checks that the needed columns exist."""
    if os.path.exists(labels_csv) and looks_like_fits(labels_csv):
        fields, rows = _read_fits_table(labels_csv)
        return _checked_columns(labels_csv, fields, rows, id_column, label_columns)
    try:
        with open(labels_csv, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            fields = [name.strip() for name in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                rows.append((reader.line_num, {key.strip(): (value or "").strip()
                                               for key, value in row.items() if key is not None}))
    except FileNotFoundError:
        raise AnnaInputError("labels CSV does not exist", path=labels_csv) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AnnaInputError(f"cannot read labels CSV: {exc}", path=labels_csv) from None
    if not fields:
        raise AnnaInputError("labels CSV has no header row", path=labels_csv)
    return _checked_columns(labels_csv, fields, rows, id_column, label_columns)


def _checked_columns(labels_csv, fields, rows, id_column, label_columns):
    has_file = "file" in fields
    if not has_file and id_column not in fields:
        raise AnnaInputError(f"labels CSV needs a '{id_column}' column (or a 'file' column) to match spectra to "
                             f"rows; columns are {', '.join(fields)}", path=labels_csv, key=id_column)
    if label_columns is None:
        label_columns = [name for name in fields if name not in (id_column, "file")]
    label_columns = [str(name).strip() for name in label_columns]
    if not label_columns:
        raise AnnaInputError("labels CSV has no label columns besides the id/file columns", path=labels_csv)
    for name in label_columns:
        if name not in fields:
            raise AnnaInputError(f"label column missing; columns are {', '.join(fields)}", path=labels_csv,
                                 key=name)
    return rows, has_file, label_columns


def _numeric_id(text):
    """The id as float64 if it survives exactly, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    stripped = text.lstrip("+-")
    if stripped.isdigit() and int(stripped) > LARGEST_EXACT_ID:
        return None
    return value


def _survey_spectrum(path, spectrum_name):
    """The one spectrum of a survey file that a pack row takes (``spectrum_name``, else the file's only or first
    combined spectrum), or None for a file no survey format recognises."""
    from anna.survey import read_survey_file
    from anna.survey.registry import identify_file

    if not looks_like_fits(path) or identify_file(path) is None:
        return None
    _, spectra = read_survey_file(path)
    names = [spectrum.name for spectrum in spectra]
    if spectrum_name is not None:
        if spectrum_name not in names:
            raise AnnaInputError(f"no spectrum named {spectrum_name!r}; the file holds {', '.join(names)}",
                                 path=path, key="--spectrum")
        return spectra[names.index(spectrum_name)]
    combined = [spectrum for spectrum in spectra if spectrum.name.startswith("combined")]
    if len(spectra) == 1 or combined:
        return (combined or spectra)[0]
    raise AnnaInputError(f"file holds {len(spectra)} spectra ({', '.join(names)}); choose one with --spectrum",
                         path=path)


def _survey_onto_grid(path, spectrum, grid, continuum, fill):
    """A survey spectrum prepared as anna-infer does, on ``grid``; refuses one that does not cover it."""
    from anna.badpixels import bad_on_grid, fill_bad
    from anna.survey.prepare import prepare_spectrum

    wave, flux, bad, _, _ = prepare_spectrum(spectrum, continuum=continuum, fill=fill)
    tolerance = 1e-9 * float(grid[-1])
    if wave[0] > grid[0] + tolerance or wave[-1] < grid[-1] - tolerance:
        raise AnnaInputError(f"spectrum {spectrum.name} covers {wave[0]:.3f}-{wave[-1]:.3f} A but the grid needs "
                             f"{grid[0]:.3f}-{grid[-1]:.3f} A; spectra are never extrapolated", path=path)
    return fill_bad(cubic_resample(wave, flux, grid), bad_on_grid(wave, bad, grid), fill)


def build_pack_from_spectra(spectra_paths, labels_csv, grid, out_path, *, id_column="star_id",
                            label_columns=None, continuum=None, fill="INTERPOLATE", spectrum_name=None,
                            report=None):
    """Build a training pack from spectrum files and a CSV of labels (``anna-pack``); returns ``out_path``.

    ``spectra_paths``: files, each holding ONE spectrum: two-column text (wavelength in Angstrom, flux;
    whitespace or comma separated, ``#`` comments) or FITS (``.fits``/``.fit``/``.fts``, optionally ``.gz``,
    read with :func:`anna.fits_io.read_spectra`).  ``labels_csv``: a header row, then one row per spectrum.
    A spectrum is matched to its row by the CSV's ``file`` column when there is one (equal to the file's
    path as given, its name, or its stem, i.e. the name without suffix), otherwise by its stem equal to the
    ``id_column`` value.  ``label_columns``: the label columns in pack order (default: every column but
    ``id_column`` and ``file``, in CSV order); an empty cell or ``nan`` is a missing label (NaN).
    ``grid`` (npix,): wavelengths of the pack; each spectrum is resampled onto it by local cubic interpolation
    (:func:`anna.resample.cubic_resample`, which keeps line depths) and must cover it (no extrapolation).
    Survey files (:mod:`anna.survey`): one spectrum each (``spectrum_name``, else the only or first combined one),
    also matched by the survey's object id, prepared with ``continuum`` (settings of
    :func:`anna.continuum.continuum_settings`, None: none) and bad pixels set by ``fill``; ``labels_csv`` may then
    be a FITS table.  Pack ids: the ``id_column`` values when all are numbers that float64 holds
    exactly; otherwise 1..n in the order of ``spectra_paths``, with ``<out_path>.ids.csv`` mapping each
    pack id to its file and CSV id.  Problems raise :class:`AnnaInputError` naming the file, line or column.
    ``report``: None, or an :class:`anna.progress.FileProgress` that counts the spectra as they are read.
    """
    spectra_paths = [os.fspath(path) for path in spectra_paths]
    if not spectra_paths:
        raise AnnaInputError("no spectrum files given")
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    if grid.size < 2 or not np.isfinite(grid).all() or not (np.diff(grid) > 0).all():
        raise AnnaInputError("grid must hold at least two finite, strictly ascending wavelengths", key="grid")
    labels_csv = os.fspath(labels_csv)
    rows, has_file, label_columns = _read_label_table(labels_csv, id_column, label_columns)

    index = {}
    for line, row in rows:
        key = row.get("file") if has_file else row.get(id_column)
        if not key:
            raise AnnaInputError("row has an empty matching value", path=labels_csv, line=line,
                                 key="file" if has_file else id_column)
        if key in index:
            raise AnnaInputError(f"duplicate row (also on line {index[key][0]})", path=labels_csv, line=line,
                                 key="file" if has_file else id_column, value=key)
        index[key] = (line, row)

    matched, used = [], {}
    survey = {path: _survey_spectrum(path, spectrum_name) for path in spectra_paths}
    for path in spectra_paths:
        candidates = [path, os.path.basename(path), spectrum_stem(path)] if has_file else [spectrum_stem(path)]
        if survey[path] is not None and survey[path].object_id and not has_file:
            candidates.append(survey[path].object_id)
        hit = next((index[name] for name in candidates if name in index), None)
        if hit is None:
            raise AnnaInputError(f"no row of {labels_csv} matches this spectrum (looked for "
                                 f"{' or '.join(repr(name) for name in dict.fromkeys(candidates))} in column "
                                 f"'{'file' if has_file else id_column}')", path=path)
        if hit[0] in used:
            raise AnnaInputError(f"matches CSV line {hit[0]}, already used by {used[hit[0]]}", path=path)
        used[hit[0]] = path
        matched.append(hit)

    labels = np.empty((len(spectra_paths), len(label_columns)))
    for star, (line, row) in enumerate(matched):
        for column, name in enumerate(label_columns):
            text = row.get(name, "")
            if text == "" or text.lower() == "nan":
                labels[star, column] = np.nan
                continue
            try:
                labels[star, column] = float(text)
            except ValueError:
                raise AnnaInputError("label is not a number", path=labels_csv, line=line, key=name,
                                     value=text) from None
            if not math.isfinite(labels[star, column]):
                raise AnnaInputError("label is infinite", path=labels_csv, line=line, key=name, value=text)

    flux = np.empty((len(spectra_paths), grid.size))
    announce_total(report, len(spectra_paths))
    for star, path in enumerate(spectra_paths):
        if survey[path] is not None:
            flux[star] = _survey_onto_grid(path, survey[path], grid, continuum, fill)
            continue
        wave, values = _read_one_spectrum(path)
        tolerance = 1e-9 * float(grid[-1])
        if wave[0] > grid[0] + tolerance or wave[-1] < grid[-1] - tolerance:
            raise AnnaInputError(f"spectrum covers {wave[0]:.3f}-{wave[-1]:.3f} A but the grid needs "
                                 f"{grid[0]:.3f}-{grid[-1]:.3f} A; spectra are never extrapolated", path=path)
        flux[star] = cubic_resample(wave, values, grid)
        count_done(report, 1)

    id_texts = [row.get(id_column, "") for _, row in matched]
    numeric = [_numeric_id(text) for text in id_texts]
    out_path = os.fspath(out_path)
    if all(value is not None for value in numeric):
        ids = np.asarray(numeric, dtype=np.float64)
        if os.path.exists(out_path + ".ids.csv"):
            os.remove(out_path + ".ids.csv")  # a stale map from an earlier build would now be wrong
    else:
        ids = np.arange(1, len(spectra_paths) + 1, dtype=np.float64)
        with atomic_output(out_path + ".ids.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["pack_id", "file", id_column])
            for number, (path, text) in enumerate(zip(spectra_paths, id_texts), start=1):
                writer.writerow([number, path, text])
    write_pack(out_path, grid, ids, labels, flux)
    return out_path
