"""Shared fixtures: small synthetic packs made on the fly, and the reference folder beside the checkout."""

import os
import shutil
import tempfile
from pathlib import Path

# One BLAS thread for numpy and scipy in the suite and every command it starts (set before numpy loads, unless
# the caller chose a count).  The suite's maths is small matrices (toy packs, 64-128 px) next to TensorFlow's own
# thread pools on a 2-core machine: OpenBLAS's threads then wait on each other instead of working, and a
# (3200, 64) scatter product took 20 ms with two threads against 1.4 ms with one (load 4); the training-domain
# test of tests/test_uncertainty.py ran 33 s against 15 s.  What the tests compare is computed under the one
# setting (a long sum may round differently with another thread count; no test holds such a last digit).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from anna.runtime import prepare_tensorflow_environment  # noqa: E402

# JIT_COMPILE AUTO remembers its timings per network and machine, and XLA keeps its compiled programs, in
# ANNA-TF's cache folder; the suite keeps its own (shared by its tests, so a network is timed once) instead of
# the user's ~/.cache/anna-tf.  Set before prepare_tensorflow_environment, which puts XLA's folder into
# TF_XLA_FLAGS for this process and every command the tests start.
_SUITE_CACHE = tempfile.mkdtemp(prefix="anna-tf-test-cache-")
os.environ["ANNA_TF_CACHE_DIR"] = _SUITE_CACHE
prepare_tensorflow_environment()  # the suite runs in the environment the commands set up


@pytest.fixture(autouse=True, scope="session")
def compiled_form_cache():
    """The suite's cache folder (module comment above); removed when the session ends."""
    yield _SUITE_CACHE
    shutil.rmtree(_SUITE_CACHE, ignore_errors=True)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_reference():
    """../shared/reference (real ANNA templates, real FITS); tests using it skip when it is absent."""
    folder = SHARED / "reference"
    if not folder.is_dir():
        pytest.skip("../shared/reference is not present beside this checkout")
    return folder


def line_spectra(labels, wavelengths):
    """Toy absorption spectra whose line depth follows label 0 and width follows label 1 (both in 0..1)."""
    centres = np.linspace(wavelengths[0], wavelengths[-1], 7)[1:-1]
    depth = 0.2 + 0.6 * labels[:, 0:1, None]
    width = 0.15 + 0.25 * labels[:, 1:2, None]
    profile = depth * np.exp(-0.5 * ((wavelengths[None, None, :] - centres[None, :, None]) / width) ** 2)
    return 1.0 - profile.sum(axis=1)


@pytest.fixture
def toy_packs(tmp_path):
    """Training, cross-validation and test packs (64 px, labels a in 0..1, b in 10..30) and an S/N template."""
    return make_toy_packs(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tests/toy_model.py's tiny frozen model (train_tiny_model's defaults), trained once for the modules that
    read it: tests/test_infer.py, test_evaluate.py, test_infer_dask.py and test_memory.py.  Nothing may be
    written beside it: the tests that fit a correction (correction.json beside the model) copy it first."""
    from toy_model import train_tiny_model

    return train_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def make_toy_packs(tmp_path):
    from anna.packs import write_pack

    rng = np.random.default_rng(11)
    wave = np.linspace(5000.0, 5012.6, 64)
    paths = {}
    for name, n in (("train", 1500), ("xval", 300), ("test", 400)):
        unit = rng.uniform(0, 1, size=(n, 2))
        labels = np.c_[unit[:, 0], 10 + 20 * unit[:, 1]]
        path = tmp_path / f"{name}.pack"
        write_pack(path, wave, np.arange(n) + 1000, labels, line_spectra(unit, wave))
        paths[name] = str(path)
    template = tmp_path / "sn.template"
    np.savetxt(template, np.c_[np.linspace(4990, 5030, 41), np.linspace(0.8, 1.2, 41)])
    paths["sn_template"] = str(template)
    paths["wave"] = wave
    return paths
