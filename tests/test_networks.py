"""The networks surveys use: CONV_LAYERS / FC_DIMS, pooling after any convolution, stride, conv dropout; the
pooling layer's two forms; format-1 frozen models; JIT_COMPILE AUTO; SEED with pooling under every form."""

import io
import json
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from anna.errors import AnnaInputError
from anna.model import (ConvLayer, NetworkSpec, SpectrumMaxPool1D, build_network, compile_mc_forward,
                        load_frozen, save_frozen)
from anna.params import load_config, network_layers, validate_for_stage
from anna.train import choose_compiled_form, run_training
from anna.train.steps import TRIAL_GIVE_UP_FRACTION, TRIAL_ORDER, time_compiled_form

from test_train import QUIET, write_params

# The seeds' survey networks in CONV_LAYERS / FC_DIMS spelling (shared/seeds/): StarNet2017 (Fabbro et al.),
# astroNN's ApogeeCNN (conv 2x8, 4x8, pool 4, dense 196/96, dropout after every layer) and the LAMOST CNN
# (astroNN BayesianCNNBase: three convolutions, dropout after the first two, pooling after the third).
SURVEY_NETWORKS = {
    "starnet2017": ("4x8, 16x8p4", "256, 128"),
    "apogee_cnn": ("2x8d, 4x8p4d", "196, 96"),
    "lamost_cnn": ("8x5d, 16x5d, 32x5p2", "256, 128"),
}


def _config(tmp_path, text):
    path = tmp_path / "net.param"
    path.write_text(text)
    return load_config(path)


def test_conv_layers_parse_every_suffix(tmp_path):
    cfg = _config(tmp_path, "NUM_PX: 500\nCONV_LAYERS: 4x8, 16X8s2p4d\nFC_DIMS: 64, 32, 16\n")
    convs, dense = network_layers(cfg)
    assert convs == [{"kernels": 4, "width": 8, "stride": 1, "pool": 1, "dropout": False},
                     {"kernels": 16, "width": 8, "stride": 2, "pool": 4, "dropout": True}]
    assert dense == (64, 32, 16)


def test_anna_spellings_still_describe_the_same_network(tmp_path):
    anna = _config(tmp_path, "NUM_PX: 500\nCONV1_SHAPE: 1, 8, 1, 4\nCONV2_SHAPE: 1, 8, 1, 16\nPOOL_SIZE: 4\n"
                             "FC1_OUTDIM: 256\nFC2_OUTDIM: 128\n")
    listed = _config(tmp_path, "NUM_PX: 500\nCONV_LAYERS: 4x8, 16x8p4\nFC_DIMS: 256, 128\n")
    assert NetworkSpec.from_config(anna, 500, 3) == NetworkSpec.from_config(listed, 500, 3)
    # the legacy (width, kernels) pairs with a pool after the last convolution are the same spec too
    assert NetworkSpec(npix=500, nout=3, conv_layers=((8, 4), (8, 16)), pool_size=4, fc_dims=(256, 128)) == \
        NetworkSpec.from_config(listed, 500, 3)


@pytest.mark.parametrize("line, expected", [
    ("CONV_LAYERS: 4x", "CONV_LAYERS: item 1 '4x': expected KxW[sS][pP][d]"),
    ("CONV_LAYERS: 4x8, 16*8", "CONV_LAYERS: item 2 '16*8': expected KxW[sS][pP][d]"),
    ("CONV_LAYERS: 0x8", "CONV_LAYERS: item 1 '0x8': kernels must be positive"),
    ("CONV_LAYERS: 4x8p0", "CONV_LAYERS: item 1 '4x8p0': pool must be positive"),
    ("FC_DIMS: 256, 0", "FC_DIMS: expected comma-separated positive integers; item 2 '0' is not positive"),
    ("FC_DIMS: 256, wide", "FC_DIMS: expected comma-separated positive integers; item 2 'wide'"),
    ("JIT_COMPILE: sometimes", "JIT_COMPILE: expected AUTO, YES or NO"),
    ("LR_SCHEDULE: step", "LR_SCHEDULE: expected one of CONSTANT, PLATEAU, COSINE"),
    ("LR_PATIENCE: 0", "LR_PATIENCE: must be a positive integer"),
    ("LR_FACTOR: 1", "LR_FACTOR: must be a number between 0 and 1 (exclusive)"),
    ("LR_MIN: -1e-6", "LR_MIN: must be a number >= 0"),
    ("LR_DECAY_START: 1", "LR_DECAY_START: must be a number >= 0 and < 1"),
    ("LR_DECAY_START: -0.2", "LR_DECAY_START: must be a number >= 0 and < 1"),
    ("LR_DECAY_START: late", "LR_DECAY_START: expected a number >= 0 and < 1"),
    ("OPTIMIZER: sgd", "OPTIMIZER: expected one of ADAM, ADAMW"),
    ("WEIGHT_INIT: zeros", "WEIGHT_INIT: expected one of HE, GLOROT"),
    ("WEIGHT_DECAY: -0.1", "WEIGHT_DECAY: must be a number >= 0"),
    ("MAX_MINUTES1: 0", "MAX_MINUTES1: must be a number > 0"),
    ("MAX_MINUTES2: soon", "MAX_MINUTES2: expected a number > 0"),
])
def test_new_keys_refuse_bad_values_with_file_line_key_value(tmp_path, line, expected):
    path = tmp_path / "bad.param"
    path.write_text("NUM_PX: 500\n" + line + "\n")
    with pytest.raises(AnnaInputError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and expected in message
    assert f"(got '{line.split(':', 1)[1].strip()}')" in message


@pytest.mark.parametrize("text, key, expected", [
    ("CONV_LAYERS: 4x8\nCONV1_SHAPE: 1, 8, 1, 4\n", "CONV_LAYERS", "given together with CONV1_SHAPE"),
    ("FC_DIMS: 64\nFC2_OUTDIM: 32\n", "FC_DIMS", "given together with FC2_OUTDIM"),
    ("CONV_LAYERS: 4x8p2\nPOOL_SIZE: 4\n", "POOL_SIZE", "already pools"),
    ("CONV_LAYERS: 4x8p4, 16x40\n", "CONV_LAYERS", "convolution 2: kernel width 40 exceeds the 25 pixels"),
    ("CONV_LAYERS: 4x8s4, 16x3p30\n", "CONV_LAYERS", "pooling width 30 after convolution 2 exceeds the 25"),
    ("WEIGHT_DECAY: 0.01\n", "WEIGHT_DECAY", "OPTIMIZER: ADAMW only"),
    ("LR_SCHEDULE: PLATEAU\nLR_DECAY_START: 0.5\n", "LR_DECAY_START", "LR_SCHEDULE: COSINE only"),
    ("LR_SCHEDULE: COSINE\nLR_MIN: 1e-5\nLEARN_RATE2: 1e-6\n", "LR_MIN", "not below LEARN_RATE2"),
])
def test_layer_and_optimiser_keys_are_checked_against_each_other(tmp_path, text, key, expected):
    cfg = _config(tmp_path, "NUM_PX: 100\n" + text)
    with pytest.raises(AnnaInputError) as info:
        validate_for_stage(cfg, "train", check_paths=False)
    line = next(line for line in str(info.value).splitlines() if expected in line)
    assert f": {key}:" in line or f" {key}:" in line


def test_bad_new_key_on_the_command_line_is_one_line_exit_2(tmp_path, toy_packs):
    path = write_params(tmp_path, toy_packs, CONV1_SHAPE=None, CONV_LAYERS="4x7, 8x5p4x")
    out = subprocess.run([sys.executable, "-c", "import sys; from anna.cli import train_main; "
                          "sys.exit(train_main(sys.argv[1:]))", str(path), "--check"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "CONV_LAYERS" in lines[0] and "8x5p4x" in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("name", sorted(SURVEY_NETWORKS))
def test_survey_networks_build_with_the_layers_they_name(tmp_path, name):
    convs, dense = SURVEY_NETWORKS[name]
    cfg = _config(tmp_path, f"NUM_PX: 7214\nCONV_LAYERS: {convs}\nFC_DIMS: {dense}\n")
    with pytest.raises(AnnaInputError) as info:  # the file names no data, but its layers are fine
        validate_for_stage(cfg, "train", check_paths=False)
    assert not [line for line in str(info.value).splitlines() if "CONV_LAYERS" in line or "FC_DIMS" in line]
    spec = NetworkSpec.from_config(cfg, 7214, 3)
    network = build_network(spec, dropout_rate=0.1)
    conv_names = [layer.name for layer in network.layers if layer.name.startswith("conv")
                  and "dropout" not in layer.name]
    assert len(conv_names) == len(convs.split(","))
    assert [network.get_layer(f"fc{i + 1}").units for i in range(len(spec.fc_dims))] == \
        [int(v) for v in dense.split(",")]
    length = 7214
    for conv in spec.conv_layers:
        length //= conv.pool
    assert network.get_layer("flatten").output.shape[1] == length * spec.conv_layers[-1].kernels
    assert network(np.ones((2, 7214), np.float32)).shape == (2, 3)


def test_stride_shortens_the_output_as_same_padding_does():
    spec = NetworkSpec(npix=101, nout=2, conv_layers=(ConvLayer(4, 5, stride=3), ConvLayer(6, 3, pool=2)),
                       fc_dims=(8,))
    network = build_network(spec)
    assert network.get_layer("conv1").output.shape[1:] == (34, 4)  # ceil(101 / 3)
    assert network.get_layer("pool2").output.shape[1:] == (17, 6)


@pytest.mark.parametrize("form", ["xla", "graph"])
@pytest.mark.parametrize("npix, pool", [(64, 4), (67, 4), (30, 7)])
def test_max_pool_forms_match_keras(form, npix, pool):
    """Both forms give Keras' MaxPooling1D values and gradients (random data has no tied maxima)."""
    x = tf.constant(np.random.default_rng(npix).normal(size=(3, npix, 5)).astype(np.float32))
    weights = tf.constant(np.random.default_rng(1).normal(size=(3, npix // pool, 5)).astype(np.float32))
    ours, reference = SpectrumMaxPool1D(pool, compiled_form=form), keras.layers.MaxPooling1D(pool)
    grads = []
    for layer in (ours, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
            loss = tf.reduce_sum(out * weights)
        grads.append((out.numpy(), tape.gradient(loss, x).numpy()))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    np.testing.assert_array_equal(grads[0][1], grads[1][1])


def test_format_1_frozen_model_still_loads_and_predicts_the_same(tmp_path):
    """A model written before CONV_LAYERS (format 1: (width, kernels) pairs and one pool_size) loads unchanged."""
    spec = NetworkSpec(npix=64, nout=2, conv_layers=((5, 4), (3, 6)), pool_size=4, fc_dims=(16, 8))
    network = build_network(spec)
    flux = np.random.default_rng(3).uniform(0.5, 1.0, size=(5, 64)).astype(np.float32)
    expected = network(flux).numpy()
    path = save_frozen(str(tmp_path), network, spec, {"output_names": ["a", "b"], "wavelengths": list(range(64)),
                                                      "min_params": [0, 0], "max_params": [1, 1]})
    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read("metadata.json"))
        weights = archive.read("weights.npz")
    metadata["format_version"] = 1
    metadata["network"] = {"npix": 64, "nout": 2, "conv_layers": [[5, 4], [3, 6]], "pool_size": 4,
                           "fc_dims": [16, 8], "heteroscedastic": False}
    old = tmp_path / "old.model"
    with zipfile.ZipFile(old, "w") as archive:
        archive.writestr("metadata.json", json.dumps(metadata))
        archive.writestr("weights.npz", weights)
    model = load_frozen(old)
    assert model.spec == spec
    np.testing.assert_allclose(model.predict_raw(flux), expected, rtol=1e-5, atol=1e-6)


def test_format_from_the_future_is_refused(tmp_path):
    spec = NetworkSpec(npix=16, nout=1, conv_layers=((3, 2),), fc_dims=(4,))
    path = save_frozen(str(tmp_path), build_network(spec), spec, {"output_names": ["a"], "wavelengths": list(range(16)),
                                                                  "min_params": [0], "max_params": [1]})
    buffer = io.BytesIO(open(path, "rb").read())
    with zipfile.ZipFile(buffer) as archive:
        metadata = json.loads(archive.read("metadata.json"))
        weights = archive.read("weights.npz")
    metadata["format_version"] = 99
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps(metadata))
        archive.writestr("weights.npz", weights)
    with pytest.raises(AnnaInputError, match="reads formats 1, 2"):
        load_frozen(path)


def test_mc_sampling_with_conv_dropout_matches_sampling_the_whole_network():
    """With dropout after a convolution the shared trunk ends before it; the moments still equal those of many
    independent whole-network passes (statistically: 4000 passes each)."""
    spec = NetworkSpec(npix=48, nout=2, conv_layers=(ConvLayer(3, 5, dropout=True), ConvLayer(4, 3, pool=2)),
                       fc_dims=(16,))
    keras.utils.set_random_seed(2)
    network = build_network(spec, dropout_rate=0.3)
    flux = np.random.default_rng(4).uniform(0.6, 1.0, size=(3, 48)).astype(np.float32)
    forward = compile_mc_forward(network, spec, 4000)
    mean, var_model, _ = (v.numpy() for v in forward(flux))
    passes = np.stack([network(flux, training=True).numpy() for _ in range(400)])
    brute_mean, brute_var = passes.mean(axis=0), passes.var(axis=0)
    assert np.all(var_model > 0)
    # mean of 400 passes has standard error sqrt(var/400); allow 5 of those
    np.testing.assert_array_less(np.abs(mean - brute_mean), 5 * np.sqrt(brute_var / 400) + 1e-6)
    np.testing.assert_allclose(var_model, brute_var, rtol=0.35)


def test_auto_times_both_forms_keeps_the_faster_and_remembers(tmp_path):
    spec = NetworkSpec(npix=64, nout=2, conv_layers=((5, 4), (3, 8)), pool_size=4, fc_dims=(16,))
    chunk = tuple(tf.constant(np.random.default_rng(0).uniform(size=shape).astype(np.float32))
                  for shape in ((4, 16, 64), (4, 16, 2), (4, 16, 2)))
    lines = []
    cache = tmp_path / "forms.json"
    first = choose_compiled_form("AUTO", spec, None, chunk, 16, 0.9, cache_path=str(cache), report=lines.append,
                                 trial_seconds=0.3)
    assert first["source"] == "timed" and set(first["rates"]) == {"xla", "xla_step", "graph"}
    assert first["form"] == max(first["rates"], key=first["rates"].get)
    for form in first["cut_short"]:  # only a form under the fraction of one timed before it is cut short
        before = TRIAL_ORDER[:TRIAL_ORDER.index(form)]
        assert first["rates"][form] < TRIAL_GIVE_UP_FRACTION * max(first["rates"][other] for other in before)
    assert "JIT_COMPILE AUTO" in lines[0] and "ex/s" in lines[0]
    second = choose_compiled_form("AUTO", spec, None, chunk, 16, 0.9, cache_path=str(cache), report=lines.append,
                                 trial_seconds=0.3)
    assert second["source"] == "cache" and second["form"] == first["form"]
    # another network is timed afresh
    other = NetworkSpec(npix=64, nout=2, conv_layers=((7, 4),), fc_dims=(16,))
    assert choose_compiled_form("AUTO", other, None, chunk, 16, 0.9, cache_path=str(cache), report=lines.append,
                                trial_seconds=0.3)["source"] == "timed"
    pinned = choose_compiled_form("YES", spec, None, chunk, 16, 0.9, cache_path=str(cache), report=lines.append,
                                 trial_seconds=0.3)
    assert set(pinned["rates"]) == {"xla", "xla_step"} and pinned["form"] in ("xla", "xla_step")
    assert choose_compiled_form("NO", spec, None, chunk, 16, 0.9, report=lines.append)["form"] == "graph"


def test_a_form_clearly_slower_than_one_timed_before_is_cut_after_one_step():
    """JIT_COMPILE AUTO's trial of a form stops after one timed step when that step is under the rate it is
    given (TRIAL_GIVE_UP_FRACTION of the fastest form timed before it); otherwise the form is timed in full."""
    spec = NetworkSpec(npix=64, nout=2, conv_layers=((5, 4),), fc_dims=(16,))
    chunk = tuple(tf.constant(np.random.default_rng(0).uniform(size=shape).astype(np.float32))
                  for shape in ((4, 16, 64), (4, 16, 2), (4, 16, 2)))
    started = time.perf_counter()
    rate, error, cut = time_compiled_form("graph", spec, None, chunk, 16, 1.0, seconds=30.0, give_up_below=1e12)
    assert error is None and cut and rate > 0
    assert time.perf_counter() - started < 30.0  # not the 30-second trial
    rate, error, cut = time_compiled_form("graph", spec, None, chunk, 16, 1.0, seconds=0.2, give_up_below=0.0)
    assert error is None and not cut and rate > 0
    rate, error, cut = time_compiled_form("graph", spec, None, chunk, 16, 1.0, seconds=0.2)
    assert error is None and not cut and rate > 0


@pytest.mark.parametrize("jit", ["YES", "NO", "AUTO"])
def test_seed_with_pooling_repeats_bit_for_bit(tmp_path, toy_packs, jit):
    """SEED + max-pooling + conv dropout under every JIT_COMPILE value: two runs give identical weights (XLA's own
    pooling gradient is refused under op determinism; the network's pooling layer avoids it)."""
    runs = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        cfg = load_config(write_params(folder, toy_packs, CONV1_SHAPE=None, CONV_LAYERS="4x7d, 8x5p4",
                                       FC1_OUTDIM=None, FC2_OUTDIM=None, FC_DIMS="32, 16", NUM_TRAIN_ITERS1=60,
                                       NUM_TRAIN_ITERS2=20, SAMPLE_INTERVAL=20, TBOARD_OUTPUT="NO", JIT_COMPILE=jit))
        run_training(cfg, report=QUIET)
        model = load_frozen(cfg.save_loc)
        runs.append(model.network.get_weights())
        assert model.metadata["compiled_form"]["setting"] == jit
        assert model.metadata["compiled_form"]["form"] in ({"YES": ("xla", "xla_step"), "NO": ("graph",)}.get(
            jit, ("xla", "xla_step", "graph")))
        assert model.metadata["network_description"] == "4x7d, 8x5p4 | 32, 16"
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_weight_init_draws_kernels_he_normal_or_glorot_uniform():
    import keras

    spec = NetworkSpec(npix=400, nout=3, conv_layers=((8, 4), (8, 16)), fc_dims=(64,))
    stds = {}
    for init in ("HE", "GLOROT"):
        keras.utils.set_random_seed(3)
        network = build_network(spec, weight_init=init)
        stds[init] = {name: float(np.std(network.get_layer(name).get_weights()[0])) for name in ("conv1", "conv2")}
    # conv2: 8 px x 4 channels in, 16 kernels out -> He sqrt(2/32) = 0.25, Glorot sqrt(2/(32+128)) = 0.112
    assert stds["HE"]["conv2"] == pytest.approx(0.25, rel=0.15)
    assert stds["GLOROT"]["conv2"] == pytest.approx(np.sqrt(2 / 160), rel=0.15)
    # conv1 (the banded layer): 8 px x 1 channel in, 4 out -> He 0.5, Glorot sqrt(2/40) = 0.224
    assert stds["HE"]["conv1"] == pytest.approx(0.5, rel=0.35)
    assert stds["GLOROT"]["conv1"] == pytest.approx(np.sqrt(2 / 40), rel=0.35)
