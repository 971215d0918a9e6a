"""The console commands themselves, run as a user runs them: anna-quickstart (shortened), anna-synth, anna-pack,
and ``--check`` of every shipped parameter file in configs/ against anna-synth's output.

One shortened quickstart run (module fixture) is checked for what it prints and writes; its TensorBoard events
and profiler trace are read back for their content.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anna.packs import open_pack

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.param"))
LABELS = ("teff", "logg", "feh", "vmic", "vsini")  # the example data's labels, as the shipped configs name them


def command(name):
    """Path of an installed console script (setup.cfg entry points), beside this Python."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed beside {sys.executable} (pip install -e .)"
    return str(path)


def run(args, cwd, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def shortened(config, folder, **keys):
    """A copy of a shipped parameter file with some keys replaced (the rest, comments included, as shipped)."""
    lines = []
    for line in Path(config).read_text().splitlines():
        key = line.split(":", 1)[0].strip()
        lines.append(f"{key}: {keys.pop(key)}" if key in keys else line)
    lines += [f"{key}: {value}" for key, value in keys.items()]
    path = Path(folder) / Path(config).name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """anna-quickstart with the packaged quickstart.param cut to 40 + 20 iterations (its --config option), no
    XLA compilation, and the profiler trace on; returns (work folder, stdout)."""
    folder = tmp_path_factory.mktemp("quickstart")
    config = shortened(ROOT / "configs" / "quickstart.param", folder, NUM_TRAIN_ITERS1=40, NUM_TRAIN_ITERS2=20,
                       SAMPLE_INTERVAL=20, JIT_COMPILE="NO", TIMELINE_OUTPUT="YES")
    out = run([command("anna-quickstart"), "work", "--config", str(config)], cwd=folder, timeout=900)
    return folder / "work", out


def test_quickstart_runs_the_pipeline_and_reports_what_it_wrote(quickstart):
    work, out = quickstart
    for step in ("1/4 generating example data", "2/4 anna-train", "3/4 anna-test", "4/4 anna-infer"):
        assert f"== {step}" in out
    summary = json.loads((work / "run" / "test" / "test_summary.json").read_text())
    assert summary["n_stars"] == 1000 and sorted(summary["labels"]) == sorted(LABELS)
    with open(work / "run" / "infer" / "star_multispec_infer.out", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 90
    star = json.loads((work / "example_data" / "star_labels.json").read_text())
    assert f"example star: {len(rows)} spectra inferred" in out
    # the printed comparison is the inference output's mean and std, and the star's true labels
    for name in LABELS:
        values = np.array([float(row[name]) for row in rows])
        assert np.isfinite(values).all()
        line = re.search(rf"^\s*{name}: true\s+(\S+)\s+inferred\s+(\S+) ±\s+(\S+)", out, re.M)
        assert line, name
        assert float(line.group(1)) == pytest.approx(star[name], abs=5e-4)
        assert float(line.group(2)) == pytest.approx(values.mean(), abs=5e-4)
        assert float(line.group(3)) == pytest.approx(values.std(), abs=5e-4)


def test_quickstart_training_events_hold_the_logged_curves(quickstart):
    """The TensorBoard event file of the training run holds cost/batch, cost/xval, rms/<label> and
    learning_rate at each of the 3 progress evaluations (2 in stage 1, 1 in stage 2), and its cost/xval values
    are those printed on the progress lines."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, out = quickstart
    [run_dir] = (work / "run" / "logs").glob("run-*")
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["tensors"])
    expected = {"cost/batch", "cost/xval", "learning_rate", *(f"rms/{name}" for name in LABELS)}
    assert expected <= tags, sorted(tags)
    for tag in expected:
        assert [event.step for event in accumulator.Tensors(tag)] == [20, 40, 60], tag
    logged = [float(tf.make_ndarray(event.tensor_proto)) for event in accumulator.Tensors("cost/xval")]
    printed = [float(value) for value in re.findall(r"xval cost (\S+)", out)]
    assert len(printed) == 3
    np.testing.assert_allclose(logged, printed, rtol=1e-5)
    rates = [float(tf.make_ndarray(event.tensor_proto)) for event in accumulator.Tensors("learning_rate")]
    np.testing.assert_allclose(rates, [5e-4, 5e-4, 5e-5], rtol=1e-6)  # LEARN_RATE1, LEARN_RATE1, LEARN_RATE2


def test_quickstart_profiler_trace_holds_the_training_steps(quickstart):
    """TIMELINE_OUTPUT: one XSpace trace of the last interval, with thousands of timed events, among them
    the training steps' operations: the network's layers (conv1, fc1) forward and their gradients."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    work, _ = quickstart
    [trace] = (work / "run" / "logs").glob("run-*/plugins/profile/*/*.xplane.pb")
    space = xplane_pb2.XSpace()
    space.ParseFromString(trace.read_bytes())
    events = [(plane, event) for plane in space.planes for line in plane.lines for event in line.events]
    assert len(events) > 1000
    names = {plane.event_metadata[event.metadata_id].name for plane, event in events}
    for part in ("conv1", "fc1"):
        layer = [name for name in names if f"/{part}" in name]
        assert any(not name.startswith("gradient_tape/") for name in layer), (part, sorted(names)[:50])
        assert any(name.startswith("gradient_tape/") for name in layer), (part, sorted(names)[:50])
    assert all(event.duration_ps >= 0 for _, event in events)


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    """Example data on one of anna-synth's grids, made on first use: (folder, stdout).  The tutorial grid's
    come from anna-synth itself (a few dozen spectra); for the survey grids, whose line list takes anna-synth
    ~10 s to set up, packs of flat spectra with labels inside the example ranges (what --check reads)."""
    from anna import synth
    from anna.packs import write_pack

    made = {}

    def make(grid):
        if grid not in made:
            folder = tmp_path_factory.mktemp(f"synth_{grid}")
            if grid == "tutorial":
                out = run([command("anna-synth"), "data", "--n-train", "40", "--n-xval", "12", "--n-test", "12",
                           "--n-apertures", "3", "--seed", "4"], cwd=folder)
            else:
                wave, out = example_grid_wavelengths(grid), ""
                rng = np.random.default_rng(4)
                (folder / "data").mkdir()
                for kind, count in (("train", 40), ("xval", 12), ("test", 12)):
                    labels = synth.draw_labels(count, rng)
                    write_pack(folder / "data" / f"{kind}.pack", wave, np.arange(count) + 1, labels,
                               1.0 - 0.01 * rng.random((count, wave.size)))
            made[grid] = (folder / "data", out)
        return made[grid]

    return make


def example_grid_wavelengths(name):
    from anna import synth

    return {"tutorial": synth.default_grid, "apogee": synth.apogee_grid, "lamost": synth.lamost_grid}[name]()


def example_grid(npix):
    """(name, wavelengths) of the anna-synth grid with ``npix`` pixels."""
    grids = {name: example_grid_wavelengths(name) for name in ("tutorial", "apogee", "lamost")}
    matches = [name for name, grid in grids.items() if grid.size == npix]
    assert matches, f"no anna-synth grid has {npix} pixels: give this config example data in this test"
    return matches[0], grids[matches[0]]


def untrained_frozen_model(folder, config, grid):
    """A tiny untrained frozen model with ``config``'s labels and ranges on ``grid``: what anna-test and
    anna-infer --check open."""
    from anna.model import NetworkSpec, build_network, save_frozen
    from anna.params import load_config

    cfg = load_config(config)
    spec = NetworkSpec(npix=grid.size, nout=len(cfg.output_names), conv_layers=((5, 2),), fc_dims=(8, 8))
    save_frozen(str(folder), build_network(spec), spec,
                {"output_names": list(cfg.output_names), "wavelengths": list(grid),
                 "min_params": list(cfg.min_params), "max_params": list(cfg.max_params)})
    return folder


def test_synth_writes_the_example_data_set(example_data):
    from anna.fits_io import read_spectra

    data, out = example_data("tutorial")
    for kind, name in (("train", "train.pack"), ("xval", "xval.pack"), ("test", "test.pack"),
                       ("multispec", "star_multispec.fits"), ("star_labels", "star_labels.json")):
        assert re.search(rf"^\s*{kind}: data/{name}$", out, re.M), (kind, out)
    counts = {kind: open_pack(data / f"{kind}.pack", expected_npix=1001, expected_nout=5).n_stars
              for kind in ("train", "xval", "test")}
    assert counts == {"train": 40, "xval": 12, "test": 12}
    assert len(read_spectra(data / "star_multispec.fits")) == 3


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_config_passes_check(config, example_data, tmp_path, capsys):
    """Every configs/*.param validates for anna-train, anna-test and anna-infer and opens what it names: the
    shipped templates (../templates) as they are, the data paths pointed at example data on the anna-synth grid
    of the config's NUM_PX (anna-synth's own output for the tutorial grid, so anna-train accepts what
    anna-synth writes), the model paths at an untrained frozen model with the config's labels.  anna-train --check runs as the console command; anna-test and anna-infer
    --check load the model with TensorFlow, so they run in this process through the functions the commands
    call (anna.cli.test_main, infer_main)."""
    from anna.cli import infer_main, test_main
    from anna.params import load_config

    grid_name, grid = example_grid(load_config(config).num_px)
    data, _ = example_data(grid_name)
    model = untrained_frozen_model(tmp_path / "model", config, grid)
    paths = {"TRAINING_DATA": data / "train.pack", "XVAL_DATA": data / "xval.pack",
             "TESTING_DATA": data / "test.pack", "DEBUG_DATA": data / "test.pack",
             "MS_FITS_IMAGE": data / "star_multispec.fits", "SAVE_LOC": tmp_path / "new_model",
             "LOG_LOC": tmp_path / "logs", "TEST_MODEL_LOC": model, "TEST_SAVE_LOC": tmp_path / "test",
             "INFER_MODEL_LOC": model, "INFER_SAVE_LOC": tmp_path / "infer"}
    present = {line.split(":", 1)[0].strip() for line in config.read_text().splitlines()}
    overrides = [arg for key, value in paths.items() if key in present for arg in ("--set", f"{key}={value}")]
    out = run([command("anna-train"), str(config), "--check", *overrides], cwd=config.parent)
    assert "valid for anna-train" in out and f"n_stars=40, npix={grid.size}" in out, out
    for stage, main in (("test", test_main), ("infer", infer_main)):
        assert main([str(config), "--check", *overrides]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert f"valid for anna-{stage}" in printed and f"frozen model: {grid.size} px" in printed, printed
        assert not (tmp_path / stage).exists()  # a check writes nothing
    assert not (tmp_path / "new_model").exists()


def test_pack_resamples_between_samples_within_the_cubic_bound(tmp_path):
    """anna-pack on text spectra of f = 1 + A sin(2 pi x / P) + slope, sampled irregularly (0.12-0.17 A), onto a
    grid whose points all fall between samples: every pixel is within the four-point interpolation bound
    A (2 pi / P)^4 h^4 / 24 of f (tests/test_resample.py), labels and ids as in the CSV."""
    amplitude, period = 0.1, 2.0
    rng = np.random.default_rng(3)
    names, rows = [], []
    for number in range(3):
        x = 6600.0 + np.cumsum(rng.uniform(0.12, 0.17, 1700))
        phase = rng.uniform(0, 2 * np.pi)
        flux = 1.0 + amplitude * np.sin(2 * np.pi * (x - 6600.0) / period + phase) + 1e-4 * (x - 6700.0)
        np.savetxt(tmp_path / f"{501 + number}.txt", np.c_[x, flux])
        names.append(f"{501 + number}.txt")
        rows.append((501 + number, phase, float(np.diff(x).max())))
    (tmp_path / "labels.csv").write_text("star_id,phase,h\n" + "".join(f"{i},{p!r},{h!r}\n" for i, p, h in rows))
    grid = np.arange(6625.0, 6825.0, 0.2)
    np.savetxt(tmp_path / "grid.template", np.c_[grid, np.ones_like(grid)])
    out = run([command("anna-pack"), *names, "--labels", "labels.csv", "--grid", "grid.template", "--out",
               "built.pack"], cwd=tmp_path)
    assert "wrote built.pack" in out
    pack = open_pack(tmp_path / "built.pack", expected_npix=grid.size, expected_nout=2)
    np.testing.assert_array_equal(pack.ids, [501, 502, 503])
    np.testing.assert_array_equal(pack.labels, [[phase, h] for _, phase, h in rows])
    for row, (_, phase, h) in enumerate(rows):
        expected = 1.0 + amplitude * np.sin(2 * np.pi * (grid - 6600.0) / period + phase) + 1e-4 * (grid - 6700.0)
        error = np.abs(np.asarray(pack.flux[row]) - expected)
        bound = amplitude * (2 * np.pi / period) ** 4 * h**4 / 24
        assert error.max() <= bound and error.max() > bound / 100, (row, error.max(), bound)
