"""anna-tune end to end through the console command: a search killed with -9 mid-trial and the rerun that
completes it (what it writes, pruning of a bad region), two processes sharing one SQLite study, and bad
TUNE_SPACE entries; plus the parameter-file rewriting that best.param and each trial.param use."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from anna.params import load_config  # noqa: E402

BAD_RATE = "1e-07"  # a learning rate at which nothing is learnt in a trial's few iterations
PNG = b"\x89PNG\r\n\x1a\n"


def command(name):
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed beside {sys.executable} (pip install -e .)"
    return str(path)


def environment():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}


def write_search(folder, packs, **keys):
    """A search over a tiny network on the toy packs: one stage of 60 iterations, a cost every 20."""
    values = {
        "NUM_PX": 64, "CONV1_SHAPE": "1, 7, 1, 4", "FC1_OUTDIM": 16, "FC2_OUTDIM": 16, "NUM_OUTS": 2,
        "OUTPUT_NAMES": "a, b", "MIN_PARAMS": "0, 10", "MAX_PARAMS": "1, 30",
        "LEARN_RATE1": "2e-3", "NUM_TRAIN_ITERS1": 60, "BATCH_SIZE1": 32, "KEEP_PROB1": 0.9, "DO_TRAIN2": "NO",
        "SN_RANGE_TRAIN": "100, 200", "SN_TEMPLATE": os.path.relpath(packs["sn_template"], folder),
        "NUM_FETCH": 128, "MAX_PP_DEPTH": 512, "TRAINING_DATA": os.path.relpath(packs["train"], folder),
        "SAVE_LOC": "search", "SAMPLE_INTERVAL": 20, "TBOARD_OUTPUT": "NO", "TRAINING_XVAL": "YES",
        "XVAL_DATA": os.path.relpath(packs["xval"], folder), "XVAL_SIZE": 100, "SEED": 3, "JIT_COMPILE": "NO",
        "TUNE_SPACE": f"LEARN_RATE1=choice(3e-3 | {BAD_RATE}); KEEP_PROB1=float(0.8, 1.0); FC1_OUTDIM=int(8, 16)",
        "TUNE_TRIALS": 4, "TUNE_PRUNER": "MEDIAN", "TUNE_PRUNE_STARTUP": 1, "TUNE_PRUNE_WARMUP": 0,
    }
    values.update(keys)
    path = Path(folder) / "search.param"
    path.write_text("# a tiny search\n" + "".join(f"{key}: {value}   # {key.lower()}\n"
                                                   for key, value in values.items() if value is not None))
    return path


def tune(param, *extra, timeout=240):
    return subprocess.run([command("anna-tune"), str(param), *extra], cwd=param.parent, capture_output=True,
                          text=True, timeout=timeout, env=environment())


def study_trials(folder, name="search"):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'search' / 'tune.db'}")
    return study.get_trials()


def counted(trial):
    return trial.state.name in ("COMPLETE", "PRUNED") or (trial.state.name == "FAIL"
                                                          and "fail_reason" in trial.user_attrs)


def start_and_kill_mid_trial(param, folder, *extra):
    """Start anna-tune, wait until its first trial is training, kill -9 it."""
    process = subprocess.Popen([command("anna-tune"), str(param), *extra], cwd=param.parent,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    log = folder / "search" / "trials" / "search" / "trial-0000" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "stage 1 iter" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the first trial never started training"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_search_killed_then_rerun_writes_best_param_model_csv_plots_and_prunes_the_bad_region(tmp_path, toy_packs):
    # SEED 1 draws the learning rates bad (trial 0), good, bad, good, bad: the bad ones after a good trial
    # completed meet a median to be pruned against (the assertions below hold for any draws that have one)
    param = write_search(tmp_path, toy_packs, SEED=1)
    # the first start's trial is long, so the kill comes mid-trial; overrides may change between starts
    start_and_kill_mid_trial(param, tmp_path, "--set", "NUM_TRAIN_ITERS1=2000")
    assert [t.state.name for t in study_trials(tmp_path)] == ["RUNNING"]  # left behind by the killed process
    result = tune(param)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 4 and all("| best " in line for line in lines), result.stdout  # one line per trial
    save = tmp_path / "search"
    with open(save / "tune_trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["trial"] for row in rows] == ["0", "1", "2", "3", "4"]
    # the killed trial is lost and not counted; the rerun finished TUNE_TRIALS others
    assert rows[0]["state"] == "LOST" and "process ended" in rows[0]["reason"]
    assert sum(counted(t) for t in study_trials(tmp_path)) == 4
    rows = rows[1:]
    assert {row["state"] for row in rows} <= {"COMPLETE", "PRUNED"}
    # once a good trial has set the median, a bad rate is pruned at its first interval (a good one may be too,
    # when it is behind the median there: with one trial finished, the median is that trial)
    first_good = min(int(row["trial"]) for row in rows if row["LEARN_RATE1"] != BAD_RATE)
    assert rows[first_good - 1]["state"] == "COMPLETE"
    bad_after_good = [row for row in rows if row["LEARN_RATE1"] == BAD_RATE and int(row["trial"]) > first_good]
    assert bad_after_good, rows
    for row in bad_after_good:
        assert row["state"] == "PRUNED" and row["reason"].startswith("pruned at interval 1 "), row
        assert float(row["xval_cost"]) > 5 * float(rows[first_good - 1]["xval_cost"])
        # anna-train's run ended there by its caller's word, and left a whole frozen model saying so
        with zipfile.ZipFile(Path(row["folder"]) / "frozen.model") as archive:
            stage = json.loads(archive.read("metadata.json"))["stages"][-1]
        assert stage["stopped_by"] == "caller" and stage["iterations"] == 20 and stage["caller_reason"] == row["reason"]
    complete = [row for row in rows if row["state"] == "COMPLETE"]
    best = min(complete, key=lambda row: float(row["xval_cost"]))
    # best.param: the user's file, comments kept, the best values in, ready for anna-train
    text = (save / "best.param").read_text()
    assert text.startswith("# a tiny search\n") and f"LEARN_RATE1: {best['LEARN_RATE1']}" in text
    assert f"KEEP_PROB1: {best['KEEP_PROB1']}" in text and "# keep_prob1" in text
    best_cfg = load_config(save / "best.param")
    assert best_cfg.fc1_outdim == int(best["FC1_OUTDIM"]) and best_cfg.training_data == toy_packs["train"]
    assert best_cfg.save_loc == str(save / "best") and best_cfg.num_train_iters1 == 60
    check = subprocess.run([command("anna-train"), str(save / "best.param"), "--check"], capture_output=True,
                           text=True, timeout=120, env=environment())
    assert check.returncode == 0 and "valid for anna-train" in check.stdout, check.stdout + check.stderr
    # the model beside it is the best trial's, byte for byte
    trial_model = Path(best["folder"]) / "frozen.model"
    assert (save / "frozen.model").read_bytes() == trial_model.read_bytes()
    for name in ("tune_history", "tune_slice_LEARN_RATE1", "tune_slice_KEEP_PROB1", "tune_slice_FC1_OUTDIM"):
        assert (save / f"{name}.png").read_bytes()[:8] == PNG, name
    # importances need two complete trials (the median may prune a good one too: see above)
    assert (save / "tune_importance.png").exists() == (len(complete) >= 2)
    assert ("parameter importances need two complete trials" in result.stdout) == (len(complete) < 2)
    # the study is complete: another start runs nothing more
    again = tune(param)
    assert again.returncode == 0 and "4 of 4 trials done" in again.stdout
    assert not [line for line in again.stdout.splitlines() if line.startswith("trial ")]


def test_two_processes_share_one_sqlite_study(tmp_path, toy_packs):
    param = write_search(tmp_path, toy_packs, TUNE_PRUNER="NONE", TUNE_SPACE="KEEP_PROB1=float(0.8, 1.0)",
                         NUM_TRAIN_ITERS1=20, TUNE_TRIALS=3)
    processes = [subprocess.Popen([command("anna-tune"), str(param)], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=environment()) for _ in range(2)]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    trials = study_trials(tmp_path)
    done = [trial for trial in trials if counted(trial)]
    assert len(done) == 3, [(t.number, t.state, t.user_attrs) for t in trials]  # exactly TUNE_TRIALS together
    assert {trial.user_attrs["pid"] for trial in done} == {process.pid for process in processes}  # both worked
    folders = [trial.user_attrs["folder"] for trial in done]
    assert len(set(folders)) == 3  # no trial ran twice
    for folder in folders:  # each folder holds one run (one start of stage 1)
        assert (Path(folder) / "train.log").read_text().count("stage 1: learning rate") == 1
    for name in ("tune_history", "tune_importance", "tune_slice_KEEP_PROB1"):
        assert (tmp_path / "search" / f"{name}.png").read_bytes()[:8] == PNG, name


def test_bad_search_space_entries_each_get_a_line_and_exit_2(tmp_path, toy_packs):
    space = ("LEARN_RATEX=log(1e-5, 3e-3); FC1_OUTDIM=int(64, 5x12); KEEP_PROB1=float(0.6, 1.5); "
             "BATCH_SIZE1=choice(64 | | 256); PP_THREADS=int(1, 4); FC2_OUTDIM=float(1, 4); "
             "LEARN_RATE2=log(3e-3, 1e-5); OPTIMIZER=choice(ADAM | SGD); DO_TRAIN2=maybe(1); KEEP_PROB2=float(0.5, 1)")
    param = write_search(tmp_path, toy_packs, TUNE_SPACE=space, TUNE_PRUNER="SOMETIMES")
    result = tune(param, "--check")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    space_line = next(number for number, line in enumerate(param.read_text().splitlines(), 1)
                      if line.startswith("TUNE_SPACE"))
    located = [line for line in lines if f"search.param:{space_line}: TUNE_SPACE: entry" in line]
    assert [line.split("entry ")[1].split(":")[0] for line in located] == [str(n) for n in range(1, 10)], lines
    for fragment in ("did you mean LEARN_RATE1", "'5x12'", "probability must be in (0, 1]", "empty choice",
                     "PP_THREADS: does not decide", "use int(...) or choice(...)", "not below high bound",
                     "choice 'SGD'", "unknown kind 'maybe'"):
        assert sum(fragment in line for line in located) == 1, (fragment, lines)
    assert any("TUNE_PRUNER" in line for line in lines) and len(lines) == 10  # the other key's problem too
    assert not (tmp_path / "search").exists()  # nothing written
    # a value each key accepts alone, but anna-train refuses in this file: --check tries every bound and choice
    param = write_search(tmp_path, toy_packs, TUNE_SPACE="CONV1_SHAPE=choice(1, 7, 1, 4 | 1, 90, 1, 4)")
    result = tune(param, "--check")
    assert result.returncode == 2 and "CONV1_SHAPE=1, 90, 1, 4: anna-train refuses it" in result.stderr
    assert "kernel width 90 exceeds" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # without a cross-validation set there is nothing to score a trial by
    param = write_search(tmp_path, toy_packs, TRAINING_XVAL="NO")
    result = tune(param, "--check")
    assert result.returncode == 2 and "TRAINING_XVAL: must be YES for anna-tune" in result.stderr


def test_refused_values_fail_with_their_reason_and_count_and_the_time_limit_stops_the_search(tmp_path, toy_packs):
    from anna.tune import run_tune

    lines = []
    param = write_search(tmp_path, toy_packs, TUNE_SPACE="CONV1_SHAPE=choice(1, 80, 1, 4 | 1, 90, 1, 4)",
                         TUNE_TRIALS=2, TUNE_MINUTES=1e-6,
                         TUNE_PRUNER="HYPERBAND")
    summary = run_tune(load_config(param), report=lines.append)
    assert summary["stopped_by"] == "TUNE_MINUTES" and summary["counted"] == 0
    assert any("TUNE_MINUTES (1e-06) reached" in line for line in lines)
    summary = run_tune(load_config(param, overrides=["TUNE_MINUTES="]), report=lines.append)
    # every trial is refused by anna-train's checks (kernel wider than NUM_PX): failed, with the reason, counted
    assert summary["states"]["FAIL"] == 2 and summary["counted"] == 2 and summary["best"] is None
    rows = list(csv.DictReader(open(tmp_path / "search" / "tune_trials.csv", newline="")))
    assert [row["state"] for row in rows] == ["FAIL", "FAIL"]
    assert all(row["reason"].startswith("values refused: ") and "exceeds the 64 pixels" in row["reason"]
               for row in rows), rows
    assert "no trial completed: no best.param yet" in lines and not (tmp_path / "search" / "best.param").exists()


def test_filled_parameter_file_keeps_comments_and_adds_what_the_file_lacks(tmp_path):
    from anna.tune.param_file import filled_parameter_text

    (tmp_path / "data").mkdir()
    source = tmp_path / "data" / "my.param"
    source.write_text("# heading\nNUM_PIX: 64      # alias spelling\nLEARN_RATE1: 1e-3  # rate\n"
                      "TRAINING_DATA: train.pack\n\n# end\n")
    cfg = load_config(source, overrides=["FC2_OUTDIM=24"])
    text = filled_parameter_text(cfg, {"LEARN_RATE1": "0.000123456", "NUM_PX": "64", "KEEP_PROB1": "0.85"},
                                 "filled in")
    assert text.splitlines() == [
        "# heading", "NUM_PIX: 64      # alias spelling", "LEARN_RATE1: 0.000123456 # rate",
        f"TRAINING_DATA: {tmp_path / 'data' / 'train.pack'}", "", "# end", "", "# filled in",
        "FC2_OUTDIM: 24", "KEEP_PROB1: 0.85"]
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "copy.param"
    copy.write_text(text)
    again = load_config(copy)
    assert again.training_data == cfg.training_data and again.fc2_outdim == 24 and again.learn_rate1 == 0.000123456


def test_interval_scores_reach_the_trial_and_a_non_finite_cost_or_the_time_limit_ends_the_run():
    from anna.tune.search import _Scorer

    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    scorer = _Scorer(trial, deadline=None)
    record = {"stage": 1, "iteration": 20, "xval_cost": 0.5}
    assert scorer(record) is None and scorer({**record, "iteration": 40, "xval_cost": 0.25}) is None
    assert study.trials[0].intermediate_values == {1: 0.5, 2: 0.25}  # one step per sample interval
    assert scorer({**record, "xval_cost": float("nan")}) == "non-finite cross-validation cost"
    assert _Scorer(study.ask(), deadline=time.monotonic() - 1)(record) == "TUNE_MINUTES reached"
