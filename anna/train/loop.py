"""The training run: the stage loop over producer chunks, cross-validation, logging, checkpoints and the frozen
model at the end (:class:`Trainer`, entry point :func:`run_training`).  The frozen model is whole however the
run ends: its parts beside the weights (:mod:`anna.train.describe`) are computed from the best weights at the
end of the stages, at a time budget and after Ctrl-C or SIGTERM alike.
"""

import concurrent.futures
import json
import os
import shutil
import time

import numpy as np

from anna.atomic import file_sha256
from anna.errors import AnnaInputError
from anna.plots import write_learning_curves
from anna.runtime import configure_threads
from anna.train.distribute import Distribution, make_distribution
from anna.train.precision import network_policy, require_gpu, wrap_optimizer
from anna.train.describe import (PART_TITLES, calibration_set, compute_parts, load_xval, missing_text, noise_models,
                                 parts_of, training_sample)
from anna.train.schedule import DEFAULT_WEIGHT_DECAY, EarlyStopping, make_optimizer, stage_plans, stage_schedule
from anna.train.state import (CHECKPOINT_NAME, PARTIAL_MODEL_NAME, StopRequest, is_complete_model, read_checkpoint,
                              training_fingerprint, write_checkpoint)
from anna.train.stage import StageRun
from anna.train.steps import FORMS_OF_SETTING, choose_compiled_form
from anna.train.summaries import write_histogram, write_interval_scalars
from anna.train.evaluation import make_evaluator

ACTIVATION_SAMPLE = 256


def _mean_spectrum(pack):
    total = np.zeros(pack.npix, dtype=np.float64)
    for _, _, _, flux in pack.iter_blocks():
        total += flux.sum(axis=0)
    return total / pack.n_stars


class Trainer:
    """Holds one training run's state; :func:`run_training` is the entry point."""

    def __init__(self, cfg, report=print, on_interval=None, distribution=None):
        import tensorflow as tf

        from anna.augment import PackRows
        from anna.model import LabelScaler, NetworkSpec
        from anna.packs import open_pack

        self.cfg = cfg
        self.report = report
        self.on_interval = on_interval
        self.ended_by_caller = None
        self.tf = tf
        # DISTRIBUTE (anna.train.distribute): only the chief writes checkpoints, logs and the frozen model
        self.distribution = distribution or Distribution("NONE")
        self.is_chief = self.distribution.is_chief
        self.missing_value = cfg.magic_number
        self.pack = open_pack(cfg.training_data, expected_npix=cfg.num_px, expected_nout=cfg.num_outs,
                              check_flux=True, missing_label_value=self.missing_value)
        self.scaler = LabelScaler(cfg.min_params, cfg.max_params)
        self.noise, self.xval_noise = noise_models(cfg, self.pack.wavelengths)
        self.save_loc = cfg.save_loc
        os.makedirs(self.save_loc, exist_ok=True)
        self.checkpoint_path = os.path.join(self.save_loc, CHECKPOINT_NAME)
        self.state = self._initial_or_resumed_state()
        self.seed = self.state["seed"]
        self._seed_everything()
        self.xval = load_xval(cfg, self.pack, self.scaler, self.xval_noise, self.seed, self.missing_value) \
            if cfg.training_xval else None
        self.rows = PackRows(self.pack)
        if self.pack.n_stars < self.distribution.num_workers:
            raise AnnaInputError(f"{self.pack.n_stars} spectra cannot be shared by {self.distribution.num_workers} "
                                 "workers", path=self.pack.path, key="DISTRIBUTE")
        self.spec = NetworkSpec.from_config(cfg, self.pack.npix, self.pack.nout)
        self.centre = _mean_spectrum(self.pack) if cfg.input_centering == "MEAN" else None
        self.writer = None
        self.run_dir = None
        self._probe_for, self._probe = None, None  # activation probe model, cached per network
        self._checkpoint_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                      thread_name_prefix="checkpoint")
        self._checkpoint_job = None
        if (cfg.tboard_output or cfg.timeline_output) and self.is_chief:
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
        return make_evaluator(network, self.spec.npix, self.spec.nout, self.scaler.span)

    # ----- the loop ---------------------------------------------------------------------------------------
    def run(self):
        from anna.model import build_network

        cfg = self.cfg
        plans = stage_plans(cfg)
        arrays = self.state.pop("arrays")
        previous_weights = None
        if arrays is not None:
            previous_weights = arrays.get("stage_start_weights")
        stage_results = self.state.setdefault("stage_results", [])
        self.compiled = self.state.get("compiled") or self._choose_compiled_form(plans[0])
        if self.distribution.distributed:
            self.report(f"DISTRIBUTE {self.distribution.kind}: {self.distribution.replicas} replica(s), "
                        f"{self.distribution.num_workers} worker(s); this is worker {self.distribution.worker_index}"
                        + (" (chief)" if self.is_chief else ""))
        self.state["compiled"] = self.compiled
        interrupted = None
        with StopRequest() as stop:
            for stage_index in range(self.state["stage_index"], len(plans)):
                plan = plans[stage_index]
                with self.distribution.scope():  # variables made here are mirrored over the replicas
                    network = build_network(self.spec, dropout_rate=1.0 - plan.keep_prob, centre=self.centre,
                                            compiled_form=self.compiled["form"], weight_init=cfg.weight_init,
                                            dtype_policy=network_policy(cfg), for_training=True)
                    optimizer = wrap_optimizer(make_optimizer(cfg, plan.learn_rate), network_policy(cfg))
                    optimizer.build(network.trainable_variables)
                resuming_here = arrays is not None and stage_index == self.state["stage_index"]
                if resuming_here:
                    network.set_weights(arrays["weights"])
                elif previous_weights is not None:
                    network.set_weights(previous_weights)
                stage_start_weights = [np.array(w) for w in network.get_weights()]
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
                result = StageRun(self, plan, network, optimizer, stopper, schedule,
                                  start_iteration=start_iteration, elapsed_before=elapsed_before,
                                  stage_start_weights=stage_start_weights, stage_index=stage_index, stop=stop,
                                  final_stage=stage_index == len(plans) - 1).run()
                stage_results.append(result)
                if stopper.best_weights is not None:
                    network.set_weights(stopper.best_weights)
                previous_weights = [np.array(w) for w in network.get_weights()]
                self.network = network
                if result["stopped_by"] == "caller":
                    self.ended_by_caller = result["caller_reason"]
                    break
                if stop.requested:
                    interrupted = stop.signal_name
                    break
            if not self.is_chief:  # the chief describes and writes the model
                return self._finish_worker(stage_results, interrupted)
            self._describe_for_inference(stop)
            stop.hold()
            path = self._write_model(stage_results, interrupted, stop)
        return self._finish(path, stage_results, interrupted, stop)

    def _finish_worker(self, stage_results, interrupted):
        """The end of a worker other than the chief: it wrote nothing."""
        self._checkpoint_pool.shutdown()
        self.report(f"worker {self.distribution.worker_index}: training done; the chief writes the frozen model")
        return {"frozen_model": None, "stages": stage_results, "interrupted": interrupted,
                "training_complete": interrupted is None, "model_parts": {}, "stop_seconds": None,
                "history": self.history, "run_dir": None, "seed": self.seed}

    def _choose_compiled_form(self, plan):
        """JIT_COMPILE: the compiled form of the training steps (timed on a throwaway network unless NO).  The
        trial draws from the random state, so the run's seeds are set again afterwards: whether a trial ran or
        the choice came from the cache, training starts from the same state."""
        from anna.augment import BatchProducer

        if self.distribution.distributed:  # the strategy's steps have one form (anna.train.steps)
            return {"setting": self.cfg.jit_compile, "form": "graph", "source": "DISTRIBUTE"}
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

    def _describe_for_inference(self, stop):
        """The parts every frozen model carries beside its weights (:mod:`anna.train.describe`), computed from
        the best weights whenever the model is written: at the end of the stages, at a time budget and after a
        stop.  A signal meanwhile skips what is left (the model is then written without it, and says so)."""
        sample = []

        def training_set():
            if not sample:
                sample.append(training_sample(self.pack, self.rows, self.scaler, self.noise, self.seed,
                                              self.missing_value))
            return sample[0]

        def calibration_spectra():
            return calibration_set(self.cfg, self.pack, self.scaler, self.noise, self.xval_noise, self.seed,
                                   self.missing_value, lambda: training_sample(
                                       self.pack, self.rows, self.scaler, None, self.seed, self.missing_value))

        values, self.model_parts = compute_parts(
            self.network, self.spec, parts_of(self.spec), training_set, calibration_spectra, self.cfg.mc_samples,
            by="anna-train", names=self.cfg.output_names, report=self.report, stop=stop)
        self.training_domain = values.get("training_domain")
        self.variance_calibration = values.get("variance_calibration")

    def _batch_rms(self, evaluate, flux, labels, mask):
        _, rms = evaluate(flux.numpy(), labels.numpy(), mask.numpy())
        return rms

    def _log_interval(self, record, network, histograms):
        if self.writer is None:
            return
        with self.writer.as_default(step=record["global_step"]):
            write_interval_scalars(record)
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
        if not self.is_chief:
            return
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
    def _write_model(self, stage_results, interrupted, stop):
        """The frozen model, written atomically: ``frozen.model``, or ``frozen.partial.model`` when a stopped
        run would otherwise replace a finished run's model.  Returns its path."""
        from anna import model as model_module
        from anna.continuum import continuum_settings

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
            "weight_init": self.cfg.weight_init,
            "optimizer": {"name": self.cfg.optimizer, "weight_decay": (
                (DEFAULT_WEIGHT_DECAY if self.cfg.weight_decay is None else self.cfg.weight_decay)
                if self.cfg.optimizer == "ADAMW" else None)},
            "lr_schedule": {"kind": self.cfg.lr_schedule, "patience": self.cfg.lr_patience,
                            "factor": self.cfg.lr_factor, "minimum": self.cfg.lr_min,
                            "decay_start": self.cfg.lr_decay_start},
            "time_limits_minutes": [self.cfg.max_minutes1, self.cfg.max_minutes2],
            "training_domain": self.training_domain,
            "variance_calibration": self.variance_calibration,
            "model_parts": self.model_parts,
            "distribute": self.distribution.describe(),
            # what anna-infer must do to a survey spectrum before the network reads it, as training did
            "bad_pixel_fill": self.cfg.bad_pixel_fill,
            "continuum": continuum_settings(self.cfg.continuum),
        }
        if interrupted is not None:
            # the seconds from the signal until the model's contents were ready (the write itself follows)
            metadata["stop"] = {"signal": interrupted,
                                "seconds_before_writing": round(time.perf_counter() - stop.signal_time, 3)}
        final_path = os.path.join(self.save_loc, model_module.FROZEN_MODEL_NAME)
        target = final_path
        if interrupted is not None and is_complete_model(final_path):
            target = os.path.join(self.save_loc, PARTIAL_MODEL_NAME)
        path = model_module.save_frozen(target, self.network, self.spec, metadata)
        # the cost of stopping: from the signal to the model on disk
        self.stop_seconds = None if interrupted is None else time.perf_counter() - stop.signal_time
        return path

    def _finish(self, path, stage_results, interrupted, stop):
        """After the model is written: close the logs, settle the checkpoint, say what was written."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        self._wait_for_checkpoint()
        self._checkpoint_pool.shutdown()
        if interrupted is None and os.path.exists(self.checkpoint_path):
            os.remove(self.checkpoint_path)
        lacking = missing_text(self.model_parts, self.cfg.source or "<parameter file>")
        stop_seconds = self.stop_seconds
        if interrupted is not None:
            parts = ", ".join(f"{PART_TITLES[part]} {record['seconds']:.1f} s"
                              for part, record in self.model_parts.items() if record.get("seconds") is not None)
            self.report(f"stopped by {interrupted}: the best weights so far are saved as a usable frozen model "
                        f"{path}, {stop_seconds:.1f} s after the signal ({parts or 'no parts computed'})"
                        + (f", {lacking}" if lacking else "")
                        + "; rerun the same command to resume from the checkpoint")
        else:
            self.report(f"frozen model written to {path}" + (f" {lacking}" if lacking else ""))
        curves = write_learning_curves(self.history, self.cfg.output_names, self.save_loc)
        if curves:
            self.report(f"learning curves in {curves}")
        if self.run_dir:
            self.report(f"TensorBoard logs in {self.run_dir}  (watch with: tensorboard --logdir {self.cfg.log_loc})")
        # a signal that cut the parts short after training had finished still ends the command as interrupted
        skipped = stop.skipped_by if lacking else None
        return {"frozen_model": path, "stages": stage_results, "interrupted": interrupted or skipped,
                "training_complete": interrupted is None, "model_parts": self.model_parts,
                "stop_seconds": stop_seconds, "history": self.history, "run_dir": self.run_dir, "seed": self.seed,
                "ended_by_caller": self.ended_by_caller}


def run_training(cfg, report=print, on_interval=None):
    """Train as the parameter file says; returns a summary dict (frozen model path, stages, history).

    ``on_interval(record)``, when given, is called at the end of every sample interval with that interval's
    history record (stage, iteration, global_step, batch_cost, xval_cost, ...; read-only).  It lets a caller
    that drives many runs (anna-tune: reporting to a search, pruning) follow and end a run without a loop of
    its own: a returned text ends the run there, as early stopping ends a stage (the best weights are kept and
    the frozen model is written whole; later stages are skipped), and the text is the reason, kept in the stage's
    summary (``caller_reason``) and returned as ``ended_by_caller``.  None lets the run go on.
    """
    configure_threads()
    distribution = make_distribution(cfg)  # before TensorFlow runs anything: MULTI_WORKER joins its cluster
    require_gpu(cfg)  # MIXED_PRECISION: YES only on a GPU (anna.train.precision)
    trainer = Trainer(cfg, report, on_interval, distribution)
    if distribution.kind != "MULTI_WORKER":
        return trainer.run()
    try:
        return trainer.run()
    except trainer.tf.errors.OpError as error:  # a peer died or went silent: its collective failed here
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.endswith(":")]
        raise AnnaInputError(f"worker {distribution.worker_index} lost the cluster ({lines[0] if lines else error}); "
                             f"the last checkpoint is in {cfg.save_loc}: start every worker again to resume",
                             key="DISTRIBUTE") from None
