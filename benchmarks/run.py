"""ANNA-TF benchmarks: speed, memory, scaling and accuracy of the checkout this script sits in.

    python benchmarks/run.py [--quick] [--only NAME,...] [--json out.json] [--tmpdir DIR] [--verbose]
                             [--accuracy-iterations N]

Prints one table (row, figure, unit, baseline, ratio, target, met?) on stdout, progress on stderr, and with
--json writes every figure, the raw repeats and the machine description.  Everything generated goes into a
temporary folder that is deleted at the end.  Timings are never asserted: a missed target is a "NO" in the
table.  See benchmarks/README.md for what each row measures and how to read the ratios.
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for folder in (REPO_ROOT, BENCH_DIR):
    if folder not in sys.path:
        sys.path.insert(0, folder)
from anna.runtime import prepare_tensorflow_environment  # noqa: E402  (needs the path set above)

# The run's own cache folder (JIT_COMPILE AUTO's remembered timings, XLA's compiled programs), so that a run
# neither depends on nor changes what earlier runs or the user's own runs left in ~/.cache/anna-tf; set before
# prepare_tensorflow_environment, which points XLA's cache into it; removed at exit.
RUN_CACHE = tempfile.mkdtemp(prefix="anna-bench-cache-")
os.environ["ANNA_TF_CACHE_DIR"] = RUN_CACHE
atexit.register(shutil.rmtree, RUN_CACHE, True)
# as the commands run: quiet start-up, the pooling CPU allocator, XLA's persistent cache (anna/runtime.py);
# baselines in this process get the same environment, so a ratio never counts its gain
prepare_tensorflow_environment()

import harness  # noqa: E402  (needs the path set above)
from rows_training import TRAIN_CASES  # noqa: E402

TRAIN_CASE_KEYS = tuple(case.key for case in TRAIN_CASES)

GROUPS = ("train", "tutorial", "infer_pack", "infer_fits", "mc_dropout", "rss", "scaling", "accuracy", "survey",
          "survey_infer", "mc_training", "uncertainty", "tune", "scale_infer", "scale_train", "bad_pixels")
GROUP_TITLES = {
    "train": "1. training throughput",
    "tutorial": "2. tutorial wall time",
    "infer_pack": "3. inference from a pack",
    "infer_fits": "4. inference from multispec FITS",
    "mc_dropout": "5. MC-dropout inference",
    "rss": "6. peak memory against the pack size",
    "scaling": "7. scaling with spectrum length and pack size",
    "accuracy": "8. accuracy against classical baselines",
    "survey": "9. survey spectra: accuracy at a fixed time budget against a plain Keras loop",
    "survey_infer": "10. survey-size inference: speed and peak memory against plain Keras predict",
    "mc_training": "11. the cost of uncertainty-aware training: a step with the variance head against a plain step",
    "uncertainty": "12. uncertainty calibration on unseen survey spectra: a time-budgeted and a SIGINT-stopped run",
    "tune": "13. anna-tune: a timed search against configs/tutorial.param trained for one trial's minutes",
    "scale_infer": "14. INFER_SCHEDULER: anna-infer from multispec FITS on Dask (local:2, external 2-worker) against "
                   "one process",
    "scale_train": "15. DISTRIBUTE MIRRORED over 2 logical CPU devices against NONE",
    "bad_pixels": "16. survey files: reading and preparing each format; 5 % masked pixels with and without "
                  "BAD_PIXEL_FRACTION training",
}
LARGE_PACK_BYTES = 10**9  # tiled packs above this size are deleted as soon as no remaining row needs them
STAR_BYTES = (1001 + 5 + 2) * 8


class Context:
    """What every benchmark group gets: sizes, workspace, data store, log; ``keep_packs``: sizes (stars) of
    the tiled packs that later groups still need (a group may delete the others as soon as it is done)."""

    def __init__(self, sizes, workspace, data, log, survey_data=None, train_cases=None):
        self.sizes, self.ws, self.data, self.log = sizes, workspace, data, log
        self.keep_packs = set()
        self.survey_data = survey_data  # --survey-data: APOGEE-like example data made earlier (row 9)
        self.train_cases = train_cases  # --train-cases: row 1's networks to run (None: all)


# ----------------------------------------------------------------------------------------------------------
# Machine description


def machine_description():
    def cpu_model():
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    def memory_gb():
        try:
            with open("/proc/meminfo", encoding="utf-8") as handle:
                for line in handle:
                    if line.startswith("MemTotal:"):
                        return round(int(line.split()[1]) / 1024**2, 1)
        except OSError:
            pass
        return None

    def git(*args):
        try:
            return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                                  timeout=20).stdout.rstrip()  # rstrip: status lines start with a space
        except (OSError, subprocess.SubprocessError):
            return ""

    import numpy
    import tensorflow as tf

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line[3:]]
    revision = commit + (f" (with uncommitted changes in {len(changed)} file(s))" if changed else "")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(), "cpu": cpu_model(),
            "memory_gb": memory_gb(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "python": platform.python_version(), "tensorflow": tf.__version__, "numpy": numpy.__version__,
            "commit": commit, "uncommitted_files": changed, "git": revision, "platform": platform.platform()}


# ----------------------------------------------------------------------------------------------------------
# The table


def format_number(value):
    if value is None:
        return "-"
    if isinstance(value, int):  # counts
        return f"{value:,d}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or magnitude == 0:
        return f"{value:.3g}"
    return f"{value:.2e}"


def table_lines(rows):
    header = ("row", "figure", "unit", "baseline", "ratio", "target", "met?")
    body, notes = [], []
    for row in rows:
        if row.status == "ok":
            figure = format_number(row.figure)
        else:
            figure = row.status
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        name = row.name
        if row.note:
            notes.append(row.note)
            name += f" [{len(notes)}]"
        body.append((name, figure, row.unit, format_number(row.baseline), ratio,
                     row.target.text if row.target else "-", met))
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    align = ["<", ">", "<", ">", ">", "<", "<"]

    def render(line):
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths)).rstrip()

    lines = [render(header), render(tuple("-" * w for w in widths))] + [render(line) for line in body]
    if notes:
        lines.append("")
        lines += [f"[{number}] {note}" for number, note in enumerate(notes, start=1)]
    return lines


# ----------------------------------------------------------------------------------------------------------
# Running the groups


def run_group(name, ctx):
    import rows_accuracy
    import rows_inference
    import rows_survey
    import rows_training

    sizes = ctx.sizes

    def room_for(n_stars):
        if ctx.data.has_pack(n_stars):
            return None
        need = n_stars * STAR_BYTES + 2e9
        free = ctx.ws.free_bytes()
        if free < need:
            return f"only {free / 1e9:.1f} GB free on the workspace disk, {need / 1e9:.1f} GB needed (use --tmpdir)"
        return None

    if name == "train":
        return rows_training.training_throughput(ctx)
    if name == "tutorial":
        return rows_training.tutorial_wall_time(ctx)
    if name == "infer_pack":
        return rows_inference.infer_from_pack(ctx)
    if name == "infer_fits":
        return rows_inference.infer_from_fits(ctx)
    if name == "mc_dropout":
        return rows_inference.mc_dropout(ctx)
    if name == "rss":
        return rows_training.peak_rss(ctx, sizes.rss_pack_stars)
    if name == "scaling":
        rows, details = rows_training.training_scaling(ctx)
        more_rows, more_details = rows_inference.inference_scaling(ctx, room_for)
        return rows + more_rows, {"train": details, "infer": more_details}
    if name == "accuracy":
        return rows_accuracy.accuracy(ctx)
    if name == "survey":
        return rows_survey.survey_budget(ctx)
    if name == "survey_infer":
        import rows_survey_inference

        return rows_survey_inference.survey_inference(ctx)
    if name == "mc_training":
        import rows_mc_training

        return rows_mc_training.mc_training_cost(ctx)
    if name == "uncertainty":
        import rows_uncertainty

        return rows_uncertainty.calibration_on_unseen_data(ctx)
    if name == "tune":
        import rows_tune

        return rows_tune.tune_against_tutorial(ctx)
    if name in ("scale_infer", "scale_train"):
        import rows_scale_out

        row = rows_scale_out.scale_out_inference if name == "scale_infer" else rows_scale_out.scale_out_training
        return row(ctx)
    if name == "bad_pixels":
        import rows_bad_pixels

        return rows_bad_pixels.bad_pixels(ctx)
    raise ValueError(name)


def pack_sizes_used(name, sizes):
    return {"infer_pack": {sizes.infer_pack_stars}, "mc_dropout": {sizes.mc_pack_stars},
            "rss": set(sizes.rss_pack_stars), "scaling": set(sizes.scaling_pack_stars)}.get(name, set())


def parse_args(argv):
    parser = argparse.ArgumentParser(description="ANNA-TF benchmarks (see benchmarks/README.md).")
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer repeats (a few minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated groups to run: {', '.join(GROUPS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--tmpdir", metavar="DIR", help="parent folder of the scratch workspace (default: system temp)")
    parser.add_argument("--survey-data", metavar="DIR",
                        help="row 9: APOGEE-like example data made earlier (anna-synth DIR --grid apogee --n-train "
                             "20000 --n-xval 2000 --n-test 2000); default: made in the workspace (~5 CPU-minutes)")
    parser.add_argument("--accuracy-iterations", type=int, metavar="N",
                        help="stage-1 iterations of the accuracy training (stage 2 gets 2000/13000 of it); "
                             "default 13000 (the tutorial), 100 with --quick")
    parser.add_argument("--train-cases", metavar="KEYS",
                        help=f"row 1: comma-separated networks to run ({', '.join(TRAIN_CASE_KEYS)}); default all")
    parser.add_argument("--verbose", action="store_true", help="show anna's own progress lines")
    args = parser.parse_args(argv)
    if args.train_cases is not None:
        args.train_cases = [key.strip() for key in args.train_cases.split(",") if key.strip()]
        unknown = [key for key in args.train_cases if key not in TRAIN_CASE_KEYS]
        if unknown or not args.train_cases:
            parser.error(f"--train-cases: unknown {', '.join(unknown) or 'empty list'}; choose from "
                         f"{', '.join(TRAIN_CASE_KEYS)}")
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(GROUPS)
    unknown = [name for name in chosen if name not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if args.accuracy_iterations is not None and args.accuracy_iterations < 1:
        parser.error("--accuracy-iterations must be at least 1")
    args.groups = [name for name in GROUPS if name in chosen]
    return args


def _interrupt(signum, frame):
    """SIGTERM ends the run like Ctrl-C, so the scratch workspace is still removed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    log = harness.Log(verbose=args.verbose)
    if args.quick:
        sizes = harness.quick_sizes(*([args.accuracy_iterations] if args.accuracy_iterations else []))
    else:
        sizes = harness.full_sizes(*([args.accuracy_iterations] if args.accuracy_iterations else []))

    from anna.runtime import configure_threads

    configure_threads()  # before TensorFlow runs anything
    from data import DataStore

    machine = machine_description()
    machine["load_average_start"] = os.getloadavg()
    log(f"{'quick' if sizes.quick else 'full'} run of {', '.join(args.groups)} on {machine['nproc']} cores "
        f"({machine['cpu']}), TensorFlow {machine['tensorflow']}, git {machine['git']}")
    rows, details, durations, failures = [], {}, {}, {}
    started = time.perf_counter()
    with harness.Workspace(args.tmpdir) as ws:
        ctx = Context(sizes, ws, DataStore(ws, sizes, log), log, survey_data=args.survey_data,
                      train_cases=args.train_cases)
        for index, name in enumerate(args.groups):
            log(f"== {GROUP_TITLES[name]}")
            later = set().union(*[pack_sizes_used(other, sizes) for other in args.groups[index + 1:]])
            ctx.keep_packs = later
            group_started = time.perf_counter()
            try:
                group_rows, group_details = run_group(name, ctx)
            except Exception as exc:  # a failed group must not hide the others' results
                group_rows, trace = harness.error_rows(name, [f"{GROUP_TITLES[name]}"], exc)
                group_details = {"traceback": trace}
                failures[name] = trace
                log(f"   FAILED: {trace.strip().splitlines()[-1]}")
            durations[name] = time.perf_counter() - group_started
            rows += group_rows
            details[name] = group_details
            for n_stars in pack_sizes_used(name, sizes):
                if n_stars * STAR_BYTES > LARGE_PACK_BYTES and n_stars not in later:
                    ctx.data.drop_pack(n_stars)
    total = time.perf_counter() - started
    machine["load_average_end"] = os.getloadavg()

    title = (f"ANNA-TF benchmarks ({'quick' if sizes.quick else 'full'}), {machine['date']}, "
             f"{machine['nproc']} x {machine['cpu']}, TensorFlow {machine['tensorflow']}, git {machine['git']}, "
             f"{total / 60:.1f} min")
    print(title)
    print(f"commit {machine['commit']}" + (f" + uncommitted changes: {', '.join(machine['uncommitted_files'])}"
                                           if machine["uncommitted_files"] else ""))
    print()
    for line in table_lines(rows):
        print(line)
    if failures:
        print()
        for name, trace in failures.items():
            print(f"--- {name} failed:\n{trace}")
    if args.json:
        from anna.atomic import atomic_output

        report = {"title": title, "commit": machine["commit"], "mode": "quick" if sizes.quick else "full",
                  "machine": machine,
                  "sizes": {k: v for k, v in vars(sizes).items()}, "seconds": durations, "total_seconds": total,
                  "rows": [row.as_dict() for row in rows], "details": details, "failures": failures,
                  "command": sys.argv}
        with atomic_output(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1, default=lambda value: value.tolist()
                      if hasattr(value, "tolist") else str(value))
            handle.write("\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
