"""The parts of anna-train's stage loop, each on its own: the cross-validation evaluator, the interval line,
the TensorBoard scalars of an interval.  (Early stopping, schedules and checkpoints: tests/test_schedules.py;
histograms: tests/test_histograms.py; the whole loop: tests/test_train.py.)"""

import math

import numpy as np
import pytest

from anna.train.evaluation import make_evaluator
from anna.train.stage import interval_line
from anna.train.summaries import write_interval_scalars


def _linear_network(weights, bias):
    """A Keras network computing flux @ weights + bias exactly (no activation)."""
    import keras

    flux = keras.Input(shape=(weights.shape[0],))
    layer = keras.layers.Dense(weights.shape[1])
    network = keras.Model(flux, layer(flux))
    layer.set_weights([weights.astype(np.float32), bias.astype(np.float32)])
    return network


def test_evaluator_cost_and_rms_match_a_direct_computation_with_missing_labels():
    rng = np.random.default_rng(5)
    npix, nout, n = 12, 3, 50
    weights, bias = rng.normal(size=(npix, nout)) * 0.1, rng.normal(size=nout) * 0.1
    flux = rng.normal(1.0, 0.05, size=(n, npix)).astype(np.float32)
    labels = rng.uniform(0, 1, size=(n, nout))
    mask = (rng.uniform(size=(n, nout)) > 0.2).astype(np.float64)
    mask[7] = 0.0  # a star with no label at all is left out of the cost, not counted as zero
    span = np.array([3000.0, 2.0, 0.5])
    evaluate = make_evaluator(_linear_network(weights, bias), npix, nout, span, batch=16)  # 4 batches
    cost, rms = evaluate(flux, labels, mask)

    predicted = flux.astype(np.float64) @ weights.astype(np.float32).astype(np.float64) + bias.astype(np.float32)
    d2 = (predicted - labels) ** 2 * mask
    present = mask.sum(axis=1)
    expected_cost = np.mean(d2.sum(axis=1)[present > 0] / present[present > 0])
    expected_rms = np.sqrt(d2.sum(axis=0) / mask.sum(axis=0)) * span
    assert cost == pytest.approx(expected_cost, rel=1e-5)
    np.testing.assert_allclose(rms, expected_rms, rtol=1e-5)


def test_evaluator_of_a_set_without_labels_reports_nan_cost():
    evaluate = make_evaluator(_linear_network(np.ones((4, 2)), np.zeros(2)), 4, 2, np.ones(2))
    cost, rms = evaluate(np.ones((3, 4), np.float32), np.zeros((3, 2)), np.zeros((3, 2)))
    assert math.isnan(cost) and np.all(rms == 0.0)


RECORD = {"stage": 1, "iteration": 250, "global_step": 250, "batch_cost": 0.0123456, "xval_cost": 0.0234567,
          "rms": {"teff": 81.234, "logg": 0.20731}, "learning_rate": 3.5e-4, "examples_per_s": 9876.4,
          "step_examples_per_s": 10234.0, "input_wait_fraction": 0.012, "elapsed_s": 12.0}


def test_interval_line_says_costs_best_rms_rate_and_speed():
    line = interval_line(RECORD, improved=True, show_rate=True)
    assert line == ("stage 1 iter    250: batch cost 0.0123456 xval cost 0.0234567 * | RMS teff=81.23 "
                    "logg=0.2073 | lr 0.00035 | 9876 ex/s")
    plain = interval_line(dict(RECORD, xval_cost=None), improved=False, show_rate=False)
    assert "xval" not in plain and "lr" not in plain and " * " not in plain and plain.endswith("| 9876 ex/s")


def test_interval_scalars_read_back_by_tensorboards_own_reader(tmp_path):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default(step=RECORD["global_step"]):
        write_interval_scalars(RECORD)
    writer.flush()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    expected = {"cost/batch": RECORD["batch_cost"], "cost/xval": RECORD["xval_cost"], "rms/teff": 81.234,
                "rms/logg": 0.20731, "learning_rate": 3.5e-4, "examples_per_second": 9876.4,
                "step_examples_per_second": 10234.0, "input_wait_fraction": 0.012}
    assert set(accumulator.Tags()["tensors"]) == set(expected)
    for tag, value in expected.items():
        (event,) = accumulator.Tensors(tag)
        assert event.step == 250 and float(tf.make_ndarray(event.tensor_proto)) == pytest.approx(value, rel=1e-6)
