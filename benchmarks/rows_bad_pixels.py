"""Bad pixels and survey readers: how the neutral-value rule and BAD_PIXEL_FRACTION training change test
scatter when 5 % of the pixels are masked, and how many spectra a second each survey format is read and prepared.

Run by hand from the repository root (it is not one of run.py's groups):

    python benchmarks/rows_bad_pixels.py            # 6000 training spectra, 30 epochs (about 10 min on 2 cores)
    python benchmarks/rows_bad_pixels.py --quick    # 2000 spectra, 8 epochs

Set-up: teaching-model spectra (anna.synth, tutorial grid, 1001 px, R = 11000), labels Teff, logg, [Fe/H]; a
small network of the project's own builder (two convolutional layers, 64-32 dense) trained with Keras' fit on a
fresh noisy copy of the training set each epoch (S/N uniform in 50-200, the project's noisy_copy), three ways:
no pixels dropped; BAD_PIXEL_FRACTION 0.05 with BAD_PIXEL_FILL INTERPOLATE; the same with CONTINUUM (the
project's drop_pixels).  Every network is tested on the same 1000 test spectra at S/N 100: clean, and with 5 %
of their pixels masked (anna.badpixels.random_bad_mask, another seed) and set by each fill rule.  The figure is
the RMS of inferred minus true labels.  The baseline of each row is the same network on the clean test set.
"""

import argparse
import glob
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from anna.augment import NoiseModel, drop_pixels, noisy_copy  # noqa: E402
from anna.badpixels import fill_bad, random_bad_mask  # noqa: E402

LABELS = ("Teff", "logg", "[Fe/H]")


def make_sets(n_train, n_test, seed=0):
    from anna.synth import default_grid, draw_labels, synthesize

    rng = np.random.default_rng(seed)
    grid = default_grid()
    train_labels, test_labels = draw_labels(n_train, rng)[:, :3], draw_labels(n_test, rng)[:, :3]
    full = draw_labels(n_train + n_test, np.random.default_rng(seed + 1))
    full[:n_train, :3], full[n_train:, :3] = train_labels, test_labels
    flux = synthesize(grid, full)
    return grid, flux[:n_train], train_labels, flux[n_train:], test_labels


def train(flux, labels, epochs, fraction, fill, seed):
    import keras

    from anna.model import NetworkSpec, build_network

    keras.utils.set_random_seed(seed)
    low, high = labels.min(axis=0), labels.max(axis=0)
    target = ((labels - low) / (high - low)).astype(np.float32)
    spec = NetworkSpec(npix=flux.shape[1], nout=3, conv_layers=((8, 4), (8, 8)), fc_dims=(64, 32))
    network = build_network(spec)
    network.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    noise = NoiseModel(np.ones(flux.shape[1]), (50.0, 200.0), (0.0, 0.0), bad_pixel_fraction=fraction,
                       bad_pixel_fill=fill)
    for epoch in range(epochs):
        rng = np.random.default_rng((seed, epoch))
        noisy, _ = noisy_copy(flux, noise.rel_sn, noise.sn_range, noise.cont_range, rng, dtype=np.float32)
        noisy = drop_pixels(noisy, noise, rng)
        network.fit(noisy, target, batch_size=64, epochs=1, verbose=0)
    return lambda spectra: network.predict(spectra.astype(np.float32), batch_size=500, verbose=0) * (high - low) + low


def scatter(predict, flux, labels):
    return np.sqrt(np.mean((predict(flux) - labels) ** 2, axis=0))


def reading_rows(data_dir, repeats=20):
    from anna.infer import spectra_onto_grid
    from anna.survey import read_survey_file
    from anna.survey.prepare import survey_onto_grid
    from anna.continuum import continuum_settings

    rows = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.fits"))):
        kind, spectra = read_survey_file(path)
        low = max(np.nanmin(s.wavelength) for s in spectra)
        high = min(np.nanmax(s.wavelength) for s in spectra)
        grid = np.linspace(low + 0.02 * (high - low), high - 0.02 * (high - low), 400)
        started = time.perf_counter()
        for _ in range(repeats):
            _, spectra = read_survey_file(path)
        read_rate = repeats * len(spectra) / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(repeats):
            survey_onto_grid(spectra, grid, spectra_onto_grid, continuum=continuum_settings("SPLINE"))
        prepare_rate = repeats * len(spectra) / (time.perf_counter() - started)
        rows.append((kind, os.path.basename(path), spectra[0].flux.size, read_rate, prepare_rate))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-train", type=int, help="training spectra (default 6000, --quick 2000)")
    parser.add_argument("--epochs", type=int, help="epochs (default 30, --quick 8)")
    parser.add_argument("--reading-only", action="store_true", help="only the reading rows")
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.reading_only:
        return print_reading_rows()
    n_train, epochs = (2000, 8) if args.quick else (6000, 30)
    n_train, epochs = args.n_train or n_train, args.epochs or epochs
    grid, flux, labels, test_flux, test_labels = make_sets(n_train, 1000)
    test_noisy, _ = noisy_copy(test_flux, np.ones(grid.size), (100.0, 100.0), (0.0, 0.0), seed=99)
    mask = random_bad_mask(np.random.default_rng(123), test_noisy.shape, 0.05)
    tests = {"clean": test_noisy, "5% masked, CONTINUUM": fill_bad(test_noisy, mask, "CONTINUUM"),
             "5% masked, INTERPOLATE": fill_bad(test_noisy, mask, "INTERPOLATE")}
    print(f"# {n_train} training spectra, {epochs} epochs, 1000 test spectra at S/N 100; test mask covers "
          f"{mask.mean():.2%} of pixels")
    print(f"{'training':<34} {'test':<24} " + " ".join(f"{name:>8}" for name in LABELS) + "   ratio to clean")
    for title, fraction, fill in (("no dropped pixels", 0.0, "INTERPOLATE"),
                                  ("BAD_PIXEL_FRACTION 0.05 INTERPOLATE", 0.05, "INTERPOLATE"),
                                  ("BAD_PIXEL_FRACTION 0.05 CONTINUUM", 0.05, "CONTINUUM")):
        started = time.perf_counter()
        predict = train(flux, labels, epochs, fraction, fill, seed=7)
        clean = None
        for name, spectra in tests.items():
            rms = scatter(predict, spectra, test_labels)
            clean = rms if clean is None else clean
            ratio = " ".join(f"{value:.2f}" for value in rms / clean)
            print(f"{title:<34} {name:<24} " + " ".join(f"{value:8.3f}" for value in rms) + f"   {ratio}")
        print(f"#   trained in {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print_reading_rows()


def print_reading_rows():
    print(f"{'format':<22} {'file (tests/data)':<50} {'pixels':>6} {'read/s':>9} {'prepared/s':>11}")
    for kind, name, pixels, read_rate, prepare_rate in reading_rows(
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")):
        print(f"{kind:<22} {name:<50} {pixels:>6} {read_rate:9.0f} {prepare_rate:11.0f}")


if __name__ == "__main__":
    main()
