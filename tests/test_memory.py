"""Batches sized by memory (anna.memory): anna-infer's AUTO batch keeps a wide and a deep network, and MC dropout,
under MAX_MEMORY_GB (peak resident memory of the real command, measured by the operating system); an explicit
batch size is obeyed; results do not depend on the batch size, in anna-infer nor in anna-test's noising.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anna.memory import (ALLOCATOR_FACTOR, HEADROOM_BYTES, MAX_BATCH, MIN_BATCH, PIPELINE_BYTES_PER_PIXEL,
                         plan_batches)
from anna.packs import write_pack

from toy_model import NAMES, make_config, toy_stars

GIB = 1 << 30
# The budget of the command runs: TensorFlow and the model take about 0.7 GB before any batch.
BUDGET_GB = 1.3


def network_model(folder, npix, conv_layers, fc_dims, dropout_rate=0.0, heteroscedastic=False, n=1024):
    """An untrained frozen model of the given layers, with training-domain statistics (as anna-train writes)."""
    from anna.domain import training_domain_statistics
    from anna.model import NetworkSpec, _conv_layer, build_network, save_frozen

    spec = NetworkSpec(npix=npix, nout=3, conv_layers=tuple(_conv_layer(c) for c in conv_layers),
                       fc_dims=tuple(fc_dims), heteroscedastic=heteroscedastic)
    network = build_network(spec, dropout_rate=dropout_rate)
    wave = 5000.0 + np.arange(npix) * 0.5
    flux = 1.0 + np.random.default_rng(1).normal(0.0, 0.01, (200, npix))
    metadata = {"output_names": list(NAMES), "wavelengths": wave.tolist(), "min_params": [4000.0, 1.0, -2.0],
                "max_params": [7000.0, 5.0, 0.5], "mc_dropout_rate": dropout_rate,
                "training_domain": training_domain_statistics(flux)}
    if heteroscedastic:
        metadata["variance_calibration"] = {"model_variance_scale": [1.0, 1.0, 1.0]}
    os.makedirs(folder, exist_ok=True)
    save_frozen(str(folder), network, spec, metadata)
    pack = Path(folder) / "spectra.pack"
    rng = np.random.default_rng(2)
    write_pack(pack, wave, np.arange(1, n + 1), rng.uniform(0, 1, (n, 3)) * [3000, 4, 2.5] + [4000, 1, -2],
               1.0 + rng.normal(0.0, 0.01, (n, npix)))
    return str(folder), str(pack)


def run_measured(folder, model_dir, pack, **keys):
    """anna-infer in a subprocess started through a tiny Python wrapper that reports the child's peak RSS."""
    param = Path(folder) / f"infer_{len(list(Path(folder).glob('infer_*.param')))}.param"
    values = {"INFER_MODE": "DEBUG", "DEBUG_DATA": pack, "INFER_MODEL_LOC": model_dir,
              "INFER_SAVE_LOC": Path(folder) / param.stem, "MAX_MEMORY_GB": BUDGET_GB, "JIT_COMPILE": "NO", **keys}
    param.write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    command = str(Path(sys.executable).parent / "anna-infer")
    wrapper = ("import os, subprocess, sys\n"
               "p = subprocess.Popen(sys.argv[1:])\n"
               "_, status, usage = os.wait4(p.pid, 0)\n"
               "print('PEAK_KB', usage.ru_maxrss, 'STATUS', status, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", wrapper, command, str(param)], capture_output=True, text=True,
                          timeout=600)
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[0] == "PEAK_KB" and last[3] == "0", f"anna-infer failed:\n{done.stdout}\n{done.stderr}"
    return int(last[1]) * 1024 / GIB, done.stdout


def written_values(folder):
    rows = []
    for path in sorted(Path(folder).glob("*_infer.out")):
        with open(path, newline="") as handle:
            rows += list(csv.reader(handle))[1:]
    return rows


# ----------------------------------------------------------------------------------------------------------
# The rule


def test_plan_fits_the_budget_and_an_explicit_count_wins():
    spectrum, npix = 300_000, 2000
    per_spectrum = ALLOCATOR_FACTOR * spectrum + PIPELINE_BYTES_PER_PIXEL * npix
    plan = plan_batches("AUTO", 2.0, spectrum, npix, in_use=0.5 * GIB)
    free = 2.0 * GIB - 0.5 * GIB - HEADROOM_BYTES
    assert plan.batch * per_spectrum <= free < 2 * plan.batch * per_spectrum  # the largest power of two that fits
    assert plan.batch & (plan.batch - 1) == 0 and "AUTO: 1024 spectra" in plan.text
    assert plan_batches("AUTO", 64.0, 1000, 10, in_use=0).batch == MAX_BATCH
    short = plan_batches("AUTO", 0.6, spectrum, npix, in_use=0.5 * GIB)
    assert short.batch == MIN_BATCH and "WARNING" in short.text
    explicit = plan_batches(100, 2.0, spectrum, npix, in_use=0.5 * GIB)
    assert explicit.batch == 100 and "(as set" in explicit.text
    # MC dropout: a call's spectra times (network + passes x repeated part) fit what the batch's reading leaves
    mc = plan_batches("AUTO", 2.0, spectrum, npix, mc_bytes=(20_000, 100), in_use=0.5 * GIB)
    left = free - mc.batch * PIPELINE_BYTES_PER_PIXEL * npix
    assert 1 <= mc.mc_spectra_per_call <= mc.batch
    assert mc.mc_spectra_per_call * ALLOCATOR_FACTOR * (spectrum + 100 * 20_000) <= left


# ----------------------------------------------------------------------------------------------------------
# The real command under a budget


@pytest.mark.parametrize("shape", ["wide", "deep"])
def test_auto_batch_keeps_anna_infer_under_max_memory(tmp_path, shape):
    layers = {"wide": (("32x9", "32x9"), 3000), "deep": (("16x5",) * 6, 2000)}[shape]
    from anna.param_types import ConvLayerList  # CONV_LAYERS' spelling

    conv = ConvLayerList().parse(", ".join(layers[0]), str(tmp_path))
    model_dir, pack = network_model(tmp_path / "model", layers[1], conv, (32,))
    peak, out = run_measured(tmp_path, model_dir, pack)
    assert "INFER_BATCH_SIZE AUTO:" in out
    batch = int(out.split("INFER_BATCH_SIZE AUTO: ")[1].split()[0])
    assert batch < 1024  # the budget, not the pack, set the batch
    assert peak <= BUDGET_GB, f"peak {peak:.2f} GB above MAX_MEMORY_GB {BUDGET_GB} with batch {batch}"
    if shape == "wide":
        # the same run with a batch of the whole pack goes well above the budget: the check above can fail
        peak_big, out_big = run_measured(tmp_path, model_dir, pack, INFER_BATCH_SIZE=1024)
        assert "INFER_BATCH_SIZE 1024 (as set" in out_big
        assert peak_big > BUDGET_GB and peak_big > peak + 0.25, (
            f"peak {peak_big:.2f} GB with 1024 spectra per batch, {peak:.2f} GB with AUTO's {batch}")
        # and the results are the same whatever the batch
        values = np.array([row[1:4] for row in written_values(tmp_path / "infer_0")], dtype=float)
        values_big = np.array([row[1:4] for row in written_values(tmp_path / "infer_1")], dtype=float)
        np.testing.assert_allclose(values, values_big, rtol=1e-5, atol=1e-5)


def test_mc_dropout_auto_stays_under_max_memory(tmp_path):
    from anna.param_types import ConvLayerList

    # dropout after the convolution: MC dropout repeats the whole dense part on 96,000-float rows, 100 times
    conv = ConvLayerList().parse("32x9d", str(tmp_path))
    model_dir, pack = network_model(tmp_path / "model", 3000, conv, (32,), dropout_rate=0.1,
                                    heteroscedastic=True, n=96)
    peak, out = run_measured(tmp_path, model_dir, pack, UNCERTAINTY="MC_DROPOUT", MC_SAMPLES=100)
    assert "MC dropout:" in out
    assert peak <= BUDGET_GB, f"peak {peak:.2f} GB above MAX_MEMORY_GB {BUDGET_GB}"
    rows = written_values(tmp_path / "infer_0")
    assert len(rows) == 96 and all(np.isfinite(float(row[4])) for row in rows)  # teff_err


# ----------------------------------------------------------------------------------------------------------
# Results do not depend on the batch size


@pytest.fixture(scope="module")
def toy_model_dir(tiny_model_dir):
    """The suite's one tiny model (conftest.tiny_model_dir): this test only reads it."""
    return tiny_model_dir


def test_results_do_not_depend_on_the_batch_size(tmp_path, toy_model_dir):
    from anna.evaluate import run_test
    from anna.infer import run_infer

    labels, flux, _ = toy_stars(700, seed=8)
    wave = 6000.0 + np.arange(64) * 1.0
    write_pack(tmp_path / "stars.pack", wave, np.arange(1, 701), labels, flux)
    template = tmp_path / "sn.template"
    template.write_text("".join(f"{w:.1f} {0.5 + 0.5 * np.sin(w / 7.0) ** 2:.4f}\n" for w in np.arange(5990, 6075)))
    outputs = {}
    for batch in (16, 100, "AUTO"):
        lines = []
        cfg = make_config(tmp_path, infer_model_loc=toy_model_dir, infer_mode="DEBUG",
                          debug_data=tmp_path / "stars.pack", infer_save_loc=tmp_path / f"infer_{batch}",
                          infer_batch_size=batch, test_model_loc=toy_model_dir,
                          testing_data=tmp_path / "stars.pack", test_save_loc=tmp_path / f"test_{batch}",
                          test_batch_size=batch, preprocess_test="YES", sn_range_test="20, 200",
                          rel_cont_e_test="-0.01, 0.01", seed=3,
                          sn_template_test=template)
        run_infer(cfg, report=lines.append)
        run_test(cfg, report=lines.append)
        expected = "AUTO:" if batch == "AUTO" else f"{batch} (as set"
        assert any(line.startswith(f"INFER_BATCH_SIZE {expected}") for line in lines)
        assert any(line.startswith(f"TEST_BATCH_SIZE {expected}") for line in lines)
        inferred = np.array([row[1:4] for row in written_values(tmp_path / f"infer_{batch}")], dtype=float)
        with open(tmp_path / f"test_{batch}" / "test_stats.out", newline="") as handle:
            tested = np.array([row[1:] for row in list(csv.reader(handle))[1:]], dtype=float)
        outputs[batch] = inferred, tested
    for batch in (100, "AUTO"):
        # to float32 rounding: 1e-5 relative, or 1e-5 absolute for values near zero (spans here are 2.5 to 3000)
        np.testing.assert_allclose(outputs[batch][0], outputs[16][0], rtol=1e-5, atol=1e-5)
        # the test noise is drawn per block of stars, not per batch: the same noisy spectra, the same S/N column
        np.testing.assert_array_equal(outputs[batch][1][:, -1], outputs[16][1][:, -1])
        # true and inferred values (d = true - inferred follows; near zero it shows the inferred value's rounding)
        np.testing.assert_allclose(outputs[batch][1][:, :6], outputs[16][1][:, :6], rtol=1e-5, atol=1e-5)
