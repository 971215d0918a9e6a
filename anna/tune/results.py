"""What a search leaves in SAVE_LOC: ``best.param`` (the user's file with the best trial's values, ready for
``anna-train best.param``), ``frozen.model`` (the best trial's model), ``tune_trials.csv`` (every trial: its
values, cost, state, seconds and, for a failed one, why) and the plots ``tune_history.png``,
``tune_importance.png`` and ``tune_slice_<KEY>.png`` (Optuna's matplotlib visualisation).  Every file is
written atomically; the study itself stays in its storage, so these are rewritten whenever a search ends.
"""

import csv
import io
import os
import shutil
import warnings

from anna.atomic import atomic_output
from anna.params import FROZEN_MODEL_NAME

TRIALS_CSV = "tune_trials.csv"
BEST_PARAM = "best.param"


def write_results(cfg, study, optuna, report, plots=True):
    """Write the files above; returns {kind: path} of those written (plots that cannot be drawn yet, e.g.
    importances before two trials complete, are skipped with a line saying why)."""
    from anna.tune.search import FAILED, LOST, PRUNED

    trials = study.get_trials(deepcopy=False)
    written = {"csv": os.path.join(cfg.save_loc, TRIALS_CSV)}
    keys = [dimension["key"] for dimension in cfg.tune_space]
    with atomic_output(written["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "xval_cost", *keys, "seconds", "reason", "folder"])
        for trial in trials:
            values = trial.user_attrs.get("values", {})
            state = trial.state.name
            reason = trial.user_attrs.get(FAILED) or trial.user_attrs.get(LOST) or trial.user_attrs.get(PRUNED) or ""
            if state == "FAIL" and FAILED not in trial.user_attrs:  # lost to its process: not counted
                state = "LOST"
                reason = reason or "its process ended during the trial"
            value = trial.value if trial.value is not None else (
                trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
            seconds = trial.duration.total_seconds() if trial.duration is not None else ""
            writer.writerow([trial.number, state, "" if value is None else f"{value:.8g}",
                             *(values.get(key, "") for key in keys),
                             f"{seconds:.1f}" if seconds != "" else "", reason, trial.user_attrs.get("folder", "")])
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    if complete:
        best = min(complete, key=lambda trial: trial.value)
        written.update(_write_best(cfg, study, best))
        report(f"best: trial {best.number}, xval cost {best.value:.6g} "
               f"({', '.join(f'{k}={v}' for k, v in best.user_attrs['values'].items())}); wrote {written['best_param']}"
               f" and {written['frozen_model']}")
    else:
        report("no trial completed: no best.param yet")
    if plots:
        written.update(_write_plots(cfg, study, optuna, keys, complete, report))
    report(f"trials: {written['csv']}")
    return written


def _write_best(cfg, study, best):
    from anna.tune.param_file import write_filled_parameter_file

    values = dict(best.user_attrs["values"])
    values["SAVE_LOC"] = os.path.join(cfg.save_loc, "best")
    note = (f"anna-tune study {study.study_name}: trial {best.number}'s values (xval cost {best.value:.6g}); "
            f"anna-train best.param trains them into SAVE_LOC/best")
    path = write_filled_parameter_file(cfg, os.path.join(cfg.save_loc, BEST_PARAM), values, note)
    model = os.path.join(cfg.save_loc, FROZEN_MODEL_NAME)
    with open(best.user_attrs["frozen_model"], "rb") as source, atomic_output(model, "wb") as target:
        shutil.copyfileobj(source, target)
    return {"best_param": path, "frozen_model": model}


def _save(figure, path):
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    with atomic_output(path, "wb") as handle:
        handle.write(buffer.getvalue())


def _write_plots(cfg, study, optuna, keys, complete, report):
    """Optuna's matplotlib plots, each saved as PNG (Agg backend: no display needed)."""
    if not complete:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from optuna.visualization import matplotlib as plots

    drawn = {}
    jobs = [("history", "tune_history.png", lambda: plots.plot_optimization_history(study))]
    varied = [key for key in keys if len({t.params.get(key) for t in complete if key in t.params}) > 1]
    if len(complete) >= 2 and varied:
        jobs.append(("importance", "tune_importance.png", lambda: plots.plot_param_importances(study, params=varied)))
    else:
        report("parameter importances need two complete trials with different values: plot skipped")
    for key in keys:
        jobs.append((f"slice_{key}", f"tune_slice_{key}.png", lambda key=key: plots.plot_slice(study, params=[key])))
    for name, filename, draw in jobs:
        try:
            with warnings.catch_warnings():  # a slice of one value warns of its singular x range; it draws well
                warnings.simplefilter("ignore", UserWarning)
                axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            report(f"{filename}: not drawn ({error})")
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        if name != "importance":
            axes.set_ylabel("cross-validation cost")
        if name == "history":
            axes.set_yscale("log")
            axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        figure = axes.figure
        figure.set_size_inches(7, 4.5)
        path = os.path.join(cfg.save_loc, filename)
        _save(figure, path)
        plt.close(figure)
        drawn[name] = path
    return drawn
