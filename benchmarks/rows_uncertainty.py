"""Uncertainty row: MC-dropout σ calibrated on survey spectra the model never saw (group ``uncertainty``).

Two runs of the real ``anna-train`` command on the APOGEE-like example data (``rows_survey.survey_data``) with
``configs/apogee.param``'s StarNet-shaped network, UNCERTAINTY: MC_DROPOUT and one stage with dropout
(KEEP_PROB1 0.9, DO_TRAIN2 NO; the last stage must have dropout):

* ended by its time budget: MAX_MINUTES1 = ``sizes.calibration_minutes`` ends the stage, the normal end of a
  survey run;
* stopped by SIGINT (as Ctrl-C) at 90 % of the same budget, so that the learning-rate schedule, which follows
  the stage's time limit, is the same up to the stop.  The cost of stopping is the wall time from the signal to
  the frozen model's appearance on disk (the command's own figure, from its stop line, beside it).

Each model then runs ``anna-test`` (in this process) on the test pack noised at S/N 30, 60 and 120 (PREPROCESS_TEST,
the S/N template of training, +-1 % continuum errors).  Per label and S/N the rows give the fraction of stars
with |d| < σ (target 63-73 %; a Gaussian gives 68.3 %) and the standard deviation of d/σ (target 0.85-1.15);
the notes give the fractions within 2σ and 3σ.  The σ comes from the calibration computed when the model was
written, on the cross-validation pack: neither the test stars nor their noise were seen.
"""

import math
import os
import signal
import subprocess
import sys
import threading
import time

from harness import Row
from rows_survey import APOGEE_CONFIG, survey_data

UNCERTAINTY_SN = (30.0, 60.0, 120.0)
COVERAGE_BAND = (63.0, 73.0)  # % of stars within 1 sigma
Z_STD_BAND = (0.85, 1.15)  # standard deviation of d / sigma
STOP_FRACTION = 0.9  # the SIGINT comes at this fraction of the stage's time budget
RUNS = (("budget", "time budget"), ("sigint", "SIGINT"))


class Band:
    """A target met when the figure lies within [low, high] (the interface of harness.Target)."""

    def __init__(self, low, high, text):
        self.low, self.high, self.text = low, high, text

    def met(self, figure, ratio):
        if figure is None or not math.isfinite(figure):
            return None
        return self.low <= figure <= self.high


def _train_command(data, run, minutes, quick):
    overrides = {"TRAINING_DATA": os.path.join(data, "train.pack"), "XVAL_DATA": os.path.join(data, "xval.pack"),
                 "SAVE_LOC": os.path.join(run, "model"), "LOG_LOC": os.path.join(run, "logs"),
                 "UNCERTAINTY": "MC_DROPOUT", "KEEP_PROB1": "0.9", "DO_TRAIN2": "NO",
                 "MAX_MINUTES1": f"{minutes:.4g}", "RESUME": "NO", "TBOARD_OUTPUT": "NO"}
    if quick:
        overrides.update({"SAMPLE_INTERVAL": "20", "XVAL_SIZE": "300"})
    command = [sys.executable, "-u", "-c",
               "import sys; from anna.cli import train_main; sys.exit(train_main(sys.argv[1:]))", APOGEE_CONFIG]
    return command + [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def run_to_budget(ctx, data, minutes):
    """anna-train until the time budget ends the stage; returns (model folder, wall seconds, output lines)."""
    run = ctx.ws.fresh_dir("uncertainty-budget")
    started = time.perf_counter()
    done = subprocess.run(_train_command(data, run, minutes, ctx.sizes.quick), capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"anna-train failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return os.path.join(run, "model"), wall, done.stdout.splitlines()


def run_to_sigint(ctx, data, minutes):
    """anna-train with the same budget, sent SIGINT at STOP_FRACTION of it (counted from the stage's first line);
    returns (model folder, output lines, seconds from the signal to the frozen model on disk)."""
    run = ctx.ws.fresh_dir("uncertainty-sigint")
    model = os.path.join(run, "model", "frozen.model")
    errors = open(os.path.join(run, "stderr.txt"), "w+")  # a file: a full pipe would block the command
    process = subprocess.Popen(_train_command(data, run, minutes, ctx.sizes.quick), stdout=subprocess.PIPE,
                               stderr=errors, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines, stage_started = [], threading.Event()

    def last_error():
        errors.seek(0)
        return errors.read().strip().splitlines()[-1:]

    def read():
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("stage 1:"):
                stage_started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not stage_started.wait(1.0):
        if process.poll() is not None:
            raise RuntimeError(f"anna-train ended before its stage began ({process.returncode}): {last_error()}")
    time.sleep(STOP_FRACTION * minutes * 60.0)
    if os.path.exists(model) or process.poll() is not None:
        raise RuntimeError("anna-train wrote its model before the SIGINT was due")
    signalled = time.perf_counter()
    process.send_signal(signal.SIGINT)
    while not os.path.exists(model) and process.poll() is None:
        time.sleep(0.02)
    to_model = time.perf_counter() - signalled
    process.wait(timeout=600)
    reader.join(timeout=60)  # the reader has the rest of the output, the stop line included
    if process.returncode != 130 or not os.path.exists(model):
        raise RuntimeError(f"anna-train did not stop as asked ({process.returncode}): {last_error()}")
    errors.close()
    return os.path.dirname(model), lines, to_model


def uncertainty_at(ctx, data, model, sn, tag):
    """anna-test's ``uncertainty`` section for ``model`` on the test pack noised at ``sn`` (per label)."""
    from anna.evaluate import run_test
    from anna.params import load_config, validate_for_stage

    folder = ctx.ws.fresh_dir(f"uncertainty-test-{tag}-{sn:g}")
    cfg = load_config(APOGEE_CONFIG, overrides=[
        f"TEST_MODEL_LOC={model}", f"TEST_SAVE_LOC={folder}", f"TESTING_DATA={os.path.join(data, 'test.pack')}",
        f"SN_RANGE_TEST={sn:g}, {sn:g}", "PREPROCESS_TEST=YES", "UNCERTAINTY=MC_DROPOUT"], stage="test")
    validate_for_stage(cfg, "test")
    return run_test(cfg, report=ctx.log.anna)["uncertainty"]


def calibration_on_unseen_data(ctx):
    """The rows of group ``uncertainty`` and their details (module docstring)."""
    from anna.model import load_frozen

    data = survey_data(ctx)
    minutes = ctx.sizes.calibration_minutes
    ctx.log(f"uncertainty: anna-train, MC_DROPOUT, stage ended by a {minutes:g}-minute budget")
    budget_model, budget_wall, budget_lines = run_to_budget(ctx, data, minutes)
    ctx.log(f"uncertainty: anna-train, MC_DROPOUT, SIGINT at {STOP_FRACTION:.0%} of the same budget")
    sigint_model, sigint_lines, to_model = run_to_sigint(ctx, data, minutes)
    models = {"budget": budget_model, "sigint": sigint_model}
    details = {"minutes": minutes, "budget_wall_s": budget_wall, "stop_to_model_s": to_model,
               "budget_lines": budget_lines[-8:], "sigint_lines": sigint_lines[-8:], "runs": {}}
    rows = []
    for key, title in RUNS:
        frozen = load_frozen(models[key])
        meta = frozen.metadata
        parts = meta.get("model_parts") or {}
        run = {"stages": meta.get("stages"), "model_parts": parts, "stop": meta.get("stop"), "by_sn": {}}
        details["runs"][key] = run
        parts_text = ", ".join(f"{part} {record.get('seconds', float('nan')):.1f} s" if record.get("status") ==
                               "computed" else f"{part} missing ({record.get('reason')})"
                               for part, record in parts.items())
        iterations = sum(stage["iterations"] for stage in meta["stages"])
        if key == "sigint":
            stop_line = next((line for line in sigint_lines if line.startswith("stopped by")), "")
            rows.append(Row("uncertainty", "SIGINT: seconds from the signal to the frozen model", to_model, "s",
                            higher_is_better=False,
                            note=f"{iterations} iterations before the stop; parts computed: {parts_text}; the "
                                 f"command's own line: {stop_line[:200]}"))
        else:
            rows.append(Row("uncertainty", "time budget: seconds of the parts computed after the stage",
                            sum(record.get("seconds", 0.0) for record in parts.values()), "s",
                            higher_is_better=False,
                            note=f"{minutes:g}-minute stage, {iterations} iterations, command {budget_wall / 60:.1f} "
                                 f"min wall; {parts_text}"))
        for sn in UNCERTAINTY_SN:
            ctx.log(f"uncertainty: anna-test of the {title} model at S/N {sn:g}")
            labels = uncertainty_at(ctx, data, models[key], sn, key)["labels"]
            run["by_sn"][f"{sn:g}"] = labels
            wider = "; ".join(f"{name} {100 * labels[name]['coverage'][1]:.1f} / {100 * labels[name]['coverage'][2]:.1f}"
                              for name in frozen.output_names)
            for number, name in enumerate(frozen.output_names):
                entry = labels[name]
                note = (f"{title} model at S/N {sn:g}, {entry['n']} test stars: % within 2 / 3 sigma: {wider}"
                        if number == 0 else "")
                rows.append(Row("uncertainty", f"{title} S/N {sn:g} {name}: % within 1 sigma",
                                100 * entry["coverage"][0], "%",
                                target=Band(*COVERAGE_BAND, f"{COVERAGE_BAND[0]:g}-{COVERAGE_BAND[1]:g} %"),
                                note=note))
                rows.append(Row("uncertainty", f"{title} S/N {sn:g} {name}: std(d/sigma)", entry["z_std"], "",
                                target=Band(*Z_STD_BAND, f"{Z_STD_BAND[0]:g}-{Z_STD_BAND[1]:g}")))
    return rows, details

