"""anna-tune (row 13): a timed search on the tutorial example data against the tutorial parameter file.

The search varies the learning rate, the widths (the convolution's kernels and width, both dense layers) and
the dropout of stage 1 for ``tune_minutes`` of wall clock, every trial limited to ``tune_trial_minutes``
(TUNE_TRIAL_MINUTES: MAX_MINUTES1/2 shared by the stages in proportion to their iterations), MEDIAN pruning.
The baseline is configs/tutorial.param trained once for the same minutes as one trial (the same stage
limits), so the ratio says what the search bought at a fixed cost per model: its best trial's cross-validation
cost and test scatter against the hand-chosen values'.  Test scatter: the test pack noised at S/N 100 (fixed
seed), std(inferred - true) per label over MAX - MIN, averaged over the labels.
"""

import numpy as np

from harness import Row
from rows_training import tutorial_config

SPACE = ("LEARN_RATE1=log(1e-5, 3e-3); CONV1_SHAPE=choice(1, 45, 1, 10 | 1, 21, 1, 16 | 1, 9, 1, 32); "
         "FC1_OUTDIM=int(32, 512, log); FC2_OUTDIM=int(32, 512, log); KEEP_PROB1=float(0.5, 1.0)")


def _scatter(ctx, frozen_model, cfg):
    """Mean over the labels of std(inferred - true) / (MAX - MIN) on the test pack at S/N 100."""
    from anna.augment import noisy_copy
    from anna.model import load_frozen
    from anna.templates import relative_sn_on_grid

    example = ctx.data.example()
    wave, labels, flux = ctx.data.example_flux("test")
    rel_sn = relative_sn_on_grid(example["sn_template"], wave)
    noisy, _ = noisy_copy(flux, rel_sn, (100.0, 100.0), (0.0, 0.0), seed=(13, 1))
    model = load_frozen(frozen_model)
    predicted, _ = model.predict_labels(noisy.astype(np.float32))
    span = np.asarray(cfg.max_params) - np.asarray(cfg.min_params)
    per_label = np.std(np.asarray(predicted)[:, :len(span)] - labels, axis=0) / span
    return float(np.mean(per_label)), per_label.tolist()


def tune_against_tutorial(ctx):
    from anna.train import run_training
    from anna.tune.search import stage_budgets, run_tune

    sizes = ctx.sizes
    minutes, trial_minutes = sizes.tune_minutes, sizes.tune_trial_minutes
    baseline_cfg = tutorial_config(ctx, "tune_baseline", {"JIT_COMPILE": "NO", "TBOARD_OUTPUT": "NO"})
    limits = stage_budgets(baseline_cfg, trial_minutes)
    baseline_cfg = tutorial_config(ctx, "tune_baseline", {"JIT_COMPILE": "NO", "TBOARD_OUTPUT": "NO", **limits})
    ctx.log(f"  configs/tutorial.param for one trial's {trial_minutes:g} min ({limits})")
    baseline = run_training(baseline_cfg, report=ctx.log.anna)
    baseline_cost = min(stage["best_cost"] for stage in baseline["stages"])
    baseline_scatter, baseline_labels = _scatter(ctx, baseline["frozen_model"], baseline_cfg)

    ctx.log(f"  anna-tune: {minutes:g} min search, {trial_minutes:g} min per trial")
    search_cfg = tutorial_config(ctx, "tune_search", {
        "JIT_COMPILE": "NO", "TBOARD_OUTPUT": "NO", "TUNE_SPACE": SPACE, "TUNE_TRIALS": 1000,
        "TUNE_MINUTES": minutes, "TUNE_TRIAL_MINUTES": trial_minutes, "TUNE_PRUNER": "MEDIAN",
        "TUNE_PRUNE_STARTUP": 3, "TUNE_PRUNE_WARMUP": 4})
    summary = run_tune(search_cfg, report=ctx.log.anna)
    details = {"baseline_cost": baseline_cost, "baseline_scatter_per_label": baseline_labels,
               "baseline_stages": baseline["stages"], "search": summary}
    if summary["best"] is None:
        return [Row("tune", "anna-tune best xval cost", status="error", note="no trial completed")], details
    best_scatter, best_labels = _scatter(ctx, summary["written"]["frozen_model"], baseline_cfg)
    details["best_scatter_per_label"] = best_labels
    states = summary["states"]
    note = (f"{minutes:g} min search ({states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} "
            f"failed/lost), {trial_minutes:g} min per trial; baseline: configs/tutorial.param for "
            f"{trial_minutes:g} min; best {summary['best']['values']}")
    rows = [Row("tune", "anna-tune best trial: xval cost", summary["best"]["value"], "cost", baseline_cost,
                note=note, higher_is_better=False),
            Row("tune", "anna-tune best trial: test scatter / (MAX-MIN), S/N 100", best_scatter, "", baseline_scatter,
                note="mean over the 5 labels; same test stars and noise for both", higher_is_better=False)]
    return rows, details
