"""The loss functions, each a small pure function with its edge cases (missing labels, empty stars, gradients)."""

import numpy as np
import pytest
import tensorflow as tf

from anna.losses import LOG_VARIANCE_MAX, masked_squared_error, robust_heteroscedastic


def t(x):
    return tf.constant(np.asarray(x, dtype=np.float32))


def test_squared_error_matches_numpy_when_complete():
    y, p = np.array([[0.1, 0.5], [0.9, 0.2]]), np.array([[0.2, 0.3], [0.6, 0.2]])
    loss = masked_squared_error(t(y), t(p), t(np.ones_like(y)))
    assert float(loss) == pytest.approx(np.mean((y - p) ** 2), rel=1e-6)


def test_missing_labels_are_renormalised_per_star():
    y = np.array([[0.1, 99.0], [0.9, 0.2]])  # 99 is a missing label: must not count
    p = np.array([[0.3, 0.0], [0.6, 0.2]])
    mask = np.array([[1, 0], [1, 1]])
    expected = np.mean([(0.2 ** 2) / 1, (0.3 ** 2 + 0) / 2])
    assert float(masked_squared_error(t(y), t(p), t(mask))) == pytest.approx(expected, rel=1e-5)


def test_star_without_labels_is_skipped_not_nan():
    y = np.array([[np.nan, np.nan], [0.5, 0.5]])
    p = np.array([[0.0, 0.0], [0.7, 0.5]])
    mask = np.array([[0, 0], [1, 1]])
    loss = masked_squared_error(t(y), t(p), t(mask))
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(0.02, rel=1e-5)
    assert float(masked_squared_error(t(y[:1]), t(p[:1]), t(mask[:1]))) == 0.0


def test_gradients_finite_with_missing_labels():
    y = t([[np.nan, 0.5]])
    p = tf.Variable([[0.1, 0.2]])
    with tf.GradientTape() as tape:
        loss = masked_squared_error(y, p, t([[0, 1]]))
    grad = tape.gradient(loss, p).numpy()
    assert np.all(np.isfinite(grad)) and grad[0, 0] == 0 and grad[0, 1] == pytest.approx(2 * (0.2 - 0.5), rel=1e-5)


def test_robust_loss_formula_and_known_variance():
    y, p, s = 0.5, 0.8, np.log(0.04)
    loss = robust_heteroscedastic(t([[y]]), t([[p]]), t([[s]]), t([[1]]))
    assert float(loss) == pytest.approx(0.5 * (p - y) ** 2 / 0.04 + 0.5 * s, rel=1e-5)
    known = 0.01
    loss = robust_heteroscedastic(t([[y]]), t([[p]]), t([[s]]), t([[1]]), known_variance=t([[known]]))
    total = 0.04 + known
    assert float(loss) == pytest.approx(0.5 * (p - y) ** 2 / total + 0.5 * np.log(total), rel=1e-5)


def test_robust_loss_clips_log_variance_and_stays_finite():
    log_var = tf.Variable([[1e4, -1e4]])
    with tf.GradientTape() as tape:
        loss = robust_heteroscedastic(t([[0.5, 0.5]]), t([[0.0, 1.0]]), log_var, t([[1, 1]]))
    assert np.isfinite(float(loss))
    assert float(loss) >= 0.5 * LOG_VARIANCE_MAX * 0.5 - 1  # clipped, not 1e4
    assert np.all(np.isfinite(tape.gradient(loss, log_var).numpy()))


def test_robust_loss_ignores_missing():
    full = robust_heteroscedastic(t([[0.5, 0.1]]), t([[0.4, 0.9]]), t([[0.0, 0.0]]), t([[1, 0]]))
    single = robust_heteroscedastic(t([[0.5]]), t([[0.4]]), t([[0.0]]), t([[1]]))
    assert float(full) == pytest.approx(float(single), rel=1e-6)
