"""anna-train: two-stage training with early stopping, TensorBoard logging, checkpoints and a frozen model.

Guide sections 2.2, 4.2 and 4.5.  One call, :func:`run_training`, does the whole stage:

1. open the training pack (memory-mapped) and, with TRAINING_XVAL, the first XVAL_SIZE stars of XVAL_DATA;
   the cross-validation set is noised ONCE with a fixed seed so its cost is comparable across evaluations;
2. build the network with the shared builder (:mod:`anna.model`);
3. for stage 1 and (DO_TRAIN2) stage 2: Adam at LEARN_RATEn on batches of BATCH_SIZEn streamed by the
   threaded producer (:mod:`anna.augment`), dropout 1 − KEEP_PROBn (the producer hands over chunks of
   NUM_FETCH examples, and one compiled call runs the steps of a chunk); every SAMPLE_INTERVAL batches evaluate
   and log the costs and the RMS per label in physical units, checkpoint, and apply early stopping (ES_SAMPLE
   intervals without improvement of the xval cost, or of the batch cost without xval) -- the stage ends on
   its best weights, and stage 2 starts from stage 1's best;
4. write ``SAVE_LOC/frozen.model`` atomically with the final best weights and the provenance.

With UNCERTAINTY: MC_DROPOUT the network also predicts a variance per label (misfit part plus a part scaled
by the spectrum's own noise), trained with the robust loss of Leung & Bovy (2019) on the residual of the
dropout-free value; its two biases are refitted by maximum likelihood every SAMPLE_INTERVAL, and at the end
σ_total (dropout spread and variance head together) is calibrated by maximum likelihood on the
cross-validation set (:func:`calibrate_variance_head`).  Every frozen model also stores statistics of its
training spectra for anna-infer's ``outside_training_domain`` flag.

The cost is the mean squared error of the normalised labels (0..1 scale), the quantity minimised; the RMS per
label is the same error in physical units.  Ctrl-C or SIGTERM stops after the steps of the current chunk
(at most NUM_FETCH examples), keeps the best weights so far as a usable frozen model and says so.  After a
crash or ``kill -9`` the same command resumes from the last checkpoint (at most one SAMPLE_INTERVAL of work
is lost).
"""

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import zipfile

import numpy as np

from anna.atomic import atomic_output, file_sha256, read_array_archive, write_array_archive
from anna.errors import AnnaInputError

CHECKPOINT_NAME = "checkpoint.anna"
PARTIAL_MODEL_NAME = "frozen.partial.model"
XVAL_EVAL_BATCH = 2048
ACTIVATION_SAMPLE = 256
# Histograms of 1.3M weights cost ~0.2 s each time (measured, graph or eager alike): log them at the first
# interval, every HISTOGRAM_EVERY intervals and at the end of a stage; scalars go out every interval.
HISTOGRAM_EVERY = 10
HISTOGRAM_BUCKETS = 30  # TensorBoard's default
# JIT_COMPILE AUTO: seconds each compiled form is timed for (after its compiling call).
TRIAL_SECONDS = 2.0
# ... in calls of at most this many steps, so that a slow form is measured without running whole chunks.
TRIAL_STEPS_PER_CALL = 3
# AdamW's weight decay when OPTIMIZER is ADAMW and WEIGHT_DECAY is not given.
DEFAULT_WEIGHT_DECAY = 1e-4
# Training spectra drawn (fixed seed) at the end of training for the training-domain statistics.
DOMAIN_SAMPLE = 4000


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage's hyperparameters (LEARN_RATEn, NUM_TRAIN_ITERSn, BATCH_SIZEn, KEEP_PROBn)."""

    number: int
    learn_rate: float
    iterations: int
    batch_size: int
    keep_prob: float
    max_seconds: float = None  # MAX_MINUTESn x 60; None = no time limit


def stage_plans(cfg):
    def seconds(minutes):
        return None if minutes is None else 60.0 * minutes

    plans = [StagePlan(1, cfg.learn_rate1, cfg.num_train_iters1, cfg.batch_size1, cfg.keep_prob1,
                       seconds(cfg.max_minutes1))]
    if cfg.do_train2:
        plans.append(StagePlan(2, cfg.learn_rate2, cfg.num_train_iters2, cfg.batch_size2, cfg.keep_prob2,
                               seconds(cfg.max_minutes2)))
    return plans


class EarlyStopping:
    """Tracks the best cost of a stage and its weights; says when ``patience`` intervals passed without gain."""

    def __init__(self, patience, enabled=True):
        self.patience = int(patience)
        self.enabled = enabled
        self.best_cost = math.inf
        self.best_iteration = 0
        self.best_weights = None
        self.bad_intervals = 0

    def update(self, cost, iteration, weights):
        """Record ``cost`` measured at ``iteration``; returns True when it is a new best."""
        if cost < self.best_cost:
            self.best_cost = float(cost)
            self.best_iteration = int(iteration)
            self.best_weights = [np.array(w, copy=True) for w in weights]
            self.bad_intervals = 0
            return True
        self.bad_intervals += 1
        return False

    @property
    def should_stop(self):
        return self.enabled and self.bad_intervals >= self.patience


class LearningRateSchedule:
    """The learning rate within one stage (LR_SCHEDULE), a small pure object so it can be tested alone.

    * CONSTANT: the stage's LEARN_RATEn throughout (ANNA).
    * PLATEAU: multiply the rate by ``factor`` (not below ``minimum``) after ``patience`` sample intervals
      without a new best of the monitored cost; the count restarts after each cut (Keras' ReduceLROnPlateau,
      which astroNN uses).  Early stopping's ES_SAMPLE should be longer than the patience, or the stage ends
      before a cut can help.
    * COSINE: ``minimum + (base - minimum)·(1 + cos(π·p))/2`` with p the stage's progress: iterations done over
      NUM_TRAIN_ITERSn, or, with a time limit, the elapsed share of it when that is further along.  With
      ``decay_start`` s > 0 (LR_DECAY_START) the rate stays at ``base`` for the first share s of the stage and
      the cosine runs over the rest, p = (progress - s) / (1 - s): a network far from convergence keeps
      learning at the full rate, and the decay at the end still settles the weights.

    The rate is set before each compiled call (a chunk of at most NUM_FETCH / BATCH_SIZE steps).  ``state()``
    and ``restore()`` carry it through a checkpoint, so a resumed run continues the schedule where it stopped.
    """

    def __init__(self, kind, base_rate, iterations, max_seconds=None, patience=5, factor=0.5, minimum=0.0,
                 decay_start=0.0):
        self.kind = kind
        self.decay_start = float(decay_start)
        self.base_rate = float(base_rate)
        self.iterations = int(iterations)
        self.max_seconds = max_seconds
        self.patience = int(patience)
        self.factor = float(factor)
        self.minimum = float(minimum)
        self.current = self.base_rate
        self.wait = 0
        self.cuts = []

    def rate(self, iteration, elapsed_seconds=0.0):
        """The rate for steps starting at ``iteration``, ``elapsed_seconds`` into the stage."""
        if self.kind != "COSINE":
            return self.current
        progress = iteration / max(self.iterations, 1)
        if self.max_seconds:
            progress = max(progress, elapsed_seconds / self.max_seconds)
        progress = min(max((progress - self.decay_start) / (1.0 - self.decay_start), 0.0), 1.0)
        return self.minimum + (self.base_rate - self.minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def after_interval(self, improved, iteration):
        """Note one sample interval's outcome; returns the new rate when PLATEAU cut it, else None."""
        if self.kind != "PLATEAU":
            return None
        if improved:
            self.wait = 0
            return None
        self.wait += 1
        if self.wait < self.patience or self.current <= self.minimum:
            return None
        self.current = max(self.minimum, self.current * self.factor)
        self.wait = 0
        self.cuts.append([int(iteration), self.current])
        return self.current

    def state(self):
        return {"current": self.current, "wait": self.wait, "cuts": [list(c) for c in self.cuts]}

    def restore(self, state):
        self.current = float(state["current"])
        self.wait = int(state["wait"])
        self.cuts = [list(c) for c in state["cuts"]]


def stage_schedule(cfg, plan):
    """The :class:`LearningRateSchedule` of a stage, from LR_SCHEDULE, LR_PATIENCE, LR_FACTOR, LR_MIN and
    LR_DECAY_START."""
    return LearningRateSchedule(cfg.lr_schedule, plan.learn_rate, plan.iterations, plan.max_seconds,
                                cfg.lr_patience, cfg.lr_factor, cfg.lr_min, cfg.lr_decay_start)


def make_optimizer(cfg, learn_rate):
    """Adam (ANNA), or AdamW with WEIGHT_DECAY (default DEFAULT_WEIGHT_DECAY) when OPTIMIZER is ADAMW."""
    import keras

    if cfg.optimizer == "ADAMW":
        decay = DEFAULT_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
        return keras.optimizers.AdamW(learning_rate=learn_rate, weight_decay=decay)
    return keras.optimizers.Adam(learning_rate=learn_rate)


def make_train_steps(network, optimizer, spec, chunk_batches, batch_size, compiled_form):
    """``train_steps(chunk, first, count) -> (costs, parts)``: optimiser steps on batches first ..
    first+count-1 of a producer chunk (flux, labels, mask), each (chunk_batches, batch, ...).

    ``compiled_form`` "xla": ONE XLA-compiled call runs all the steps (a while loop), so leaving and entering
    Python is paid once per chunk; fastest for the tutorial network.  "xla_step": one XLA-compiled call per
    step: XLA's CPU code for convolutions with several channels inside a while loop ran a StarNet-shaped step
    about 7x slower than the same step compiled alone.  "graph": one graph call per step, no XLA (without XLA
    a graph while loop ran 1.4x slower on the tutorial network).  Which is fastest depends on the network and
    the machine: JIT_COMPILE AUTO times them (:func:`choose_compiled_form`).  ``costs`` is (chunk_batches,)
    with each step's squared-error cost (the reported cost, comparable with the xval cost); with a variance
    head ``parts`` holds the residual terms its bias refit needs (:func:`refit_variance_biases`), else None.
    """
    import keras
    import tensorflow as tf

    from anna.losses import masked_squared_error, robust_heteroscedastic

    nout = spec.nout
    heteroscedastic = spec.heteroscedastic
    if heteroscedastic:
        # the same layers, also returning the two parts of the predicted variance (for the bias refit)
        stepper = keras.Model(network.input, [network.outputs[0]] + [
            network.get_layer(name).output for name in ("log_variance_fit", "log_noise_gain",
                                                        "log_noise_variance")])

    def train_step(flux, labels, mask):
        with tf.GradientTape() as tape:
            if heteroscedastic:
                # The reported value is the mean of the dropout passes, which the dropout-free pass
                # approximates (weight scaling); the variance head is fitted, in that dropout-free pass, to
                # the residual of that value.  Fitted to a single dropout pass it would also learn the dropout
                # jitter, which sigma_model already counts, and its own jitter would bias sigma upwards.
                plain, log_var_fit, log_gain, log_noise_sq = stepper(flux, training=False)
                reported = tf.stop_gradient(plain[:, :nout])
                log_variance = plain[:, nout:]
            out = network(flux, training=True)
            cost = masked_squared_error(labels, out[:, :nout], mask)
            if heteroscedastic:
                # robust (astroNN) loss: labels weighted by the predicted inverse variance ...
                loss = (robust_heteroscedastic(labels, out[:, :nout], tf.stop_gradient(log_variance), mask)
                        # ... plus the variance head fitted to the residual of the reported value
                        + robust_heteroscedastic(labels, reported, log_variance, mask))
            else:
                loss = cost
        grads = tape.gradient(loss, network.trainable_variables)
        optimizer.apply_gradients(zip(grads, network.trainable_variables))
        if heteroscedastic:
            parts = tf.stack([tf.square(labels - reported) * mask, tf.exp(log_var_fit),
                              tf.exp(log_gain + log_noise_sq), mask])
            return cost, parts
        return cost, None

    def batch_at(flux, labels, mask, index):
        """Batch ``index`` of a chunk.  A gather, not ``flux[index]``: XLA compiled the strided slice with a
        run-time index so that a StarNet-shaped step at 7214 px ran 3.4x slower than on the batch passed alone
        (130 against 450 ex/s on 2 cores); the gather runs as fast as the batch passed alone."""
        return tf.gather(flux, index), tf.gather(labels, index), tf.gather(mask, index)

    part_shape = [4, batch_size, nout]

    @tf.function(jit_compile=True, autograph=False)
    def compiled_steps(flux, labels, mask, first, count):
        def body(index, costs, parts):
            cost, step_parts = train_step(*batch_at(flux, labels, mask, index))
            costs = tf.tensor_scatter_nd_update(costs, [[index - first]], [cost])
            if heteroscedastic:
                parts = tf.tensor_scatter_nd_update(parts, [[index - first]], [step_parts])
            return index + 1, costs, parts

        parts = tf.zeros([chunk_batches] + part_shape if heteroscedastic else [1])
        _, costs, parts = tf.while_loop(lambda index, costs, parts: index < first + count, body,
                                        [first, tf.zeros([chunk_batches]), parts])
        return costs, parts

    @tf.function(autograph=False)
    def graph_step(flux, labels, mask, index):
        return train_step(*batch_at(flux, labels, mask, index))

    @tf.function(jit_compile=True, autograph=False)
    def xla_step(flux, labels, mask, index):
        return train_step(*batch_at(flux, labels, mask, index))

    one_step = xla_step if compiled_form == "xla_step" else graph_step

    constants = {}

    def as_tensor(value):  # one constant per distinct int, so the function is not retraced per value
        if value not in constants:
            constants[value] = tf.constant(value, dtype=tf.int32)
        return constants[value]

    def train_steps(chunk, first, count):
        if compiled_form == "xla":
            return compiled_steps(*chunk, as_tensor(first), as_tensor(count))
        results = [one_step(*chunk, as_tensor(index)) for index in range(first, first + count)]
        costs = tf.concat([tf.stack([cost for cost, _ in results]), tf.zeros([chunk_batches - count])], 0)
        parts = (tf.concat([tf.stack([p for _, p in results]), tf.zeros([chunk_batches - count] + part_shape)], 0)
                 if heteroscedastic else None)
        return costs, parts

    return train_steps


COMPILED_FORMS = ("xla", "xla_step", "graph")
FORM_NAMES = {"xla": "XLA, one compiled call per chunk of steps", "xla_step": "XLA, one compiled call per step",
              "graph": "graph, one call per step, no XLA"}
# The forms JIT_COMPILE may choose from: AUTO all, YES the XLA ones, NO the plain graph.
FORMS_OF_SETTING = {"AUTO": COMPILED_FORMS, "YES": ("xla", "xla_step"), "NO": ("graph",)}


def compiled_form_cache_path():
    """Where JIT_COMPILE AUTO remembers its choices: $ANNA_TF_CACHE_DIR, else ~/.cache/anna-tf."""
    folder = os.environ.get("ANNA_TF_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "anna-tf")
    return os.path.join(folder, "compiled-forms.json")


def _machine_description():
    import platform

    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU"))}


# Raised whenever the code of a compiled form changes its speed, so that AUTO times again rather than reuse a
# choice made for the old code.  2: the per-step forms gather their batch (see make_train_steps).
COMPILED_FORMS_REVISION = 2


def compiled_form_key(spec, batch_size, chunk_batches, keep_prob, candidates=COMPILED_FORMS):
    """The cache key of a choice: the network, the batch shape, dropout on/off, the forms timed, their code's
    revision, the machine."""
    return json.dumps({"network": spec.to_dict(), "batch": int(batch_size), "chunk": int(chunk_batches),
                       "dropout": keep_prob < 1.0, "forms": list(candidates), "revision": COMPILED_FORMS_REVISION,
                       "machine": _machine_description()}, sort_keys=True)


def time_compiled_form(form, spec, centre, chunk, batch_size, keep_prob, seconds=TRIAL_SECONDS):
    """Examples/s of ``form`` on a throwaway copy of the network (the run's own network, optimiser and random
    state are not touched), over at least ``seconds`` after one warm-up call that compiles; (rate, error)."""
    import keras
    import tensorflow as tf

    from anna.model import build_network

    chunk_batches = int(chunk[0].shape[0])
    try:
        network = build_network(spec, dropout_rate=1.0 - keep_prob, centre=centre, compiled_form=form)
        optimizer = keras.optimizers.Adam(learning_rate=1e-12)
        optimizer.build(network.trainable_variables)
        steps = make_train_steps(network, optimizer, spec, chunk_batches, batch_size, form)
        steps(chunk, 0, 1)[0].numpy()  # compiles (the step count is a tensor: one compilation serves all)
        per_call = min(chunk_batches, TRIAL_STEPS_PER_CALL)
        done, start = 0, time.perf_counter()
        while True:
            costs, _ = steps(chunk, 0, per_call)
            costs.numpy()
            done += per_call
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and done >= 2 * per_call:
                return done * batch_size / elapsed, None
    except (tf.errors.OpError, ValueError, RuntimeError, TypeError) as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def choose_compiled_form(setting, spec, centre, chunk, batch_size, keep_prob, cache_path=None, report=print,
                         trial_seconds=TRIAL_SECONDS):
    """The compiled form of the training steps and how it was chosen (a dict for the frozen model).

    JIT_COMPILE NO pins "graph"; YES times the two XLA forms ("xla", "xla_step"), AUTO all three
    (:data:`FORMS_OF_SETTING`), each on a throwaway copy of the network (:func:`time_compiled_form`), and keeps
    the fastest; a form that fails to compile or run is skipped.  The choice is remembered per network, batch
    shape, forms and machine in ``cache_path`` (:func:`compiled_form_cache_path`), so a repeated run uses the
    same form without timing again: forms round differently, and with SEED a run must repeat bit for bit.
    """
    candidates = FORMS_OF_SETTING[setting]
    if len(candidates) == 1:
        return {"setting": setting, "form": candidates[0], "source": "JIT_COMPILE"}
    chunk_batches = int(chunk[0].shape[0])
    key = compiled_form_key(spec, batch_size, chunk_batches, keep_prob, candidates)
    cache_path = cache_path or compiled_form_cache_path()
    cache = _read_json(cache_path)
    if key in cache and cache[key].get("form") in COMPILED_FORMS:
        entry = cache[key]
        report(f"JIT_COMPILE {setting}: {FORM_NAMES[entry['form']]}, as timed on this machine on {entry['when']} "
               f"({_rates_text(entry['rates'])}; remembered in {cache_path})")
        return {"setting": setting, "form": entry["form"], "source": "cache", "rates": entry["rates"],
                "timed_utc": entry["when"]}
    rates, errors = {}, {}
    for form in candidates:
        rate, error = time_compiled_form(form, spec, centre, chunk, batch_size, keep_prob, trial_seconds)
        if rate is not None:
            rates[form] = rate
        else:
            errors[form] = error
    if not rates:
        raise AnnaInputError("neither compiled form of the training step runs on this machine ("
                             + "; ".join(f"{form}: {error}" for form, error in errors.items()) + ")",
                             key="JIT_COMPILE")
    form = max(rates, key=rates.get)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    skipped = "".join(f"; {form_} failed ({error})" for form_, error in errors.items())
    report(f"JIT_COMPILE {setting}: {FORM_NAMES[form]} ({_rates_text(rates)}, timed over {trial_seconds:g} s each"
           f"{skipped})")
    cache[key] = {"form": form, "rates": rates, "when": when}
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with atomic_output(cache_path, "w") as handle:
            json.dump(cache, handle, indent=1)
    except OSError as error:
        report(f"JIT_COMPILE {setting}: could not remember the choice in {cache_path} ({error.strerror or error}); "
               f"later runs will time again")
    return {"setting": setting, "form": form, "source": "timed", "rates": rates, "timed_utc": when,
            "failed": errors}


def _rates_text(rates):
    return ", ".join(f"{form} {rate:,.0f} ex/s" for form, rate in sorted(rates.items(), key=lambda kv: -kv[1]))


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a stop happens between batches, never mid-write."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self):
        return self.signal_name is not None


def fit_variance_scales(squared_residual, components, mask, iterations=300):
    """Maximum-likelihood scale factors of variance components, per label.

    The variance of a residual d is modelled as v = Σ_c s_c·V_c with known per-star components V_c ≥ 0
    (``components``: (C, n, nout)) and unknown scales s_c ≥ 0.  The Gaussian negative log-likelihood
    ½Σ(d²/v + ln v) (the robust loss) is minimised by the classic fixed-point iteration for variance
    components, s_c ← s_c·Σ(V_c d²/v²)/Σ(V_c/v), which keeps every scale positive and converges to a
    stationary point.  ``squared_residual`` and ``mask`` are (n, nout); absent labels (mask 0) are ignored.
    Returns (C, nout) scales; labels without present values, or with all d² = 0, keep scale 1.
    """
    d2 = np.asarray(squared_residual, dtype=np.float64)
    components = np.asarray(components, dtype=np.float64)
    present = np.asarray(mask) > 0
    scales = np.ones(components.shape[0:1] + d2.shape[1:])
    for k in range(d2.shape[1]):
        rows = present[:, k]
        if not rows.any() or not (d2[rows, k] > 0).any():
            continue
        parts = components[:, rows, k]
        target = d2[rows, k]
        scale = np.ones(parts.shape[0])
        for _ in range(iterations):
            variance = np.maximum(scale @ parts, 1e-300)
            step = (parts * target / variance**2).sum(axis=1) / np.maximum((parts / variance).sum(axis=1), 1e-300)
            scale = np.clip(scale * step, np.exp(-40.0), np.exp(40.0))
        scales[:, k] = scale
    return scales


def shift_variance_biases(network, log_scales):
    """Add ``log_scales`` (2, nout) to the biases of the misfit and noise parts of the variance head."""
    from anna.losses import LOG_VARIANCE_MAX, LOG_VARIANCE_MIN

    for row, name in enumerate(("log_variance_fit", "log_noise_gain")):
        bias = network.get_layer(name).bias
        bias.assign(np.clip(bias.numpy() + log_scales[row], LOG_VARIANCE_MIN, LOG_VARIANCE_MAX).astype(np.float32))


def refit_variance_biases(network, squared_residual, fit_variance, noise_variance, mask):
    """Move the variance head's two biases per label to their maximum-likelihood values for recent residuals.

    The head predicts, for label k, σ²_pred = F + N: a misfit part F = e^(fit) and a noise part
    N = e^(gain)·noise² (:func:`anna.model.build_network`).  With the network fixed, the robust loss
    ½(d²/v + ln v) is minimised over scale factors of F and N (:func:`fit_variance_scales`) and the biases
    move by their logarithms.  Why: the gradient points the same way, but Adam moves a weight by about one
    learning rate per step, so at ANNA's rates (1e-4 .. 1e-6) a bias could travel only a fraction of the
    several units of ln σ² between a starting guess and the precision the network reaches.  The kernels, which
    make σ depend on the spectrum, keep learning by gradient.

    Arrays are (n, nout), normalised label units, from one SAMPLE_INTERVAL of the training stream:
    ``squared_residual`` d² of the dropout-free value, F and N at the current biases, ``mask`` (1 = present).
    Returns the (2, nout) bias shifts applied.
    """
    shifts = np.log(fit_variance_scales(squared_residual, np.stack([fit_variance, noise_variance]), mask))
    shift_variance_biases(network, shifts)
    return shifts


def variance_parts(network, flux, batch_size=XVAL_EVAL_BATCH):
    """(F, N) of :func:`refit_variance_biases` for (n, npix) flux from the dropout-free pass, float64."""
    import keras

    probe = keras.Model(network.input, [network.get_layer(name).output for name in
                                         ("log_variance_fit", "log_noise_gain", "log_noise_variance")])
    fit, noise = [], []
    for start in range(0, len(flux), batch_size):
        log_fit, log_gain, log_noise_sq = (np.asarray(v, dtype=np.float64) for v in
                                           probe(np.asarray(flux[start:start + batch_size], np.float32),
                                                 training=False))
        fit.append(np.exp(log_fit))
        noise.append(np.exp(log_gain + log_noise_sq))
    return np.concatenate(fit), np.concatenate(noise)


def calibrate_variance_head(network, spec, flux, labels, mask, samples):
    """Final maximum-likelihood calibration of σ_total on held-out spectra; returns a summary dict.

    The reported value is the mean of ``samples`` dropout passes and σ²_total = κ·σ²_dropout + F + N, with
    σ²_dropout the spread of the passes and F, N the variance head's misfit and noise parts.  During training
    the head learns from the dropout-free pass; here the scales of all three components are fitted together
    (:func:`fit_variance_scales`) to the residuals of the reported value on ``flux`` (n, npix) with
    normalised ``labels`` and ``mask`` (n, nout).  κ is the model-precision hyperparameter of dropout
    variational inference (Gal & Ghahramani 2016 tune it on validation likelihood): the raw dropout spread of a
    fixed dropout rate is not calibrated and, for small networks, exceeds the real error of the averaged
    prediction.  The head's scales move into its biases; κ (per label) is returned as ``model_variance_scale``
    for the frozen model.  Residuals are in normalised label units.
    """
    from anna.model import compile_mc_forward, mc_moments

    forward = compile_mc_forward(network, spec, int(samples))
    mean, var_model, var_pred_before = mc_moments(forward, flux, spec.nout, samples)
    squared = np.where(mask > 0, np.square(labels - mean), 0.0)
    fit, noise = variance_parts(network, flux)
    scales = fit_variance_scales(squared, np.stack([fit, noise, var_model]), mask)
    shift_variance_biases(network, np.log(scales[:2]))
    kappa = scales[2]
    present = mask > 0

    def mean_chi2(variance, k):
        return float(np.mean(squared[present[:, k], k] / variance[present[:, k], k]))

    after = kappa * var_model + scales[0] * fit + scales[1] * noise
    return {"n": int(flux.shape[0]), "samples": int(samples), "model_variance_scale": kappa.tolist(),
            "misfit_scale": scales[0].tolist(), "noise_scale": scales[1].tolist(),
            "median_sigma_dropout": np.median(np.sqrt(var_model), axis=0).tolist(),
            "median_sigma_total": np.median(np.sqrt(after), axis=0).tolist(),
            "mean_chi2_before": [mean_chi2(var_model + var_pred_before, k) for k in range(spec.nout)],
            "mean_chi2_after": [mean_chi2(after, k) for k in range(spec.nout)]}


def configure_threads():
    """Use every core for the maths ops and two inter-op threads (the producer and the training step).

    Must run before TensorFlow starts its runtime; later calls (tests in one process) are harmless no-ops.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 1)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass


def training_fingerprint(cfg):
    """Parameters that decide what training computes; a checkpoint is resumed only when they are unchanged."""
    from anna.params import resume_neutral_keys

    neutral = resume_neutral_keys()
    return {key: value for key, value in cfg.as_dict().items() if key not in neutral}


class _XvalSet:
    """The cross-validation set, built once: float32 flux (noised once, fixed seed) and normalised labels."""

    def __init__(self, flux, labels, mask):
        self.flux, self.labels, self.mask = flux, labels, mask


def _load_xval(cfg, pack, scaler, noise, seed, missing_value):
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
    mask = _label_mask(labels, missing_value)
    normalised = np.where(mask, scaler.normalise(np.where(mask, labels, 0.0)), 0.0)
    return _XvalSet(flux.astype(np.float32), normalised.astype(np.float32), mask.astype(np.float32))


def _label_mask(labels, missing_value):
    mask = np.isfinite(labels)
    if missing_value is not None:
        mask &= labels != missing_value
    return mask


def _mean_spectrum(pack):
    total = np.zeros(pack.npix, dtype=np.float64)
    for _, _, _, flux in pack.iter_blocks():
        total += flux.sum(axis=0)
    return total / pack.n_stars


class _Progress:
    """Progress bar with iterations/s and ETA on a terminal; plain lines (one per interval) otherwise."""

    def __init__(self, report, total, stage, stream=None):
        self.report = report
        self.total = total
        self.stage = stage
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def tick(self, iteration):
        if not self.tty:
            return
        elapsed = time.perf_counter() - self.start
        rate = iteration / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * iteration / max(self.total, 1))
        self.stream.write(f"\rstage {self.stage} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{iteration}/{self.total} {rate:6.1f} it/s ETA {eta:5.0f}s ")
        self.stream.flush()

    def line(self, text):
        if self.tty:
            self.stream.write("\r" + " " * 79 + "\r")
        self.report(text)


class Trainer:
    """Holds one training run's state; :func:`run_training` is the entry point."""

    def __init__(self, cfg, report=print):
        import tensorflow as tf

        from anna.augment import NoiseModel, PackRows
        from anna.model import LabelScaler, NetworkSpec
        from anna.packs import open_pack
        from anna.templates import relative_sn_on_grid

        self.cfg = cfg
        self.report = report
        self.tf = tf
        self.missing_value = cfg.magic_number
        self.pack = open_pack(cfg.training_data, expected_npix=cfg.num_px, expected_nout=cfg.num_outs,
                              check_flux=True, missing_label_value=self.missing_value)
        self.scaler = LabelScaler(cfg.min_params, cfg.max_params)
        self.noise = None
        needs_template = cfg.preprocess_train or (cfg.training_xval and cfg.preprocess_xval)
        self.rel_sn = relative_sn_on_grid(cfg.sn_template, self.pack.wavelengths) if needs_template else None
        if cfg.preprocess_train:
            self.noise = NoiseModel(self.rel_sn, tuple(cfg.sn_range_train), tuple(cfg.rel_cont_e_train))
        self.save_loc = cfg.save_loc
        os.makedirs(self.save_loc, exist_ok=True)
        self.checkpoint_path = os.path.join(self.save_loc, CHECKPOINT_NAME)
        self.state = self._initial_or_resumed_state()
        self.seed = self.state["seed"]
        self._seed_everything()
        xval_noise = NoiseModel(self.rel_sn, tuple(cfg.sn_range_train), tuple(cfg.rel_cont_e_train)) \
            if (cfg.training_xval and cfg.preprocess_xval) else None
        self.xval = _load_xval(cfg, self.pack, self.scaler, xval_noise, self.seed, self.missing_value) \
            if cfg.training_xval else None
        self.rows = PackRows(self.pack)
        self.spec = NetworkSpec.from_config(cfg, self.pack.npix, self.pack.nout)
        self.centre = _mean_spectrum(self.pack) if cfg.input_centering == "MEAN" else None
        self.writer = None
        self.run_dir = None
        self._probe_for, self._probe = None, None  # activation probe model, cached per network
        self._checkpoint_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                      thread_name_prefix="checkpoint")
        self._checkpoint_job = None
        if cfg.tboard_output or cfg.timeline_output:
            self.run_dir = self.state.setdefault("run_dir", os.path.join(
                cfg.log_loc, time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())))
            os.makedirs(self.run_dir, exist_ok=True)
            if cfg.tboard_output:
                self.writer = tf.summary.create_file_writer(self.run_dir)
        self.global_step = self.state.get("global_step", 0)
        self.history = self.state.setdefault("history", [])

    # ----- set-up -----------------------------------------------------------------------------------------
    def _initial_or_resumed_state(self):
        fingerprint = training_fingerprint(self.cfg)
        if self.cfg.resume and os.path.exists(self.checkpoint_path):
            state, arrays = read_checkpoint(self.checkpoint_path)
            if state["fingerprint"] != fingerprint:
                changed = sorted(k for k in set(fingerprint) | set(state["fingerprint"])
                                 if fingerprint.get(k) != state["fingerprint"].get(k))
                raise AnnaInputError(
                    f"a checkpoint of an unfinished run made with different parameters ({', '.join(changed)}) "
                    "is in SAVE_LOC; restore those values to resume, or delete it / set RESUME: NO to start over",
                    path=self.checkpoint_path)
            state["arrays"] = arrays
            state["resumed"] = True
            self.report(f"resuming from {self.checkpoint_path}: stage {state['stage_index'] + 1}, "
                        f"iteration {state['iteration']}")
            return state
        seed = self.cfg.seed if self.cfg.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
        return {"fingerprint": fingerprint, "seed": int(seed), "stage_index": 0, "iteration": 0,
                "global_step": 0, "history": [], "resumed": False, "arrays": None}

    def _seed_everything(self):
        import keras

        keras.utils.set_random_seed(self.seed)
        if self.cfg.seed is not None:
            self.tf.config.experimental.enable_op_determinism()

    # ----- evaluation -------------------------------------------------------------------------------------
    def _make_eval(self, network):
        tf = self.tf
        nout = self.spec.nout

        @tf.function(input_signature=[tf.TensorSpec([None, self.spec.npix], tf.float32)], reduce_retracing=True,
                     autograph=False)
        def forward(flux):
            return network(flux, training=False)[:, :nout]

        def evaluate(flux, labels, mask):
            """(cost, per-label RMS in physical units) over a whole set, in batches."""
            sq_sum = np.zeros(nout)
            counts = np.zeros(nout)
            per_star_cost = []
            for start in range(0, len(flux), XVAL_EVAL_BATCH):
                pred = forward(flux[start:start + XVAL_EVAL_BATCH]).numpy().astype(np.float64)
                m = mask[start:start + XVAL_EVAL_BATCH]
                d2 = np.square(pred - labels[start:start + XVAL_EVAL_BATCH]) * m
                sq_sum += d2.sum(axis=0)
                counts += m.sum(axis=0)
                present = m.sum(axis=1)
                per_star_cost.append((d2.sum(axis=1) / np.maximum(present, 1))[present > 0])
            cost = float(np.mean(np.concatenate(per_star_cost))) if per_star_cost else math.nan
            rms = np.sqrt(sq_sum / np.maximum(counts, 1)) * self.scaler.span
            return cost, rms

        return evaluate

    # ----- the loop ---------------------------------------------------------------------------------------
    def run(self):
        from anna.augment import BatchProducer
        from anna.model import build_network

        cfg = self.cfg
        plans = stage_plans(cfg)
        arrays = self.state.pop("arrays")
        previous_weights = None
        if arrays is not None:
            previous_weights = arrays.get("stage_start_weights")
        stage_results = self.state.setdefault("stage_results", [])
        self.compiled = self.state.get("compiled") or self._choose_compiled_form(plans[0])
        self.state["compiled"] = self.compiled
        interrupted = None
        with StopRequest() as stop:
            for stage_index in range(self.state["stage_index"], len(plans)):
                plan = plans[stage_index]
                network = build_network(self.spec, dropout_rate=1.0 - plan.keep_prob, centre=self.centre,
                                        compiled_form=self.compiled["form"])
                resuming_here = arrays is not None and stage_index == self.state["stage_index"]
                if resuming_here:
                    network.set_weights(arrays["weights"])
                elif previous_weights is not None:
                    network.set_weights(previous_weights)
                stage_start_weights = [np.array(w) for w in network.get_weights()]
                optimizer = make_optimizer(cfg, plan.learn_rate)
                optimizer.build(network.trainable_variables)
                stopper = EarlyStopping(cfg.es_sample, enabled=cfg.early_stop)
                schedule = stage_schedule(cfg, plan)
                start_iteration, elapsed_before = 0, 0.0
                if resuming_here:
                    for variable, value in zip(optimizer.variables, arrays["optimizer"]):
                        variable.assign(value)
                    stage_start_weights = arrays["stage_start_weights"]
                    es = self.state["early_stopping"]
                    stopper.best_cost = es["best_cost"]
                    stopper.best_iteration = es["best_iteration"]
                    stopper.bad_intervals = es["bad_intervals"]
                    stopper.best_weights = arrays.get("best_weights")
                    schedule.restore(self.state["schedule"])
                    start_iteration = self.state["iteration"]
                    elapsed_before = float(self.state.get("stage_elapsed", 0.0))
                    arrays = None
                result = self._run_stage(plan, network, optimizer, stopper, schedule, start_iteration,
                                         elapsed_before, stage_start_weights, stage_index, stop, BatchProducer,
                                         final_stage=stage_index == len(plans) - 1)
                stage_results.append(result)
                if stopper.best_weights is not None:
                    network.set_weights(stopper.best_weights)
                previous_weights = [np.array(w) for w in network.get_weights()]
                self.network = network
                if stop.requested:
                    interrupted = stop.signal_name
                    break
        if interrupted is None:
            self._describe_for_inference()
        return self._finish(stage_results, interrupted)

    def _choose_compiled_form(self, plan):
        """JIT_COMPILE: the compiled form of the training steps (timed on a throwaway network unless NO).  The
        trial draws from the random state, so the run's seeds are set again afterwards: whether a trial ran or
        the choice came from the cache, training starts from the same state."""
        from anna.augment import BatchProducer

        chunk = None  # only a timing needs one: a single candidate form is returned without it
        if len(FORMS_OF_SETTING[self.cfg.jit_compile]) > 1:
            producer = BatchProducer(self.rows, self.scaler, None, batch_size=plan.batch_size, seed=self.seed,
                                     stage=0, threads=1, fetch=self.cfg.num_fetch, depth=self.cfg.num_fetch,
                                     missing_value=self.missing_value)
            chunk = next(iter(producer.chunk_dataset(0, prefetch=False)))
        compiled = choose_compiled_form(self.cfg.jit_compile, self.spec, self.centre, chunk, plan.batch_size,
                                        plan.keep_prob, report=self.report)
        self._seed_everything()
        return compiled

    def _training_sample(self, count=DOMAIN_SAMPLE):
        """Up to ``count`` training spectra (fixed seed), noised as in training; (flux, normalised labels, mask)."""
        from anna.augment import noisy_copy

        rng = np.random.default_rng((self.seed, 104729))
        n = min(count, self.pack.n_stars)
        indices = np.sort(rng.choice(self.pack.n_stars, size=n, replace=False))
        flux, labels = self.rows.gather(indices)
        flux = np.asarray(flux, dtype=np.float64)
        if self.noise is not None:
            flux, _ = noisy_copy(flux, self.noise.rel_sn, self.noise.sn_range, self.noise.cont_range,
                                 seed=(self.seed, 104729))
        mask = _label_mask(labels, self.missing_value)
        normalised = np.where(mask, self.scaler.normalise(np.where(mask, labels, 0.0)), 0.0)
        return flux, normalised, mask.astype(np.float64)

    def _describe_for_inference(self):
        """After training: training-domain statistics and, with MC_DROPOUT, the final variance calibration."""
        from anna.domain import training_domain_statistics

        flux, labels, mask = self._training_sample()
        self.training_domain = training_domain_statistics(flux)
        if self.spec.heteroscedastic:
            if self.xval is not None:  # held-out spectra, noised like the training ones
                flux, labels, mask = self.xval.flux, self.xval.labels, self.xval.mask
                source = "cross-validation set"
            else:
                source = "training sample"
            self.variance_calibration = calibrate_variance_head(self.network, self.spec, flux, labels, mask,
                                                                self.cfg.mc_samples)
            self.variance_calibration["set"] = source
            ratio = ", ".join(f"{name} {before:.3g} -> {after:.3g}" for name, before, after in zip(
                self.cfg.output_names, self.variance_calibration["mean_chi2_before"],
                self.variance_calibration["mean_chi2_after"]))
            self.report(f"variance head calibrated on the {source} ({len(flux)} spectra, "
                        f"{self.cfg.mc_samples} MC passes): mean d^2/sigma_total^2 {ratio}")

    def _run_stage(self, plan, network, optimizer, stopper, schedule, start_iteration, elapsed_before,
                   stage_start_weights, stage_index, stop, producer_class, final_stage):
        tf = self.tf
        cfg = self.cfg
        nout = self.spec.nout
        heteroscedastic = self.spec.heteroscedastic
        evaluate = self._make_eval(network)
        producer = producer_class(self.rows, self.scaler, self.noise, batch_size=plan.batch_size,
                                  seed=self.seed, stage=plan.number, threads=cfg.pp_threads, fetch=cfg.num_fetch,
                                  depth=cfg.max_pp_depth, missing_value=self.missing_value)
        chunk_batches = producer.batches_per_chunk
        train_steps = make_train_steps(network, optimizer, self.spec, chunk_batches, plan.batch_size,
                                       self.compiled["form"])
        first_chunk, offset = divmod(start_iteration, chunk_batches)
        chunks = iter(producer.chunk_dataset(first_chunk))
        chunk = None
        progress = _Progress(self.report, plan.iterations, plan.number)
        limit = f", at most {plan.max_seconds / 60:g} min" if plan.max_seconds else ""
        progress.line(f"stage {plan.number}: learning rate {plan.learn_rate:g} ({cfg.lr_schedule.lower()}), "
                      f"batch {plan.batch_size}, keep probability {plan.keep_prob:g}, up to {plan.iterations} "
                      f"iterations{limit}" + (f" (resuming at {start_iteration})" if start_iteration else ""))
        if stopper.best_weights is None and self.xval is not None and start_iteration == 0:
            cost, _ = evaluate(self.xval.flux, self.xval.labels, self.xval.mask)
            stopper.update(cost, 0, network.get_weights())
            stopper.bad_intervals = 0
        interval_costs = []
        interval_residuals = []
        stage_clock = time.perf_counter() - elapsed_before  # elapsed = perf_counter() - stage_clock
        interval_start = wall_mark = time.perf_counter()
        wait_time = 0.0
        iteration = start_iteration
        profiling = False
        stopped_by = "iterations"
        trace_graph = self.writer is not None and self.global_step == 0
        rate = None
        while iteration < plan.iterations:
            if stop.requested:
                stopped_by = stop.signal_name
                break
            if cfg.timeline_output and not profiling and final_stage and iteration % cfg.sample_interval == 0:
                last_planned = iteration + cfg.sample_interval >= plan.iterations
                maybe_last = cfg.early_stop and stopper.bad_intervals >= cfg.es_sample - 1
                if last_planned or maybe_last:
                    self._start_profile()
                    profiling = True
            if chunk is None or offset == chunk_batches:
                fetched = time.perf_counter()
                chunk = next(chunks)
                wait_time += time.perf_counter() - fetched
                offset = offset % chunk_batches
            # up to the end of the chunk, the end of the SAMPLE_INTERVAL and the end of the stage
            count = min(chunk_batches - offset, plan.iterations - iteration,
                        cfg.sample_interval - iteration % cfg.sample_interval)
            new_rate = schedule.rate(iteration, time.perf_counter() - stage_clock)
            if new_rate != rate:
                optimizer.learning_rate.assign(new_rate)
                rate = new_rate
            if trace_graph:
                tf.summary.trace_on(graph=True)
            costs, parts = train_steps(chunk, offset, count)
            if trace_graph:
                with self.writer.as_default():
                    tf.summary.trace_export(name="train_step", step=0)
                trace_graph = False
            interval_costs.append((costs, count))
            if heteroscedastic:
                interval_residuals.append((parts, count))
            ticks_before = iteration // 10
            iteration += count
            offset += count
            self.global_step += count
            if iteration // 10 != ticks_before:
                progress.tick(iteration)
            out_of_time = plan.max_seconds is not None and time.perf_counter() - stage_clock >= plan.max_seconds
            if iteration % cfg.sample_interval == 0 or iteration == plan.iterations or out_of_time:
                batch_cost = float(np.mean(np.concatenate([c.numpy()[:n] for c, n in interval_costs])))
                steps = sum(n for _, n in interval_costs)
                now = time.perf_counter()
                # the headline rate counts the whole interval, the last one's evaluation, logging and
                # checkpoint included; the step rate stops the clock around them
                examples_per_s = steps * plan.batch_size / max(now - wall_mark, 1e-9)
                step_examples_per_s = steps * plan.batch_size / max(now - interval_start, 1e-9)
                wait_fraction = wait_time / max(now - interval_start, 1e-9)
                wall_mark = now
                if profiling:
                    tf.profiler.experimental.stop()
                    profiling = False
                if heteroscedastic:
                    # (steps, 4, batch, nout) per call -> (4, all examples of the interval, nout)
                    residuals = np.concatenate([np.moveaxis(p.numpy()[:n], 0, 1).reshape(4, -1, nout)
                                                for p, n in interval_residuals], axis=1)
                    refit_variance_biases(network, *residuals)
                if self.xval is not None:
                    xval_cost, rms = evaluate(self.xval.flux, self.xval.labels, self.xval.mask)
                    monitored = xval_cost
                else:
                    last_flux, last_labels, last_mask = (t[offset - 1] for t in chunk)
                    xval_cost, rms = None, self._batch_rms(evaluate, last_flux, last_labels, last_mask)
                    monitored = batch_cost
                improved = stopper.update(monitored, iteration, network.get_weights())
                record = {"stage": plan.number, "iteration": iteration, "global_step": self.global_step,
                          "batch_cost": batch_cost, "xval_cost": xval_cost,
                          "rms": {n: float(r) for n, r in zip(self.cfg.output_names, rms)},
                          "learning_rate": rate, "examples_per_s": examples_per_s,
                          "step_examples_per_s": step_examples_per_s, "input_wait_fraction": wait_fraction,
                          "elapsed_s": now - stage_clock}
                self.history.append(record)
                cut = schedule.after_interval(improved, iteration)
                last = iteration >= plan.iterations or stopper.should_stop or stop.requested or out_of_time
                self._log_interval(record, network, histograms=last or len(self.history) % HISTOGRAM_EVERY == 1)
                progress.line(self._format_record(record, improved))
                if cut is not None:
                    progress.line(f"stage {plan.number}: no improvement in {cfg.lr_patience} intervals; learning "
                                  f"rate cut to {cut:.3g}")
                interval_costs = []
                interval_residuals = []
                wait_time = 0.0
                self._write_checkpoint(stage_index, iteration, network, optimizer, stopper, schedule,
                                       time.perf_counter() - stage_clock, stage_start_weights)
                interval_start = time.perf_counter()
                if stopper.should_stop:
                    stopped_by = "early_stopping"
                    progress.line(f"stage {plan.number}: early stop at iteration {iteration}: no improvement in "
                                  f"{cfg.es_sample} intervals; restoring the best weights (iteration "
                                  f"{stopper.best_iteration}, cost {stopper.best_cost:.6g})")
                    break
                if out_of_time and iteration < plan.iterations:
                    stopped_by = "time_limit"
                    progress.line(f"stage {plan.number}: time limit of {plan.max_seconds / 60:g} min reached at "
                                  f"iteration {iteration}; restoring the best weights (iteration "
                                  f"{stopper.best_iteration}, cost {stopper.best_cost:.6g})")
                    break
        if profiling:
            tf.profiler.experimental.stop()
        return {"stage": plan.number, "iterations": iteration, "stopped_early": stopped_by == "early_stopping",
                "stopped_by": stopped_by, "best_cost": stopper.best_cost, "best_iteration": stopper.best_iteration,
                "monitored": "xval" if self.xval is not None else "batch",
                "seconds": time.perf_counter() - stage_clock, "learning_rate": {
                    "schedule": schedule.kind, "initial": plan.learn_rate, "final": rate, "cuts": schedule.cuts}}


    def _batch_rms(self, evaluate, flux, labels, mask):
        _, rms = evaluate(flux.numpy(), labels.numpy(), mask.numpy())
        return rms

    def _format_record(self, record, improved):
        rms = " ".join(f"{name}={value:.4g}" for name, value in record["rms"].items())
        xval = f" xval cost {record['xval_cost']:.6g}" if record["xval_cost"] is not None else ""
        rate = f" | lr {record['learning_rate']:.3g}" if self.cfg.lr_schedule != "CONSTANT" else ""
        return (f"stage {record['stage']} iter {record['iteration']:>6}: batch cost {record['batch_cost']:.6g}"
                f"{xval}{' *' if improved else '  '} | RMS {rms}{rate} | {record['examples_per_s']:.0f} ex/s")

    def _log_interval(self, record, network, histograms):
        if self.writer is None:
            return
        tf = self.tf
        step = record["global_step"]
        with self.writer.as_default(step=step):
            tf.summary.scalar("cost/batch", record["batch_cost"])
            if record["xval_cost"] is not None:
                tf.summary.scalar("cost/xval", record["xval_cost"])
            for name, value in record["rms"].items():
                tf.summary.scalar(f"rms/{name}", value)
            tf.summary.scalar("learning_rate", record["learning_rate"])
            tf.summary.scalar("examples_per_second", record["examples_per_s"])
            tf.summary.scalar("step_examples_per_second", record["step_examples_per_s"])
            tf.summary.scalar("input_wait_fraction", record["input_wait_fraction"])
            if histograms:
                self._log_histograms(network)
        self.writer.flush()

    def _log_histograms(self, network):
        """Histograms of every weight and of the conv/dense activations on the first xval spectra (inside the
        caller's summary-writer context)."""
        for variable in network.weights:
            write_histogram(f"weights/{variable.path}", variable.numpy())
        if self.xval is not None:
            sample = self.xval.flux[:ACTIVATION_SAMPLE]
            for layer_name, activation in self._activations(network, sample):
                write_histogram(f"activations/{layer_name}", activation.numpy())

    def _activations(self, network, flux):
        """(layer name, activations) of the conv and dense layers for ``flux``; the probe model is built once
        per network (each stage builds its own network)."""
        import keras

        if self._probe_for is not network:
            names = [layer.name for layer in network.layers if layer.name.startswith(("conv", "fc"))]
            self._probe = (names, keras.Model(network.input, [network.get_layer(n).output for n in names]))
            self._probe_for = network
        names, probe = self._probe
        return zip(names, probe(flux, training=False))

    def _start_profile(self):
        tf = self.tf
        profile_root = os.path.join(self.run_dir, "plugins", "profile")
        if os.path.isdir(profile_root):
            shutil.rmtree(profile_root)  # keep only the latest interval's trace
        tf.profiler.experimental.start(self.run_dir)

    def _write_checkpoint(self, stage_index, iteration, network, optimizer, stopper, schedule, stage_elapsed,
                          stage_start_weights):
        state = {key: value for key, value in self.state.items() if key != "arrays"}
        state.update({"stage_index": stage_index, "iteration": iteration, "global_step": self.global_step,
                      "schedule": schedule.state(), "stage_elapsed": stage_elapsed,
                      "early_stopping": {"best_cost": stopper.best_cost, "best_iteration": stopper.best_iteration,
                                         "bad_intervals": stopper.bad_intervals}})
        arrays = {"weights": network.get_weights(), "optimizer": [v.numpy() for v in optimizer.variables],
                  "stage_start_weights": stage_start_weights}
        if stopper.best_weights is not None:
            arrays["best_weights"] = stopper.best_weights
        # snapshot now (the history keeps growing), write in the background: training does not wait on disk
        state_json = json.dumps(state, default=float)
        self._wait_for_checkpoint()
        self._checkpoint_job = self._checkpoint_pool.submit(write_checkpoint, self.checkpoint_path, state_json,
                                                            arrays)

    def _wait_for_checkpoint(self):
        """Block until the checkpoint being written (if any) is on disk; re-raise its error, if any."""
        if self._checkpoint_job is not None:
            job, self._checkpoint_job = self._checkpoint_job, None
            job.result()

    # ----- the end ----------------------------------------------------------------------------------------
    def _finish(self, stage_results, interrupted):
        from anna import model as model_module

        metadata = {
            "output_names": list(self.cfg.output_names),
            "min_params": list(self.cfg.min_params),
            "max_params": list(self.cfg.max_params),
            "wavelengths": self.pack.wavelengths.tolist(),
            "parameters": self.cfg.as_dict(),
            "parameter_file": self.cfg.source,
            "training_pack": {"path": self.pack.path, "sha256": file_sha256(self.pack.path),
                              "n_stars": self.pack.n_stars},
            "seed": self.seed,
            "stages": stage_results,
            "complete": interrupted is None,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # the final stage's dropout rate: the weights are tuned to it, so MC-dropout inference samples with it
            "mc_dropout_rate": 1.0 - stage_plans(self.cfg)[-1].keep_prob,
            "network_description": self.spec.description,
            "compiled_form": getattr(self, "compiled", None),
            "optimizer": {"name": self.cfg.optimizer, "weight_decay": (
                (DEFAULT_WEIGHT_DECAY if self.cfg.weight_decay is None else self.cfg.weight_decay)
                if self.cfg.optimizer == "ADAMW" else None)},
            "lr_schedule": {"kind": self.cfg.lr_schedule, "patience": self.cfg.lr_patience,
                            "factor": self.cfg.lr_factor, "minimum": self.cfg.lr_min,
                            "decay_start": self.cfg.lr_decay_start},
            "time_limits_minutes": [self.cfg.max_minutes1, self.cfg.max_minutes2],
            "training_domain": getattr(self, "training_domain", None),
            "variance_calibration": getattr(self, "variance_calibration", None),
        }
        final_path = os.path.join(self.save_loc, model_module.FROZEN_MODEL_NAME)
        target = final_path
        if interrupted is not None and _is_complete_model(final_path):
            target = os.path.join(self.save_loc, PARTIAL_MODEL_NAME)
        path = model_module.save_frozen(target, self.network, self.spec, metadata)
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        self._wait_for_checkpoint()
        self._checkpoint_pool.shutdown()
        if interrupted is None and os.path.exists(self.checkpoint_path):
            os.remove(self.checkpoint_path)
        if interrupted is not None:
            self.report(f"stopped by {interrupted}: the best weights so far are saved as a usable frozen model "
                        f"{path}; rerun the same command to resume from the checkpoint")
        else:
            self.report(f"frozen model written to {path}")
        if self.run_dir:
            self.report(f"TensorBoard logs in {self.run_dir}  (watch with: tensorboard --logdir {self.cfg.log_loc})")
        return {"frozen_model": path, "stages": stage_results, "interrupted": interrupted,
                "history": self.history, "run_dir": self.run_dir, "seed": self.seed}


def histogram_buckets(values, bucket_count=HISTOGRAM_BUCKETS):
    """(bucket_count, 3) float64 rows [left edge, right edge, count]: TensorBoard's histogram data, with its
    rules (equal-width buckets from min to max, the maximum in the last; a single value gives zero-width
    buckets with every count in the last; no values, all-zero rows).

    TensorBoard's own ``tf.summary.histogram`` counts through a one-hot matrix of values x buckets: for the
    1.3 M weights of FC1 that is 0.3 GB, and for conv1's activations 0.6 GB, which set anna-train's peak
    memory (benchmarks/, peak RSS row).  Counting with ``np.bincount`` needs no such matrix.
    """
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    buckets = np.zeros((bucket_count, 3))
    if data.size == 0 or bucket_count <= 0:
        return buckets
    low, high = float(data.min()), float(data.max())
    if high == low:
        buckets[:, :2] = high
        buckets[-1, 2] = data.size
        return buckets
    width = (high - low) / bucket_count
    index = np.minimum(np.floor((data - low) / width).astype(np.int64), bucket_count - 1)
    edges = np.linspace(low, high, bucket_count + 1)
    edges[-1] = high
    buckets[:, 0], buckets[:, 1] = edges[:-1], edges[1:]
    buckets[:, 2] = np.bincount(index, minlength=bucket_count)
    return buckets


def write_histogram(tag, values):
    """A TensorBoard histogram of ``values`` at the default summary step of the active writer."""
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata

    tf.summary.write(tag=tag, tensor=tf.constant(histogram_buckets(values)),
                     metadata=metadata.create_summary_metadata(display_name=None, description=None))


def _is_complete_model(path):
    if not os.path.exists(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(json.loads(archive.read("metadata.json")).get("complete", False))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return False


def write_checkpoint(path, state_json, arrays):
    """Checkpoint = ``state.json`` (already serialised) and one npz per list of arrays, in one file; atomic."""
    write_array_archive(path, {"state.json": state_json}, arrays)


def read_checkpoint(path):
    try:
        documents, arrays = read_array_archive(path)
        state = json.loads(documents["state.json"])
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise AnnaInputError(f"checkpoint is unreadable ({exc}); delete it or set RESUME: NO", path=path) from None
    return state, arrays


def run_training(cfg, report=print):
    """Train as the parameter file says; returns a summary dict (frozen model path, stages, history)."""
    configure_threads()
    trainer = Trainer(cfg, report)
    return trainer.run()
