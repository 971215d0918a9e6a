"""INFER_SCHEDULER's cost: anna-infer on multispec FITS in one process, against ``local:2`` and against an external
2-worker Dask cluster on 127.0.0.1, the same files and the same (untrained tutorial, 1001 px) model.

    python benchmarks/scale_out.py [--spectra 9000] [--repeats 2]

Each figure is a whole ``anna-infer`` command (its own process: interpreter, model load, batch plan, the
cluster's start for ``local:2``, reading, prediction, the CSVs).  The external cluster is started and warmed
(its workers have loaded the model once) before it is timed, as a long-lived cluster on a survey machine would
be; ``local:2`` pays its cluster's start (two worker processes importing TensorFlow) in every run.  On 2
cores expect about 1x or less: these figures measure what the engine costs, not a speed-up.  The machine's load
average is printed beside them, since other work on the machine changes every figure.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for folder in (REPO_ROOT, BENCH_DIR):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from data import grid_for, write_multispec_set, write_param_file, write_untrained_model  # noqa: E402


def anna_infer(param_file, env):
    """Seconds of one anna-infer command, its output lines."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from anna.cli import infer_main; "
                           "sys.exit(infer_main(sys.argv[1:]))", param_file], capture_output=True, text=True,
                          env=env, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"anna-infer failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout.splitlines()


def start_external_cluster(workers, env):
    script = ("import sys, logging\nfrom distributed import LocalCluster\n"
              f"cluster = LocalCluster(n_workers={workers}, threads_per_worker=1, host='127.0.0.1', "
              "dashboard_address=None, silence_logs=logging.ERROR)\n"
              "print(cluster.scheduler_address, flush=True)\nsys.stdin.read()\ncluster.close()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    return proc, proc.stdout.readline().strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=9000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    work = tempfile.mkdtemp(prefix="anna-scale-out-")
    cluster = None
    try:
        model_dir = os.path.join(work, "model")
        write_untrained_model(model_dir, 1001)
        n = write_multispec_set(os.path.join(work, "fits"), grid_for(1001), args.spectra)
        warm = write_multispec_set(os.path.join(work, "warm"), grid_for(1001), 180, seed=9)
        cluster, address = start_external_cluster(2, env)

        def params(name, files, scheduler=None):
            values = {"INFER_MODE": "FITS", "INFER_FILES": files, "INFER_MODEL_LOC": model_dir,
                      "INFER_SAVE_LOC": os.path.join(work, "out", name), "JIT_COMPILE": "NO"}
            if scheduler:
                values["INFER_SCHEDULER"] = scheduler
            return write_param_file(os.path.join(work, f"{name}.param"), values)

        anna_infer(params("warm", os.path.join(work, "warm", "*.fits"), address), env)  # workers load the model
        print(f"{n} spectra in {n // 90} multispec files; warm-up {warm} spectra; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        results = {}
        for repeat in range(args.repeats):
            for name, scheduler in (("in-process", None), ("local:2", "local:2"), ("external 2-worker", address)):
                shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
                seconds, lines = anna_infer(params(name.split()[0], os.path.join(work, "fits", "*.fits"),
                                                   scheduler), env)
                assert len(glob.glob(os.path.join(work, "out", name.split()[0], "*_infer.out"))) == n // 90
                results.setdefault(name, []).append(seconds)
                print(f"  run {repeat + 1} {name:18s} {seconds:7.1f} s  {n / seconds:8.0f} spectra/s", flush=True)
        best = {name: min(times) for name, times in results.items()}
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        print(f"{'':22s}{'spectra/s':>10s}  ratio to in-process (best of {args.repeats})")
        for name, seconds in best.items():
            print(f"  {name:20s}{n / seconds:10.0f}  {best['in-process'] / seconds:.2f}x")
    finally:
        if cluster is not None:
            cluster.stdin.close()
            cluster.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
