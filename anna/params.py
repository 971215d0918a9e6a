"""The ANNA parameter file: parsing, typing and per-stage validation.

ANNA is driven by one plain-text parameter file (user guide, section 4.1) shared by training, testing and
inference.  This module turns that file into an immutable, typed :class:`Config` and checks that a stage
has everything it needs *before* any expensive work starts, reporting every problem at once so a user can
fix a file in one pass instead of one crash at a time.

Syntax, line by line::

    # a whole-line comment
    KEY: value            # a trailing comment (everything after '#' is ignored, so '#' cannot be in values)
    SAVE_LOC: C:/runs/x   # the line is split at the FIRST colon only, so values may contain ':'
    MIN_PARAMS: 4000, 2.7, -0.5     # lists are comma separated
    DO_TRAIN2: yes        # flags: YES/NO or TRUE/FALSE, any case
    SEED:                 # an empty value leaves the key at its documented default

Keys are case-insensitive and stored upper case.  Relative paths resolve against the directory of the
parameter file (so a run does not depend on the shell's working directory); ``~`` expands to the home folder.
Overrides given on the command line (``--set KEY=VALUE``) are applied after the file with the same typing;
their relative paths resolve against the current working directory, as any other command-line path would.

Every key is one row of :data:`KEY_TABLE` (name, type, default, stages, doc), so adding a key is one line.
"""

import dataclasses
import difflib
import glob
import os
import re
from types import MappingProxyType

from anna.errors import AnnaInputError
from anna.param_types import (Choice, ConvLayerList, ConvShape, CountList, CountOrAuto, FilePattern,
                              FilesystemPath, Flag, FlagOrAuto, Float, FloatList, Fraction, Int, NameList,
                              Probability, Range, SchedulerAddress, SearchSpace, Text, _Problem,
                              _resolve_path)

TRAIN = "train"
TEST = "test"
INFER = "infer"
STAGES = (TRAIN, TEST, INFER)
STAGE_NAMES = {TRAIN: "training", TEST: "testing", INFER: "inference"}
#: anna-tune's keys (a search over anna-train runs; not a stage of its own: it drives anna-train)
TUNE = "tune"

#: Inference input modes (``Config.infer_mode``).  FITS: 1-D or multispec FITS files listed by INFER_FILES.
INFER_MODES = ("DEBUG", "MS_FITS", "TEXT", "FITS")

#: Name of the trained model inside SAVE_LOC / TEST_MODEL_LOC / INFER_MODEL_LOC.
FROZEN_MODEL_NAME = "frozen.model"

OVERRIDE_LOCATION = "--set"

# --------------------------------------------------------------------------------------------- key table


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One parameter: its type, default (already typed), the stages that read it, and what it is for.

    ``required_for`` lists the stages that cannot run without it; conditional requirements (e.g. LOG_LOC when
    TBOARD_OUTPUT is YES) are in :data:`_CONDITIONAL_REQUIREMENTS`.
    """

    name: str
    type: object
    default: object
    stages: tuple
    doc: str
    aliases: tuple = ()
    required_for: tuple = ()
    # True for a training key that does not change what training computes (where logs go, threads, the time
    # budget): it may change between a killed run and its resume.  Keys training does not read are such keys
    # anyway (:func:`resume_neutral_keys`).
    resume_neutral: bool = False



def resume_neutral_keys():
    """Keys that may change between a killed training run and its resume without spoiling it: those training
    does not read, and the training keys marked ``resume_neutral`` in :data:`KEY_TABLE`."""
    return frozenset(spec.name for spec in KEY_TABLE if TRAIN not in spec.stages or spec.resume_neutral)


_ALL = (TRAIN, TEST, INFER)
_TR = (TRAIN,)
_TE = (TEST,)
_IN = (INFER,)
_TU = (TUNE,)
_COUNT = Int()


def _searchable(raw_key):
    """TUNE_SPACE's rule for which keys a search may vary: keys that change what training computes (a training
    key not marked ``resume_neutral``), except where the run writes (SAVE_LOC) and its time budget, which the
    search sets per trial.  Returns (canonical name, value type); raises _Problem saying why not."""
    name = _canonical(raw_key)
    if name is None:
        raise _Problem(f"{raw_key.strip()}: {_suggestion(raw_key.strip())}")
    spec = _SPECS[name]
    if TRAIN not in spec.stages:
        raise _Problem(f"{name}: not a training key, so a search cannot vary it")
    if spec.resume_neutral or name in ("SAVE_LOC", "TRAINING_DATA", "XVAL_DATA", "SN_TEMPLATE"):
        raise _Problem(f"{name}: does not decide what a network learns (where it runs, logs or reads from, its "
                       "time budget), so a search cannot vary it")
    return name, spec.type


KEY_TABLE = (
    # ---- training, in the user guide's order
    KeySpec("NUM_PX", _COUNT, None, _ALL, "pixels per spectrum (the frozen model remembers it)",
            aliases=("NUM_PIX",), required_for=_TR),
    KeySpec("CONV1_SHAPE", ConvShape(), (1, 45, 1, 10), _TR, "first convolution: 1, kernel width (px), 1, kernels"),
    KeySpec("FC1_OUTDIM", _COUNT, 128, _TR, "width of the first fully-connected layer"),
    KeySpec("FC2_OUTDIM", _COUNT, 128, _TR, "width of the second fully-connected layer"),
    KeySpec("NUM_OUTS", _COUNT, None, _TR, "number of output parameters", required_for=_TR),
    KeySpec("LEARN_RATE1", Float(above=0), 5e-5, _TR, "learning rate, first training stage"),
    KeySpec("NUM_TRAIN_ITERS1", _COUNT, 13000, _TR, "maximum iterations (batches), first stage"),
    KeySpec("BATCH_SIZE1", _COUNT, 100, _TR, "spectra per batch, first stage"),
    KeySpec("KEEP_PROB1", Probability(), 0.8, _TR, "dropout keep probability, first stage"),
    KeySpec("DO_TRAIN2", Flag(), True, _TR, "run a second training stage"),
    KeySpec("LEARN_RATE2", Float(above=0), 1e-6, _TR, "learning rate, second stage"),
    KeySpec("NUM_TRAIN_ITERS2", _COUNT, 2000, _TR, "maximum iterations, second stage"),
    KeySpec("BATCH_SIZE2", _COUNT, 100, _TR, "spectra per batch, second stage"),
    KeySpec("KEEP_PROB2", Probability(), 1.0, _TR, "dropout keep probability, second stage"),
    KeySpec("PREPROCESS_TRAIN", Flag(), True, _TR, "add noise and continuum errors to training spectra"),
    KeySpec("REL_CONT_E_TRAIN", Range(), (-0.01, 0.01), _TR, "relative continuum offset range 'low, high'"),
    KeySpec("SN_RANGE_TRAIN", Range(positive=True), (175.0, 250.0), _TR, "signal-to-noise range 'low, high'"),
    KeySpec("SN_TEMPLATE", FilesystemPath(), None, _TR, "two-column text file: wavelength (A), relative S/N",
            aliases=("SN_TEMPLATE_TRAIN",)),
    KeySpec("NUM_FETCH", _COUNT, 1000, _TR, "training examples preprocessed at once"),
    KeySpec("TRAINING_DATA", FilesystemPath(), None, _TR, "training pack (float64 binary)", required_for=_TR),
    KeySpec("SAVE_LOC", FilesystemPath(folder=True), None, _TR, "folder for the trained model (created if needed)",
            required_for=_TR),
    KeySpec("OUTPUT_NAMES", NameList(), None, _TR, "names of the outputs, in pack order", required_for=_TR),
    KeySpec("MIN_PARAMS", FloatList(), None, _TR, "per-output minimum used to scale labels to [0, 1]",
            required_for=_TR),
    KeySpec("MAX_PARAMS", FloatList(), None, _TR, "per-output maximum used to scale labels to [0, 1]",
            required_for=_TR),
    KeySpec("SAMPLE_INTERVAL", _COUNT, 50, _TR, "batches between progress evaluations"),
    KeySpec("PP_THREADS", _COUNT, 1, _TR, "parallel preprocessing workers", resume_neutral=True),
    KeySpec("MAX_PP_DEPTH", _COUNT, 10000, _TR,
            "preprocessed examples buffered ahead of training (at most 64 MiB of flux)", resume_neutral=True),
    KeySpec("LOG_LOC", FilesystemPath(folder=True), None, _TR, "folder for logs (TensorBoard, timeline)",
            resume_neutral=True),
    KeySpec("TIMELINE_OUTPUT", Flag(), False, _TR, "write a profiler trace to LOG_LOC", resume_neutral=True),
    KeySpec("TBOARD_OUTPUT", Flag(), True, _TR, "write TensorBoard summaries to LOG_LOC", resume_neutral=True),
    KeySpec("TRAINING_XVAL", Flag(), False, _TR, "evaluate on a separate cross-validation pack"),
    KeySpec("XVAL_DATA", FilesystemPath(), None, _TR, "cross-validation pack"),
    KeySpec("XVAL_SIZE", _COUNT, 500, _TR, "cross-validation spectra used (the first ones)"),
    KeySpec("XV_THREADS", _COUNT, 1, _TR, "accepted for ANNA's files; has no effect (the cross-validation set is "
            "noised once, by one vectorised call)", resume_neutral=True),
    KeySpec("PREPROCESS_XVAL", Flag(), True, _TR, "preprocess cross-validation spectra like training ones"),
    KeySpec("EARLY_STOP", Flag(), True, _TR, "stop when the monitored cost stops improving"),
    KeySpec("ES_SAMPLE", _COUNT, 100, _TR, "evaluations without improvement before stopping"),
    # ---- testing
    KeySpec("TEST_MODEL_LOC", FilesystemPath(folder=True), None, _TE, "folder holding frozen.model",
            required_for=_TE),
    KeySpec("TEST_SAVE_LOC", FilesystemPath(folder=True), None, _TE, "folder for test results (created if needed)",
            required_for=_TE),
    KeySpec("TESTING_DATA", FilesystemPath(), None, _TE, "test pack (float64 binary)", required_for=_TE),
    KeySpec("PREPROCESS_TEST", Flag(), False, _TE, "add noise and continuum errors to test spectra"),
    KeySpec("REL_CONT_E_TEST", Range(), None, _TE, "relative continuum offset range for testing"),
    KeySpec("SN_RANGE_TEST", Range(positive=True), None, _TE, "signal-to-noise range for testing"),
    KeySpec("SN_TEMPLATE_TEST", FilesystemPath(), None, _TE, "S/N template for testing"),
    # ---- inference, in the user guide's order
    KeySpec("DEBUG_MODE", Flag(), False, _IN, "legacy: infer on a pack (DEBUG_DATA)"),
    KeySpec("DEBUG_DATA", FilesystemPath(), None, _IN, "pack for DEBUG mode"),
    KeySpec("SINGLE_MS_MODE", Flag(), False, _IN, "legacy: infer on one multispec FITS file"),
    KeySpec("MS_FITS_IMAGE", FilesystemPath(), None, _IN, "multispec FITS file for MS_FITS mode"),
    KeySpec("WAVE_TEMPLATE", FilesystemPath(), None, _IN, "optional wavelength grid (the model carries its own)"),
    KeySpec("INFER_MODEL_LOC", FilesystemPath(folder=True), None, _IN, "folder holding frozen.model",
            required_for=_IN),
    KeySpec("INFER_SAVE_LOC", FilesystemPath(folder=True), None, _IN, "folder for inference results (made if needed)",
            required_for=_IN),
    # ---- ANNA-TF extensions: training
    KeySpec("SEED", Int(minimum=0, maximum=2**32 - 1), None, _TR, "random seed; empty = nondeterministic"),
    KeySpec("CONV2_SHAPE", ConvShape(), None, _TR, "second convolution '1, width, 1, kernels'; empty = none"),
    KeySpec("POOL_SIZE", _COUNT, 1, _TR, "max-pooling width after the last convolution; 1 = no pooling"),
    KeySpec("CONV_LAYERS", ConvLayerList(), None, _TR,
            "all convolutions 'KxW[sS][pP][d], ...' (replaces CONV1_SHAPE/CONV2_SHAPE), e.g. '4x8, 16x8p4'"),
    KeySpec("FC_DIMS", CountList(), None, _TR, "widths of all dense layers (replaces FC1_OUTDIM/FC2_OUTDIM)"),
    KeySpec("INPUT_CENTERING", Choice(("ONE", "MEAN")), "ONE", _TR,
            "ONE: network sees flux - 1; MEAN: flux minus the training mean spectrum"),
    KeySpec("JIT_COMPILE", FlagOrAuto(), "AUTO", _ALL,
            "XLA for the training steps and forward passes: AUTO times the forms at the start and keeps the "
            "fastest"),
    KeySpec("WEIGHT_INIT", Choice(("HE", "GLOROT")), "HE", _TR,
            "how the kernels start: HE (He-normal) or GLOROT (Glorot-uniform, Keras' default)"),
    KeySpec("OPTIMIZER", Choice(("ADAM", "ADAMW")), "ADAM", _TR, "ADAM, or ADAMW (Adam with decoupled weight decay)"),
    KeySpec("WEIGHT_DECAY", Float(at_least=0), None, _TR, "ADAMW's weight decay per step (default 1e-4)"),
    KeySpec("LR_SCHEDULE", Choice(("CONSTANT", "PLATEAU", "COSINE")), "CONSTANT", _TR,
            "learning rate within a stage: CONSTANT, PLATEAU (cut by LR_FACTOR after LR_PATIENCE intervals "
            "without improvement) or COSINE (decay to LR_MIN over the stage)"),
    KeySpec("LR_PATIENCE", _COUNT, 5, _TR, "PLATEAU: sample intervals without improvement before a cut"),
    KeySpec("LR_FACTOR", Fraction(), 0.5, _TR, "PLATEAU: factor applied to the learning rate at a cut"),
    KeySpec("LR_MIN", Float(at_least=0), 0.0, _TR, "lowest learning rate PLATEAU cuts to, and COSINE's end"),
    KeySpec("LR_DECAY_START", Float(at_least=0, below=1), 0.0, _TR,
            "COSINE: share of the stage (0 to below 1) run at the full rate before the cosine decay begins"),
    KeySpec("MAX_MINUTES1", Float(above=0), None, _TR,
            "wall-clock limit of stage 1 (minutes); ends it as early stopping does; empty = none", resume_neutral=True),
    KeySpec("MAX_MINUTES2", Float(above=0), None, _TR, "wall-clock limit of stage 2 (minutes); empty = none",
            resume_neutral=True),
    KeySpec("RESUME", Flag(), True, _TR, "continue from a checkpoint in SAVE_LOC if one exists", resume_neutral=True),
    KeySpec("DISTRIBUTE", Choice(("NONE", "MIRRORED", "MULTI_WORKER")), "NONE", _TR,
            "NONE (one device), MIRRORED (every local GPU, or the logical CPU devices) or MULTI_WORKER (the "
            "cluster in the TF_CONFIG environment variable); BATCH_SIZEn stays the global batch"),
    KeySpec("MIXED_PRECISION", Flag(), False, _TR,
            "float16 compute with loss scaling (GPU only; refused without one); the frozen model stays float32"),
    KeySpec("MAGIC_NUMBER", Float(), -9999.0, _ALL, "value that marks a missing label or bad pixel"),
    KeySpec("UNCERTAINTY", Choice(("NONE", "MC_DROPOUT")), "NONE", _ALL,
            "per-star uncertainty estimate; anna-test and anna-infer without it: what the frozen model was "
            "trained with (NONE turns a model's uncertainties off)"),
    KeySpec("MC_SAMPLES", _COUNT, 100, _ALL, "forward passes for MC_DROPOUT", resume_neutral=True),
    # ---- ANNA-TF extensions: testing
    KeySpec("FIT_CORRECTION", Flag(), False, _TE, "fit true = f(inferred) polynomials to test residuals"),
    KeySpec("CORRECTION_DEGREE", Int(minimum=0, maximum=5), 1, _TE, "degree of those polynomials (0..5)"),
    KeySpec("TEST_BATCH_SIZE", CountOrAuto(), "AUTO", _TE,
            "spectra per forward pass when testing; AUTO: the most that fit MAX_MEMORY_GB"),
    # ---- ANNA-TF extensions: inference
    KeySpec("INFER_MODE", Choice(INFER_MODES), None, _IN, "DEBUG, MS_FITS, TEXT or FITS (replaces the flags)"),
    KeySpec("TEXT_IMAGE", FilesystemPath(), None, _IN, "two-column text spectrum for TEXT mode"),
    KeySpec("INFER_FILES", FilePattern(), None, _IN, "glob, or text file listing one input per line"),
    KeySpec("APPLY_CORRECTION", Flag(), False, _IN, "apply the correction fitted by FIT_CORRECTION"),
    KeySpec("INFER_PLOTS", Flag(), False, _IN, "also write infer_histograms.png: a histogram per label of every "
                                               "output of the run, for a survey-level look"),
    KeySpec("INFER_BATCH_SIZE", CountOrAuto(), "AUTO", _IN,
            "spectra per forward pass when inferring; AUTO: the most that fit MAX_MEMORY_GB"),
    KeySpec("MAX_MEMORY_GB", Float(above=0), 2.0, (TEST, INFER),
            "peak memory (GB) anna-test and anna-infer size their batches for"),
    KeySpec("RANGE_MARGIN", Float(at_least=0), 0.05, _IN,
            "fraction of MAX-MIN beyond which a prediction is flagged out of range"),
    KeySpec("MAX_REL_SIGMA", Float(above=0), None, _IN,
            "with MC_DROPOUT: flag a star whose sigma exceeds this fraction of MAX-MIN; empty = no flag"),
    KeySpec("INFER_SCHEDULER", SchedulerAddress(), None, _IN,
            "empty: in this process; tcp://host:port: an existing Dask scheduler; local:N: a Dask cluster of N "
            "worker processes for this run (needs the dask extra)"),
    KeySpec("INFER_SCHEDULER_TIMEOUT", Float(above=0), 30.0, _IN,
            "seconds to wait for INFER_SCHEDULER's scheduler before giving up"),
    # ---- anna-tune (hyper-parameter search over anna-train runs)
    KeySpec("TUNE_SPACE", SearchSpace(_searchable), None, _TU,
            "keys to search, 'KEY=kind(...)' separated by ';': float(low, high[, log|step]), log(low, high), "
            "int(low, high[, log|step]), choice(a | b | c)", required_for=_TU),
    KeySpec("TUNE_TRIALS", _COUNT, 20, _TU, "trials the search finishes (all processes of a shared study together)"),
    KeySpec("TUNE_MINUTES", Float(above=0), None, _TU,
            "wall-clock limit of the whole search (minutes); the running trial is stopped and lost (the next "
            "start runs another in its place); empty = none"),
    KeySpec("TUNE_TRIAL_MINUTES", Float(above=0), None, _TU,
            "wall-clock budget of one trial (minutes), shared by its stages in proportion to their iterations "
            "(as MAX_MINUTES1/2); empty = iterations only"),
    KeySpec("TUNE_STORAGE", Text(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", "a storage URL 'dialect://...', e.g. "
                                 "postgresql://user@host/db"), None, _TU,
            "Optuna storage URL (postgresql://..., mysql://..., sqlite:///...) shared by several anna-tune "
            "processes; empty = SQLite file tune.db in SAVE_LOC"),
    KeySpec("TUNE_STUDY", Text(r"[A-Za-z0-9_.-]+", "a name of letters, digits, '_', '.' and '-'"), None, _TU,
            "study name; empty = the parameter file's name without .param"),
    KeySpec("TUNE_PRUNER", Choice(("MEDIAN", "HYPERBAND", "NONE")), "MEDIAN", _TU,
            "stop poor trials early: MEDIAN (worse than the median of earlier trials at the same interval), "
            "HYPERBAND or NONE"),
    KeySpec("TUNE_PRUNE_STARTUP", Int(minimum=0), 5, _TU, "MEDIAN: trials that finish before any is pruned"),
    KeySpec("TUNE_PRUNE_WARMUP", Int(minimum=0), 2, _TU,
            "sample intervals a trial runs before it may be pruned (MEDIAN and HYPERBAND)"),
    # ---- ANNA-TF extensions: survey spectra (bad pixels, continuum, rest frame)
    KeySpec("BAD_PIXEL_FRACTION", Float(at_least=0, below=0.5), 0.0, _TR,
            "training augmentation: fraction of pixels of each training spectrum dropped (single pixels and runs) "
            "and set as BAD_PIXEL_FILL says, so the network learns to ignore masked pixels; 0 = none"),
    KeySpec("BAD_PIXEL_FILL", Choice(("CONTINUUM", "INTERPOLATE")), "INTERPOLATE", _TR,
            "neutral value of a bad pixel: CONTINUUM (1.0) or INTERPOLATE (runs of up to 5 pixels bridged, longer "
            "ones 1.0); recorded in the frozen model, which anna-infer follows"),
    KeySpec("CONTINUUM", Choice(("NONE", "SPLINE", "QUANTILE")), "NONE", (TRAIN, INFER),
            "continuum normalisation of survey spectra: NONE, SPLINE (sigma-clipped spline) or QUANTILE (running "
            "quantile); training records what its packs were built with, anna-infer applies the model's record"),
    KeySpec("MAX_BAD_PIXEL_FRACTION", Float(above=0, below=1), 0.2, _IN,
            "flag many_bad_pixels when more than this fraction of a spectrum's grid pixels are bad"),
    KeySpec("RV_CORRECT", Flag(), False, _IN,
            "shift survey spectra to the rest frame by the velocity or redshift their file states"),
)

_SPECS = MappingProxyType({spec.name: spec for spec in KEY_TABLE})
_ALIASES = MappingProxyType({alias: spec.name for spec in KEY_TABLE for alias in spec.aliases})

#: Which companion key each inference mode reads its input from (any one of them).
_MODE_INPUT_KEYS = MappingProxyType({
    "DEBUG": ("DEBUG_DATA",),
    "MS_FITS": ("MS_FITS_IMAGE", "INFER_FILES"),
    "TEXT": ("TEXT_IMAGE", "INFER_FILES"),
    "FITS": ("INFER_FILES",),
})


def known_keys():
    """Every canonical key name, in parameter-file order (aliases not included)."""
    return [spec.name for spec in KEY_TABLE]


def key_spec(key):
    """The :class:`KeySpec` of a key or alias, any case; KeyError if unknown."""
    name = _canonical(key)
    if name is None:
        raise KeyError(f"unknown parameter key {key!r}")
    return _SPECS[name]


def _canonical(key):
    upper = str(key).strip().upper()
    if upper in _SPECS:
        return upper
    return _ALIASES.get(upper)


def _suggestion(key):
    """'unknown key' plus the closest known spelling(s); ties are all offered, in table order."""
    upper = key.upper()
    candidates = list(_SPECS) + list(_ALIASES)
    scored = [(difflib.SequenceMatcher(None, upper, name).ratio(), name) for name in candidates]
    best = max(score for score, _ in scored)
    if best < 0.6:
        return "unknown key (see ANNA.param.example for the known keys)"
    closest = []
    for score, name in scored:
        canonical = _ALIASES.get(name, name)
        if score == best and canonical not in closest:
            closest.append(canonical)
    return f"unknown key; did you mean {' or '.join(closest[:3])}?"


# --------------------------------------------------------------------------------------------- the config


class Config:
    """Typed, immutable parameters.  Read keys as lowercase attributes: ``cfg.num_px``, ``cfg.min_params``.

    Keys that were not given hold their documented default (None when there is none).  Lists are tuples,
    paths are absolute strings.  ``source`` is the absolute path of the parameter file and ``infer_mode``
    the resolved inference mode (one of :data:`INFER_MODES`, or None when nothing chooses one).
    Build it with :func:`load_config`.
    """

    __slots__ = ("source", "infer_mode", "_values", "_origins", "_texts")

    def __init__(self, source, values, origins, texts, infer_mode):
        # origins: key -> line number (file) or OVERRIDE_LOCATION; texts: key -> the value as written.
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "infer_mode", infer_mode)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))
        object.__setattr__(self, "_origins", MappingProxyType(dict(origins)))
        object.__setattr__(self, "_texts", MappingProxyType(dict(texts)))

    def __setattr__(self, name, value):
        raise AttributeError(f"Config is immutable (tried to set {name!r})")

    def __delattr__(self, name):
        raise AttributeError(f"Config is immutable (tried to delete {name!r})")

    def __getattr__(self, name):
        # Only called when normal lookup fails, i.e. for key names.
        if not name.startswith("_") and name == name.lower():
            key = _canonical(name)
            if key is not None:
                return self._values[key]
            close = difflib.get_close_matches(name, [k.lower() for k in _SPECS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"no parameter named {name!r}{hint}")
        raise AttributeError(name)

    def __reduce__(self):
        # Slots plus a blocking __setattr__ defeat the default pickling; rebuild through __init__ instead
        # (configs travel to worker processes).
        return (Config, (self.source, dict(self._values), dict(self._origins), dict(self._texts),
                         self.infer_mode))

    def __eq__(self, other):
        if not isinstance(other, Config):
            return NotImplemented
        return (self.source, self.infer_mode, dict(self._values)) == \
            (other.source, other.infer_mode, dict(other._values))

    def __hash__(self):
        return hash((self.source, self.infer_mode))

    def __repr__(self):
        given = ", ".join(f"{key}={self._values[key]!r}" for key in self._values if self.was_set(key))
        return f"Config(source={self.source!r}, {given})"

    def _key(self, key):
        name = _canonical(key)
        if name is None:
            raise KeyError(f"unknown parameter key {key!r}")
        return name

    def was_set(self, key):
        """True when the key got a (non-empty) value from the file or from ``--set``."""
        name = self._key(key)
        return name in self._texts and self._texts[name] != ""

    def line_of(self, key):
        """Line of the parameter file that gave the key, or None (not in the file, or overridden by --set)."""
        origin = self._origins.get(self._key(key))
        return origin if isinstance(origin, int) else None

    def text_of(self, key):
        """The value exactly as written (stripped), or None when the key was not given."""
        return self._texts.get(self._key(key))

    def location_of(self, key):
        """(path, line) to put in an error message about ``key``: file and line, '--set', or the bare file."""
        origin = self._origins.get(self._key(key))
        if origin == OVERRIDE_LOCATION:
            return OVERRIDE_LOCATION, None
        return self.source, origin

    def error(self, key, message, value=None):
        """An :class:`AnnaInputError` located at ``key`` (file:line, or --set); for callers' own checks."""
        name = self._key(key)
        path, line = self.location_of(name)
        if value is None:
            value = self._texts.get(name)
        return AnnaInputError(message, path=path, line=line, key=name, value=value)

    @property
    def base_dir(self):
        """Directory relative paths in the parameter file are resolved against."""
        return os.path.dirname(self.source)

    def as_dict(self):
        """{KEY: value} for every known key, JSON-serialisable (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self._values.items()}


# --------------------------------------------------------------------------------------------- loading


def _read_text(path):
    """The file's text with newlines normalised; AnnaInputError for anything unreadable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise AnnaInputError("parameter file not found", path=path) from None
    except IsADirectoryError:
        raise AnnaInputError("is a folder, not a parameter file", path=path) from None
    except (OSError, ValueError) as error:
        raise AnnaInputError(f"cannot read parameter file ({error.__class__.__name__}: "
                             f"{getattr(error, 'strerror', None) or error})", path=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise AnnaInputError(f"not UTF-8 text: byte 0x{data[error.start]:02x} at column {column}; "
                             "save the parameter file as UTF-8", path=path, line=line) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _bad_character(text):
    """A description of the first control character (other than tab) or lone surrogate, else None."""
    for character in text:
        code = ord(character)
        if (code < 32 and character != "\t") or code == 127:
            return f"contains the control character U+{code:04X}"
        if 0xD800 <= code <= 0xDFFF:
            return f"contains the invalid character U+{code:04X} (a lone surrogate)"
    return None


def _check_key_name(raw_key):
    if raw_key == "":
        return "missing key name before ':'"
    bad = _bad_character(raw_key)
    if bad:
        return "key " + bad
    return None


class _Collector:
    """Gathers typed values and problems while the file and the overrides are read."""

    def __init__(self, source):
        self.source = source
        self.values = {spec.name: spec.default for spec in KEY_TABLE}
        self.origins = {}       # key -> line number or OVERRIDE_LOCATION
        self.texts = {}         # key -> text as written
        self.written_as = {}    # key -> spelling used (alias or key), for messages
        self.problems = []      # AnnaInputError instances
        self.failed = set()     # keys whose value did not parse (skipped by the cross-key checks)

    def problem(self, message, *, path=None, line=None, key=None, value=None):
        self.problems.append(AnnaInputError(message, path=self.source if path is None else path,
                                            line=line, key=key, value=value))

    def assign(self, raw_key, text, base_dir, *, line=None, from_override=False):
        path = OVERRIDE_LOCATION if from_override else self.source
        shown_key = raw_key.upper()
        name = _canonical(raw_key)
        if name is None:
            self.problem(_suggestion(raw_key), path=path, line=line, key=raw_key, value=text)
            return
        bad = _bad_character(text)
        if bad:
            self.problem("value " + bad, path=path, line=line, key=shown_key, value=text)
            return
        if not from_override and name in self.origins:
            first_line, first_key = self.origins[name], self.written_as[name]
            spelled = "" if first_key == shown_key else f" as {first_key} (an alias of the same key)"
            self.problem(f"duplicate key: first given{spelled} on line {first_line}, again on line {line}",
                         line=line, key=shown_key, value=text)
            return
        # Later --set overrides replace earlier ones and the file's value, as on any command line.
        self.origins[name] = OVERRIDE_LOCATION if from_override else line
        self.texts[name] = text
        self.written_as[name] = shown_key
        self.failed.discard(name)
        spec = _SPECS[name]
        if text == "":
            self.values[name] = spec.default
            return
        try:
            self.values[name] = spec.type.parse(text, base_dir)
        except _Problem as problem:
            self.values[name] = spec.default
            self.failed.add(name)
            # a value of many parts (TUNE_SPACE) names each bad part on a line of its own
            for message, part in getattr(problem, "entries", ((str(problem), text),)):
                self.problem(message, path=path, line=line, key=name, value=part)

    def where(self, key):
        origin = self.origins.get(key)
        if origin == OVERRIDE_LOCATION:
            return OVERRIDE_LOCATION, None
        return self.source, origin

    def key_problem(self, key, message):
        path, line = self.where(key)
        self.problem(message, path=path, line=line, key=key, value=self.texts.get(key))


def _read_file_into(collector, text, base_dir):
    for number, raw_line in enumerate(text.split("\n"), start=1):
        content = raw_line.split("#", 1)[0].strip()
        if content == "":
            continue
        if ":" not in content:
            hint = " (use ':' not '=')" if "=" in content else ""
            collector.problem(f"expected 'KEY: value'{hint}", line=number, value=content)
            continue
        raw_key, value = content.split(":", 1)
        raw_key, value = raw_key.strip(), value.strip()
        bad_key = _check_key_name(raw_key)
        if bad_key:
            collector.problem(bad_key, line=number, value=content)
            continue
        collector.assign(raw_key, value, base_dir, line=number)


def _apply_overrides(collector, overrides):
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, (str, bytes)):
        overrides = [overrides]
    base_dir = os.getcwd()
    for override in overrides:
        if isinstance(override, bytes):
            try:
                override = override.decode("utf-8")
            except UnicodeDecodeError:
                collector.problem("not UTF-8 text", path=OVERRIDE_LOCATION, value=repr(override))
                continue
        override = str(override)
        if "=" not in override:
            collector.problem("expected KEY=VALUE", path=OVERRIDE_LOCATION, value=override)
            continue
        raw_key, value = override.split("=", 1)
        raw_key, value = raw_key.strip(), value.strip()
        bad_key = _check_key_name(raw_key)
        if bad_key:
            collector.problem(bad_key.replace("':'", "'='"), path=OVERRIDE_LOCATION, value=override)
            continue
        collector.assign(raw_key, value, base_dir, from_override=True)


def _check_consistency(collector):
    """Cross-key checks that hold for every stage: list lengths, MIN < MAX, inference-mode agreement."""
    values = collector.values
    failed = collector.failed
    list_keys = [key for key in ("OUTPUT_NAMES", "MIN_PARAMS", "MAX_PARAMS")
                 if values[key] is not None and key not in failed]
    if values["NUM_OUTS"] is not None and "NUM_OUTS" not in failed:
        for key in list_keys:
            if len(values[key]) != values["NUM_OUTS"]:
                collector.key_problem(key, f"has {len(values[key])} values but NUM_OUTS is {values['NUM_OUTS']}")
    elif len(list_keys) > 1:
        lengths = {key: len(values[key]) for key in list_keys}
        if len(set(lengths.values())) > 1:
            for key in list_keys[1:]:
                if lengths[key] != lengths[list_keys[0]]:
                    collector.key_problem(key, f"has {lengths[key]} values but {list_keys[0]} has "
                                               f"{lengths[list_keys[0]]}")
    if "MIN_PARAMS" in list_keys and "MAX_PARAMS" in list_keys:
        names = values["OUTPUT_NAMES"] if "OUTPUT_NAMES" in list_keys else None
        bad = []
        for index, (low, high) in enumerate(zip(values["MIN_PARAMS"], values["MAX_PARAMS"])):
            if not low < high:
                label = f"{index + 1}" + (f" ({names[index]})" if names and index < len(names) else "")
                bad.append(f"item {label}: min {low:g} >= max {high:g}")
        if bad:
            collector.key_problem("MIN_PARAMS", "must be below MAX_PARAMS element-wise; " + "; ".join(bad))
    return _resolve_infer_mode(collector)


def _resolve_infer_mode(collector):
    values, texts = collector.values, collector.texts
    flag_mode = "DEBUG" if values["DEBUG_MODE"] else ("MS_FITS" if values["SINGLE_MS_MODE"] else None)
    chosen = values["INFER_MODE"]
    if chosen is not None:
        conflicts = []
        if flag_mode is not None and flag_mode != chosen:
            flag = "DEBUG_MODE" if flag_mode == "DEBUG" else "SINGLE_MS_MODE"
            conflicts.append(f"{flag}: YES means {flag_mode}")
        if chosen == "DEBUG" and texts.get("DEBUG_MODE") and not values["DEBUG_MODE"]:
            conflicts.append("DEBUG_MODE is NO")
        if chosen == "MS_FITS" and texts.get("SINGLE_MS_MODE") and not values["SINGLE_MS_MODE"]:
            conflicts.append("SINGLE_MS_MODE is NO")
        if conflicts:
            collector.key_problem("INFER_MODE", "disagrees with the legacy flags (" + "; ".join(conflicts)
                                  + "); give INFER_MODE alone or make the flags agree")
        return chosen
    if flag_mode is not None:
        return flag_mode
    if values["INFER_FILES"] is not None:
        return "FITS"
    return None


def _raise_all(problems, source):
    if len(problems) == 1:
        raise problems[0]
    error = AnnaInputError("\n".join(str(problem) for problem in problems))
    error.path = source
    error.problems = tuple(problems)
    raise error


def load_config(path, overrides=(), *, stage=None):
    """Read, type and cross-check a parameter file; apply ``--set`` overrides ("KEY=VALUE" strings).

    Raises AnnaInputError listing every syntax, unknown-key, duplicate-key, type and consistency problem
    (one line each, joined by newlines).  Stage requirements are checked by :func:`validate_for_stage`; when
    ``stage`` ("train", "test" or "infer") is given and the file has problems, that stage's requirements
    (missing keys, input files that do not exist, ...) are checked on what did parse and listed in the same
    error, so a user fixes the whole file in one pass.
    """
    try:
        source = os.path.abspath(os.fspath(path))
    except (TypeError, ValueError) as error:
        raise AnnaInputError(f"not a usable parameter file path ({error})", value=repr(path)) from None
    text = _read_text(source)
    collector = _Collector(source)
    _read_file_into(collector, text, os.path.dirname(source))
    _apply_overrides(collector, overrides)
    infer_mode = _check_consistency(collector)
    if collector.problems:
        problems = list(collector.problems)
        if stage is not None:
            problems += _stage_problems_of_partial(collector, source, infer_mode, stage)
        _raise_all(problems, source)
    return Config(source, collector.values, collector.origins, collector.texts, infer_mode)


def _stage_problems_of_partial(collector, source, infer_mode, stage):
    """Stage-requirement problems of a file that already has load problems.

    Keys whose value did not parse hold their defaults here; problems about them ("required, but not given")
    would contradict the type error already reported for the same key, so they are left out.
    """
    partial = Config(source, collector.values, collector.origins, collector.texts, infer_mode)
    try:
        validate_for_stage(partial, stage)
    except AnnaInputError as error:
        found = getattr(error, "problems", (error,))
        return [problem for problem in found if problem.key not in collector.failed]
    return []


# --------------------------------------------------------------------------------------------- validation


def _flag_reason(cfg, *flags):
    """'FLAG is YES' for the first of ``flags`` that is on (all must be on for a tuple), else None."""
    for flag in flags:
        group = flag if isinstance(flag, tuple) else (flag,)
        if all(getattr(cfg, name.lower()) for name in group):
            return " and ".join(f"{name} is YES" for name in group)
    return None


#: (stage, key, reason(cfg) -> text when the key is needed, else None)
_CONDITIONAL_REQUIREMENTS = (
    (TRAIN, "SN_TEMPLATE", lambda cfg: _flag_reason(cfg, "PREPROCESS_TRAIN", ("TRAINING_XVAL", "PREPROCESS_XVAL"))),
    (TRAIN, "LOG_LOC", lambda cfg: _flag_reason(cfg, "TBOARD_OUTPUT", "TIMELINE_OUTPUT")),
    (TRAIN, "XVAL_DATA", lambda cfg: _flag_reason(cfg, "TRAINING_XVAL")),
    (TEST, "SN_TEMPLATE_TEST", lambda cfg: _flag_reason(cfg, "PREPROCESS_TEST")),
    (TEST, "REL_CONT_E_TEST", lambda cfg: _flag_reason(cfg, "PREPROCESS_TEST")),
    (TEST, "SN_RANGE_TEST", lambda cfg: _flag_reason(cfg, "PREPROCESS_TEST")),
)


def _missing(cfg, key, why):
    """'required ...' problem, placed at the key's line when it was given empty, else at the bare file."""
    path, line = cfg.location_of(key)
    text = cfg.text_of(key)
    if text == "":
        return AnnaInputError(f"{why}, but empty", path=path, line=line, key=key, value=text)
    return AnnaInputError(f"{why}, but not given", path=path, line=line, key=key)


def _input_paths(cfg, stage):
    """Input files (key, must_be_folder) this stage will open, given the flags."""
    wanted = []
    if stage == TRAIN:
        wanted.append("TRAINING_DATA")
        if _flag_reason(cfg, "PREPROCESS_TRAIN", ("TRAINING_XVAL", "PREPROCESS_XVAL")):
            wanted.append("SN_TEMPLATE")
        if cfg.training_xval:
            wanted.append("XVAL_DATA")
    elif stage == TEST:
        wanted.append("TESTING_DATA")
        if cfg.preprocess_test:
            wanted.append("SN_TEMPLATE_TEST")
    else:
        mode_keys = _MODE_INPUT_KEYS.get(cfg.infer_mode, ())
        wanted += [key for key in mode_keys if key != "INFER_FILES"]
        wanted.append("WAVE_TEMPLATE")
    return wanted


def _model_folder_problems(cfg, key):
    """A model location is the folder holding frozen.model, or (as the model loader also accepts) the file."""
    location = getattr(cfg, key.lower())
    if location is None or os.path.isfile(location):
        return []
    if not os.path.isdir(location):
        return [cfg.error(key, f"folder not found: {location}")]
    if not os.path.exists(os.path.join(location, FROZEN_MODEL_NAME)):
        return [cfg.error(key, f"no {FROZEN_MODEL_NAME} in {location} (train a model first, or point to the "
                               f"folder that holds {FROZEN_MODEL_NAME})")]
    return []


def validate_for_stage(cfg, stage, *, check_paths=True):
    """Check that ``cfg`` has everything ``stage`` ("train", "test" or "infer") needs.

    Raises AnnaInputError listing every problem (one line each, newline-joined): required keys missing,
    conditional requirements (e.g. SN_TEMPLATE when PREPROCESS_TRAIN is YES), inference input mode, kernel
    sizes against NUM_PX, and -- unless ``check_paths`` is False -- that input files and model folders exist
    and that output folders, where they exist, are folders.  File contents are not read (except an
    INFER_FILES list file, to check its entries exist).  Inference never needs training keys: the frozen
    model carries them.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    problems = []
    stage_name = STAGE_NAMES[stage]
    for spec in KEY_TABLE:
        if stage in spec.required_for and getattr(cfg, spec.name.lower()) is None:
            problems.append(_missing(cfg, spec.name, f"required for {stage_name}"))
    for rule_stage, key, reason_of in _CONDITIONAL_REQUIREMENTS:
        if rule_stage == stage and getattr(cfg, key.lower()) is None:
            reason = reason_of(cfg)
            if reason:
                problems.append(_missing(cfg, key, f"required for {stage_name} when {reason}"))

    if stage == TRAIN:
        problems += _network_problems(cfg) + _optimiser_problems(cfg)
    if stage == TRAIN and cfg.distribute == "MULTI_WORKER":
        for key in ("MAX_MINUTES1", "MAX_MINUTES2"):
            if getattr(cfg, key.lower()) is not None:
                # each worker's own clock would end the stage at a different step: the workers' collectives
                # would then wait on each other (a hang until the collective timeout)
                problems.append(cfg.error(key, "cannot be used with DISTRIBUTE: MULTI_WORKER (each worker's clock "
                                               "would end the stage at a different step); give the stage's "
                                               "iterations instead"))
    if stage == TRAIN and cfg.uncertainty == "MC_DROPOUT":
        last_key = "KEEP_PROB2" if cfg.do_train2 else "KEEP_PROB1"
        if getattr(cfg, last_key.lower()) >= 1.0:
            problems.append(cfg.error(last_key, "is 1 (no dropout) in the last training stage, but UNCERTAINTY: "
                                                "MC_DROPOUT samples that stage's dropout; set it below 1 (e.g. "
                                                "0.9) or UNCERTAINTY: NONE",
                                      value=cfg.text_of(last_key) or "1 (default)"))
    if stage == INFER and cfg.max_rel_sigma is not None and cfg.was_set("UNCERTAINTY") \
            and cfg.uncertainty != "MC_DROPOUT":
        problems.append(cfg.error("MAX_REL_SIGMA", "needs UNCERTAINTY: MC_DROPOUT (there is no sigma to compare "
                                                   "without it)"))

    if stage == INFER:
        problems += _infer_mode_problems(cfg)

    if check_paths:
        for key in _input_paths(cfg, stage):
            location = getattr(cfg, key.lower())
            if location is not None and not os.path.isfile(location):
                reason = "is a folder, not a file" if os.path.isdir(location) else "file not found"
                problems.append(cfg.error(key, f"{reason}: {location}"))
        if stage == INFER and cfg.infer_mode in ("MS_FITS", "TEXT", "FITS") and cfg.infer_files is not None:
            problems += _infer_files_problems(cfg)[1]
        model_key = {TEST: "TEST_MODEL_LOC", INFER: "INFER_MODEL_LOC"}.get(stage)
        if model_key:
            problems += _model_folder_problems(cfg, model_key)
        outputs = {TRAIN: ("SAVE_LOC", "LOG_LOC"), TEST: ("TEST_SAVE_LOC",), INFER: ("INFER_SAVE_LOC",)}[stage]
        for key in outputs:
            folder = getattr(cfg, key.lower())
            if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
                problems.append(cfg.error(key, f"exists but is not a folder: {folder}"))
    if problems:
        _raise_all(problems, cfg.source)


def network_layers(cfg):
    """(convolutions, dense widths) of the network a parameter file describes: the one owner of how ANNA's
    spellings (CONV1_SHAPE, CONV2_SHAPE, POOL_SIZE after the last convolution, FC1_OUTDIM, FC2_OUTDIM) and
    ANNA-TF's lists (CONV_LAYERS, FC_DIMS) combine.  Convolutions are dicts with kernels, width, stride, pool
    and dropout (:class:`anna.model.ConvLayer`'s fields)."""
    if cfg.conv_layers is not None:
        convs = [dict(layer) for layer in cfg.conv_layers]
    else:
        convs = [{"kernels": shape[3], "width": shape[1], "stride": 1, "pool": 1, "dropout": False}
                 for shape in (cfg.conv1_shape, cfg.conv2_shape) if shape is not None]
    if cfg.pool_size > 1 and convs and convs[-1]["pool"] == 1:
        convs[-1]["pool"] = cfg.pool_size
    fc_dims = tuple(cfg.fc_dims) if cfg.fc_dims is not None else (cfg.fc1_outdim, cfg.fc2_outdim)
    return convs, fc_dims


def _network_problems(cfg):
    """The layer keys agree with each other, and every convolution and pooling fits what reaches it."""
    problems = []
    if cfg.conv_layers is not None:
        for key in ("CONV1_SHAPE", "CONV2_SHAPE"):
            if cfg.was_set(key):
                problems.append(cfg.error("CONV_LAYERS", f"given together with {key}; CONV_LAYERS lists every "
                                                         f"convolution, so give one or the other"))
        if cfg.pool_size > 1 and cfg.conv_layers and cfg.conv_layers[-1]["pool"] > 1:
            problems.append(cfg.error("POOL_SIZE", "pools after the last convolution, which CONV_LAYERS already "
                                                   "pools (its 'p' suffix); give one or the other"))
    if cfg.fc_dims is not None:
        for key in ("FC1_OUTDIM", "FC2_OUTDIM"):
            if cfg.was_set(key):
                problems.append(cfg.error("FC_DIMS", f"given together with {key}; FC_DIMS lists every dense "
                                                     f"layer, so give one or the other"))
    if cfg.num_px is None or problems:
        return problems
    convs, _ = network_layers(cfg)
    length = cfg.num_px
    for number, conv in enumerate(convs, start=1):
        key = "CONV_LAYERS" if cfg.conv_layers is not None else ("CONV1_SHAPE", "CONV2_SHAPE")[number - 1]
        if conv["width"] > length:
            problems.append(cfg.error(key, f"convolution {number}: kernel width {conv['width']} exceeds the "
                                           f"{length} pixels that reach it (NUM_PX {cfg.num_px})"))
            break
        length = -(-length // conv["stride"])
        if conv["pool"] > length:
            pool_key = "CONV_LAYERS" if (cfg.conv_layers is not None and cfg.conv_layers[number - 1]["pool"] > 1) \
                else "POOL_SIZE"
            problems.append(cfg.error(pool_key, f"pooling width {conv['pool']} after convolution {number} exceeds "
                                                f"the {length} pixels it receives (NUM_PX {cfg.num_px})"))
            break
        length //= conv["pool"]
    return problems


def _optimiser_problems(cfg):
    problems = []
    if cfg.weight_decay is not None and cfg.optimizer != "ADAMW":
        problems.append(cfg.error("WEIGHT_DECAY", "is used by OPTIMIZER: ADAMW only (Adam has no decoupled weight "
                                                  "decay); set OPTIMIZER: ADAMW or remove WEIGHT_DECAY"))
    if cfg.lr_decay_start > 0 and cfg.lr_schedule != "COSINE":
        problems.append(cfg.error("LR_DECAY_START", f"is used by LR_SCHEDULE: COSINE only (here "
                                                    f"{cfg.lr_schedule}); set LR_SCHEDULE: COSINE or remove "
                                                    "LR_DECAY_START"))
    if cfg.lr_schedule != "CONSTANT" and cfg.lr_min > 0:
        for key in ("LEARN_RATE1", "LEARN_RATE2") if cfg.do_train2 else ("LEARN_RATE1",):
            if getattr(cfg, key.lower()) <= cfg.lr_min:
                problems.append(cfg.error("LR_MIN", f"is not below {key} {getattr(cfg, key.lower()):g}, so "
                                                    f"LR_SCHEDULE {cfg.lr_schedule} cannot lower the rate"))
    return problems


def _infer_mode_problems(cfg):
    mode = cfg.infer_mode
    if mode is None:
        return [AnnaInputError("no inference input chosen: set INFER_MODE (DEBUG, MS_FITS, TEXT or FITS), "
                               "or DEBUG_MODE or SINGLE_MS_MODE to YES, or INFER_FILES", path=cfg.source,
                               key="INFER_MODE")]
    companions = _MODE_INPUT_KEYS[mode]
    if any(getattr(cfg, key.lower()) is not None for key in companions):
        return []
    if cfg.was_set("INFER_MODE"):
        chooser = "INFER_MODE"
    else:
        chooser = "DEBUG_MODE" if mode == "DEBUG" else "SINGLE_MS_MODE"
    return [_missing(cfg, companions[0], f"required for {mode} inference (chosen by {chooser}; give "
                                         f"{' or '.join(companions)})")]


# --------------------------------------------------------------------------------------------- INFER_FILES


_GLOB_CHARACTERS = re.compile(r"[*?\[]")


def _is_single_spectrum_file(path):
    """Sniff a non-glob INFER_FILES target: True when it is itself an input (FITS, or a numeric text spectrum),
    False when it is a list of inputs (its first meaningful line does not parse as numbers)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return True  # let the reader report it
    from anna.spectra import is_fits_content

    if is_fits_content(head):
        return True
    for raw in head.decode("utf-8", errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            [float(token) for token in line.replace(",", " ").split()]
        except ValueError:
            return False
        return True
    return False


def _infer_files_problems(cfg):
    """(input paths, problems) for INFER_FILES; see :func:`expand_infer_files`."""
    pattern = cfg.infer_files
    if pattern is None:
        return [], []
    if _GLOB_CHARACTERS.search(pattern):
        found = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not found:
            return [], [cfg.error("INFER_FILES", f"no file matches {pattern}")]
        return found, []
    if not os.path.isfile(pattern):
        reason = "is a folder, not a file or glob" if os.path.isdir(pattern) else "file not found"
        return [], [cfg.error("INFER_FILES", f"{reason}: {pattern}")]
    if _is_single_spectrum_file(pattern):
        return [pattern], []
    try:
        with open(pattern, "rb") as handle:
            listing = handle.read().decode("utf-8")
    except OSError as error:
        return [], [cfg.error("INFER_FILES", f"cannot read list file {pattern} ({error.strerror or error})")]
    except UnicodeDecodeError:
        return [], [cfg.error("INFER_FILES", f"list file {pattern} is not UTF-8 text")]
    paths, problems = [], []
    for number, raw in enumerate(listing.replace("\r\n", "\n").split("\n"), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        bad = _bad_character(entry)
        if bad:
            problems.append(AnnaInputError(f"entry {bad}", path=pattern, line=number, value=entry))
            continue
        resolved = _resolve_path(entry, cfg.base_dir)
        if not os.path.isfile(resolved):
            problems.append(AnnaInputError(f"input file not found: {resolved}", path=pattern, line=number,
                                           value=entry))
        paths.append(resolved)
    if not paths and not problems:
        problems.append(cfg.error("INFER_FILES", f"list file {pattern} names no input files"))
    return paths, problems


def expand_infer_files(cfg):
    """The input files INFER_FILES names, as absolute paths, in a stable order.

    INFER_FILES is either a glob (any of ``* ? [``; sorted matches, ``**`` recurses), or the path of one
    file.  That file is itself the input when its content is FITS (:func:`anna.spectra.is_fits_content`:
    a ``SIMPLE`` card, or compressed) or a numeric text spectrum; otherwise it is a list with one input per
    line (``#`` comments and blank lines allowed), relative entries resolving against the parameter file's directory.  Raises AnnaInputError naming every
    missing file; returns [] when INFER_FILES is not set.
    """
    paths, problems = _infer_files_problems(cfg)
    if problems:
        _raise_all(problems, cfg.source)
    return paths
