"""What anna-train writes to TensorBoard: each interval's scalars, and histograms written without TensorBoard's
one-hot counting (whose matrices set anna-train's peak memory).
"""

import numpy as np


# Histograms of 1.3M weights cost ~0.2 s each time (measured, graph or eager alike): log them at the first
# interval, every HISTOGRAM_EVERY intervals and at the end of a stage; scalars go out every interval.
HISTOGRAM_EVERY = 10
HISTOGRAM_BUCKETS = 30  # TensorBoard's default


def histogram_buckets(values, bucket_count=HISTOGRAM_BUCKETS):
    """(bucket_count, 3) float64 rows [left edge, right edge, count]: TensorBoard's histogram data, with its
    rules (equal-width buckets from min to max, the maximum in the last; a single value gives zero-width
    buckets with every count in the last; no values, all-zero rows).

    TensorBoard's own ``tf.summary.histogram`` counts through a one-hot matrix of values x buckets: for the
    1.3 M weights of FC1 that is 0.3 GB, and for conv1's activations 0.6 GB, which set anna-train's peak
    memory (benchmarks/, peak RSS row).  Counting with ``np.bincount`` needs no such matrix.
    """
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    buckets = np.zeros((bucket_count, 3))
    if data.size == 0 or bucket_count <= 0:
        return buckets
    low, high = float(data.min()), float(data.max())
    if high == low:
        buckets[:, :2] = high
        buckets[-1, 2] = data.size
        return buckets
    width = (high - low) / bucket_count
    index = np.minimum(np.floor((data - low) / width).astype(np.int64), bucket_count - 1)
    edges = np.linspace(low, high, bucket_count + 1)
    edges[-1] = high
    buckets[:, 0], buckets[:, 1] = edges[:-1], edges[1:]
    buckets[:, 2] = np.bincount(index, minlength=bucket_count)
    return buckets


def write_histogram(tag, values):
    """A TensorBoard histogram of ``values`` at the default summary step of the active writer."""
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata

    tf.summary.write(tag=tag, tensor=tf.constant(histogram_buckets(values)),
                     metadata=metadata.create_summary_metadata(display_name=None, description=None))


def write_interval_scalars(record):
    """One sample interval's scalars (inside a summary writer's ``as_default(step=...)``): the batch and
    cross-validation costs, the RMS per label, the learning rate, both training rates and the input wait."""
    import tensorflow as tf

    tf.summary.scalar("cost/batch", record["batch_cost"])
    if record["xval_cost"] is not None:
        tf.summary.scalar("cost/xval", record["xval_cost"])
    for name, value in record["rms"].items():
        tf.summary.scalar(f"rms/{name}", value)
    tf.summary.scalar("learning_rate", record["learning_rate"])
    tf.summary.scalar("examples_per_second", record["examples_per_s"])
    tf.summary.scalar("step_examples_per_second", record["step_examples_per_s"])
    tf.summary.scalar("input_wait_fraction", record["input_wait_fraction"])
