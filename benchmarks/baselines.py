"""Classical label estimators the network is compared with (numpy only), fitted on the same training pack.

* :class:`RidgeRegression`: labels as a linear function of the flux, Tikhonov-regularised, with the
  regularisation strength picked on a validation set.
* :class:`QuadraticSpectralModel`: a data-driven spectral model in the manner of The Cannon (Ness et al.
  2015): every pixel's flux is a regularised quadratic polynomial of the (pivoted, scaled) labels, fitted on
  the noiseless training spectra, with an intrinsic scatter per pixel; labels of a new spectrum minimise the
  chi-square between it and the model (Levenberg-Marquardt, run for all spectra at once).
* :class:`TrainingMean`: the training set's mean labels for every spectrum, the floor the others must beat.
"""

import itertools

import numpy as np


class RidgeRegression:
    """``labels = (flux - flux_mean) @ weights + labels_mean`` with weights = (X'X + a I)^-1 X'Y.

    Labels are scaled by ``span`` (e.g. MAX_PARAMS - MIN_PARAMS) so one ``a`` suits all of them.
    """

    def __init__(self, span):
        self.span = np.asarray(span, dtype=np.float64)
        self.alpha = None

    def fit(self, flux, labels, val_flux, val_labels, relative_alphas=10.0 ** np.arange(-9.0, 1.0)):
        """Fit on (n, npix) ``flux`` and (n, nout) ``labels``; choose ``a`` (relative to the mean eigenvalue of
        X'X) for each label separately, the one with the lowest squared error of that label on the validation
        set (what scikit-learn's RidgeCV does with ``alpha_per_target``: a label that the noise hides, such as
        log g at low S/N, wants far more regularisation than T_eff, and one ``a`` for all of them left that
        label worse than predicting the training mean).  Returns self; ``alpha`` is (nout,)."""
        flux = np.asarray(flux, dtype=np.float64)
        self.flux_mean = flux.mean(axis=0)
        self.labels_mean = labels.mean(axis=0)
        x = flux - self.flux_mean
        y = (labels - self.labels_mean) / self.span
        eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
        projected = eigenvectors.T @ (x.T @ y)
        val_x = np.asarray(val_flux, dtype=np.float64) - self.flux_mean
        val_y = (val_labels - self.labels_mean) / self.span
        nout = y.shape[1]
        best_error = np.full(nout, np.inf)
        self.alpha = np.zeros(nout)
        self.weights = np.zeros((x.shape[1], nout))
        for relative in relative_alphas:
            alpha = relative * max(float(eigenvalues.mean()), 1e-300)
            weights = eigenvectors @ (projected / (eigenvalues + alpha)[:, None])
            error = np.mean((val_x @ weights - val_y) ** 2, axis=0)
            better = error < best_error
            best_error[better] = error[better]
            self.alpha[better] = alpha
            self.weights[:, better] = weights[:, better]
        return self

    def predict(self, flux):
        """(n, nout) labels for (n, npix) flux."""
        return (np.asarray(flux, dtype=np.float64) - self.flux_mean) @ self.weights * self.span + self.labels_mean


class QuadraticSpectralModel:
    """Flux of each pixel = theta_p . v(z), v = (1, z_i, z_i z_j for i <= j): 21 terms for 5 labels.

    Fitted as The Cannon is (Ness et al. 2015; Casey et al. 2016): on noiseless training spectra (or with
    inverse-variance weights), with the labels pivoted on their training mean and scaled by their training
    standard deviation (``z``), and with every coefficient but the constant regularised (Tikhonov, strength
    ``alpha`` picked among ``relative_alphas`` as the one whose model predicts the validation spectra best at
    their known labels).  The intrinsic scatter ``s2`` of each pixel is the model's squared misfit on the
    validation set, beyond the validation spectra's own noise.

    Labels of a new spectrum: Levenberg-Marquardt for all spectra at once, from several starts, minimising

        sum_p (f_p - (1 + d) theta_p . v(z))^2 / (noise variance_p + s2_p)  +  prior * |z|^2

    * (1 + d), a continuum scale factor per spectrum: test spectra carry the REL_CONT_E offset (+-1 %) that the
      noiseless training spectra lack; unmodelled, it biases every label and grows in weight as S/N rises.
    * ``prior * |z|^2``: a Gaussian prior with the training labels' mean and standard deviation (``prior`` 1),
      so that a label the spectrum hardly constrains (log g at S/N 50) stays near the training mean instead of
      wandering to the edge of the range.  ``prior`` 0 is The Cannon's plain maximum likelihood.
    * labels kept within the training range widened by ``margin`` of its span on each side.
    """

    def __init__(self, minimum, maximum, margin=0.1, prior=1.0):
        self.minimum = np.asarray(minimum, dtype=np.float64)
        self.maximum = np.asarray(maximum, dtype=np.float64)
        self.margin = float(margin)
        self.prior = float(prior)
        self.nout = len(self.minimum)
        self.pairs = list(itertools.combinations_with_replacement(range(self.nout), 2))
        self.alpha = None

    def to_z(self, labels):
        return (np.asarray(labels, dtype=np.float64) - self.pivot) / self.scale

    def from_z(self, z):
        return self.pivot + z * self.scale

    def design(self, z):
        """(n, terms) design matrix and its derivative (n, terms, nout) with respect to z."""
        n = z.shape[0]
        terms = 1 + self.nout + len(self.pairs)
        v = np.empty((n, terms))
        dv = np.zeros((n, terms, self.nout))
        v[:, 0] = 1.0
        v[:, 1:1 + self.nout] = z
        dv[:, 1 + np.arange(self.nout), np.arange(self.nout)] = 1.0
        for column, (i, j) in enumerate(self.pairs, start=1 + self.nout):
            v[:, column] = z[:, i] * z[:, j]
            dv[:, column, i] += z[:, j]
            dv[:, column, j] += z[:, i]
        return v, dv

    def fit(self, flux, labels, val_flux, val_labels, noise_variance=None, val_noise_variance=None,
            relative_alphas=10.0 ** np.arange(-8.0, 1.0)):
        """Fit on (n, npix) ``flux`` with (n, nout) ``labels``, validate on ``val_flux``/``val_labels``.

        ``noise_variance`` (n, npix) of the training flux weights each spectrum by its mean inverse variance
        (None: noiseless, equal weights); ``val_noise_variance`` is subtracted from the validation misfit
        (None: noiseless).  ``alpha`` is relative to the mean diagonal of V'WV.  Returns self."""
        flux = np.asarray(flux, dtype=np.float64)
        val_flux = np.asarray(val_flux, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.float64)
        self.pivot = labels.mean(axis=0)
        self.scale = np.maximum(labels.std(axis=0), 1e-12)
        v, _ = self.design(self.to_z(labels))
        val_v, _ = self.design(self.to_z(val_labels))
        # one weight per spectrum (its mean inverse variance), so that one solve serves every pixel
        weight = np.ones(len(flux)) if noise_variance is None else 1.0 / np.mean(noise_variance, axis=1)
        weight = weight / weight.mean()
        normal = (v * weight[:, None]).T @ v
        right = (v * weight[:, None]).T @ flux
        penalty = np.eye(normal.shape[0])
        penalty[0, 0] = 0.0  # the constant term (the mean spectrum) is not regularised
        unit = float(np.mean(np.diag(normal)))
        val_noise = 0.0 if val_noise_variance is None else np.mean(val_noise_variance, axis=0)
        best = None
        for relative in relative_alphas:
            theta = np.linalg.solve(normal + relative * unit * penalty, right)
            misfit = np.maximum(np.mean((val_flux - val_v @ theta) ** 2, axis=0) - val_noise, 0.0)
            error = float(np.sum(misfit))
            if best is None or error < best[0]:
                best = (error, relative * unit, theta, misfit)
        _, self.alpha, self.theta, self.scatter2 = best
        return self

    def chi2(self, flux, weight, z, d):
        """Objective of :meth:`infer` at labels ``z`` and continuum factor ``1 + d``, per spectrum."""
        v, _ = self.design(z)
        misfit = np.sum(weight * (flux - (1.0 + d)[:, None] * (v @ self.theta)) ** 2, axis=1)
        return misfit + self.prior * np.sum(z ** 2, axis=1)

    def infer(self, flux, noise_variance, starts, iterations=40, chunk=500):
        """Labels (n, nout) minimising :meth:`chi2`; each start (n, nout labels, or (nout,) for all) is refined
        and the best end point kept.  ``noise_variance`` is (n, npix) or broadcastable to it."""
        flux = np.asarray(flux, dtype=np.float64)
        noise_variance = np.broadcast_to(noise_variance, flux.shape)
        span = self.maximum - self.minimum
        low = self.to_z(self.minimum - self.margin * span)
        high = self.to_z(self.maximum + self.margin * span)
        result = np.empty((flux.shape[0], self.nout))
        for begin in range(0, flux.shape[0], chunk):
            end = min(begin + chunk, flux.shape[0])
            f = flux[begin:end]
            w = 1.0 / (noise_variance[begin:end] + self.scatter2)
            best_z, best_chi2 = None, None
            for start in starts:
                start = np.broadcast_to(np.asarray(start, dtype=np.float64), (flux.shape[0], self.nout))
                z, chi2 = self._levenberg_marquardt(f, w, np.clip(self.to_z(start[begin:end]), low, high),
                                                    iterations, low, high)
                if best_z is None:
                    best_z, best_chi2 = z, chi2
                else:
                    better = chi2 < best_chi2
                    best_z[better], best_chi2[better] = z[better], chi2[better]
            result[begin:end] = self.from_z(best_z)
        return result

    def _levenberg_marquardt(self, flux, weight, z, iterations, low, high):
        """Parameters: the labels ``z`` (n, nout) and the continuum factor 1 + d (d starts at 0)."""
        d = np.zeros(len(z))
        chi2 = self.chi2(flux, weight, z, d)
        damping = np.full(len(z), 1e-3)
        size = self.nout + 1
        eye = np.eye(size)
        labels = np.arange(self.nout)
        for _ in range(iterations):
            v, dv = self.design(z)
            model = v @ self.theta
            residual = flux - (1.0 + d)[:, None] * model
            jacobian = np.empty((len(z), size, flux.shape[1]))
            jacobian[:, :self.nout] = (1.0 + d)[:, None, None] * (np.transpose(dv, (0, 2, 1)) @ self.theta)
            jacobian[:, self.nout] = model
            weighted = jacobian * weight[:, None, :]
            normal = weighted @ np.transpose(jacobian, (0, 2, 1))
            gradient = (weighted @ residual[:, :, None])[:, :, 0]
            normal[:, labels, labels] += self.prior  # the prior's curvature and pull towards z = 0
            gradient[:, :self.nout] -= self.prior * z
            diagonal = np.einsum("nll->nl", normal)[:, :, None] * eye
            step = np.linalg.solve(normal + damping[:, None, None] * (diagonal + 1e-12 * eye),
                                   gradient[:, :, None])[:, :, 0]
            trial_z = np.clip(z + step[:, :self.nout], low, high)
            trial_d = np.clip(d + step[:, self.nout], -0.5, 0.5)
            trial_chi2 = self.chi2(flux, weight, trial_z, trial_d)
            accept = trial_chi2 < chi2
            z = np.where(accept[:, None], trial_z, z)
            d = np.where(accept, trial_d, d)
            chi2 = np.where(accept, trial_chi2, chi2)
            damping = np.where(accept, damping / 3.0, damping * 5.0)
        return z, chi2


class TrainingMean:
    """The floor every estimator must beat: every spectrum gets the mean label of the training set."""

    def fit(self, labels):
        self.mean = np.mean(np.asarray(labels, dtype=np.float64), axis=0)
        return self

    def predict(self, flux):
        return np.broadcast_to(self.mean, (len(flux), len(self.mean))).copy()
