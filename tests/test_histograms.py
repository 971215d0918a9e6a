"""anna-train's TensorBoard histograms: the same buckets as TensorBoard's own summary, without its one-hot."""

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.histogram.summary_v2 import _buckets as tensorboard_buckets

from anna.train import histogram_buckets


@pytest.mark.parametrize("values", [
    np.random.default_rng(1).normal(size=(300, 7)),          # weights-like
    np.maximum(np.random.default_rng(2).normal(size=5000), 0),  # ReLU activations: many exact zeros
    np.arange(31.0),                                          # values on bucket edges
    np.full(10, 2.5),                                         # a single value
    np.array([]),                                             # nothing
])
def test_buckets_equal_tensorboards(values):
    expected = tensorboard_buckets(tf.constant(values, dtype=tf.float64), tf.constant(30)).numpy()
    got = histogram_buckets(values)
    assert got.shape == expected.shape == (30, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert got[:, 2].sum() == values.size
