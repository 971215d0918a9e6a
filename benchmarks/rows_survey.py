"""Survey row: accuracy at a fixed wall-clock budget on APOGEE-size spectra (group ``survey``).

ANNA-TF's recommended survey set-up (``configs/apogee.param``: a StarNet2017-shaped network, the cosine
schedule over the stage time limits, JIT_COMPILE AUTO) trains through the real ``anna-train`` command for a
budget of wall-clock minutes.  The baseline is what a Keras user would write for the same job in the same
time: the same layers in plain Keras, the same augmentation (S/N drawn per spectrum from the same range, the
same relative-S/N profile, the same continuum errors) as tf.data operations, the same mean-spectrum centring,
Adam at a constant 7e-4 (StarNet's rate), ``model.fit`` with ``steps_per_execution`` and whichever
``jit_compile`` setting ran faster in a short timing, stopped when the budget is spent.  Both models then
infer the same test stars, noised once at S/N 60 and at S/N 120 (fixed seeds, +-1 % continuum errors as in
training); the figure is the scatter (standard deviation of inferred - true) per label.  Target: ANNA-TF's
scatter <= 0.8x the plain loop's on every label.

How far each figure can fall is read from two further sets of rows (no target).  The test stars are noised
NOISE_REALIZATIONS times at each S/N (the first is the headline figure's noise); a model's scatter splits
into its noise part (per star, the spread of the inferred label over the noise realizations, RMS over the
stars) and its systematic part (the scatter of each star's mean over the realizations, less what noise
leaves in that mean).  And the Cramer-Rao bound of the first CRB_STARS test stars (RMS over them): the
smallest noise part an unbiased estimator of the five labels can have at that S/N, from the teaching
model's own derivatives (anna.synth, central differences) with the radial velocity and the continuum factor
as free nuisance parameters.  A network matches the bound only if it uses every pixel as well as the
spectrum allows; the noise part of its scatter is the part that more training reduces least.

The data are the APOGEE-like example set (``anna-synth --grid apogee``: 7214 pixels, 20,000 training stars
in the full run).  Making it takes about 5 CPU-minutes, so ``--survey-data DIR`` may point at a folder made
earlier with ``anna-synth DIR --grid apogee --n-train 20000 --n-xval 2000 --n-test 2000``.
"""

import os
import subprocess
import sys
import time

import numpy as np

from harness import REPO_ROOT, Row, Target

APOGEE_CONFIG = os.path.join(REPO_ROOT, "configs", "apogee.param")
PLAIN_RATE = 7e-4
SURVEY_SETUP_MINUTES = 0.8
TEST_SN = (60.0, 120.0)
NOISE_REALIZATIONS = 8
CRB_STARS = 100
LABELS = ("teff", "logg", "feh", "vmic", "vsini")
UNITS = {"teff": "K", "logg": "dex", "feh": "dex", "vmic": "km/s", "vsini": "km/s"}


def survey_data(ctx):
    """The folder of the APOGEE-like example data: ``ctx.survey_data`` when given, else made in the workspace
    once per run (and kept in ``ctx.survey_data`` for the later rows)."""
    given = getattr(ctx, "survey_data", None)
    if given:
        return given
    from anna.synth import make_example_data

    folder = ctx.ws.fresh_dir("apogee")
    counts = (1500, 300, 300) if ctx.sizes.quick else (20000, 2000, 2000)
    ctx.log(f"survey: synthesising {counts[0]} + {counts[1]} + {counts[2]} APOGEE-like spectra (7214 px)")
    make_example_data(folder, grid="apogee", n_train=counts[0], n_xval=counts[1], n_test=counts[2],
                      n_apertures=2)
    ctx.survey_data = folder
    return folder


def budget_minutes(ctx):
    return 1.5 if ctx.sizes.quick else 15.0


def stage_minutes(param_file):
    """(MAX_MINUTES1, MAX_MINUTES2) of a parameter file; stage 2's 0 when DO_TRAIN2 is NO."""
    from anna.params import load_config

    cfg = load_config(param_file, stage="train")
    return float(cfg.max_minutes1), float(cfg.max_minutes2) if cfg.do_train2 else 0.0


def run_anna_train(ctx, data, minutes):
    """anna-train on configs/apogee.param with the paths pointed at ``data`` and the stage limits set so that
    the whole command takes about ``minutes`` of wall clock: SURVEY_SETUP_MINUTES are kept for what runs outside
    the stages (reading the pack for its mean spectrum, the JIT_COMPILE AUTO timing, the training-domain
    description and freezing; measured ~0.8 min with the 20,000-star pack), the rest split between the stages
    in the ratio of the file's own MAX_MINUTES1 : MAX_MINUTES2.  Returns (frozen model path, wall seconds of the
    command, its output lines)."""
    run = ctx.ws.fresh_dir("survey-anna")
    stages = max(minutes - SURVEY_SETUP_MINUTES, 0.2)
    first, second = stage_minutes(APOGEE_CONFIG)
    overrides = {"TRAINING_DATA": os.path.join(data, "train.pack"), "XVAL_DATA": os.path.join(data, "xval.pack"),
                 "SAVE_LOC": os.path.join(run, "model"), "LOG_LOC": os.path.join(run, "logs"),
                 "MAX_MINUTES1": f"{stages * first / (first + second):.4g}",
                 "MAX_MINUTES2": f"{stages * second / (first + second):.4g}",
                 "RESUME": "NO", "TBOARD_OUTPUT": "YES"}
    if ctx.sizes.quick:
        overrides.update({"SAMPLE_INTERVAL": "20", "XVAL_SIZE": "300"})
    command = [sys.executable, "-c",
               "import sys; from anna.cli import train_main; sys.exit(train_main(sys.argv[1:]))", APOGEE_CONFIG]
    command += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"anna-train failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    for line in done.stdout.splitlines():
        if line.startswith(("JIT_COMPILE", "stage")) and ("time limit" in line or "learning rate" in line
                                                            or "JIT" in line):
            ctx.log(f"    | {line}")
    return os.path.join(run, "model"), wall, done.stdout.splitlines()


def plain_keras_network(spec, centre):
    """The network of ``spec`` (StarNet2017 here) in Keras' own layers, as a user writes it, with the training
    mean spectrum subtracted: the training rows' :func:`rows_training.keras_layers_network`, no dropout."""
    from rows_training import keras_layers_network

    return keras_layers_network(spec, 0.0, centre)


def augmented_dataset(flux, labels, rel_sn, sn_range, cont_range, batch, seed):
    """tf.data stream of noisy batches: the training noise model written with TensorFlow ops."""
    import tensorflow as tf

    rel = tf.constant(rel_sn.astype(np.float32))
    generator = tf.random.Generator.from_seed(seed)

    def noise(x, y):
        n = tf.shape(x)[0]
        sn = generator.uniform([n, 1], sn_range[0], sn_range[1])
        delta = generator.uniform([n, 1], cont_range[0], cont_range[1])
        noisy = (x + generator.normal(tf.shape(x)) / (sn * rel)) * (1.0 + delta)
        return noisy, y

    data = tf.data.Dataset.from_tensor_slices((flux, labels)).shuffle(len(flux), seed=seed).repeat()
    return data.batch(batch, drop_remainder=True).map(noise, num_parallel_calls=1).prefetch(4)


class TimeLimit:
    """Keras callback: stop training once ``seconds`` of wall clock have passed since ``started``."""

    def __new__(cls, started, seconds):
        import keras

        class _TimeLimit(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if time.perf_counter() - started >= seconds:
                    self.model.stop_training = True

        return _TimeLimit()


def run_plain_loop(ctx, data, minutes, rel_sn, scaler_min, scaler_span, spec):
    """The plain Keras baseline for ``minutes`` of wall clock (data loading, compiling and the jit timing
    included); returns (model, wall seconds, steps, jit_compile used)."""
    import keras

    from anna.packs import open_pack

    started = time.perf_counter()
    pack = open_pack(os.path.join(data, "train.pack"))
    flux = np.asarray(pack.flux, dtype=np.float32)
    labels = ((np.asarray(pack.labels) - scaler_min) / scaler_span).astype(np.float32)
    centre = flux.mean(axis=0)
    timings = {}
    for jit in (False, True):  # the faster of the two settings, as a user trying both would find
        keras.utils.set_random_seed(1)
        model = plain_keras_network(spec, centre)
        model.compile(optimizer=keras.optimizers.Adam(PLAIN_RATE), loss="mse", steps_per_execution=10,
                      jit_compile=jit)
        stream = augmented_dataset(flux, labels, rel_sn, (30.0, 200.0), (-0.01, 0.01), 100, seed=1)
        model.fit(stream, steps_per_epoch=10, epochs=1, verbose=0)   # compile
        tic = time.perf_counter()
        model.fit(stream, steps_per_epoch=20, epochs=1, verbose=0)
        timings[jit] = 2000 / (time.perf_counter() - tic)
    jit = max(timings, key=timings.get)
    keras.utils.set_random_seed(1)
    model = plain_keras_network(spec, centre)
    model.compile(optimizer=keras.optimizers.Adam(PLAIN_RATE), loss="mse", steps_per_execution=10, jit_compile=jit)
    stream = augmented_dataset(flux, labels, rel_sn, (30.0, 200.0), (-0.01, 0.01), 100, seed=1)
    history = model.fit(stream, steps_per_epoch=100, epochs=10**6, verbose=0,
                        callbacks=[TimeLimit(started, minutes * 60.0)])
    steps = 100 * len(history.history["loss"])
    ctx.log(f"survey: plain loop ran ~{steps} steps (jit_compile={jit}; {timings[False]:.0f} vs "
            f"{timings[True]:.0f} ex/s without/with XLA)")
    return model, time.perf_counter() - started, steps, jit, timings


def noise_realizations(flux, rel_sn, sn, count):
    """The test flux noised ``count`` times at ``sn`` (fixed seeds, +-1 % continuum errors as in training;
    the first realization is the one earlier runs of this row used)."""
    from anna.augment import noisy_copy

    for index in range(count):
        seed = (2024, int(sn)) if index == 0 else (2024, int(sn), index)
        yield noisy_copy(flux, rel_sn, (sn, sn), (-0.01, 0.01), seed=seed)[0].astype(np.float32)


def scatter_parts(predictions, truth):
    """(total, noise part, systematic part) per label of ``predictions`` (realizations, stars, labels): the
    scatter of the first realization; the RMS over stars of each star's spread over the realizations; the
    scatter of each star's mean over the realizations, with the noise that mean still holds taken out.  With
    one realization only the total is known: the parts are None."""
    count = predictions.shape[0]
    total = np.std(predictions[0] - truth, axis=0)
    if count < 2:
        return total, None, None
    noise = np.sqrt(np.mean(np.var(predictions, axis=0, ddof=1), axis=0))
    mean_scatter = np.std(predictions.mean(axis=0) - truth, axis=0)
    systematic = np.sqrt(np.maximum(mean_scatter**2 - noise**2 / count, 0.0))
    return total, noise, systematic


def cramer_rao_bounds(data, rel_sn, sn_values, stars):
    """{S/N: (labels,) RMS over the first ``stars`` test stars of the Cramer-Rao bound} for the five teaching
    model labels, with the radial velocity (the pack's dummy column, as anna.synth writes it) and the
    continuum factor free; None when the test pack is not anna.synth's APOGEE-like data (its spectra are not
    reproduced to 1e-4: noise at S/N 200 is 5e-3)."""
    from anna.packs import open_pack
    from anna.synth import survey_grid, synthesize

    pack = open_pack(os.path.join(data, "test.pack"), max_stars=stars)
    labels, rv = np.asarray(pack.labels, dtype=np.float64), np.asarray(pack.dummy, dtype=np.float64)
    grid, resolution = survey_grid("apogee")
    if labels.shape[1] != 5 or grid.size != pack.wavelengths.size or not np.allclose(grid, pack.wavelengths):
        return None

    def spectra(lab, velocity):
        return synthesize(grid, lab, resolution=resolution, rv_kms=velocity, line_list="survey")

    flux = spectra(labels, rv)
    if np.abs(flux - np.asarray(pack.flux)).max() > 1e-4:   # 1e-7-1e-10 here: a call's own rounding
        return None
    steps = np.array([10.0, 0.01, 0.005, 0.02, 0.2])   # K, dex, dex, km/s, km/s
    jacobian = np.empty(flux.shape + (7,))
    for k, step in enumerate(steps):
        up, down = labels.copy(), labels.copy()
        up[:, k] += step
        down[:, k] = np.maximum(down[:, k] - step, 0.0) if k == 4 else down[:, k] - step
        jacobian[:, :, k] = (spectra(up, rv) - spectra(down, rv)) / (up[:, k] - down[:, k])[:, None]
    jacobian[:, :, 5] = (spectra(labels, rv + 0.05) - spectra(labels, rv - 0.05)) / 0.1
    jacobian[:, :, 6] = flux   # the continuum factor (1 + delta) multiplies the spectrum
    bounds = {}
    for sn in sn_values:
        weight = (sn * np.asarray(rel_sn, dtype=np.float64)) ** 2
        variances = np.array([np.diag(np.linalg.inv((j * weight[:, None]).T @ j))[:5] for j in jacobian])
        bounds[sn] = np.sqrt(variances.mean(axis=0))
    return bounds


def survey_budget(ctx):
    from anna.model import load_frozen
    from anna.packs import open_pack
    from anna.templates import relative_sn_on_grid

    data = survey_data(ctx)
    minutes = budget_minutes(ctx)
    grid = open_pack(os.path.join(data, "train.pack")).wavelengths
    rel_sn = relative_sn_on_grid(os.path.join(REPO_ROOT, "templates", "sn.apogee.template"), grid)
    ctx.log(f"survey: anna-train configs/apogee.param for {minutes:g} min")
    model_path, anna_wall, lines = run_anna_train(ctx, data, minutes)
    frozen = load_frozen(model_path)
    scaler = frozen.scaler
    ctx.log(f"survey: plain Keras loop for {minutes:g} min")
    plain, plain_wall, plain_steps, jit, timings = run_plain_loop(ctx, data, minutes, rel_sn, scaler.minimum,
                                                                  scaler.span, frozen.spec)
    test = open_pack(os.path.join(data, "test.pack"))
    clean, truth = np.asarray(test.flux), np.asarray(test.labels)
    count = 1 if ctx.sizes.quick else NOISE_REALIZATIONS
    ctx.log(f"survey: both models on the {len(truth)} test stars, {count} noise realizations per S/N")
    parts = {}
    for sn in TEST_SN:
        ours, theirs = [], []
        for flux in noise_realizations(clean, rel_sn, sn, count):
            ours.append(frozen.predict(flux, batch_size=512))
            theirs.append(scaler.physical(plain.predict(flux, batch_size=512, verbose=0)))
        parts[sn] = (scatter_parts(np.stack(ours), truth), scatter_parts(np.stack(theirs), truth))
    bounds = None
    if not ctx.sizes.quick:
        ctx.log(f"survey: Cramer-Rao bounds of {CRB_STARS} test stars")
        bounds = cramer_rao_bounds(data, rel_sn, TEST_SN, CRB_STARS)
    rows, details = [], {"anna_wall_s": anna_wall, "plain_wall_s": plain_wall, "plain_steps": plain_steps,
                         "plain_jit_compile": jit, "plain_timing_ex_s": {str(k): v for k, v in timings.items()},
                         "anna_stages": frozen.metadata.get("stages"),
                         "anna_compiled_form": frozen.metadata.get("compiled_form"), "scatter": {},
                         "noise_realizations": count}
    for sn in TEST_SN:
        (ours_total, ours_noise, ours_sys), (plain_total, plain_noise, plain_sys) = parts[sn]
        for k, name in enumerate(frozen.output_names):
            figure, baseline = float(ours_total[k]), float(plain_total[k])
            details["scatter"][f"{name}@{sn:g}"] = {"anna": figure, "plain": baseline,
                                                  "cramer_rao": None if bounds is None else float(bounds[sn][k])}
            if count > 1:
                details["scatter"][f"{name}@{sn:g}"].update(
                    anna_noise=float(ours_noise[k]), plain_noise=float(plain_noise[k]),
                    anna_systematic=float(ours_sys[k]), plain_systematic=float(plain_sys[k]))
            note = ""
            if not rows:
                form = frozen.metadata["compiled_form"]["form"]
                note = (f"{minutes:g}-minute budget, {len(truth)} test stars per S/N; anna-train command "
                        f"{anna_wall / 60:.1f} min wall (configs/apogee.param, {form} form, "
                        f"{sum(s['iterations'] for s in frozen.metadata['stages'])} iterations); plain Keras fit "
                        f"{plain_wall / 60:.1f} min, {plain_steps} steps, Adam 7e-4 constant, jit_compile={jit}")
            rows.append(Row("survey", f"scatter S/N {sn:g} {name}: anna-train vs plain Keras, same budget",
                            figure, UNITS.get(name, ""), baseline, Target("ratio", "<=", 0.8, "<= 0.8x"),
                            note=note, higher_is_better=False))
    if count > 1:
        for sn in TEST_SN:
            (_, ours_noise, ours_sys), (_, plain_noise, plain_sys) = parts[sn]
            for k, name in enumerate(frozen.output_names):
                unit = UNITS.get(name, "")
                note = (f"{count} noise realizations of each test star; noise part = RMS over stars of the "
                        f"spread over realizations; systematic part = scatter of the per-star mean, its "
                        f"remaining noise taken out" if k == 0 and sn == TEST_SN[0] else "")
                rows.append(Row("survey", f"  noise part, S/N {sn:g} {name}: anna-train vs plain Keras",
                                float(ours_noise[k]), unit, float(plain_noise[k]), note=note,
                                higher_is_better=False))
                rows.append(Row("survey", f"  systematic part, S/N {sn:g} {name}: anna-train vs plain Keras",
                                float(ours_sys[k]), unit, float(plain_sys[k]), higher_is_better=False))
    if bounds is not None:
        for sn in TEST_SN:
            for k, name in enumerate(frozen.output_names):
                note = (f"Cramer-Rao bound, RMS over the first {CRB_STARS} test stars (labels, radial velocity "
                        f"and continuum factor free); baseline = the plain loop's scatter at that S/N: the "
                        f"ratio is about the lowest an unbiased estimator could reach" if k == 0 and sn == TEST_SN[0]
                        else "")
                rows.append(Row("survey", f"  Cramer-Rao bound, S/N {sn:g} {name}", float(bounds[sn][k]),
                                UNITS.get(name, ""), float(parts[sn][1][0][k]), note=note,
                                higher_is_better=False))
    return rows, details
