"""One measurement in a process of its own, so that its peak resident memory is its own: run by the inference
rows as ``python measure_child.py KIND ARGS...``; prints one JSON line (the last line of stdout).

``infer PARAM_FILE``: anna-infer as the command runs it (the command's environment and threads; the timing
covers ``run_infer``: model load, batch plan, reading, flags, domain statistics, prediction, CSV).

``test PARAM_FILE``: anna-test likewise (``run_test``: everything up to the plots and the summary).

``predict MODEL_DIR PACK BATCHES``: the plain-Keras baseline.  The whole pack is read into memory as float32,
then the frozen model's Keras network is timed with ``model.predict`` at each batch size of the
comma-separated BATCHES, once compiled with ``jit_compile=True`` and once with ``False``; the best rate is the
baseline.  The network is the same one anna-infer runs (same layers and weights): the baseline differs only
in how it is driven.

``mc MODEL_DIR PACK SAMPLES``: MC dropout the plain way: ``SAMPLES`` calls of the network (XLA) with
``training=True`` per batch of 256, then mean and spread, on the pack in memory.
"""

import json
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))

from anna.runtime import configure_threads, prepare_tensorflow_environment  # noqa: E402

prepare_tensorflow_environment()


def peak_rss_bytes():
    from anna.memory import peak_resident_bytes

    return peak_resident_bytes()


def run_stage(stage, param_file):
    """``run_infer`` or ``run_test`` on the parameter file, as the command calls it, timed; its report lines,
    its result and the peak memory of this process; ``line_seconds``: when each line was reported."""
    from anna.params import load_config, validate_for_stage

    if stage == "infer":
        from anna.infer import run_infer as run
    else:
        from anna.evaluate import run_test as run
    cfg = load_config(param_file, stage=stage)
    validate_for_stage(cfg, stage)
    lines, times = [], []
    started = time.perf_counter()

    def report(line):
        lines.append(line)
        times.append(time.perf_counter() - started)

    result = run(cfg, report=report)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "result": result, "lines": lines, "line_seconds": times,
            "peak_rss": peak_rss_bytes()}


def _pack_in_memory(pack_path):
    import numpy as np

    from anna.packs import open_pack

    pack = open_pack(pack_path, check_labels=False)
    return np.asarray(pack.flux, dtype=np.float32)


def predict(model_dir, pack_path, batches):
    from anna.model import load_frozen

    network = load_frozen(model_dir).network
    flux = _pack_in_memory(pack_path)
    rates = {}
    for jit in (True, False):
        network.compile(jit_compile=jit)
        for batch in batches:
            network.predict(flux[:batch], batch_size=batch, verbose=0)  # compiles
            started = time.perf_counter()
            network.predict(flux, batch_size=batch, verbose=0)
            rates[f"jit_compile={jit}, batch {batch}"] = len(flux) / (time.perf_counter() - started)
    best = max(rates, key=rates.get)
    return {"rates": rates, "best": best, "rate": rates[best], "n": len(flux), "peak_rss": peak_rss_bytes()}


def mc(model_dir, pack_path, samples, batch=256):
    import numpy as np
    import tensorflow as tf

    from anna.model import load_frozen

    network = load_frozen(model_dir).network

    @tf.function(jit_compile=True, autograph=False)
    def one_pass(x):
        return network(x, training=True)

    flux = _pack_in_memory(pack_path)
    one_pass(flux[:batch])
    started = time.perf_counter()
    for start in range(0, len(flux), batch):
        chunk = flux[start:start + batch]
        draws = np.stack([one_pass(chunk).numpy() for _ in range(samples)])
        draws.mean(axis=0), draws.std(axis=0)
    return {"rate": len(flux) / (time.perf_counter() - started), "n": len(flux), "peak_rss": peak_rss_bytes()}


def main(argv):
    configure_threads()
    kind, *args = argv
    if kind in ("infer", "test"):
        result = run_stage(kind, *args)
    elif kind == "predict":
        result = predict(args[0], args[1], [int(value) for value in args[2].split(",")])
    elif kind == "mc":
        result = mc(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown measurement {kind}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
