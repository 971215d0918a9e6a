"""The one network builder shared by anna-train, anna-test and anna-infer, and the frozen-model artifact.

Network (ANNA, guide section 2.2, with the corrections ANNA-TF adopts)::

    flux (batch, npix) -> minus centre  -> conv1d ReLU [-> conv1d ReLU] [-> max-pool] -> flatten
         -> dense FC1 ReLU -> dropout -> dense FC2 ReLU -> dropout -> dense NUM_OUTS (normalised labels)

The centre is 1 (the continuum) or the training mean spectrum; it is a non-trainable weight of the network, so
it travels with the frozen model.  Raw continuum-normalised flux (~1 everywhere) fed straight into a ReLU conv
stack was observed not to learn; centring makes absorption features the signal.  Labels are normalised to
[0, 1] with MIN_PARAMS/MAX_PARAMS; the frozen model stores those ranges and speaks physical units.

With UNCERTAINTY: MC_DROPOUT (``NetworkSpec.heteroscedastic``) a variance head sits beside the label layer:
ln σ²_pred = ln(e^fit + e^gain · noise²), fit and gain dense layers on the last hidden layer and noise the
spectrum's DER_SNR noise estimate, so the predicted error can grow with the noise of each spectrum.  The
output is then (batch, 2·NUM_OUTS): labels, then ln σ²_pred.  At MC-dropout prediction a spectrum whose file
gives per-pixel errors (survey files) has its noise taken from those errors instead (``noise`` of
:meth:`FrozenModel.predict_with_uncertainty`); training, whose noise is the noise model's, always uses DER_SNR.

Frozen model: ``SAVE_LOC/frozen.model`` is ONE file, a zip archive holding ``metadata.json`` (network spec,
output names, label ranges, training wavelength grid, resolved parameters, versions, pack hash) and
``weights.npz`` (the weights in builder order).  Loading rebuilds the network with this same builder and sets
the weights, so no pickled code or custom-object registry is involved and a model moves between machines as a
single file.  The file is written atomically.
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from anna.atomic import write_array_archive
from anna.errors import AnnaInputError
from anna.losses import LOG_VARIANCE_MAX, LOG_VARIANCE_MIN

# the file's name, format and required metadata, and reading it: anna.frozen_file (no TensorFlow needed there)
from anna.frozen_file import FORMAT_NAME, FORMAT_VERSION, FROZEN_MODEL_NAME, read_frozen_file
# Starting values of the variance head (normalised labels, 0..1 scale): sigma_fit = 0.1 (a tenth of MAX - MIN),
# and a noise part equal to it at S/N 100.  Training refits both biases by maximum likelihood every
# SAMPLE_INTERVAL (anna.train.variance.refit_variance_biases), so these only matter for the first interval.
INITIAL_LOG_VARIANCE_FIT = float(np.log(0.1**2))
INITIAL_LOG_NOISE_GAIN = float(np.log(0.1**2) - np.log(0.01**2))
# Smallest batch shape FrozenModel.predict_raw compiles: shorter batches are padded up to a power of two.
PREDICT_MIN_ROWS = 64
# The forward pass's compiled forms (JIT_COMPILE for anna-test and anna-infer) and how long AUTO times each.
FORWARD_FORMS = ("xla", "graph")
FORWARD_FORM_NAMES = {"xla": "XLA", "graph": "graph, no XLA"}
FORM_TRIAL_SECONDS = 0.6
# ... and the calls it also times, as fractions of the batch (choose_forward_form).
FORWARD_CALL_FRACTIONS = (1, 2, 4)
# MC dropout: activation floats per graph call (2^23 floats = 32 MiB per activation); the sample-rows (spectra x
# passes) of one call follow from the widest activation the sampled part of the network makes per row.
MC_CALL_FLOATS = 1 << 23
# DER_SNR (Stoehr et al. 2008): noise = 1.482602 / sqrt(6) * median |2 f_i - f_(i-2) - f_(i+2)|.
DER_SNR_FACTOR = 1.482602 / np.sqrt(6.0)
# Noise floor (flux units) so that ln(noise^2) stays finite for noise-free spectra.
NOISE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One convolution of the network: ``kernels`` filters ``width`` pixels wide, ReLU, "same" padding, moving
    ``stride`` pixels per output; then, optionally, max-pooling over ``pool`` pixels and dropout (``dropout``,
    at the training stage's rate).  Written ``KxW[sS][pP][d]`` in CONV_LAYERS, e.g. ``16x8p4``."""

    kernels: int
    width: int
    stride: int = 1
    pool: int = 1
    dropout: bool = False

    def to_dict(self):
        return {"kernels": self.kernels, "width": self.width, "stride": self.stride, "pool": self.pool,
                "dropout": self.dropout}

    @property
    def text(self):
        return (f"{self.kernels}x{self.width}" + (f"s{self.stride}" if self.stride > 1 else "")
                + (f"p{self.pool}" if self.pool > 1 else "") + ("d" if self.dropout else ""))


def _conv_layer(entry):
    """A ConvLayer from a ConvLayer, a dict (format 2) or a (width, kernels) pair (format 1, and older code)."""
    if isinstance(entry, ConvLayer):
        return entry
    if isinstance(entry, dict):
        return ConvLayer(kernels=int(entry["kernels"]), width=int(entry["width"]), stride=int(entry.get("stride", 1)),
                         pool=int(entry.get("pool", 1)), dropout=bool(entry.get("dropout", False)))
    width, kernels = (int(v) for v in entry)
    return ConvLayer(kernels=kernels, width=width)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything that fixes the network's shape.  Stored in the frozen model and used to rebuild it.

    ``conv_layers``: a tuple of :class:`ConvLayer` (a ``(width, kernels)`` pair is accepted too, ANNA's order);
    ``pool_size`` > 1 (ANNA-TF's older spelling) adds max-pooling after the LAST convolution and is then folded
    into that layer, so two specs of the same network compare equal; ``fc_dims``: the widths of the dense
    layers, each followed by dropout; ``heteroscedastic`` adds a log-variance output per label.
    """

    npix: int
    nout: int
    conv_layers: tuple = ((45, 10),)
    pool_size: int = 1
    fc_dims: tuple = (128, 128)
    heteroscedastic: bool = False

    def __post_init__(self):
        layers_ = [_conv_layer(entry) for entry in self.conv_layers]
        if int(self.pool_size) > 1:
            if not layers_:
                raise ValueError("pool_size needs a convolution to pool after")
            if layers_[-1].pool > 1:
                raise ValueError("the last convolution already has its own pooling")
            layers_[-1] = dataclasses.replace(layers_[-1], pool=int(self.pool_size))
        object.__setattr__(self, "conv_layers", tuple(layers_))
        object.__setattr__(self, "pool_size", 1)
        object.__setattr__(self, "fc_dims", tuple(int(v) for v in self.fc_dims))
        if not self.fc_dims:
            raise ValueError("the network needs at least one dense layer")

    @classmethod
    def from_config(cls, cfg, npix, nout):
        """The network a parameter file describes (:func:`anna.params.network_layers` resolves ANNA's and
        ANNA-TF's spellings of the layers into one list)."""
        from anna.params import network_layers

        conv, fc_dims = network_layers(cfg)
        return cls(npix=int(npix), nout=int(nout), conv_layers=tuple(ConvLayer(**c) for c in conv),
                   fc_dims=tuple(fc_dims), heteroscedastic=(getattr(cfg, "uncertainty", "NONE") == "MC_DROPOUT"))

    @property
    def description(self):
        """One line for logs: '4x8, 16x8p4 | 256, 128'."""
        convs = ", ".join(c.text for c in self.conv_layers) or "no convolution"
        return f"{convs} | {', '.join(map(str, self.fc_dims))}"

    def to_dict(self):
        return {"npix": self.npix, "nout": self.nout, "conv_layers": [c.to_dict() for c in self.conv_layers],
                "fc_dims": list(self.fc_dims), "heteroscedastic": self.heteroscedastic}

    @classmethod
    def from_dict(cls, data):
        """Format 2 (one dict per convolution) or format 1 (``[width, kernels]`` pairs and one ``pool_size``)."""
        return cls(npix=int(data["npix"]), nout=int(data["nout"]),
                   conv_layers=tuple(_conv_layer(c) for c in data["conv_layers"]),
                   pool_size=int(data.get("pool_size", 1)), fc_dims=tuple(int(v) for v in data["fc_dims"]),
                   heteroscedastic=bool(data.get("heteroscedastic", False)))

    def chain(self):
        """The names of the main chain's layers in order, as :func:`build_network` names them."""
        names = ["centre"]
        for number, conv in enumerate(self.conv_layers, start=1):
            if number == 1 and conv.stride > 1:
                names.append("channel")
            names.append(f"conv{number}")
            if conv.pool > 1:
                names.append(f"pool{number}")
            if conv.dropout:
                names.append(f"conv_dropout{number}")
        names.append("flatten")
        for number in range(1, len(self.fc_dims) + 1):
            names += [f"fc{number}", f"dropout{number}"]
        return names + ["labels"]

    def activation_floats(self):
        """Floats of the largest activation one spectrum produces in the forward pass (sets batch memory)."""
        length, largest = self.npix, self.npix
        for conv in self.conv_layers:
            length = -(-length // conv.stride)
            largest = max(largest, length * conv.kernels)
            length //= conv.pool
        return max([largest] + list(self.fc_dims))


def build_network(spec, dropout_rate=0.0, centre=None, dropout_seed=None, compiled_form="xla",
                  weight_init="HE", dtype_policy=None, for_training=False):
    """Build the Keras network for ``spec``.

    ``dropout_rate`` is 1 − KEEP_PROB of the stage being trained (dropout only acts when called with
    ``training=True``); ``dropout_seed`` (int) makes the dropout masks a fixed sequence (MC-dropout reruns).
    ``centre`` (npix,) is subtracted from the input; default 1.0 (the continuum).  ``compiled_form`` ("xla" or
    "graph") picks, for layers with two implementations of the same function, the one that is faster in that
    compiled form (:class:`SpectrumMaxPool1D`); the weights and results do not depend on it.  ``for_training``:
    the network a training step runs (anna-train and AUTO's trial); under XLA its convolutions after the first
    are :class:`BandedConv1D`, faster in a training step and slower in a forward pass alone than Keras' Conv1D
    (the frozen model's network, built without it, predicts with Keras' layer; same weights).
    Input (batch, npix) float32 flux; output (batch, nout) normalised labels, or (batch, 2·nout) with the
    log-variances appended when ``spec.heteroscedastic``.

    ``weight_init`` (WEIGHT_INIT) draws the kernels: "HE" (He-normal, for ReLU layers; biases zero) or "GLOROT"
    (Glorot-uniform, as Keras' own layers start).  He-normal draws narrow convolutions' kernels wider (fan-in 8
    against Glorot's fan-in + fan-out 40 for StarNet's first layer).  Measured: on APOGEE-like spectra a
    StarNet-shaped network started with GLOROT left 0.65-0.94x the scatter of HE after 600 steps
    (configs/apogee.param uses it); with GLOROT the MC-dropout spread of a small test network grew less for
    broad-lined spectra unlike its training set (tests/test_uncertainty.py), so HE stays the default.  "NONE"
    (zeros) is for weights about to be overwritten (:func:`load_frozen`): drawing the tutorial network's 1.3
    million random kernel values was a third of the time it took to load a frozen model.

    ``dtype_policy`` (MIXED_PRECISION, :mod:`anna.train.precision`): the Keras DTypePolicy of the hidden layers
    (convolutions, pooling, dense, dropout), e.g. ``mixed_float16``; None is the float32 default.  The input
    centring and the label and variance layers stay float32 whatever it is, and every variable is float32, so
    the weights are those of an ordinary network.
    """
    hidden = {} if dtype_policy is None else {"dtype": dtype_policy}
    kernel_init = {"HE": "he_normal", "GLOROT": "glorot_uniform", "NONE": "zeros"}[weight_init]
    flux = keras.Input(shape=(spec.npix,), name="flux", dtype="float32")
    centre_layer = CentreLayer(spec.npix, name="centre")
    x = centre_layer(flux)

    def seed_for(slot):
        return None if dropout_seed is None else int(dropout_seed) * 2 + slot

    for number, conv in enumerate(spec.conv_layers, start=1):
        if number == 1 and conv.stride == 1:
            x = SpectrumConv1D(conv.kernels, conv.width, initializer=kernel_init, name="conv1", **hidden)(x)
        else:
            if number == 1:
                x = layers.Reshape((spec.npix, 1), name="channel", **hidden)(x)
            if for_training and compiled_form != "graph" and BandedConv1D.suits(conv):
                x = BandedConv1D(conv.kernels, conv.width, initializer=kernel_init, name=f"conv{number}",
                                 **hidden)(x)
            else:
                x = layers.Conv1D(conv.kernels, conv.width, strides=conv.stride, padding="same",
                                  activation="relu", kernel_initializer=kernel_init, bias_initializer="zeros",
                                  name=f"conv{number}", **hidden)(x)
        if conv.pool > 1:
            x = SpectrumMaxPool1D(conv.pool, compiled_form=compiled_form, name=f"pool{number}", **hidden)(x)
        if conv.dropout:
            # seeds 1000+ keep the dense layers' mask sequences what they were before conv dropout existed
            x = layers.Dropout(dropout_rate, seed=seed_for(1000 + number), name=f"conv_dropout{number}",
                               **hidden)(x)
    x = layers.Flatten(name="flatten", **hidden)(x)
    for number, width in enumerate(spec.fc_dims, start=1):
        x = layers.Dense(width, activation="relu", kernel_initializer=kernel_init, bias_initializer="zeros",
                         name=f"fc{number}", **hidden)(x)
        x = layers.Dropout(dropout_rate, seed=seed_for(number), name=f"dropout{number}", **hidden)(x)
    outputs = layers.Dense(spec.nout, name="labels", dtype="float32")(x)
    if spec.heteroscedastic:
        # Predicted variance of each label = misfit part + noise part (linear error propagation: a label's error
        # from flux noise scales with that noise).  Both parts depend on the spectrum through the features.
        log_var_fit = layers.Dense(spec.nout, name="log_variance_fit", kernel_initializer="zeros", dtype="float32",
                                   bias_initializer=keras.initializers.Constant(INITIAL_LOG_VARIANCE_FIT))(x)
        log_gain = layers.Dense(spec.nout, name="log_noise_gain", kernel_initializer="zeros", dtype="float32",
                                bias_initializer=keras.initializers.Constant(INITIAL_LOG_NOISE_GAIN))(x)
        log_noise_sq = LogNoiseVariance(name="log_noise_variance")(flux)
        log_var = VarianceSum(name="log_variance")([log_var_fit, log_gain, log_noise_sq])
        outputs = layers.Concatenate(name="labels_and_log_variance")([outputs, log_var])
    network = keras.Model(flux, outputs, name="anna_cnn")
    if centre is not None:
        centre_layer.centre.assign(np.asarray(centre, dtype=np.float32).reshape(spec.npix))
    return network


class CentreLayer(keras.layers.Layer):
    """Subtracts a stored spectrum (non-trainable weight, saved with the model) from the input flux."""

    def __init__(self, npix, **kwargs):
        super().__init__(**kwargs)
        self.npix = npix
        self.centre = self.add_weight(shape=(npix,), initializer="ones", trainable=False, name="centre")

    def call(self, flux):
        return flux - self.centre


class _BandedConvolution(keras.layers.Layer):
    """What :class:`SpectrumConv1D` and :class:`BandedConv1D` share: Keras Conv1D's arguments (``kernels``
    filters of ``width`` pixels, the kernel initializer), the output shape and config, and the band's layout."""

    def __init__(self, kernels, width, initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.kernels = int(kernels)
        self.width = int(width)
        self.initializer = initializer

    def band_layout(self, tile):
        """(taps, mask) of the banded matrix of ``tile`` output pixels: for tile input pixel j (of tile + width
        - 1) and output pixel t, the kernel tap j - t, and 1 where 0 <= j - t < width, else 0 (float32)."""
        offset = np.arange(tile + self.width - 1)[:, None] - np.arange(tile)[None, :]
        return np.clip(offset, 0, self.width - 1), ((offset >= 0) & (offset < self.width)).astype(np.float32)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.kernels)

    def get_config(self):
        return {**super().get_config(), "kernels": self.kernels, "width": self.width, "initializer": self.initializer}


class SpectrumConv1D(_BandedConvolution):
    """The first convolution: ``kernels`` filters of ``width`` pixels over a single-channel spectrum, "same"
    padding, ReLU.  (batch, npix) -> (batch, npix, kernels).

    Same weights (kernel (width, 1, kernels), bias (kernels,)), initialisation and result as
    ``keras.layers.Conv1D(kernels, width, padding="same", activation="relu")`` on (batch, npix, 1), so frozen
    models are interchangeable; only the arithmetic is arranged differently.  A convolution with ONE input
    channel gives the CPU convolution kernels almost nothing to vectorise over, and it was the largest single
    cost of a training step.  Here the padded spectrum is cut into overlapping tiles of TILE + width - 1
    pixels, and each tile is multiplied by a banded (Toeplitz) matrix built from the kernel, giving TILE
    output pixels x kernels at once: one dense matrix product, which is what CPUs (and XLA) do best.  On the
    tutorial network (1001 px, 45 x 10) this made the whole XLA training step 1.3-1.5x and prediction 1.8x
    faster on 2 cores (benchmarks/).  The band costs (TILE + width - 1) / width times the multiplications of
    the direct form, which the matrix product more than repays.
    """

    TILE = 16  # output pixels per tile; 8-64 measured, 16 fastest for both training and prediction

    def build(self, input_shape):
        npix = int(input_shape[-1])
        tile, width = self.TILE, self.width
        self.kernel = self.add_weight(shape=(width, 1, self.kernels), initializer=self.initializer, name="kernel")
        self.bias = self.add_weight(shape=(self.kernels,), initializer="zeros", name="bias")
        self.npix = npix
        self.tiles = -(-npix // tile)
        span = tile + width - 1
        # "same" padding as TensorFlow defines it: the odd pixel of an even-width kernel's padding goes right
        self.left_pad = (width - 1) // 2
        self.right_pad = self.tiles * tile + width - 1 - npix - self.left_pad
        # input pixel positions of each tile: (tiles, span)
        self.tile_pixels = (np.arange(self.tiles) * tile)[:, None] + np.arange(span)[None, :]
        # band[j, t] = kernel tap (j - t) for output pixel t of a tile reading tile pixel j, where 0 <= j-t < width
        self.band_taps, mask = self.band_layout(tile)
        self.band_mask = mask[:, :, None]

    def call(self, flux):
        padded = tf.pad(flux, [[0, 0], [self.left_pad, self.right_pad]])
        tiles = tf.gather(padded, self.tile_pixels, axis=1)                      # (batch, tiles, span)
        kernel = self.kernel[:, 0, :]
        band = tf.gather(kernel, self.band_taps) * tf.cast(self.band_mask, kernel.dtype)  # (span, TILE, kernels)
        band = tf.reshape(band, [band.shape[0], self.TILE * self.kernels])
        out = tf.matmul(tf.reshape(tiles, [-1, band.shape[0]]), band)            # (batch*tiles, TILE*kernels)
        out = tf.reshape(out, [-1, self.tiles * self.TILE, self.kernels])[:, :self.npix, :]
        return tf.nn.relu(out + self.bias)


class BandedConv1D(_BandedConvolution):
    """A convolution over several input channels, :class:`SpectrumConv1D`'s arrangement: ``kernels`` filters of
    ``width`` pixels, stride 1, "same" padding, ReLU; (batch, npix, channels) -> (batch, npix, kernels).

    Same weights (kernel (width, channels, kernels), bias (kernels,)) and result, to float rounding, as
    ``keras.layers.Conv1D(kernels, width, padding="same", activation="relu")``.  Tiles of TILE output pixels
    read TILE + width - 1 input pixels x channels, each tile's extra pixels being the next tile's first ones,
    taken by a reshape and a slice (so the input's gradient, which the first convolution needs, is a pad and an
    add, not a scatter), times one banded matrix: one dense matrix product with (TILE + width - 1) / TILE
    times the direct form's multiplications.  Measured (benchmarks/layer_forms.py, 2 cores; StarNet's 4 -> 16
    channels x 8 px, batch 100): alone, forward and backward with XLA, 0.46-0.64x Keras' Conv1D's time at 1001
    and 3909 px and 0.9-1.5x at 7214 px; in a whole StarNet-shaped XLA training step a median 0.86-0.95x at
    3909 and 7214 px over alternating rounds, and with it XLA's chunk loop became anna-train's fastest form
    for that network (630 ex/s, against 45-56 with Conv1D).  Without XLA it was 1.4-2.1x slower, and in the
    whole network's forward pass alone a median 1.04-1.09x, so only the training network under XLA uses it
    (:func:`build_network`'s ``for_training``).
    """

    TILE = 8  # output pixels per tile (at least width - 1: a tile borrows from the next one only)

    @classmethod
    def suits(cls, conv):
        """Whether ``conv`` (:class:`ConvLayer`) can be computed this way: stride 1, width - 1 <= TILE."""
        return conv.stride == 1 and conv.width - 1 <= cls.TILE

    def build(self, input_shape):
        self.npix, self.channels = int(input_shape[1]), int(input_shape[2])
        tile, width = self.TILE, self.width
        self.kernel = self.add_weight(shape=(width, self.channels, self.kernels), initializer=self.initializer,
                                      name="kernel")
        self.bias = self.add_weight(shape=(self.kernels,), initializer="zeros", name="bias")
        self.tiles = -(-self.npix // tile)
        # "same" padding as TensorFlow defines it, then zeros to whole tiles plus one (the last tile's borrow)
        self.left_pad = (width - 1) // 2
        self.right_pad = (self.tiles + 1) * tile - self.npix - self.left_pad
        # band[j, c, t, k] = kernel[j - t, c, k] for tile input pixel j and output pixel t, where 0 <= j-t < width
        self.band_taps, mask = self.band_layout(tile)
        self.band_mask = mask[:, :, None, None]

    def call(self, x):
        tile, width, channels = self.TILE, self.width, self.channels
        padded = tf.pad(x, [[0, 0], [self.left_pad, self.right_pad], [0, 0]])
        blocks = tf.reshape(padded, [-1, self.tiles + 1, tile * channels])
        tiles = tf.concat([blocks[:, :-1, :], blocks[:, 1:, :(width - 1) * channels]], axis=2)
        # (span, TILE, channels, kernels), then rows (span, channels) and columns (TILE, kernels); gathered from
        # a reshaped kernel, whose gradient is a dense tensor (a gather from the variable itself gives the
        # optimiser sparse slices)
        kernel = tf.reshape(self.kernel, [width, channels * self.kernels])
        band = tf.reshape(tf.gather(kernel, self.band_taps), [tile + width - 1, tile, channels, self.kernels])
        band = band * tf.cast(self.band_mask, band.dtype)
        band = tf.reshape(tf.transpose(band, [0, 2, 1, 3]), [(tile + width - 1) * channels, tile * self.kernels])
        out = tf.matmul(tf.reshape(tiles, [-1, band.shape[0]]), band)               # (batch*tiles, TILE*kernels)
        out = tf.reshape(out, [-1, self.tiles * tile, self.kernels])[:, :self.npix, :]
        return tf.nn.relu(out + self.bias)


class SpectrumMaxPool1D(keras.layers.Layer):
    """Max-pooling over non-overlapping windows of ``pool`` pixels, (batch, n, channels) ->
    (batch, n // pool, channels); a remainder shorter than a window is dropped ("valid", as Keras' MaxPooling1D).

    Two implementations of the same function.  ``compiled_form="xla"``: the windows as an extra axis and a
    max over it.  XLA's CPU gradient of the pooling op (select-and-scatter) made a StarNet-sized training step
    several times slower than without XLA, and under op determinism TensorFlow refuses it outright ("MaxPool
    gradient ops do not yet have a deterministic XLA implementation"); the gradient of a max over an axis is a
    plain mask, fast and deterministic.  ``"graph"``: TensorFlow's pooling kernel, faster without XLA.
    Outputs are identical; gradients differ only where a window holds tied maxima.
    """

    def __init__(self, pool, compiled_form="xla", **kwargs):
        super().__init__(**kwargs)
        self.pool = int(pool)
        self.compiled_form = compiled_form

    def call(self, x):
        if self.compiled_form == "graph":
            return tf.nn.max_pool1d(x, self.pool, self.pool, "VALID")
        windows = x.shape[1] // self.pool
        trimmed = x[:, :windows * self.pool, :]
        return tf.reduce_max(tf.reshape(trimmed, [-1, windows, self.pool, x.shape[2]]), axis=2)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] // self.pool, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "pool": self.pool, "compiled_form": self.compiled_form}


class LogNoiseVariance(keras.layers.Layer):
    """ln(noise²) of each spectrum, (batch, npix) flux -> (batch, 1), noise estimated by DER_SNR
    (:func:`log_noise_variance`).

    DER_SNR takes the median of |2 f_i − f_(i−2) − f_(i+2)|: the second difference over two pixels cancels the
    (smooth) spectrum and keeps the pixel noise, and the median ignores lines and bad pixels.  For
    continuum-normalised flux the noise is about 1/(S/N).  Spectra shorter than 5 pixels get NOISE_FLOOR.
    """

    def call(self, flux):
        return log_noise_variance(flux)


def log_noise_variance(flux):
    """ln(noise²) by DER_SNR, (batch, 1), for (batch, npix) float32 flux: :class:`LogNoiseVariance`'s value,
    and what the training step and MC dropout compute beside the network (no gradient flows through it).

    The median is found by exact selection (:func:`row_median`) rather than a sort: sorting each spectrum's
    npix − 4 second differences was the largest extra cost of a training step with a variance head (per batch
    of 100 on 2 cores, 140-175 ms compiled by XLA at 7214 px, where a StarNet-shaped plain step took 220-400
    ms, and 17-22 ms at 1001 px; 65 and 9 ms without XLA); the selection took 16-20 and 4-6 ms with XLA,
    30-37 and 10-12 ms without.  It returns the same order statistics a sort gives, so the value is the same
    bit for bit (tests/test_mc_step.py)."""
    import tensorflow as tf

    if flux.shape[-1] is not None and flux.shape[-1] < 5:
        return tf.fill([tf.shape(flux)[0], 1], tf.constant(2.0 * np.log(NOISE_FLOOR), flux.dtype))
    return log_noise_square(der_snr_sigma(flux))


def der_snr_sigma(flux):
    """DER_SNR's noise σ of each (batch, npix) float32 spectrum, (batch,), npix >= 5 (see
    :func:`log_noise_variance`)."""
    second = tf.abs(2.0 * flux[:, 2:-2] - flux[:, :-4] - flux[:, 4:])
    return DER_SNR_FACTOR * row_median(second)


def log_noise_square(sigma):
    """ln(σ² + NOISE_FLOOR²), (batch, 1), for (batch,) float32 noise σ: the variance head's noise term."""
    return tf.math.log(tf.square(sigma) + NOISE_FLOOR**2)[:, None]


def log_noise_variance_given(flux, noise):
    """(ln noise², (batch, 1); σ used, (batch,)): the noise a file's own errors give (``noise`` (batch,) σ in
    continuum-normalised flux units, :func:`anna.survey.prepare.file_noise`) where it is finite, DER_SNR of
    ``flux`` elsewhere.  Rows without a file noise get exactly :func:`log_noise_variance`'s value."""
    if flux.shape[-1] is not None and flux.shape[-1] < 5:
        estimate = tf.zeros_like(noise)
    else:
        estimate = der_snr_sigma(flux)
    sigma = tf.where(tf.math.is_finite(noise), noise, estimate)
    return log_noise_square(sigma), sigma


# Bisection steps of row_median: the bit patterns of non-negative float32 span less than 2^31.
SELECTION_STEPS = 31


def row_median(values):
    """Median of each row of (batch, n) non-negative float32 ``values`` (n static), as the mean of the two
    middle order statistics in float32, exactly as sorting gives them.

    Non-negative floats order as their bit patterns do as integers, so the k-th smallest of a row is the
    smallest pattern t with at least k + 1 values <= t: a bisection over the patterns keeps lo (fewer than
    k + 1 values <= lo) and hi (at least k + 1), SELECTION_STEPS counting passes, each a compare and a sum;
    the next order statistic (n even) is the same value or the smallest above it.  Faster than a sort (see
    :func:`log_noise_variance`), except without XLA on short spectra, where the two are about even.  A NaN
    counts as the largest value.  Tried and dropped: counting by a matrix product with a column of ones
    (faster alone under XLA, but it made the StarNet-shaped XLA step 1.6x the plain one, against 1.1-1.2x),
    4- to 16-way splits per pass, and moving lo and hi to the nearest values each pass (fewer passes, each
    dearer).
    """
    import tensorflow as tf

    count = int(values.shape[-1])
    bits = tf.bitcast(values, tf.int32)
    rank = (count - 1) // 2
    lo = tf.cast(tf.reduce_min(bits, axis=-1), tf.int64) - 1  # int64: hi - lo may reach 2^31
    hi = tf.cast(tf.reduce_max(bits, axis=-1), tf.int64)
    for _ in range(SELECTION_STEPS):
        mid = lo + (hi - lo) // 2
        at_or_below = tf.reduce_sum(tf.cast(bits <= tf.cast(mid, tf.int32)[:, None], tf.int32), axis=-1)
        enough = at_or_below > rank
        hi, lo = tf.where(enough, mid, hi), tf.where(enough, lo, mid)
    lower_bits = tf.cast(hi, tf.int32)
    lower = tf.bitcast(lower_bits, tf.float32)
    if count % 2:
        return 0.5 * (lower + lower)
    at_or_below = tf.reduce_sum(tf.cast(bits <= lower_bits[:, None], tf.int32), axis=-1)
    above = tf.reduce_min(tf.where(bits > lower_bits[:, None], bits, tf.int32.max), axis=-1)
    upper = tf.bitcast(tf.where(at_or_below > rank + 1, lower_bits, above), tf.float32)
    return 0.5 * (lower + upper)


class VarianceSum(keras.layers.Layer):
    """ln(e^fit + e^(gain + ln noise²)): the log of the misfit variance plus the propagated noise variance."""

    def call(self, inputs):
        import tensorflow as tf

        log_var_fit, log_gain, log_noise_sq = inputs
        return tf.math.reduce_logsumexp(tf.stack([log_var_fit, log_gain + log_noise_sq], axis=0), axis=0)


class LabelScaler:
    """Maps physical labels to [0, 1] with MIN_PARAMS/MAX_PARAMS, and back."""

    def __init__(self, minimum, maximum):
        self.minimum = np.asarray(minimum, dtype=np.float64)
        self.maximum = np.asarray(maximum, dtype=np.float64)
        self.span = self.maximum - self.minimum

    def normalise(self, labels):
        return (np.asarray(labels, dtype=np.float64) - self.minimum) / self.span

    def physical(self, normalised):
        return self.minimum + np.asarray(normalised, dtype=np.float64) * self.span

    def physical_sigma(self, normalised_sigma):
        return np.asarray(normalised_sigma, dtype=np.float64) * self.span


# The uncertainty columns of anna-test's and anna-infer's outputs: (suffix after the label name, sigma).
ERROR_COLUMNS = (("_err", "sigma_total"), ("_err_model", "sigma_model"), ("_err_pred", "sigma_pred"))


class FrozenModel:
    """A trained network with everything needed to use it: grid, label names and ranges, provenance.

    ``predict(flux)`` takes (n, npix) fluxes already on ``wavelengths`` and returns (n, nout) labels in
    physical units, in batches so memory stays bounded.
    """

    def __init__(self, network, spec, metadata, path=None):
        self.path = path
        self.network = network
        self.spec = spec
        self.metadata = metadata
        self.output_names = tuple(metadata["output_names"])
        self.wavelengths = np.asarray(metadata["wavelengths"], dtype=np.float64)
        self.scaler = LabelScaler(metadata["min_params"], metadata["max_params"])
        self.forward_form = "xla"  # or "graph": see choose_forward_form
        self.forward_rows = None  # spectra per network call; None: the batch given to predict_raw
        self.mc_spectra_per_call = None  # None: compile_mc_forward's own grouping; else anna.memory's plan
        self._forward = {}
        self._mc_forward = {}

    @property
    def nout(self):
        return self.spec.nout

    def forward_bytes_per_spectrum(self):
        """Bytes of every layer's output for one spectrum (float32), summed: the batch rule's measure of the
        network (:mod:`anna.memory`)."""
        from anna.memory import floats_per_row

        return 4 * floats_per_row(self.network)

    def mc_row_bytes(self, samples):
        """Bytes per sample-row of the part MC dropout repeats (after the first dropout layer)."""
        return self._compiled_mc(samples).row_bytes

    def plan_batches(self, setting, max_memory_gb, mc_samples=None, key="BATCH_SIZE"):
        """Apply :func:`anna.memory.plan_batches` to this network; returns the plan (its ``batch`` is what
        callers pass as ``batch_size``)."""
        from anna.memory import plan_batches

        mc_bytes = None if mc_samples is None else (self.mc_row_bytes(mc_samples), int(mc_samples))
        plan = plan_batches(setting, max_memory_gb, self.forward_bytes_per_spectrum(), self.spec.npix,
                            mc_bytes=mc_bytes, key=key)
        self.mc_spectra_per_call = plan.mc_spectra_per_call
        return plan

    def _compiled_forward(self, form=None):
        form = form or self.forward_form
        if form not in self._forward:
            network = self.network

            # XLA fuses the network into a few loops: 1.5x the spectra per second of the plain graph on 2 cores
            # for the tutorial network (benchmarks/).  It compiles once per batch shape, hence the fixed shapes
            # of predict_raw.
            @tf.function(input_signature=[tf.TensorSpec([None, self.spec.npix], tf.float32)],
                         jit_compile=form == "xla", autograph=False)
            def forward(flux):
                return network(flux, training=False)

            # Traced here, in the thread that asks for it first (choose_forward_form: the main thread, before any
            # worker starts), not at its first call in a worker.  XLA's on-disk cache (anna.runtime) keys each
            # compiled program by the traced function's name, which carries a process-wide counter: traced
            # in a worker, beside the training-domain graph traced in another, the name changed from run to
            # run, and a rerun compiled again (a new cache entry in 2 of 4 warm reruns of one anna-infer).
            forward.get_concrete_function()
            self._forward[form] = forward
        return self._forward[form]

    def choose_forward_form(self, setting, batch_size, report=print, seconds=FORM_TRIAL_SECONDS):
        """JIT_COMPILE for the forward pass: NO "graph", YES "xla", AUTO the faster of the two for this network
        and batch on this machine, timed on flat spectra (speed does not depend on the values) and remembered
        like the training step's choice (:mod:`anna.runtime`), so a rerun uses the same form and repeats its
        numbers exactly.

        AUTO also times each form on calls of a half and a quarter of the batch (:data:`FORWARD_CALL_FRACTIONS`):
        the batch is what memory allows (:mod:`anna.memory`), but the network is not always fastest at its
        largest call; measured on 2 cores, the tutorial network ran 10 % faster in calls of 512 than of 2048
        spectra, and the StarNet-shaped one on 7214 pixels 19 % faster in calls of 256 than of 1024
        (benchmarks/, survey-size inference baselines).  Sets :attr:`forward_form` and :attr:`forward_rows`;
        returns a line for the report."""
        import json

        from anna.runtime import machine_description, read_remembered, remember

        batch_size = int(batch_size)
        self.forward_rows = batch_size
        if setting != "AUTO":
            self.forward_form = "xla" if setting == "YES" else "graph"
            self._compiled_forward()  # traced now, in this thread (see _compiled_forward)
            return f"forward pass: {FORWARD_FORM_NAMES[self.forward_form]} (JIT_COMPILE {setting})"
        calls = sorted({batch_size // fraction for fraction in FORWARD_CALL_FRACTIONS
                        if fraction == 1 or batch_size // fraction >= PREDICT_MIN_ROWS}, reverse=True)
        key = json.dumps({"forward": self.spec.to_dict(), "batch": batch_size, "forms": list(FORWARD_FORMS),
                          "calls": calls, "machine": machine_description()}, sort_keys=True)
        entry = read_remembered().get(key)
        if entry and entry.get("form") in FORWARD_FORMS and entry.get("rows") in calls:
            self.forward_form, self.forward_rows = entry["form"], entry["rows"]
            self._compiled_forward()  # traced now, in this thread (see _compiled_forward)
            return (f"forward pass: {_trial_name(self.forward_form, self.forward_rows)} (JIT_COMPILE AUTO, as "
                    f"timed on this machine on {entry['when']}: {_rates_text(entry['rates'])})")
        flux = np.ones((batch_size, self.spec.npix), np.float32)
        rates = {}
        for form in FORWARD_FORMS:
            forward = self._compiled_forward(form)
            for rows in calls:
                try:
                    forward(flux[:rows]).numpy()  # compiles
                except (tf.errors.OpError, ValueError, RuntimeError) as error:
                    report(f"forward pass: {FORWARD_FORM_NAMES[form]} fails here ({type(error).__name__}), not used")
                    break
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds or done < 2:
                    forward(flux[:rows]).numpy()
                    done += 1
                rates[f"{form}@{rows}"] = done * rows / (time.perf_counter() - start)
        if not rates:
            raise AnnaInputError("neither compiled form of the forward pass runs on this machine", path=self.path)
        best = max(rates, key=rates.get)
        self.forward_form, self.forward_rows = best.split("@")[0], int(best.split("@")[1])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        problem = remember(key, {"form": self.forward_form, "rows": self.forward_rows, "rates": rates,
                                 "when": when})
        return (f"forward pass: {_trial_name(self.forward_form, self.forward_rows)} (JIT_COMPILE AUTO: "
                f"{_rates_text(rates)}" + (f"; could not remember the choice: {problem}" if problem else "") + ")")

    def predict_raw(self, flux, batch_size=4096):
        """Network outputs (normalised labels [+ log-variances]) for (n, npix) flux, float64 numpy.

        Spectra go through ``batch_size`` at a time; a shorter batch is padded with flat continuum up to the
        next power of two (at least PREDICT_MIN_ROWS), so however the input is cut only a handful of batch
        shapes is ever compiled.  The padding rows' outputs are dropped.
        """
        flux = np.asarray(flux)
        batch_size = min(int(batch_size), self.forward_rows or int(batch_size))
        forward = self._compiled_forward()
        out = np.empty((flux.shape[0], self.network.output_shape[-1]), dtype=np.float64)
        for start, chunk in row_blocks(flux, batch_size):
            rows = len(chunk)
            shape_rows = min(batch_size, max(PREDICT_MIN_ROWS, 1 << (rows - 1).bit_length()))
            if shape_rows > rows:
                chunk = np.concatenate([chunk, np.ones((shape_rows - rows, chunk.shape[1]), np.float32)])
            out[start:start + rows] = forward(chunk).numpy()[:rows]
        return out

    def predict(self, flux, batch_size=4096):
        """Labels in physical units, (n, nout) float64."""
        raw = self.predict_raw(flux, batch_size)
        return self.scaler.physical(raw[:, :self.nout])

    @property
    def mc_dropout_rate(self):
        return float(self.metadata.get("mc_dropout_rate", 0.0))

    @property
    def model_variance_scale(self):
        """κ per label (nout,): the calibrated weight of the dropout spread in σ²_total (1 when not calibrated).

        Fitted by maximum likelihood on held-out spectra at the end of training (anna.train)."""
        calibration = self.metadata.get("variance_calibration") or {}
        return np.asarray(calibration.get("model_variance_scale", np.ones(self.nout)), dtype=np.float64)

    @property
    def noise_levels(self):
        """The S/N dependence of the σ calibration (:func:`noise_variance_factor`), or None (a model calibrated
        without S/N levels, or not calibrated)."""
        return (self.metadata.get("variance_calibration") or {}).get("noise_levels")

    def missing_parts(self, mc_samples=None):
        """What this model lacks for the use asked of it: a dict part -> one-line notice (empty when whole).

        ``training_domain``: no training-domain statistics, so ``outside_training_domain`` cannot be checked.
        ``variance_calibration`` (only when ``mc_samples`` asks for MC dropout and the model has a variance
        head): σ is not calibrated.  Models written before every frozen model was completed (a run stopped by
        Ctrl-C or SIGTERM) lack them; ``anna-train --finish`` computes them afterwards."""
        missing = {}
        if not self.metadata.get("training_domain"):
            missing["training_domain"] = ("model has no training-domain statistics: outside_training_domain is "
                                          "not checked")
        if mc_samples is not None and self.spec.heteroscedastic and not self.metadata.get("variance_calibration"):
            missing["variance_calibration"] = "model has no uncertainty calibration: sigma not calibrated"
        return missing

    def _compiled_mc(self, samples):
        key = int(samples)
        if key not in self._mc_forward:
            self._mc_forward[key] = compile_mc_forward(self.network, self.spec, key)
        return self._mc_forward[key]

    def predict_labels(self, flux, batch_size=4096, mc_samples=None, noise=None):
        """What anna-test and anna-infer report: (labels, sigmas).  ``mc_samples`` None: one dropout-free pass,
        sigmas None; a number: MC dropout with that many passes (:meth:`predict_with_uncertainty`), the labels
        being the mean of the passes and ``sigmas`` a dict of the three (n, nout) uncertainties named in
        :data:`ERROR_COLUMNS`, and with ``noise`` given also ``"noise"``: the (n,) σ the variance head read."""
        if mc_samples is None:
            return self.predict(flux, batch_size=batch_size), None
        rows = None if self.mc_spectra_per_call is None else self.mc_spectra_per_call * int(mc_samples)
        result = self.predict_with_uncertainty(flux, samples=mc_samples, rows_per_call=rows, noise=noise)
        return result["value"], {key: result[key] for _, key in ERROR_COLUMNS + ((None, "noise"),) if key in result}

    def predict_with_uncertainty(self, flux, samples=100, rows_per_call=None, noise=None):
        """MC-dropout prediction (Gal & Ghahramani; astroNN): ``samples`` stochastic passes with dropout on.

        Returns a dict of (n, nout) float64 arrays in physical units: ``value`` (mean of the passes),
        ``sigma_model`` (their standard deviation times sqrt(κ), κ = :attr:`model_variance_scale`: the spread
        of the network itself, which grows for spectra unlike the training set), ``sigma_pred`` (the variance
        head's sigma, read from the dropout-free pass it was trained in; zero without a variance head) and
        ``sigma_total`` = sqrt(sigma_model² + sigma_pred²)
        (Leung & Bovy 2019, eq. 3).  Work is grouped so that one graph call handles ``rows_per_call``
        sample-rows, bounding memory.  Raises AnnaInputError for a model trained without dropout.

        ``noise`` (n,): the noise σ of each spectrum from its file's own errors, in continuum-normalised flux
        units (:func:`anna.survey.prepare.file_noise`), NaN where the file has none.  The variance head then
        reads ln σ² from it instead of from DER_SNR (rows with NaN keep DER_SNR, bit for bit), and the result
        holds ``noise``: the (n,) σ read.  Training never gives one: its spectra are noised by the noise model,
        which is what DER_SNR measures.

        A model calibrated at S/N levels (:attr:`noise_levels`) multiplies both variances by the factor of the
        noise the variance head read (:func:`noise_variance_factor`).
        """
        if self.mc_dropout_rate <= 0:
            raise AnnaInputError("this frozen model's final training stage ran without dropout (KEEP_PROB = 1), "
                                 "so there is nothing to sample; retrain with UNCERTAINTY: MC_DROPOUT and a "
                                 "last-stage KEEP_PROB below 1", path=self.path)
        levels = self.noise_levels if self.spec.heteroscedastic else None
        read_noise = noise
        if levels is not None and noise is None:  # NaN rows read DER_SNR, bit for bit as without ``noise``
            read_noise = np.full(np.shape(flux)[0], np.nan, dtype=np.float32)
        mean, var_model, var_pred, *used = mc_moments(self._compiled_mc(samples), flux, self.nout, samples,
                                                      rows_per_call, noise=read_noise)
        var_model = var_model * self.model_variance_scale
        if levels is not None:
            factor = noise_variance_factor(levels, np.log(np.square(used[0]) + NOISE_FLOOR**2))
            var_model, var_pred = var_model * factor, var_pred * factor
        sigma_model = self.scaler.physical_sigma(np.sqrt(var_model))
        sigma_pred = self.scaler.physical_sigma(np.sqrt(var_pred))
        return {"value": self.scaler.physical(mean), "sigma_model": sigma_model, "sigma_pred": sigma_pred,
                "sigma_total": np.hypot(sigma_model, sigma_pred), **({"noise": used[0]} if noise is not None else {})}


def noise_variance_factor(noise_levels, log_noise_sq):
    """(n, nout) factor g on σ²_total for spectra whose variance head read ``log_noise_sq`` (n,) = ln noise²:
    per label, ln g interpolated linearly in ln noise² between the calibration's S/N levels (``noise_levels``:
    strictly ascending ``log_noise_sq`` knots, their (knots, nout) ``variance_factor``, and ``sn``, the S/N
    levels pooled into each knot, for the reader), and held at the end values
    beyond them: outside the S/N range it was calibrated on, σ keeps the nearest level's calibration rather
    than extrapolating a trend."""
    knots = np.asarray(noise_levels["log_noise_sq"], dtype=np.float64)
    log_factor = np.log(np.asarray(noise_levels["variance_factor"], dtype=np.float64))
    x = np.asarray(log_noise_sq, dtype=np.float64)
    return np.exp(np.stack([np.interp(x, knots, log_factor[:, k]) for k in range(log_factor.shape[1])], axis=1))


def compile_mc_forward(network, spec, samples):
    """Graph function flux (n, npix) float32 -> (mean, var_model, var_pred), each (n, nout), normalised units.

    Everything before the first dropout layer (centring, the convolutions up to the first with dropout, or
    fc1 when only the dense layers have dropout) is the same in every pass: it runs once per spectrum, and only
    the rest of the network runs ``samples`` times, on the tiled activations in ONE call (dropout draws a fresh
    mask for every row).  The result equals sampling the whole network.  ``var_pred`` comes from the
    dropout-free top on the same trunk activations (zeros without a variance head).  The function's
    ``rows_per_call`` attribute is the number of sample-rows (spectra x passes) whose activations fit in
    :data:`MC_CALL_FLOATS`.

    With a variance head the function also has ``head_parts(flux) -> (mean, var_model, var_pred, log_fit,
    log_gain, log_noise_sq)``: the same passes and also the head's two log parts (misfit F = e^log_fit, noise
    gain) and the (n, 1) DER_SNR ln noise² it read, as the σ calibration at the end of training needs them
    (:func:`anna.train.variance.calibration_passes`).
    """
    import keras

    from anna.memory import floats_per_row as memory_floats_per_row

    nout, heteroscedastic = spec.nout, spec.heteroscedastic
    chain = spec.chain()
    first_dropout = next(i for i, name in enumerate(chain) if "dropout" in name)
    trunk = keras.Model(network.input, network.get_layer(chain[first_dropout - 1]).output)
    activations = keras.Input(shape=trunk.output.shape[1:], dtype="float32")
    x = activations
    for name in chain[first_dropout:]:
        x = network.get_layer(name)(x)
    top = keras.Model(activations, x)
    if heteroscedastic:
        # the variance head's two parts read from the same trunk activations (dropout inactive: training=False)
        x = activations
        for name in chain[first_dropout:-1]:
            x = network.get_layer(name)(x)
        head = keras.Model(activations, [network.get_layer("log_variance_fit")(x),
                                         network.get_layer("log_noise_gain")(x)])
        variance_sum = network.get_layer("log_variance")
    floats_per_row = max(int(np.prod(layer.output.shape[1:])) for layer in top.layers)

    def passes(flux):
        """(trunk activations, mean, var_model) of ``samples`` dropout passes."""
        count = tf.shape(flux)[0]
        shared = trunk(flux, training=False)
        tiled = tf.tile(shared, [samples] + [1] * (len(shared.shape) - 1))
        pred = tf.reshape(top(tiled, training=True), [samples, count, nout])
        return shared, tf.reduce_mean(pred, axis=0), tf.math.reduce_variance(pred, axis=0)

    def moments(flux, log_noise_sq, with_head_parts=False):
        shared, mean, var_model = passes(flux)
        if not heteroscedastic:
            return mean, var_model, tf.zeros_like(var_model)
        # the variance head is trained without dropout (anna.train), so it is read without dropout, from the
        # trunk's activations already computed (a second pass over the trunk doubled the cost)
        log_fit, log_gain = head(shared, training=False)
        log_var = variance_sum([log_fit, log_gain, log_noise_sq()])
        var_pred = tf.exp(tf.clip_by_value(log_var, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX))
        return (mean, var_model, var_pred, log_fit, log_gain) if with_head_parts else (mean, var_model, var_pred)

    @tf.function(input_signature=[tf.TensorSpec([None, spec.npix], tf.float32)], reduce_retracing=True,
                 autograph=False)
    def mc_forward(flux):
        return moments(flux, lambda: log_noise_variance(flux))

    @tf.function(input_signature=[tf.TensorSpec([None, spec.npix], tf.float32), tf.TensorSpec([None], tf.float32)],
                 reduce_retracing=True, autograph=False)
    def given_noise(flux, noise):
        """mc_forward with the variance head's noise from ``noise`` (n,) where finite (a file's own errors),
        DER_SNR elsewhere; returns the σ used as a fourth output (log_noise_variance_given)."""
        log_noise_sq, sigma = log_noise_variance_given(flux, noise)
        return (*moments(flux, lambda: log_noise_sq), sigma)

    mc_forward.given_noise = given_noise
    if heteroscedastic:
        @tf.function(input_signature=[tf.TensorSpec([None, spec.npix], tf.float32)], reduce_retracing=True,
                     autograph=False)
        def head_parts(flux):
            log_noise_sq = log_noise_variance(flux)
            return (*moments(flux, lambda: log_noise_sq, with_head_parts=True), log_noise_sq)

        mc_forward.head_parts = head_parts
    mc_forward.rows_per_call = max(int(samples), MC_CALL_FLOATS // floats_per_row)
    mc_forward.row_bytes = 4 * memory_floats_per_row(top)  # the repeated part, measured as anna.memory measures
    return mc_forward


def mc_moments(forward, flux, nout, samples, rows_per_call=None, noise=None):
    """Run :func:`compile_mc_forward`'s function over (n, npix) ``flux`` in groups of rows_per_call // samples
    spectra (default: the function's own ``rows_per_call``); returns (mean, var_model, var_pred) as (n, nout)
    float64 arrays in normalised units.  With ``noise`` (n,) (σ from a file's errors, NaN where none) the
    variance head reads it instead of DER_SNR where it is finite, and a fourth (n,) array follows: the σ used."""
    flux = np.asarray(flux)
    per_call = mc_spectra_per_call(forward.rows_per_call if rows_per_call is None else rows_per_call, samples)
    mean = np.empty((flux.shape[0], nout))
    var_model = np.empty_like(mean)
    var_pred = np.empty_like(mean)
    used = None if noise is None else np.empty(flux.shape[0])
    for start, chunk in row_blocks(flux, per_call):
        stop = start + len(chunk)
        if noise is None:
            m, vm, vp = forward(chunk)
        else:
            m, vm, vp, sigma = forward.given_noise(chunk, np.asarray(noise[start:stop], dtype=np.float32))
            used[start:stop] = sigma.numpy()
        mean[start:stop], var_model[start:stop], var_pred[start:stop] = m.numpy(), vm.numpy(), vp.numpy()
    return (mean, var_model, var_pred) if noise is None else (mean, var_model, var_pred, used)


def mc_spectra_per_call(rows_per_call, samples):
    """Spectra per call of :func:`compile_mc_forward`'s functions: as many as ``rows_per_call`` sample-rows hold
    with ``samples`` passes each, at least one (the grouping of prediction and of the σ calibration)."""
    return max(1, int(rows_per_call) // int(samples))


def row_blocks(flux, rows):
    """``(start, block)`` over (n, npix) ``flux`` in blocks of ``rows`` spectra, each block float32 (what the
    network reads): the one batched loop of every forward pass over a set (prediction, MC dropout,
    cross-validation, the variance head's parts)."""
    for start in range(0, len(flux), int(rows)):
        yield start, np.asarray(flux[start:start + int(rows)], dtype=np.float32)


def save_frozen(location, network, spec, metadata):
    """Write ``network`` + ``metadata`` as one frozen-model file, atomically; returns its path.

    ``location`` is a folder (the file is ``location/frozen.model``) or a file path.
    """
    from anna import __version__

    path = location if location.endswith(FROZEN_MODEL_NAME) else os.path.join(location, FROZEN_MODEL_NAME)
    meta = dict(metadata)
    meta.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "anna_version": __version__,
                 "tensorflow_version": tf.__version__, "network": spec.to_dict()})
    write_array_archive(path, {"metadata.json": json.dumps(meta, indent=1, sort_keys=True)},
                        {"weights": network.get_weights()}, compress=True)
    return path


def load_frozen(location, dropout_seed=None):
    """Load a frozen model written by :func:`save_frozen`.  Errors name the file and what is wrong.

    ``dropout_seed`` fixes the masks of MC-dropout sampling (see :func:`build_network`)."""
    path, metadata, weights = read_frozen_file(location)
    try:
        spec = NetworkSpec.from_dict(metadata["network"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AnnaInputError(f"frozen model's network description is unreadable ({type(exc).__name__}: {exc})",
                             path=path) from None
    network = build_network(spec, dropout_rate=float(metadata.get("mc_dropout_rate", 0.0)),
                            dropout_seed=dropout_seed, weight_init="NONE")
    try:
        network.set_weights(weights)
    except ValueError as exc:
        raise AnnaInputError(f"frozen model weights do not fit its network description ({exc})",
                             path=path) from None
    return FrozenModel(network, spec, metadata, path=path)


def _trial_name(form, rows):
    return f"{FORWARD_FORM_NAMES[form]}, calls of {rows} spectra"


def _rates_text(rates, shown=3):
    """The ``shown`` fastest of AUTO's trials ("form@rows" -> spectra/s), fastest first."""
    ranked = sorted(rates.items(), key=lambda item: -item[1])
    text = "; ".join(f"{_trial_name(*trial.split('@'))} {rate:,.0f}/s" for trial, rate in ranked[:shown])
    return text + (f"; {len(ranked) - shown} more tried" if len(ranked) > shown else "")


def mc_samples_for(cfg, model, report):
    """MC_SAMPLES when uncertainties are wanted, else None.

    Wanted: what UNCERTAINTY says when the parameter file gives it; otherwise what the model can do (a model
    trained with UNCERTAINTY: MC_DROPOUT, with its variance head and last-stage dropout, gives uncertainties
    by default; UNCERTAINTY: NONE turns them off).  Refuses a model whose last training stage had no dropout
    (nothing to sample); notes when the model has no variance head (then err_pred is 0 and err the
    uncalibrated dropout spread).
    """
    if cfg.was_set("UNCERTAINTY"):
        wanted = cfg.uncertainty == "MC_DROPOUT"
    else:
        wanted = model.spec.heteroscedastic and model.mc_dropout_rate > 0
        if not wanted and getattr(cfg, "max_rel_sigma", None) is not None:
            raise cfg.error("MAX_REL_SIGMA", f"needs uncertainties, but {model.path} was not trained with "
                                             "UNCERTAINTY: MC_DROPOUT (there is no sigma to compare)")
    if not wanted:
        return None
    if model.mc_dropout_rate <= 0:
        raise cfg.error("UNCERTAINTY", f"MC_DROPOUT needs a model trained with dropout in its last stage, but "
                                       f"{model.path} was trained with KEEP_PROB 1 there (retrain with "
                                       "UNCERTAINTY: MC_DROPOUT and a last-stage KEEP_PROB below 1)")
    if not model.spec.heteroscedastic:
        report(f"note: {model.path} has no variance head (trained with UNCERTAINTY: NONE): err_pred is 0 and err "
               "is the uncalibrated spread of the dropout passes")
    return int(cfg.mc_samples)
