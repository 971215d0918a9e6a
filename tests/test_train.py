"""anna-train end to end on small packs: learning, two stages, early stopping, determinism, frozen model,
TensorBoard served by the real tensorboard, interruption and resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from anna.augment import noisy_copy
from anna.model import load_frozen
from anna.packs import open_pack
from anna.params import load_config
from anna.templates import relative_sn_on_grid
from anna.train import run_training
from conftest import make_toy_packs

QUIET = lambda *_: None  # noqa: E731


def write_params(tmp_path, packs, name="train.param", **overrides):
    """A small-network parameter file over the toy packs; keyword arguments override keys."""
    values = {
        "NUM_PX": 64, "CONV1_SHAPE": "1, 7, 1, 4", "FC1_OUTDIM": 32, "FC2_OUTDIM": 16, "NUM_OUTS": 2,
        "OUTPUT_NAMES": "a, b", "MIN_PARAMS": "0, 10", "MAX_PARAMS": "1, 30",
        "LEARN_RATE1": 2e-3, "NUM_TRAIN_ITERS1": 300, "BATCH_SIZE1": 32, "KEEP_PROB1": 0.9,
        "DO_TRAIN2": "YES", "LEARN_RATE2": 2e-4, "NUM_TRAIN_ITERS2": 100, "BATCH_SIZE2": 64, "KEEP_PROB2": 1.0,
        "PREPROCESS_TRAIN": "YES", "REL_CONT_E_TRAIN": "-0.005, 0.005", "SN_RANGE_TRAIN": "100, 200",
        "SN_TEMPLATE": packs["sn_template"], "NUM_FETCH": 256, "TRAINING_DATA": packs["train"],
        "SAVE_LOC": str(tmp_path / "model"), "SAMPLE_INTERVAL": 50, "PP_THREADS": 1, "MAX_PP_DEPTH": 1024,
        "LOG_LOC": str(tmp_path / "logs"), "TBOARD_OUTPUT": "YES", "TIMELINE_OUTPUT": "NO",
        "TRAINING_XVAL": "YES", "XVAL_DATA": packs["xval"], "XVAL_SIZE": 200, "PREPROCESS_XVAL": "YES",
        "EARLY_STOP": "YES", "ES_SAMPLE": 100, "SEED": 7,
    }
    values.update(overrides)
    path = tmp_path / name
    path.write_text("".join(f"{key}: {value}\n" for key, value in values.items() if value is not None))
    return path


def xval_cost_of(model, cfg):
    """Recompute the xval cost of a frozen model exactly as training defines it (fixed-seed noise)."""
    pack = open_pack(cfg.xval_data, max_stars=cfg.xval_size)
    rel = relative_sn_on_grid(cfg.sn_template, pack.wavelengths)
    meta_seed = model.metadata["seed"]
    flux, _ = noisy_copy(np.array(pack.flux), rel, cfg.sn_range_train, cfg.rel_cont_e_train, seed=(meta_seed, 7919))
    pred = model.predict_raw(flux.astype(np.float32))[:, :model.nout]
    truth = model.scaler.normalise(np.array(pack.labels))
    return float(np.mean(np.mean((pred - truth) ** 2, axis=1)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One two-stage run over the toy packs, shared by the tests that only read what it wrote (the frozen model,
    the history, the TensorBoard logs): (cfg, result)."""
    folder = tmp_path_factory.mktemp("trained")
    packs = make_toy_packs(folder)
    # CONTINUUM and BAD_PIXEL_FILL change nothing in this training (no pixels are dropped); the model records them
    cfg = load_config(write_params(folder, packs, CONTINUUM="SPLINE", BAD_PIXEL_FILL="CONTINUUM"))
    result = run_training(cfg, report=QUIET)
    return cfg, result


def test_learns_two_stages_and_freezes_stage2_best(trained):
    cfg, result = trained
    history = result["history"]
    stage1 = [h for h in history if h["stage"] == 1]
    stage2 = [h for h in history if h["stage"] == 2]
    assert len(stage1) == 6 and len(stage2) == 2
    assert stage1[-1]["xval_cost"] < 0.25 * stage1[0]["xval_cost"]  # the cost falls
    assert stage1[-1]["batch_cost"] < stage1[0]["batch_cost"]
    assert set(stage1[-1]["rms"]) == {"a", "b"}
    s1, s2 = result["stages"]
    assert s2["best_cost"] <= s1["best_cost"]
    model = load_frozen(cfg.save_loc)
    # the frozen model is stage 2's best: its xval cost is exactly the one recorded for stage 2
    assert xval_cost_of(model, cfg) == pytest.approx(s2["best_cost"], rel=1e-5)
    assert model.metadata["complete"] is True
    assert model.metadata["bad_pixel_fill"] == "CONTINUUM" and model.metadata["continuum"]["method"] == "SPLINE"
    assert model.output_names == ("a", "b")
    np.testing.assert_array_equal(model.wavelengths, open_pack(cfg.training_data).wavelengths)
    assert model.metadata["training_pack"]["sha256"] and model.metadata["parameters"]["NUM_PX"] == 64
    assert not os.path.exists(os.path.join(cfg.save_loc, "checkpoint.anna"))  # finished: checkpoint removed


def test_rms_is_physical_units(trained):
    cfg, result = trained
    model = load_frozen(cfg.save_loc)
    pack = open_pack(cfg.xval_data, max_stars=cfg.xval_size)
    rel = relative_sn_on_grid(cfg.sn_template, pack.wavelengths)
    flux, _ = noisy_copy(np.array(pack.flux), rel, cfg.sn_range_train, cfg.rel_cont_e_train,
                         seed=(model.metadata["seed"], 7919))
    d = model.predict(flux) - np.array(pack.labels)
    rms = np.sqrt(np.mean(d ** 2, axis=0))
    best = min((h for h in result["history"] if h["stage"] == 2), key=lambda h: h["xval_cost"])
    np.testing.assert_allclose([best["rms"]["a"], best["rms"]["b"]], rms, rtol=1e-4)
    assert rms[1] > rms[0]  # label b spans 20 units, a spans 1


def test_frozen_model_reloads_in_fresh_process(trained, tmp_path):
    cfg, _ = trained
    pack = open_pack(cfg.xval_data, max_stars=20)
    expected = load_frozen(cfg.save_loc).predict(np.array(pack.flux))
    script = (f"import numpy as np; from anna.model import load_frozen; from anna.packs import open_pack;"
              f"p = open_pack({cfg.xval_data!r}, max_stars=20);"
              f"np.save({str(tmp_path / 'pred.npy')!r}, load_frozen({cfg.save_loc!r}).predict(np.array(p.flux)))")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), expected)


def test_xval_cost_identical_across_evaluations(trained):
    """The xval cost is reproducible: worked out here by hand (fixed-seed noise as in training, physical
    predictions scaled by MIN_PARAMS / MAX_PARAMS of write_params), it equals the cost training recorded for
    the frozen model, and the helper the other tests use gives the same value."""
    cfg, result = trained
    model = load_frozen(cfg.save_loc)
    pack = open_pack(cfg.xval_data, max_stars=cfg.xval_size)
    flux, _ = noisy_copy(np.array(pack.flux), relative_sn_on_grid(cfg.sn_template, pack.wavelengths),
                         (100.0, 200.0), (-0.005, 0.005), seed=(7, 7919))
    low, high = np.array([0.0, 10.0]), np.array([1.0, 30.0])
    by_hand = float(np.mean(((model.predict(flux) - np.array(pack.labels)) / (high - low)) ** 2))
    assert by_hand == pytest.approx(result["stages"][-1]["best_cost"], rel=1e-5)
    assert xval_cost_of(model, cfg) == pytest.approx(by_hand, rel=1e-5)


def test_early_stopping_triggers_and_restores_best(tmp_path, toy_packs):
    cfg = load_config(write_params(tmp_path, toy_packs, LEARN_RATE1=0.05, NUM_TRAIN_ITERS1=3000, ES_SAMPLE=3,
                                   SAMPLE_INTERVAL=20, DO_TRAIN2="NO", TBOARD_OUTPUT="NO"))
    result = run_training(cfg, report=QUIET)
    stage = result["stages"][0]
    assert stage["stopped_early"] and stage["iterations"] < 3000
    costs = [h["xval_cost"] for h in result["history"]]
    assert costs[-1] > stage["best_cost"]  # the last interval was worse than the best one...
    model = load_frozen(cfg.save_loc)
    assert xval_cost_of(model, cfg) == pytest.approx(stage["best_cost"], rel=1e-5)  # ...and best was restored


@pytest.mark.parametrize("jit", ["NO", "YES"])
def test_seed_makes_cpu_runs_repeatable(tmp_path, toy_packs, jit):
    runs = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        cfg = load_config(write_params(folder, toy_packs, NUM_TRAIN_ITERS1=100, NUM_TRAIN_ITERS2=50,
                                       TBOARD_OUTPUT="NO", JIT_COMPILE=jit))
        run_training(cfg, report=QUIET)
        runs.append(load_frozen(cfg.save_loc).network.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tensorboard_serves_the_scalars(trained):
    cfg, _ = trained
    port = _free_port()
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    command = [tensorboard] if os.path.exists(tensorboard) else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(command + ["--logdir", cfg.log_loc, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        tags = {}
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.load(r)
                if tags:
                    break
            except OSError:
                pass
            time.sleep(1)
        run_tags = next(iter(tags.values()))
        for tag in ("cost/batch", "cost/xval", "rms/a", "rms/b", "learning_rate", "examples_per_second"):
            assert tag in run_tags, f"{tag} missing from {sorted(run_tags)}"
        run = next(iter(tags))
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={run}&tag=cost/xval"
        with urllib.request.urlopen(url, timeout=10) as r:
            points = json.load(r)
        assert len(points) == 8  # 6 intervals in stage 1 + 2 in stage 2
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/histograms/tags", timeout=10) as r:
            hist_tags = next(iter(json.load(r).values()))
        assert any(t.startswith("weights/") for t in hist_tags)
        assert any(t.startswith("activations/") for t in hist_tags)
        kernel_tag = next(t for t in hist_tags if t.startswith("weights/") and "conv1" in t and "kernel" in t)
        url = f"http://127.0.0.1:{port}/data/plugin/histograms/histograms?run={run}&tag={kernel_tag}"
        with urllib.request.urlopen(url, timeout=10) as r:
            first_histogram = json.load(r)[0][2]  # [wall time, step, [[left, right, count], ...]]
        kernel_size = int(np.prod(load_frozen(cfg.save_loc).network.get_layer("conv1").kernel.shape))
        assert len(first_histogram) == 30 and sum(count for _, _, count in first_histogram) == kernel_size
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_timeline_output_writes_profile(tmp_path, toy_packs):
    cfg = load_config(write_params(tmp_path, toy_packs, NUM_TRAIN_ITERS1=100, DO_TRAIN2="NO",
                                   TIMELINE_OUTPUT="YES"))
    result = run_training(cfg, report=QUIET)
    traces = [os.path.join(d, f) for d, _, files in os.walk(result["run_dir"]) for f in files
              if f.endswith(".xplane.pb")]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def _cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-c", "import sys; from anna.cli import train_main; "
                           "sys.exit(train_main(sys.argv[1:]))"] + args, cwd=cwd, capture_output=True, text=True,
                          **kw)


def test_cli_missing_param_file_is_one_line_exit_2(tmp_path):
    out = _cli(["missing.param"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "missing.param" in out.stderr and "Traceback" not in out.stderr


def test_cli_check_validates_without_training(tmp_path, toy_packs):
    path = write_params(tmp_path, toy_packs)
    out = _cli([str(path), "--check"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "training pack" in out.stdout and not (tmp_path / "model" / "frozen.model").exists()
    out = _cli([str(path), "--check", "--set", "NUM_PX=65"], tmp_path)
    assert out.returncode == 2 and "NUM_PX=65" in out.stderr


def _start_training(path):
    return subprocess.Popen([sys.executable, "-u", "-c", "import sys; from anna.cli import train_main; "
                             "sys.exit(train_main(sys.argv[1:]))", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(checkpoint, newer_than=None, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoint.exists() and (newer_than is None or checkpoint.stat().st_mtime_ns > newer_than):
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint written")


def test_sigterm_stops_cleanly_with_usable_model(tmp_path, toy_packs):
    path = write_params(tmp_path, toy_packs, NUM_TRAIN_ITERS1=100000, SAMPLE_INTERVAL=20, DO_TRAIN2="NO",
                        TBOARD_OUTPUT="NO", ES_SAMPLE=100000)
    proc = _start_training(path)
    _wait_for_checkpoint(tmp_path / "model" / "checkpoint.anna")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGTERM" in stdout and "usable frozen model" in stdout and "s after the signal" in stdout
    model = load_frozen(tmp_path / "model")
    assert model.metadata["complete"] is False and model.metadata["stages"][0]["iterations"] >= 20
    # whole like a finished run's model: the training-domain statistics were computed before it was written
    assert model.metadata["training_domain"]["n"] == 1500
    assert model.metadata["model_parts"]["training_domain"]["status"] == "computed"
    assert np.all(np.isfinite(model.predict(np.ones((2, 64)))))


RESUMED_ITERS = 400  # stage 1 of the kill -9 test: long enough that the kill always comes mid-stage


def test_kill9_then_rerun_resumes_where_it_stopped(tmp_path, toy_packs, capsys):
    from anna.train import read_checkpoint

    # the kill comes right after the second checkpoint (iteration 40); the rest of the stage is the resume's
    path = write_params(tmp_path, toy_packs, NUM_TRAIN_ITERS1=RESUMED_ITERS, SAMPLE_INTERVAL=20, DO_TRAIN2="NO",
                        TBOARD_OUTPUT="NO", ES_SAMPLE=100000)
    checkpoint = tmp_path / "model" / "checkpoint.anna"
    proc = _start_training(path)
    _wait_for_checkpoint(checkpoint)
    _wait_for_checkpoint(checkpoint, newer_than=checkpoint.stat().st_mtime_ns)
    proc.kill()
    proc.communicate(timeout=60)
    state, _ = read_checkpoint(checkpoint)
    stopped_at = state["iteration"]
    assert 20 <= stopped_at < RESUMED_ITERS and not (tmp_path / "model" / "frozen.model").exists()

    changed = write_params(tmp_path, toy_packs, name="changed.param", NUM_TRAIN_ITERS1=RESUMED_ITERS,
                           SAMPLE_INTERVAL=20, DO_TRAIN2="NO", TBOARD_OUTPUT="NO", ES_SAMPLE=100000, LEARN_RATE1=0.1)
    # refused by the entry point in this process (the command's own exit status is checked by the resume below)
    from anna.cli import train_main

    capsys.readouterr()
    assert train_main([str(changed)]) == 2
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "LEARN_RATE1" in refused[0] and "checkpoint" in refused[0], refused

    out = _cli([str(path)], tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resuming from {checkpoint}: stage 1, iteration {stopped_at}" in out.stdout
    first_line = next(line for line in out.stdout.splitlines() if line.startswith("stage 1 iter"))
    assert int(first_line.split()[3].rstrip(":")) == stopped_at + 20  # continues, does not restart at 20
    model = load_frozen(tmp_path / "model")
    assert model.metadata["complete"] is True
    assert model.metadata["stages"][0]["iterations"] == RESUMED_ITERS
    assert not checkpoint.exists()


def test_starnet_like_network_is_one_config_away(tmp_path, toy_packs):
    """Two conv layers + max-pooling + two dense layers (StarNet's shape) trains through the same builder.  In the
    plain graph form: JIT_COMPILE AUTO on a pooled network (timing every form, then XLA) is
    tests/test_networks.py's seed test, and it would time and compile this network's forms for this test alone."""
    cfg = load_config(write_params(tmp_path, toy_packs, CONV2_SHAPE="1, 5, 1, 8", POOL_SIZE=4, DO_TRAIN2="NO",
                                   TBOARD_OUTPUT="NO", JIT_COMPILE="NO"))
    result = run_training(cfg, report=QUIET)
    model = load_frozen(cfg.save_loc)
    layer_names = [layer.name for layer in model.network.layers]
    assert {"conv1", "conv2", "pool2"} <= set(layer_names)
    assert model.network.get_layer("pool2").output.shape[1] == 64 // 4
    history = result["history"]
    assert history[-1]["xval_cost"] < 0.5 * history[0]["xval_cost"]


def test_interrupted_rerun_never_replaces_a_finished_model(tmp_path, toy_packs):
    path = write_params(tmp_path, toy_packs, NUM_TRAIN_ITERS1=60, SAMPLE_INTERVAL=20, DO_TRAIN2="NO",
                        TBOARD_OUTPUT="NO", JIT_COMPILE="NO")
    # the finished run in this process (how it was made does not matter: the plain graph form, nothing compiled
    # by XLA for it); the interrupted rerun is the command
    assert run_training(load_config(path), report=QUIET)["stages"][0]["iterations"] == 60
    finished = tmp_path / "model" / "frozen.model"
    before = finished.read_bytes()
    longer = write_params(tmp_path, toy_packs, name="longer.param", NUM_TRAIN_ITERS1=100000, SAMPLE_INTERVAL=20,
                          DO_TRAIN2="NO", TBOARD_OUTPUT="NO", ES_SAMPLE=100000)
    proc = _start_training(longer)
    _wait_for_checkpoint(tmp_path / "model" / "checkpoint.anna")
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert finished.read_bytes() == before  # the finished run's model is untouched
    partial = tmp_path / "model" / "frozen.partial.model"
    assert str(partial) in stdout and load_frozen(partial).metadata["complete"] is False
