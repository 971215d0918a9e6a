"""The training run: the stage loop over producer chunks, cross-validation, logging, checkpoints and the frozen
model at the end (:class:`Trainer`, entry point :func:`run_training`).
"""

import concurrent.futures
import json
import os
import shutil
import time

import numpy as np

from anna.atomic import file_sha256
from anna.errors import AnnaInputError
from anna.train.schedule import DEFAULT_WEIGHT_DECAY, EarlyStopping, make_optimizer, stage_plans, stage_schedule
from anna.train.state import (CHECKPOINT_NAME, PARTIAL_MODEL_NAME, StopRequest, is_complete_model, read_checkpoint,
                              training_fingerprint, write_checkpoint)
from anna.train.stage import StageRun
from anna.train.steps import FORMS_OF_SETTING, choose_compiled_form
from anna.train.summaries import write_histogram, write_interval_scalars
from anna.train.evaluation import make_evaluator
from anna.train.variance import calibrate_variance_head

ACTIVATION_SAMPLE = 256
# Training spectra drawn (fixed seed) at the end of training for the training-domain statistics.
DOMAIN_SAMPLE = 4000


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
        self.state["compiled"] = self.compiled
        interrupted = None
        with StopRequest() as stop:
            for stage_index in range(self.state["stage_index"], len(plans)):
                plan = plans[stage_index]
                network = build_network(self.spec, dropout_rate=1.0 - plan.keep_prob, centre=self.centre,
                                        compiled_form=self.compiled["form"], weight_init=cfg.weight_init)
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
                result = StageRun(self, plan, network, optimizer, stopper, schedule,
                                  start_iteration=start_iteration, elapsed_before=elapsed_before,
                                  stage_start_weights=stage_start_weights, stage_index=stage_index, stop=stop,
                                  final_stage=stage_index == len(plans) - 1).run()
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
            "weight_init": self.cfg.weight_init,
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
        if interrupted is not None and is_complete_model(final_path):
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


def run_training(cfg, report=print):
    """Train as the parameter file says; returns a summary dict (frozen model path, stages, history)."""
    configure_threads()
    trainer = Trainer(cfg, report)
    return trainer.run()
