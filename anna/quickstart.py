"""anna-quickstart: the whole pipeline on built-in example data, for a newcomer's first run.

Generates example data (:mod:`anna.synth`), then runs anna-train, anna-test and anna-infer exactly as the
console commands would, with ``configs/quickstart.param`` whose path keys are pointed into the work folder
through the same KEY=VALUE overrides that ``--set`` gives users.  Ends by printing the test summary, the
spread of the parameters inferred for the 90 spectra of the example star against its true labels, where the
files are, and the TensorBoard command.
"""

import json
import os
import sys

import numpy as np

from anna.errors import AnnaInputError

CONFIG_NAME = "quickstart.param"


def find_config(name=CONFIG_NAME):
    """The packaged parameter file: ./configs/ of a checkout, or the copy installed under sys.prefix."""
    candidates = [os.path.join(os.getcwd(), "configs", name),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name),
                  os.path.join(sys.prefix, "share", "anna-tf", "configs", name)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise AnnaInputError(f"cannot find {name} (looked in {', '.join(candidates)}); pass --config")


def workdir_overrides(workdir):
    """KEY=VALUE overrides that put every input and output of the example run inside ``workdir``."""
    data = os.path.join(workdir, "example_data")
    run = os.path.join(workdir, "run")
    return [f"TRAINING_DATA={data}/train.pack", f"XVAL_DATA={data}/xval.pack", f"TESTING_DATA={data}/test.pack",
            f"SN_TEMPLATE={data}/sn.template", f"SN_TEMPLATE_TEST={data}/sn.template",
            f"WAVE_TEMPLATE={data}/wavelength.template", f"MS_FITS_IMAGE={data}/star_multispec.fits",
            f"SAVE_LOC={run}/model", f"LOG_LOC={run}/logs", f"TEST_MODEL_LOC={run}/model",
            f"TEST_SAVE_LOC={run}/test", f"INFER_MODEL_LOC={run}/model", f"INFER_SAVE_LOC={run}/infer"]


def run_quickstart(workdir, config=None, report=print):
    """Generate, train, test, infer; returns a dict of the figures it printed."""
    import time

    from anna.evaluate import run_test
    from anna.infer import run_infer
    from anna.params import load_config, validate_for_stage
    from anna.synth import make_example_data
    from anna.train import run_training

    started = time.perf_counter()
    config = config or find_config()
    cfg = load_config(config, overrides=workdir_overrides(workdir))
    for stage in ("train", "test"):
        validate_for_stage(cfg, stage, check_paths=False)
    report(f"== 1/4 generating example data in {workdir}/example_data")
    written = make_example_data(os.path.join(workdir, "example_data"), seed=cfg.seed or 1)
    report("== 2/4 anna-train")
    validate_for_stage(cfg, "train")
    run_training(cfg, report=report)
    report("== 3/4 anna-test")
    validate_for_stage(cfg, "test")
    summary = run_test(cfg, report=report)
    report("== 4/4 anna-infer")
    validate_for_stage(cfg, "infer")
    outputs = run_infer(cfg, report=report)
    star = json.load(open(written["star_labels"], encoding="utf-8"))
    figures = _compare_star(outputs[0], star, summary, report)
    report("")
    report(f"done in {time.perf_counter() - started:.0f} s.  Files:")
    report(f"  example data     {os.path.join(workdir, 'example_data')}")
    report(f"  frozen model     {os.path.join(cfg.save_loc, 'frozen.model')}")
    report(f"  test results     {cfg.test_save_loc}  (test_stats.out, test_summary.json, plots)")
    report(f"  inference        {outputs[0]}")
    report(f"  watch training:  tensorboard --logdir {cfg.log_loc}")
    return figures


def _compare_star(infer_path, star, summary, report):
    """Mean ± std of the inferred labels of the example star's spectra against its true labels."""
    import csv

    with open(infer_path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = [name for name in star if name in rows[0]]
    report(f"example star: {len(rows)} spectra inferred; true labels vs inferred mean ± std "
           "(test scatter for scale):")
    figures = {}
    for name in names:
        values = np.array([float(row[name]) for row in rows])
        values = values[np.isfinite(values)]
        scatter = summary["labels"][name]["std"]
        figures[name] = {"true": star[name], "mean": float(values.mean()), "std": float(values.std()),
                         "test_scatter": scatter}
        report(f"  {name:>6}: true {star[name]:9.3f}   inferred {values.mean():9.3f} ± {values.std():7.3f}"
               f"   |mean-true| = {abs(values.mean() - star[name]) / scatter:4.2f} x test scatter {scatter:.3f}")
    return figures
