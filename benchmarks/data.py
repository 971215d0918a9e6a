"""Inputs the benchmarks run on, generated on the spot inside the workspace.

* the example data set of :mod:`anna.synth` (the tutorial's training, cross-validation and test packs);
* survey-sized packs: anna.synth's APOGEE-like spectra (7214 pixels, the H band), or for other lengths a
  log-linear grid over 15100-17000 A, for the training rows of other networks (:meth:`DataStore.example`
  with ``npix`` other than 1001);
* large packs made by repeating the example spectra (speed and memory do not depend on what the spectra
  show, and synthesising a million spectra would dominate the run);
* frozen models of untrained networks (prediction cost does not depend on the weights);
* multispec FITS files with per-aperture linear dispersions;
* small parameter files.
"""

import inspect
import math
import os

import numpy as np

from anna.atomic import atomic_output
from anna.fits_io import add_multispec_wcs

LABEL_NAMES = ("teff", "logg", "feh", "vmic", "vsini")
LABEL_UNITS = ("K", "dex", "dex", "km/s", "km/s")
# Bytes one star takes in a pack: id, labels, dummy and flux, float64.
PACK_VALUE_BYTES = 8
# Survey-sized spectra: log-linear grid over APOGEE's H band, at APOGEE's resolving power.
SURVEY_GRID_RANGE = (15100.0, 17000.0)
SURVEY_RESOLUTION = 22500.0
# The tutorial line list covers 6590-6860 A only; without a survey line list in anna.synth the survey grid's
# log spacing is moved to start here, where the tutorial lines are (see survey_flux).
TUTORIAL_LINES_START = 6450.0


def pack_stars_for_bytes(nbytes, npix=1001, nout=5):
    """Number of stars that make a pack of about ``nbytes`` bytes."""
    return max(1, int(nbytes // ((npix + nout + 2) * PACK_VALUE_BYTES)))


def survey_grid(npix):
    """``npix`` wavelengths (A) spaced evenly in log wavelength over :data:`SURVEY_GRID_RANGE`."""
    low, high = SURVEY_GRID_RANGE
    return np.exp(np.linspace(math.log(low), math.log(high), int(npix)))


def survey_flux(wavelengths, labels, rv_kms):
    """(flux (n, npix), how) of teaching-model spectra on a survey grid.

    With the survey line list of :func:`anna.synth.synthesize` (``line_list="survey"``, lines over the H band)
    the spectra are synthesised on ``wavelengths`` at :data:`SURVEY_RESOLUTION`.  Without it (older
    anna.synth), the tutorial's lines would leave the H band bare continuum, so the same log-spaced grid is
    moved to start at :data:`TUTORIAL_LINES_START` (same pixels per resolution element, lines present) and the
    pack carries the H-band wavelengths; ``how`` says which was done.
    """
    from anna.synth import synthesize

    if "line_list" in inspect.signature(synthesize).parameters:
        return (synthesize(wavelengths, labels, resolution=SURVEY_RESOLUTION, rv_kms=rv_kms, line_list="survey"),
                f"anna.synth survey line list on the H-band grid, R = {SURVEY_RESOLUTION:g}")
    moved = np.asarray(wavelengths) * (TUTORIAL_LINES_START / float(wavelengths[0]))
    return (synthesize(moved, labels, resolution=SURVEY_RESOLUTION, rv_kms=rv_kms),
            f"tutorial line list on the same log grid moved to {moved[0]:.0f}-{moved[-1]:.0f} A (anna.synth has "
            f"no H-band lines), R = {SURVEY_RESOLUTION:g}")


# spectra describing the training domain of the benchmark's models (anna-train uses up to 4000)
DOMAIN_SPECTRA = 2000


class DataStore:
    """Builds each input once per run and hands out its path; everything lives in the workspace."""

    def __init__(self, workspace, sizes, log):
        self.ws = workspace
        self.sizes = sizes
        self.log = log
        self._examples = {}
        self._packs = {}
        self._models = {}

    # ----- the example data set (anna.synth), and survey-sized packs ------------------------------------
    def example(self, npix=1001):
        """Paths of the training data for ``npix``-pixel spectra: train, xval, sn_template (and, for 1001,
        every product of make_example_data: test, multispec, ...)."""
        if npix not in self._examples:
            if npix == 1001:
                from anna.synth import make_example_data

                self.log(f"generating example data ({self.sizes.n_train} training stars)")
                self._examples[npix] = make_example_data(self.ws.sub("example", "x"), seed=1,
                                                         n_train=self.sizes.n_train, n_xval=500,
                                                         n_test=self.sizes.n_test)
            else:
                self._examples[npix] = self._survey_example(npix)
        return self._examples[npix]

    def _survey_example(self, npix, n_xval=500):
        """Training and cross-validation packs of ``npix``-pixel survey spectra, and their S/N template.

        ``survey_base_stars`` spectra are synthesised (a fifth of them for the cross-validation pack) and
        repeated to ``survey_train_stars`` and ``n_xval`` stars, each copy scaled by its own factor within
        +-0.2 %: synthesis on survey grids is slow, and training speed does not depend on the spectra.  For 7214
        pixels the spectra are anna.synth's APOGEE-like example data (``make_example_data(grid="apogee")``:
        its grid, line list, resolving power and S/N profile); for other lengths, or an anna.synth without
        that grid, :func:`survey_grid` with :func:`survey_flux` and a flat S/N template."""
        import anna.synth as synth

        sizes = self.sizes
        n_base = max(10, sizes.survey_base_stars)
        n_train_base = n_base - n_base // 5
        folder = os.path.join("survey", f"npix{npix}")
        if "apogee" in getattr(synth, "GRIDS", ()) and npix == len(synth.apogee_grid()):
            self.log(f"synthesising {n_base} APOGEE-like spectra of {npix} pixels (anna.synth, grid 'apogee')")
            made = synth.make_example_data(os.path.dirname(self.ws.sub(folder, "base", "x")), seed=21,
                                           grid="apogee", n_train=n_train_base, n_xval=n_base - n_train_base,
                                           n_test=1, n_apertures=1)
            sources = {kind: self._pack_arrays(made[kind]) for kind in ("train", "xval")}
            wave = sources["train"][0]
            paths = {"synthesis": f"anna.synth APOGEE-like example data, {wave[0]:.0f}-{wave[-1]:.0f} A on "
                                  "three chips, its S/N profile", "sn_template": made["sn_template"]}
        else:
            wave = survey_grid(npix)
            rng = np.random.default_rng(21)
            labels = synth.draw_labels(n_base, rng)
            rv = rng.uniform(-synth.RESIDUAL_RV_KMS, synth.RESIDUAL_RV_KMS, n_base)
            self.log(f"synthesising {n_base} spectra of {npix} pixels ({wave[0]:.0f}-{wave[-1]:.0f} A, log-linear)")
            flux, how = survey_flux(wave, labels, rv)
            sources = {"train": (wave, labels[:n_train_base], flux[:n_train_base]),
                       "xval": (wave, labels[n_train_base:], flux[n_train_base:])}
            # the example spectrograph's S/N profile (6450-6850 A) is zero in the H band: a flat relative S/N
            template = np.round(np.arange(math.floor(wave[0]) - 25.0, math.ceil(wave[-1]) + 25.0, 0.2), 6)
            paths = {"synthesis": f"{how}, flat S/N template", "sn_template": self.ws.sub(folder, "sn.template")}
            synth.write_sn_template(paths["sn_template"], template, np.ones_like(template))
        paths["n_base"] = n_base
        for kind, count, seed in (("train", sizes.survey_train_stars, 11), ("xval", n_xval, 12)):
            wave, labels, flux = sources[kind]
            paths[kind] = write_tiled_pack(self.ws.sub(folder, f"{kind}.pack"), wave, labels, flux, count, seed=seed)
        return paths

    @staticmethod
    def _pack_arrays(path):
        from anna.packs import open_pack

        pack = open_pack(path)
        return np.array(pack.wavelengths), np.array(pack.labels), np.array(pack.flux)

    def example_flux(self, kind="train", npix=1001):
        """(wavelengths (npix,), labels (n, 5), flux (n, npix) float64) of an example pack."""
        return self._pack_arrays(self.example(npix)[kind])

    def noisy_spectra(self, n, seed=3, sn=100.0, npix=1001):
        """``n`` example training spectra (repeated as needed) with noise at S/N ``sn`` times the S/N template,
        float32 (n, npix)."""
        from anna.templates import relative_sn_on_grid

        wave, _, flux = self.example_flux("train", npix)
        rng = np.random.default_rng(seed)
        rows = flux[np.arange(n) % len(flux)]
        sigma = 1.0 / (sn * relative_sn_on_grid(self.example(npix)["sn_template"], wave))
        return (rows + sigma * rng.standard_normal(rows.shape)).astype(np.float32)

    # ----- large packs ------------------------------------------------------------------------------------
    def tiled_pack(self, n_stars):
        """A pack of ``n_stars`` made by repeating the example training spectra (each copy scaled by its own
        factor within +-0.2 %, so rows differ); written in blocks, so memory stays small at any size."""
        if n_stars not in self._packs:
            wave, labels, flux = self.example_flux("train")
            path = self.ws.sub("packs", f"tiled_{n_stars}.pack")
            self.log(f"writing a {n_stars}-star pack ({n_stars * (flux.shape[1] + 7) * 8 / 1e9:.2f} GB)")
            write_tiled_pack(path, wave, labels, flux, n_stars)
            self._packs[n_stars] = path
        return self._packs[n_stars]

    def has_pack(self, n_stars):
        return n_stars in self._packs

    def drop_pack(self, n_stars):
        """Delete a tiled pack now (the big ones should not wait for the end of the run)."""
        path = self._packs.pop(n_stars, None)
        if path and os.path.exists(path):
            os.remove(path)

    # ----- frozen models ----------------------------------------------------------------------------------
    def untrained_model(self, npix=1001, mc_dropout_rate=0.0):
        """Folder holding a frozen model of an untrained tutorial network for ``npix`` pixels."""
        key = (npix, mc_dropout_rate)
        if key not in self._models:
            folder = self.ws.sub("models", f"untrained_{npix}_{mc_dropout_rate:g}", "frozen.model")
            folder = os.path.dirname(folder)
            # a trained model carries its training-domain description, and anna-infer scores every spectrum
            # against it: so does the 1001-pixel one, from noisy example spectra.  The other lengths serve only
            # FrozenModel.predict (row 7), which does not use it, and describing the domain costs npix^3 (an
            # eigen-decomposition of the npix x npix scatter matrix per fold): they go without.
            domain_flux = self.noisy_spectra(DOMAIN_SPECTRA, seed=4) if npix == 1001 else None
            write_untrained_model(folder, npix, mc_dropout_rate=mc_dropout_rate, domain_flux=domain_flux)
            self._models[key] = folder
        return self._models[key]


def grid_for(npix):
    """The tutorial grid (6625 A at 0.2 A per pixel) extended to ``npix`` pixels."""
    from anna.synth import GRID_START, GRID_STEP

    return np.round(GRID_START + GRID_STEP * np.arange(npix), 6)


def write_tiled_pack(path, wavelengths, labels, flux, n_stars, block=8192, seed=11):
    """Stream a pack of ``n_stars`` rows cycling through ``flux`` (n_base, npix) and ``labels`` (n_base, nout)."""
    wavelengths = np.asarray(wavelengths, dtype="<f8")
    n_base, npix = flux.shape
    nout = labels.shape[1]
    rng = np.random.default_rng(seed)
    with atomic_output(path, "wb") as handle:
        np.concatenate([[npix, nout], wavelengths]).astype("<f8").tofile(handle)
        table = np.empty((block, npix + nout + 2), dtype="<f8")
        for start in range(0, n_stars, block):
            stop = min(start + block, n_stars)
            count = stop - start
            source = np.arange(start, stop) % n_base
            rows = table[:count]
            rows[:, 0] = np.arange(start + 1, stop + 1)
            rows[:, 1:1 + nout] = labels[source]
            rows[:, 1 + nout] = 0.0
            np.multiply(flux[source], rng.uniform(0.998, 1.002, (count, 1)), out=rows[:, 2 + nout:])
            rows.tofile(handle)
    return path


def write_untrained_model(folder, npix, nout=5, mc_dropout_rate=0.0, domain_flux=None):
    """Save the tutorial network (CONV1 45 x 10, FC 128/128) with its initial weights as a frozen model;
    with ``domain_flux`` (n, npix) also the training-domain description anna-train would store."""
    from anna.domain import training_domain_statistics
    from anna.model import NetworkSpec, build_network, save_frozen
    from anna.synth import DEFAULT_LABEL_RANGES

    spec = NetworkSpec(npix=npix, nout=nout)
    network = build_network(spec, dropout_rate=mc_dropout_rate)
    ranges = np.asarray(DEFAULT_LABEL_RANGES[:nout])
    metadata = {"output_names": list(LABEL_NAMES[:nout]), "min_params": ranges[:, 0].tolist(),
                "max_params": ranges[:, 1].tolist(), "wavelengths": grid_for(npix).tolist(),
                "mc_dropout_rate": float(mc_dropout_rate), "complete": True,
                "note": "untrained network written by the benchmark script",
                "training_domain": None if domain_flux is None else training_domain_statistics(domain_flux)}
    os.makedirs(folder, exist_ok=True)
    return save_frozen(folder, network, spec, metadata)


def write_param_file(path, values):
    """A parameter file with one ``KEY: value`` line per item of ``values``."""
    with atomic_output(path, "w", encoding="utf-8") as handle:
        for key, value in values.items():
            handle.write(f"{key}: {value}\n")
    return path


# ----------------------------------------------------------------------------------------------------------
# IRAF multispec files with linear dispersion



def multispec_apertures(model_grid, n_apertures, rng):
    """Per-aperture linear dispersions that cover ``model_grid`` with a margin, like extracted fibre spectra.

    Returns (w1 (n,), dw (n,), width) — every aperture has ``width`` valid pixels.
    """
    step = float(model_grid[1] - model_grid[0])
    w1 = np.round(float(model_grid[0]) - 10.0 + rng.uniform(-0.5, 0.5, n_apertures), 4)
    dw = np.round(0.95 * step * (1.0 + rng.normal(0.0, 1e-4, n_apertures)), 7)
    # wide enough that every aperture reaches 10 A past the end of the model grid
    width = int(math.ceil(np.max((float(model_grid[-1]) + 10.0 - w1) / dw))) + 1
    return w1, dw, width


def write_multispec(path, flux, w1, dw):
    """Write (n_apertures, width) ``flux`` as an IRAF multispec image with linear dispersion (dtype 0)."""
    from astropy.io import fits

    n_apertures, width = flux.shape
    hdu = fits.PrimaryHDU(np.asarray(flux, dtype=np.float32))
    header = hdu.header
    header["OBJECT"] = "benchmark multispec"
    add_multispec_wcs(header, [f"{ap} {ap} 0 {w1[ap - 1]:.4f} {dw[ap - 1]:.7f} {width} 0. {ap - 0.4:.2f} "
                               f"{ap + 0.4:.2f}" for ap in range(1, n_apertures + 1)])
    with atomic_output(path, "wb") as handle:
        hdu.writeto(handle)
    return path


def write_multispec_set(folder, model_grid, n_spectra, n_apertures=90, seed=5, sn=100.0):
    """``ceil(n_spectra / n_apertures)`` multispec files of ``n_apertures`` noisy spectra each; returns the count
    of spectra written.  The spectra are synthesised once on the aperture grids and re-noised per file."""
    from anna.synth import draw_labels, fibre_relative_sn, synthesize

    rng = np.random.default_rng(seed)
    w1, dw, width = multispec_apertures(model_grid, n_apertures, rng)
    wave = w1[:, None] + dw[:, None] * np.arange(width)[None, :]
    base = synthesize(wave, draw_labels(n_apertures, rng))
    sigma = 1.0 / (sn * fibre_relative_sn(wave))
    os.makedirs(folder, exist_ok=True)
    n_files = -(-n_spectra // n_apertures)
    for number in range(n_files):
        flux = base * rng.uniform(0.99, 1.01, (n_apertures, 1)) + sigma * rng.standard_normal(base.shape)
        write_multispec(os.path.join(folder, f"field{number:05d}.fits"), flux, w1, dw)
    return n_files * n_apertures
