"""Training benchmarks: throughput (row 1), tutorial wall time (row 2), peak memory against the pack size
(row 6) and the cost of a training step against the spectrum length (row 7, first part).

Training speed is compared with two baselines, the same network (:func:`anna.model.build_network`, Adam, the
same loss, batch size, dropout and learning rate) trained with no input pipeline, logging or bookkeeping:

* :class:`PlainLoop`: one ``tf.function`` call per step over a few batches already held as tensors;
* :class:`KerasFit`: Keras' own ``model.fit`` with ``steps_per_execution`` = NUM_FETCH / BATCH_SIZE (the
  steps anna-train runs per compiled call) on the training pack's flux in memory, as a Keras user would write
  it.

Row 1 compares anna-train with the faster of the two.  anna-train's own figures come from the history it
returns, one record per SAMPLE_INTERVAL.
"""

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
import time

import numpy as np

from harness import (REPO_ROOT, TUTORIAL_CONFIG, TUTORIAL_ITERATIONS, Row, at_most, linear_scaling_row, median,
                     ratio_at_least)

BATCH_SIZE = 100
PLAIN_BATCHES = 20


def tutorial_config(ctx, name, overrides, npix=1001):
    """The tutorial parameter file with its inputs pointed at the generated example data for ``npix`` pixels
    and its outputs into a fresh folder of the workspace; ``overrides`` (dict) changes further keys, as
    ``--set`` would."""
    from anna.params import load_config, validate_for_stage

    example = ctx.data.example(npix)
    run_dir = ctx.ws.fresh_dir("runs", name)
    values = {"NUM_PX": npix, "TRAINING_DATA": example["train"], "XVAL_DATA": example["xval"],
              "SN_TEMPLATE": example["sn_template"], "SAVE_LOC": os.path.join(run_dir, "model"),
              "LOG_LOC": os.path.join(run_dir, "logs"), "RESUME": "NO"}
    values.update(overrides)
    cfg = load_config(TUTORIAL_CONFIG, overrides=[f"{key}={value}" for key, value in values.items()])
    validate_for_stage(cfg, "train")
    return cfg


def premade_batches(ctx, npix=1001, count=PLAIN_BATCHES, batch_size=BATCH_SIZE, from_pack=None):
    """``count`` (flux, normalised labels, mask) batches as tensors: noisy spectra of the training pack of
    ``npix`` pixels (``from_pack``; default for 1001 pixels), else flux near 1 with 1 % noise."""
    import tensorflow as tf

    n = count * batch_size
    rng = np.random.default_rng(7)
    if from_pack or (from_pack is None and npix == 1001):
        flux = ctx.data.noisy_spectra(n, sn=200.0, npix=npix)
    else:
        flux = (1.0 + 0.01 * rng.standard_normal((n, npix))).astype(np.float32)
    labels = rng.uniform(0.0, 1.0, (n, 5)).astype(np.float32)
    mask = np.ones_like(labels)
    return [(tf.constant(flux[i:i + batch_size]), tf.constant(labels[i:i + batch_size]),
             tf.constant(mask[i:i + batch_size])) for i in range(0, n, batch_size)]


def keras_layers_network(spec, dropout_rate, centre=None):
    """The network of ``spec`` written as a Keras user writes it, with Keras' own layers and their default
    initialisers: ``Conv1D`` on (batch, npix, 1) for every convolution ("same" padding, ReLU, the layer's
    stride), ``MaxPooling1D`` after a convolution that pools, ``Dropout`` where the spec has it, ``Dense``
    layers.  ``centre`` (npix,) is subtracted from the input (1.0 when None, the continuum), as anna-train does.
    Same function and weight shapes as :func:`anna.model.build_network`; none of ANNA-TF's own layers
    (the banded first convolution, the reshape-max pooling), so a figure against it includes them."""
    import keras

    centre = np.ones(spec.npix, np.float32) if centre is None else np.asarray(centre, np.float32)
    flux = keras.Input(shape=(spec.npix,), dtype="float32")
    x = keras.layers.Reshape((spec.npix, 1))(flux - keras.ops.convert_to_tensor(centre.reshape(spec.npix)))
    for conv in spec.conv_layers:
        x = keras.layers.Conv1D(conv.kernels, conv.width, strides=conv.stride, padding="same", activation="relu")(x)
        if conv.pool > 1:
            x = keras.layers.MaxPooling1D(conv.pool)(x)
        if conv.dropout:
            x = keras.layers.Dropout(dropout_rate)(x)
    x = keras.layers.Flatten()(x)
    for width in spec.fc_dims:
        x = keras.layers.Dropout(dropout_rate)(keras.layers.Dense(width, activation="relu")(x))
    return keras.Model(flux, keras.layers.Dense(spec.nout)(x))


def make_network(spec, dropout_rate, centre=None, dtype_policy=None, keras_layers=False, compiled_form="xla"):
    """:func:`anna.model.build_network`'s training network (``keras_layers``: :func:`keras_layers_network`),
    optionally under a Keras dtype policy (set for this network only: layers take the global policy when they
    are made)."""
    import keras

    from anna.model import build_network

    def build():
        if keras_layers:
            return keras_layers_network(spec, dropout_rate, centre)
        return build_network(spec, dropout_rate=dropout_rate, centre=centre, compiled_form=compiled_form,
                             for_training=True)

    if dtype_policy is None:
        return build()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy(previous)


class PlainLoop:
    """Minimal training loop: one tf.function step (forward, masked squared error, gradients, Adam) cycling
    over pre-made tensors.  ``chunk_rates`` times chunks of steps, synchronising once per chunk as anna-train
    does once per SAMPLE_INTERVAL.  ``spec`` (:class:`anna.model.NetworkSpec`) defaults to the tutorial
    network for ``npix`` pixels; ``keras_layers`` builds it from Keras' own layers (:func:`keras_layers_network`)
    instead of ANNA-TF's."""

    name = "plain tf.function loop"

    def __init__(self, batches, npix=1001, dropout_rate=0.2, learn_rate=5e-5, jit=False, dtype_policy=None,
                 spec=None, centre=None, keras_layers=False):
        import keras
        import tensorflow as tf

        from anna.losses import masked_squared_error
        from anna.model import NetworkSpec

        spec = spec or NetworkSpec(npix=npix, nout=5)
        network = make_network(spec, dropout_rate, centre, dtype_policy, keras_layers,
                               compiled_form="xla" if jit else "graph")
        optimizer = keras.optimizers.Adam(learning_rate=learn_rate)
        optimizer.build(network.trainable_variables)
        nout = spec.nout

        @tf.function(jit_compile=bool(jit))
        def step(flux, labels, mask):
            with tf.GradientTape() as tape:
                out = tf.cast(network(flux, training=True)[:, :nout], tf.float32)
                cost = masked_squared_error(labels, out, mask)
            grads = tape.gradient(cost, network.trainable_variables)
            optimizer.apply_gradients(zip(grads, network.trainable_variables))
            return cost

        self.jit = bool(jit)
        self.step = step
        self.batches = batches
        self.batch_size = int(batches[0][0].shape[0])
        self.done = 0
        self.run(2)  # trace (and compile) outside any timing

    def run(self, steps):
        cost = None
        for _ in range(steps):
            cost = self.step(*self.batches[self.done % len(self.batches)])
            self.done += 1
        if cost is not None:
            cost.numpy()

    def chunk_rates(self, steps, chunks):
        """Examples per second of ``chunks`` timed chunks of ``steps`` steps each."""
        rates = []
        for _ in range(chunks):
            started = time.perf_counter()
            self.run(steps)
            rates.append(steps * self.batch_size / (time.perf_counter() - started))
        return rates


class KerasFit:
    """Keras' ``model.fit`` as a Keras user would write it for this network: compiled with Adam and the "mse"
    loss, ``steps_per_execution`` steps per compiled call, ``jit_compile`` True or False, on the training
    pack's flux and normalised labels held in memory (a ``tf.data`` pipeline from the arrays, permuted once,
    repeated, batched and prefetched; no augmentation).

    ``chunk_rates(steps, chunks)`` runs one ``fit`` of ``chunks`` epochs of ``steps`` steps (rounded up to whole
    executions) and times each epoch between its begin and end callbacks (the end callback gets the epoch's
    logs as numbers, so its steps are done).  The first ``fit`` (tracing, compiling, one execution) happens in
    the constructor."""

    name = "Keras fit"

    def __init__(self, spec, flux, labels, batch_size, learn_rate, dropout_rate, steps_per_execution, jit,
                 centre=None, seed=8, keras_layers=True):
        import keras
        import tensorflow as tf

        self.network = make_network(spec, dropout_rate, centre, keras_layers=keras_layers)
        self.network.compile(optimizer=keras.optimizers.Adam(learning_rate=learn_rate), loss="mse",
                             steps_per_execution=int(steps_per_execution), jit_compile=bool(jit))
        order = np.random.default_rng(seed).permutation(len(flux))
        data = tf.data.Dataset.from_tensor_slices((np.asarray(flux, dtype=np.float32)[order],
                                                   np.asarray(labels, dtype=np.float32)[order]))
        self.dataset = data.repeat().batch(int(batch_size), drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        self.jit = bool(jit)
        self.batch_size = int(batch_size)
        self.steps_per_execution = int(steps_per_execution)
        self.network.fit(self.dataset, epochs=1, steps_per_epoch=self.steps_per_execution, verbose=0, shuffle=False)
        self.jit = bool(self.network.jit_compile)  # what Keras kept: it may refuse XLA for a model

    def chunk_rates(self, steps, chunks):
        import keras

        steps = self.steps_per_execution * max(1, math.ceil(steps / self.steps_per_execution))
        marks = []

        class EpochTimer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                marks.append([time.perf_counter(), None])

            def on_epoch_end(self, epoch, logs=None):
                marks[-1][1] = time.perf_counter()

        self.network.fit(self.dataset, epochs=chunks, steps_per_epoch=steps, verbose=0, shuffle=False,
                         callbacks=[EpochTimer()])
        return [steps * self.batch_size / (end - begin) for begin, end in marks]


@contextlib.contextmanager
def without_op_determinism():
    """TensorFlow's op determinism off for the duration, restored after.  anna-train turns it on, process-wide,
    for a parameter file with SEED (the tutorial's), and Keras' compile then silently drops jit_compile=True;
    the baselines stand for a user's own loop, which would not run under it.  (TensorFlow exports no switch-off:
    the internal one is used, and nothing is done where it is missing.)"""
    try:
        from tensorflow.python.framework import config as tf_config

        was_on = tf_config.is_op_determinism_enabled()
        switch_off, switch_on = tf_config.disable_op_determinism, tf_config.enable_op_determinism
    except (ImportError, AttributeError):
        yield
        return
    if was_on:
        switch_off()
    try:
        yield
    finally:
        if was_on:
            switch_on()


def jit_settings(value):
    """The XLA settings a baseline tries for a JIT_COMPILE value: the parameter file's when it says YES or NO
    (True/False), both when it says AUTO."""
    if isinstance(value, bool):
        return (value,)
    text = str(value).upper()
    if text in ("YES", "TRUE"):
        return (True,)
    if text in ("NO", "FALSE"):
        return (False,)
    return (True, False)


def faster_of(ctx, label, build, settings, steps):
    """Build ``build(jit)`` for each XLA setting, time one chunk of ``steps`` steps (two in full runs) after
    the compiling call, keep the faster.  Returns (baseline, {setting: rates})."""
    trials = {}
    best = None
    for jit in settings:
        ctx.log(f"  {label}, jit_compile {jit}: compiling and timing")
        with without_op_determinism():
            candidate = build(jit)
            rates = candidate.chunk_rates(steps, 1 if ctx.sizes.quick else 2)
        trials[jit] = rates
        if best is None or median(rates) > median(trials[best[0]]):
            best = (jit, candidate)
    return best[1], trials


# ----------------------------------------------------------------------------------------------------------
# Row 1: training throughput


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """One network of the training-throughput rows: parameter-file keys over the tutorial file (as ``--set``
    gives them) and the spectrum length; ``augment`` lists the PREPROCESS_TRAIN settings run (True = YES)."""

    key: str
    title: str          # the network; the row names add the pixel count actually run
    npix: int           # SURVEY_NPIX: the survey length of the run (Sizes.survey_npix; 7214 in full runs)
    overrides: tuple = ()
    augment: tuple = (True,)


# StarNet (Fabbro et al. 2018, the 2017 network): convolutions of 4 and 16 kernels 8 pixels wide, max-pooling
# over 4, dense layers of 256 and 128, batch 100, input centred on the training mean spectrum.
STARNET_2017 = (("CONV1_SHAPE", "1, 8, 1, 4"), ("CONV2_SHAPE", "1, 8, 1, 16"), ("POOL_SIZE", 4),
                ("FC1_OUTDIM", 256), ("FC2_OUTDIM", 128), ("BATCH_SIZE1", 100), ("INPUT_CENTERING", "MEAN"))
SURVEY_NPIX = 7214

TRAIN_CASES = (
    TrainCase("tutorial_1001", "tutorial network", 1001, augment=(True, False)),
    TrainCase("starnet2017_survey", "StarNet2017-shaped network", SURVEY_NPIX, STARNET_2017),
    TrainCase("tutorial_survey", "tutorial network", SURVEY_NPIX),
)


def stage_rates(history, stamps, batch_size, stage=1):
    """Per SAMPLE_INTERVAL of ``stage``: wall-clock ex/s (whole intervals: steps, evaluation, logging,
    checkpoint), pure-step ex/s (the clock stopped around that overhead) and input-wait fraction.

    The history's ``examples_per_s`` is the wall-clock rate and ``step_examples_per_s`` the pure-step rate.
    Histories without ``step_examples_per_s`` (anna-train before it timed whole intervals) hold the
    pure-step rate in ``examples_per_s``; the wall-clock rate then comes from the times at which anna-train
    reported its interval lines (``stamps``: (time, text) pairs), one line per interval end.  Returns
    (wall, step, wait, wall_from_lines), the last being that line-based rate in either case (a check)."""
    records = [h for h in history if h["stage"] == stage]
    start = next((when for when, text in stamps
                  if (m := STAGE_START.match(text)) and int(m.group(1)) == stage), None)
    ends = {}
    for when, text in stamps:
        if (m := STAGE_INTERVAL.match(text)) and int(m.group(1)) == stage:
            ends.setdefault(int(m.group(2)), when)
    from_lines, previous = [], (0, start)
    for record in records:
        when = ends.get(record["iteration"])
        if when is None or previous[1] is None:
            from_lines.append(None)
        else:
            from_lines.append((record["iteration"] - previous[0]) * batch_size / max(when - previous[1], 1e-9))
        previous = (record["iteration"], when)
    if records and "step_examples_per_s" in records[0]:
        wall = [h["examples_per_s"] for h in records]
        step = [h["step_examples_per_s"] for h in records]
    else:
        wall = from_lines
        step = [h["examples_per_s"] for h in records]
    return wall, step, [h["input_wait_fraction"] for h in records], from_lines


def training_throughput(ctx):
    """Every :data:`TRAIN_CASES` network (those of ``--train-cases``): anna-train's examples/s against the faster
    baseline."""
    rows, details = [], {}
    cases = [case for case in TRAIN_CASES if getattr(ctx, "train_cases", None) is None
             or case.key in ctx.train_cases]
    for number, case in enumerate(cases):
        ctx.log(f"  -- {case.title}")
        case_rows, details[case.key] = throughput_case(ctx, case, explain=number == 0)
        rows += case_rows
    return rows, details


def throughput_case(ctx, case, explain=True):
    """anna-train's wall-clock and pure-step examples/s for one network, against the faster of the plain loop
    and Keras fit of that network, both written with Keras' own layers as a user would write them (each with
    the faster jit_compile setting).  The plain loop on ANNA-TF's own layers is timed beside them, not as a
    baseline: the ratio to it is the loop's own cost, the layers being the same.

    Runs alternate with baseline measurements (baselines, ON, baselines[, OFF, baselines], ...), and each run
    is compared with the baseline chunks just before and after it (the faster baseline's median over them),
    so a change of machine load between runs cancels in the ratio.  The first warm-up intervals of a run are
    dropped: they include graph tracing and XLA compilation and the producer filling its queue while it
    competes with the training step for the cores.
    """
    from anna.model import LabelScaler, NetworkSpec
    from anna.train import run_training

    sizes = ctx.sizes
    npix = sizes.survey_npix if case.npix == SURVEY_NPIX else case.npix
    iterations, interval, warmup = sizes.train_schedule(npix)
    base = dict(case.overrides)
    cfg = tutorial_config(ctx, f"{case.key}_probe", base, npix=npix)
    batch = int(cfg.batch_size1)
    chunk_steps = max(1, int(cfg.num_fetch) // batch)
    _, labels, flux = ctx.data.example_flux("train", npix)
    spec = NetworkSpec.from_config(cfg, npix, labels.shape[1])
    centre = flux.mean(axis=0) if cfg.input_centering == "MEAN" else None
    dropout, learn_rate = 1.0 - float(cfg.keep_prob1), float(cfg.learn_rate1)
    normalised = LabelScaler(cfg.min_params, cfg.max_params).normalise(labels)

    batches = premade_batches(ctx, npix=npix, batch_size=batch, from_pack=True)
    plain, plain_trials = faster_of(
        ctx, "plain loop", lambda jit: PlainLoop(batches, spec=spec, centre=centre, dropout_rate=dropout,
                                                 learn_rate=learn_rate, jit=jit, keras_layers=True),
        (True, False), interval)
    # not a baseline: the same loop on ANNA-TF's own layers, to show the layers' share apart from the loop's
    own_layers, own_trials = faster_of(
        ctx, "plain loop on ANNA-TF's layers", lambda jit: PlainLoop(batches, spec=spec, centre=centre,
                                                                     dropout_rate=dropout, learn_rate=learn_rate,
                                                                     jit=jit),
        (True, False), interval)
    keras_fit, keras_trials = faster_of(
        ctx, f"Keras fit, steps_per_execution {chunk_steps}",
        lambda jit: KerasFit(spec, flux, normalised, batch, learn_rate, dropout, chunk_steps, jit, centre=centre),
        (True, False), interval)
    del batches, flux

    def baseline_chunks():
        with without_op_determinism():
            return {"plain": plain.chunk_rates(interval, sizes.baseline_chunks),
                    "keras": keras_fit.chunk_rates(interval, sizes.baseline_chunks),
                    "own_layers": own_layers.chunk_rates(interval, sizes.baseline_chunks)}

    samples = {"plain": [], "keras": [], "own_layers": []}
    runs = {augment: {"wall": [], "step": [], "wait": [], "wall_from_lines": [], "ratio_wall": [],
                      "ratio_step": [], "ratio_own_layers": [], "warmup_wall": [], "jit_lines": [],
                      "end_seconds": []}
            for augment in case.augment}
    before = baseline_chunks()
    for name in samples:
        samples[name] += before[name]
    for number in range(sizes.train_rounds):
        for augment in case.augment:
            word = "ON" if augment else "OFF"
            ctx.log(f"  round {number + 1}/{sizes.train_rounds}: anna-train, augmentation {word}, "
                    f"{iterations} iterations, then the baselines")
            overrides = dict(base, NUM_TRAIN_ITERS1=iterations, DO_TRAIN2="NO", SAMPLE_INTERVAL=interval,
                             PREPROCESS_TRAIN="YES" if augment else "NO")
            run_cfg = tutorial_config(ctx, f"{case.key}_{word.lower()}", overrides, npix=npix)
            stamps = []

            def report(text, stamps=stamps):
                stamps.append((time.perf_counter(), text))
                ctx.log.anna(text)

            result = run_training(run_cfg, report=report)
            finished = time.perf_counter()
            last_line = max((when for when, text in stamps if STAGE_INTERVAL.match(text)), default=None)
            wall, step, wait, from_lines = stage_rates(result["history"], stamps, batch)
            after = baseline_chunks()
            pair = max(median(before["plain"] + after["plain"]), median(before["keras"] + after["keras"]))
            run = runs[augment]
            run["wall"] += wall[warmup:]
            run["step"] += step[warmup:]
            run["wait"] += wait[warmup:]
            run["wall_from_lines"] += from_lines[warmup:]
            run["warmup_wall"] += wall[:warmup]
            run["jit_lines"] += [text for _, text in stamps if "JIT_COMPILE" in text]
            if last_line is not None:
                run["end_seconds"].append(finished - last_line)
            run["ratio_wall"].append(median(wall[warmup:]) / pair)
            run["ratio_step"].append(median(step[warmup:]) / pair)
            run["ratio_own_layers"].append(median(wall[warmup:])
                                           / median(before["own_layers"] + after["own_layers"]))
            for name in samples:
                samples[name] += after[name]
            before = after
    plain_rate, keras_rate = median(samples["plain"]), median(samples["keras"])
    baseline = max(plain_rate, keras_rate)
    faster = "Keras fit" if keras_rate > plain_rate else "plain loop"
    jit_words = {True: "YES", False: "NO"}

    def trial_text(trials):
        return ", ".join(f"jit_compile {jit}: {median(rates):,.0f}" for jit, rates in trials.items())

    title = f"{case.title}, {npix} px"
    quick_note = (f"; QUICK: {npix} px instead of {SURVEY_NPIX} (anna-train's end of run grows steeply with the "
                  "pixel count)" if npix != case.npix else "")
    own_rate = median(samples["own_layers"])
    rows = [
        Row("train", f"baseline: plain tf.function loop, {title}", plain_rate, "ex/s",
            note=f"Keras' own layers (Conv1D, MaxPooling1D, Dense; their default initialisers), one compiled call "
                 f"per step over {PLAIN_BATCHES} pre-made batches of {batch}; XLA {jit_words[plain.jit]} kept as "
                 f"the faster (tried {trial_text(plain_trials)} ex/s)"),
        Row("train", f"baseline: Keras fit, {title}", keras_rate, "ex/s", plain_rate,
            note=f"Keras' own layers, model.fit, Adam, mse, steps_per_execution {chunk_steps} (= NUM_FETCH / "
                 f"BATCH_SIZE), jit_compile {keras_fit.jit} kept as the faster ({trial_text(keras_trials)} ex/s, "
                 f"one chunk each); in-memory tf.data of the {len(labels)}-star training pack, no augmentation; "
                 "baseline column = the plain loop"),
        Row("train", f"  not a baseline: the plain loop on ANNA-TF's layers, {title}", own_rate, "ex/s", baseline,
            note=f"the plain tf.function loop above built by anna.model.build_network (banded first convolution, "
                 f"reshape-max pooling), XLA {jit_words[own_layers.jit]} kept as the faster (tried "
                 f"{trial_text(own_trials)} ex/s); ratio to the baseline = what ANNA-TF's layers alone gain"),
    ]
    note = (f"{sizes.train_rounds} run(s) of {iterations} iterations; median of their SAMPLE_INTERVALs ({interval} "
            f"steps of batch {batch}, cross-validation after each) but the first {warmup}; wall clock: whole "
            f"intervals, cross-validation, TensorBoard logging and checkpoint included; baseline = the faster of "
            f"the plain loop and Keras fit (here {faster}); ratio = median over runs of (run / that baseline's "
            f"chunks just before and after it)" + quick_note)
    if npix != 1001:
        data = ctx.data.example(npix)
        note += f"; data: {data['n_base']} spectra ({data['synthesis']}) repeated to {len(labels)} training stars"
    explained = not explain  # the notes of the secondary rows are printed once, with the first network
    for augment in case.augment:
        run, word = runs[augment], "ON" if augment else "OFF"
        overhead = [100.0 * (1.0 - w / s) for w, s in zip(run["wall"], run["step"]) if w and s]
        rows += [
            Row("train", f"train throughput, {title}, augmentation {word}", median(run["wall"]), "ex/s", baseline,
                ratio_at_least(1.0), note, ratio_value=median(run["ratio_wall"])),
            Row("train", f"  the same against the plain loop on ANNA-TF's layers, {title}, augmentation {word}",
                median(run["wall"]), "ex/s", own_rate, ratio_value=median(run["ratio_own_layers"]),
                note="" if explained else "ratio = median over runs of (run / that loop's chunks just before "
                "and after it): the loop's own cost, the layers being the same"),
            Row("train", f"  pure-step rate (overhead excluded), {title}, augmentation {word}",
                median(run["step"]), "ex/s", baseline, ratio_value=median(run["ratio_step"]),
                note="" if explained else "the clock stopped around cross-validation, logging and checkpoint"),
            Row("train", f"  overhead share, {title}, augmentation {word}", median(overhead), "%",
                note="" if explained else "1 - wall-clock / pure-step rate, per interval: the share of time in "
                "cross-validation, TensorBoard logging and checkpoint", higher_is_better=False),
            Row("train", f"  input wait fraction, {title}, augmentation {word}", 100 * median(run["wait"]), "%",
                note="" if explained else "share of each interval spent waiting for the next batch",
                higher_is_better=False),
        ]
        note, explained = "", True
    ends = [seconds for augment in case.augment for seconds in runs[augment]["end_seconds"]]
    rows.append(Row("train", f"  end of run after the last interval, {title}", median(ends), "s",
                    note="" if not explain else "from anna-train's last interval line to its return: training-"
                    "domain description, freezing, last checkpoint; median over the runs above",
                    higher_is_better=False))
    details = {"npix": npix, "overrides": dict(case.overrides), "iterations": iterations,
               "interval": interval, "warmup_intervals": warmup, "batch_size": batch,
               "parameter_jit_compile": str(cfg.jit_compile), "plain_jit": plain.jit, "keras_jit": keras_fit.jit,
               "plain_trials": {str(k): v for k, v in plain_trials.items()},
               "keras_trials": {str(k): v for k, v in keras_trials.items()}, "samples": samples,
               "runs": {("on" if a else "off"): r for a, r in runs.items()}}
    if npix != 1001:
        details["data"] = ctx.data.example(npix).get("synthesis")
    return rows, details


# ----------------------------------------------------------------------------------------------------------
# Row 2: tutorial wall time


STAGE_START = re.compile(r"^stage (\d+): learning rate")
STAGE_INTERVAL = re.compile(r"^stage (\d+) iter\s+(\d+)")


def extrapolate_wall_time(started, finished, stamps, measured, target, interval):
    """Seconds the run would take with ``target`` iterations per stage instead of ``measured``.

    ``stamps`` are (time, report line) pairs.  Within a stage the steady per-iteration cost is taken between
    its first and last lines of whole SAMPLE_INTERVALs (``interval`` iterations, each with its evaluation,
    logging and checkpoint) and scaled to the target count; the time before the first such line (graph
    tracing, first evaluation) and after the last (a short final interval, end of stage, freezing the model) is
    kept as is.  A stage with fewer than two such lines gets the per-iteration cost of the stage before it
    (same batch size) or, for the first stage, is scaled as a whole.  Returns (seconds, method text).
    """
    starts, intervals = {}, {}
    for when, text in stamps:
        if (match := STAGE_START.match(text)) and int(match.group(1)) not in starts:
            starts[int(match.group(1))] = when
        elif (match := STAGE_INTERVAL.match(text)) and int(match.group(2)) % interval == 0:
            intervals.setdefault(int(match.group(1)), []).append((when, int(match.group(2))))
    stages = sorted(starts)
    if not stages:
        return (finished - started) * sum(target) / sum(measured), "whole run scaled (no stage lines seen)"
    total = starts[stages[0]] - started
    whole, borrowed = [], []
    per_iteration = None
    for index, stage in enumerate(stages):
        begin = starts[stage]
        end = starts[stages[index + 1]] if index + 1 < len(stages) else finished
        lines = intervals.get(stage, [])
        goal, done = target[stage - 1], measured[stage - 1]
        if len(lines) >= 2 and lines[-1][1] > lines[0][1]:
            (t_first, i_first), (t_last, i_last) = lines[0], lines[-1]
            per_iteration = (t_last - t_first) / (i_last - i_first)
            total += (t_first - begin) + per_iteration * (goal - i_first) + (end - t_last)
        elif per_iteration is not None:
            total += (end - begin) + per_iteration * (goal - done)
            borrowed.append(stage)
        else:
            total += (end - begin) * goal / done
            whole.append(stage)
    method = "steady per-iteration cost scaled"
    if borrowed:
        method += f"; stage {', '.join(map(str, borrowed))} at the previous stage's cost per iteration"
    if whole:
        method += f"; stage {', '.join(map(str, whole))} scaled as a whole"
    return total, method


def tutorial_wall_time(ctx):
    """The tutorial config, run for a fixed number of iterations and extrapolated to 13000 + 2000."""
    from anna.train import run_training

    sizes = ctx.sizes
    measured_total = sizes.tutorial_iterations
    first = max(1, round(measured_total * TUTORIAL_ITERATIONS[0] / sum(TUTORIAL_ITERATIONS)))
    measured = (first, max(1, measured_total - first))
    target = TUTORIAL_ITERATIONS
    batches = premade_batches(ctx)
    rows, details = [], {}
    for jit in (False, True):
        label = "JIT_COMPILE YES" if jit else "JIT_COMPILE NO"
        ctx.log(f"  plain loop ({label})")
        plain = PlainLoop(batches, jit=jit)
        rates = plain.chunk_rates(sizes.train_interval, sizes.baseline_chunks)
        baseline_minutes = sum(target) * BATCH_SIZE / median(rates) / 60
        ctx.log(f"  anna-train tutorial config, {measured[0]} + {measured[1]} iterations ({label})")
        overrides = {"NUM_TRAIN_ITERS1": measured[0], "NUM_TRAIN_ITERS2": measured[1],
                     "JIT_COMPILE": "YES" if jit else "NO"}
        if sizes.tutorial_interval:
            overrides["SAMPLE_INTERVAL"] = sizes.tutorial_interval
        cfg = tutorial_config(ctx, f"tutorial_{'jit' if jit else 'nojit'}", overrides)
        stamps = []

        def report(text, stamps=stamps):
            stamps.append((time.perf_counter(), text))
            ctx.log.anna(text)

        started = time.perf_counter()
        result = run_training(cfg, report=report)
        finished = time.perf_counter()
        seconds, method = extrapolate_wall_time(started, finished, stamps, measured, target, cfg.sample_interval)
        iterations_run = sum(stage["iterations"] for stage in result["stages"])
        rows.append(Row("tutorial", f"tutorial 13000+2000 it wall time, {label} (extrapolated)", seconds / 60,
                        "min", baseline_minutes, at_most(4.0, "4 min"),
                        f"EXTRAPOLATED from {measured[0]}+{measured[1]} iterations run in {finished - started:.0f} s "
                        f"({method}); baseline = plain loop x 15000 steps"
                        + (f"; QUICK: SAMPLE_INTERVAL {sizes.tutorial_interval} instead of 50"
                           if sizes.tutorial_interval else ""), higher_is_better=False))
        details[label] = {"measured_iterations": measured, "iterations_run": iterations_run,
                          "measured_seconds": finished - started, "extrapolated_seconds": seconds,
                          "method": method, "plain_rates": rates}
    rows.append(mixed_precision_row(ctx, batches, details))
    return rows, details


def mixed_precision_row(ctx, batches, details):
    """The plain XLA step with bfloat16 compute (Keras "mixed_bfloat16": float32 weights) against float32.

    float16 is a GPU format (CPUs emulate it); bfloat16 is the CPU's, with native dot products on CPUs that
    have AVX512-BF16 or AMX.  Without a GPU this row is what mixed precision can do here."""
    sizes = ctx.sizes
    rates = {}
    for policy in ("float32", "mixed_bfloat16"):
        ctx.log(f"  plain loop, XLA, dtype policy {policy}")
        rates[policy] = PlainLoop(batches, jit=True, dtype_policy=policy).chunk_rates(sizes.train_interval,
                                                                                       sizes.baseline_chunks)
    details["mixed_precision"] = rates
    cost, baseline = (1e3 * BATCH_SIZE / median(rates[policy]) for policy in ("mixed_bfloat16", "float32"))
    return Row("tutorial", "training step, mixed bfloat16 compute (XLA)", cost, "ms", baseline,
               note="plain loop with Keras' mixed_bfloat16 policy; baseline = the same loop in float32 "
                    "(ratio > 1: slower); float16 (GPU) not measurable without a GPU",
               higher_is_better=False)


# ----------------------------------------------------------------------------------------------------------
# Row 6: peak resident memory against the pack size

# The child records its own peak: VmHWM of /proc/self/status is the high-water mark of the memory map that
# exec created.  ru_maxrss from wait4/RUSAGE_CHILDREN is not usable on Linux: exec folds the high-water mark of
# the process image it replaces -- the fork of this (large) benchmark process -- into the child's maxrss.
TRAIN_CHILD = """
import atexit, sys
peak_file = sys.argv.pop(1)
def record_peak():
    with open('/proc/self/status') as status:
        kb = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(peak_file, 'w') as out:
        out.write(kb)
atexit.register(record_peak)
from anna.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


CHILD_RATE = re.compile(r"\| *([0-9.]+) ex/s\s*$")


def train_in_child(ctx, name, pack, iterations):
    """Run anna-train in a child process; returns (peak RSS in bytes (VmHWM), ru_maxrss from wait4 in bytes,
    wall seconds, the ex/s of its interval lines)."""
    example = ctx.data.example()
    run_dir = ctx.ws.fresh_dir("runs", name)
    overrides = {"TRAINING_DATA": pack, "XVAL_DATA": example["xval"], "SN_TEMPLATE": example["sn_template"],
                 "SAVE_LOC": os.path.join(run_dir, "model"), "LOG_LOC": os.path.join(run_dir, "logs"),
                 "RESUME": "NO", "NUM_TRAIN_ITERS1": iterations, "DO_TRAIN2": "NO"}
    peak_file = os.path.join(run_dir, "peak_rss_kb")
    command = [sys.executable, "-c", TRAIN_CHILD, peak_file, TUTORIAL_CONFIG]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log_path = os.path.join(run_dir, "train.log")
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    with open(log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    if child.returncode != 0:
        raise RuntimeError(f"anna-train exited with status {child.returncode}: {text[-1500:]}")
    with open(peak_file, encoding="utf-8") as handle:
        peak = int(handle.read()) * 1024
    rates = [float(m.group(1)) for line in text.splitlines() if (m := CHILD_RATE.search(line))]
    return peak, usage.ru_maxrss * 1024, seconds, rates


def producer_chunk_ms(ctx, pack_path, resident, chunks):
    """Milliseconds per producer chunk (NUM_FETCH stars gathered and noised, as anna-train's producer does
    it) from ``pack_path``, held in RAM or streamed; median of ``chunks`` chunks after one untimed."""
    from anna.augment import BatchProducer, NoiseModel, PackRows
    from anna.model import LabelScaler
    from anna.packs import open_pack
    from anna.params import load_config
    from anna.templates import relative_sn_on_grid

    cfg = load_config(TUTORIAL_CONFIG)
    pack = open_pack(pack_path)
    rows = PackRows(pack, resident_bytes=1 << 62 if resident else 0)
    noise = NoiseModel(relative_sn_on_grid(ctx.data.example()["sn_template"], pack.wavelengths),
                       tuple(cfg.sn_range_train), tuple(cfg.rel_cont_e_train))
    producer = BatchProducer(rows, LabelScaler(cfg.min_params, cfg.max_params), noise,
                             batch_size=cfg.batch_size1, seed=1, stage=1, fetch=cfg.num_fetch)
    times = []
    for chunk in range(chunks + 1):
        started = time.perf_counter()
        producer._draw_chunk(chunk)  # the producer's unit of work, without the tf.data wrapping
        times.append(1e3 * (time.perf_counter() - started))
    return times[1:]


def peak_rss(ctx, pack_stars):
    """Peak RSS of anna-train on packs of each of ``pack_stars`` stars, against the same run on the example
    pack; and the cost of a producer chunk streamed against in RAM (what the residency rule trades)."""
    from anna.augment import memory_available_bytes, resident_limit_bytes
    from data import PACK_VALUE_BYTES

    sizes = ctx.sizes
    limit = resident_limit_bytes(memory_available_bytes())
    small = ctx.data.example()["train"]
    ctx.log(f"  anna-train in a child process on the {sizes.n_train}-star example pack")
    small_rss, small_maxrss, small_seconds, small_rates = train_in_child(ctx, "rss_small", small,
                                                                        sizes.rss_iterations)
    rows = []
    details = {"resident_limit_bytes": limit, "small": {"rss_bytes": small_rss, "seconds": small_seconds,
                                                         "wait4_ru_maxrss_bytes": small_maxrss,
                                                         "child_ex_per_s": small_rates}, "packs": {}}
    note = (f"{sizes.rss_iterations} iterations of the tutorial file in a child process; baseline = the same run on "
            f"the {sizes.n_train}-star example pack ({small_seconds:.0f} s); packs whose float32 flux is at most "
            f"{limit / 2**20:.0f} MiB (min(256 MiB, MemAvailable / 8) here) are held in RAM, larger ones streamed")
    chunk_pack = None
    for n_stars in pack_stars:
        big_bytes = n_stars * (1001 + 7) * PACK_VALUE_BYTES
        mode = "in RAM" if n_stars * 1001 * 4 <= limit else "streamed"
        name = f"peak RSS training, {big_bytes / 1e9:.2f} GB pack ({n_stars} stars, {mode})"
        free = float("inf") if ctx.data.has_pack(n_stars) else ctx.ws.free_bytes()
        if free < big_bytes + 2e9:
            rows.append(Row("rss", name, status="skipped", unit="GB", note=f"only {free / 1e9:.1f} GB free on the "
                            f"workspace disk; needs {big_bytes / 1e9 + 2:.1f} GB (use --tmpdir)"))
            continue
        big = ctx.data.tiled_pack(n_stars)
        ctx.log(f"  anna-train in a child process on the {big_bytes / 1e9:.2f} GB pack ({mode})")
        big_rss, big_maxrss, big_seconds, big_rates = train_in_child(ctx, f"rss_{n_stars}", big,
                                                                     sizes.rss_iterations)
        rows.append(Row("rss", name, big_rss / 1e9, "GB", small_rss / 1e9, at_most(2.0, "2 GB"),
                        (note + "; " if note else "") + f"this run {big_seconds:.0f} s", higher_is_better=False))
        note = ""
        details["packs"][n_stars] = {"bytes": big_bytes, "mode": mode, "rss_bytes": big_rss, "seconds": big_seconds,
                                     "wait4_ru_maxrss_bytes": big_maxrss, "child_ex_per_s": big_rates}
        if chunk_pack is None:
            chunk_pack = n_stars
            ctx.log(f"  producer chunks from the {n_stars}-star pack, in RAM and streamed")
            details["chunk_ms"] = {mode: producer_chunk_ms(ctx, big, mode == "in RAM", 10 if sizes.quick else 40)
                                   for mode in ("in RAM", "streamed")}
        if n_stars not in ctx.keep_packs and big_bytes > 1e9:
            ctx.data.drop_pack(n_stars)  # the big packs go as soon as measured (disk space)
    if chunk_pack is not None:
        chunk = details["chunk_ms"]
        rows.append(Row("rss", "producer chunk, pack streamed (baseline: held in RAM)", median(chunk["streamed"]),
                        "ms", median(chunk["in RAM"]),
                        note=f"one producer call: 1000 random stars gathered from the {chunk_pack}-star pack (in the "
                             "page cache) and noised, as anna-train draws them; ratio > 1: streaming costs that "
                             "much more CPU", higher_is_better=False))
    return rows, details


# ----------------------------------------------------------------------------------------------------------
# Row 7 (training part): cost of a step against the number of pixels


def training_scaling(ctx):
    """Microseconds per training example of the plain step at each ``scaling_npix``; the baseline of a longer
    spectrum is the 1001-pixel cost scaled linearly with the pixel count, so ratio 1 means linear."""
    sizes = ctx.sizes
    rows, details = [], {}
    reference = None
    for npix in sizes.scaling_npix:
        ctx.log(f"  plain training step, npix {npix}")
        plain = PlainLoop(premade_batches(ctx, npix=npix, count=4), npix=npix)
        rates = plain.chunk_rates(sizes.scaling_train_steps, max(2, sizes.repeats))
        row, reference = linear_scaling_row(f"train step per example, npix {npix}", "us/ex", npix,
                                            1e6 / median(rates), reference)
        rows.append(row)
        details[npix] = rates
    return rows, details
