"""Console entry points.  This layer only parses arguments and calls the stage functions.

Known input problems (:class:`anna.errors.AnnaInputError`) become their one-line messages on stderr and exit
status 2, with no traceback (``--debug`` shows it).  Stage modules are imported inside the functions so that
``--help`` and ``--version`` answer at once, without starting TensorFlow; a stage's inputs are checked
(anna.check.check_inputs_before_runtime) before TensorFlow starts, quietly (anna.runtime.start_tensorflow).
"""

import argparse
import os
import sys

from anna.errors import AnnaInputError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _parser(prog, description):
    """An argument parser with the options every command has: ``--version``."""
    from anna.runtime import versions_text

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=versions_text(prog),
                        help="print ANNA-TF's, TensorFlow's and Python's versions and exit")
    return parser


def _stage_parser(prog, stage, description):
    parser = _parser(prog, description)
    parser.add_argument("param_file", nargs="?", default="ANNA.param",
                        help="parameter file (default: ANNA.param in the current folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter-file key (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help=f"validate the parameter file for anna-{stage} and open the inputs it names, "
                             "print a summary, and exit 0 (all good) or 2")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks for input errors and everything TensorFlow prints")
    return parser


def _start_runtime(prog, debug):
    """Start TensorFlow quietly (anna.runtime.start_tensorflow); its notices become the command's own lines."""
    from anna.runtime import start_tensorflow

    for notice in start_tensorflow(debug=debug):
        print(f"{prog}: note: {notice}", file=sys.stderr)


def _run(prog, debug, action):
    """Call ``action``; map input errors to one line + exit 2, Ctrl-C to exit 130."""
    from anna.runtime import prepare_tensorflow_environment

    prepare_tensorflow_environment(quiet=not debug)  # before any stage imports TensorFlow
    try:
        action()
    except AnnaInputError as exc:
        if debug:
            raise
        for line in str(exc).splitlines():
            print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _stage_main(prog, stage, description, run_stage, argv, flags=None):
    """``flags`` ({option: help}): the stage's own on/off options, handed to ``run_stage`` as keywords."""
    parser = _stage_parser(prog, stage, description)
    for option, text in (flags or {}).items():
        parser.add_argument(option, action="store_true", help=text)
    args = parser.parse_args(argv)

    def action():
        from anna.check import check_inputs_before_runtime
        from anna.params import load_config, validate_for_stage

        cfg = load_config(args.param_file, overrides=args.overrides, stage=stage)
        validate_for_stage(cfg, stage)
        check_inputs_before_runtime(cfg, stage)
        # anna-train --check opens packs and templates only, unless MIXED_PRECISION asks whether a GPU is there
        if not (args.check and stage == "train") or getattr(cfg, "mixed_precision", False):
            _start_runtime(prog, args.debug)
        if args.check:
            from anna.check import check_stage

            for line in check_stage(cfg, stage):
                print(line)
            return
        run_stage(cfg, **{option.lstrip("-"): getattr(args, option.lstrip("-")) for option in flags or {}})

    return _run(prog, args.debug, action)


def _train(cfg, finish=False):
    if finish:
        from anna.train.finish import finish_model

        finish_model(cfg)
        return
    from anna.train import run_training

    result = run_training(cfg)
    if result["interrupted"]:
        raise KeyboardInterrupt


def _test(cfg):
    from anna.evaluate import run_test
    from anna.progress import FileProgress

    with FileProgress("anna-test", unit="spectrum") as progress:
        run_test(cfg, report=progress)


def _infer(cfg, verbose=False):
    from anna.infer import run_infer
    from anna.progress import FileProgress

    with FileProgress("anna-infer", verbose=verbose) as progress:
        run_infer(cfg, report=progress)


def train_main(argv=None):
    return _stage_main("anna-train", "train", "Train an ANNA-TF network as the parameter file says.", _train, argv,
                       flags={"--finish": "do not train: compute what SAVE_LOC's frozen model lacks (training-domain "
                                          "statistics; with MC_DROPOUT the uncertainty calibration, from the "
                                          "cross-validation pack) and write it back"})


def test_main(argv=None):
    return _stage_main("anna-test", "test", "Test a frozen model on a pack with known labels; write residual CSV "
                       "and summary statistics.", _test, argv)


def infer_main(argv=None):
    return _stage_main("anna-infer", "infer", "Infer labels for packs, text spectra or (multispec) FITS files.",
                       _infer, argv, flags={"--verbose": "print a line for every finished input file (by default "
                                                         "a progress bar on a terminal, a line per tenth of the "
                                                         "files otherwise)"})


def tune_main(argv=None):
    parser = _stage_parser("anna-tune", "tune", "Search anna-train's hyper-parameters (TUNE_SPACE) with Optuna; "
                           "write best.param, the best frozen model, a CSV of the trials and plots to SAVE_LOC.")
    args = parser.parse_args(argv)

    def action():
        from anna.params import load_config
        from anna.tune import check_tune, run_tune, validate_tune

        cfg = load_config(args.param_file, overrides=args.overrides, stage="train")
        validate_tune(cfg)
        if args.check:
            for line in check_tune(cfg, args.overrides):
                print(line)
            return
        run_tune(cfg)

    return _run("anna-tune", args.debug, action)


def spectra_main(argv=None):
    parser = _parser("anna-spectra",
                     "Show what ANNA-TF's readers see in spectrum files (the same code "
                     "anna-infer uses).")
    parser.add_argument("files", nargs="+", help="FITS files (LAMOST, SDSS/BOSS, APOGEE, multispec or 1-D)")
    parser.add_argument("--text", metavar="DIR", help="also write each spectrum as text into DIR (wavelength, "
                                                      "flux, and error for survey files)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_args(argv)

    def action():
        from anna.fits_io import describe_file, write_text_spectra
        from anna.survey.show import describe_survey_file, write_survey_text

        for path in args.files:
            print(describe_survey_file(path) or describe_file(path))
            if args.text:
                written = write_survey_text(path, args.text)
                written = written if written is not None else write_text_spectra(path, args.text)
                print(f"wrote {len(written)} text spectra to {args.text}")

    return _run("anna-spectra", args.debug, action)


def synth_main(argv=None):
    parser = _parser("anna-synth",
                     "Generate ANNA-TF's example data (a teaching model of line "
                     "spectra): training, cross-validation and test packs, templates "
                     "and a multispec FITS file of one star.")
    parser.add_argument("outdir", nargs="?", default="example_data", help="output folder (default example_data)")
    parser.add_argument("--grid", choices=("tutorial", "apogee", "lamost"), default="tutorial",
                        help="wavelength grid: tutorial (1001 px, 6625-6825 A, R=11000; default), apogee (7214 px "
                             "on three chips, 15168-16937 A, R=22500) or lamost (3909 px, 3700-9100 A, R=1800); "
                             "the survey grids use the survey line list and make about 100 spectra a second per "
                             "core")
    parser.add_argument("--resolution", type=float, default=None,
                        help="resolving power R (default: the grid's)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-xval", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--n-apertures", type=int, default=90,
                        help="spectra of the example star in star_multispec.fits (default 90)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    def action():
        from anna.progress import FileProgress
        from anna.synth import make_example_data

        with FileProgress("anna-synth", unit="spectrum") as progress:
            written = make_example_data(args.outdir, seed=args.seed, n_train=args.n_train, n_xval=args.n_xval,
                                        n_test=args.n_test, n_apertures=args.n_apertures, grid=args.grid,
                                        resolution=args.resolution, progress=progress)
        for kind, path in written.items():
            print(f"{kind:>10}: {path}")

    return _run("anna-synth", args.debug, action)


def pack_main(argv=None):
    parser = _parser("anna-pack",
                     "Build a training pack from spectra files (two-column text, FITS, or LAMOST/SDSS/APOGEE "
                     "survey files) and a CSV or FITS table of labels, interpolated onto a wavelength grid.")
    parser.add_argument("spectra", nargs="+", help="spectrum files")
    parser.add_argument("--labels", required=True, help="CSV with one row per spectrum")
    parser.add_argument("--grid", required=True, help="wavelength template (two columns) defining the grid")
    parser.add_argument("--out", required=True, help="pack to write")
    parser.add_argument("--id-column", default="star_id")
    parser.add_argument("--label-columns", help="comma-separated label columns (default: all other columns)")
    parser.add_argument("--continuum", choices=("NONE", "SPLINE", "QUANTILE"), default="NONE",
                        help="continuum normalisation of survey files (train with the same CONTINUUM)")
    parser.add_argument("--bad-pixel-fill", choices=("CONTINUUM", "INTERPOLATE"), default="INTERPOLATE",
                        help="neutral value of survey files' bad pixels (train with the same BAD_PIXEL_FILL)")
    parser.add_argument("--spectrum", help="which spectrum of each survey file (default: its only or first "
                                           "combined one)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    def action():
        from anna.continuum import continuum_settings
        from anna.packer import build_pack_from_spectra
        from anna.progress import FileProgress
        from anna.templates import read_wavelength_template

        grid = read_wavelength_template(args.grid)
        columns = args.label_columns.split(",") if args.label_columns else None
        with FileProgress("anna-pack") as progress:
            build_pack_from_spectra(args.spectra, args.labels, grid, args.out, id_column=args.id_column,
                                    label_columns=columns, continuum=continuum_settings(args.continuum),
                                    fill=args.bad_pixel_fill, spectrum_name=args.spectrum, report=progress)
        print(f"wrote {args.out}")

    return _run("anna-pack", args.debug, action)


def info_main(argv=None):
    parser = _parser("anna-info",
                     "Describe a frozen model: network, labels and ranges, grid, training parameters, stage "
                     "results, versions, training pack hash, uncertainties and their calibration.  Reads the "
                     "file only (no TensorFlow).")
    parser.add_argument("model", help="frozen model file, or the folder holding frozen.model")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_args(argv)

    def action():
        from anna.model_info import describe_frozen_model

        for line in describe_frozen_model(args.model):
            print(line)

    return _run("anna-info", args.debug, action)


def quickstart_main(argv=None):
    parser = _parser("anna-quickstart",
                     "Run the whole ANNA-TF pipeline on built-in example data: "
                     "generate, train, test, infer.")
    parser.add_argument("workdir", nargs="?", default="anna-quickstart",
                        help="folder for data, models and results (default ./anna-quickstart)")
    parser.add_argument("--config", default=None,
                        help="parameter file to use (default: the packaged configs/quickstart.param)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    def action():
        from anna.quickstart import run_quickstart

        _start_runtime("anna-quickstart", args.debug)
        run_quickstart(os.path.abspath(args.workdir), config=args.config)

    return _run("anna-quickstart", args.debug, action)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
