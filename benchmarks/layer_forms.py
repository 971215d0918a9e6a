"""Each layer's implementations timed alone, at the tutorial's and the surveys' spectrum lengths.

    python benchmarks/layer_forms.py [--quick]

For every layer with more than one implementation in anna.model, and for the layers that have one, the time
of a forward and backward pass (gradients with respect to the input and the weights, batch 100) is measured
at 1001, 3909 (LAMOST-like) and 7214 (APOGEE-like) pixels, without XLA (graph) and with XLA, median of
several repeats, and the forward pass alone with XLA (what prediction runs).  The builder's choice for each
compiled form, for training (forward and backward) and for prediction (forward), is the fastest row here:

* first convolution (one input channel): ``SpectrumConv1D`` (banded matrix products) against Keras' Conv1D on
  (batch, npix, 1), for StarNet's 4 x 8 px and the tutorial's 10 x 45 px;
* a convolution with several input channels (StarNet's second, 4 -> 16 channels x 8 px): Keras' Conv1D,
  ``BandedConv1D`` (the training network's under XLA: ``SpectrumConv1D``'s banded matrices over several input
  channels), and one matrix product over gathered windows (im2col), which the builder does not use;
* max-pooling over 4 pixels of 16 channels: ``SpectrumMaxPool1D``'s "graph" form (TensorFlow's pooling
  kernel) and "xla" form (a max over a reshaped axis);
* dense layers (the flattened StarNet activations into 256 units) have one implementation, timed for scale.

Then the same choice in a whole network: a StarNet-shaped network's XLA training step (forward, backward and
Adam, batch 100) and its XLA forward pass (batch 256, as prediction runs it) with the second convolution as
Keras' Conv1D against ``BandedConv1D``, at 3909 and 7214 px, in alternating rounds, so a change of machine
speed shows in both.  Last, anna-train's own training steps (``anna.train.steps.make_train_steps``) for the
same network at 7214 px, in the two XLA forms JIT_COMPILE AUTO chooses between: one compiled call per chunk
of 10 steps ("xla", a while loop inside XLA) and one compiled call per step ("xla_step"), again with either
second convolution in alternating rounds.  Inside XLA's loop Keras' Conv1D ran about 10x slower than alone;
this is the measurement behind the training network's ``BandedConv1D``.

Nothing is asserted; the printed tables are the measurement.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import starnet_spec  # noqa: E402

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

    from anna.model import BandedConv1D, SpectrumConv1D, SpectrumMaxPool1D

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
    rows.append(("conv 4->16 ch x8", "BandedConv1D", (npix, 4), lambda: BandedConv1D(16, 8)))
    for form in ("graph", "xla"):
        rows.append(("max-pool 4, 16 ch", f"SpectrumMaxPool1D {form}", (npix, 16),
                     lambda f=form: SpectrumMaxPool1D(4, compiled_form=f)))
    rows.append(("dense", f"Dense {npix // 4 * 16}->256", (npix // 4 * 16,),
                 lambda: keras.layers.Dense(256, activation="relu")))
    return rows


def time_layer(factory, shape, jit, repeats, backward=True):
    import numpy as np
    import tensorflow as tf

    layer = factory()
    x = tf.constant(np.random.default_rng(0).uniform(0.5, 1.0, size=(BATCH,) + shape).astype(np.float32))
    layer(x)

    @tf.function(jit_compile=jit, autograph=False)
    def step(x):
        if not backward:
            return [layer(x)]
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


def whole_step_ms(npix, for_training, steps):
    """Median ms of a StarNet-shaped network's XLA training step (batch 100) and XLA forward pass (batch 256);
    ``for_training`` builds the training network (BandedConv1D for the second convolution), else the
    prediction network (Keras' Conv1D)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from anna.model import build_network

    spec = starnet_spec(npix)
    keras.utils.set_random_seed(1)
    network = build_network(spec, compiled_form="xla", for_training=for_training)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(network.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0.5, 1.0, size=(BATCH, npix)).astype(np.float32))
    y = tf.constant(rng.uniform(size=(BATCH, 5)).astype(np.float32))

    @tf.function(jit_compile=True, autograph=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(network(x, training=True) - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, network.trainable_variables), network.trainable_variables))
        return loss

    @tf.function(jit_compile=True, autograph=False)
    def forward(x):
        return network(x, training=False)

    many = tf.constant(rng.uniform(0.5, 1.0, size=(256, npix)).astype(np.float32))
    for _ in range(3):
        step(x, y).numpy()
        forward(many).numpy()
    times = {"step": [], "forward": []}
    for _ in range(steps):
        tic = time.perf_counter()
        step(x, y).numpy()
        toc = time.perf_counter()
        forward(many).numpy()
        times["step"].append(toc - tic)
        times["forward"].append(time.perf_counter() - toc)
    return statistics.median(times["step"]) * 1e3, statistics.median(times["forward"]) * 1e3


def training_steps_rate(npix, for_training, form, seconds):
    """Examples/s of anna-train's training steps (make_train_steps, Adam, batch BATCH) for a StarNet-shaped
    network in ``form`` ("xla": one call per chunk of 10 steps; "xla_step": one call per step), timed for at
    least ``seconds`` after a compiling call; ``for_training`` builds the training network (BandedConv1D as the
    second convolution), else Keras' Conv1D."""
    import keras
    import numpy as np
    import tensorflow as tf

    from anna.model import build_network
    from anna.train.steps import make_train_steps

    spec = starnet_spec(npix)
    keras.utils.set_random_seed(1)
    network = build_network(spec, compiled_form=form, for_training=for_training)
    optimizer = keras.optimizers.Adam(1e-6)
    optimizer.build(network.trainable_variables)
    chunk_batches = 10
    steps = make_train_steps(network, optimizer, spec, chunk_batches, BATCH, form)
    rng = np.random.default_rng(0)
    chunk = (tf.constant(rng.uniform(0.5, 1.0, size=(chunk_batches, BATCH, npix)).astype(np.float32)),
             tf.constant(rng.uniform(size=(chunk_batches, BATCH, 5)).astype(np.float32)),
             tf.ones((chunk_batches, BATCH, 5)))
    steps(chunk, 0, chunk_batches)[0].numpy()  # compiles
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2 * chunk_batches:
        steps(chunk, 0, chunk_batches)[0].numpy()
        done += chunk_batches
    return done * BATCH / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    from anna.runtime import configure_threads

    configure_threads()
    repeats = 3 if args.quick else 9
    print(f"{'layer':<20} {'implementation':<28} {'npix':>5} {'graph ms':>9} {'XLA ms':>8} {'fwd XLA ms':>11}")
    for npix in LENGTHS:
        for layer, implementation, shape, factory in candidates(npix):
            graph = time_layer(factory, shape, False, repeats)
            xla = time_layer(factory, shape, True, repeats)
            forward = time_layer(factory, shape, True, repeats, backward=False)
            print(f"{layer:<20} {implementation:<28} {npix:>5} {graph:>9.2f} {xla:>8.2f} {forward:>11.2f}",
                  flush=True)
    rounds, steps = (2, 10) if args.quick else (5, 40)
    print(f"\nStarNet-shaped network with XLA, median of {steps} calls per round, second convolution Keras "
          f"Conv1D | BandedConv1D: training step (batch {BATCH}) and forward pass (batch 256)")
    for npix in LENGTHS[1:]:
        pairs = [(whole_step_ms(npix, False, steps), whole_step_ms(npix, True, steps)) for _ in range(rounds)]
        for index, what in enumerate(("training step", "forward pass")):
            text = ", ".join(f"{keras[index]:.1f} | {banded[index]:.1f}" for keras, banded in pairs)
            ratios = sorted(banded[index] / keras[index] for keras, banded in pairs)
            print(f"{npix:>5} px {what}: {text} ms; BandedConv1D / Conv1D median "
                  f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
    seconds = 2.0 if args.quick else 6.0
    npix = LENGTHS[-1]
    print(f"\nanna-train's training steps, StarNet-shaped network, {npix} px, batch {BATCH}, ex/s over {seconds:g} s "
          f"per form and round ({rounds} rounds, in turns): second convolution Keras Conv1D | BandedConv1D")
    for form, what in (("xla", "one XLA call per chunk of 10 steps"), ("xla_step", "one XLA call per step")):
        pairs = [(training_steps_rate(npix, False, form, seconds), training_steps_rate(npix, True, form, seconds))
                 for _ in range(rounds)]
        text = ", ".join(f"{keras:.0f} | {banded:.0f}" for keras, banded in pairs)
        ratios = sorted(banded / keras for keras, banded in pairs)
        print(f"{form:<9} ({what}): {text} ex/s; BandedConv1D / Conv1D median {statistics.median(ratios):.2f}x "
              f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
