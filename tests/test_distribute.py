"""DISTRIBUTE: MIRRORED over two logical CPU devices against one device, MULTI_WORKER as two real worker processes
on 127.0.0.1 (TF_CONFIG, free ports), a worker killed and the run resumed, a bad TF_CONFIG; and the producer's
shards.  Each training run is a process of its own (TensorFlow's devices and cluster are fixed when it starts),
time-limited, with a small network and a few hundred iterations."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anna.augment import BatchProducer, PackRows
from anna.errors import AnnaInputError
from anna.model import LabelScaler, load_frozen
from anna.packs import open_pack
from anna.train.distribute import parse_tf_config
from test_train import write_params

CHILD = str(Path(__file__).with_name("distribute_child.py"))
SMALL = {"NUM_TRAIN_ITERS1": 100, "DO_TRAIN2": "NO", "SAMPLE_INTERVAL": 50, "KEEP_PROB1": 1.0,
         "JIT_COMPILE": "NO", "TBOARD_OUTPUT": "NO"}


def _environment(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def _results(stdout):
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def _start_workers(path, cwd):
    ports = _free_ports(2)
    return [subprocess.Popen([sys.executable, "-c", "import sys; from anna.cli import train_main; "
                              "sys.exit(train_main(sys.argv[1:]))", str(path)], cwd=cwd,
                             env=_environment(TF_CONFIG=_tf_config(ports, index)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for index in range(2)]


def _finish(procs, timeout=240):
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    return outputs


# ----- the cluster description ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    (None, "unset"), ("{not json", "not JSON"), ('{"task": {"type": "worker", "index": 0}}', "no \"cluster\""),
    ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}', "not host:port"),
    ('{"cluster": {"worker": ["127.0.0.1:1234"]}, "task": {"type": "worker", "index": 1}}', "index 1"),
    ('{"cluster": {"worker": ["127.0.0.1:1234"]}, "task": {"type": "chief", "index": 0}}', "type 'chief'"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "parameter"),
])
def test_bad_tf_config_is_named(text, words):
    with pytest.raises(AnnaInputError) as caught:
        parse_tf_config(text)
    assert words in str(caught.value) and "TF_CONFIG" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_tf_config_orders_chief_first():
    text = json.dumps({"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]}, "task": {"type": "worker",
                                                                                       "index": 1}})
    cluster, task_type, index, worker_index, workers = parse_tf_config(text)
    assert (task_type, index, worker_index, workers) == ("worker", 1, 2, 3)


def test_bad_tf_config_one_line_exit_2(tmp_path, toy_packs, monkeypatch, capsys):
    from anna.cli import train_main

    path = write_params(tmp_path, toy_packs, DISTRIBUTE="MULTI_WORKER", **SMALL)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": "127.0.0.1:1"}}')
    assert train_main([str(path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("anna-train: error: TF_CONFIG") and "worker" in errors[0]
    assert not (tmp_path / "model" / "frozen.model").exists()


# ----- the producer's shards ------------------------------------------------------------------------------


def test_worker_shards_draw_their_own_rows_and_stream(toy_packs):
    rows = PackRows(open_pack(toy_packs["train"]))
    scaler = LabelScaler([0, 10], [1, 30])
    whole = BatchProducer(rows, scaler, None, batch_size=16, seed=3, stage=1, fetch=64)
    shards = [BatchProducer(rows, scaler, None, batch_size=16, seed=3, stage=1, fetch=64, shard=(k, 2))
              for k in range(2)]
    labels = rows.labels
    drawn = []
    for k, producer in enumerate(shards):
        flux, _, _ = producer._draw_chunk(0)
        # every drawn spectrum is a row of the worker's shard (rows k, k + 2, ...)
        matches = [np.flatnonzero((rows.flux == spectrum).all(axis=1)) for spectrum in flux]
        assert all(len(m) and all(index % 2 == k for index in m) for m in matches)
        drawn.append(flux)
    assert not np.array_equal(drawn[0], drawn[1])
    # one worker's stream repeats exactly (a resumed worker restarts it at any chunk)
    np.testing.assert_array_equal(shards[0]._draw_chunk(5)[0], shards[0]._draw_chunk(5)[0])
    assert labels.shape[0] == rows.pack.n_stars and whole._draw_chunk(0)[0].shape == (64, rows.npix)


# ----- MIRRORED -------------------------------------------------------------------------------------------


def test_mirrored_over_two_logical_cpus_matches_one_device(tmp_path, toy_packs):
    """Same seed, no dropout: the global batch split over two replicas gives the single-device step (to float32
    rounding of the summed gradients), so the cross-validation costs agree closely."""
    single = write_params(tmp_path, toy_packs, name="none.param", SAVE_LOC=str(tmp_path / "none"), **SMALL)
    mirrored = write_params(tmp_path, toy_packs, name="mirrored.param", SAVE_LOC=str(tmp_path / "mirrored"),
                            DISTRIBUTE="MIRRORED", **SMALL)
    proc = subprocess.run([sys.executable, CHILD, str(single), str(mirrored), "--cpus", "2"], cwd=tmp_path,
                          capture_output=True, text=True, env=_environment(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DISTRIBUTE MIRRORED: 2 replica(s)" in proc.stdout
    none_run, mirrored_run = _results(proc.stdout)
    assert mirrored_run["xval_costs"][-1] < 0.5 * mirrored_run["xval_costs"][0]  # it learned
    np.testing.assert_allclose(mirrored_run["xval_costs"], none_run["xval_costs"], rtol=1e-3)
    model = load_frozen(str(tmp_path / "mirrored"))  # an ordinary frozen model
    assert model.metadata["distribute"] == {"strategy": "MIRRORED", "workers": 1, "replicas": 2,
                                            "devices_per_worker": ["/device:CPU:0", "/device:CPU:1"]}
    reference = load_frozen(str(tmp_path / "none"))
    flux = np.array(open_pack(toy_packs["test"]).flux[:50], dtype=np.float32)
    np.testing.assert_allclose(model.predict_raw(flux), reference.predict_raw(flux), atol=2e-3)


# ----- MULTI_WORKER ---------------------------------------------------------------------------------------


def test_multi_worker_killed_worker_then_restart_resumes_and_writes_one_frozen_model(tmp_path, toy_packs):
    """Two worker processes on 127.0.0.1; one is killed after the first checkpoint, the other ends with one
    line; both started again resume from the checkpoint, train to the end, and the chief alone writes one
    frozen model and TensorBoard's logs (one test, as two runs of the cluster take a minute each)."""
    path = write_params(tmp_path, toy_packs, DISTRIBUTE="MULTI_WORKER",
                        **dict(SMALL, NUM_TRAIN_ITERS1=100, SAMPLE_INTERVAL=20, EARLY_STOP="NO",
                               TBOARD_OUTPUT="YES"))
    checkpoint = tmp_path / "model" / "checkpoint.anna"
    procs = _start_workers(path, tmp_path)
    deadline = time.time() + 180
    while not checkpoint.exists() and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), procs[0].communicate(timeout=30)[1][-3000:]
    procs[1].send_signal(signal.SIGKILL)
    try:  # the survivor's collective fails: it ends by itself, with one line
        _, survivor_err = procs[0].communicate(timeout=150)
    finally:
        procs[0].kill()
        procs[1].wait(timeout=30)
    assert procs[0].returncode == 2, survivor_err[-3000:]
    assert "lost the cluster" in survivor_err and "start every worker again" in survivor_err
    assert not (tmp_path / "model" / "frozen.model").exists()
    outputs = _finish(_start_workers(path, tmp_path))
    for (stdout, stderr), index in zip(outputs, range(2)):
        assert "resuming from" in stdout and f"this is worker {index}" in stdout, stderr[-3000:]
    resumed_at = int(re.search(r"resuming from .*: stage 1, iteration (\d+)", outputs[0][0]).group(1))
    assert 0 < resumed_at < 100
    assert "frozen model written to" in outputs[0][0] and "frozen model written" not in outputs[1][0]
    assert "the chief writes the frozen model" in outputs[1][0]
    # one model and its learning curves, no checkpoint left
    assert sorted(os.listdir(tmp_path / "model")) == ["frozen.model", "learning_curves.png"]
    assert len(os.listdir(tmp_path / "logs")) == 1  # TensorBoard: the chief's run only
    model = load_frozen(str(tmp_path / "model"))
    assert model.metadata["complete"] is True and model.metadata["stages"][0]["iterations"] == 100
    assert model.metadata["distribute"]["workers"] == 2 and model.metadata["distribute"]["replicas"] == 2
    # both workers took the same decisions on the same weights: their interval lines agree
    lines = [[line.split("|")[0] for line in stdout.splitlines() if " iter " in line] for stdout, _ in outputs]
    assert lines[0] == lines[1] and lines[0]
