"""Training benchmarks: throughput (row 1), tutorial wall time (row 2), peak memory on a large pack (row 6) and
the cost of a training step against the spectrum length (row 7, first part).

The baseline for training speed is :class:`PlainLoop`: the same network (:func:`anna.model.build_network`),
Adam, the same loss and batch size, stepping over a few batches already held as tensors -- what the network
costs with no input pipeline, logging or bookkeeping around it.  anna-train's own figures come from the
history it returns (``examples_per_s`` and ``input_wait_fraction`` per SAMPLE_INTERVAL).
"""

import os
import re
import subprocess
import sys
import time

import numpy as np

from harness import (REPO_ROOT, TUTORIAL_CONFIG, TUTORIAL_ITERATIONS, Row, at_most, median, ratio_at_least)

BATCH_SIZE = 100
PLAIN_BATCHES = 20


def tutorial_config(ctx, name, overrides):
    """The tutorial parameter file with its inputs pointed at the generated example data and its outputs into
    a fresh folder of the workspace; ``overrides`` (dict) changes further keys, as ``--set`` would."""
    from anna.params import load_config, validate_for_stage

    example = ctx.data.example()
    run_dir = ctx.ws.fresh_dir("runs", name)
    values = {"TRAINING_DATA": example["train"], "XVAL_DATA": example["xval"],
              "SN_TEMPLATE": example["sn_template"], "SAVE_LOC": os.path.join(run_dir, "model"),
              "LOG_LOC": os.path.join(run_dir, "logs"), "RESUME": "NO"}
    values.update(overrides)
    cfg = load_config(TUTORIAL_CONFIG, overrides=[f"{key}={value}" for key, value in values.items()])
    validate_for_stage(cfg, "train")
    return cfg


def premade_batches(ctx, npix=1001, count=PLAIN_BATCHES, batch_size=BATCH_SIZE):
    """``count`` (flux, normalised labels, mask) batches as tensors: noisy example spectra for 1001 pixels,
    flux near 1 with 1 % noise for other lengths."""
    import tensorflow as tf

    n = count * batch_size
    rng = np.random.default_rng(7)
    if npix == 1001:
        flux = ctx.data.noisy_spectra(n, sn=200.0)
    else:
        flux = (1.0 + 0.01 * rng.standard_normal((n, npix))).astype(np.float32)
    labels = rng.uniform(0.0, 1.0, (n, 5)).astype(np.float32)
    mask = np.ones_like(labels)
    return [(tf.constant(flux[i:i + batch_size]), tf.constant(labels[i:i + batch_size]),
             tf.constant(mask[i:i + batch_size])) for i in range(0, n, batch_size)]


class PlainLoop:
    """Minimal training loop: one tf.function step (forward, masked squared error, gradients, Adam) cycling
    over pre-made tensors.  ``chunk_rates`` times chunks of steps, synchronising once per chunk as anna-train
    does once per SAMPLE_INTERVAL."""

    def __init__(self, batches, npix=1001, dropout_rate=0.2, learn_rate=5e-5, jit=False, dtype_policy=None):
        import keras
        import tensorflow as tf

        from anna.losses import masked_squared_error
        from anna.model import NetworkSpec, build_network

        spec = NetworkSpec(npix=npix, nout=5)
        if dtype_policy is None:
            network = build_network(spec, dropout_rate=dropout_rate)
        else:  # layers take the global policy when they are made: set it for this network only
            previous = keras.config.dtype_policy()
            keras.config.set_dtype_policy(dtype_policy)
            try:
                network = build_network(spec, dropout_rate=dropout_rate)
            finally:
                keras.config.set_dtype_policy(previous)
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


# ----------------------------------------------------------------------------------------------------------
# Row 1: training throughput


def training_throughput(ctx):
    """anna-train's examples/s with augmentation ON and OFF against the plain loop.

    Runs alternate with plain-loop measurements (plain, ON, plain, OFF, plain, ...), and each run is compared
    with the plain chunks just before and after it, so a change of machine load between runs cancels in the
    ratio.  The first ``warmup_intervals`` intervals of a run are dropped: they include graph tracing and the
    producer filling its MAX_PP_DEPTH buffer while competing with the training step for the cores.
    """
    from anna.train import run_training

    sizes = ctx.sizes
    # the baseline compiles its step exactly as the parameter file tells anna-train to (JIT_COMPILE)
    jit = bool(tutorial_config(ctx, "throughput_probe", {}).jit_compile)
    plain = PlainLoop(premade_batches(ctx), jit=jit)
    samples = {"plain": [], "on": [], "off": [], "wait_on": [], "wait_off": [], "warmup_on": [],
               "warmup_off": []}
    ratios = {"on": [], "off": []}
    before = plain.chunk_rates(sizes.train_interval, sizes.baseline_chunks)
    samples["plain"] += before
    for number in range(sizes.train_rounds):
        for augment, key in ((True, "on"), (False, "off")):
            ctx.log(f"  round {number + 1}/{sizes.train_rounds}: anna-train, augmentation {key.upper()}, "
                    f"then the plain loop")
            overrides = {"NUM_TRAIN_ITERS1": sizes.train_iterations, "DO_TRAIN2": "NO",
                         "SAMPLE_INTERVAL": sizes.train_interval, "PREPROCESS_TRAIN": "YES" if augment else "NO"}
            cfg = tutorial_config(ctx, f"throughput_{key}", overrides)
            result = run_training(cfg, report=ctx.log.anna)
            history = [h for h in result["history"] if h["stage"] == 1]
            kept = history[sizes.warmup_intervals:]
            samples[key] += [h["examples_per_s"] for h in kept]
            samples["wait_" + key] += [h["input_wait_fraction"] for h in kept]
            samples["warmup_" + key] += [h["examples_per_s"] for h in history[:sizes.warmup_intervals]]
            after = plain.chunk_rates(sizes.train_interval, sizes.baseline_chunks)
            samples["plain"] += after
            ratios[key].append(median([h["examples_per_s"] for h in kept]) / median(before + after))
            before = after
    baseline = median(samples["plain"])
    note = (f"median of {len(samples['on'])} SAMPLE_INTERVALs of {sizes.train_interval} steps after "
            f"{sizes.warmup_intervals} warm-up intervals, {sizes.train_rounds} run(s) each; ratio = median over "
            f"runs of (run / plain-loop chunks just before and after it); JIT_COMPILE {'YES' if jit else 'NO'} "
            "as in the tutorial file, for both")
    rows = [
        Row("train", "train throughput, augmentation ON", median(samples["on"]), "ex/s", baseline,
            ratio_at_least(1.0), note, ratio_value=median(ratios["on"])),
        Row("train", "train throughput, augmentation OFF", median(samples["off"]), "ex/s", baseline,
            ratio_at_least(1.0), ratio_value=median(ratios["off"])),
        Row("train", "input wait fraction, augmentation ON", 100 * median(samples["wait_on"]), "%",
            note="share of each interval spent waiting for the next batch", higher_is_better=False),
        Row("train", "input wait fraction, augmentation OFF", 100 * median(samples["wait_off"]), "%",
            higher_is_better=False),
    ]
    return rows, {"samples": samples, "ratios": ratios, "jit_compile": jit}


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
# Row 6: peak resident memory while training on a large pack

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


def train_in_child(ctx, name, pack, iterations):
    """Run anna-train in a child process; returns (peak RSS in bytes (VmHWM), ru_maxrss from wait4 in bytes,
    wall seconds)."""
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
    if child.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            tail = log.read()[-1500:]
        raise RuntimeError(f"anna-train exited with status {child.returncode}: {tail}")
    with open(peak_file, encoding="utf-8") as handle:
        peak = int(handle.read()) * 1024
    return peak, usage.ru_maxrss * 1024, seconds


def peak_rss(ctx, big_stars):
    """Peak RSS of anna-train on a pack of ``big_stars`` stars against the same run on the example pack."""
    from data import PACK_VALUE_BYTES

    sizes = ctx.sizes
    big_bytes = big_stars * (1001 + 7) * PACK_VALUE_BYTES
    name = f"peak RSS training, {big_bytes / 1e9:.2f} GB pack ({big_stars} stars)"
    free = float("inf") if ctx.data.has_pack(big_stars) else ctx.ws.free_bytes()
    if free < big_bytes + 2e9:
        return [Row("rss", name, status="skipped", unit="GB", note=f"only {free / 1e9:.1f} GB free on the "
                    f"workspace disk; needs {big_bytes / 1e9 + 2:.1f} GB (use --tmpdir)")], {}
    small = ctx.data.example()["train"]
    ctx.log(f"  anna-train in a child process on the {sizes.n_train}-star example pack")
    small_rss, small_maxrss, small_seconds = train_in_child(ctx, "rss_small", small, sizes.rss_iterations)
    big = ctx.data.tiled_pack(big_stars)
    ctx.log(f"  anna-train in a child process on the {big_bytes / 1e9:.2f} GB pack")
    big_rss, big_maxrss, big_seconds = train_in_child(ctx, "rss_big", big, sizes.rss_iterations)
    row = Row("rss", name, big_rss / 1e9, "GB", small_rss / 1e9, at_most(2.0, "2 GB"),
              f"{sizes.rss_iterations} iterations; run took {big_seconds:.0f} s (baseline: same run on the "
              f"{sizes.n_train}-star example pack, {small_seconds:.0f} s)", higher_is_better=False)
    return [row], {"big_rss_bytes": big_rss, "small_rss_bytes": small_rss, "big_seconds": big_seconds,
                   "small_seconds": small_seconds, "big_stars": big_stars,
                   "wait4_ru_maxrss_bytes": {"big": big_maxrss, "small": small_maxrss}}


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
        cost = 1e6 / median(rates)
        if reference is None:
            reference = (npix, cost)
        expected = reference[1] * npix / reference[0] if npix != reference[0] else None
        rows.append(Row("scaling", f"train step per example, npix {npix}", cost, "us/ex", expected,
                        note="baseline = npix-1001 cost x npix/1001 (ratio 1 = linear)" if expected else "",
                        higher_is_better=False))
        details[npix] = rates
    return rows, details
