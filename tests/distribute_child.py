"""A training run in its own process for the DISTRIBUTE tests: TensorFlow's devices must be configured before
it starts, and each MULTI_WORKER worker is a process of its own.

``python distribute_child.py PARAMS... [--cpus N]``: trains each parameter file in turn, in one process; with
``--cpus`` the one CPU is split into N logical devices (what MIRRORED then spreads over).  Prints each run's
summary as one JSON line ``RESULT {...}``.  Errors take the
command line's path (one line, exit status 2).
"""

import argparse
import json
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("params", nargs="+")
    parser.add_argument("--cpus", type=int, default=0)
    args = parser.parse_args()
    import tensorflow as tf

    from anna.cli import _run  # the command line's error handling: one line, exit status 2
    from anna.params import load_config, validate_for_stage
    from anna.train import run_training

    if args.cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpus)

    def action():
        for params in args.params:
            cfg = load_config(params)
            validate_for_stage(cfg, "train")
            result = run_training(cfg, report=lambda line: print(line, flush=True))
            summary = {key: result[key] for key in ("frozen_model", "training_complete", "interrupted")}
            summary["best_costs"] = [stage["best_cost"] for stage in result["stages"]]
            summary["xval_costs"] = [record["xval_cost"] for record in result["history"]]
            print("RESULT " + json.dumps(summary), flush=True)

    return _run("anna-train", False, action)


if __name__ == "__main__":
    sys.exit(main())
