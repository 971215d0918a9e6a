"""The training domain: what the training spectra look like, written into the frozen model by anna-train and
used by anna-infer to flag spectra unlike them, and the DER_SNR noise estimate both rest on.

The rule (``outside_training_domain``) is described in :mod:`anna.infer`'s docstring, where users read the
flags.  This module owns its numbers: the principal components kept, the false-alarm fraction per statistic
and the out-of-sample folds.  It is shared core: the stages import it, it imports no stage.
"""

import numpy as np

from anna.model import DER_SNR_FACTOR

# Training-domain statistics: principal components kept; the fraction of spectra like the training ones
# above each statistic's threshold (either flags, so at most twice that, 0.1 %, are flagged by chance); and
# the parts the training sample is split into so that the thresholds come from out-of-sample scores.
DOMAIN_COMPONENTS = 10
DOMAIN_FALSE_ALARM = 0.0005
DOMAIN_FOLDS = 5
# DomainScorer's DER_SNR works on this many spectra at a time, its projection on up to PROJECT_ROWS at a time
# (see DomainScorer.scores).
SCORE_ROWS = 128
PROJECT_ROWS = 4096




def der_snr_noise(flux):
    """Noise of each (n, npix) spectrum by DER_SNR, (n,) in flux units; 0 for spectra under 5 pixels.

    Computed in the precision of ``flux`` (float32 input stays float32: half the memory traffic, and the
    median of ~1000 values needs no more than float32's 7 digits)."""
    flux = _working_precision(flux)
    if flux.shape[1] < 5:
        return np.zeros(flux.shape[0])
    second = 2.0 * flux[:, 2:-2]
    second -= flux[:, :-4]
    second -= flux[:, 4:]
    np.abs(second, out=second)
    return DER_SNR_FACTOR * row_medians(second)


def _working_precision(flux):
    """``flux`` as a float32 array when it is float32, else as float64 (the domain statistics' two precisions)."""
    flux = np.asarray(flux)
    return flux if flux.dtype == np.float32 else flux.astype(np.float64, copy=False)


def row_medians(values):
    """Median of each row of a 2-D array, float64; NaN for rows holding NaN (as ``np.median``).

    One ``np.partition`` at the middle element, plus the maximum of the lower half for even lengths: half the
    time of ``np.median``, which partitions at two positions (benchmarks/, pack inference row).  ``values``
    is reordered in place.
    """
    count = values.shape[1]
    middle = count // 2
    values.partition(middle, axis=1)
    median = values[:, middle].astype(np.float64)
    if count % 2 == 0:
        median = 0.5 * (median + values[:, :middle].max(axis=1))
    median[np.isnan(values).any(axis=1)] = np.nan
    return median


class DomainScorer:
    """The training-domain statistics of spectra against one stored domain (:func:`training_domain_statistics`).

    ``scores(flux)``: (n, 2) float64, the noise-corrected residual RMS and the Mahalanobis distance of
    (n, npix) flux; ``outside(flux)``: (n,) bool, either beyond its threshold.  Works in the precision of the
    flux given (float32 or float64).  The projection on the principal components runs as a TensorFlow graph:
    numpy's BLAS threads busy-wait after each product, and in anna-infer, where these statistics run beside
    the network, that spinning took 17 us of CPU per spectrum from it (benchmarks/, pack inference row).
    The graph is traced once per dtype and shared by all scorers (the description goes in as arguments), so
    the DOMAIN_FOLDS scorers of training_domain_statistics, and every model of a process, trace it only once.
    """

    def __init__(self, domain):
        self.domain = domain
        self.components = np.asarray(domain["components"], dtype=np.float64)  # (K, npix), orthonormal rows
        self.reference = np.asarray(domain["reference_spectrum"], dtype=np.float64)
        self.coefficient_mean = np.asarray(domain["coefficient_mean"], dtype=np.float64)
        self.inverse_covariance = np.asarray(domain["coefficient_inverse_covariance"], dtype=np.float64)
        self._tensors = {}

    def _project(self, flux):
        """(coefficients (n, K), residual sum of squares (n,)) of flux - reference, float64."""
        import tensorflow as tf

        if flux.dtype not in self._tensors:
            self._tensors[flux.dtype] = (tf.constant(self.components.astype(flux.dtype)),
                                         tf.constant(self.reference.astype(flux.dtype)))
        coefficients, residual_sum = _projection(flux.dtype)(flux, *self._tensors[flux.dtype])
        return coefficients.numpy().astype(np.float64), residual_sum.numpy().astype(np.float64)

    def scores(self, flux):
        """(n, 2) scores.  The projection runs on up to PROJECT_ROWS spectra per graph call: each call has a
        fixed cost (the thread pool wakes, spins and sleeps), and in 128-row calls that cost was 16 us of CPU per
        1001-pixel spectrum against 7 us for the product itself (benchmarks/, survey-size inference).  DER_SNR's
        numpy work goes SCORE_ROWS spectra at a time, so that its temporaries (second differences, partition)
        stay in the CPU cache and are reused, where whole blocks of a thousand 7214-pixel spectra made fresh
        arrays of 30 MB each, paid for in page faults."""
        flux = _working_precision(flux)
        dof = max(flux.shape[1] - self.components.shape[0], 1)
        result = np.empty((flux.shape[0], 2))
        for block_start in range(0, flux.shape[0], PROJECT_ROWS):
            block = flux[block_start:block_start + PROJECT_ROWS]
            coefficients, residual_sum = self._project(block)
            noise = np.concatenate([der_snr_noise(block[start:start + SCORE_ROWS])
                                    for start in range(0, block.shape[0], SCORE_ROWS)])
            excess = residual_sum / dof - noise ** 2
            offset = coefficients - self.coefficient_mean[None, :]
            mahalanobis = np.einsum("ij,jk,ik->i", offset, self.inverse_covariance, offset)
            rows = slice(block_start, block_start + block.shape[0])
            result[rows, 0] = np.sqrt(np.maximum(excess, 0.0))
            result[rows, 1] = np.sqrt(np.maximum(mahalanobis, 0.0))
        return result

    def outside(self, flux):
        scores = self.scores(flux)
        limits = self.domain["thresholds"]
        return (scores[:, 0] > limits["residual"]) | (scores[:, 1] > limits["mahalanobis"])


_PROJECTIONS = {}


def _projection(dtype):
    """The graph of DomainScorer._project for one dtype: (flux, components, reference) -> (coefficients,
    residual sum of squares)."""
    import tensorflow as tf

    if dtype not in _PROJECTIONS:
        @tf.function(input_signature=[tf.TensorSpec([None, None], dtype), tf.TensorSpec([None, None], dtype),
                                      tf.TensorSpec([None], dtype)], autograph=False)
        def project(values, components, reference):
            centred = values - reference
            coefficients = tf.matmul(centred, components, transpose_b=True)
            residual = centred - tf.matmul(coefficients, components)
            return coefficients, tf.reduce_sum(tf.square(residual), axis=1)

        _PROJECTIONS[dtype] = project
    return _PROJECTIONS[dtype]


def domain_scores(flux, domain):
    """(n, 2) training-domain statistics of (n, npix) flux (see :class:`DomainScorer`)."""
    return DomainScorer(domain).scores(flux)


def training_domain_statistics(flux):
    """The training-domain description stored in a frozen model (module docstring: training-domain rule).

    ``flux`` (n, npix): training spectra as the network saw them (noised as in training).  Returns a
    JSON-ready dict: ``reference_spectrum`` (npix,), ``components`` (K, npix), ``coefficient_mean`` (K,),
    ``coefficient_inverse_covariance`` (K, K), ``thresholds`` (per statistic, the value that a fraction
    DOMAIN_FALSE_ALARM of new spectra like ``flux`` exceed), ``false_alarm`` (that fraction) and ``n``; None
    for fewer than 3 spectra.

    The thresholds come from out-of-sample scores: each of DOMAIN_FOLDS interleaved parts of ``flux`` is
    scored against the description fitted on the other parts, and the description stored is one of those
    (the one that scored the first part), so that new spectra meet a description fitted on as many spectra
    as the ones that set the thresholds.  Spectra scored against a description fitted on themselves are not
    typical of new ones (the principal components absorb part of their noise); and a description fitted on
    more spectra than the fold descriptions has less noise in its components' variances, so new spectra
    reach larger Mahalanobis distances against it.  On line spectra with S/N 10-200, in-sample thresholds at
    99.9 % flagged 2.6 new spectra in 1000, all by the residual (2.6 times its intended rate) and none by the
    distance; thresholds from five folds with the description of all the spectra stored flagged 1.4 in 1000
    on 1001 pixels, the distance twice its intended rate.  The quantile is the one whose exceedance by a
    new draw is unbiased (np.quantile's ``weibull``; with 4000 spectra and 0.05 % practically the second
    largest score, where the ``linear`` default takes the third largest, exceeded 1.5 times as often).
    """
    flux = np.asarray(flux, dtype=np.float64)
    n = flux.shape[0]
    if n < 3:
        return None  # too few spectra to describe a distribution: no outside_training_domain flag
    folds = min(DOMAIN_FOLDS, n)
    part = np.arange(n) % folds
    scores = np.empty((n, 2))
    describer = _Describer(flux)
    for fold in reversed(range(folds)):  # the first part's description last: it is the one stored
        description = describer.describe(part != fold)
        scores[part == fold] = domain_scores(flux[part == fold], description)
    quantiles = np.quantile(scores, 1.0 - DOMAIN_FALSE_ALARM, axis=0, method="weibull")
    return {**description, "thresholds": {"residual": float(quantiles[0]), "mahalanobis": float(quantiles[1])},
            "false_alarm": DOMAIN_FALSE_ALARM, "n": int(n)}


# From this size on, the ten leading eigenpairs of a description's Gram or scatter matrix come from Lanczos
# iteration (scipy.sparse.linalg.eigsh) instead of LAPACK's dense solver (scipy.linalg.eigh, subset): on 2 busy
# cores 0.46-0.54 s against 21-29 s at 3200 rows, 0.02 s against 1.7 s at 400, 0.01 s against 0.05 s at 200.
ITERATIVE_EIGEN_MIN = 200


class _Describer:
    """Descriptions (:func:`_domain_description`) of subsets of one set of (n, npix) float64 spectra, sharing
    the work between them.

    Why: training_domain_statistics fits DOMAIN_FOLDS descriptions, and it runs whenever a frozen model is
    written, a stopped run included, where the user waits for it.  For survey spectra (more pixels than
    spectra) each description rests on the Gram matrix of its spectra; the Gram matrix of a subset, centred on
    the subset's own mean, is a sub-block of the Gram matrix of all the spectra with a rank-two correction, so
    one product of all the spectra serves every fold, and only the ten leading eigenpairs of each block are
    computed, iteratively (ITERATIVE_EIGEN_MIN).  Measured on 2 cores shared with other work, 4000 spectra of
    7214 pixels (the survey case), old and new code interleaved: 21.7-136 s with five (3200, 3200) Gram
    matrices and the dense eigensolver (18.6 s on quiet cores), 4.8-8.2 s this way, of which the one
    (4000, 4000) product takes 3.3-6 s; on 1001 pixels (the scatter-matrix route) 4.1-34 s against 1.0-3.5 s.
    The results agree to rounding (thresholds to 1e-14 relative), up to the sign of each component.

    The spectra are first centred on the mean of all of them: Gram entries of continuum-normalised flux (values
    near 1, variations of 1e-2) would otherwise lose four digits to the later centring.
    """

    def __init__(self, flux):
        self.offset = flux.mean(axis=0)
        self.shifted = flux - self.offset[None, :]
        self.gram = None

    def describe(self, rows):
        """The description of the spectra selected by the boolean mask ``rows`` (at least 2 of them)."""
        rows = np.asarray(rows, dtype=bool)
        n, npix = int(rows.sum()), self.shifted.shape[1]
        count = max(min(DOMAIN_COMPONENTS, n - 1, npix - 1), 1)
        if npix <= n:
            shifted = self.shifted[rows]
            shift = shifted.mean(axis=0)
            centred = shifted - shift[None, :]
            components = np.ascontiguousarray(_leading_eigenvectors(centred.T @ centred, count).T)
            coefficients = centred @ components.T
        else:
            # no copy of the selected spectra: the products run over all of them, with zero weights elsewhere
            shift = rows.astype(np.float64) @ self.shifted / n
            if self.gram is None:
                self.gram = self.shifted @ self.shifted.T  # numpy uses BLAS syrk for this product
            index = np.flatnonzero(rows)
            gram = self.gram[np.ix_(index, index)]
            means = gram.mean(axis=0)  # centring on the selection's mean: G - r 1' - 1 r' + mean(r)
            gram -= means[:, None]
            gram -= means[None, :]
            gram += means.mean()
            vectors, values = _leading_eigenvectors(gram, count, with_values=True)
            scale = np.sqrt(np.maximum(values, np.finfo(np.float64).tiny))
            spread = np.zeros((self.shifted.shape[0], count))
            spread[index] = vectors
            # v = centred.T u / sqrt(lambda), centred = shifted[rows] - shift (the shift term is zero to rounding:
            # each u is orthogonal to the ones vector, the centred Gram matrix's null space)
            components = np.ascontiguousarray(
                ((self.shifted.T @ spread - np.outer(shift, vectors.sum(axis=0))) / scale[None, :]).T)
            coefficients = (self.shifted @ components.T)[index] - (shift @ components.T)[None, :]
        return {"reference_spectrum": (self.offset + shift).tolist(), "components": components.tolist(),
                "coefficient_mean": coefficients.mean(axis=0).tolist(),
                "coefficient_inverse_covariance": np.linalg.pinv(np.atleast_2d(np.cov(coefficients.T))).tolist()}


def _leading_eigenvectors(matrix, count, with_values=False):
    """The ``count`` leading eigenvectors (columns, largest eigenvalue first) of a symmetric matrix, and with
    ``with_values`` their eigenvalues.  Large matrices by Lanczos iteration to machine precision, from a fixed
    starting vector (ARPACK's default start is random: results would differ in the last digits from run to
    run); small ones, or a count too close to the size for Lanczos, by LAPACK."""
    size = matrix.shape[0]
    if size >= ITERATIVE_EIGEN_MIN and count < size // 4:
        import scipy.sparse.linalg

        start = np.random.default_rng(0).standard_normal(size)
        values, vectors = scipy.sparse.linalg.eigsh(matrix, k=count, which="LA", v0=start, tol=0.0)
    else:
        import scipy.linalg

        values, vectors = scipy.linalg.eigh(matrix, subset_by_index=[size - count, size - 1])
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    return (vectors, values) if with_values else vectors


def _domain_description(flux):
    """Mean spectrum, leading principal components and their coefficients' mean and inverse covariance of
    (n >= 2, npix) float64 flux, as JSON-ready lists.

    The components are the leading eigenvectors of the (npix, npix) scatter matrix: the same vectors as the
    SVD of the centred flux (to rounding, up to sign), at a fraction of its time for n >> npix.  For spectra
    with more pixels than there are spectra (survey spectra: 7214 pixels against 3200 per fold) the (n, n)
    Gram matrix gives the same vectors, v = centred.T u / sqrt(lambda): its cost grows as n^2 npix instead of
    npix^3, which at 7214 pixels was minutes per fold.  Only the leading eigenpairs are computed
    (:class:`_Describer`, which also shares the work between the folds)."""
    flux = np.asarray(flux, dtype=np.float64)
    return _Describer(flux).describe(np.ones(flux.shape[0], dtype=bool))


def outside_training_domain(flux, domain):
    """(n,) bool: the spectra beyond either training-domain threshold (all False without a stored domain)."""
    flux = np.asarray(flux)
    if not domain:
        return np.zeros(flux.shape[0], dtype=bool)
    return DomainScorer(domain).outside(flux)
