"""Shared pieces of the benchmark script: result rows and targets, timing, sizes, the scratch workspace.

Timings on a shared machine are noisy, so every figure is the median of several repeats and every row is
compared with a baseline measured in the same run, close in time.  Nothing here asserts a timing: a missed
target is reported, never raised.
"""

import dataclasses
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL_CONFIG = os.path.join(REPO_ROOT, "configs", "tutorial.param")
TUTORIAL_ITERATIONS = (13000, 2000)  # stage 1 and stage 2 of the tutorial (Appendix A)


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for one row: ``figure`` or ``ratio`` must be ``>=`` or ``<=`` ``value``; ``text`` is what the table shows."""

    on: str
    op: str
    value: float
    text: str

    def met(self, figure, ratio):
        subject = figure if self.on == "figure" else ratio
        if subject is None or not math.isfinite(subject):
            return None
        return subject >= self.value if self.op == ">=" else subject <= self.value


def at_least(value, unit_text):
    return Target("figure", ">=", value, f">= {unit_text}")


def at_most(value, unit_text):
    return Target("figure", "<=", value, f"<= {unit_text}")


def ratio_at_least(value):
    return Target("ratio", ">=", value, f">= {value:g}x")


@dataclasses.dataclass
class Row:
    """One line of the results table.

    ``figure`` is the measured value in ``unit``; ``baseline`` the comparison value in the same unit, measured
    in the same run; ``ratio`` = figure / baseline.  ``status`` is "ok", "n/a" (not applicable here, ``note``
    says why), "skipped" or "error".  ``higher_is_better`` tells the reader which way the ratio should go.
    """

    group: str
    name: str
    figure: float = None
    unit: str = ""
    baseline: float = None
    target: Target = None
    note: str = ""
    status: str = "ok"
    higher_is_better: bool = True
    ratio_value: float = None  # when the ratio is not figure / baseline (e.g. a median of paired ratios)

    @property
    def ratio(self):
        if self.ratio_value is not None:
            return self.ratio_value
        if self.figure is None or self.baseline is None or self.baseline == 0:
            return None
        return self.figure / self.baseline

    @property
    def met(self):
        if self.target is None or self.status != "ok":
            return None
        return self.target.met(self.figure, self.ratio)

    def as_dict(self):
        return {"group": self.group, "name": self.name, "figure": self.figure, "unit": self.unit,
                "baseline": self.baseline, "ratio": self.ratio,
                "target": None if self.target is None else self.target.text, "met": self.met,
                "status": self.status, "note": self.note, "higher_is_better": self.higher_is_better}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each benchmark is.  :func:`full_sizes` is the real benchmark, :func:`quick_sizes` a smoke run
    (a few minutes on a 2-core machine) that still produces every row."""

    quick: bool
    n_train: int            # example-data training pack (the tutorial uses 5000)
    n_test: int             # test stars per S/N in the accuracy row
    train_rounds: int       # row 1: rounds of (baselines, anna-train ON[, OFF]) per network
    train_iterations: int   # row 1, 1001-pixel networks: iterations per anna-train run
    train_interval: int     # row 1, 1001 px: SAMPLE_INTERVAL, i.e. steps per timed interval and baseline chunk
    warmup_intervals: int   # row 1, 1001 px: leading intervals discarded (graph tracing, pipeline filling)
    survey_train_iterations: int  # row 1, survey-sized (7214-pixel) networks: the same three
    survey_train_interval: int
    survey_warmup_intervals: int
    survey_npix: int        # pixels of the survey-sized rows (7214; quick runs fewer, see README)
    survey_base_stars: int  # survey-sized packs: spectra synthesised (then repeated) ...
    survey_train_stars: int  # ... to this many training stars
    tutorial_iterations: int  # row 2: iterations actually run (split 13:2 between the stages), then scaled
    baseline_chunks: int    # baseline chunks of one interval's steps timed per baseline measurement
    infer_pack_stars: int   # row 3
    repeats: int            # inference rows: repeats of each timing
    predict_spectra: int    # in-memory predict baselines
    fits_spectra: int       # row 4 (90 apertures per file)
    mc_pack_stars: int      # row 5: anna-infer input (DEBUG pack)
    mc_train_iterations: int  # row 5: training of the MC-dropout model (stage 1 only)
    rss_pack_stars: tuple   # row 6: pack sizes (stars of 1001 pixels; 1,000,000 = 8.06 GB)
    rss_iterations: int     # row 6
    scaling_npix: tuple     # row 7
    scaling_train_steps: int
    scaling_predict_spectra: int
    scaling_pack_stars: tuple
    accuracy_iterations: int  # row 8, stage 1 (stage 2 scaled 2000/13000)
    accuracy_sn: tuple = (50.0, 100.0, 200.0)
    # Quick runs only: overrides that let a few dozen iterations reach steady state (documented in the notes).
    tutorial_interval: int = None  # SAMPLE_INTERVAL for row 2 (None: the tutorial's 50)
    # survey-size inference (group survey_infer): stars per pack, MC-dropout stars, the peak-RSS pack sizes
    survey_infer_stars: int = 20_000
    survey_mc_stars: int = 2000
    survey_rss_stars: tuple = (20_000, 200_000)  # 1,000,000 (57.8 GB) measured once: RESULTS.md
    # ... and (pixels, stars) of the rows at a survey's scale, where the start-up is a survey run's share of it
    survey_infer_large: tuple = ((1001, 200_000), (3909, 100_000))
    # uncertainty calibration on unseen survey spectra (rows_uncertainty): the stage's time budget (minutes)
    calibration_minutes: float = 6.0
    # anna-tune (rows_tune): the search's wall clock and one trial's budget (minutes)
    tune_minutes: float = 20.0
    tune_trial_minutes: float = 2.0
    # survey files and bad pixels (rows_bad_pixels): stage-1 iterations of each anna-train run, and the least
    # time each reading figure is timed over (seconds)
    bad_pixel_iterations: int = 6000
    bad_pixel_read_seconds: float = 1.0

    def train_schedule(self, npix):
        """(iterations, SAMPLE_INTERVAL, warm-up intervals) of a row-1 anna-train run on ``npix`` pixels."""
        if npix < 1500:
            return self.train_iterations, self.train_interval, self.warmup_intervals
        return self.survey_train_iterations, self.survey_train_interval, self.survey_warmup_intervals


def starnet_spec(npix, nout=5, heteroscedastic=False):
    """The StarNet2017-shaped network the survey rows run (configs/apogee.param: CONV_LAYERS 4x8, 16x8p4,
    FC_DIMS 256, 128), as an :class:`anna.model.NetworkSpec` for ``npix`` pixels."""
    from anna.model import ConvLayer, NetworkSpec

    return NetworkSpec(npix=npix, nout=nout, conv_layers=(ConvLayer(4, 8), ConvLayer(16, 8, pool=4)),
                       fc_dims=(256, 128), heteroscedastic=heteroscedastic)


def _stars(gigabytes, npix=1001, nout=5):
    """Stars of a pack of ``gigabytes`` GB (float64 id, labels, dummy and flux per star)."""
    return int(gigabytes * 1e9 // ((npix + nout + 2) * 8))


def full_sizes(accuracy_iterations=TUTORIAL_ITERATIONS[0]):
    return Sizes(quick=False, n_train=5000, n_test=2000, train_rounds=2, train_iterations=700,
                 train_interval=50, warmup_intervals=6, survey_train_iterations=300, survey_train_interval=50,
                 survey_warmup_intervals=2, survey_npix=7214, survey_base_stars=500, survey_train_stars=5000,
                 tutorial_iterations=1500, baseline_chunks=4, infer_pack_stars=100_000, repeats=3,
                 predict_spectra=20_000, fits_spectra=100_080, mc_pack_stars=20_000, mc_train_iterations=200,
                 rss_pack_stars=(_stars(0.1), _stars(0.5), _stars(1.0), _stars(2.0), 1_000_000),
                 rss_iterations=300, scaling_npix=(1001, 4001, 8001), scaling_train_steps=10,
                 scaling_predict_spectra=4096, scaling_pack_stars=(10_000, 100_000, 1_000_000),
                 accuracy_iterations=accuracy_iterations)


def quick_sizes(accuracy_iterations=100):
    return Sizes(quick=True, n_train=2000, n_test=300, train_rounds=1, train_iterations=120,
                 train_interval=20, warmup_intervals=2, survey_train_iterations=40, survey_train_interval=10,
                 survey_warmup_intervals=2, survey_npix=2000, survey_base_stars=100, survey_train_stars=1000,
                 tutorial_iterations=115, baseline_chunks=2, infer_pack_stars=10_000, repeats=2,
                 predict_spectra=4096, fits_spectra=1800, mc_pack_stars=2000, mc_train_iterations=20,
                 rss_pack_stars=(_stars(0.1), _stars(0.3), _stars(0.8)), rss_iterations=30,
                 scaling_npix=(1001, 4001, 8001), scaling_train_steps=3, scaling_predict_spectra=1024,
                 scaling_pack_stars=(2000, 6000, 20_000), accuracy_iterations=accuracy_iterations,
                 survey_infer_stars=600, survey_mc_stars=64, survey_rss_stars=(600, 2400), calibration_minutes=0.5,
                 survey_infer_large=((1001, 6000),), tune_minutes=3.0, tune_trial_minutes=0.5,
                 bad_pixel_iterations=150, bad_pixel_read_seconds=0.2)


def linear_scaling_row(name, unit, npix, cost, reference):
    """A scaling row: ``cost`` at ``npix`` pixels against the cost that growing linearly from the first length
    measured (``reference`` = (npix, cost), None for that first length) would give.  Returns (row, reference)."""
    if reference is None:
        reference = (npix, cost)
    expected = reference[1] * npix / reference[0] if npix != reference[0] else None
    return Row("scaling", name, cost, unit, expected,
               note="baseline = npix-1001 cost x npix/1001 (ratio 1 = linear)" if expected else "",
               higher_is_better=False), reference


def median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def timed(function, *args, **kwargs):
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


class Log:
    """Progress lines on stderr (so stdout keeps only the table); anna's own reports only with --verbose."""

    def __init__(self, verbose=False, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def __call__(self, text):
        self.stream.write(f"[{time.perf_counter() - self.started:7.1f}s] {text}\n")
        self.stream.flush()

    def anna(self, text):
        """A ``report`` callback for anna's stage functions."""
        if self.verbose:
            self(f"    | {text}")


class Workspace:
    """A scratch folder for everything a run generates; removed on exit, whatever happens."""

    def __init__(self, parent=None):
        self.parent = parent
        self.path = None

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="anna-bench-", dir=self.parent)
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
        return False

    def sub(self, *parts):
        """Path inside the workspace; its parent folders are created."""
        path = os.path.join(self.path, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def fresh_dir(self, *parts):
        path = os.path.join(self.path, *parts)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def free_bytes(self):
        return shutil.disk_usage(self.path).free


def error_rows(group, names, exc):
    """Rows that say a benchmark group failed, so the table still lists every row."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return [Row(group, name, status="error", note=text) for name in names], traceback.format_exc()
