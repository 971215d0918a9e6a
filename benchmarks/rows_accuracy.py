"""Accuracy on the built-in synthetic data (row 8): the tutorial network against two classical baselines and
the floor.

All learn from the same training pack (the example data of :mod:`anna.synth`).  The network is trained by
anna-train with the tutorial parameter file (S/N 175-250 augmentation); ridge regression is fitted on one
noisy copy of that pack made with the same noise model; the quadratic spectral model, as The Cannon is, on the
noiseless pack itself (validated on the noiseless cross-validation pack); the floor is the training set's mean
label.  The test pack is then noised at exactly S/N 50, 100 and 200 and the scatter (standard deviation of
inferred - true) of each label is compared.  An estimator that does not beat the floor is no baseline: the
floor-check row of each S/N counts the baselines' scatters below it and names any that are not.
"""

import numpy as np

from baselines import QuadraticSpectralModel, RidgeRegression, TrainingMean
from data import LABEL_NAMES, LABEL_UNITS
from harness import TUTORIAL_ITERATIONS, Row, at_least
from rows_training import tutorial_config


def accuracy(ctx):
    from anna.augment import noisy_copy
    from anna.model import load_frozen
    from anna.templates import relative_sn_on_grid
    from anna.train import run_training

    sizes = ctx.sizes
    example = ctx.data.example()
    first = sizes.accuracy_iterations
    second = max(1, round(first * TUTORIAL_ITERATIONS[1] / TUTORIAL_ITERATIONS[0]))
    ctx.log(f"  anna-train, tutorial config, {first} + {second} iterations")
    cfg = tutorial_config(ctx, "accuracy", {"NUM_TRAIN_ITERS1": first, "NUM_TRAIN_ITERS2": second})
    result = run_training(cfg, report=ctx.log.anna)
    model = load_frozen(result["frozen_model"])
    trained = "+".join(str(stage["iterations"]) for stage in result["stages"])

    wave, train_labels, train_flux = ctx.data.example_flux("train")
    _, xval_labels, xval_flux = ctx.data.example_flux("xval")
    _, test_labels, test_flux = ctx.data.example_flux("test")
    rel_sn = relative_sn_on_grid(example["sn_template"], wave)
    noise_args = (rel_sn, tuple(cfg.sn_range_train), tuple(cfg.rel_cont_e_train))
    train_noisy, _ = noisy_copy(train_flux, *noise_args, seed=(101, 1))
    xval_noisy, _ = noisy_copy(xval_flux, *noise_args, seed=(101, 2))

    ctx.log("  fitting ridge regression, the quadratic spectral model and the training mean")
    span = np.asarray(cfg.max_params) - np.asarray(cfg.min_params)
    ridge = RidgeRegression(span).fit(train_noisy, train_labels, xval_noisy, xval_labels)
    quadratic = QuadraticSpectralModel(cfg.min_params, cfg.max_params).fit(train_flux, train_labels, xval_flux,
                                                                          xval_labels)
    floor = TrainingMean().fit(train_labels)

    rows, details = [], {"trained_iterations": trained, "ridge_alpha": ridge.alpha.tolist(),
                         "quadratic_alpha": quadratic.alpha, "sn": {}, "below_floor": {}}
    note = (f"scatter = std(inferred - true), {len(test_labels)} test stars; network trained {trained} "
            f"iterations (tutorial: {TUTORIAL_ITERATIONS[0]}+{TUTORIAL_ITERATIONS[1]})")
    floor_note = ("training mean = every star given the training set's mean labels (the floor); ratio < 1: "
                  "the network beats it")
    check_note = ("baselines (ridge, quadratic) x labels whose scatter is below the training-mean floor; "
                  "target: all of them")
    for sn in sizes.accuracy_sn:
        ctx.log(f"  S/N {sn:g}: network, ridge, quadratic model, training mean")
        test_noisy, _ = noisy_copy(test_flux, rel_sn, (sn, sn), tuple(cfg.rel_cont_e_train), seed=(202, int(sn)))
        network = model.predict(test_noisy.astype(np.float32))
        linear = ridge.predict(test_noisy)
        cannon = quadratic.infer(test_noisy, 1.0 / (sn * rel_sn[None, :]) ** 2, starts=(linear, floor.mean))
        scatter = {name: np.std(prediction - test_labels, axis=0)
                   for name, prediction in (("anna", network), ("ridge", linear), ("quadratic", cannon),
                                            ("mean", floor.predict(test_noisy)))}
        details["sn"][sn] = {name: values.tolist() for name, values in scatter.items()}
        for index, (label, unit) in enumerate(zip(LABEL_NAMES, LABEL_UNITS)):
            for baseline in ("ridge", "quadratic"):
                rows.append(Row("accuracy", f"scatter S/N {sn:g} {label}: network vs {baseline}",
                                float(scatter["anna"][index]), unit, float(scatter[baseline][index]),
                                note=note, higher_is_better=False))
                note = ""
            rows.append(Row("accuracy", f"scatter S/N {sn:g} {label}: network vs training mean",
                            float(scatter["anna"][index]), unit, float(scatter["mean"][index]), note=floor_note,
                            higher_is_better=False))
            floor_note = ""
        failing = [f"{baseline} {label} {scatter[baseline][index]:.3g} >= {scatter['mean'][index]:.3g}"
                   for baseline in ("ridge", "quadratic") for index, label in enumerate(LABEL_NAMES)
                   if not scatter[baseline][index] < scatter["mean"][index]]
        details["below_floor"][sn] = failing
        total = 2 * len(LABEL_NAMES)
        if failing:
            ctx.log(f"  S/N {sn:g}: NOT BELOW THE FLOOR: {'; '.join(failing)}")
        rows.append(Row("accuracy", f"floor check S/N {sn:g}: baseline scatters below the training mean",
                        total - len(failing), f"of {total}", target=at_least(total, f"{total}"),
                        note=check_note + (f"; NOT below the floor: {'; '.join(failing)}" if failing else "")))
        check_note = ""
    return rows, details
