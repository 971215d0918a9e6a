"""The compiled training step: one optimiser step of the network on a batch, in three compiled forms (XLA over
a chunk of steps, XLA per step, the plain graph), and JIT_COMPILE AUTO, which times them and keeps the
fastest for this network on this machine.
"""

import json
import time

from anna.errors import AnnaInputError
from anna.runtime import compiled_form_cache_path, machine_description, read_remembered, remember

# JIT_COMPILE AUTO: seconds each compiled form is timed for (after its compiling call).
TRIAL_SECONDS = 2.0
# ... in calls of at most this many steps, so that a slow form is measured without running whole chunks.
TRIAL_STEPS_PER_CALL = 3
# A form whose first timed step runs at under this fraction of the fastest form timed before it is not timed
# further: it cannot be chosen.  Before the training network's BandedConv1D, the chunk form of a StarNet-shaped
# network at 7214 px ran at 45 ex/s against 506 for XLA per step (Keras' Conv1D inside XLA's while loop), and
# its full trial took 13 s of anna-train's start-up; cut after one step it took 2 s.  Since then the graph form
# is that network's slowest (0.48-0.79x the XLA forms in four trials on 2026-12-02), cut when under the fraction.
TRIAL_GIVE_UP_FRACTION = 0.5
# The order the forms are timed in: the per-step forms first (each compiles one step), so that a chunk form
# much slower than they are (a network layer XLA compiles badly inside a while loop) is cut short against
# them.  Where the chunk form is the fastest (the tutorial network; the StarNet-shaped network since
# BandedConv1D) it is timed in full.
TRIAL_ORDER = ("xla_step", "graph", "xla")


def make_train_steps(network, optimizer, spec, chunk_batches, batch_size, compiled_form, distribution=None):
    """``train_steps(chunk, first, count) -> (costs, parts)``: optimiser steps on batches first ..
    first+count-1 of a producer chunk (flux, labels, mask), each (chunk_batches, batch, ...).

    ``compiled_form`` "xla": ONE XLA-compiled call runs all the steps (a while loop), so leaving and entering
    Python is paid once per chunk; fastest for the tutorial network, and for the StarNet-shaped network since
    its later convolutions are BandedConv1D (Keras' Conv1D with several input channels inside XLA's while loop
    ran the step about 10x slower than the same step compiled alone: benchmarks/layer_forms.py).  "xla_step":
    one XLA-compiled call per step.  "graph": one graph call per step, no XLA (without XLA
    a graph while loop ran 1.4x slower on the tutorial network).  Which is fastest depends on the network and
    the machine: JIT_COMPILE AUTO times them (:func:`choose_compiled_form`).  ``costs`` is (chunk_batches,)
    with each step's squared-error cost (the reported cost, comparable with the xval cost); with a variance
    head ``parts`` holds the residual terms its bias refit needs (:func:`refit_variance_biases`), else None.

    With a variance head a step takes the network's dropout-free pass (reported value, variance head) and a
    dropout pass (label loss) from one run of the layers before the first dropout
    (:func:`variance_head_parts`), and DER_SNR's noise term by selection (:func:`log_noise_variance`): the
    same losses and gradients as two whole passes.  Measured on 2 shared cores (benchmarks/rows_mc_training.py),
    the variance-head step cost 1.0-1.2x the plain step for the StarNet-shaped network at 7214 px (2.0-2.1x
    and 1.4-1.8x before, "xla_step" and "graph"), and for the tutorial network 1.2-1.3x with XLA (2.6-2.9x
    before) and 0.9-1.1x without (1.6-1.9x before; the graph runs the selection beside the convolutions).
    What remains is mostly the selection.
    """
    import tensorflow as tf

    if distribution is not None and distribution.distributed:
        return make_distributed_train_steps(network, optimizer, spec, chunk_batches, batch_size, distribution)
    nout = spec.nout
    heteroscedastic = spec.heteroscedastic
    train_step = _train_step_function(network, optimizer, spec)

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


def make_distributed_train_steps(network, optimizer, spec, chunk_batches, batch_size, distribution):
    """:func:`make_train_steps` under a ``tf.distribute`` strategy (DISTRIBUTE MIRRORED or MULTI_WORKER, see
    :mod:`anna.train.distribute`): the same ``train_steps(chunk, first, count) -> (costs, parts)``.

    ``batch_size`` is this worker's batch (the global batch over the workers).  One graph call per step: the
    batch is taken from the chunk once, each of this worker's replicas steps on its own slice of it with its loss
    divided by the number of replicas (the optimiser sums their gradients: the gradient of the global batch's
    mean), the cost is averaged over every replica, and the variance head's residual terms are gathered from
    every replica, so the refit that follows is the same on every worker.  No XLA here: the strategy's
    all-reduce sits between the gradient and the update.
    """
    import tensorflow as tf

    strategy = distribution.strategy
    local = distribution.local_replicas
    per_replica = batch_size // local
    heteroscedastic = spec.heteroscedastic
    train_step = _train_step_function(network, optimizer, spec,
                                      loss_scale=1.0 / strategy.num_replicas_in_sync)

    def replica_step(flux, labels, mask):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group % local
        first = replica * per_replica
        return train_step(flux[first:first + per_replica], labels[first:first + per_replica],
                          mask[first:first + per_replica])

    @tf.function(autograph=False)
    def distributed_step(flux, labels, mask, index):
        batch = tf.gather(flux, index), tf.gather(labels, index), tf.gather(mask, index)
        cost, parts = strategy.run(replica_step, args=batch)
        cost = strategy.reduce(tf.distribute.ReduceOp.MEAN, cost, axis=None)
        if heteroscedastic:
            parts = strategy.gather(parts, axis=1)  # (4, global batch, nout)
            return cost, parts
        return cost, tf.zeros([1])

    constants = {}

    def as_tensor(value):
        if value not in constants:
            constants[value] = tf.constant(value, dtype=tf.int32)
        return constants[value]

    def train_steps(chunk, first, count):
        results = [distributed_step(*chunk, as_tensor(index)) for index in range(first, first + count)]
        costs = tf.concat([tf.stack([cost for cost, _ in results]), tf.zeros([chunk_batches - count])], 0)
        if not heteroscedastic:
            return costs, None
        stacked = tf.stack([p for _, p in results])
        parts = tf.concat([stacked, tf.zeros([chunk_batches - count] + list(stacked.shape[1:]))], 0)
        return costs, parts

    return train_steps


def _train_step_function(network, optimizer, spec, loss_scale=None):
    """``train_step(flux, labels, mask) -> (cost, parts)``: one optimiser step on one batch (see
    :func:`make_train_steps`).  ``loss_scale`` multiplies the loss whose gradient is taken (1 / replicas under
    a distribution strategy, whose optimiser sums the replicas' gradients); the returned cost is unscaled.
    A ``keras.optimizers.LossScaleOptimizer`` (MIXED_PRECISION) also scales the loss by its dynamic scale."""
    import keras
    import tensorflow as tf

    from anna.losses import masked_squared_error, robust_heteroscedastic
    from anna.model import log_noise_variance

    nout = spec.nout
    heteroscedastic = spec.heteroscedastic
    scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if heteroscedastic:
        trunk, free_top, dropout_top, variance_sum = variance_head_parts(network, spec)

    def train_step(flux, labels, mask):
        if heteroscedastic:
            # DER_SNR's noise term depends on the spectra only: no gradient, so off the tape
            log_noise_sq = log_noise_variance(flux)
        with tf.GradientTape() as tape:
            if heteroscedastic:
                # The reported value is the mean of the dropout passes, which the dropout-free pass
                # approximates (weight scaling); the variance head is fitted, in that dropout-free pass, to
                # the residual of that value.  Fitted to a single dropout pass it would also learn the dropout
                # jitter, which sigma_model already counts, and its own jitter would bias sigma upwards.
                # Both passes are the same up to the first dropout layer, so that trunk runs once and only the
                # top runs twice (variance_head_parts): the same losses and gradients as two whole passes.
                shared = trunk(flux, training=False)
                plain_labels, log_var_fit, log_gain = free_top(shared, training=False)
                reported = tf.stop_gradient(plain_labels)
                log_variance = variance_sum([log_var_fit, log_gain, log_noise_sq])
                out = dropout_top(shared, training=True)
            else:
                out = network(flux, training=True)
            cost = masked_squared_error(labels, out[:, :nout], mask)
            if heteroscedastic:
                # robust (astroNN) loss: labels weighted by the predicted inverse variance ...
                loss = (robust_heteroscedastic(labels, out[:, :nout], tf.stop_gradient(log_variance), mask)
                        # ... plus the variance head fitted to the residual of the reported value
                        + robust_heteroscedastic(labels, reported, log_variance, mask))
            else:
                loss = cost
            if loss_scale is not None:
                loss = loss * loss_scale
            if scales_loss:  # MIXED_PRECISION: the LossScaleOptimizer unscales the gradients in its update
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, network.trainable_variables)
        parts = None
        if heteroscedastic:
            parts = tf.stack([tf.square(labels - reported) * mask, tf.exp(log_var_fit),
                              tf.exp(log_gain + log_noise_sq), mask])
        # The update waits for the dropout-free pass's outputs, not only for its reads of the weights: no
        # gradient needs the reported labels (stop_gradient), so nothing else orders the labels layer of that
        # pass before the update.  Once (graph form, a CI machine) this step's parts and its two-pass oracle's
        # (tests/test_mc_step.py) differed in the reported labels only, as if one side had read updated weights.
        with tf.control_dependencies([] if parts is None else [parts]):
            optimizer.apply_gradients(zip(grads, network.trainable_variables))
        return cost, parts

    return train_step


def variance_head_parts(network, spec):
    """The network with a variance head cut where the training step's two passes part: (trunk, free_top,
    dropout_top, variance_sum), all sharing the network's own layers and weights.

    ``trunk`` maps flux to the activations entering the first dropout layer (:meth:`NetworkSpec.chain`: the
    convolutions up to the first with conv dropout, else through fc1), which no training flag changes; on
    those activations ``free_top`` gives the rest of the network's dropout-free pass, (labels, log_variance_fit,
    log_noise_gain), and ``dropout_top`` its labels with dropout.  ``variance_sum`` is the network's
    VarianceSum layer.  Why: a step needs the dropout-free pass (the reported value and the variance head) and a
    dropout pass (the label loss); run whole, each took the convolutions forward and backward, which is most of
    a step's cost, while only the layers from the first dropout on differ between them.  The dropout layers are
    the network's own, called in the same order, so with a dropout seed they draw the masks of a whole pass.
    """
    import keras

    chain = spec.chain()
    first_dropout = next(i for i, name in enumerate(chain) if "dropout" in name)
    trunk = keras.Model(network.input, network.get_layer(chain[first_dropout - 1]).output, name="step_trunk")

    def top(labels_only):
        activations = keras.Input(shape=trunk.output.shape[1:], dtype="float32")
        x = activations
        for name in chain[first_dropout:-1]:  # up to the last hidden layer's dropout; "labels" is last
            x = network.get_layer(name)(x)
        labels = network.get_layer("labels")(x)
        if labels_only:
            return keras.Model(activations, labels)
        return keras.Model(activations, [labels, network.get_layer("log_variance_fit")(x),
                                         network.get_layer("log_noise_gain")(x)])

    return trunk, top(False), top(True), network.get_layer("log_variance")


COMPILED_FORMS = ("xla", "xla_step", "graph")
FORM_NAMES = {"xla": "XLA, one compiled call per chunk of steps", "xla_step": "XLA, one compiled call per step",
              "graph": "graph, one call per step, no XLA"}
# The forms JIT_COMPILE may choose from: AUTO all, YES the XLA ones, NO the plain graph.
FORMS_OF_SETTING = {"AUTO": COMPILED_FORMS, "YES": ("xla", "xla_step"), "NO": ("graph",)}


# Raised whenever the code of a compiled form changes its speed, so that AUTO times again rather than reuse a
# choice made for the old code.  2: the per-step forms gather their batch (see make_train_steps).  3: a step
# with a variance head runs the trunk once and selects DER_SNR's median without sorting (variance_head_parts,
# log_noise_variance).
COMPILED_FORMS_REVISION = 3


def compiled_form_key(spec, batch_size, chunk_batches, keep_prob, candidates=COMPILED_FORMS):
    """The cache key of a choice: the network, the batch shape, dropout on/off, the forms timed, their code's
    revision, the machine."""
    return json.dumps({"network": spec.to_dict(), "batch": int(batch_size), "chunk": int(chunk_batches),
                       "dropout": keep_prob < 1.0, "forms": list(candidates), "revision": COMPILED_FORMS_REVISION,
                       "machine": machine_description()}, sort_keys=True)


def time_compiled_form(form, spec, centre, chunk, batch_size, keep_prob, seconds=TRIAL_SECONDS,
                       give_up_below=None):
    """Examples/s of ``form`` on a throwaway copy of the network (the run's own network, optimiser and random
    state are not touched), over at least ``seconds`` after one warm-up call that compiles; (rate, error,
    cut_short).  With ``give_up_below`` (ex/s), the first timed call is one step, and a form slower than that
    on it is not timed further: its one-step rate is returned with ``cut_short`` True."""
    import keras
    import tensorflow as tf

    from anna.model import build_network

    chunk_batches = int(chunk[0].shape[0])
    try:
        network = build_network(spec, dropout_rate=1.0 - keep_prob, centre=centre, compiled_form=form,
                                for_training=True)
        optimizer = keras.optimizers.Adam(learning_rate=1e-12)
        optimizer.build(network.trainable_variables)
        steps = make_train_steps(network, optimizer, spec, chunk_batches, batch_size, form)
        steps(chunk, 0, 1)[0].numpy()  # compiles (the step count is a tensor: one compilation serves all)
        per_call = min(chunk_batches, TRIAL_STEPS_PER_CALL)
        done, start = 0, time.perf_counter()
        if give_up_below is not None:
            steps(chunk, 0, 1)[0].numpy()
            done = 1
            rate = batch_size / (time.perf_counter() - start)
            if rate < give_up_below:
                return rate, None, True
        while True:
            costs, _ = steps(chunk, 0, per_call)
            costs.numpy()
            done += per_call
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and done >= 2 * per_call:
                return done * batch_size / elapsed, None, False
    except (tf.errors.OpError, ValueError, RuntimeError, TypeError) as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False


def choose_compiled_form(setting, spec, centre, chunk, batch_size, keep_prob, cache_path=None, report=print,
                         trial_seconds=TRIAL_SECONDS):
    """The compiled form of the training steps and how it was chosen (a dict for the frozen model).

    JIT_COMPILE NO pins "graph"; YES times the two XLA forms ("xla", "xla_step"), AUTO all three
    (:data:`FORMS_OF_SETTING`), each on a throwaway copy of the network (:func:`time_compiled_form`), and keeps
    the fastest; a form that fails to compile or run is skipped, and one under TRIAL_GIVE_UP_FRACTION of the
    fastest form timed before it (in TRIAL_ORDER) is timed over one step only.  The choice is remembered per
    network, batch shape, forms and machine in ``cache_path`` (:func:`compiled_form_cache_path`), so a repeated
    run uses the same form without timing again: forms round differently, and with SEED a run must repeat bit
    for bit.
    """
    candidates = FORMS_OF_SETTING[setting]
    if len(candidates) == 1:
        return {"setting": setting, "form": candidates[0], "source": "JIT_COMPILE"}
    chunk_batches = int(chunk[0].shape[0])
    key = compiled_form_key(spec, batch_size, chunk_batches, keep_prob, candidates)
    cache_path = cache_path or compiled_form_cache_path()
    cache = read_remembered(cache_path)
    if key in cache and cache[key].get("form") in COMPILED_FORMS:
        entry = cache[key]
        report(f"JIT_COMPILE {setting}: {FORM_NAMES[entry['form']]}, as timed on this machine on {entry['when']} "
               f"({_rates_text(entry['rates'])}; remembered in {cache_path})")
        return {"setting": setting, "form": entry["form"], "source": "cache", "rates": entry["rates"],
                "timed_utc": entry["when"]}
    rates, errors, cut_short = {}, {}, []
    for form in sorted(candidates, key=TRIAL_ORDER.index):
        give_up_below = TRIAL_GIVE_UP_FRACTION * max(rates.values()) if rates else None
        rate, error, cut = time_compiled_form(form, spec, centre, chunk, batch_size, keep_prob, trial_seconds,
                                              give_up_below)
        if rate is not None:
            rates[form] = rate
        else:
            errors[form] = error
        if cut:
            cut_short.append(form)
    if not rates:
        raise AnnaInputError("neither compiled form of the training step runs on this machine ("
                             + "; ".join(f"{form}: {error}" for form, error in errors.items()) + ")",
                             key="JIT_COMPILE")
    form = max(rates, key=rates.get)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    skipped = "".join(f"; {form_} failed ({error})" for form_, error in errors.items())
    cut_text = "".join(f"; {form_} over one step: under {TRIAL_GIVE_UP_FRACTION:g}x the fastest before it"
                       for form_ in cut_short)
    report(f"JIT_COMPILE {setting}: {FORM_NAMES[form]} ({_rates_text(rates)}, timed over {trial_seconds:g} s each"
           f"{cut_text}{skipped})")
    problem = remember(key, {"form": form, "rates": rates, "when": when}, cache_path)
    if problem:
        report(f"JIT_COMPILE {setting}: could not remember the choice in {cache_path} ({problem}); "
               f"later runs will time again")
    return {"setting": setting, "form": form, "source": "timed", "rates": rates, "timed_utc": when,
            "failed": errors, "cut_short": cut_short}


def _rates_text(rates):
    return ", ".join(f"{form} {rate:,.0f} ex/s" for form, rate in sorted(rates.items(), key=lambda kv: -kv[1]))
