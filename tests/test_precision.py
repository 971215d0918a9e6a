"""MIXED_PRECISION, tested on a CPU: the float16 network (hidden layers compute in float16, labels and
log-variances float32, float32 variables), the loss-scaling optimiser inside the real training step (its
dynamic scale reacts to the step's float16 gradients), the frozen model an ordinary float32 one, and the
refusal without a GPU through the real commands (`--check` and anna-train).  Float16 arithmetic runs on a CPU,
slowly, which is why the key itself is refused there."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from anna.model import ConvLayer, NetworkSpec, build_network, load_frozen, save_frozen
from anna.params import load_config, validate_for_stage
from anna.train.precision import POLICY_NAME, network_policy, wrap_optimizer
from anna.train.steps import make_train_steps
from test_train import write_params

SPECS = {
    "plain": NetworkSpec(npix=64, nout=2, conv_layers=(ConvLayer(4, 7), ConvLayer(6, 5, stride=2, pool=2)),
                         fc_dims=(16, 8)),
    "variance head": NetworkSpec(npix=64, nout=2, conv_layers=(ConvLayer(4, 7, pool=2),), fc_dims=(16,),
                                 heteroscedastic=True),
}
FLOAT32_LAYERS = {"centre", "labels", "log_variance_fit", "log_noise_gain", "log_noise_variance", "log_variance",
                  "labels_and_log_variance", "flux"}


def _spectra(count, npix=64, seed=0):
    rng = np.random.default_rng(seed)
    flux = 1.0 - 0.3 * np.exp(-0.5 * ((np.arange(npix) - 32) / rng.uniform(2, 6, (count, 1))) ** 2)
    return (flux + rng.normal(0, 0.01, flux.shape)).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_mixed_network_computes_in_float16_and_answers_in_float32(kind, tmp_path):
    spec = SPECS[kind]
    network = build_network(spec, dropout_rate=0.1, dtype_policy=keras.DTypePolicy(POLICY_NAME))
    hidden = [layer for layer in network.layers if layer.name not in FLOAT32_LAYERS]
    assert hidden and all(layer.compute_dtype == "float16" for layer in hidden)
    assert all(network.get_layer(name).compute_dtype == "float32" for name in FLOAT32_LAYERS
               if name != "flux" and name in {layer.name for layer in network.layers})
    assert all(variable.dtype == "float32" for variable in network.weights)
    flux = _spectra(8)
    out = network(flux, training=False)
    assert out.dtype == "float32" and out.shape == (8, 2 * spec.nout if spec.heteroscedastic else spec.nout)
    # the conv1 activations really are float16
    probe = keras.Model(network.input, network.get_layer("conv1").output)
    assert probe(flux).dtype == "float16"
    # the same weights in a float32 network give the same answers to float16 rounding
    reference = build_network(spec, dropout_rate=0.1)
    reference.set_weights(network.get_weights())
    np.testing.assert_allclose(out.numpy(), reference(flux, training=False).numpy(), atol=2e-2, rtol=2e-2)
    if spec.heteroscedastic:
        return
    # the frozen model is an ordinary float32 one: its file knows no policy, it loads and predicts as one
    save_frozen(str(tmp_path), network, spec, {"output_names": ["a", "b"], "min_params": [0, 10],
                                               "max_params": [1, 30], "wavelengths": list(range(64))})
    model = load_frozen(str(tmp_path))
    assert all(layer.compute_dtype == "float32" for layer in model.network.layers)
    np.testing.assert_allclose(model.predict_raw(flux), reference(flux, training=False).numpy(), rtol=1e-5, atol=1e-6)


def test_policy_and_optimizer_follow_the_key(tmp_path, toy_packs):
    on = load_config(write_params(tmp_path, toy_packs, name="on.param", MIXED_PRECISION="YES"))
    off = load_config(write_params(tmp_path, toy_packs, name="off.param"))
    assert network_policy(off) is None and off.mixed_precision is False
    assert network_policy(on).name == POLICY_NAME and network_policy(on).compute_dtype == "float16"
    adam = keras.optimizers.Adam(1e-3)
    assert wrap_optimizer(adam, None) is adam
    wrapped = wrap_optimizer(adam, network_policy(on))
    assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer) and wrapped.inner_optimizer is adam
    wrapped.learning_rate.assign(5e-4)  # the schedules assign the rate through the wrapper
    assert float(adam.learning_rate.numpy()) == pytest.approx(5e-4)


def _chunk(spec, batches=3, batch=16):
    flux = _spectra(batches * batch, spec.npix, seed=1).reshape(batches, batch, spec.npix)
    labels = np.random.default_rng(2).uniform(0, 1, (batches, batch, spec.nout)).astype(np.float32)
    return flux, labels, np.ones_like(labels)


def test_loss_scaled_training_step_runs_in_float16(form="graph"):
    """The real training step with the wrapped optimiser: a scale so large that the float16 gradients overflow
    makes the step skip the update and halve the scale (so the loss really was scaled); at an ordinary scale
    the steps update the float32 weights and the cost falls."""
    spec = SPECS["variance head"]
    keras.utils.set_random_seed(3)
    network = build_network(spec, compiled_form=form, dtype_policy=keras.DTypePolicy(POLICY_NAME))
    chunk = _chunk(spec)

    huge = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0 ** 60)
    huge.build(network.trainable_variables)
    before = network.get_weights()
    make_train_steps(network, huge, spec, 3, 16, form)(chunk, 0, 1)
    assert all(np.array_equal(a, b) for a, b in zip(before, network.get_weights()))  # skipped
    assert float(huge.dynamic_scale.numpy()) == 2.0 ** 59

    optimizer = wrap_optimizer(keras.optimizers.Adam(3e-3), keras.DTypePolicy(POLICY_NAME))
    optimizer.build(network.trainable_variables)
    steps = make_train_steps(network, optimizer, spec, 3, 16, form)
    first, _ = steps(chunk, 0, 3)
    for _ in range(10):
        last, _ = steps(chunk, 0, 3)
    assert np.all(np.isfinite(last.numpy())) and float(np.mean(last)) < float(np.mean(first))
    assert all(variable.dtype == "float32" for variable in network.weights)
    assert not all(np.array_equal(a, b) for a, b in zip(before, network.get_weights()))


def test_refused_without_a_gpu_at_check_and_at_train(tmp_path, toy_packs, capsys):
    """`anna-train --check` as a real command with every GPU hidden (CUDA_VISIBLE_DEVICES empty), so the refusal
    is tested on any machine; anna-train itself in this process (skipped where TensorFlow sees a GPU).  One line
    naming the file, line and key, exit status 2, nothing written."""
    import tensorflow as tf

    from anna.cli import train_main

    path = write_params(tmp_path, toy_packs, MIXED_PRECISION="YES", NUM_TRAIN_ITERS1=10, DO_TRAIN2="NO")
    line = path.read_text().splitlines().index("MIXED_PRECISION: YES") + 1
    expected = [f"anna-train: error: {path}:{line}: MIXED_PRECISION: YES needs a GPU (float16 compute with loss "
                "scaling), and TensorFlow sees none on this machine; on a CPU float16 and bfloat16 are slower than "
                "float32, so set MIXED_PRECISION: NO (got 'YES')"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from anna.cli import train_main; "
                           "sys.exit(train_main(sys.argv[1:]))", str(path), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [text for text in proc.stderr.splitlines() if text.strip()] == expected, proc.stderr
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: anna-train would run in mixed precision here")
    capsys.readouterr()
    assert train_main([str(path)]) == 2
    assert [text for text in capsys.readouterr().err.splitlines() if text.strip()] == expected
    assert not (tmp_path / "model").exists() or not os.listdir(tmp_path / "model")


def test_max_minutes_refused_under_multi_worker(tmp_path, toy_packs):
    """Each worker's own clock would end a stage at a different step (the other workers' collectives would then
    wait: a hang), so the combination is refused before anything runs."""
    for key in ("MAX_MINUTES1", "MAX_MINUTES2"):
        cfg = load_config(write_params(tmp_path, toy_packs, name=f"{key}.param", DISTRIBUTE="MULTI_WORKER",
                                       **{key: 5}))
        with pytest.raises(Exception) as caught:
            validate_for_stage(cfg, "train", check_paths=False)
        assert f"{key}: cannot be used with DISTRIBUTE: MULTI_WORKER" in str(caught.value)
    for kind in ("NONE", "MIRRORED"):  # one process, one clock: allowed
        validate_for_stage(load_config(write_params(tmp_path, toy_packs, name=f"{kind}.param", DISTRIBUTE=kind,
                                                    MAX_MINUTES1=5)), "train", check_paths=False)
