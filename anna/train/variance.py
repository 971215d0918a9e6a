"""The variance head of UNCERTAINTY: MC_DROPOUT: its biases refitted by maximum likelihood every interval, and
the calibration of σ_total (dropout spread and variance head together) at the end of training.
"""

import numpy as np

from anna.model import row_blocks
from anna.train.evaluation import EVAL_BATCH


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


def variance_parts(network, flux, batch_size=EVAL_BATCH):
    """(F, N, σ²_pred) for (n, npix) flux from the dropout-free pass, float64: the parts F and N of
    :func:`refit_variance_biases` and the variance head's σ² as a frozen model reads it (F + N, clipped as in
    :func:`anna.model.compile_mc_forward`)."""
    import keras

    from anna.losses import LOG_VARIANCE_MAX, LOG_VARIANCE_MIN

    probe = keras.Model(network.input, [network.get_layer(name).output for name in
                                         ("log_variance_fit", "log_noise_gain", "log_noise_variance",
                                          "log_variance")])
    fit, noise, total = [], [], []
    for _, block in row_blocks(flux, batch_size):
        log_fit, log_gain, log_noise_sq, log_total = (np.asarray(v, dtype=np.float64)
                                                      for v in probe(block, training=False))
        fit.append(np.exp(log_fit))
        noise.append(np.exp(log_gain + log_noise_sq))
        total.append(np.exp(np.clip(log_total, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)))
    return np.concatenate(fit), np.concatenate(noise), np.concatenate(total)


def calibrate_variance_head(network, spec, flux, labels, mask, samples):
    """Final maximum-likelihood calibration of σ_total on held-out spectra; returns a summary dict.

    The reported value is the mean of ``samples`` dropout passes and σ²_total = κ·σ²_dropout + F + N, with
    σ²_dropout the spread of the passes and F, N the variance head's misfit and noise parts.  During training
    the head learns from the dropout-free pass; here the scales of all three components are fitted together
    (:func:`fit_variance_scales`) to the residuals of the reported value on ``flux`` (n, npix) with
    normalised ``labels`` and ``mask`` (n, nout).  κ is the model-precision hyperparameter of dropout
    variational inference (Gal & Ghahramani 2016 tune it on validation likelihood): the raw dropout spread of a
    fixed dropout rate is not calibrated and, for small networks, exceeds the real error of the averaged
    prediction.  The head's scales move into its biases; κ (per label) is returned as ``model_variance_scale``
    for the frozen model.  Residuals are in normalised label units.

    Two passes over the spectra's trunk, not three: the dropout passes are sampled for the labels alone (the
    head's dropout-free pass, which the MC function would add, comes once, from :func:`variance_parts`).  This
    runs whenever anna-train writes a frozen model, a stopped run included, where the user waits for it.
    """
    import dataclasses

    from anna.model import compile_mc_forward, mc_moments

    forward = compile_mc_forward(network, dataclasses.replace(spec, heteroscedastic=False), int(samples))
    mean, var_model, _ = mc_moments(forward, flux, spec.nout, samples)
    squared = np.where(mask > 0, np.square(labels - mean), 0.0)
    fit, noise, var_pred_before = variance_parts(network, flux)
    scales = fit_variance_scales(squared, np.stack([fit, noise, var_model]), mask)
    shift_variance_biases(network, np.log(scales[:2]))
    kappa = scales[2]
    present = mask > 0

    def mean_chi2(variance, k):
        return float(np.mean(squared[present[:, k], k] / variance[present[:, k], k]))

    after = kappa * var_model + scales[0] * fit + scales[1] * noise
    return {"n": int(flux.shape[0]), "samples": int(samples), "model_variance_scale": kappa.tolist(),
            "misfit_scale": scales[0].tolist(), "noise_scale": scales[1].tolist(),
            "median_sigma_dropout": np.median(np.sqrt(var_model), axis=0).tolist(),
            "median_sigma_total": np.median(np.sqrt(after), axis=0).tolist(),
            "mean_chi2_before": [mean_chi2(var_model + var_pred_before, k) for k in range(spec.nout)],
            "mean_chi2_after": [mean_chi2(after, k) for k in range(spec.nout)]}
