"""anna-test: run a frozen model over a pack with known labels and measure how well it does (guide 4.3, 4.3.1).

Outputs, all in TEST_SAVE_LOC and each written atomically (a crash never leaves half a file):

``test_stats.out``
    comma-separated, one star per line.  Header ``star_id,true_<name>...,inferred_<name>...,d<name>...``
    with ``d = true - inferred``, plus a final ``sn`` column when PREPROCESS_TEST noised the spectra.  Ids
    are written exactly (integer form when integral, otherwise the float64 repr); every value is the
    shortest text that reads back as the same float64.
``test_summary.json``
    per label: bias (mean and median of d), scatter (standard deviation with ddof=0, and 1.4826 x the median
    absolute deviation from the median), MAE, RMS and N; the same in S/N quantile bins when noised; the
    residual-trend correction when FIT_CORRECTION is YES.
``<name>_test.png``
    per label, inferred against true beside d against true (also sent to TensorBoard under LOG_LOC/test).

With UNCERTAINTY: MC_DROPOUT (a model whose last training stage used dropout; anything else is refused) the
inferred value is the mean of MC_SAMPLES dropout passes (masks seeded with SEED, 0 when empty) and
``test_stats.out`` gains, before ``sn``, the columns ``<name>_err`` (σ_total), ``<name>_err_model`` and
``<name>_err_pred`` in physical units (see anna.model.FrozenModel.predict_with_uncertainty).  The summary then
has an ``uncertainty`` section, also printed and plotted in ``uncertainty_calibration.png``: per label the
fraction of stars with |d| below 1, 2 and 3 σ_total (68.3, 95.4 and 99.7 % for calibrated Gaussian errors),
the spread of d/σ_total (1 when calibrated), the RMS of d against the median σ_total in σ_total quantile
bins, and, when the spectra were noised, the median σ_total against the measured scatter in S/N bins.
Missing labels (NaN or MAGIC_NUMBER in the pack) are left out of every statistic.

FIT_CORRECTION fits TrueValue = poly(InferredValue) per label (guide 4.3.1) and saves it as
``correction.json`` beside the frozen model, where anna-infer's APPLY_CORRECTION finds it.  The correction
remembers a fingerprint of the model file, so a correction left over from an earlier training run is refused
rather than applied to a different network.

The pack is read in chunks of about one batch with plain reads, so a pack larger than RAM works and memory does
not grow with it; TEST_BATCH_SIZE AUTO (the default) takes the largest batch that keeps the process within
MAX_MEMORY_GB (:mod:`anna.memory`).  With PREPROCESS_TEST each block of TEST_NOISE_BLOCK stars is noised with a
generator keyed by (SEED or 0, block number), so a rerun with the same parameter file reproduces the same
noise whatever the batch size.  Only the true/inferred label table (n_stars x nout) is held in memory.

A model that lacks a part (no training-domain statistics; with MC_DROPOUT, no σ calibration: a model from an
older version, or from a run stopped before they were computed) is announced in one line at start and listed
under ``model_missing_parts`` in ``test_summary.json``.
"""

import csv
import io
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from anna.atomic import atomic_output, jsonable, write_json
from anna.errors import AnnaInputError
from anna.correction import (apply_correction, correction_location, fit_correction, model_fingerprint,
                             save_correction)
from anna.frozen_file import resolve_model_path
from anna.model import ERROR_COLUMNS, load_frozen, mc_samples_for
from anna.packs import count_bad_label_stars, open_pack, refuse_bad_labels
from anna.plots import write_coverage_plot, write_residuals_vs_sn
from anna.progress import announce_total, count_done
from anna.resample import check_same_grid
from anna.tables import format_star_id, value_texts

STATS_FILE = "test_stats.out"
SUMMARY_FILE = "test_summary.json"
# 1.4826 x MAD estimates the standard deviation of a Gaussian, while ignoring outliers.
MAD_TO_SIGMA = 1.4826
SN_BINS = 5
# Coverage levels of the uncertainty report and what calibrated Gaussian errors give (erf(k / sqrt 2)).
COVERAGE_SIGMAS = (1, 2, 3)
COVERAGE_IDEAL = tuple(math.erf(k / math.sqrt(2.0)) for k in COVERAGE_SIGMAS)
SIGMA_BINS = 5
UNCERTAINTY_PLOT = "uncertainty_calibration.png"
# The unit of PREPROCESS_TEST seeding: each block of this many stars is noised with the generator keyed by
# (SEED or 0, block number), whatever the batch size; the pack is read in chunks of whole blocks.
TEST_NOISE_BLOCK = 512
# Plots draw at most this many points (a fixed random subset) so huge test sets still plot quickly.
MAX_PLOT_POINTS = 20000


# ----------------------------------------------------------------------------------------------------------
# Small shared helpers (anna-infer uses these too)


def safe_file_name(name):
    """Label name usable in a file name ('[Fe/H]' -> 'Fe_H')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "label"


# ----------------------------------------------------------------------------------------------------------
# Statistics


def residual_statistics(residuals):
    """Summary of residuals d = true - inferred (n,), NaN entries ignored.

    Returns a dict: ``n``, ``bias_mean``, ``bias_median``, ``std`` (ddof=0), ``mad_std`` (1.4826 x median
    |d - median d|), ``mae`` (mean |d|) and ``rms`` (sqrt of mean d^2); statistics are NaN when n is 0.
    """
    d = np.asarray(residuals, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        nan = float("nan")
        return {"n": 0, "bias_mean": nan, "bias_median": nan, "std": nan, "mad_std": nan, "mae": nan, "rms": nan}
    median = float(np.median(d))
    return {"n": int(d.size), "bias_mean": float(np.mean(d)), "bias_median": median, "std": float(np.std(d)),
            "mad_std": MAD_TO_SIGMA * float(np.median(np.abs(d - median))), "mae": float(np.mean(np.abs(d))),
            "rms": float(np.sqrt(np.mean(d * d)))}


def label_statistics(true, inferred, names):
    """``{name: residual_statistics(true[:, k] - inferred[:, k])}`` for (n, nout) arrays."""
    d = np.asarray(true, dtype=np.float64) - np.asarray(inferred, dtype=np.float64)
    return {name: residual_statistics(d[:, k]) for k, name in enumerate(names)}


def sn_binned_statistics(true, inferred, sn, names, n_bins=SN_BINS):
    """Label statistics in S/N quantile bins: a list of ``{sn_low, sn_high, n, labels}``.

    Bin edges are quantiles of ``sn`` (n,); equal edges (a fixed S/N) merge, so there may be fewer bins.
    The last bin includes its upper edge.
    """
    sn = np.asarray(sn, dtype=np.float64)
    edges = np.unique(np.quantile(sn, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    which = np.clip(np.searchsorted(edges[1:-1], sn, side="right"), 0, edges.size - 2)
    bins = []
    for number in range(edges.size - 1):
        members = which == number
        bins.append({"sn_low": float(edges[number]), "sn_high": float(edges[number + 1]),
                     "n": int(np.count_nonzero(members)),
                     "labels": label_statistics(true[members], inferred[members], names)})
    return bins


# ----------------------------------------------------------------------------------------------------------
# Uncertainty calibration


def coverage_statistics(residuals, sigmas):
    """How well σ describes residuals d (n,) (both physical units); pairs with a NaN d or σ are left out.

    Returns ``n``, ``coverage`` (fraction with |d| < kσ for k in COVERAGE_SIGMAS), ``ideal`` (the Gaussian
    values), ``z_rms`` (root mean square of d/σ: 1 when σ describes the whole error, a common offset of the
    values included), ``z_std`` (standard deviation of d/σ: below 1 for a calibrated σ of values with an
    offset, which it leaves out), ``median_sigma`` and ``scatter`` (std of d) and ``mad_scatter`` (1.4826 × MAD
    of d).
    """
    d = np.asarray(residuals, dtype=np.float64)
    sigma = np.asarray(sigmas, dtype=np.float64)
    keep = np.isfinite(d) & np.isfinite(sigma) & (sigma > 0)
    d, sigma = d[keep], sigma[keep]
    nan = float("nan")
    if d.size == 0:
        return {"n": 0, "coverage": [nan] * len(COVERAGE_SIGMAS), "ideal": list(COVERAGE_IDEAL), "z_rms": nan,
                "z_std": nan, "median_sigma": nan, "scatter": nan, "mad_scatter": nan}
    z = d / sigma
    return {"n": int(d.size), "coverage": [float(np.mean(np.abs(z) < k)) for k in COVERAGE_SIGMAS],
            "ideal": list(COVERAGE_IDEAL), "z_rms": float(np.sqrt(np.mean(z ** 2))), "z_std": float(np.std(z)),
            "median_sigma": float(np.median(sigma)),
            "scatter": float(np.std(d)),
            "mad_scatter": MAD_TO_SIGMA * float(np.median(np.abs(d - np.median(d))))}


def _quantile_bins(values, n_bins):
    """Bin number (n,) of each finite value in quantile bins of ``values``, -1 for NaN; and the edges."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    which = np.full(values.shape, -1)
    if not finite.any():
        return which, np.array([])
    edges = np.unique(np.quantile(values[finite], np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    which[finite] = np.clip(np.searchsorted(edges[1:-1], values[finite], side="right"), 0, edges.size - 2)
    return which, edges


def uncertainty_report(true, inferred, sigmas, names, sn=None, n_bins=SIGMA_BINS):
    """Calibration of the MC-dropout uncertainties against the test residuals d = true − inferred.

    ``true``, ``inferred`` (n, nout) and ``sigmas`` (dict of (n, nout): sigma_total, sigma_model, sigma_pred)
    in physical units; ``sn`` (n,) when the test spectra were noised.  Missing labels (NaN) are left out.
    Per label: :func:`coverage_statistics` of σ_total, the medians of σ_model and σ_pred, ``sigma_bins``
    (σ_total quantile bins: median σ_total and RMS of d, equal when calibrated) and, with ``sn``,
    ``sn_bins`` (S/N quantile bins: median σ_total against the measured scatter, and the coverage).
    """
    d = np.asarray(true, dtype=np.float64) - np.asarray(inferred, dtype=np.float64)
    total = np.asarray(sigmas["sigma_total"], dtype=np.float64)
    labels = {}
    for k, name in enumerate(names):
        entry = coverage_statistics(d[:, k], total[:, k])
        present = np.isfinite(d[:, k])
        for key in ("sigma_model", "sigma_pred"):
            column = np.asarray(sigmas[key][:, k], dtype=np.float64)[present]
            entry[f"median_{key}"] = float(np.median(column)) if column.size else float("nan")
        which, _ = _quantile_bins(np.where(present, total[:, k], np.nan), n_bins)
        entry["sigma_bins"] = []
        for number in range(which.max() + 1):
            members = which == number
            entry["sigma_bins"].append({"n": int(members.sum()),
                                        "median_sigma": float(np.median(total[members, k])),
                                        "rms_d": float(np.sqrt(np.mean(d[members, k] ** 2)))})
        if sn is not None:
            which, edges = _quantile_bins(sn, n_bins)
            entry["sn_bins"] = []
            for number in range(edges.size - 1):
                members = (which == number) & present
                stats = coverage_statistics(d[members, k], total[members, k])
                entry["sn_bins"].append({"sn_low": float(edges[number]), "sn_high": float(edges[number + 1]),
                                         "n": stats["n"], "median_sigma": stats["median_sigma"],
                                         "scatter": stats["scatter"], "mad_scatter": stats["mad_scatter"],
                                         "coverage_1sigma": stats["coverage"][0]})
        labels[name] = entry
    return {"labels": labels, "coverage_sigmas": list(COVERAGE_SIGMAS), "ideal": list(COVERAGE_IDEAL)}


def format_uncertainty_report(report):
    """Text table of :func:`uncertainty_report`: coverage per label, then σ against scatter per S/N bin."""
    names = list(report["labels"])
    width = max([len(name) for name in names] + [5])
    ideal = " / ".join(f"{100 * value:.1f}" for value in report["ideal"])
    lines = [f"uncertainty calibration: % of stars with |d| < 1 / 2 / 3 sigma_total (ideal {ideal})",
             f"{'label':<{width}} {'n':>7} {'<1s %':>7} {'<2s %':>7} {'<3s %':>7} {'rms(d/s)':>9} {'std(d/s)':>9} "
             f"{'med sig':>10} {'med mod':>10} {'med pred':>10} {'scatter':>10}"]
    for name, entry in report["labels"].items():
        cover = " ".join(f"{100 * value:7.1f}" for value in entry["coverage"])
        lines.append(f"{name:<{width}} {entry['n']:7d} {cover} {entry['z_rms']:9.3g} {entry['z_std']:9.3g} "
                     f"{entry['median_sigma']:10.4g} "
                     f"{entry['median_sigma_model']:10.4g} {entry['median_sigma_pred']:10.4g} "
                     f"{entry['scatter']:10.4g}")
    for name, entry in report["labels"].items():
        if "sn_bins" not in entry:
            continue
        lines.append(f"{name}: median sigma_total vs measured scatter (std, 1.4826 MAD) by S/N")
        for bin_ in entry["sn_bins"]:
            lines.append(f"  S/N {bin_['sn_low']:7.1f}-{bin_['sn_high']:<7.1f} n={bin_['n']:<6d} sigma "
                         f"{bin_['median_sigma']:.4g}  scatter {bin_['scatter']:.4g} ({bin_['mad_scatter']:.4g})  "
                         f"<1 sigma {100 * bin_['coverage_1sigma']:.1f} %")
    return "\n".join(lines)


def write_uncertainty_plot(true, inferred, sigma_total, names, report, folder):
    """``uncertainty_calibration.png``: per label (one row) the histogram of d/σ_total with the unit Gaussian,
    RMS of d against median σ_total in σ bins (on the diagonal when calibrated) and, when the test was
    noised, median σ_total and the measured scatter against S/N.  Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    d = np.asarray(true, dtype=np.float64) - np.asarray(inferred, dtype=np.float64)
    with_sn = any("sn_bins" in entry for entry in report["labels"].values())
    columns = 3 if with_sn else 2
    figure = Figure(figsize=(4.2 * columns, 3.2 * len(names)), dpi=80)
    axes = np.atleast_2d(figure.subplots(len(names), columns, squeeze=False))
    gauss = np.linspace(-4, 4, 200)
    for k, name in enumerate(names):
        entry = report["labels"][name]
        keep = np.isfinite(d[:, k]) & np.isfinite(sigma_total[:, k]) & (sigma_total[:, k] > 0)
        z = d[keep, k] / sigma_total[keep, k]
        histogram = axes[k, 0]
        histogram.hist(np.clip(z, -5, 5), bins=40, range=(-5, 5), density=True, alpha=0.6)
        histogram.plot(gauss, np.exp(-0.5 * gauss**2) / np.sqrt(2 * np.pi), color="k", lw=1)
        cover = ", ".join(f"{100 * value:.0f}%" for value in entry["coverage"])
        histogram.set_title(f"{name}: |d|<1,2,3 sigma: {cover}", fontsize=9)
        histogram.set_xlabel("(true - inferred) / sigma_total")
        reliability = axes[k, 1]
        bins = entry["sigma_bins"]
        x = [b["median_sigma"] for b in bins]
        y = [b["rms_d"] for b in bins]
        reliability.plot(x, y, "o-")
        top = max(x + y) if bins else 1.0
        reliability.plot([0, top], [0, top], color="k", lw=1)
        reliability.set_xlabel(f"median sigma_total ({name})")
        reliability.set_ylabel("RMS of true - inferred")
        if with_sn:
            panel = axes[k, 2]
            sn_bins = entry.get("sn_bins", [])
            centre = [0.5 * (b["sn_low"] + b["sn_high"]) for b in sn_bins]
            panel.plot(centre, [b["median_sigma"] for b in sn_bins], "o-", label="median sigma_total")
            panel.plot(centre, [b["scatter"] for b in sn_bins], "s--", label="measured scatter")
            panel.set_xlabel("S/N")
            panel.set_ylabel(name)
            panel.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = os.path.join(folder, UNCERTAINTY_PLOT)
    with atomic_output(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------------
# anna-test


def run_test(cfg, report=print):
    """anna-test: predict the labels of TESTING_DATA, write residuals, statistics, plots; return the summary.

    ``cfg`` is the resolved parameter file (see anna.params), already checked by ``validate_for_stage(cfg, "test")``
    (the stage does not check its keys again); ``report`` receives human-readable lines.
    The returned dict is what ``test_summary.json`` holds.
    """
    started = time.monotonic()
    model = load_frozen(cfg.test_model_loc, dropout_seed=getattr(cfg, "seed", None) or 0)
    mc_samples = mc_samples_for(cfg, model, report)
    missing = model.missing_parts(mc_samples)
    for notice in missing.values():
        report(f"note: {notice} (recorded in {SUMMARY_FILE}; anna-train --finish with the model's parameter file "
               "completes the model)")
    plan = model.plan_batches(cfg.test_batch_size, cfg.max_memory_gb, mc_samples, key="TEST_BATCH_SIZE")
    report(plan.text)
    if mc_samples is None:  # MC dropout runs its own sampled graph
        report(model.choose_forward_form(cfg.jit_compile, plan.batch, report))
    pack = _open_test_pack(cfg, model)
    names = model.output_names
    rel_sn = _relative_sn(cfg, model) if cfg.preprocess_test else None
    os.makedirs(cfg.test_save_loc, exist_ok=True)
    stats_path = os.path.join(cfg.test_save_loc, STATS_FILE)
    report(f"anna-test: {pack.n_stars} stars from {pack.path}, model {resolve_model_path(cfg.test_model_loc)}"
           + (", noised with PREPROCESS_TEST" if rel_sn is not None else "")
           + (f", MC-dropout uncertainties from {mc_samples} passes" if mc_samples else ""))
    # the CSV is streamed to a hidden staging file and renamed only when every later step has succeeded, so a
    # failure (e.g. a correction that cannot be fitted) leaves no partial set of results
    staging = os.path.join(cfg.test_save_loc, f".{STATS_FILE}.pending")
    try:
        summary = _test_and_summarise(cfg, model, pack, rel_sn, mc_samples, names, staging, stats_path, report,
                                      started, plan.batch, missing)
        os.replace(staging, stats_path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    report(f"wrote {stats_path}, {summary['files']['summary']} and {len(summary['files']['plots'])} plots")
    return summary


def _test_and_summarise(cfg, model, pack, rel_sn, mc_samples, names, staging, stats_path, report, started,
                        batch_size, missing):
    true, inferred, sn, sigmas = _predict_and_write(cfg, model, pack, rel_sn, staging, batch_size, mc_samples,
                                                    report)

    summary = {"model": resolve_model_path(cfg.test_model_loc), "testing_data": pack.path,
               "n_stars": pack.n_stars, "preprocess_test": bool(cfg.preprocess_test),
               "seed": cfg.seed, "model_missing_parts": missing, "batch_size": batch_size,
               "labels": label_statistics(true, inferred, names),
               "files": {"test_stats": stats_path}}
    report(format_statistics_table(summary["labels"]))
    if sn is not None:
        summary["sn_range_test"] = list(cfg.sn_range_test)
        summary["rel_cont_e_test"] = list(cfg.rel_cont_e_test)
        summary["sn_bins"] = sn_binned_statistics(true, inferred, sn, names)
        for entry in summary["sn_bins"]:
            report(f"S/N {entry['sn_low']:.1f}-{entry['sn_high']:.1f} ({entry['n']} stars):")
            report(format_statistics_table(entry["labels"]))
    if sigmas is not None:
        summary["uncertainty"] = uncertainty_report(true, inferred, sigmas, names, sn)
        summary["uncertainty"]["mc_samples"] = mc_samples
        report(format_uncertainty_report(summary["uncertainty"]))
    if cfg.fit_correction:
        summary["correction"] = _fit_and_save_correction(cfg, true, inferred, names, pack, report)
        summary["files"]["correction"] = summary["correction"]["path"]
    summary["files"]["plots"] = write_plots(true, inferred, names, cfg.test_save_loc, getattr(cfg, "log_loc", None))
    if sigmas is not None:
        summary["files"]["plots"].append(write_uncertainty_plot(true, inferred, sigmas["sigma_total"], names,
                                                                summary["uncertainty"], cfg.test_save_loc))
        summary["files"]["plots"].append(write_coverage_plot(true, inferred, sigmas["sigma_total"], names,
                                                             cfg.test_save_loc))
    if sn is not None:
        summary["files"]["plots"].append(write_residuals_vs_sn(true, inferred, sn, names, cfg.test_save_loc))
    summary_path = os.path.join(cfg.test_save_loc, SUMMARY_FILE)
    summary["files"]["summary"] = summary_path
    summary["seconds"] = time.monotonic() - started
    summary = jsonable(summary)
    write_json(summary_path, summary)
    return summary


def _open_test_pack(cfg, model):
    # the labels are checked as the pack is streamed (_predict_and_write), not by a pass of their own: at
    # survey size that pass read the whole pack once more before the first spectrum was predicted
    pack = open_pack(cfg.testing_data, check_labels=False)
    if pack.nout != model.nout:
        raise AnnaInputError(f"pack has {pack.nout} labels per star but the model predicts {model.nout} "
                             f"({', '.join(model.output_names)})", path=pack.path, key="TESTING_DATA")
    check_same_grid(pack.wavelengths, model.wavelengths, what="the testing pack", path=pack.path,
                    key="TESTING_DATA")
    return pack


def _relative_sn(cfg, model):
    from anna.templates import relative_sn_on_grid

    return relative_sn_on_grid(cfg.sn_template_test, model.wavelengths)


def _chunk_stars(batch_size):
    """Stars per pack chunk: about one batch, a whole number (at least one) of TEST_NOISE_BLOCK blocks."""
    return TEST_NOISE_BLOCK * max(1, int(batch_size) // TEST_NOISE_BLOCK)


def _predict_and_write(cfg, model, pack, rel_sn, stats_path, batch_size, mc_samples=None, report=None):
    """Stream the pack through the model, writing test_stats.out.

    Returns (true, inferred, sn or None, sigmas or None); ``sigmas`` maps sigma_total/sigma_model/sigma_pred
    to (n, nout) arrays (physical units) when ``mc_samples`` asks for MC dropout.  The pack is read with plain
    reads in chunks of about ``batch_size`` stars (:meth:`anna.packs.Pack.read_rows`), so memory does not grow
    with the pack; with PREPROCESS_TEST each TEST_NOISE_BLOCK stars are noised with their own generator, so
    the noise does not depend on the batch size.
    """
    from anna.augment import noisy_copy

    names = model.output_names
    n = pack.n_stars
    true = np.empty((n, model.nout))
    inferred = np.empty((n, model.nout))
    sn = np.empty(n) if rel_sn is not None else None
    sigmas = None if mc_samples is None else {key: np.empty((n, model.nout)) for _, key in ERROR_COLUMNS}
    missing_value = getattr(cfg, "magic_number", None)
    bad_flux_stars = 0
    header = (["star_id"] + [f"true_{name}" for name in names] + [f"inferred_{name}" for name in names]
              + [f"d{name}" for name in names]
              + ([f"{name}{suffix}" for suffix, _ in ERROR_COLUMNS for name in names] if sigmas else [])
              + (["sn"] if sn is not None else []))
    # Without noise the network's own precision is read (float32: half the bytes to convert and hold, and the
    # same values the network would get); noising works in float64.  Block k is predicted in a worker thread
    # while block k + 1 is read (and noised) and block k - 1's rows are written: TensorFlow and most numpy
    # calls release the interpreter lock, so both cores stay busy, as in anna-infer (benchmarks/, anna-test row).
    flux_dtype = np.float64 if sn is not None else np.float32

    def predict(start, stop, ids, flux):
        return start, stop, ids, model.predict_labels(flux, batch_size, mc_samples)

    def write(start, stop, ids, predicted):
        inferred[start:stop], chunk = predicted
        chunk_sigmas = None
        if chunk is not None:
            for key in sigmas:
                sigmas[key][start:stop] = chunk[key]
            chunk_sigmas = [chunk[key] for _, key in ERROR_COLUMNS]
        _write_rows(handle, ids, true[start:stop], inferred[start:stop], None if sn is None else sn[start:stop],
                    chunk_sigmas)
        count_done(report, stop - start)

    with atomic_output(stats_path, "w", newline="", encoding="utf-8") as handle, ThreadPoolExecutor(1) as worker:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        announce_total(report, n)  # a progress display (anna.progress) counts the spectra
        pending = None
        bad_inf, bad_nan = 0, 0  # stars with infinite labels, with NaN labels (refused: anna.packs)
        for start, stop in pack.iter_chunks(_chunk_stars(batch_size)):
            ids, labels, flux = pack.read_rows(start, stop, flux_dtype=flux_dtype)
            inf, nan = count_bad_label_stars(labels, missing_value)
            bad_inf, bad_nan = bad_inf + inf, bad_nan + nan
            if bad_inf or bad_nan:
                continue  # the pack is refused: the rest is only read, so that the error counts every bad star
            if sn is not None:
                noised = np.empty_like(flux)
                for first in range(0, stop - start, TEST_NOISE_BLOCK):
                    rows = slice(first, min(first + TEST_NOISE_BLOCK, stop - start))
                    noised[rows], sn[start + rows.start:start + rows.stop] = noisy_copy(
                        flux[rows], rel_sn, cfg.sn_range_test, cfg.rel_cont_e_test,
                        seed=(int(cfg.seed or 0), (start + first) // TEST_NOISE_BLOCK))
                flux = noised
            bad_flux_stars += int(np.count_nonzero(~np.isfinite(flux).all(axis=1)))
            if missing_value is not None:
                labels[labels == missing_value] = np.nan
            true[start:stop] = labels
            current = worker.submit(predict, start, stop, ids, flux)
            if pending is not None:
                write(*pending.result())
            pending = current
        refuse_bad_labels(pack, bad_inf, bad_nan)
        if pending is not None:
            write(*pending.result())
        if bad_flux_stars:
            raise AnnaInputError(f"{bad_flux_stars} of {n} stars have NaN or infinite fluxes; anna-test needs "
                                 "clean spectra (anna-infer flags such spectra instead)", path=pack.path,
                                 key="TESTING_DATA")
    return true, inferred, sn, sigmas


def _write_rows(handle, ids, true, inferred, sn, sigmas=None):
    """Rows of test_stats.out as whole lines (ids are numbers, values joined by :func:`value_texts`: nothing to
    quote)."""
    blocks = [true, inferred, true - inferred, *(sigmas or ()), *(() if sn is None else (sn,))]
    handle.write("".join(f"{format_star_id(star_id)},{values}\n"
                         for star_id, values in zip(ids, value_texts(*blocks))))


def _fit_and_save_correction(cfg, true, inferred, names, pack, report):
    degree = int(cfg.correction_degree)
    polynomials = fit_correction(true, inferred, names, degree)
    corrected, _ = apply_correction(polynomials, inferred, names)
    before = label_statistics(true, inferred, names)
    after = label_statistics(true, corrected, names)
    scatter = {name: {"before": before[name], "after": after[name]} for name in names}
    path = correction_location(cfg.test_model_loc)
    save_correction(path, polynomials, degree=degree, fingerprint=model_fingerprint(cfg.test_model_loc),
                    testing_data=pack.path, n_stars=pack.n_stars, scatter=scatter)
    report(f"residual-trend correction (degree {degree}) saved to {path}; scatter before -> after, measured on "
           "the same test stars it was fitted to (in-sample, so optimistic):")
    for name in names:
        report(f"  {name}: std {before[name]['std']:.4g} -> {after[name]['std']:.4g}, "
               f"bias {before[name]['bias_mean']:.4g} -> {after[name]['bias_mean']:.4g}")
    return {"path": path, "degree": degree, "in_sample": True,
            "labels": {name: {"coef": polynomials[name].coef.tolist(), "domain": polynomials[name].domain.tolist(),
                              **scatter[name]} for name in names}}


def format_statistics_table(stats):
    """Fixed-width text table of ``{name: residual_statistics}`` (one line per label)."""
    columns = ("n", "bias_mean", "bias_median", "std", "mad_std", "mae", "rms")
    width = max([len(name) for name in stats] + [5])
    lines = [f"{'label':<{width}} " + " ".join(f"{c:>11}" for c in columns)]
    for name, entry in stats.items():
        cells = [f"{entry['n']:>11d}"] + [f"{entry[c]:>11.4g}" for c in columns[1:]]
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Plots


def write_plots(true, inferred, names, folder, log_loc=None):
    """Per label one PNG ``<name>_test.png`` in ``folder``: inferred vs true (with the one-to-one line) and
    residual true - inferred vs true.  Also TensorBoard images under ``log_loc/test`` when ``log_loc`` is set.

    Returns the PNG paths.  matplotlib is imported here (Agg backend) so the rest of ANNA-TF never needs it.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    subset = _plot_subset(true.shape[0])
    shown = "" if len(subset) == true.shape[0] else f", {len(subset)} of {true.shape[0]} stars shown"
    images, paths = [], []
    for k, name in enumerate(names):
        x, y = true[subset, k], inferred[subset, k]
        figure = Figure(figsize=(9, 4), dpi=90)
        figure.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.9, wspace=0.3)
        one_to_one, residuals = figure.subplots(1, 2)
        finite = np.isfinite(x)
        edges = [float(np.min(x[finite])), float(np.max(x[finite]))] if finite.any() else [0.0, 0.0]
        for axes, values, ylabel, line in ((one_to_one, y, f"inferred {name}", edges),
                                           (residuals, x - y, f"true - inferred {name}", [0.0, 0.0])):
            axes.scatter(x, values, s=3, alpha=0.5, rasterized=True)
            axes.plot(edges, line, color="k", lw=1)
            axes.set_xlabel(f"true {name}")
            axes.set_ylabel(ylabel)
        figure.suptitle(f"anna-test {name}{shown}")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        path = os.path.join(folder, f"{safe_file_name(name)}_test.png")
        with atomic_output(path, "wb") as handle:
            handle.write(buffer.getvalue())
        paths.append(path)
        images.append((safe_file_name(name), buffer.getvalue()))
    if log_loc:
        _write_tensorboard_images(images, os.path.join(log_loc, "test"))
    return paths


def _plot_subset(n):
    if n <= MAX_PLOT_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_PLOT_POINTS, replace=False))


def _write_tensorboard_images(images, folder):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        for tag, png in images:
            tf.summary.image(tag, tf.image.decode_png(png, channels=4)[None], step=0)
    writer.flush()
    writer.close()
