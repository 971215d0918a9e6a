"""The network builder's own convolutions (the first, and the training network's later ones under XLA): same
result and gradients as keras' Conv1D, whatever the shape."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anna.model import BandedConv1D, ConvLayer, NetworkSpec, SpectrumConv1D, build_network


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


@pytest.mark.parametrize("npix, width, channels, kernels", [
    (7214, 8, 4, 16),   # StarNet2017's second convolution on APOGEE-size spectra
    (64, 3, 2, 5),      # npix a whole number of tiles
    (50, 9, 3, 2),      # the widest kernel a tile can borrow for (width - 1 = TILE)
    (5, 4, 6, 3),       # kernel nearly as wide as the spectrum, even width
    (17, 1, 2, 1),      # width 1
])
@pytest.mark.parametrize("jit", [False, True])
def test_banded_conv_values_and_gradients_match_keras_conv1d(npix, width, channels, kernels, jit):
    """BandedConv1D gives Keras' Conv1D values and gradients, for the weights and for the input (which the
    convolutions before it learn through), with and without XLA."""
    rng = np.random.default_rng(npix + width)
    x = tf.constant(rng.normal(size=(3, npix, channels)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(3, npix, kernels)).astype(np.float32))
    banded, reference = BandedConv1D(kernels, width), keras.layers.Conv1D(kernels, width, padding="same",
                                                                          activation="relu")
    banded.build((None, npix, channels))
    reference.build((None, npix, channels))
    values = [rng.normal(scale=0.5, size=(width, channels, kernels)).astype(np.float32),
              rng.normal(scale=0.1, size=kernels).astype(np.float32)]
    results = []
    for layer in (banded, reference):
        layer.set_weights(values)

        @tf.function(jit_compile=jit, autograph=False)
        def value_and_grads(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = layer(x)
                loss = tf.reduce_sum(out * weights)
            return [out] + tape.gradient(loss, [x] + layer.trainable_variables)

        results.append([t.numpy() for t in value_and_grads(x)])
    assert results[0][0].shape == (3, npix, kernels)
    for got, expected in zip(*results):
        # a weight gradient sums 3 x npix products (values up to ~250 at 7214 px): float32 sums in another
        # order differ by ~1e-6 of that scale, which one CPU type showed as 2.7e-4 on an element of 0.11; a
        # wrong tap or edge is off by O(1) or more
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=max(1e-4, 1e-5 * np.abs(expected).max()))


def test_banded_conv_only_in_the_training_network_under_xla():
    """The training network under XLA computes the later convolutions with BandedConv1D, the frozen model's
    network (and the training network without XLA, or with a stride) with Keras' Conv1D: same weight layout."""
    spec = NetworkSpec(npix=120, nout=2, conv_layers=(ConvLayer(4, 9), ConvLayer(6, 5, pool=2),
                                                      ConvLayer(3, 3, stride=2)), fc_dims=(8,))
    kinds = {}
    for form, for_training in (("xla", True), ("xla_step", True), ("graph", True), ("xla", False)):
        network = build_network(spec, compiled_form=form, for_training=for_training)
        kinds[form, for_training] = [type(network.get_layer(name)).__name__ for name in ("conv2", "conv3")]
        assert network.get_layer("conv2").get_weights()[0].shape == (5, 4, 6)
    assert kinds["xla", True] == kinds["xla_step", True] == ["BandedConv1D", "Conv1D"]
    assert kinds["graph", True] == kinds["xla", False] == ["Conv1D", "Conv1D"]
