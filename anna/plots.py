"""Pictures for people who look rather than read: training's learning curves, anna-test's residuals against S/N
and σ coverage, anna-infer's label histograms.  Shared core: each stage hands its numbers to one function
here, which writes one PNG atomically and returns its path.

matplotlib is imported inside the functions (Agg backend, no display needed), so nothing else of ANNA-TF
loads it.  anna-test's one-to-one plots and its σ-calibration figure stay in anna.evaluate beside the
statistics they show.
"""

import csv
import io
import math
import os

import numpy as np

from anna.atomic import atomic_output

LEARNING_CURVES = "learning_curves.png"
RESIDUALS_VS_SN = "residuals_vs_sn.png"
COVERAGE = "sigma_coverage.png"
INFER_HISTOGRAMS = "infer_histograms.png"
# points drawn in a scatter panel at most (a random, fixed subset beyond), and S/N bins of the binned lines
MAX_POINTS = 20000
SN_BINS = 8


def _figure(width, height):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90)


def _save(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with atomic_output(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def _grid(figure, panels, columns=3):
    rows = math.ceil(panels / columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for spare in axes[panels:]:
        spare.set_visible(False)
    return axes[:panels]


def write_learning_curves(history, names, folder):
    """``learning_curves.png`` in ``folder`` from anna-train's interval records: batch and cross-validation
    cost, the learning rate, and the RMS of each label in physical units, against the global step, with the
    stage boundaries marked.  Returns the path, or None when there is no record (nothing was trained)."""
    if not history:
        return None
    step = np.array([record["global_step"] for record in history], dtype=float)
    panels = 2 + len(names)
    columns = 3 if panels > 4 else 2
    figure = _figure(4.6 * columns, 3.2 * math.ceil(panels / columns))
    axes = _grid(figure, panels, columns)
    cost, rate = axes[0], axes[1]
    cost.plot(step, [record["batch_cost"] for record in history], "o-", ms=3, label="batch")
    xval = [record["xval_cost"] for record in history]
    if any(value is not None for value in xval):
        cost.plot(step, [np.nan if value is None else value for value in xval], "s-", ms=3,
                  label="cross-validation")
    cost.set_yscale("log")
    cost.set_ylabel("cost")
    cost.set_title("cost (scaled labels)", fontsize=10)
    cost.legend(fontsize=8)
    rate.plot(step, [np.nan if record["learning_rate"] is None else record["learning_rate"] for record in history],
              "o-", ms=3, color="C2")
    rate.set_yscale("log")
    rate.set_title("learning rate", fontsize=10)
    for k, name in enumerate(names):
        panel = axes[2 + k]
        panel.plot(step, [np.nan if record["rms"] is None else record["rms"].get(name, np.nan) for record in history],
                   "o-", ms=3, color="C3")
        panel.set_title(f"RMS {name}", fontsize=10)
    stages = [record["stage"] for record in history]
    boundaries = [step[i] for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
    for panel in axes:
        panel.set_xlabel("training step")
        for boundary in boundaries:
            panel.axvline(boundary, color="0.6", ls=":", lw=1)
    figure.suptitle("anna-train learning curves" + (" (dotted: start of stage 2)" if boundaries else ""))
    figure.tight_layout()
    return _save(figure, os.path.join(folder, LEARNING_CURVES))


def _subset(n):
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))


def write_residuals_vs_sn(true, inferred, sn, names, folder):
    """``residuals_vs_sn.png``: per label, true − inferred against the S/N the test spectra were noised to, with
    the median and the 16th–84th percentiles in S/N quantile bins.  Returns the path."""
    d = np.asarray(true, dtype=float) - np.asarray(inferred, dtype=float)
    sn = np.asarray(sn, dtype=float)
    columns = min(len(names), 3)
    figure = _figure(4.6 * columns, 3.4 * math.ceil(len(names) / columns))
    axes = _grid(figure, len(names), columns)
    shown = _subset(len(sn))
    edges = np.unique(np.quantile(sn, np.linspace(0, 1, SN_BINS + 1)))
    for k, (panel, name) in enumerate(zip(axes, names)):
        keep = np.isfinite(d[:, k])
        points = shown[keep[shown]]
        panel.scatter(sn[points], d[points, k], s=3, alpha=0.35, rasterized=True)
        centres, low, median, high = [], [], [], []
        for first, last in zip(edges[:-1], edges[1:]):
            inside = keep & (sn >= first) & (sn <= last)
            if inside.sum() >= 5:
                centres.append(np.median(sn[inside]))
                p16, p50, p84 = np.percentile(d[inside, k], [16, 50, 84])
                low.append(p16)
                median.append(p50)
                high.append(p84)
        panel.plot(centres, median, "k-", lw=1.5, label="median")
        panel.plot(centres, low, "k--", lw=1, label="16th, 84th percentile")
        panel.plot(centres, high, "k--", lw=1)
        panel.axhline(0.0, color="0.5", lw=0.8)
        panel.set_xscale("log")
        panel.set_xlabel("S/N")
        panel.set_ylabel(f"true - inferred {name}")
        panel.legend(fontsize=7, loc="upper right")
    figure.suptitle("anna-test residuals against S/N")
    figure.tight_layout()
    return _save(figure, os.path.join(folder, RESIDUALS_VS_SN))


def coverage_curve(residuals, sigmas, k_values):
    """Fraction of finite (residual, σ > 0) pairs with |residual| < k σ, for each k."""
    keep = np.isfinite(residuals) & np.isfinite(sigmas) & (sigmas > 0)
    z = np.abs(residuals[keep] / sigmas[keep])
    if not z.size:
        return np.full(len(k_values), np.nan)
    return np.array([np.mean(z < k) for k in k_values])


def write_coverage_plot(true, inferred, sigma_total, names, folder):
    """``sigma_coverage.png``: the calibration of σ_total — the fraction of stars within k σ against k (0 to
    3.5), per label, beside what calibrated Gaussian errors give; the 1, 2 and 3 σ points are marked and written
    out.  Above the line: σ too large; below: too small.  Returns the path."""
    d = np.asarray(true, dtype=float) - np.asarray(inferred, dtype=float)
    sigma_total = np.asarray(sigma_total, dtype=float)
    k_values = np.linspace(0.0, 3.5, 71)
    ideal = np.array([math.erf(k / math.sqrt(2.0)) for k in k_values])
    figure = _figure(6.4, 4.6)
    panel = figure.subplots()
    panel.plot(k_values, ideal, color="k", lw=1.5, label="calibrated (Gaussian)")
    for k, name in enumerate(names):
        curve = coverage_curve(d[:, k], sigma_total[:, k], k_values)
        marks = coverage_curve(d[:, k], sigma_total[:, k], (1, 2, 3))
        text = " / ".join(f"{100 * value:.0f}" for value in marks)
        line, = panel.plot(k_values, curve, lw=1.2, label=f"{name}: {text} %")
        panel.plot((1, 2, 3), marks, "o", color=line.get_color(), ms=5)
    for level in (1, 2, 3):
        panel.axvline(level, color="0.8", lw=0.8, zorder=0)
    panel.set_xlim(0, 3.5)
    panel.set_ylim(0, 1.02)
    panel.set_xlabel("k")
    panel.set_ylabel("fraction of stars with |true - inferred| < k sigma_total")
    panel.set_title("coverage at 1 / 2 / 3 sigma (calibrated: 68 / 95 / 99.7 %)", fontsize=10)
    panel.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _save(figure, os.path.join(folder, COVERAGE))


def read_label_columns(paths, names):
    """The label columns ``names`` of anna-infer outputs (CSV with a header), and whether each row has flags:
    ``(values (n, len(names)), flagged (n,) bool)``; empty or unreadable cells are NaN."""
    values, flagged = [], []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                values.append([_number(row.get(name)) for name in names])
                flagged.append(bool((row.get("flags") or "").strip()))
    return np.asarray(values, dtype=float).reshape(-1, len(names)), np.asarray(flagged, dtype=bool)


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return np.nan


def write_infer_histograms(paths, names, minima, maxima, folder):
    """``infer_histograms.png`` in ``folder``: per label the histogram of the values in anna-infer's outputs
    ``paths`` (all stars with a value, and those without flags), over the model's label range.  Returns the
    path."""
    values, flagged = read_label_columns(paths, names)
    columns = min(len(names), 3)
    figure = _figure(4.6 * columns, 3.4 * math.ceil(len(names) / columns))
    axes = _grid(figure, len(names), columns)
    for k, (panel, name) in enumerate(zip(axes, names)):
        column = values[:, k]
        finite = np.isfinite(column)
        margin = 0.1 * (maxima[k] - minima[k])
        bounds = (min(minima[k] - margin, np.min(column[finite], initial=minima[k])),
                  max(maxima[k] + margin, np.max(column[finite], initial=maxima[k])))
        bins = np.linspace(*bounds, 41)
        panel.hist(column[finite], bins=bins, alpha=0.5, label=f"all with a value ({finite.sum():,})")
        clean = finite & ~flagged
        panel.hist(column[clean], bins=bins, histtype="step", lw=1.5, color="k", label=f"no flags ({clean.sum():,})")
        for edge in (minima[k], maxima[k]):
            panel.axvline(edge, color="C3", ls=":", lw=1)
        panel.set_xlabel(name)
        panel.set_ylabel("stars")
        panel.legend(fontsize=7)
    figure.suptitle(f"anna-infer: {len(values):,} stars from {len(paths)} file(s); dotted: the model's label range")
    figure.tight_layout()
    return _save(figure, os.path.join(folder, INFER_HISTOGRAMS))
