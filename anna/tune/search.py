"""The search: an Optuna study whose trials are anna-train runs.

Each trial draws values for the TUNE_SPACE keys (TPE, seeded from SEED and the trial's number, so one process
repeats its search and two processes sharing a study draw differently), writes the user's file with them filled
in to ``SAVE_LOC/trials/<study>/trial-NNNN/trial.param``, and trains it in this process with
:func:`anna.train.run_training` into that folder.  The cross-validation cost of every sample interval goes to
Optuna through the run's ``on_interval`` hook, which ends the run when the pruner says so; the trial's value is
its best cross-validation cost.

What counts towards TUNE_TRIALS: trials that completed, were pruned, or failed by themselves (a non-finite cost,
a value combination anna-train refuses, an error in training), with the reason kept.  A trial *lost* to its
process — Ctrl-C, ``kill -9``, the search's own time limit — is recorded as failed but not counted, so the next
start runs another in its place.  A killed process's running trial is found at the next start on the same
machine (its process id is gone) or, from any machine, by Optuna's heartbeat after a few minutes.

Several processes share a study through one storage: before a trial each counts the trials ended or running,
and after asking for one it checks its place in the study's order (trial numbers are handed out by the storage
one at a time), so together they finish exactly TUNE_TRIALS and no trial runs twice.
"""

import math
import os
import socket
import threading
import time
import warnings

from anna.atomic import process_alive
from anna.errors import AnnaInputError

HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
LOST = "lost_reason"
FAILED = "fail_reason"
PRUNED = "prune_reason"
TUNE_DATABASE = "tune.db"


def import_optuna():
    """Optuna, or a one-line input error saying how to install it (it is the optional extra ``tune``)."""
    try:
        import optuna
    except ImportError:
        raise AnnaInputError("anna-tune needs Optuna, which is not installed: pip install 'anna-tf[tune]' "
                             "(or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # anna-tune asks and tells itself and beats the heartbeat itself (_Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def tune_problems(cfg):
    """What the search needs beyond anna-train's own checks: a space, and a cross-validation set to score."""
    problems = []
    if cfg.tune_space is None:
        path, line = cfg.location_of("TUNE_SPACE")
        problems.append(AnnaInputError("required for anna-tune, but not given (e.g. TUNE_SPACE: "
                                       "LEARN_RATE1=log(1e-5, 3e-3); KEEP_PROB1=float(0.6, 1.0))",
                                       path=path, line=line, key="TUNE_SPACE"))
    if not cfg.training_xval:
        problems.append(cfg.error("TRAINING_XVAL", "must be YES for anna-tune: a trial is scored by its "
                                                   "cross-validation cost", value=cfg.text_of("TRAINING_XVAL") or
                                  "NO (default)"))
    return problems


def storage_url(cfg):
    return cfg.tune_storage or "sqlite:///" + os.path.join(cfg.save_loc, TUNE_DATABASE)


def study_name(cfg):
    if cfg.tune_study:
        return cfg.tune_study
    return os.path.splitext(os.path.basename(cfg.source))[0] or "anna-tune"


def open_study(cfg, optuna):
    """The study (created, or loaded to continue), on storage with a heartbeat so other machines can tell a
    dead process's trial from a running one."""
    url = storage_url(cfg)
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
            break
        except Exception as error:  # a bad URL, a missing driver, a server that does not answer, or another
            last = error            # process creating the same fresh database's tables at this moment
            time.sleep(0.5 * (attempt + 1))
    else:
        raise cfg.error("TUNE_STORAGE" if cfg.tune_storage else "SAVE_LOC",
                        f"cannot open the study's storage {url} ({type(last).__name__}: "
                        f"{str(last).splitlines()[0] if str(last) else ''})") from None
    return optuna.create_study(study_name=study_name(cfg), storage=storage, direction="minimize",
                               load_if_exists=True, pruner=make_pruner(cfg, optuna), sampler=make_sampler(cfg, 0,
                                                                                                        optuna))


def make_sampler(cfg, trial_number, optuna):
    """TPE, seeded from SEED and the trial number (None without SEED: a fresh draw every time).  The two are mixed
    by a SeedSequence: Mersenne Twister's first draws from neighbouring seeds are alike (seeds 3000009 to
    3000012 all drew the same choice of two)."""
    import numpy as np

    seed = None if cfg.seed is None else int(np.random.SeedSequence([cfg.seed, trial_number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed)


def intervals_per_trial(cfg):
    """How many sample intervals a trial has at most (the pruners' step count)."""
    count = math.ceil(cfg.num_train_iters1 / cfg.sample_interval)
    if cfg.do_train2:
        count += math.ceil(cfg.num_train_iters2 / cfg.sample_interval)
    return count


def make_pruner(cfg, optuna):
    """The pruner TUNE_PRUNER names.  Steps are sample intervals counted from 1 (:class:`_Scorer`), so a trial
    runs TUNE_PRUNE_WARMUP intervals before the earliest step at which it may be pruned."""
    earliest = cfg.tune_prune_warmup + 1
    if cfg.tune_pruner == "MEDIAN":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.tune_prune_startup, n_warmup_steps=earliest)
    if cfg.tune_pruner == "HYPERBAND":
        most = max(intervals_per_trial(cfg), 2)
        return optuna.pruners.HyperbandPruner(min_resource=min(earliest, most - 1), max_resource=most)
    return optuna.pruners.NopPruner()


def value_text(value):
    """A drawn value as the parameter file writes it (6 significant digits for floats)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def draw(trial, space):
    """{KEY: text} for one trial from TUNE_SPACE's dimensions."""
    values = {}
    for dimension in space:
        key = dimension["key"]
        if dimension["kind"] == "choice":
            value = trial.suggest_categorical(key, list(dimension["choices"]))
        elif dimension["kind"] == "int":
            value = trial.suggest_int(key, dimension["low"], dimension["high"], step=dimension["step"] or 1,
                                      log=dimension["log"])
        else:
            value = trial.suggest_float(key, dimension["low"], dimension["high"], step=dimension["step"],
                                        log=dimension["log"])
        values[key] = value_text(value)
    return values


# ------------------------------------------------------------------------------------------ who ends what


def counted(trial):
    """A trial that counts towards TUNE_TRIALS: it ended by itself (not lost to its process)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and FAILED in trial.user_attrs)


def fail_lost_trials(study, optuna):
    """Trials left running by processes that are gone: on this machine by their process id, elsewhere by
    Optuna's heartbeat.  They are failed (not counted), so the search runs others in their place."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") == host and "pid" in attrs and not process_alive(int(attrs["pid"])):
            try:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, RuntimeError):
                pass  # another process failed it first
    optuna.storages.fail_stale_trials(study)


class _Heartbeat:
    """Records the running trial's heartbeat every HEARTBEAT_SECONDS (what Optuna's optimize() does for its own
    trials; anna-tune asks and tells itself)."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="tune-heartbeat", daemon=True)

    def _beat(self):
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a storage hiccup must not end the trial; the next beat tries again
                pass
            if self.stop.wait(HEARTBEAT_SECONDS):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False


# ------------------------------------------------------------------------------------------ one trial


def trial_folder(cfg, study, number):
    return os.path.join(cfg.save_loc, "trials", study.study_name, f"trial-{number:04d}")


def stage_budgets(trial_cfg, minutes):
    """MAX_MINUTES1/2 for a trial budget of ``minutes``: shared by the stages in proportion to their
    iterations, and never above a limit the file itself sets."""
    iterations = [trial_cfg.num_train_iters1] + ([trial_cfg.num_train_iters2] if trial_cfg.do_train2 else [])
    budgets = {}
    for number, count in enumerate(iterations, start=1):
        share = minutes * count / sum(iterations)
        own = getattr(trial_cfg, f"max_minutes{number}")
        budgets[f"MAX_MINUTES{number}"] = value_text(share if own is None else min(own, share))
    return budgets


def trial_config(cfg, folder, values, note):
    """Write the trial's parameter file and load it as anna-train would (AnnaInputError: a combination of values
    anna-train refuses)."""
    from anna.params import load_config, validate_for_stage
    from anna.tune.param_file import write_filled_parameter_file

    path = os.path.join(folder, "trial.param")
    fixed = {"SAVE_LOC": folder, "LOG_LOC": os.path.join(folder, "logs"), "RESUME": "NO"}
    write_filled_parameter_file(cfg, path, {**values, **fixed}, note)
    trial_cfg = load_config(path)
    if cfg.tune_trial_minutes is not None:
        fixed.update(stage_budgets(trial_cfg, cfg.tune_trial_minutes))
        write_filled_parameter_file(cfg, path, {**values, **fixed}, note)
        trial_cfg = load_config(path)
    validate_for_stage(trial_cfg, "train")
    return trial_cfg


class _Scorer:
    """The run's ``on_interval`` hook: reports each interval's cross-validation cost to the trial and says when
    the run should end (pruned, a non-finite cost, the search's time limit)."""

    def __init__(self, trial, deadline):
        self.trial, self.deadline, self.step = trial, deadline, 0
        self.reason = None

    def __call__(self, record):
        self.step += 1
        cost = record["xval_cost"]
        if cost is None or not math.isfinite(cost):
            self.reason = "non-finite cross-validation cost"
        else:
            self.trial.report(cost, self.step)
            if self.trial.should_prune():
                self.reason = f"pruned at interval {self.step} (iteration {record['iteration']} of stage " \
                              f"{record['stage']}, cost {cost:.6g})"
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self.reason = "TUNE_MINUTES reached"
        return self.reason


def run_trial(cfg, study, trial, deadline, optuna):
    """Train one trial; tell the study how it ended.  Returns (state, detail) for the progress line, where
    state is COMPLETE, PRUNED, FAIL or LOST; raises KeyboardInterrupt after telling when the run was stopped
    by a signal."""
    State = optuna.trial.TrialState
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    folder = trial_folder(cfg, study, trial.number)
    os.makedirs(folder, exist_ok=True)
    trial.set_user_attr("folder", folder)
    values = draw(trial, cfg.tune_space)
    trial.set_user_attr("values", values)
    note = f"anna-tune study {study.study_name}, trial {trial.number}"

    def fail(reason, kind=FAILED):
        trial.set_user_attr(kind, reason)
        study.tell(trial, state=State.FAIL)
        return ("FAIL" if kind == FAILED else "LOST"), reason

    try:
        trial_cfg = trial_config(cfg, folder, values, note)
    except AnnaInputError as error:
        return fail(f"values refused: {error}")
    import keras  # TensorFlow starts here, when a trial has values to train

    from anna.train import run_training

    scorer = _Scorer(trial, deadline)
    keras.backend.clear_session()
    started = time.monotonic()
    try:
        with _Heartbeat(study, trial), open(os.path.join(folder, "train.log"), "a", encoding="utf-8") as log:
            def report(line):
                log.write(line + "\n")
                log.flush()

            result = run_training(trial_cfg, report=report, on_interval=scorer)
    except KeyboardInterrupt:
        fail("interrupted", kind=LOST)
        raise
    except Exception as error:  # a trial's own failure (e.g. out of memory) ends the trial, not the search
        text = str(error).splitlines()[0] if str(error) else ""
        return fail(f"{type(error).__name__}: {text}")
    trial.set_user_attr("seconds", round(time.monotonic() - started, 3))
    trial.set_user_attr("frozen_model", result["frozen_model"])
    if result["interrupted"]:
        fail(f"interrupted by {result['interrupted']}", kind=LOST)
        raise KeyboardInterrupt
    reason = result["ended_by_caller"]
    if reason == "TUNE_MINUTES reached":
        return fail(reason, kind=LOST)
    if reason is not None and reason.startswith("pruned"):
        trial.set_user_attr(PRUNED, reason)
        study.tell(trial, state=State.PRUNED)
        return "PRUNED", reason
    if reason is not None:
        return fail(reason)
    cost = min(stage["best_cost"] for stage in result["stages"])
    if not math.isfinite(cost):
        return fail("non-finite cross-validation cost")
    study.tell(trial, cost)
    return "COMPLETE", f"cost {cost:.6g}"


# ------------------------------------------------------------------------------------------ the search


def _best(study):
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return min(complete, key=lambda t: t.value) if complete else None


def run_tune(cfg, report=print):
    """Run (or continue) the search the parameter file describes; write its results to SAVE_LOC.

    Returns a summary dict: the study name and storage, counts by state, the best trial's number, value and
    values, and the files written (:func:`anna.tune.results.write_results`)."""
    from anna.tune.results import write_results

    optuna = import_optuna()
    started = time.monotonic()
    deadline = None if cfg.tune_minutes is None else started + 60.0 * cfg.tune_minutes
    study = open_study(cfg, optuna)
    fail_lost_trials(study, optuna)
    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
    report(f"study {study.study_name} in {storage_url(cfg)}: {done} of {cfg.tune_trials} trials done; "
           f"pruner {cfg.tune_pruner}")
    stopped = None
    try:
        while True:
            fail_lost_trials(study, optuna)  # another process may have died since
            trials = study.get_trials(deepcopy=False)
            done = sum(counted(t) for t in trials)
            running = sum(t.state.name == "RUNNING" for t in trials)
            if done >= cfg.tune_trials:
                break
            if done + running >= cfg.tune_trials:
                report(f"the remaining {running} trial(s) are running in other processes")
                break
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "TUNE_MINUTES"
                break
            trial = study.ask()
            study.sampler = make_sampler(cfg, trial.number, optuna)
            ahead = [t for t in study.get_trials(deepcopy=False)
                     if t.number < trial.number and (counted(t) or t.state.name == "RUNNING")]
            if len(ahead) >= cfg.tune_trials:  # other processes took the last ones meanwhile
                trial.set_user_attr(LOST, "not needed: other processes took the remaining trials")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            clock = time.monotonic()
            state, detail = run_trial(cfg, study, trial, deadline, optuna)
            best = _best(study)
            done = sum(counted(t) for t in study.get_trials(deepcopy=False))
            shown = ", ".join(f"{key}={text}" for key, text in trial.user_attrs.get("values", {}).items())
            best_text = f"best {best.value:.6g} (trial {best.number})" if best else "no trial complete yet"
            report(f"trial {trial.number} [{done}/{cfg.tune_trials}] {state} {detail} in "
                   f"{time.monotonic() - clock:.1f} s | {shown} | {best_text}")
    except KeyboardInterrupt:
        report("interrupted: the running trial is lost; rerun the same command to continue the study")
        write_results(cfg, study, optuna, report, plots=False)
        raise
    if stopped:
        report(f"TUNE_MINUTES ({cfg.tune_minutes:g}) reached; rerun the same command to continue the study")
    written = write_results(cfg, study, optuna, report)
    trials = study.get_trials(deepcopy=False)
    best = _best(study)
    return {"study": study.study_name, "storage": storage_url(cfg),
            "states": {state: sum(t.state.name == state for t in trials)
                       for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
            "counted": sum(counted(t) for t in trials),
            "best": None if best is None else {"number": best.number, "value": best.value,
                                               "values": best.user_attrs.get("values")},
            "stopped_by": stopped, "written": written}
