"""Inference benchmarks: from a pack (row 3), from multispec FITS files (row 4), MC dropout with a trained model
(row 5), and the cost per spectrum against spectrum length and pack size (row 7, second part).

The baseline is :meth:`anna.model.FrozenModel.predict` on spectra already in memory: the network's own cost,
with no reading, interpolation, flagging or output writing.  The end-to-end figures time
:func:`anna.infer.run_infer` exactly as ``anna-infer`` calls it (model loading and CSV writing included).
"""

import os
import shutil

import numpy as np

from data import grid_for, write_multispec_set, write_param_file
from harness import Row, at_least, linear_scaling_row, median, timed

PREDICT_BATCH = 4096  # INFER_BATCH_SIZE default


def predict_rates(model_dir, flux, repeats):
    """Spectra per second of FrozenModel.predict over in-memory ``flux`` (n, npix), ``repeats`` times."""
    from anna.model import load_frozen

    model = load_frozen(model_dir)
    model.predict(flux[:PREDICT_BATCH], batch_size=PREDICT_BATCH)  # trace outside the timing
    return [len(flux) / timed(model.predict, flux, batch_size=PREDICT_BATCH)[0] for _ in range(repeats)]


def infer_runs(ctx, name, values, n_spectra, repeats):
    """Run anna-infer ``repeats`` times on the parameter values given, each into a fresh INFER_SAVE_LOC (a rerun
    into the same folder would skip finished inputs); returns spectra per second of each run."""
    from anna.infer import run_infer
    from anna.params import load_config, validate_for_stage

    param = write_param_file(ctx.ws.sub("params", f"{name}.param"), values)
    rates = []
    for number in range(repeats):
        out = ctx.ws.fresh_dir("infer", name, f"run{number}")
        cfg = load_config(param, overrides=[f"INFER_SAVE_LOC={out}"])
        validate_for_stage(cfg, "infer")
        seconds, written = timed(run_infer, cfg, report=ctx.log.anna)
        if not written:
            raise RuntimeError(f"anna-infer wrote nothing for {name}")
        rates.append(n_spectra / seconds)
        shutil.rmtree(out, ignore_errors=True)
    return rates


# ----------------------------------------------------------------------------------------------------------
# Row 3: from a pack (DEBUG mode)


def infer_from_pack(ctx):
    sizes = ctx.sizes
    n = sizes.infer_pack_stars
    pack = ctx.data.tiled_pack(n)
    model_dir = ctx.data.untrained_model()
    ctx.log(f"  anna-infer DEBUG on a {n}-star pack, {sizes.repeats} runs")
    rates = infer_runs(ctx, "pack", {"INFER_MODE": "DEBUG", "DEBUG_DATA": pack, "INFER_MODEL_LOC": model_dir},
                       n, sizes.repeats)
    ctx.log(f"  baseline: predict on {sizes.predict_spectra} in-memory spectra")
    baseline = predict_rates(model_dir, ctx.data.noisy_spectra(sizes.predict_spectra), sizes.repeats)
    row = Row("infer_pack", f"inference from a pack ({n} stars, DEBUG)", median(rates), "spectra/s",
              median(baseline), at_least(25_000, "25000/s"),
              f"median of {len(rates)} anna-infer runs incl. model load and CSV output; baseline = predict "
              "on in-memory float32 spectra")
    return [row], {"rates": rates, "baseline_rates": baseline}


# ----------------------------------------------------------------------------------------------------------
# Row 4: from multispec FITS files


def infer_from_fits(ctx):
    sizes = ctx.sizes
    model_dir = ctx.data.untrained_model()
    folder = ctx.ws.fresh_dir("fits")
    ctx.log(f"  writing {-(-sizes.fits_spectra // 90)} multispec files of 90 apertures")
    n = write_multispec_set(folder, grid_for(1001), sizes.fits_spectra)
    repeats = max(1, sizes.repeats - 1) if not sizes.quick else sizes.repeats
    ctx.log(f"  anna-infer FITS on {n} spectra, {repeats} runs")
    rates = infer_runs(ctx, "fits", {"INFER_MODE": "FITS", "INFER_FILES": os.path.join(folder, "*.fits"),
                                     "INFER_MODEL_LOC": model_dir}, n, repeats)
    ctx.log(f"  baseline: predict on {sizes.predict_spectra} in-memory spectra")
    baseline = predict_rates(model_dir, ctx.data.noisy_spectra(sizes.predict_spectra), sizes.repeats)
    shutil.rmtree(folder, ignore_errors=True)
    row = Row("infer_fits", f"inference from multispec FITS ({n} spectra, {n // 90} files)", median(rates),
              "spectra/s", median(baseline), at_least(5000, "5000/s"),
              "reading + cubic resampling onto the model grid + flags + CSV; baseline = predict on in-memory "
              "spectra already on the grid")
    return [row], {"rates": rates, "baseline_rates": baseline, "spectra": n}


# ----------------------------------------------------------------------------------------------------------
# Row 5: MC dropout


def trained_mc_model(ctx):
    """SAVE_LOC of the tutorial network trained briefly with UNCERTAINTY: MC_DROPOUT (variance head, dropout
    0.2 in its only stage), as anna-train makes it: its frozen model carries the training-domain description."""
    from anna.train import run_training
    from rows_training import tutorial_config

    sizes = ctx.sizes
    interval = min(50, sizes.mc_train_iterations)
    cfg = tutorial_config(ctx, "mc_model", {"UNCERTAINTY": "MC_DROPOUT", "DO_TRAIN2": "NO",
                                            "NUM_TRAIN_ITERS1": sizes.mc_train_iterations,
                                            "SAMPLE_INTERVAL": interval})
    ctx.log(f"  anna-train, tutorial config with UNCERTAINTY MC_DROPOUT, {sizes.mc_train_iterations} iterations")
    run_training(cfg, report=ctx.log.anna)
    return cfg.save_loc


def mc_dropout(ctx, samples=100):
    """anna-infer with MC dropout (``samples`` passes) on a DEBUG pack, against anna-infer's single full pass
    (UNCERTAINTY NONE) with the same model on the same pack, runs alternating; and, to separate the network
    from reading, flags and writing, predict_with_uncertainty on in-memory spectra against predict."""
    from anna.model import load_frozen

    sizes = ctx.sizes
    n = sizes.mc_pack_stars
    model_dir = trained_mc_model(ctx)
    pack = ctx.data.tiled_pack(n)
    common = {"INFER_MODE": "DEBUG", "DEBUG_DATA": pack, "INFER_MODEL_LOC": model_dir}
    mc_values = dict(common, UNCERTAINTY="MC_DROPOUT", MC_SAMPLES=samples)
    full_values = dict(common, UNCERTAINTY="NONE")
    rates = {"mc": [], "full": []}
    for number in range(sizes.repeats):
        ctx.log(f"  run {number + 1}/{sizes.repeats}: anna-infer DEBUG on {n} stars with MC dropout "
                f"({samples} passes), then one full pass")
        rates["mc"] += infer_runs(ctx, "mc", mc_values, n, 1)
        rates["full"] += infer_runs(ctx, "mc_full_pass", full_values, n, 1)
    model = load_frozen(model_dir)
    flux = ctx.data.noisy_spectra(min(n, sizes.predict_spectra))
    model.predict_with_uncertainty(flux[:100], samples=samples)  # trace outside the timing
    ctx.log(f"  in memory: predict_with_uncertainty and predict on {len(flux)} spectra")
    in_memory = [len(flux) / timed(model.predict_with_uncertainty, flux, samples=samples)[0]
                 for _ in range(sizes.repeats)]
    single = predict_rates(model_dir, flux, sizes.repeats)
    rows = [
        Row("mc_dropout", f"MC-dropout inference, anna-infer, N={samples} ({n} stars, DEBUG)", median(rates["mc"]),
            "spectra/s", median(rates["full"]), at_least(300, "300/s"),
            f"anna-infer end to end (model load, reading, DER_SNR, domain statistics, flags, CSV with the "
            f"uncertainty columns) with a model trained {sizes.mc_train_iterations} iterations with UNCERTAINTY "
            f"MC_DROPOUT; baseline = anna-infer with UNCERTAINTY NONE (one full pass), same model and pack, "
            f"runs alternating, {sizes.repeats} each"),
        Row("mc_dropout", f"  MC-dropout in memory, predict_with_uncertainty N={samples}", median(in_memory),
            "spectra/s", median(single) / samples,
            note=f"the same model on {len(flux)} in-memory spectra; baseline = single-pass predict rate / {samples}, "
                 f"i.e. {samples} full forward passes per spectrum (ratio > 1: the passes share work)"),
    ]
    return rows, {"rates": rates, "in_memory_rates": in_memory, "single_pass_rates": single}


# ----------------------------------------------------------------------------------------------------------
# Row 7 (inference part): spectrum length and pack size


def inference_scaling(ctx, big_pack_ok):
    """Microseconds per spectrum of predict at each ``scaling_npix`` (baseline: the 1001-pixel cost scaled
    linearly), and of anna-infer DEBUG on packs of ``scaling_pack_stars`` (baseline: the smallest pack's cost
    per spectrum).  ``big_pack_ok(n_stars)`` says whether the disk has room for a pack; it returns a reason
    text when it does not."""
    sizes = ctx.sizes
    rows, details = [], {"npix": {}, "pack": {}}
    rng = np.random.default_rng(9)
    reference = None
    for npix in sizes.scaling_npix:
        ctx.log(f"  predict, npix {npix}")
        flux = (1.0 + 0.01 * rng.standard_normal((sizes.scaling_predict_spectra, npix))).astype(np.float32)
        rates = predict_rates(ctx.data.untrained_model(npix), flux, sizes.repeats)
        row, reference = linear_scaling_row(f"predict per spectrum, npix {npix}", "us/spectrum", npix,
                                            1e6 / median(rates), reference)
        rows.append(row)
        details["npix"][npix] = rates
    model_dir = ctx.data.untrained_model()
    reference = None
    for n in sizes.scaling_pack_stars:
        name = f"anna-infer DEBUG per spectrum, {n} stars"
        reason = big_pack_ok(n)
        if reason:
            rows.append(Row("scaling", name, unit="us/spectrum", status="skipped", note=reason,
                            higher_is_better=False))
            continue
        pack = ctx.data.tiled_pack(n)
        repeats = sizes.repeats if n <= 100_000 else 1
        ctx.log(f"  anna-infer DEBUG on {n} stars, {repeats} run(s)")
        rates = infer_runs(ctx, f"scaling_{n}", {"INFER_MODE": "DEBUG", "DEBUG_DATA": pack,
                                                 "INFER_MODEL_LOC": model_dir}, n, repeats)
        cost = 1e6 / median(rates)
        if reference is None:
            reference = (n, cost)
        rows.append(Row("scaling", name, cost, "us/spectrum", reference[1] if n != reference[0] else None,
                        note=f"baseline = cost per spectrum at {reference[0]} stars (ratio 1 = linear)"
                        if n != reference[0] else f"{repeats} run(s)", higher_is_better=False))
        details["pack"][n] = rates
    return rows, details
