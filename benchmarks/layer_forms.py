"""Each layer's implementations timed alone, at the tutorial's and the surveys' spectrum lengths.

    python benchmarks/layer_forms.py [--quick]

For every layer with more than one implementation in anna.model, and for the layers that have one, the time
of a forward and backward pass (gradients with respect to the input and the weights, batch 100) is measured
at 1001, 3909 (LAMOST-like) and 7214 (APOGEE-like) pixels, without XLA (graph) and with XLA, median of
several repeats.  The builder's choice for each compiled form is the fastest row here:

* first convolution (one input channel): ``SpectrumConv1D`` (banded matrix products) against Keras' Conv1D on
  (batch, npix, 1), for StarNet's 4 x 8 px and the tutorial's 10 x 45 px;
* a convolution with several input channels (StarNet's second, 4 -> 16 channels x 8 px): Keras' Conv1D, and
  the same as one matrix product over gathered windows (im2col), which the builder does not use;
* max-pooling over 4 pixels of 16 channels: ``SpectrumMaxPool1D``'s "graph" form (TensorFlow's pooling
  kernel) and "xla" form (a max over a reshaped axis);
* dense layers (the flattened StarNet activations into 256 units) have one implementation, timed for scale.

Nothing is asserted; the printed table is the measurement.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LENGTHS = (1001, 3909, 7214)
BATCH = 100


def _im2col_conv(kernels, width):
    import keras
    import tensorflow as tf

    class Im2colConv1D(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(width, int(input_shape[-1]), kernels), initializer="he_normal")
            self.bias = self.add_weight(shape=(kernels,), initializer="zeros")

        def call(self, x):
            left = (width - 1) // 2
            padded = tf.pad(x, [[0, 0], [left, width - 1 - left], [0, 0]])
            n = x.shape[1]
            columns = tf.concat([padded[:, i:i + n, :] for i in range(width)], axis=-1)
            out = tf.matmul(tf.reshape(columns, [-1, columns.shape[-1]]), tf.reshape(self.kernel, [-1, kernels]))
            return tf.nn.relu(tf.reshape(out, [-1, n, kernels]) + self.bias)

    return Im2colConv1D()


def candidates(npix):
    """(layer, implementation, input shape, factory) rows."""
    import keras

    from anna.model import SpectrumConv1D, SpectrumMaxPool1D

    def keras_first_conv(kernels, width):
        def make():
            return keras.Sequential([keras.layers.Reshape((npix, 1)),
                                     keras.layers.Conv1D(kernels, width, padding="same", activation="relu")])
        return make

    rows = []
    for kernels, width in ((4, 8), (10, 45)):
        layer = f"first conv {kernels}x{width}"
        rows.append((layer, "SpectrumConv1D (banded)", (npix,), lambda k=kernels, w=width: SpectrumConv1D(k, w)))
        rows.append((layer, "Keras Conv1D", (npix,), keras_first_conv(kernels, width)))
    rows.append(("conv 4->16 ch x8", "Keras Conv1D", (npix, 4),
                 lambda: keras.layers.Conv1D(16, 8, padding="same", activation="relu")))
    rows.append(("conv 4->16 ch x8", "im2col matmul (not used)", (npix, 4), lambda: _im2col_conv(16, 8)))
    for form in ("graph", "xla"):
        rows.append(("max-pool 4, 16 ch", f"SpectrumMaxPool1D {form}", (npix, 16),
                     lambda f=form: SpectrumMaxPool1D(4, compiled_form=f)))
    rows.append(("dense", f"Dense {npix // 4 * 16}->256", (npix // 4 * 16,),
                 lambda: keras.layers.Dense(256, activation="relu")))
    return rows


def time_layer(factory, shape, jit, repeats):
    import numpy as np
    import tensorflow as tf

    layer = factory()
    x = tf.constant(np.random.default_rng(0).uniform(0.5, 1.0, size=(BATCH,) + shape).astype(np.float32))
    layer(x)

    @tf.function(jit_compile=jit, autograph=False)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x] + layer.trainable_weights)

    step(x)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        grads = step(x)
        grads[0].numpy()
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    from anna.runtime import configure_threads

    configure_threads()
    repeats = 3 if args.quick else 9
    print(f"{'layer':<20} {'implementation':<28} {'npix':>5} {'graph ms':>9} {'XLA ms':>8}")
    for npix in LENGTHS:
        for layer, implementation, shape, factory in candidates(npix):
            graph = time_layer(factory, shape, False, repeats)
            xla = time_layer(factory, shape, True, repeats)
            print(f"{layer:<20} {implementation:<28} {npix:>5} {graph:>9.2f} {xla:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
