"""A tiny frozen model on toy line spectra, shared by the anna-test and anna-infer tests.

64 px, three labels; line k's depth follows normalised label k, at fixed physical wavelengths so that spectra
on other grids show the same lines.  The network is fitted with plain Keras (fast) and saved with the
project's own save_frozen, so tests exercise a real frozen model end to end.
"""

from pathlib import Path

import numpy as np

from anna.params import load_config

NAMES = ("Teff", "logg", "[Fe/H]")
MINIMA = np.array([4000.0, 1.0, -2.0])
MAXIMA = np.array([7000.0, 5.0, 0.5])
SPAN = MAXIMA - MINIMA
WAVE = 6000.0 + np.arange(64) * 1.0
SHARED = Path(__file__).resolve().parents[2] / "shared"


def toy_flux(unit, wave=WAVE):
    """Continuum-normalised spectra (n, len(wave)): line k's depth follows normalised label k (0..1)."""
    centres = WAVE[0] + (WAVE[-1] - WAVE[0]) * np.array([0.2, 0.5, 0.8])
    depth = 0.1 + 0.5 * np.atleast_2d(unit)[:, :, None]
    profile = depth * np.exp(-0.5 * ((np.asarray(wave)[None, None, :] - centres[None, :, None]) / 2.0) ** 2)
    return 1.0 - profile.sum(axis=1)


def toy_stars(n, seed):
    unit = np.random.default_rng(seed).uniform(0, 1, size=(n, 3))
    return MINIMA + unit * SPAN, toy_flux(unit), unit


def train_tiny_model(folder, wave=WAVE, epochs=6, training_domain=True):
    """Fit a small network on normalised labels and save it as a frozen model in ``folder``, with the
    training-domain statistics anna-train stores (of the training spectra noised at S/N 100) unless
    ``training_domain`` is False (a model as older versions, or a stopped run, left it)."""
    import keras

    from anna.domain import training_domain_statistics
    from anna.model import NetworkSpec, build_network, save_frozen

    keras.utils.set_random_seed(5)
    labels, flux, unit = toy_stars(1024, seed=1)
    spec = NetworkSpec(npix=len(wave), nout=3, conv_layers=((5, 4),), fc_dims=(32, 32))
    network = build_network(spec)
    network.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    if epochs:
        network.fit(flux.astype(np.float32), unit.astype(np.float32), batch_size=32, epochs=epochs, verbose=0)
    on_grid = toy_flux(unit, wave)
    noisy = on_grid + np.random.default_rng(6).normal(0.0, 0.01, on_grid.shape)
    save_frozen(str(folder), network, spec, {"output_names": list(NAMES), "wavelengths": list(wave),
                                             "min_params": list(MINIMA), "max_params": list(MAXIMA),
                                             "training_domain": (training_domain_statistics(noisy)
                                                                 if training_domain else None)})
    return str(folder)


def make_config(folder, **keys):
    """Write a parameter file with ``keys`` and load it as anna-test/anna-infer would."""
    path = Path(folder) / "ANNA.param"
    path.write_text("".join(f"{key.upper()}: {value}\n" for key, value in keys.items()))
    return load_config(path)
