"""What every frozen model carries beside its weights: the training-domain statistics (anna-infer's
``outside_training_domain`` flag) and, with a variance head (UNCERTAINTY: MC_DROPOUT), the calibration of σ;
and the two sets they are computed from.

Why a module of its own: anna-train computes these parts from the best weights whenever it writes a frozen
model (at the end of the stages, at a time budget, after Ctrl-C or SIGTERM), and ``anna-train --finish``
(:mod:`anna.train.finish`) computes afterwards the parts a model lacks.  Both must build the same sets in the
same way (the cross-validation set noised once with the run's seed, the training sample drawn and noised with
it) and record in the same way what was computed, by which command and in how long (metadata
``model_parts``, one record per part).  A model written without a part has that part null, and its record says
why; :meth:`anna.model.FrozenModel.missing_parts` is what anna-test and anna-infer read.
"""

import time

import numpy as np

from anna.errors import AnnaInputError

# Training spectra drawn (fixed seed) for the training-domain statistics.
DOMAIN_SAMPLE = 4000
TRAINING_DOMAIN = "training_domain"
VARIANCE_CALIBRATION = "variance_calibration"
PART_TITLES = {TRAINING_DOMAIN: "training-domain statistics", VARIANCE_CALIBRATION: "uncertainty calibration"}
FINISH_COMMAND = "anna-train --finish"


class XvalSet:
    """The cross-validation set, built once: float32 flux (noised once, fixed seed) and normalised labels."""

    def __init__(self, flux, labels, mask):
        self.flux, self.labels, self.mask = flux, labels, mask


def label_mask(labels, missing_value):
    """(n, nout) bool: the labels present (finite and not MAGIC_NUMBER)."""
    mask = np.isfinite(labels)
    if missing_value is not None:
        mask &= labels != missing_value
    return mask


def noise_models(cfg, wavelengths):
    """(training noise, cross-validation noise) of the parameter file on ``wavelengths``: the PREPROCESS_TRAIN
    noise model, or None; the same model for the cross-validation set when TRAINING_XVAL and PREPROCESS_XVAL,
    else None."""
    from anna.augment import NoiseModel
    from anna.templates import relative_sn_on_grid

    wanted_xval = cfg.training_xval and cfg.preprocess_xval
    if not (cfg.preprocess_train or wanted_xval):
        return None, None
    rel_sn = relative_sn_on_grid(cfg.sn_template, wavelengths)

    def model():
        return NoiseModel(rel_sn, tuple(cfg.sn_range_train), tuple(cfg.rel_cont_e_train),
                          bad_pixel_fraction=float(cfg.bad_pixel_fraction), bad_pixel_fill=cfg.bad_pixel_fill)

    return (model() if cfg.preprocess_train else None), (model() if wanted_xval else None)


def load_xval(cfg, pack, scaler, noise, seed, missing_value):
    """The first XVAL_SIZE stars of XVAL_DATA on the training pack's grid, noised once with ``noise`` (when
    PREPROCESS_XVAL) from the run's ``seed``: the same spectra at every evaluation, and again for
    ``anna-train --finish``."""
    from anna.augment import noisy_copy
    from anna.packs import open_pack

    xval = open_pack(cfg.xval_data, expected_npix=pack.npix, expected_nout=pack.nout, max_stars=cfg.xval_size,
                     check_flux=True, missing_label_value=missing_value)
    if not np.allclose(xval.wavelengths, pack.wavelengths, rtol=1e-9, atol=0):
        raise AnnaInputError("cross-validation wavelengths differ from the training pack's (max difference "
                             f"{np.max(np.abs(xval.wavelengths - pack.wavelengths)):.3g} A)", path=xval.path,
                             key="XVAL_DATA")
    flux = np.array(xval.flux, dtype=np.float64)
    if noise is not None and cfg.preprocess_xval:
        flux, _ = noisy_copy(flux, noise.rel_sn, noise.sn_range, noise.cont_range, seed=(seed, 7919))
    labels = np.array(xval.labels, dtype=np.float64)
    mask = label_mask(labels, missing_value)
    normalised = np.where(mask, scaler.normalise(np.where(mask, labels, 0.0)), 0.0)
    return XvalSet(flux.astype(np.float32), normalised.astype(np.float32), mask.astype(np.float32))


def training_sample(pack, rows, scaler, noise, seed, missing_value, count=DOMAIN_SAMPLE):
    """Up to ``count`` training spectra drawn with the run's ``seed``, noised as in training (``noise`` None:
    as stored); (flux float64, normalised labels, mask) from ``rows`` (:class:`anna.augment.PackRows`)."""
    from anna.augment import noisy_copy

    rng = np.random.default_rng((seed, 104729))
    n = min(count, pack.n_stars)
    indices = np.sort(rng.choice(pack.n_stars, size=n, replace=False))
    flux, labels = rows.gather(indices)
    flux = np.asarray(flux, dtype=np.float64)
    if noise is not None:
        flux, _ = noisy_copy(flux, noise.rel_sn, noise.sn_range, noise.cont_range, seed=(seed, 104729))
    mask = label_mask(labels, missing_value)
    normalised = np.where(mask, scaler.normalise(np.where(mask, labels, 0.0)), 0.0)
    return flux, normalised, mask.astype(np.float64)


class CalibrationSet:
    """The spectra σ is calibrated on (:func:`calibration_set`): float32 ``flux``, normalised ``labels``,
    ``mask``, the set's ``name``, and, when the set was noised at S/N levels, ``level`` ((n,) index of each
    spectrum's level) and ``level_sn`` (the levels' S/N); both None for a set used as it is."""

    def __init__(self, flux, labels, mask, name, level=None, level_sn=None):
        self.flux, self.labels, self.mask, self.name = flux, labels, mask, name
        self.level, self.level_sn = level, level_sn


def calibration_set(cfg, pack, scaler, noise, xval_noise, seed, missing_value, training_set_as_stored):
    """The set the variance head is calibrated on: the cross-validation stars (TRAINING_XVAL), else the
    training sample (``training_set_as_stored()``: :func:`training_sample` without noise).

    When the set is noised by the noise model (PREPROCESS_XVAL, or PREPROCESS_TRAIN for the training sample),
    its first CALIBRATION_STARS stars are noised again at each of the S/N levels of
    :func:`anna.train.variance.calibration_sn_levels` (log-spaced over the S/N range): every level has the same
    stars, so a σ that is right at S/N 200 but too small at S/N 30 shows as such, instead of being averaged
    over a uniform S/N draw in which the low end is a small minority.  A set the noise model does not noise
    (real spectra) is used as it is."""
    from anna.train.variance import CALIBRATION_STARS, calibration_sn_levels

    if cfg.training_xval:
        name, model = "cross-validation set", xval_noise
        xval = load_xval(cfg, pack, scaler, None, seed, missing_value)
        flux, labels, mask = xval.flux, xval.labels, xval.mask
    else:
        name, model = "training sample", noise
        flux, labels, mask = training_set_as_stored()
    if model is None:
        return CalibrationSet(np.asarray(flux, dtype=np.float32), labels, mask, name)
    from anna.augment import noisy_copy_at

    count = min(len(flux), CALIBRATION_STARS)
    levels = calibration_sn_levels(model.sn_range)
    noisy = np.empty((len(levels) * count, flux.shape[1]), dtype=np.float32)
    for number, sn in enumerate(levels):
        noisy[number * count:(number + 1) * count] = noisy_copy_at(
            flux[:count], model.rel_sn, np.full(count, sn), model.cont_range, seed=(seed, 7927, number))
    return CalibrationSet(noisy, np.tile(labels[:count], (len(levels), 1)), np.tile(mask[:count], (len(levels), 1)),
                          f"{name} at {len(levels)} S/N levels", level=np.repeat(np.arange(len(levels)), count),
                          level_sn=levels)


def parts_of(spec):
    """The parts a model of ``spec`` carries, in the order they are computed: the calibration first (a
    stopped MC-dropout model's σ was twice the real errors without it), then the training-domain statistics."""
    return ([VARIANCE_CALIBRATION] if spec.heteroscedastic else []) + [TRAINING_DOMAIN]


def compute_parts(network, spec, wanted, training_set, calibration_set, mc_samples, *, by, names, report,
                  stop=None):
    """Compute the parts ``wanted`` (names, in order) for ``network``; returns ({part: value}, {part: record}).

    ``training_set()`` gives the training sample (:func:`training_sample`), ``calibration_set()`` the
    :class:`CalibrationSet` the variance head is calibrated on; each is called only when needed.
    The calibration moves the variance head's biases in ``network`` (:func:`calibrate_variance_head`).
    ``by`` names the command in the records, ``names`` the labels in the report lines.

    ``stop`` (:class:`~anna.train.state.StopRequest`): a signal while the parts are computed skips those not
    yet done (:meth:`~anna.train.state.StopRequest.skippable`); a calibration cut short leaves the weights as
    they were.  Each record says ``status`` ("computed" or "missing"), ``by`` (the command) and, when
    computed, the seconds it took and the spectra (and MC passes) used, or, when missing, why.
    """
    import contextlib

    from anna.domain import training_domain_statistics
    from anna.train.state import SkipRest
    from anna.train.variance import calibrate_variance_head

    values, records, before = {}, {}, None
    try:
        with (stop.skippable() if stop is not None else contextlib.nullcontext()):
            for part in wanted:
                started = time.perf_counter()
                if part == VARIANCE_CALIBRATION:
                    chosen = calibration_set()
                    before = network.get_weights()
                    calibration = calibrate_variance_head(network, spec, chosen.flux, chosen.labels, chosen.mask,
                                                          mc_samples, level=chosen.level, level_sn=chosen.level_sn)
                    values[part] = calibration
                    calibration["set"] = chosen.name
                    record = {"spectra": int(len(chosen.flux)), "mc_samples": int(mc_samples), "set": chosen.name}
                else:
                    flux = training_set()[0]
                    values[part] = training_domain_statistics(flux)
                    record = {"spectra": int(len(flux))}
                records[part] = {"status": "computed", "by": by,
                                 "seconds": round(time.perf_counter() - started, 3), **record}
                report(_computed_line(part, values[part], records[part], names))
    except SkipRest as skip:
        if VARIANCE_CALIBRATION not in values and before is not None:
            network.set_weights(before)  # the calibration may have been cut between its two bias shifts
        for part in wanted:
            if part in values:
                records.setdefault(part, {"status": "computed", "by": by})
            else:
                records[part] = {"status": "missing", "by": by, "reason": f"skipped by {skip.signal_name}"}
    return values, records


def _computed_line(part, value, record, names):
    seconds = f"{record['seconds']:.1f} s"
    if part == TRAINING_DOMAIN:
        return f"training-domain statistics of {record['spectra']} training spectra (noised as in training): {seconds}"
    ratio = ", ".join(f"{name} {before:.3g} -> {after:.3g}" for name, before, after in zip(
        names, value["mean_chi2_before"], value["mean_chi2_after"]))
    levels = value.get("noise_levels")
    by_sn = "" if not levels else (
        "; sigma factor from S/N {:.3g} to {:.3g}: ".format(min(levels["sn"][-1]), max(levels["sn"][0])) + ", ".join(
            f"{name} " + "/".join(f"{np.sqrt(row[k]):.2g}" for row in levels["variance_factor"][::-1])
            for k, name in enumerate(names)))
    return (f"variance head calibrated on the {record['set']} ({record['spectra']} spectra, {record['mc_samples']} "
            f"MC passes): mean d^2/sigma_total^2 {ratio}{by_sn}; {seconds}")


def missing_text(records, parameter_file):
    """'' when every part was computed; else the clause the report lines end with, naming what is missing,
    why, and the command that computes it."""
    missing = [(part, record) for part, record in records.items() if record.get("status") != "computed"]
    if not missing:
        return ""
    names = " and ".join(f"its {PART_TITLES[part]} ({record['reason']})" for part, record in missing)
    return f"without {names}: compute {'them' if len(missing) > 1 else 'it'} with {FINISH_COMMAND} {parameter_file}"
