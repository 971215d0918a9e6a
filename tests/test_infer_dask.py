"""INFER_SCHEDULER: anna-infer over Dask ``distributed`` on this machine (127.0.0.1 only) against the run in one
process: ``local:2`` and an external cluster (a ``dask scheduler`` and two ``dask worker`` processes, as on a
survey machine) give the same CSV files; a worker killed mid-run still
completes the run with every output written once; an unreachable scheduler is one line and exit status 2; a
bad input is a named failure that does not stop the others; DEBUG packs in row blocks."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

pytest.importorskip("distributed")

from anna.errors import AnnaInputError  # noqa: E402
from anna.infer import run_infer  # noqa: E402
from anna.packs import write_pack  # noqa: E402
from toy_model import WAVE, make_config, toy_flux, toy_stars  # noqa: E402

N_FILES = 200
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The suite's one tiny model (conftest.tiny_model_dir): these tests only read it."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def spectra(tmp_path_factory):
    """N_FILES small 1-D FITS spectra (a few with a NaN on the grid, so flags travel too)."""
    folder = tmp_path_factory.mktemp("spectra")
    _, _, unit = toy_stars(N_FILES, seed=19)
    w1, dw, nw = 5995.0, 0.5, 151
    wave = w1 + dw * np.arange(nw)
    flux = toy_flux(unit, wave)
    flux[::37, 40] = np.nan
    for number, row in enumerate(flux):
        header = fits.Header()
        header["CRVAL1"], header["CDELT1"], header["CRPIX1"] = w1, dw, 1.0
        fits.PrimaryHDU(row, header=header).writeto(folder / f"star{number:04d}.fits")
    return folder


def _config(folder, model_dir, spectra, **keys):
    folder.mkdir(exist_ok=True)
    return make_config(folder, infer_model_loc=model_dir, infer_save_loc=folder / "out", infer_mode="FITS",
                       infer_files=spectra / "*.fits", infer_batch_size=64, jit_compile="NO", **keys)


def _outputs(folder):
    return {path.name: path.read_bytes() for path in sorted((folder / "out").glob("*_infer.out"))}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, model_dir, spectra):
    folder = tmp_path_factory.mktemp("in_process")
    written = run_infer(_config(folder, model_dir, spectra), report=QUIET)
    assert len(written) == N_FILES
    return _outputs(folder)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_local_cluster_gives_the_in_process_files(tmp_path, model_dir, spectra, in_process):
    lines = []
    cfg = _config(tmp_path, model_dir, spectra, infer_scheduler="local:2")
    written = run_infer(cfg, report=lines.append)
    assert len(written) == N_FILES == len(set(written))
    assert _outputs(tmp_path) == in_process  # byte for byte
    assert any(line.startswith("Dask scheduler tcp://127.0.0.1:") and "2 worker(s)" in line for line in lines)
    assert sum(" -> " in line for line in lines) == N_FILES  # the per-input report of a local run
    assert any("tasks done" in line for line in lines)
    # a rerun skips what is complete, as in one process, without starting a cluster
    lines = []
    assert run_infer(cfg, report=lines.append) == []
    assert f"skipped {N_FILES} done" in lines[0]


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """One external 2-worker cluster for the tests that need one (each worker is a process that imports
    TensorFlow); the test that kills a worker runs last."""
    procs, address = _start_cluster(tmp_path_factory.mktemp("cluster"), 2)
    yield address
    _stop(procs)


def _start_cluster(tmp_path, workers):
    """An external cluster on 127.0.0.1: a scheduler process and ``workers`` worker processes without nannies
    (a killed worker stays dead: no replacement imports TensorFlow while the cluster closes); returns
    (processes, address) once every worker has joined."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": tmp_path}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", address.rsplit(":", 1)[1], "--no-dashboard"], **quiet)]
    procs += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
                                "--nthreads", "1", "--no-dashboard"], **quiet) for _ in range(workers)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
    except BaseException:
        _stop(procs)
        raise
    return procs, address


def _stop(procs):
    """Kill the cluster's processes (none has children; a graceful close of a worker took up to 30 s)."""
    for proc in reversed(procs):  # the workers, then the scheduler
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _worker_pids(address):
    from distributed import Client

    with Client(address, timeout=30) as client:
        return sorted(client.run(os.getpid).values())


def test_unreachable_scheduler_one_line_exit_2(tmp_path, model_dir, spectra, capsys):
    from anna.cli import infer_main

    cfg = _config(tmp_path, model_dir, spectra, infer_scheduler=f"tcp://127.0.0.1:{_free_port()}",
                  infer_scheduler_timeout=2)
    started = time.monotonic()
    assert infer_main([cfg.source]) == 2
    assert time.monotonic() - started >= 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "INFER_SCHEDULER" in errors[0] and "within 2 s" in errors[0]
    assert not list((tmp_path / "out").glob("*_infer.out"))


def test_bad_input_is_named_and_the_others_are_written(tmp_path, model_dir, spectra, external_cluster):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("star0000.fits", "star0001.fits"):
        (folder / name).write_bytes((spectra / name).read_bytes())
    (folder / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    lines = []
    cfg = make_config(tmp_path, infer_model_loc=model_dir, infer_save_loc=tmp_path / "out", infer_mode="FITS",
                      infer_files=folder / "*.fits", infer_batch_size=64, jit_compile="NO",
                      infer_scheduler=external_cluster)
    with pytest.raises(AnnaInputError) as caught:
        run_infer(cfg, report=lines.append)
    assert "1 of 3 inputs could not be read" in str(caught.value) and "broken.fits" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["star0000_infer.out", "star0001_infer.out"]
    assert any("broken.fits: FAILED" in line for line in lines)


def test_debug_pack_in_row_blocks(tmp_path, model_dir, external_cluster):
    labels, flux, _ = toy_stars(700, seed=23)
    pack = tmp_path / "stars.pack"
    write_pack(pack, WAVE, np.arange(700) + 5, labels, flux)
    results = {}
    for name, scheduler in (("alone", None), ("dask", external_cluster)):
        keys = {"infer_scheduler": scheduler} if scheduler else {}
        folder = tmp_path / name
        folder.mkdir()
        cfg = make_config(folder, infer_model_loc=model_dir, infer_save_loc=folder / "out", infer_mode="DEBUG",
                          debug_data=pack, infer_batch_size=64, jit_compile="NO", **keys)
        (written,) = run_infer(cfg, report=QUIET)
        results[name] = Path(written).read_bytes()
    assert results["dask"] == results["alone"]
    assert results["alone"].count(b"\n") == 701


def test_external_cluster_and_a_killed_worker(tmp_path, model_dir, spectra, in_process, external_cluster):
    """Over an external 2-worker cluster, one worker is killed (SIGKILL) while the run is under way: its tasks run
    again elsewhere, the run completes, every output is the in-process one and is reported once.  The run is
    this process's own (a thread kills the worker once ten outputs are written): no further TensorFlow start."""
    pids = _worker_pids(external_cluster)
    assert len(pids) == 2
    cfg = _config(tmp_path, model_dir, spectra, infer_scheduler=external_cluster)
    out = tmp_path / "out"
    killed = []

    def kill_mid_run():
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("*_infer.out"))) < 10:
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
        killed.append(len(list(out.glob("*_infer.out"))))

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    lines = []
    killer.start()
    written = run_infer(cfg, report=lines.append)
    killer.join(timeout=130)
    assert killed and killed[0] < N_FILES, killed  # the worker died while inputs were left
    assert sorted(written) == sorted(str(out / name) for name in in_process)
    assert _outputs(tmp_path) == in_process
    reported = [line.rsplit(" -> ", 1)[1].split(" (")[0] for line in lines if " -> " in line]
    assert sorted(reported) == sorted(str(out / name) for name in in_process)  # each exactly once
