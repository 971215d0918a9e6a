"""Scale-out (rows 14 and 15): what INFER_SCHEDULER and DISTRIBUTE cost on this machine, each against the same
work in one process, measured in the same run.

Row 14, ``scale_infer``: anna-infer on multispec FITS (the untrained tutorial network, 1001 px, files of 90
apertures, ``JIT_COMPILE: NO``) in one process, against ``local:2`` and against an external 2-worker Dask
cluster on 127.0.0.1.  Each figure is a whole ``anna-infer`` command in its own process (interpreter, model
load, batch plan, reading, prediction, the CSVs; for ``local:2`` also its cluster's start: two worker processes
importing TensorFlow and loading the model).  The external cluster is started and warmed (its workers have
loaded the model once) before it is timed, as a long-lived cluster on a survey machine would be.  Beside them,
Dask's own cost per task: no-op tasks submitted to the warm external cluster and gathered.  On 2 cores expect
about 1x or less: these rows measure what the engine costs, not a speed-up.

Row 15, ``scale_train``: anna-train on the tutorial network with ``DISTRIBUTE: MIRRORED`` over 2 logical CPU
devices against ``NONE`` in the same process (its one CPU split in two before TensorFlow starts), runs
alternating, ``JIT_COMPILE: NO`` for both (the strategy's steps are graph steps), no cross-validation: examples/s
over the intervals after the first (which includes tracing).  Both replicas share the same 2 cores, so this too
measures the strategy's cost, not a speed-up.

``python benchmarks/rows_scale_out.py --train-child RUN...`` (each RUN a JSON [parameter file, overrides]) is that training child (used by row 15).
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

from harness import Row, median

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
# (spectra, repeats) of row 14, full and --quick
INFER_SIZES = {False: (9000, 2), True: (900, 1)}
# (iterations, SAMPLE_INTERVAL, repeats) of row 15
TRAIN_SIZES = {False: (600, 100, 2), True: (60, 20, 1)}
NOOP_TASKS = {False: 2000, True: 300}


def _environment():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, BENCH_DIR,
                                                                    os.environ.get("PYTHONPATH")])))
    return env


def anna_infer(param_file, env):
    """Seconds of one anna-infer command, its output lines."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from anna.cli import infer_main; "
                           "sys.exit(infer_main(sys.argv[1:]))", param_file], capture_output=True, text=True,
                          env=env, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"anna-infer failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout.splitlines()


def start_external_cluster(workers, env):
    """An external cluster of ``workers`` single-threaded worker processes on 127.0.0.1, in its own process;
    (process, scheduler address).  Closing its stdin closes it."""
    script = ("import sys, logging\nfrom distributed import LocalCluster\n"
              f"cluster = LocalCluster(n_workers={workers}, threads_per_worker=1, host='127.0.0.1', "
              "dashboard_address=None, silence_logs=logging.ERROR)\n"
              "print(cluster.scheduler_address, flush=True)\nsys.stdin.read()\ncluster.close()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    return proc, proc.stdout.readline().strip()


def stop_external_cluster(proc):
    try:
        proc.stdin.close()
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def seconds_per_task(address, count):
    """Dask's own cost of one task on the warm cluster: ``count`` no-op tasks submitted and gathered, seconds
    each (the scheduler, the network round trips on 127.0.0.1 and the workers' task bookkeeping)."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.gather(client.map(int, range(50), pure=False))  # connections made, workers answering
        started = time.perf_counter()
        client.gather(client.map(int, range(count), pure=False))
        return (time.perf_counter() - started) / count


def scale_out_inference(ctx):
    """Row 14: anna-infer from multispec FITS in one process, against local:2 and an external 2-worker cluster."""
    from data import grid_for, write_multispec_set, write_param_file

    spectra, repeats = INFER_SIZES[ctx.sizes.quick]
    env = _environment()
    work = ctx.ws.fresh_dir("scale_infer")
    model_dir = ctx.data.untrained_model()
    ctx.log(f"  writing {spectra // 90} multispec files of 90 apertures (+2 for the warm-up)")
    n = write_multispec_set(os.path.join(work, "fits"), grid_for(1001), spectra)
    write_multispec_set(os.path.join(work, "warm"), grid_for(1001), 180, seed=9)
    ctx.log("  starting an external 2-worker cluster on 127.0.0.1")
    cluster, address = start_external_cluster(2, env)
    try:
        def params(name, files, scheduler=None):
            values = {"INFER_MODE": "FITS", "INFER_FILES": files, "INFER_MODEL_LOC": model_dir,
                      "INFER_SAVE_LOC": os.path.join(work, "out", name), "JIT_COMPILE": "NO"}
            if scheduler:
                values["INFER_SCHEDULER"] = scheduler
            return write_param_file(os.path.join(work, f"{name}.param"), values)

        anna_infer(params("warm", os.path.join(work, "warm", "*.fits"), address), env)  # workers load the model
        per_task = seconds_per_task(address, NOOP_TASKS[ctx.sizes.quick])
        ctx.log(f"  Dask's cost per task on the warm cluster: {per_task * 1e3:.2f} ms")
        kinds = (("in-process", None), ("local:2", "local:2"), ("external", address))
        seconds = {name: [] for name, _ in kinds}
        tasks = {}
        for repeat in range(repeats):
            for name, scheduler in kinds:  # alternating: a change of load falls on every kind alike
                shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
                took, lines = anna_infer(params(name.replace(":", ""), os.path.join(work, "fits", "*.fits"),
                                                scheduler), env)
                written = glob.glob(os.path.join(work, "out", name.replace(":", ""), "*_infer.out"))
                if len(written) != n // 90:
                    raise RuntimeError(f"{name}: {len(written)} outputs, expected {n // 90}")
                done = [line for line in lines if "tasks done" in line]
                if done:
                    tasks[name] = int(done[-1].split("Dask: ")[1].split("/")[1].split()[0])
                seconds[name].append(took)
                ctx.log(f"  run {repeat + 1} {name:10s} {took:7.1f} s  {n / took:8.0f} spectra/s  "
                        f"(load {os.getloadavg()[0]:.1f})")
    finally:
        stop_external_cluster(cluster)
        shutil.rmtree(work, ignore_errors=True)
    best = {name: min(times) for name, times in seconds.items()}
    base = n / best["in-process"]
    note = (f"{n} spectra in {n // 90} multispec files, untrained tutorial network, whole anna-infer commands, "
            f"best of {repeats}; baseline = the same command in one process")
    rows = [Row("scale_infer", f"anna-infer FITS, INFER_SCHEDULER local:2 ({tasks.get('local:2', '?')} tasks)",
                n / best["local:2"], "spectra/s", base, note=note + "; includes the cluster's start"),
            Row("scale_infer", f"anna-infer FITS, external warm 2-worker cluster ({tasks.get('external', '?')} "
                               "tasks)", n / best["external"], "spectra/s", base, note=note),
            Row("scale_infer", "Dask's cost per task (no-op tasks, warm 2-worker cluster)", per_task * 1e3, "ms",
                note=f"{NOOP_TASKS[ctx.sizes.quick]} tasks submitted and gathered on 127.0.0.1",
                higher_is_better=False)]
    details = {"spectra": n, "seconds": seconds, "tasks": tasks, "seconds_per_noop_task": per_task,
               "load_average_after": os.getloadavg()[0]}
    return rows, details


def scale_out_training(ctx):
    """Row 15: anna-train with DISTRIBUTE MIRRORED over 2 logical CPU devices against NONE, in one child process."""
    from harness import TUTORIAL_CONFIG
    from rows_training import tutorial_config

    iterations, interval, repeats = TRAIN_SIZES[ctx.sizes.quick]
    common = {"DO_TRAIN2": "NO", "NUM_TRAIN_ITERS1": iterations, "SAMPLE_INTERVAL": interval,
              "TRAINING_XVAL": "NO", "EARLY_STOP": "NO", "JIT_COMPILE": "NO", "TBOARD_OUTPUT": "NO"}
    runs = []
    for repeat in range(repeats):
        for kind in ("NONE", "MIRRORED"):
            overrides = dict(common, DISTRIBUTE=kind)
            cfg = tutorial_config(ctx, f"scale_train_{kind}_{repeat}", overrides)  # checked here, run by the child
            example = ctx.data.example(1001)
            overrides.update({"NUM_PX": 1001, "TRAINING_DATA": example["train"], "XVAL_DATA": example["xval"],
                              "SN_TEMPLATE": example["sn_template"], "SAVE_LOC": cfg.save_loc,
                              "LOG_LOC": cfg.log_loc, "RESUME": "NO"})
            runs.append((kind, json.dumps([TUTORIAL_CONFIG, [f"{k}={v}" for k, v in overrides.items()]])))
    ctx.log(f"  anna-train, tutorial network, {iterations} iterations, NONE and MIRRORED (2 logical CPUs) "
            f"alternating, {repeats} each, in one child process")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--train-child", *[r for _, r in runs]],
                          capture_output=True, text=True, env=_environment(), timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"training child failed ({done.returncode}): {done.stderr[-3000:]}")
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    rates = {"NONE": [], "MIRRORED": []}
    for (kind, _), result in zip(runs, results):
        rates[kind].append(result["examples_per_second"])
        ctx.log(f"  {kind:8s} {result['examples_per_second']:8.0f} ex/s ({result['replicas']} replica(s))")
    row = Row("scale_train", "anna-train, DISTRIBUTE MIRRORED over 2 logical CPU devices", median(rates["MIRRORED"]),
              "ex/s", median(rates["NONE"]),
              note=f"tutorial network, batch 100 (50 per replica), {iterations} iterations, JIT_COMPILE NO, rate "
                   f"over the intervals after the first; baseline = DISTRIBUTE NONE in the same process; median "
                   f"of {repeats}")
    return [row], {"rates": rates, "runs": results}


def train_child(runs):
    """Train each run (JSON: [parameter file, [KEY=value overrides]]) in turn in this process, its one CPU split into 2 logical devices first; print
    one ``RESULT {...}`` line per run with its examples/s over the intervals after the first."""
    import tensorflow as tf

    from anna.params import load_config, validate_for_stage
    from anna.runtime import configure_threads
    from anna.train import run_training

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    configure_threads()
    for run in runs:
        path, overrides = json.loads(run)
        cfg = load_config(path, overrides=overrides)
        validate_for_stage(cfg, "train")
        result = run_training(cfg, report=lambda line: None)
        history = [record for record in result["history"] if record.get("elapsed_s") is not None]
        first, last = history[0], history[-1]
        rate = ((last["iteration"] - first["iteration"]) * int(cfg.batch_size1)
                / (last["elapsed_s"] - first["elapsed_s"]))
        print("RESULT " + json.dumps({"save_loc": cfg.save_loc, "examples_per_second": rate,
                                      "replicas": 2 if cfg.distribute == "MIRRORED" else 1}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--train-child":
        for folder in (REPO_ROOT, BENCH_DIR):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        train_child(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
