"""The training step with a variance head (UNCERTAINTY: MC_DROPOUT) against its straightforward formulation.

anna.train.steps runs the layers before the first dropout once for both of a step's passes and takes DER_SNR's
median by selection; here a step written the plain way (two whole passes of the network, the layer's own
sort) is the oracle: same cost, same loss, same weight update (SGD at learning rate 1, so the update is the
gradient), same parts for the variance-bias refit, with the same dropout masks (fixed dropout seed).
"""

import numpy as np
import pytest

from anna.model import ConvLayer, LogNoiseVariance, NetworkSpec, build_network

NOUT = 3
BATCH = 24


def two_pass_step(network, optimizer, nout, jit):
    """The step as first written: the whole network once without dropout (reported value, variance head and
    its parts) and once with dropout (label loss), both under the tape."""
    import keras
    import tensorflow as tf

    from anna.losses import masked_squared_error, robust_heteroscedastic

    stepper = keras.Model(network.input, [network.outputs[0]] + [
        network.get_layer(name).output for name in ("log_variance_fit", "log_noise_gain", "log_noise_variance")])

    @tf.function(jit_compile=jit, autograph=False)
    def step(flux, labels, mask):
        with tf.GradientTape() as tape:
            plain, log_var_fit, log_gain, log_noise_sq = stepper(flux, training=False)
            reported = tf.stop_gradient(plain[:, :nout])
            log_variance = plain[:, nout:]
            out = network(flux, training=True)[:, :nout]
            cost = masked_squared_error(labels, out, mask)
            loss = (robust_heteroscedastic(labels, out, tf.stop_gradient(log_variance), mask)
                    + robust_heteroscedastic(labels, reported, log_variance, mask))
        grads = tape.gradient(loss, network.trainable_variables)
        parts = tf.stack([tf.square(labels - reported) * mask, tf.exp(log_var_fit),
                          tf.exp(log_gain + log_noise_sq), mask])
        dropout_effect = tf.reduce_mean(tf.abs(out - reported))
        with tf.control_dependencies([parts, dropout_effect]):  # both from the weights before the update
            optimizer.apply_gradients(zip(grads, network.trainable_variables))
        return cost, parts, dropout_effect

    return step


def twin_networks(spec, seed=4):
    """Two copies of ``spec``'s network with the same random weights (biases too, so every path carries signal)
    and the same dropout seed, each with SGD at learning rate 1."""
    import keras

    rng = np.random.default_rng(seed)
    networks = [build_network(spec, dropout_rate=0.3, dropout_seed=5) for _ in range(2)]
    weights = [(0.3 * rng.standard_normal(w.shape) / np.sqrt(max(1, np.prod(w.shape[:-1])) / 4)).astype(np.float32)
               for w in networks[0].get_weights()]
    weights[0] = np.ones_like(weights[0])  # the centre
    optimizers = []
    for network in networks:
        network.set_weights(weights)
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
        optimizer.build(network.trainable_variables)
        optimizers.append(optimizer)
    return networks, optimizers


def batch_chunk(npix, chunk_batches=2, seed=8):
    """A chunk of ``chunk_batches`` batches: lined spectra with noise of S/N 20-200, labels, a fifth missing."""
    rng = np.random.default_rng(seed)
    n = chunk_batches * BATCH
    pixels = np.arange(npix)
    flux = 1.0 - 0.4 * np.exp(-0.5 * ((pixels[None, :] - rng.uniform(0, npix, (n, 1))) / 3.0) ** 2)
    flux += rng.standard_normal((n, npix)) / rng.uniform(20, 200, (n, 1))
    labels = rng.uniform(0, 1, (n, NOUT))
    mask = (rng.uniform(size=(n, NOUT)) > 0.2).astype(np.float32)
    shape = (chunk_batches, BATCH)
    return (flux.astype(np.float32).reshape(shape + (npix,)), labels.astype(np.float32).reshape(shape + (NOUT,)),
            mask.reshape(shape + (NOUT,)))


SPECS = {
    # dropout after the dense layers only: the trunk runs through fc1
    "dense dropout": NetworkSpec(npix=64, nout=NOUT, conv_layers=(ConvLayer(4, 5), ConvLayer(6, 3, pool=2)),
                                 fc_dims=(16, 8), heteroscedastic=True),
    # conv dropout after the first convolution ("4x5d" in CONV_LAYERS): the trunk is the centring and conv1,
    # and conv2, the pooling and every dense layer run in both passes
    "conv dropout": NetworkSpec(npix=64, nout=NOUT, conv_layers=(ConvLayer(4, 5, dropout=True),
                                                                 ConvLayer(6, 3, pool=2)),
                                fc_dims=(16, 8), heteroscedastic=True),
    # conv dropout after the second (pooled) convolution, an odd pixel count (odd DER_SNR sample)
    "late conv dropout": NetworkSpec(npix=65, nout=NOUT, conv_layers=(ConvLayer(4, 5), ConvLayer(6, 3, pool=2,
                                                                                              dropout=True)),
                                     fc_dims=(12,), heteroscedastic=True),
}


# every network and every compiled form, each form at least once with conv dropout (XLA compiles are slow)
@pytest.mark.parametrize("name, form", [("dense dropout", "xla"), ("conv dropout", "graph"),
                                        ("conv dropout", "xla_step"), ("late conv dropout", "xla"),
                                        ("late conv dropout", "graph")])
def test_variance_head_step_equals_two_whole_passes(name, form):
    import tensorflow as tf

    from anna.train.steps import make_train_steps

    spec = SPECS[name]
    (network, oracle_network), (optimizer, oracle_optimizer) = twin_networks(spec)
    assert any("dropout" in n for n in spec.chain()[:spec.chain().index("flatten")]) == (name != "dense dropout")
    flux, labels, mask = batch_chunk(spec.npix)
    chunk = tuple(tf.constant(a) for a in (flux, labels, mask))
    steps = make_train_steps(network, optimizer, spec, chunk_batches=2, batch_size=BATCH, compiled_form=form)
    oracle = two_pass_step(oracle_network, oracle_optimizer, NOUT, jit=form != "graph")

    before = [w.numpy().copy() for w in network.trainable_variables]
    for index in range(2):  # two steps: the second starts from updated weights and the next dropout masks
        costs, parts = steps(chunk, index, 1)
        cost, expected_parts, dropout_effect = oracle(*(a[index] for a in chunk))
        assert float(dropout_effect) > 1e-3  # the dropout pass differs from the reported value
        assert float(costs[0]) == pytest.approx(float(cost), rel=2e-5)  # results start at the first step run
        # float32 rounding of two arrangements of the same sums (a wrongly shared trunk differs by O(1))
        np.testing.assert_allclose(parts.numpy()[0], expected_parts.numpy(), rtol=1e-4, atol=1e-6)
        for mine, theirs, start in zip(network.trainable_variables, oracle_network.trainable_variables, before):
            update, expected = start - mine.numpy(), start - theirs.numpy()
            scale = max(np.abs(expected).max(), 1e-6)
            np.testing.assert_allclose(update, expected, rtol=1e-4, atol=2e-5 * scale, err_msg=mine.name)
        before = [w.numpy().copy() for w in network.trainable_variables]
        assert any(np.abs(b).max() > 0 for b in before)


def sorted_log_noise_variance(flux):
    """DER_SNR's ln noise² with the median taken from a full sort: how the layer computed it before selection."""
    import tensorflow as tf

    from anna.model import DER_SNR_FACTOR, NOISE_FLOOR

    if flux.shape[-1] < 5:
        return tf.fill([tf.shape(flux)[0], 1], tf.constant(2.0 * np.log(NOISE_FLOOR), flux.dtype))
    second = tf.abs(2.0 * flux[:, 2:-2] - flux[:, :-4] - flux[:, 4:])
    ordered = tf.sort(second, axis=-1)
    count = tf.shape(ordered)[-1]
    median = 0.5 * (tf.gather(ordered, (count - 1) // 2, axis=-1) + tf.gather(ordered, count // 2, axis=-1))
    return tf.math.log(tf.square(DER_SNR_FACTOR * median) + NOISE_FLOOR**2)[:, None]


@pytest.mark.parametrize("jit", [False, True])
def test_log_noise_variance_equals_the_sorted_median_exactly(jit):
    """The DER_SNR term by selection (the LogNoiseVariance layer, the training step, MC dropout) is bit for bit
    the one a sort gives, for odd and even sample sizes, ties, all-equal spectra (zero differences), spectra
    under 5 pixels, and the survey length."""
    import tensorflow as tf

    from anna.model import log_noise_variance

    layer = LogNoiseVariance()
    rng = np.random.default_rng(3)
    for npix in (3, 6, 65, 7214):
        flux = (1.0 + rng.choice([1e-3, 1e-2, 0.3], (12, 1))
                * rng.standard_normal((12, npix))).astype(np.float32)
        flux[1] = 1.0          # every second difference 0
        flux[2, ::3] = 1.5     # ties
        flux[3] = np.round(flux[3], 2)
        expected = tf.function(sorted_log_noise_variance, jit_compile=jit)(tf.constant(flux)).numpy()
        got = tf.function(log_noise_variance, jit_compile=jit)(tf.constant(flux)).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"npix {npix}")
        np.testing.assert_array_equal(tf.function(lambda f: layer(f), jit_compile=jit)(flux).numpy(), expected)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("width", [1, 2, 7, 10, 997, 7210])
def test_row_median_is_the_sorted_middle(width, jit):
    """The middle order statistics a sort gives, and their mean in TensorFlow's float32 (which flushes
    denormals), also for rows spanning the whole float range (0 to inf: the bisection's widest interval)."""
    import tensorflow as tf

    from anna.model import row_median

    rng = np.random.default_rng(width)
    values = np.abs(rng.standard_normal((9, width)) * rng.choice([1e-30, 1e-3, 1.0, 1e30], (9, 1)))
    values = values.astype(np.float32)
    values[1] = 0.0
    values[2, ::2] = np.inf
    values[2, 1::4] = 0.0
    values[3] = np.float32(1e-42) * np.arange(width)  # denormals
    values[4, :width // 2] = np.finfo(np.float32).max
    ordered = np.sort(values, axis=1)
    middle = [tf.constant(ordered[:, (width - 1) // 2]), tf.constant(ordered[:, width // 2])]
    expected = tf.function(lambda a, b: 0.5 * (a + b), jit_compile=jit)(*middle).numpy()
    got = tf.function(row_median, jit_compile=jit)(tf.constant(values)).numpy()
    np.testing.assert_array_equal(got, expected)
