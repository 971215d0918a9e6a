"""The cost of uncertainty-aware training: examples/s of the training step with a variance head (UNCERTAINTY:
MC_DROPOUT) against the plain step (UNCERTAINTY: NONE) of the same network, compiled form and batch.

    python benchmarks/rows_mc_training.py [--networks tutorial,starnet] [--forms xla,xla_step,graph]
                                          [--seconds 1.5] [--rounds 8] [--pack7214 PATH] [--pack1001 PATH]

What is timed is :func:`anna.train.make_train_steps` itself, as JIT_COMPILE AUTO times a form
(:func:`anna.train.steps.time_compiled_form`): a fresh network (dropout 0.1) and Adam, one chunk of
NUM_FETCH / BATCH_SIZE = 10 batches of 100 spectra held as tensors, the steps called as anna-train calls them,
without the producer, cross-validation or logging.  Networks: the tutorial's (1001 px, one convolution of 10
kernels 45 px wide, dense 128, 128: the NetworkSpec defaults) and the StarNet2017-shaped survey network
(7214 px, convolutions of 4 and 16 kernels 8 px wide, pooling over 4, dense 256, 128: configs/apogee.param);
forms as :data:`DEFAULT_FORMS`.  As a benchmark group: :func:`mc_training_cost` (ctx) -> (rows, details).

The plain and variance-head steps of one (network, form) are timed in alternating rounds, so a change of
machine load between rounds affects both; each row's figure is the median rate of its rounds, its baseline
the plain step's, and its ratio the median of the rounds' paired ratios (variance-head rate / plain rate).
Target: the variance-head step costs at most 1.3x the plain one, i.e. ratio >= 1/1.3.  Op determinism is on,
as anna-train runs with a SEED (both configs set one).  Nothing is asserted.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Row, Target, median, starnet_spec  # noqa: E402

BATCH = 100
CHUNK_BATCHES = 10      # NUM_FETCH 1000 / BATCH_SIZE 100, as both configs
DROPOUT = 0.1
COST_TARGET = 1.3       # the variance-head step may cost at most this many plain steps
STEPS_PER_CALL = 3      # as JIT_COMPILE AUTO's trial calls (anna.train.steps.TRIAL_STEPS_PER_CALL)
NETWORKS = ("tutorial", "starnet")
# The forms timed by default: JIT_COMPILE AUTO's candidates, less "xla" for the StarNet-shaped network, whose
# convolutions XLA runs about 10x slower inside a while loop (anna.train.steps.make_train_steps): AUTO never
# keeps it there, and one call of its steps takes half a minute on 2 cores (--forms xla times it anyway).
DEFAULT_FORMS = {"tutorial": ("xla", "xla_step", "graph"), "starnet": ("xla_step", "graph")}
# Per timing round and step kind, and rounds: short alternating rounds pair the two kinds closely in time, which
# kept the ratio steady (1.1-1.3x) on a shared 2-core machine while the rates themselves moved by 2x.
FULL_SECONDS, QUICK_SECONDS = 1.5, 1.0
FULL_ROUNDS, QUICK_ROUNDS = 8, 4


def network_spec(name, heteroscedastic):
    """The :class:`anna.model.NetworkSpec` of ``name`` ("tutorial" or "starnet"), 5 labels."""
    from anna.model import NetworkSpec

    if name == "tutorial":
        return NetworkSpec(npix=1001, nout=5, heteroscedastic=heteroscedastic)
    return starnet_spec(7214, heteroscedastic=heteroscedastic)


def noisy_rows(flux, n, seed, sn=100.0):
    """``n`` rows of ``flux`` (repeated as needed) with Gaussian noise at S/N ``sn``, float32."""
    rng = np.random.default_rng(seed)
    rows = np.asarray(flux, dtype=np.float64)[np.arange(n) % len(flux)]
    return (rows + rng.standard_normal(rows.shape) / sn).astype(np.float32)


def pack_flux(path, n):
    """The first ``n`` spectra of a pack, float64."""
    from anna.packs import open_pack

    pack = open_pack(path)
    return np.asarray(pack.flux[:min(n, pack.n_stars)], dtype=np.float64)


def flat_flux(npix, n, seed):
    """Continuum with a few dozen Gaussian absorption lines at random places: stands in for spectra when no pack
    is given (a step's cost does not depend on what the spectra show)."""
    rng = np.random.default_rng(seed)
    pixels = np.arange(npix)[None, :]
    flux = np.ones((n, npix))
    for _ in range(max(5, npix // 100)):
        centre = rng.uniform(0, npix, (n, 1))
        flux -= rng.uniform(0.05, 0.5, (n, 1)) * np.exp(-0.5 * ((pixels - centre) / rng.uniform(1, 4, (n, 1))) ** 2)
    return flux


def make_chunk(flux, seed=5):
    """One producer chunk as tensors: flux (CHUNK_BATCHES, BATCH, npix), normalised labels and mask
    (CHUNK_BATCHES, BATCH, 5), a tenth of the labels missing."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    n = CHUNK_BATCHES * BATCH
    spectra = noisy_rows(flux, n, seed)
    labels = rng.uniform(0.0, 1.0, (n, 5)).astype(np.float32)
    mask = (rng.uniform(size=(n, 5)) > 0.1).astype(np.float32)
    return tuple(tf.constant(a.reshape((CHUNK_BATCHES, BATCH) + a.shape[1:])) for a in (spectra, labels, mask))


class StepTimer:
    """``make_train_steps`` of one network, form and kind (plain or variance head) on a fresh network, compiled
    by the first call; ``rate(seconds)`` times calls of STEPS_PER_CALL steps for at least ``seconds``."""

    def __init__(self, spec, form, chunk, centre, seed=3):
        import keras

        from anna.model import build_network
        from anna.train.steps import make_train_steps

        keras.utils.set_random_seed(seed)
        self.network = build_network(spec, dropout_rate=DROPOUT, centre=centre, compiled_form=form,
                                     for_training=True)
        optimizer = keras.optimizers.Adam(learning_rate=1e-6)
        optimizer.build(self.network.trainable_variables)
        self.steps = make_train_steps(self.network, optimizer, spec, CHUNK_BATCHES, BATCH, form)
        self.chunk = chunk
        started = time.perf_counter()
        self.steps(chunk, 0, STEPS_PER_CALL)[0].numpy()  # traces and compiles
        self.compile_seconds = time.perf_counter() - started
        self.first = 0

    def rate(self, seconds):
        done, started = 0, time.perf_counter()
        while True:
            first = self.first % (CHUNK_BATCHES - STEPS_PER_CALL + 1)
            self.first += STEPS_PER_CALL
            self.steps(self.chunk, first, STEPS_PER_CALL)[0].numpy()
            done += STEPS_PER_CALL
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and done >= 2 * STEPS_PER_CALL:
                return done * BATCH / elapsed


def measure_pair(name, form, chunk, centre, seconds, rounds, log=print):
    """Alternating rounds of the plain and the variance-head step; returns a dict of their rates per round."""
    plain = StepTimer(network_spec(name, False), form, chunk, centre)
    mc = StepTimer(network_spec(name, True), form, chunk, centre)
    result = {"plain": [], "mc": [], "compile_seconds": {"plain": plain.compile_seconds, "mc": mc.compile_seconds}}
    for number in range(rounds):
        for kind, timer in (("plain", plain), ("mc", mc)) if number % 2 == 0 else (("mc", mc), ("plain", plain)):
            result[kind].append(timer.rate(seconds))
        log(f"    {name}, {form}, round {number + 1}: plain {result['plain'][-1]:,.0f} ex/s, "
            f"variance head {result['mc'][-1]:,.0f} ex/s ({result['plain'][-1] / result['mc'][-1]:.2f}x the cost)")
    result["ratios"] = [m / p for m, p in zip(result["mc"], result["plain"])]
    return result


def with_op_determinism():
    """Op determinism on (as anna-train with a SEED); returns whether it was already on."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    if not was_on:
        tf.config.experimental.enable_op_determinism()
    return was_on


def restore_op_determinism(was_on):
    if not was_on:
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


def measure(flux_of, networks=NETWORKS, forms=None, seconds=FULL_SECONDS, rounds=FULL_ROUNDS, log=print):
    """Rows and details for ``networks`` x ``forms`` (default :data:`DEFAULT_FORMS`); ``flux_of(npix)`` gives
    spectra of that length."""
    from anna.train.steps import FORM_NAMES

    target = Target("ratio", ">=", 1.0 / COST_TARGET, f">= 1/{COST_TARGET:g}x")
    rows, details = [], {}
    was_on = with_op_determinism()
    try:
        for name in networks:
            spec = network_spec(name, True)
            flux = flux_of(spec.npix)
            chunk = make_chunk(flux)
            centre = flux.mean(axis=0) if name == "starnet" else None
            title = f"{'tutorial' if name == 'tutorial' else 'StarNet2017-shaped'} network, {spec.npix} px"
            for form in forms or DEFAULT_FORMS[name]:
                log(f"  {title}, {FORM_NAMES[form]}: compiling the plain and the variance-head step")
                try:
                    result = measure_pair(name, form, chunk, centre, seconds, rounds, log)
                except Exception as error:  # one form failing must not hide the others
                    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
                    rows.append(Row("mc_training", f"variance-head training step, {title}, {form}",
                                    status="error", note=text))
                    continue
                details[f"{name}/{form}"] = result
                cost = median([p / m for p, m in zip(result["plain"], result["mc"])])
                note = f"cost {cost:.2f}x the plain step"
                if not rows:
                    note = (f"UNCERTAINTY MC_DROPOUT against NONE (baseline), same network, form, dropout "
                            f"{DROPOUT:g} and batch {BATCH}; {rounds} alternating rounds of >= {seconds:g} s each; "
                            f"ratio = median of the rounds' paired ratios; " + note)
                rows.append(Row("mc_training", f"variance-head training step, {title}, {form}",
                                median(result["mc"]), "ex/s", median(result["plain"]), target, note,
                                ratio_value=median(result["ratios"])))
    finally:
        restore_op_determinism(was_on)
    return rows, details


def mc_training_cost(ctx):
    """Benchmark group: every network and compiled form.  Spectra: the tutorial example data for 1001 px;
    for 7214 px the APOGEE-like data of ``--survey-data`` when given, else lined continuum (:func:`flat_flux`)."""
    quick = ctx.sizes.quick
    n = CHUNK_BATCHES * BATCH

    def flux_of(npix):
        if npix == 1001:
            return ctx.data.example_flux("train", 1001)[2][:n]
        survey = getattr(ctx, "survey_data", None)
        if survey and os.path.exists(os.path.join(survey, "train.pack")):
            return pack_flux(os.path.join(survey, "train.pack"), n)
        return flat_flux(npix, n, seed=9)

    return measure(flux_of, seconds=QUICK_SECONDS if quick else FULL_SECONDS,
                   rounds=QUICK_ROUNDS if quick else FULL_ROUNDS, log=ctx.log)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help="tutorial, starnet (comma-separated)")
    parser.add_argument("--forms", default="", help="xla, xla_step, graph (default: DEFAULT_FORMS)")
    parser.add_argument("--seconds", type=float, default=FULL_SECONDS, help="seconds per round and step kind")
    parser.add_argument("--rounds", type=int, default=FULL_ROUNDS)
    parser.add_argument("--pack1001", help="a 1001-pixel pack to take spectra from (default: lined continuum)")
    parser.add_argument("--pack7214", help="a 7214-pixel pack to take spectra from (default: lined continuum)")
    args = parser.parse_args(argv)

    from anna.runtime import configure_threads, prepare_tensorflow_environment

    prepare_tensorflow_environment()
    configure_threads()
    n = CHUNK_BATCHES * BATCH
    packs = {1001: args.pack1001, 7214: args.pack7214}

    def flux_of(npix):
        return pack_flux(packs[npix], n) if packs.get(npix) else flat_flux(npix, n, seed=9)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    rows, _ = measure(flux_of, [name for name in args.networks.split(",") if name],
                      [form for form in args.forms.split(",") if form] or None, args.seconds, args.rounds, log)
    print(f"{'row':<62} {'ex/s':>8} {'plain':>8} {'ratio':>6} {'cost':>6}  target met?")
    for row in rows:
        if row.status != "ok":
            print(f"{row.name:<62} {row.status}: {row.note}")
            continue
        print(f"{row.name:<62} {row.figure:8,.0f} {row.baseline:8,.0f} {row.ratio:6.3f} {1 / row.ratio:5.2f}x  "
              f"{row.target.text} {'yes' if row.met else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
