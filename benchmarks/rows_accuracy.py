"""Accuracy on the built-in synthetic data (row 8): the tutorial network against two classical baselines.

All three learn from the same training pack (the example data of :mod:`anna.synth`).  The network is trained
by anna-train with the tutorial parameter file (S/N 175-250 augmentation); the baselines are fitted on one
noisy copy of that pack made with the same noise model.  The test pack is then noised at exactly S/N 50, 100
and 200 and the scatter (standard deviation of inferred - true) of each label is compared.
"""

import numpy as np

from baselines import QuadraticSpectralModel, RidgeRegression
from data import LABEL_NAMES, LABEL_UNITS
from harness import TUTORIAL_ITERATIONS, Row
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
    train_noisy, train_sn = noisy_copy(train_flux, *noise_args, seed=(101, 1))
    xval_noisy, _ = noisy_copy(xval_flux, *noise_args, seed=(101, 2))
    train_noise_variance = 1.0 / (train_sn[:, None] * rel_sn[None, :]) ** 2

    ctx.log("  fitting ridge regression and the quadratic spectral model")
    span = np.asarray(cfg.max_params) - np.asarray(cfg.min_params)
    ridge = RidgeRegression(span).fit(train_noisy, train_labels, xval_noisy, xval_labels)
    quadratic = QuadraticSpectralModel(cfg.min_params, cfg.max_params).fit(train_noisy, train_labels,
                                                                          train_noise_variance)
    centre = np.broadcast_to(0.5 * (np.asarray(cfg.min_params) + np.asarray(cfg.max_params)), test_labels.shape)

    rows, details = [], {"trained_iterations": trained, "ridge_alpha": ridge.alpha, "sn": {}}
    note = (f"scatter = std(inferred - true), {len(test_labels)} test stars; network trained {trained} "
            f"iterations (tutorial: {TUTORIAL_ITERATIONS[0]}+{TUTORIAL_ITERATIONS[1]})")
    for sn in sizes.accuracy_sn:
        ctx.log(f"  S/N {sn:g}: network, ridge, quadratic model")
        test_noisy, _ = noisy_copy(test_flux, rel_sn, (sn, sn), tuple(cfg.rel_cont_e_train), seed=(202, int(sn)))
        network = model.predict(test_noisy.astype(np.float32))
        linear = ridge.predict(test_noisy)
        cannon = quadratic.infer(test_noisy, 1.0 / (sn * rel_sn[None, :]) ** 2, starts=(linear, centre))
        scatter = {name: np.std(prediction - test_labels, axis=0)
                   for name, prediction in (("anna", network), ("ridge", linear), ("quadratic", cannon))}
        details["sn"][sn] = {name: values.tolist() for name, values in scatter.items()}
        for index, (label, unit) in enumerate(zip(LABEL_NAMES, LABEL_UNITS)):
            for baseline in ("ridge", "quadratic"):
                rows.append(Row("accuracy", f"scatter S/N {sn:g} {label}: network vs {baseline}",
                                float(scatter["anna"][index]), unit, float(scatter[baseline][index]),
                                note=note, higher_is_better=False))
                note = ""
    return rows, details
