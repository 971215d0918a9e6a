"""The one network builder shared by anna-train, anna-test and anna-infer, and the frozen-model artifact.

Network (ANNA, guide section 2.2, with the corrections ANNA-TF adopts)::

    flux (batch, npix) -> minus centre  -> conv1d ReLU [-> conv1d ReLU] [-> max-pool] -> flatten
         -> dense FC1 ReLU -> dropout -> dense FC2 ReLU -> dropout -> dense NUM_OUTS (normalised labels)

The centre is 1 (the continuum) or the training mean spectrum; it is a non-trainable weight of the network, so
it travels with the frozen model.  Raw continuum-normalised flux (~1 everywhere) fed straight into a ReLU conv
stack was observed not to learn; centring makes absorption features the signal.  Labels are normalised to
[0, 1] with MIN_PARAMS/MAX_PARAMS; the frozen model stores those ranges and speaks physical units.

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

FROZEN_MODEL_NAME = "frozen.model"
FORMAT_NAME = "anna-tf frozen model"
FORMAT_VERSION = 1


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


def build_network(spec, dropout_rate=0.0, centre=None):
    """Build the Keras network for ``spec``.

    ``dropout_rate`` is 1 − KEEP_PROB of the stage being trained (dropout only acts when called with
    ``training=True``).  ``centre`` (npix,) is subtracted from the input; default 1.0 (the continuum).
    Input (batch, npix) float32 flux; output (batch, nout) normalised labels, or (batch, 2·nout) with the
    log-variances appended when ``spec.heteroscedastic``.
    """
    flux = keras.Input(shape=(spec.npix,), name="flux", dtype="float32")
    centre_layer = CentreLayer(spec.npix, name="centre")
    x = centre_layer(flux)
    x = layers.Reshape((spec.npix, 1), name="as_channels")(x)
    for number, (width, kernels) in enumerate(spec.conv_layers, start=1):
        x = layers.Conv1D(kernels, width, padding="same", activation="relu", kernel_initializer="he_normal",
                          bias_initializer="zeros", name=f"conv{number}")(x)
    if spec.pool_size > 1:
        x = layers.MaxPooling1D(spec.pool_size, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for number, width in enumerate(spec.fc_dims, start=1):
        x = layers.Dense(width, activation="relu", kernel_initializer="he_normal", bias_initializer="zeros",
                         name=f"fc{number}")(x)
        x = layers.Dropout(dropout_rate, name=f"dropout{number}")(x)
    outputs = layers.Dense(spec.nout, name="labels")(x)
    if spec.heteroscedastic:
        log_var = layers.Dense(spec.nout, name="log_variance", kernel_initializer="zeros",
                               bias_initializer="zeros")(x)
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

    def __init__(self, network, spec, metadata):
        self.network = network
        self.spec = spec
        self.metadata = metadata
        self.output_names = tuple(metadata["output_names"])
        self.wavelengths = np.asarray(metadata["wavelengths"], dtype=np.float64)
        self.scaler = LabelScaler(metadata["min_params"], metadata["max_params"])
        self._forward = None

    @property
    def nout(self):
        return self.spec.nout

    def _compiled_forward(self):
        if self._forward is None:
            network = self.network

            @tf.function(input_signature=[tf.TensorSpec([None, self.spec.npix], tf.float32)],
                         reduce_retracing=True)
            def forward(flux):
                return network(flux, training=False)

            self._forward = forward
        return self._forward

    def predict_raw(self, flux, batch_size=4096):
        """Network outputs (normalised labels [+ log-variances]) for (n, npix) flux, float64 numpy."""
        flux = np.asarray(flux)
        forward = self._compiled_forward()
        out = np.empty((flux.shape[0], self.network.output_shape[-1]), dtype=np.float64)
        for start in range(0, flux.shape[0], batch_size):
            chunk = np.asarray(flux[start:start + batch_size], dtype=np.float32)
            out[start:start + len(chunk)] = forward(chunk).numpy()
        return out

    def predict(self, flux, batch_size=4096):
        """Labels in physical units, (n, nout) float64."""
        raw = self.predict_raw(flux, batch_size)
        return self.scaler.physical(raw[:, :self.nout])


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


def load_frozen(location):
    """Load a frozen model written by :func:`save_frozen`.  Errors name the file and what is wrong."""
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
    if metadata.get("format") != FORMAT_NAME:
        raise AnnaInputError("not an ANNA-TF frozen model (metadata has no ANNA-TF format tag)", path=path)
    if metadata.get("format_version") != FORMAT_VERSION:
        from anna import __version__
        raise AnnaInputError(
            f"frozen model format {metadata.get('format_version')} written by ANNA-TF "
            f"{metadata.get('anna_version')}; this ANNA-TF {__version__} reads format {FORMAT_VERSION}",
            path=path)
    spec = NetworkSpec.from_dict(metadata["network"])
    network = build_network(spec)
    try:
        network.set_weights(weights)
    except ValueError as exc:
        raise AnnaInputError(f"frozen model weights do not fit its network description ({exc})",
                             path=path) from None
    return FrozenModel(network, spec, metadata)
