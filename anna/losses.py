"""Loss functions: small pure TensorFlow functions, each tested on its own (as astroNN keeps its losses).

All take normalised labels ``y_true`` (batch, nout), predictions, and a ``mask`` (batch, nout) that is 1 where
a label is present and 0 where it is missing.  Following astroNN (Leung & Bovy 2019, eq. 6-7) a star's loss
is averaged over its present labels only, and stars with no label present are left out of the batch mean
rather than contributing 0/0.
"""

import tensorflow as tf

# Bounds on the predicted log-variance: keep exp(-s) and s finite whatever the network emits early in training.
LOG_VARIANCE_MIN = -20.0
LOG_VARIANCE_MAX = 10.0


def _mean_over_present(per_label, mask):
    """Mean over present labels per star, then mean over stars that have any label."""
    present = tf.reduce_sum(mask, axis=-1)
    per_star = tf.reduce_sum(per_label * mask, axis=-1) / tf.maximum(present, 1.0)
    has_label = tf.cast(present > 0, per_star.dtype)
    return tf.reduce_sum(per_star * has_label) / tf.maximum(tf.reduce_sum(has_label), 1.0)


def masked_squared_error(y_true, y_pred, mask):
    """ANNA's cost: squared error on normalised labels, missing labels excluded.  Scalar."""
    diff = tf.where(mask > 0, y_pred - y_true, tf.zeros_like(y_pred))
    return _mean_over_present(tf.square(diff), mask)


def robust_heteroscedastic(y_true, y_pred, log_variance, mask, known_variance=None):
    """astroNN's robust loss J = ½(ŷ−y)² e^(−s) + ½ s with s = ln(σ²_known + e^(log_variance)).

    ``log_variance`` (batch, nout) is the network's predicted ln σ², clipped to a safe range; ``known_variance``
    (batch, nout) is the labels' own variance (zero when absent).  Missing labels are excluded.  Scalar.
    """
    log_variance = tf.clip_by_value(log_variance, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)
    variance = tf.exp(log_variance)
    if known_variance is not None:
        variance = variance + known_variance
    s = tf.math.log(variance)
    diff = tf.where(mask > 0, y_pred - y_true, tf.zeros_like(y_pred))
    per_label = 0.5 * tf.square(diff) * tf.exp(-s) + 0.5 * s
    return _mean_over_present(per_label, mask)
