"""The variance head of UNCERTAINTY: MC_DROPOUT: its biases refitted by maximum likelihood every interval, and
the calibration of σ_total (dropout spread and variance head together) whenever a frozen model is written.
"""

import numpy as np

from anna.model import noise_variance_factor, row_blocks

# The calibration set's stars are noised at this many S/N levels, log-spaced over the training S/N range
# (anna.train.describe.calibration_set), and at most this many stars are used at each level.  Why levels: on
# 7214-pixel spectra trained at S/N 30-200 the error of T_eff, log g and v_mic grew much faster than the noise²
# part of the variance head towards S/N 30, and one calibration fitted on a uniform S/N draw left 58-62 % of
# the stars within 1σ at S/N 30 (68 % at S/N 60 and 120).  Why all the stars at every level: with a sixth of
# them per level the factors scattered by several points of coverage from level to level.
CALIBRATION_SN_LEVELS = 6
CALIBRATION_STARS = 1000
# Levels whose median ln noise² (as the variance head reads it) lie closer than this are pooled into one knot
# (pooled_noise_levels): 0.1 is 5 % in noise, against 46 % (0.76) between neighbouring levels over S/N 30-200.
MIN_KNOT_GAP = 0.1


def calibration_sn_levels(sn_range, count=CALIBRATION_SN_LEVELS):
    """The S/N levels of the calibration set: ``count`` values log-spaced from the low to the high end of
    ``sn_range`` (one level when the range is a single value)."""
    low, high = float(min(sn_range)), float(max(sn_range))
    if not high > low:
        return (low,)
    return tuple(float(v) for v in np.exp(np.linspace(np.log(low), np.log(high), count)))


def crps_variance_factor(z):
    """The factor f on σ² that minimises the mean CRPS of the Gaussian forecasts N(0, f·σ²) for normalised
    residuals ``z`` = d/σ (1-D, finite); 1 when no factor does (all z = 0, or no z).

    The CRPS (continuous ranked probability score; Gneiting & Raftery 2007) of N(0, s²) at z is
    s·[u(2Φ(u) − 1) + 2φ(u) − 1/√π] with u = z/s, and its derivative in s is 2φ(u) − 1/√π, so the minimum is
    where mean φ(z/s) = 1/(2√π), which increases with s: one root, found by Brent's method in ln s.  Gaussian z of
    unit variance give f = 1.  Why the CRPS and not the likelihood here: the likelihood matches the mean of z²,
    which a few badly fitted stars pull up, and leaves the core of the distribution over-covered (72-76 %
    within 1σ for v sin i); the CRPS weighs the tails linearly and stays a proper score (the minimum-CRPS
    estimation of Gneiting et al. 2005 for calibrating ensemble forecasts)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    z = np.abs(np.asarray(z, dtype=np.float64))
    target = 0.5 / np.sqrt(np.pi)
    if z.size == 0 or not (z > 0).any():
        return 1.0

    def excess(log_scale):
        return float(np.mean(norm.pdf(z / np.exp(log_scale)))) - target

    low, high = -20.0, 20.0
    if excess(low) >= 0:  # only when almost every z is 0: the narrowest forecast is best
        return float(np.exp(2 * low))
    return float(np.exp(2 * brentq(excess, low, high, xtol=1e-10)))


def pooled_noise_levels(log_noise_sq, level, level_sn, min_gap=MIN_KNOT_GAP):
    """The knots of the S/N factor: (groups, knots), ``groups`` lists of level indices from the highest S/N
    down and ``knots`` the median ``log_noise_sq`` (n,) of each group's rows (``level`` (n,) the level of each row,
    ``level_sn`` the levels' S/N), strictly ascending by at least ``min_gap``.

    Levels start alone, in order of falling S/N; two neighbours whose medians are less than ``min_gap`` apart
    (or in the wrong order) are pooled, until none are.  Why: where lines rather than noise dominate DER_SNR's
    second differences (short spectra, high S/N) the noise estimate cannot tell the levels apart, and a factor
    per level would then jump between nearly equal noise values (seen on 64-pixel spectra at S/N 53-100, whose
    medians came out in the order 38, 73, 100, 53)."""
    x = np.asarray(log_noise_sq, dtype=np.float64)
    level = np.asarray(level)
    groups = [[number] for number in np.argsort(level_sn)[::-1].tolist()]

    def knot(members):
        return float(np.median(x[np.isin(level, members)]))

    while True:
        knots = [knot(members) for members in groups]
        close = next((i for i in range(len(groups) - 1) if knots[i + 1] - knots[i] < min_gap), None)
        if close is None:
            return groups, knots
        groups[close:close + 2] = [groups[close] + groups[close + 1]]


def noise_level_factors(squared_residual, variance, level, count, mask):
    """(count, nout) factors on σ², one per S/N level and label (:func:`crps_variance_factor` of d/σ over the
    level's present stars; 1 where a level has none).  ``squared_residual``, ``variance`` and ``mask`` are
    (n, nout), ``level`` (n,) the level index of each row."""
    present = np.asarray(mask) > 0
    z = np.sqrt(np.asarray(squared_residual, dtype=np.float64) / np.asarray(variance, dtype=np.float64))
    factors = np.ones((count, z.shape[1]))
    for number in range(count):
        rows = np.asarray(level) == number
        for k in range(z.shape[1]):
            factors[number, k] = crps_variance_factor(z[rows & present[:, k], k])
    return factors


def fit_variance_scales(squared_residual, components, mask, iterations=300):
    """Maximum-likelihood scale factors of variance components, per label.

    The variance of a residual d is modelled as v = Σ_c s_c·V_c with known per-star components V_c ≥ 0
    (``components``: (C, n, nout)) and unknown scales s_c ≥ 0.  The Gaussian negative log-likelihood
    ½Σ(d²/v + ln v) (the robust loss) is minimised by the classic fixed-point iteration for variance
    components, s_c ← s_c·Σ(V_c d²/v²)/Σ(V_c/v), which keeps every scale positive and converges to a
    stationary point.  ``squared_residual`` and ``mask`` are (n, nout); absent labels (mask 0) are ignored.
    Returns (C, nout) scales; labels without present values, or with all d² = 0, keep scale 1.
    """
    d2 = np.asarray(squared_residual, dtype=np.float64)
    components = np.asarray(components, dtype=np.float64)
    present = np.asarray(mask) > 0
    scales = np.ones(components.shape[0:1] + d2.shape[1:])
    for k in range(d2.shape[1]):
        rows = present[:, k]
        if not rows.any() or not (d2[rows, k] > 0).any():
            continue
        parts = components[:, rows, k]
        target = d2[rows, k]
        scale = np.ones(parts.shape[0])
        for _ in range(iterations):
            variance = np.maximum(scale @ parts, 1e-300)
            step = (parts * target / variance**2).sum(axis=1) / np.maximum((parts / variance).sum(axis=1), 1e-300)
            scale = np.clip(scale * step, np.exp(-40.0), np.exp(40.0))
        scales[:, k] = scale
    return scales


def shift_variance_biases(network, log_scales):
    """Add ``log_scales`` (2, nout) to the biases of the misfit and noise parts of the variance head."""
    from anna.losses import LOG_VARIANCE_MAX, LOG_VARIANCE_MIN

    for row, name in enumerate(("log_variance_fit", "log_noise_gain")):
        bias = network.get_layer(name).bias
        bias.assign(np.clip(bias.numpy() + log_scales[row], LOG_VARIANCE_MIN, LOG_VARIANCE_MAX).astype(np.float32))


def refit_variance_biases(network, squared_residual, fit_variance, noise_variance, mask):
    """Move the variance head's two biases per label to their maximum-likelihood values for recent residuals.

    The head predicts, for label k, σ²_pred = F + N: a misfit part F = e^(fit) and a noise part
    N = e^(gain)·noise² (:func:`anna.model.build_network`).  With the network fixed, the robust loss
    ½(d²/v + ln v) is minimised over scale factors of F and N (:func:`fit_variance_scales`) and the biases
    move by their logarithms.  Why: the gradient points the same way, but Adam moves a weight by about one
    learning rate per step, so at ANNA's rates (1e-4 .. 1e-6) a bias could travel only a fraction of the
    several units of ln σ² between a starting guess and the precision the network reaches.  The kernels, which
    make σ depend on the spectrum, keep learning by gradient.

    Arrays are (n, nout), normalised label units, from one SAMPLE_INTERVAL of the training stream:
    ``squared_residual`` d² of the dropout-free value, F and N at the current biases, ``mask`` (1 = present).
    Returns the (2, nout) bias shifts applied.
    """
    shifts = np.log(fit_variance_scales(squared_residual, np.stack([fit_variance, noise_variance]), mask))
    shift_variance_biases(network, shifts)
    return shifts


def calibration_passes(network, spec, flux, samples):
    """Everything the calibration needs from (n, npix) ``flux``, in one compiled pass over the trunk: a dict of
    float64 arrays, (n, nout) ``mean`` and ``var_model`` (mean and spread of ``samples`` dropout passes of the
    labels), ``fit`` and ``noise`` (the variance head's parts F and N of :func:`refit_variance_biases`, from the
    dropout-free pass), ``var_pred`` (F + N clipped as a frozen model reads it) and (n,) ``log_noise_sq`` (the
    ln noise² the head read).

    The passes are prediction's own (:func:`anna.model.compile_mc_forward`, its ``head_parts``), in the groups
    of spectra prediction uses, so the calibration fits exactly what a frozen model will report.  Why one pass:
    the trunk up to the first dropout layer (the convolutions, most of the cost at survey sizes) is the same for
    the dropout passes and the head; computed separately, with the head read through an uncompiled probe, the
    calibration of 6000 spectra of 7214 pixels took 13.4 s instead of 5.5, and it runs where a stopped run's
    user waits."""
    from anna.model import compile_mc_forward, mc_spectra_per_call

    forward = compile_mc_forward(network, spec, int(samples))
    names = ("mean", "var_model", "var_pred", "log_fit", "log_gain", "log_noise_sq")
    parts = {name: [] for name in names}
    for _, block in row_blocks(np.asarray(flux, dtype=np.float32), mc_spectra_per_call(forward.rows_per_call, samples)):
        for name, value in zip(names, forward.head_parts(block)):
            parts[name].append(np.asarray(value, dtype=np.float64))
    mean, var_model, var_pred, log_fit, log_gain, log_noise_sq = (np.concatenate(parts[name]) for name in names)
    return {"mean": mean, "var_model": var_model, "fit": np.exp(log_fit), "noise": np.exp(log_gain + log_noise_sq),
            "var_pred": var_pred, "log_noise_sq": log_noise_sq[:, 0]}


def calibrate_variance_head(network, spec, flux, labels, mask, samples, level=None, level_sn=None):
    """Final calibration of σ_total on held-out spectra; returns a summary dict.

    The reported value is the mean of ``samples`` dropout passes and σ²_total = g(noise)·(κ·σ²_dropout + F + N),
    with σ²_dropout the spread of the passes and F, N the variance head's misfit and noise parts.  During training
    the head learns from the dropout-free pass; here the scales of all three components are fitted together by
    maximum likelihood (:func:`fit_variance_scales`) to the residuals of the reported value on ``flux`` (n, npix)
    with normalised ``labels`` and ``mask`` (n, nout).  κ is the model-precision hyperparameter of dropout
    variational inference (Gal & Ghahramani 2016 tune it on validation likelihood): the raw dropout spread of a
    fixed dropout rate is not calibrated and, for small networks, exceeds the real error of the averaged
    prediction.  The head's scales move into its biases; κ (per label) is returned as ``model_variance_scale``
    for the frozen model.  Residuals are in normalised label units.

    When the set was noised at S/N levels (``level`` (n,) the level of each row, ``level_sn`` the levels' S/N;
    :func:`anna.train.describe.calibration_set`), a factor per level and label follows
    (:func:`noise_level_factors`), stored as ``noise_levels`` with the median ln noise² of each level's spectra
    (levels that the noise estimate cannot tell apart pooled: :func:`pooled_noise_levels`): g interpolates it in
    the ln noise² the variance head reads (:func:`anna.model.noise_variance_factor`).
    Without levels g = 1.

    One pass over the spectra's trunk serves the dropout passes and the head (:func:`calibration_passes`).  This
    runs whenever anna-train writes a frozen model, a stopped run included, where the user waits for it.
    """
    passes = calibration_passes(network, spec, flux, samples)
    var_model, fit, noise = passes["var_model"], passes["fit"], passes["noise"]
    var_pred_before, log_noise_sq = passes["var_pred"], passes["log_noise_sq"]
    squared = np.where(mask > 0, np.square(labels - passes["mean"]), 0.0)
    scales = fit_variance_scales(squared, np.stack([fit, noise, var_model]), mask)
    shift_variance_biases(network, np.log(scales[:2]))
    kappa = scales[2]
    present = mask > 0

    def mean_chi2(variance, k):
        return float(np.mean(squared[present[:, k], k] / variance[present[:, k], k]))

    after = kappa * var_model + scales[0] * fit + scales[1] * noise
    summary = {"n": int(flux.shape[0]), "samples": int(samples), "model_variance_scale": kappa.tolist(),
               "misfit_scale": scales[0].tolist(), "noise_scale": scales[1].tolist()}
    if level is not None and len(level_sn) > 1:
        groups, knots = pooled_noise_levels(log_noise_sq, level, level_sn)
        group_of_level = np.empty(len(level_sn), dtype=int)
        for number, members in enumerate(groups):
            group_of_level[members] = number
        factors = noise_level_factors(squared, after, group_of_level[np.asarray(level)], len(groups), mask)
        summary["noise_levels"] = {"sn": [[float(level_sn[i]) for i in members] for members in groups],
                                   "log_noise_sq": knots, "variance_factor": factors.tolist()}
        after = after * noise_variance_factor(summary["noise_levels"], log_noise_sq)
    summary.update({"median_sigma_dropout": np.median(np.sqrt(var_model), axis=0).tolist(),
                    "median_sigma_total": np.median(np.sqrt(after), axis=0).tolist(),
                    "mean_chi2_before": [mean_chi2(var_model + var_pred_before, k) for k in range(spec.nout)],
                    "mean_chi2_after": [mean_chi2(after, k) for k in range(spec.nout)]})
    return summary
