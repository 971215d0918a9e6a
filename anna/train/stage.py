"""One training stage, from its first (or resumed) iteration to its end: the producer's chunks through the
compiled steps, and at the end of every SAMPLE_INTERVAL the interval's bookkeeping — cross-validation, early
stopping, the schedule, TensorBoard and the progress line, the checkpoint — in that order.

A stage ends when its iterations are done, when early stopping says so, when its time limit is spent, when the
run's caller says so (``on_interval``, :func:`~anna.train.loop.run_training`), or when a stop is requested
(Ctrl-C, SIGTERM); :meth:`StageRun.run` returns how it ended.  The run-level state (the
history, the global step, the TensorBoard writer, the checkpoint writer) belongs to the
:class:`~anna.train.loop.Trainer` that starts the stage.
"""

import time

import numpy as np

from anna.progress import StageProgress
from anna.train.steps import make_train_steps
from anna.train.summaries import HISTOGRAM_EVERY
from anna.train.variance import refit_variance_biases


def interval_line(record, improved, show_rate):
    """The line printed at the end of a sample interval: costs (``*`` marks a new best), RMS per label in
    physical units, the learning rate when a schedule moves it, and the interval's training rate."""
    rms = " ".join(f"{name}={value:.4g}" for name, value in record["rms"].items())
    xval = f" xval cost {record['xval_cost']:.6g}" if record["xval_cost"] is not None else ""
    rate = f" | lr {record['learning_rate']:.3g}" if show_rate else ""
    return (f"stage {record['stage']} iter {record['iteration']:>6}: batch cost {record['batch_cost']:.6g}"
            f"{xval}{' *' if improved else '  '} | RMS {rms}{rate} | {record['examples_per_s']:.0f} ex/s")


class StageRun:
    """The state of one stage while it runs (what was once ten parameters and five closures of one method).

    ``trainer`` gives the run's data (rows, scaler, noise, cross-validation set), its configuration and its
    run-level hooks (evaluation, logging, checkpoint); ``stopper`` (:class:`~anna.train.schedule.EarlyStopping`)
    and ``schedule`` (:class:`~anna.train.schedule.LearningRateSchedule`) may come restored from a checkpoint,
    with ``start_iteration`` and ``elapsed_before`` (seconds the stage had run before the resume).
    """

    def __init__(self, trainer, plan, network, optimizer, stopper, schedule, *, start_iteration, elapsed_before,
                 stage_start_weights, stage_index, stop, final_stage):
        from anna.augment import BatchProducer

        cfg = trainer.cfg
        self.trainer, self.cfg, self.plan = trainer, cfg, plan
        self.network, self.optimizer, self.stopper, self.schedule = network, optimizer, stopper, schedule
        self.stage_index, self.stage_start_weights = stage_index, stage_start_weights
        self.stop, self.final_stage = stop, final_stage
        self.heteroscedastic = trainer.spec.heteroscedastic
        self.evaluate = trainer._make_eval(network)
        distribution = trainer.distribution
        # this worker's share of the global batch (all of it unless MULTI_WORKER), from its shard of the rows
        worker_batch = distribution.worker_batch(plan.batch_size, f"BATCH_SIZE{plan.number}")
        producer = BatchProducer(trainer.rows, trainer.scaler, trainer.noise, batch_size=worker_batch,
                                 seed=trainer.seed, stage=plan.number, threads=cfg.pp_threads, fetch=cfg.num_fetch,
                                 depth=cfg.max_pp_depth, missing_value=trainer.missing_value,
                                 shard=distribution.shard)
        self.chunk_batches = producer.batches_per_chunk
        self.train_steps = make_train_steps(network, optimizer, trainer.spec, self.chunk_batches, worker_batch,
                                            trainer.compiled["form"], distribution=distribution)
        first_chunk, self.offset = divmod(start_iteration, self.chunk_batches)
        self.chunks = iter(producer.chunk_dataset(first_chunk))
        self.chunk = None
        self.progress = StageProgress(trainer.report, plan.number, plan.iterations, plan.max_seconds,
                                      start_iteration=start_iteration)
        self.iteration = start_iteration
        self.elapsed_before = elapsed_before
        self.start_iteration = start_iteration
        self.interval_costs, self.interval_residuals = [], []
        self.wait_time = 0.0
        self.profiling = False
        self.stopped_by = "iterations"
        self.caller_reason = None
        self.rate = None

    # ----- the stage ---------------------------------------------------------------------------------------
    def run(self):
        """Train to the stage's end; returns its summary (how it ended, best cost and iteration, the rate)."""
        self._announce()
        self._evaluate_start()
        self.stage_clock = time.perf_counter() - self.elapsed_before  # elapsed = perf_counter() - stage_clock
        self.interval_start = self.wall_mark = time.perf_counter()
        self.trace_graph = self.trainer.writer is not None and self.trainer.global_step == 0
        while self.iteration < self.plan.iterations:
            if self.stop.requested:
                self.stopped_by = self.stop.signal_name
                break
            self._maybe_start_profile()
            self._train_steps_to_next_boundary()
            out_of_time = (self.plan.max_seconds is not None
                           and time.perf_counter() - self.stage_clock >= self.plan.max_seconds)
            if self.iteration % self.cfg.sample_interval == 0 or self.iteration == self.plan.iterations or out_of_time:
                ended_by = self._end_interval(out_of_time)
                if ended_by is not None:
                    self.stopped_by = ended_by
                    break
        if self.profiling:
            self.trainer.tf.profiler.experimental.stop()
        self.progress.close()
        return self._summary()

    def _announce(self):
        plan = self.plan
        limit = f", at most {plan.max_seconds / 60:g} min" if plan.max_seconds else ""
        self.progress.line(f"stage {plan.number}: learning rate {plan.learn_rate:g} ({self.cfg.lr_schedule.lower()}), "
                           f"batch {plan.batch_size}, keep probability {plan.keep_prob:g}, up to {plan.iterations} "
                           f"iterations{limit}"
                           + (f" (resuming at {self.start_iteration})" if self.start_iteration else ""))

    def _evaluate_start(self):
        """The starting weights are the first candidate for the best (so a stage that never improves on
        cross-validation ends where it began)."""
        xval = self.trainer.xval
        if self.stopper.best_weights is None and xval is not None and self.start_iteration == 0:
            cost, _ = self.evaluate(xval.flux, xval.labels, xval.mask)
            self.stopper.update(cost, 0, self.network.get_weights())
            self.stopper.bad_intervals = 0

    def _maybe_start_profile(self):
        """TIMELINE_OUTPUT: trace the last interval of the final stage (or the one that may be its last)."""
        cfg, plan = self.cfg, self.plan
        at_interval_start = self.iteration % cfg.sample_interval == 0
        if cfg.timeline_output and not self.profiling and self.final_stage and at_interval_start:
            last_planned = self.iteration + cfg.sample_interval >= plan.iterations
            maybe_last = cfg.early_stop and self.stopper.bad_intervals >= cfg.es_sample - 1
            if last_planned or maybe_last:
                self.trainer._start_profile()
                self.profiling = True

    def _train_steps_to_next_boundary(self):
        """One compiled call: steps up to the end of the chunk, of the SAMPLE_INTERVAL or of the stage."""
        tf, trainer = self.trainer.tf, self.trainer
        if self.chunk is None or self.offset == self.chunk_batches:
            fetched = time.perf_counter()
            self.chunk = next(self.chunks)
            self.wait_time += time.perf_counter() - fetched
            self.offset = self.offset % self.chunk_batches
        count = min(self.chunk_batches - self.offset, self.plan.iterations - self.iteration,
                    self.cfg.sample_interval - self.iteration % self.cfg.sample_interval)
        new_rate = self.schedule.rate(self.iteration, time.perf_counter() - self.stage_clock)
        if new_rate != self.rate:
            self.optimizer.learning_rate.assign(new_rate)
            self.rate = new_rate
        if self.trace_graph:
            tf.summary.trace_on(graph=True)
        costs, parts = self.train_steps(self.chunk, self.offset, count)
        if self.trace_graph:
            with trainer.writer.as_default():
                tf.summary.trace_export(name="train_step", step=0)
            self.trace_graph = False
        self.interval_costs.append((costs, count))
        if self.heteroscedastic:
            self.interval_residuals.append((parts, count))
        ticks_before = self.iteration // 10
        self.iteration += count
        self.offset += count
        trainer.global_step += count
        if self.iteration // 10 != ticks_before:
            self.progress.tick(self.iteration, time.perf_counter() - self.stage_clock)

    # ----- the end of a sample interval -------------------------------------------------------------------
    def _end_interval(self, out_of_time):
        """The interval's bookkeeping; returns why the stage ends here ("early_stopping", "time_limit") or None."""
        trainer, plan, cfg = self.trainer, self.plan, self.cfg
        record = self._interval_record()
        if self.profiling:
            trainer.tf.profiler.experimental.stop()
            self.profiling = False
        if self.heteroscedastic:
            # (steps, 4, batch, nout) per call -> (4, all examples of the interval, nout)
            nout = trainer.spec.nout
            residuals = np.concatenate([np.moveaxis(p.numpy()[:n], 0, 1).reshape(4, -1, nout)
                                        for p, n in self.interval_residuals], axis=1)
            refit_variance_biases(self.network, *residuals)
        monitored = self._cross_validate(record)
        improved = self.stopper.update(monitored, self.iteration, self.network.get_weights())
        trainer.history.append(record)
        cut = self.schedule.after_interval(improved, self.iteration)
        last = self.iteration >= plan.iterations or self.stopper.should_stop or self.stop.requested or out_of_time
        trainer._log_interval(record, self.network, histograms=last or len(trainer.history) % HISTOGRAM_EVERY == 1)
        self.progress.line(interval_line(record, improved, show_rate=cfg.lr_schedule != "CONSTANT")
                           + self.progress.eta_text(self.iteration, time.perf_counter() - self.stage_clock))
        if cut is not None:
            self.progress.line(f"stage {plan.number}: no improvement in {cfg.lr_patience} intervals; learning "
                               f"rate cut to {cut:.3g}")
        self.interval_costs, self.interval_residuals = [], []
        self.wait_time = 0.0
        trainer._write_checkpoint(self.stage_index, self.iteration, self.network, self.optimizer, self.stopper,
                                  self.schedule, time.perf_counter() - self.stage_clock, self.stage_start_weights)
        self.interval_start = time.perf_counter()
        best = (f"restoring the best weights (iteration {self.stopper.best_iteration}, "
                f"cost {self.stopper.best_cost:.6g})")
        if self.stopper.should_stop:
            self.progress.line(f"stage {plan.number}: early stop at iteration {self.iteration}: no improvement in "
                               f"{cfg.es_sample} intervals; {best}")
            return "early_stopping"
        if trainer.on_interval is not None:
            self.caller_reason = trainer.on_interval(record)
            if self.caller_reason is not None:
                self.progress.line(f"stage {plan.number}: ended at iteration {self.iteration} by the caller "
                                   f"({self.caller_reason}); {best}")
                return "caller"
        if out_of_time and self.iteration < plan.iterations:
            self.progress.line(f"stage {plan.number}: time limit of {plan.max_seconds / 60:g} min reached at "
                               f"iteration {self.iteration}; {best}")
            return "time_limit"
        return None

    def _interval_record(self):
        """The interval's history record, its rates measured now: the headline rate counts the whole interval
        (the previous interval's evaluation, logging and checkpoint included), the step rate stops the clock
        around them.  ``xval_cost`` and ``rms`` are filled in by :meth:`_cross_validate`."""
        batch_cost = float(np.mean(np.concatenate([c.numpy()[:n] for c, n in self.interval_costs])))
        steps = sum(n for _, n in self.interval_costs)
        now = time.perf_counter()
        examples = steps * self.plan.batch_size
        record = {"stage": self.plan.number, "iteration": self.iteration, "global_step": self.trainer.global_step,
                  "batch_cost": batch_cost, "xval_cost": None, "rms": None, "learning_rate": self.rate,
                  "examples_per_s": examples / max(now - self.wall_mark, 1e-9),
                  "step_examples_per_s": examples / max(now - self.interval_start, 1e-9),
                  "input_wait_fraction": self.wait_time / max(now - self.interval_start, 1e-9),
                  "elapsed_s": now - self.stage_clock}
        self.wall_mark = now
        return record

    def _cross_validate(self, record):
        """Fill the record's cost and RMS per label; returns the cost early stopping monitors (the
        cross-validation cost, or without TRAINING_XVAL the interval's batch cost)."""
        trainer = self.trainer
        if trainer.xval is not None:
            xval_cost, rms = self.evaluate(trainer.xval.flux, trainer.xval.labels, trainer.xval.mask)
            monitored = xval_cost
        else:
            last_flux, last_labels, last_mask = (t[self.offset - 1] for t in self.chunk)
            xval_cost, rms = None, trainer._batch_rms(self.evaluate, last_flux, last_labels, last_mask)
            monitored = record["batch_cost"]
        record["xval_cost"] = xval_cost
        record["rms"] = {name: float(value) for name, value in zip(self.cfg.output_names, rms)}
        return monitored

    def _summary(self):
        stopper, plan = self.stopper, self.plan
        return {"stage": plan.number, "iterations": self.iteration,
                "stopped_early": self.stopped_by == "early_stopping", "stopped_by": self.stopped_by,
                "caller_reason": self.caller_reason,
                "best_cost": stopper.best_cost, "best_iteration": stopper.best_iteration,
                "monitored": "xval" if self.trainer.xval is not None else "batch",
                "seconds": time.perf_counter() - self.stage_clock, "learning_rate": {
                    "schedule": self.schedule.kind, "initial": plan.learn_rate, "final": self.rate,
                    "cuts": self.schedule.cuts}}
