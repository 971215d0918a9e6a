"""Classical label estimators the network is compared with (numpy only), fitted on the same training pack.

* :class:`RidgeRegression`: labels as a linear function of the flux, Tikhonov-regularised, with the
  regularisation strength picked on a validation set.
* :class:`QuadraticSpectralModel`: a data-driven spectral model in the manner of The Cannon (Ness et al.
  2015): every pixel's flux is a quadratic polynomial of the labels, fitted by least squares per pixel, with an
  intrinsic scatter per pixel; labels of a new spectrum are those that minimise the chi-square between it and
  the model (Levenberg-Marquardt, run for all spectra at once).
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
        X'X) with the lowest mean squared scaled error on the validation set.  Returns self."""
        flux = np.asarray(flux, dtype=np.float64)
        self.flux_mean = flux.mean(axis=0)
        self.labels_mean = labels.mean(axis=0)
        x = flux - self.flux_mean
        y = (labels - self.labels_mean) / self.span
        eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
        projected = eigenvectors.T @ (x.T @ y)
        val_x = np.asarray(val_flux, dtype=np.float64) - self.flux_mean
        val_y = (val_labels - self.labels_mean) / self.span
        best = None
        for relative in relative_alphas:
            alpha = relative * max(float(eigenvalues.mean()), 1e-300)
            weights = eigenvectors @ (projected / (eigenvalues + alpha)[:, None])
            error = float(np.mean((val_x @ weights - val_y) ** 2))
            if best is None or error < best[0]:
                best = (error, alpha, weights)
        _, self.alpha, self.weights = best
        return self

    def predict(self, flux):
        """(n, nout) labels for (n, npix) flux."""
        return (np.asarray(flux, dtype=np.float64) - self.flux_mean) @ self.weights * self.span + self.labels_mean


class QuadraticSpectralModel:
    """Flux of each pixel = theta_p . v(z), v = (1, z_i, z_i z_j for i <= j): 21 terms for 5 labels.

    ``z`` are the labels mapped to [-1, 1] over ``[minimum, maximum]``.  Fitting solves one linear least-squares
    problem for all pixels; the intrinsic scatter ``s2`` per pixel is the residual variance beyond the known
    noise of the training spectra.  Inference weights pixels by 1 / (noise variance + s2).
    """

    def __init__(self, minimum, maximum):
        self.minimum = np.asarray(minimum, dtype=np.float64)
        self.maximum = np.asarray(maximum, dtype=np.float64)
        self.nout = len(self.minimum)
        self.pairs = list(itertools.combinations_with_replacement(range(self.nout), 2))

    def to_z(self, labels):
        return 2.0 * (np.asarray(labels, dtype=np.float64) - self.minimum) / (self.maximum - self.minimum) - 1.0

    def from_z(self, z):
        return self.minimum + (z + 1.0) * 0.5 * (self.maximum - self.minimum)

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

    def fit(self, flux, labels, noise_variance):
        """``flux`` (n, npix), ``labels`` (n, nout), ``noise_variance`` (n, npix) of the training flux."""
        v, _ = self.design(self.to_z(labels))
        self.theta, *_ = np.linalg.lstsq(v, np.asarray(flux, dtype=np.float64), rcond=None)
        residual = flux - v @ self.theta
        self.scatter2 = np.maximum(np.mean(residual ** 2, axis=0) - np.mean(noise_variance, axis=0), 0.0)
        return self

    def chi2(self, flux, weight, z):
        v, _ = self.design(z)
        return np.sum(weight * (flux - v @ self.theta) ** 2, axis=1)

    def infer(self, flux, noise_variance, starts, iterations=30, chunk=500, z_limit=1.5):
        """Labels (n, nout) minimising the weighted chi-square; each start (n, nout labels) is refined and the
        best end point kept.  ``noise_variance`` is (n, npix) or broadcastable to it."""
        flux = np.asarray(flux, dtype=np.float64)
        noise_variance = np.broadcast_to(noise_variance, flux.shape)
        result = np.empty((flux.shape[0], self.nout))
        for begin in range(0, flux.shape[0], chunk):
            end = min(begin + chunk, flux.shape[0])
            f = flux[begin:end]
            w = 1.0 / (noise_variance[begin:end] + self.scatter2)
            best_z, best_chi2 = None, None
            for start in starts:
                z, chi2 = self._levenberg_marquardt(f, w, np.clip(self.to_z(start[begin:end]), -z_limit, z_limit),
                                                    iterations, z_limit)
                if best_z is None:
                    best_z, best_chi2 = z, chi2
                else:
                    better = chi2 < best_chi2
                    best_z[better], best_chi2[better] = z[better], chi2[better]
            result[begin:end] = self.from_z(best_z)
        return result

    def _levenberg_marquardt(self, flux, weight, z, iterations, z_limit):
        chi2 = self.chi2(flux, weight, z)
        damping = np.full(len(z), 1e-3)
        eye = np.eye(self.nout)
        for _ in range(iterations):
            v, dv = self.design(z)
            residual = flux - v @ self.theta
            jacobian = np.transpose(dv, (0, 2, 1)) @ self.theta  # (n, nout, npix)
            weighted = jacobian * weight[:, None, :]
            normal = weighted @ np.transpose(jacobian, (0, 2, 1))
            gradient = (weighted @ residual[:, :, None])[:, :, 0]
            diagonal = np.einsum("nll->nl", normal)[:, :, None] * eye
            step = np.linalg.solve(normal + damping[:, None, None] * (diagonal + 1e-12 * eye),
                                   gradient[:, :, None])[:, :, 0]
            trial = np.clip(z + step, -z_limit, z_limit)
            trial_chi2 = self.chi2(flux, weight, trial)
            accept = trial_chi2 < chi2
            z = np.where(accept[:, None], trial, z)
            chi2 = np.where(accept, trial_chi2, chi2)
            damping = np.where(accept, damping / 3.0, damping * 5.0)
        return z, chi2
