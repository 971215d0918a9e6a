"""The network builder's first convolution: same result and gradients as keras' Conv1D, whatever the shape."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anna.model import NetworkSpec, SpectrumConv1D, build_network


def _reference_and_tiled(npix, width, kernels, seed):
    rng = np.random.default_rng(seed)
    flux = tf.constant(rng.normal(size=(3, npix)).astype(np.float32))
    tiled = SpectrumConv1D(kernels, width)
    tiled.build((None, npix))
    reference = keras.layers.Conv1D(kernels, width, padding="same", activation="relu")
    reference.build((None, npix, 1))
    kernel = rng.normal(size=(width, 1, kernels)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=kernels).astype(np.float32)
    tiled.set_weights([kernel, bias])
    reference.set_weights([kernel, bias])
    return flux, tiled, reference


@pytest.mark.parametrize("npix, width, kernels", [
    (1001, 45, 10),   # the tutorial network
    (64, 7, 3),       # npix a whole number of tiles
    (50, 8, 2),       # even width: TensorFlow puts the odd padding pixel on the right
    (5, 9, 4),        # kernel wider than the spectrum
    (17, 1, 1),       # width 1
])
def test_spectrum_conv_matches_keras_conv1d(npix, width, kernels):
    flux, tiled, reference = _reference_and_tiled(npix, width, kernels, seed=npix + width)
    expected = reference(flux[:, :, None]).numpy()
    got = tiled(flux).numpy()
    assert got.shape == expected.shape == (3, npix, kernels)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_spectrum_conv_gradients_match_keras_conv1d():
    flux, tiled, reference = _reference_and_tiled(203, 45, 10, seed=7)
    weights = tf.constant(np.random.default_rng(8).normal(size=(3, 203, 10)).astype(np.float32))
    grads = []
    for layer, inputs in ((tiled, flux), (reference, flux[:, :, None])):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(inputs) * weights)
        grads.append([g.numpy() for g in tape.gradient(loss, layer.trainable_variables)])
    for got, expected in zip(*grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_built_network_keeps_conv1d_weight_layout():
    """Frozen models store weights in builder order: the first conv keeps Conv1D's (width, 1, kernels) kernel."""
    network = build_network(NetworkSpec(npix=120, nout=2, conv_layers=((9, 4), (5, 3)), fc_dims=(8, 8)))
    kernel, bias = network.get_layer("conv1").get_weights()
    assert kernel.shape == (9, 1, 4) and bias.shape == (4,)
    assert network.get_layer("conv2").get_weights()[0].shape == (5, 4, 3)
    assert network.output_shape == (None, 2)
