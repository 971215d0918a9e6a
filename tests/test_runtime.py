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
