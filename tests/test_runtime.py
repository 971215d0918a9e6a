"""The runtime every command starts TensorFlow in (anna/runtime.py): environment set before import, and XLA's
compiled programs kept on disk between runs."""

import os
import subprocess
import sys

from anna.runtime import XLA_CACHE_FLAG, prepare_tensorflow_environment, xla_cache_folder

# A tiny XLA-compiled function, run in a fresh interpreter the way the commands start TensorFlow.
XLA_SCRIPT = """
from anna.runtime import prepare_tensorflow_environment
prepare_tensorflow_environment()
import numpy as np
import tensorflow as tf

@tf.function(jit_compile=True)
def double_sum(x):
    return tf.reduce_sum(2.0 * x, axis=1)

print(repr(double_sum(np.arange(12, dtype=np.float32).reshape(3, 4)).numpy().tolist()))
"""


def test_prepare_points_xla_at_a_cache_folder_named_after_the_machine_unless_told_otherwise(tmp_path):
    environ = {"ANNA_TF_CACHE_DIR": str(tmp_path)}
    added = prepare_tensorflow_environment(environ)
    assert "TF_XLA_FLAGS" in added
    folder = xla_cache_folder(environ)
    assert environ["TF_XLA_FLAGS"] == f"{XLA_CACHE_FLAG}={folder}"
    assert os.path.dirname(folder) == str(tmp_path) and os.path.basename(folder).startswith("xla-")
    # the user's own XLA flags are kept, and a cache folder they chose wins
    environ = {"ANNA_TF_CACHE_DIR": str(tmp_path), "TF_XLA_FLAGS": "--tf_xla_auto_jit=2"}
    prepare_tensorflow_environment(environ)
    assert environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=2 {XLA_CACHE_FLAG}={folder}"
    mine = f"{XLA_CACHE_FLAG}=/elsewhere"
    environ = {"TF_XLA_FLAGS": mine, "TF_CPP_MIN_LOG_LEVEL": "0"}
    assert prepare_tensorflow_environment(environ) == ["TF_CPU_ALLOCATOR_USE_BFC"]
    assert environ["TF_XLA_FLAGS"] == mine and environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_xla_programs_are_kept_in_the_cache_folder_and_reused(tmp_path):
    environ = {name: value for name, value in os.environ.items() if name != "TF_XLA_FLAGS"}
    environ["ANNA_TF_CACHE_DIR"] = str(tmp_path)
    folder = xla_cache_folder(environ)

    def run():
        done = subprocess.run([sys.executable, "-c", XLA_SCRIPT], env=environ, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    first = run()
    assert first == repr([12.0, 44.0, 76.0])
    kept = sorted(os.listdir(folder))
    assert kept and all(name.startswith("xla_compile_cache") for name in kept)
    # the second run finds the program it needs: nothing new is compiled and written, and the result is the same
    assert run() == first
    assert sorted(os.listdir(folder)) == kept


# A frozen model's forward pass in a worker thread, after other graphs were traced or not (argv[2]).
FORWARD_SCRIPT = """
import sys, threading
from anna.runtime import prepare_tensorflow_environment
prepare_tensorflow_environment()
import numpy as np
import tensorflow as tf
from anna.model import load_frozen

model = load_frozen(sys.argv[1])
model.choose_forward_form("YES", 64, print)
if sys.argv[2] == "other graph first":
    tf.function(lambda x: 2.0 * x, input_signature=[tf.TensorSpec([None], tf.float32)]).get_concrete_function()
flux = np.ones((5, model.spec.npix), np.float32)
result = []
worker = threading.Thread(target=lambda: result.append(model.predict(flux, 64)))
worker.start()
worker.join()
print(repr(result[0].tolist()))
"""


def test_a_rerun_finds_the_forward_pass_compiled_whatever_else_was_traced_first(tmp_path):
    """XLA's cache keys a program by the traced function's name, which carries a process-wide counter: the
    forward pass is traced when its form is chosen, so a graph traced later (anna-infer's training-domain
    statistics, in another thread) cannot change its name and make a rerun compile it again."""
    from toy_model import train_tiny_model

    model_dir = train_tiny_model(tmp_path / "model", epochs=0)
    environ = {name: value for name, value in os.environ.items() if name != "TF_XLA_FLAGS"}
    environ["ANNA_TF_CACHE_DIR"] = str(tmp_path / "cache")
    folder = xla_cache_folder(environ)

    def run(order):
        done = subprocess.run([sys.executable, "-c", FORWARD_SCRIPT, str(model_dir), order], env=environ,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    first = run("forward first")
    kept = sorted(os.listdir(folder))
    assert kept
    assert run("other graph first") == first
    assert sorted(os.listdir(folder)) == kept
