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
output is then (batch, 2·NUM_OUTS): labels, then ln σ²_pred.

Frozen model: ``SAVE_LOC/frozen.model`` is ONE file, a zip archive holding ``metadata.json`` (network spec,
output names, label ranges, training wavelength grid, resolved parameters, versions, pack hash) and
``weights.npz`` (the weights in builder order).  Loading rebuilds the network with this same builder and sets
the weights, so no pickled code or custom-object registry is involved and a model moves between machines as a
single file.  The file is written atomically.
"""

import dataclasses
import io
import json
import os
import zipfile
import zlib

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.losses import LOG_VARIANCE_MAX, LOG_VARIANCE_MIN

FROZEN_MODEL_NAME = "frozen.model"
FORMAT_NAME = "anna-tf frozen model"
FORMAT_VERSION = 1
# What load_frozen and its users rely on; a model lacking any of these is refused with a clear message.
REQUIRED_METADATA = ("network", "output_names", "wavelengths", "min_params", "max_params")
# Starting values of the variance head (normalised labels, 0..1 scale): sigma_fit = 0.1 (a tenth of MAX - MIN),
# and a noise part equal to it at S/N 100.  Training refits both biases by maximum likelihood every
# SAMPLE_INTERVAL (anna.train.refit_variance_biases), so these only matter for the first interval.
INITIAL_LOG_VARIANCE_FIT = float(np.log(0.1**2))
INITIAL_LOG_NOISE_GAIN = float(np.log(0.1**2) - np.log(0.01**2))
# Smallest batch shape FrozenModel.predict_raw compiles: shorter batches are padded up to a power of two.
PREDICT_MIN_ROWS = 64
# MC dropout: sample-rows (spectra x passes) per graph call; a row holds fc1's activations, so memory stays small.
MC_ROWS_PER_CALL = 65536
# DER_SNR (Stoehr et al. 2008): noise = 1.482602 / sqrt(6) * median |2 f_i - f_(i-2) - f_(i+2)|.
DER_SNR_FACTOR = 1.482602 / np.sqrt(6.0)
# Noise floor (flux units) so that ln(noise^2) stays finite for noise-free spectra.
NOISE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything that fixes the network's shape.  Stored in the frozen model and used to rebuild it.

    ``conv_layers`` is a tuple of (kernel width in pixels, number of kernels); ``fc_dims`` the two dense widths;
    ``pool_size`` 1 means no pooling; ``heteroscedastic`` adds a log-variance output per label.
    """

    npix: int
    nout: int
    conv_layers: tuple = ((45, 10),)
    pool_size: int = 1
    fc_dims: tuple = (128, 128)
    heteroscedastic: bool = False

    @classmethod
    def from_config(cls, cfg, npix, nout):
        conv = [(cfg.conv1_shape[1], cfg.conv1_shape[3])]
        if getattr(cfg, "conv2_shape", None):
            conv.append((cfg.conv2_shape[1], cfg.conv2_shape[3]))
        return cls(npix=int(npix), nout=int(nout), conv_layers=tuple(conv), pool_size=int(cfg.pool_size or 1),
                   fc_dims=(int(cfg.fc1_outdim), int(cfg.fc2_outdim)),
                   heteroscedastic=(getattr(cfg, "uncertainty", "NONE") == "MC_DROPOUT"))

    def to_dict(self):
        return {"npix": self.npix, "nout": self.nout, "conv_layers": [list(c) for c in self.conv_layers],
                "pool_size": self.pool_size, "fc_dims": list(self.fc_dims),
                "heteroscedastic": self.heteroscedastic}

    @classmethod
    def from_dict(cls, data):
        return cls(npix=int(data["npix"]), nout=int(data["nout"]),
                   conv_layers=tuple(tuple(int(v) for v in c) for c in data["conv_layers"]),
                   pool_size=int(data["pool_size"]), fc_dims=tuple(int(v) for v in data["fc_dims"]),
                   heteroscedastic=bool(data.get("heteroscedastic", False)))


def build_network(spec, dropout_rate=0.0, centre=None, dropout_seed=None):
    """Build the Keras network for ``spec``.

    ``dropout_rate`` is 1 − KEEP_PROB of the stage being trained (dropout only acts when called with
    ``training=True``); ``dropout_seed`` (int) makes the dropout masks a fixed sequence (MC-dropout reruns).
    ``centre`` (npix,) is subtracted from the input; default 1.0 (the continuum).
    Input (batch, npix) float32 flux; output (batch, nout) normalised labels, or (batch, 2·nout) with the
    log-variances appended when ``spec.heteroscedastic``.
    """
    flux = keras.Input(shape=(spec.npix,), name="flux", dtype="float32")
    centre_layer = CentreLayer(spec.npix, name="centre")
    x = centre_layer(flux)
    for number, (width, kernels) in enumerate(spec.conv_layers, start=1):
        if number == 1:
            x = SpectrumConv1D(kernels, width, name="conv1")(x)
        else:
            x = layers.Conv1D(kernels, width, padding="same", activation="relu", kernel_initializer="he_normal",
                              bias_initializer="zeros", name=f"conv{number}")(x)
    if spec.pool_size > 1:
        x = layers.MaxPooling1D(spec.pool_size, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for number, width in enumerate(spec.fc_dims, start=1):
        x = layers.Dense(width, activation="relu", kernel_initializer="he_normal", bias_initializer="zeros",
                         name=f"fc{number}")(x)
        seed = None if dropout_seed is None else int(dropout_seed) * 2 + number
        x = layers.Dropout(dropout_rate, seed=seed, name=f"dropout{number}")(x)
    outputs = layers.Dense(spec.nout, name="labels")(x)
    if spec.heteroscedastic:
        # Predicted variance of each label = misfit part + noise part (linear error propagation: a label's error
        # from flux noise scales with that noise).  Both parts depend on the spectrum through the features.
        log_var_fit = layers.Dense(spec.nout, name="log_variance_fit", kernel_initializer="zeros",
                                   bias_initializer=keras.initializers.Constant(INITIAL_LOG_VARIANCE_FIT))(x)
        log_gain = layers.Dense(spec.nout, name="log_noise_gain", kernel_initializer="zeros",
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


class SpectrumConv1D(keras.layers.Layer):
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

    def __init__(self, kernels, width, **kwargs):
        super().__init__(**kwargs)
        self.kernels = int(kernels)
        self.width = int(width)

    def build(self, input_shape):
        npix = int(input_shape[-1])
        tile, width = self.TILE, self.width
        self.kernel = self.add_weight(shape=(width, 1, self.kernels), initializer="he_normal", name="kernel")
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
        offset = np.arange(span)[:, None] - np.arange(tile)[None, :]
        self.band_taps = np.clip(offset, 0, width - 1)
        self.band_mask = ((offset >= 0) & (offset < width)).astype(np.float32)[:, :, None]

    def call(self, flux):
        padded = tf.pad(flux, [[0, 0], [self.left_pad, self.right_pad]])
        tiles = tf.gather(padded, self.tile_pixels, axis=1)                      # (batch, tiles, span)
        band = tf.gather(self.kernel[:, 0, :], self.band_taps) * self.band_mask  # (span, TILE, kernels)
        band = tf.reshape(band, [band.shape[0], self.TILE * self.kernels])
        out = tf.matmul(tf.reshape(tiles, [-1, band.shape[0]]), band)            # (batch*tiles, TILE*kernels)
        out = tf.reshape(out, [-1, self.tiles * self.TILE, self.kernels])[:, :self.npix, :]
        return tf.nn.relu(out + self.bias)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1], self.kernels)

    def get_config(self):
        return {**super().get_config(), "kernels": self.kernels, "width": self.width}


class LogNoiseVariance(keras.layers.Layer):
    """ln(noise²) of each spectrum, (batch, npix) flux -> (batch, 1), noise estimated by DER_SNR.

    DER_SNR takes the median of |2 f_i − f_(i−2) − f_(i+2)|: the second difference over two pixels cancels the
    (smooth) spectrum and keeps the pixel noise, and the median ignores lines and bad pixels.  For
    continuum-normalised flux the noise is about 1/(S/N).  Spectra shorter than 5 pixels get NOISE_FLOOR.
    """

    def call(self, flux):
        import tensorflow as tf

        if flux.shape[-1] is not None and flux.shape[-1] < 5:
            return tf.fill([tf.shape(flux)[0], 1], tf.constant(2.0 * np.log(NOISE_FLOOR), flux.dtype))
        second = tf.abs(2.0 * flux[:, 2:-2] - flux[:, :-4] - flux[:, 4:])
        ordered = tf.sort(second, axis=-1)
        count = tf.shape(ordered)[-1]
        median = 0.5 * (tf.gather(ordered, (count - 1) // 2, axis=-1) + tf.gather(ordered, count // 2, axis=-1))
        noise = DER_SNR_FACTOR * median
        return tf.math.log(tf.square(noise) + NOISE_FLOOR**2)[:, None]


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
        self._forward = None
        self._mc_forward = {}

    @property
    def nout(self):
        return self.spec.nout

    def _compiled_forward(self):
        if self._forward is None:
            network = self.network

            # XLA fuses the network into a few loops: 1.5x the spectra per second of the plain graph on 2 cores
            # (benchmarks/).  It compiles once per batch shape, hence the fixed shapes of predict_raw.
            @tf.function(input_signature=[tf.TensorSpec([None, self.spec.npix], tf.float32)],
                         jit_compile=True, autograph=False)
            def forward(flux):
                return network(flux, training=False)

            self._forward = forward
        return self._forward

    def predict_raw(self, flux, batch_size=4096):
        """Network outputs (normalised labels [+ log-variances]) for (n, npix) flux, float64 numpy.

        Spectra go through ``batch_size`` at a time; a shorter batch is padded with flat continuum up to the
        next power of two (at least PREDICT_MIN_ROWS), so however the input is cut only a handful of batch
        shapes is ever compiled.  The padding rows' outputs are dropped.
        """
        flux = np.asarray(flux)
        batch_size = int(batch_size)
        forward = self._compiled_forward()
        out = np.empty((flux.shape[0], self.network.output_shape[-1]), dtype=np.float64)
        for start in range(0, flux.shape[0], batch_size):
            chunk = np.asarray(flux[start:start + batch_size], dtype=np.float32)
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

    def _compiled_mc(self, samples):
        key = int(samples)
        if key not in self._mc_forward:
            self._mc_forward[key] = compile_mc_forward(self.network, self.spec, key)
        return self._mc_forward[key]

    def predict_with_uncertainty(self, flux, samples=100, rows_per_call=MC_ROWS_PER_CALL):
        """MC-dropout prediction (Gal & Ghahramani; astroNN): ``samples`` stochastic passes with dropout on.

        Returns a dict of (n, nout) float64 arrays in physical units: ``value`` (mean of the passes),
        ``sigma_model`` (their standard deviation times sqrt(κ), κ = :attr:`model_variance_scale`: the spread
        of the network itself, which grows for spectra unlike the training set), ``sigma_pred`` (the variance
        head's sigma, read from the dropout-free pass it was trained in; zero without a variance head) and
        ``sigma_total`` = sqrt(sigma_model² + sigma_pred²)
        (Leung & Bovy 2019, eq. 3).  Work is grouped so that one graph call handles ``rows_per_call``
        sample-rows, bounding memory.  Raises AnnaInputError for a model trained without dropout.
        """
        if self.mc_dropout_rate <= 0:
            raise AnnaInputError("this frozen model's final training stage ran without dropout (KEEP_PROB = 1), "
                                 "so there is nothing to sample; retrain with UNCERTAINTY: MC_DROPOUT and a "
                                 "last-stage KEEP_PROB below 1", path=self.path)
        mean, var_model, var_pred = mc_moments(self._compiled_mc(samples), flux, self.nout, samples,
                                               rows_per_call)
        var_model = var_model * self.model_variance_scale
        sigma_model = self.scaler.physical_sigma(np.sqrt(var_model))
        sigma_pred = self.scaler.physical_sigma(np.sqrt(var_pred))
        return {"value": self.scaler.physical(mean), "sigma_model": sigma_model, "sigma_pred": sigma_pred,
                "sigma_total": np.hypot(sigma_model, sigma_pred)}


def compile_mc_forward(network, spec, samples):
    """Graph function flux (n, npix) float32 -> (mean, var_model, var_pred), each (n, nout), normalised units.

    Dropout acts only after the dense layers, so everything up to the first dense layer (centring, the
    convolutions, fc1) is the same in every pass: it runs once per spectrum, and only the rest of the network
    (dropout, the next dense layers, the output) runs ``samples`` times, on the tiled fc1 activations in ONE
    call (dropout draws a fresh mask for every row).  The result equals sampling the whole network.
    ``var_pred`` comes from one dropout-free pass (zeros without a variance head).
    """
    import keras

    nout, heteroscedastic = spec.nout, spec.heteroscedastic
    trunk = keras.Model(network.input, network.get_layer("fc1").output)
    activations = keras.Input(shape=(spec.fc_dims[0],), dtype="float32")
    x = activations
    for number in range(1, len(spec.fc_dims) + 1):
        if number > 1:
            x = network.get_layer(f"fc{number}")(x)
        x = network.get_layer(f"dropout{number}")(x)
    top = keras.Model(activations, network.get_layer("labels")(x))

    @tf.function(input_signature=[tf.TensorSpec([None, spec.npix], tf.float32)], reduce_retracing=True,
                 autograph=False)
    def mc_forward(flux):
        count = tf.shape(flux)[0]
        shared = trunk(flux, training=False)
        pred = tf.reshape(top(tf.tile(shared, [samples, 1]), training=True), [samples, count, nout])
        mean = tf.reduce_mean(pred, axis=0)
        var_model = tf.math.reduce_variance(pred, axis=0)
        if heteroscedastic:
            # the variance head is trained without dropout (anna.train), so it is read without dropout
            log_var = network(flux, training=False)[:, nout:]
            var_pred = tf.exp(tf.clip_by_value(log_var, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX))
        else:
            var_pred = tf.zeros_like(var_model)
        return mean, var_model, var_pred

    return mc_forward


def mc_moments(forward, flux, nout, samples, rows_per_call=MC_ROWS_PER_CALL):
    """Run :func:`compile_mc_forward`'s function over (n, npix) ``flux`` in groups of rows_per_call // samples
    spectra; returns (mean, var_model, var_pred) as (n, nout) float64 arrays in normalised units."""
    flux = np.asarray(flux)
    per_call = max(1, int(rows_per_call) // int(samples))
    mean = np.empty((flux.shape[0], nout))
    var_model = np.empty_like(mean)
    var_pred = np.empty_like(mean)
    for start in range(0, flux.shape[0], per_call):
        chunk = np.asarray(flux[start:start + per_call], dtype=np.float32)
        m, vm, vp = forward(chunk)
        stop = start + len(chunk)
        mean[start:stop], var_model[start:stop], var_pred[start:stop] = m.numpy(), vm.numpy(), vp.numpy()
    return mean, var_model, var_pred


def resolve_model_path(location):
    """Accept either the frozen-model file or the folder holding ``frozen.model`` (SAVE_LOC style)."""
    location = os.fspath(location)
    if os.path.isdir(location):
        return os.path.join(location, FROZEN_MODEL_NAME)
    return location


def save_frozen(location, network, spec, metadata):
    """Write ``network`` + ``metadata`` as one frozen-model file, atomically; returns its path.

    ``location`` is a folder (the file is ``location/frozen.model``) or a file path.
    """
    from anna import __version__

    path = location if location.endswith(FROZEN_MODEL_NAME) else os.path.join(location, FROZEN_MODEL_NAME)
    meta = dict(metadata)
    meta.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "anna_version": __version__,
                 "tensorflow_version": tf.__version__, "network": spec.to_dict()})
    weights = io.BytesIO()
    np.savez(weights, *[np.asarray(w) for w in network.get_weights()])
    with atomic_output(path, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("metadata.json", json.dumps(meta, indent=1, sort_keys=True))
            archive.writestr("weights.npz", weights.getvalue())
    return path


def load_frozen(location, dropout_seed=None):
    """Load a frozen model written by :func:`save_frozen`.  Errors name the file and what is wrong.

    ``dropout_seed`` fixes the masks of MC-dropout sampling (see :func:`build_network`)."""
    path = resolve_model_path(location)
    if not os.path.exists(path):
        raise AnnaInputError("no frozen model here (train first, or point TEST_MODEL_LOC/INFER_MODEL_LOC "
                             "at the folder holding frozen.model)", path=path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"metadata.json", "weights.npz"} <= names:
                raise AnnaInputError(f"not an ANNA-TF frozen model (archive holds {sorted(names)})", path=path)
            metadata = json.loads(archive.read("metadata.json").decode("utf-8"))
            with np.load(io.BytesIO(archive.read("weights.npz"))) as stored:
                weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    except AnnaInputError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError) as exc:
        raise AnnaInputError(f"frozen model is corrupted or not a frozen model ({type(exc).__name__}: {exc})",
                             path=path) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise AnnaInputError("not an ANNA-TF frozen model (metadata has no ANNA-TF format tag)", path=path)
    if metadata.get("format_version") != FORMAT_VERSION:
        from anna import __version__
        raise AnnaInputError(
            f"frozen model format {metadata.get('format_version')} written by ANNA-TF "
            f"{metadata.get('anna_version')}; this ANNA-TF {__version__} reads format {FORMAT_VERSION}",
            path=path)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise AnnaInputError(f"frozen model metadata lacks {', '.join(missing)} (damaged or hand-edited file)",
                             path=path)
    try:
        spec = NetworkSpec.from_dict(metadata["network"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AnnaInputError(f"frozen model's network description is unreadable ({type(exc).__name__}: {exc})",
                             path=path) from None
    network = build_network(spec, dropout_rate=float(metadata.get("mc_dropout_rate", 0.0)),
                            dropout_seed=dropout_seed)
    try:
        network.set_weights(weights)
    except ValueError as exc:
        raise AnnaInputError(f"frozen model weights do not fit its network description ({exc})",
                             path=path) from None
    return FrozenModel(network, spec, metadata, path=path)
