"""The command line as a user meets it, through the installed console scripts in subprocesses: a quiet start
(stderr checked line by line), input errors found before TensorFlow loads, progress with an ETA (a bar on a
terminal, plain lines otherwise, with and without tqdm), a model's uncertainties by default, ``--version``,
``anna-info``, and the plots (learning curves, residuals against S/N, σ coverage, inference histograms).

One small MC-dropout model is trained with anna-train (module fixture) and tested and inferred with; a
terminal is a pseudo-terminal of 100 columns.
"""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from anna.atomic import file_sha256
from anna.progress import FileProgress, StageProgress, format_duration
from anna.runtime import runtime_notices
from conftest import make_toy_packs

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("anna-train", "anna-test", "anna-infer", "anna-spectra", "anna-synth", "anna-pack", "anna-quickstart",
            "anna-info")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Python started so that importing TensorFlow, Keras (or tqdm) fails: what a command does before it needs them
BLOCKED = "import sys; sys.modules.update(dict.fromkeys({names!r})); from anna.cli import {entry}; " \
          "sys.exit({entry}(sys.argv[1:]))"


def command(name):
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed beside {sys.executable} (pip install -e .)"
    return str(path)


def environment():
    """The user's environment: nothing set for TensorFlow (the commands set what they need)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(args, cwd, expect=0):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment())
    assert result.returncode == expect, f"{args[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def run_blocked(entry, args, cwd, blocked=("tensorflow", "keras"), expect=2):
    code = BLOCKED.format(names=tuple(blocked), entry=entry)
    return run([sys.executable, "-c", code, *map(str, args)], cwd, expect=expect)


def run_on_terminal(args, cwd):
    """Run with stdout on a pseudo-terminal (100 columns) and stderr on a pipe; returns (exit status, what the
    terminal received, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env=environment())
    os.close(slave)
    received = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not data:
            break
        received.append(data)
    os.close(master)
    stderr = process.stderr.read().decode()
    process.wait(timeout=600)
    return process.returncode, b"".join(received).decode("utf-8", errors="replace"), stderr


def write_param(path, **keys):
    path.write_text("".join(f"{key}: {value}\n" for key, value in keys.items()))
    return path


def is_png(path):
    data = Path(path).read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 10000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """anna-train on toy packs (two labels), MC_DROPOUT, 120 iterations in intervals of 20; returns (folder,
    packs, the run's CompletedProcess)."""
    folder = tmp_path_factory.mktemp("command_line")
    packs = make_toy_packs(folder)
    param = write_param(folder / "train.param", NUM_PX=64, NUM_OUTS=2, OUTPUT_NAMES="a, b", MIN_PARAMS="0, 10",
                        MAX_PARAMS="1, 30", CONV_LAYERS="4x5", FC_DIMS="16, 16", TRAINING_DATA=packs["train"],
                        TRAINING_XVAL="YES", XVAL_DATA=packs["xval"], XVAL_SIZE=300,
                        SN_TEMPLATE=packs["sn_template"], SN_RANGE_TRAIN="20, 100", NUM_TRAIN_ITERS1=120,
                        BATCH_SIZE1=32, LEARN_RATE1=0.003, KEEP_PROB1=0.9, DO_TRAIN2="NO", SAMPLE_INTERVAL=20,
                        MC_SAMPLES=20, JIT_COMPILE="NO", TBOARD_OUTPUT="NO", SAVE_LOC="run/model", SEED=3)
    result = run([command("anna-train"), param, "--set", "UNCERTAINTY=MC_DROPOUT"], folder)
    return folder, packs, result


# ----------------------------------------------------------------------------------------------------------
# A quiet start


def test_training_starts_quietly_and_gives_an_eta_per_interval_and_learning_curves(trained):
    folder, _, result = trained
    assert result.stderr.splitlines() == []
    intervals = [line for line in result.stdout.splitlines() if re.match(r"stage 1 iter +\d+:", line)]
    assert len(intervals) == 6
    for line in intervals[:-1]:
        assert re.search(r"\| ETA \d+ (s|min \d\d s)$", line), line
    assert "ETA" not in intervals[-1]  # the stage is done
    curves = folder / "run" / "model" / "learning_curves.png"
    assert f"learning curves in {curves}" in result.stdout and is_png(curves)


def test_test_and_infer_start_quietly_with_the_model_uncertainties_and_plots(trained):
    folder, packs, _ = trained
    test_param = write_param(folder / "test.param", TEST_MODEL_LOC="run/model", TEST_SAVE_LOC="run/test",
                             TESTING_DATA=packs["test"], PREPROCESS_TEST="YES", SN_RANGE_TEST="5, 200",
                             REL_CONT_E_TEST="-0.005, 0.005", SN_TEMPLATE_TEST=packs["sn_template"], MC_SAMPLES=20,
                             SEED=1)
    # anna-test runs while the two anna-infer runs below do (separate output folders; checked at the end)
    with ThreadPoolExecutor(1) as pool:
        testing = pool.submit(run, [command("anna-test"), test_param], folder)
        check_infer_on_terminals(folder, packs)
        result = testing.result()
    assert result.stderr.splitlines() == []
    assert "MC-dropout uncertainties from 20 passes" in result.stdout  # not asked for: the model's capability
    assert re.search(r"^anna-test: 400 spectra in [\d.]+ s \([\d,]+ spectra/s\)$", result.stdout, re.M)
    header = (folder / "run" / "test" / "test_stats.out").read_text().splitlines()[0].split(",")
    assert {"a_err", "b_err", "a_err_model", "b_err_pred", "sn"} <= set(header)
    for name in ("residuals_vs_sn.png", "sigma_coverage.png", "uncertainty_calibration.png", "a_test.png"):
        assert is_png(folder / "run" / "test" / name), name


def check_infer_on_terminals(folder, packs):
    """anna-infer on the trained model, on a terminal: with tqdm (a bar) and without it (plain lines)."""
    # anna-infer over text spectra, on a terminal: one bar, the per-file lines only with --verbose
    spectra = folder / "spectra"
    spectra.mkdir()
    from anna.packs import open_pack

    pack = open_pack(packs["test"])
    for number in range(12):
        np.savetxt(spectra / f"star{number:02d}.txt", np.c_[pack.wavelengths, pack.flux[number]])
    infer_param = write_param(folder / "infer.param", INFER_MODEL_LOC="run/model", INFER_SAVE_LOC="run/infer",
                              INFER_FILES="spectra/*.txt", INFER_PLOTS="YES", MC_SAMPLES=20)
    status, terminal, stderr = run_on_terminal([command("anna-infer"), str(infer_param), "--verbose"], folder)
    assert status == 0 and stderr.splitlines() == [], terminal + stderr
    assert re.search(r"anna-infer: +\d+%\|.*\| 12/12 ", terminal), terminal  # tqdm's bar, drawn with \r
    lines = terminal.replace("\r\n", "\n").split("\n")
    assert sum(bool(re.search(r"\[\d+/12\] .*star\d\d\.txt: 1 spectra", line)) for line in lines) == 12
    assert re.search(r"^anna-infer: 12 files, 12 spectra in [\d.]+ s", terminal.replace("\r", "\n"), re.M)
    output = (folder / "run" / "infer" / "star00_infer.out").read_text().splitlines()
    assert output[0] == ("star_id,a,b,a_err,b_err,a_err_model,b_err_model,a_err_pred,b_err_pred,noise,noise_source,"
                         "bad_pixel_fraction,flags")
    assert is_png(folder / "run" / "infer" / "infer_histograms.png")

    # UNCERTAINTY: NONE given explicitly turns them off; without tqdm the terminal gets plain lines, no bar
    code = BLOCKED.format(names=("tqdm",), entry="infer_main")
    status, terminal, stderr = run_on_terminal([sys.executable, "-c", code, str(infer_param), "--set",
                                                "UNCERTAINTY=NONE", "--set", "INFER_SAVE_LOC=run/plain"], folder)
    assert status == 0 and stderr.splitlines() == [], terminal + stderr
    lines = [line for line in terminal.replace("\r\n", "\n").split("\n") if line]
    assert "\r" not in terminal.replace("\r\n", "\n") and not any("star00.txt" in line for line in lines)
    assert re.match(r"anna-infer: 12 files, 12 spectra in [\d.]+ s \([\d,]+ spectra/s\)$", lines[-1]), lines
    output = (folder / "run" / "plain" / "star00_infer.out").read_text().splitlines()
    assert output[0] == "star_id,a,b,bad_pixel_fraction,flags"


def test_debug_shows_what_the_runtime_prints(trained, tmp_path):
    """--debug shows every line TensorFlow's runtime prints when it starts (whatever this machine makes it
    print): the lines of a bare import and GPU search all appear, timestamps aside.  (Without --debug the
    same --check is quiet: the test and infer runs above.)"""
    folder, packs, _ = trained
    # the bare import runs while the command does (two processes, each on its own)
    bare = subprocess.Popen([sys.executable, "-c", "import keras, tensorflow as tf; "
                             "tf.config.list_physical_devices('GPU')"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())

    def messages(text):
        return {line.split("] ", 1)[-1] for line in text.splitlines() if line.strip()}

    param = write_param(tmp_path / "check.param", TEST_MODEL_LOC=folder / "run" / "model",
                        TEST_SAVE_LOC=tmp_path / "out", TESTING_DATA=packs["test"])
    try:
        result = run([command("anna-test"), param, "--check", "--debug"], tmp_path)
    finally:
        _, bare_stderr = bare.communicate(timeout=600)
    assert messages(bare_stderr) <= messages(result.stderr), (bare_stderr, result.stderr)


def test_runtime_output_is_sifted_to_what_matters():
    caught = "\n".join([
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796143088.732629   19050 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
        "GPU will not be used.",
        "I0000 00:00:1796143088.8   19050 cpu_feature_guard.cc:210] oneDNN custom operations are on.",
        "E0000 00:00:1796143089.746882   19050 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: UNKNOWN ERROR (303)"])
    assert runtime_notices(caught, gpus_seen=False, gpu_present=False) == ([], [])
    notices, passed_on = runtime_notices(caught, gpus_seen=False, gpu_present=True)
    assert passed_on == [] and len(notices) == 1
    assert notices[0].startswith("a GPU is present but TensorFlow cannot use it (failed call to cuInit")
    assert runtime_notices(caught, gpus_seen=True, gpu_present=True) == ([], [])
    unknown = "E0000 00:00:1796143089.7 19050 some_op.cc:12] could not open the pool file"
    assert runtime_notices(caught + "\n" + unknown + "\nplain text", False, False) == ([], [unknown, "plain text"])


# ----------------------------------------------------------------------------------------------------------
# Input errors before TensorFlow: each verb in an interpreter where importing TensorFlow or Keras fails


def test_input_errors_are_found_before_tensorflow_loads(trained, tmp_path):
    folder, packs, _ = trained
    model = folder / "run" / "model"
    truncated = tmp_path / "truncated.pack"
    truncated.write_bytes(Path(packs["test"]).read_bytes()[:-8 * 5])
    cases = {
        "test_main": (write_param(tmp_path / "test.param", TEST_MODEL_LOC=model, TEST_SAVE_LOC=tmp_path / "t",
                                  TESTING_DATA=truncated),
                      f"anna-test: error: {truncated}: pack holds"),
        "train_main": (folder / "train.param", f"anna-train: error: {truncated}: pack holds"),
        "infer_main": (write_param(tmp_path / "infer.param", INFER_MODEL_LOC=model, INFER_SAVE_LOC=tmp_path / "i",
                                   INFER_FILES=tmp_path / "list.txt"),
                       "anna-infer: error: "),
    }
    (tmp_path / "list.txt").write_text("missing_one.fits\n")
    for entry, (param, start) in cases.items():
        for extra in ([], ["--check"]):
            override = ["--set", f"TRAINING_DATA={truncated}"] if entry == "train_main" else []
            result = run_blocked(entry, [param, *override, *extra], tmp_path)
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(start), (entry, extra, result.stderr)
    assert "missing_one.fits" in lines[0]
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "frozen.model").write_bytes(b"not a zip")
    result = run_blocked("test_main", [cases["test_main"][0], "--set", f"TEST_MODEL_LOC={bad_model}",
                                       "--set", f"TESTING_DATA={packs['test']}"], tmp_path)
    assert result.stderr.splitlines() == [f"anna-test: error: {bad_model / 'frozen.model'}: frozen model is "
                                          "corrupted or not a frozen model (BadZipFile: File is not a zip file)"]
    # the console script itself: exactly the one line, nothing of TensorFlow's
    result = run([command("anna-test"), cases["test_main"][0]], tmp_path, expect=2)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"anna-test: error: {truncated}: pack holds"), result.stderr


def test_check_refuses_mc_dropout_without_dropout_in_the_last_stage(trained, tmp_path):
    folder, _, _ = trained
    result = run_blocked("train_main", [folder / "train.param", "--check", "--set", "UNCERTAINTY=MC_DROPOUT",
                                        "--set", "KEEP_PROB1=1"], tmp_path)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "KEEP_PROB1" in lines[0] and "MC_DROPOUT" in lines[0], lines
    good = run_blocked("train_main", [folder / "train.param", "--check"], tmp_path, expect=0)  # no TensorFlow
    assert good.stderr == "" and "valid for anna-train" in good.stdout


# ----------------------------------------------------------------------------------------------------------
# --version and anna-info


def test_every_command_answers_version_without_tensorflow(tmp_path):
    import tensorflow as tf

    from anna import __version__

    python = ".".join(map(str, sys.version_info[:3]))
    with ThreadPoolExecutor(2) as pool:  # two commands at a time
        results = list(pool.map(lambda name: run([command(name), "--version"], tmp_path), COMMANDS))
    for name, result in zip(COMMANDS, results):
        assert result.stdout.splitlines() == [f"{name} (ANNA-TF) {__version__}, TensorFlow {tf.__version__}, "
                                              f"Python {python}"]
        assert result.stderr == ""
    entry = run_blocked("info_main", ["--version"], tmp_path, expect=0)
    assert entry.stdout.startswith("anna-info (ANNA-TF)")


def test_anna_info_describes_the_model_without_tensorflow(trained, tmp_path):
    folder, packs, _ = trained
    result = run([command("anna-info"), folder / "run" / "model"], tmp_path)
    assert result.stderr == ""
    text = result.stdout
    blocked = run_blocked("info_main", [folder / "run" / "model"], tmp_path, expect=0)
    assert blocked.stdout == text  # the same without TensorFlow
    assert "network: 4x5 | 16, 16;" in text and "; variance head" in text
    assert re.search(r"^ +a  0 \.\. 1$", text, re.M) and re.search(r"^ +b  10 \.\. 30$", text, re.M)
    assert "grid: 64 px, 5000.000-5012.600 A, step 0.2 A" in text
    assert f"sha256 {file_sha256(packs['train'])}" in text
    assert re.search(r"^  UNCERTAINTY: MC_DROPOUT$", text, re.M) and re.search(r"^  KEEP_PROB1: 0.9$", text, re.M)
    assert re.search(r"^stage 1: 120 iterations in \d+ s, ended by iterations; best xval cost", text, re.M)
    assert "uncertainties: MC_DROPOUT by default" in text
    # the calibration (mean d^2/sigma^2 before -> after, median sigma) and its sigma factor at each S/N level
    assert "calibration of sigma (cross-validation set at 6 S/N levels)" in text
    assert re.search(r"^ +a  [\d.]+ -> [\d.]+, [\d.]+$", text, re.M)
    # S/N levels of 100 .. 20 from the highest down, those the noise estimate cannot tell apart pooled with "+"
    # (64-pixel spectra: lines dominate DER_SNR at high S/N), and one factor per knot for each label
    header = re.search(r"^  sigma factor by S/N \(sqrt of the variance factor\), S/N (.+):$", text, re.M)
    knots = header.group(1).split(" / ")
    assert "+".join(knots).split("+") == ["100", "72.5", "52.5", "38.1", "27.6", "20"]
    assert re.search(r"^ +b  [\d.]+( / [\d.]+){%d}$" % (len(knots) - 1), text, re.M)
    assert "training-domain statistics: yes (1500 spectra)" in text
    assert re.search(r"TensorFlow \d+\.\d+", text)
    missing = run([command("anna-info"), tmp_path], tmp_path, expect=2)
    assert missing.stderr.splitlines() == [f"anna-info: error: {tmp_path / 'frozen.model'}: no frozen model here "
                                           "(train first, or point TEST_MODEL_LOC/INFER_MODEL_LOC at the folder "
                                           "holding frozen.model)"]


# ----------------------------------------------------------------------------------------------------------
# The progress figures themselves (a clock of our own)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_lines_come_at_each_tenth_after_a_quiet_start():
    clock, lines = Clock(), []
    progress = FileProgress("anna-infer", report=lines.append, clock=clock, period=30.0, quiet_seconds=5.0)
    progress.start(100)
    for number in range(100):
        clock.now += 0.125  # 12.5 s in all: the first 5 s (40 files) say nothing
        progress.advance(3, text=f"file {number}")
    progress.close()
    assert not any(line.startswith("file ") for line in lines)  # per-file lines only when verbose
    assert lines[0] == "anna-infer: 40/100 files, 120 spectra, 24 spectra/s, ETA 8 s"
    assert [line.split(",")[0] for line in lines[:-1]] == [f"anna-infer: {n}/100 files" for n in range(40, 100, 10)]
    assert lines[-1] == "anna-infer: 100 files, 300 spectra in 12.5 s (24 spectra/s)"


def test_stage_eta_is_the_nearer_of_the_iteration_limit_and_the_time_budget():
    clock = Clock()
    progress = StageProgress(lambda text: None, 1, total=1000, max_seconds=60.0, clock=clock)
    clock.now = 10.0
    assert progress.eta(100, elapsed=10.0) == (50.0, "time limit")  # 900 iterations need 90 s; 50 s are left
    assert progress.eta_text(100, 10.0) == " | ETA 50 s (time limit)"
    resumed = StageProgress(lambda text: None, 2, total=1000, max_seconds=None, start_iteration=500, clock=clock)
    clock.now = 20.0
    assert resumed.eta(600, elapsed=100.0) == (40.0, "iterations")  # 100 iterations in 10 s, 400 to go
    assert format_duration(3725) == "1 h 02 min" and format_duration(200) == "3 min 20 s"


def test_a_stage_on_a_terminal_draws_a_bar_with_its_eta_between_its_lines():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    clock, lines = Clock(), []
    with os.fdopen(slave, "w") as terminal:
        def report(text):
            lines.append(text)
            print(text, file=terminal, flush=True)

        progress = StageProgress(report, 1, total=200, max_seconds=None, stream=terminal, clock=clock)
        clock.now = 5.0
        progress.tick(50, elapsed=5.0)
        progress.line("stage 1 iter     50: a line" + progress.eta_text(50, 5.0))
        clock.now = 10.0
        progress.tick(100, elapsed=10.0)
        progress.close()
    received = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        received += data
    os.close(master)
    text = received.decode()
    assert lines == ["stage 1 iter     50: a line | ETA 15 s"]
    assert re.search(r"stage 1 .* 50/200 \[.*ETA 15 s\]", text), text
    assert re.search(r"stage 1 .* 100/200 \[.*ETA 10 s\]", text), text
    assert "stage 1 iter     50: a line | ETA 15 s\r\n" in text
