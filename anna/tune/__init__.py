"""anna-tune: a hyper-parameter search over anna-train runs, with Optuna (TPE sampling, pruning).

It reads the same parameter file as anna-train plus the TUNE_* keys, and sits beside the stages: it drives
training through :func:`anna.train.run_training` (its ``on_interval`` hook reports each interval's
cross-validation cost and ends pruned runs), and nothing imports it.  :mod:`~anna.tune.search` (the study and
its trials), :mod:`~anna.tune.results` (best.param, the best model, the trials CSV, the plots) and
:mod:`~anna.tune.param_file` (the user's file with values filled in).
"""

from anna.errors import AnnaInputError


def validate_tune(cfg):
    """Every problem that stops a search, at once: anna-train's own (the file must train as it is) and the
    search's (:func:`anna.tune.search.tune_problems`)."""
    from anna.params import validate_for_stage
    from anna.tune.search import tune_problems

    problems = []
    try:
        validate_for_stage(cfg, "train")
    except AnnaInputError as error:
        problems += list(getattr(error, "problems", (error,)))
    problems += tune_problems(cfg)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        error = AnnaInputError("\n".join(str(problem) for problem in problems))
        error.problems = tuple(problems)
        raise error


def check_tune(cfg, overrides=()):
    """``anna-tune --check``: anna-train's check of the file, then every bound and choice of TUNE_SPACE tried
    alone in the file (each must be a file anna-train accepts), Optuna, and where the study lives.  Returns
    summary lines; raises AnnaInputError listing every refused value."""
    from anna.check import check_stage
    from anna.params import load_config, validate_for_stage
    from anna.tune.search import import_optuna, storage_url, study_name

    lines = check_stage(cfg, "train")
    problems = []
    path, line = cfg.location_of("TUNE_SPACE")
    for dimension in cfg.tune_space:
        key = dimension["key"]
        tried = dimension["choices"] or (dimension["low"], dimension["high"])
        for value in tried:
            text = value if isinstance(value, str) else f"{value:.6g}" if isinstance(value, float) else str(value)
            try:
                validate_for_stage(load_config(cfg.source, overrides=[*overrides, f"{key}={text}"]), "train",
                                   check_paths=False)
            except AnnaInputError as error:
                reason = "; ".join(str(p) for p in getattr(error, "problems", (error,)))
                problems.append(AnnaInputError(f"{key}={text}: anna-train refuses it ({reason})", path=path,
                                               line=line, key="TUNE_SPACE", value=dimension["entry"]))
        shown = " | ".join(dimension["choices"]) if dimension["choices"] else \
            f"{dimension['low']:g} to {dimension['high']:g}" + (" (log)" if dimension["log"] else "") + \
            (f" step {dimension['step']:g}" if dimension["step"] else "")
        lines.append(f"search {key}: {dimension['kind']} {shown}")
    if problems:
        if len(problems) == 1:
            raise problems[0]
        error = AnnaInputError("\n".join(str(problem) for problem in problems))
        error.problems = tuple(problems)
        raise error
    optuna = import_optuna()
    lines.append(f"study {study_name(cfg)} in {storage_url(cfg)} (Optuna {optuna.__version__}); "
                 f"{cfg.tune_trials} trials, pruner {cfg.tune_pruner}")
    return lines


def run_tune(cfg, report=print):
    """See :func:`anna.tune.search.run_tune`."""
    from anna.tune.search import run_tune as search

    return search(cfg, report)
