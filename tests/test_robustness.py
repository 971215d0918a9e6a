"""Robustness of the console entry points against bad input, interruption and reruns.

The contract under test: every problem with the user's input (parameter file, packs, templates, FITS files,
frozen models) ends the stage with exit status 2 and one ``<prog>: error: ...`` line per problem on stderr,
naming the file, the line or key and the value, with no traceback (``--debug`` shows it); it is found before
any training starts; a failing stage leaves no partial output (temporary files included); and an anna-infer
run killed part-way resumes on rerun, skipping the inputs it finished.

Most cases call the entry-point functions in this process (capsys) because a fresh interpreter costs seconds
once TensorFlow is imported; at least one case per stage runs the real entry point in a subprocess, so the
no-traceback, one-line, exit-2 contract is proven end to end.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from anna import cli
from anna.packs import write_pack

REPO = Path(__file__).resolve().parents[1]
# Entry points called in this process (imported under other names: pytest would collect "test_main" itself).
train_main, anna_test_main, infer_main, spectra_main = cli.train_main, cli.test_main, cli.infer_main, cli.spectra_main
PROGRAMS = {train_main: "anna-train", anna_test_main: "anna-test", infer_main: "anna-infer",
            spectra_main: "anna-spectra"}
NAMES = ("teff", "logg")
MINIMA = np.array([4000.0, 1.0])
MAXIMA = np.array([7000.0, 5.0])
GRID = 6605.0 + 3.0 * np.arange(64)  # the frozen model's wavelengths, Angstrom (6605-6794 A)
N_STARS = 30
# TensorFlow's native (C++) start-up logging writes straight to file descriptor 2, whatever Python does; such
# lines are not ours and are set aside before the error lines are checked.
NATIVE_LOG = re.compile(r"^([IWEF]\d{4} [0-9:.]+\s+\d+ \S+:\d+\] "
                        r"|WARNING: All log messages before absl::InitializeLog\(\) is called)")


# ----------------------------------------------------------------------------------------------------------
# Running the entry points


def run_entry(entry, *args, timeout=240):
    """Run ``anna.cli.<entry>`` in a fresh interpreter, as the console script would."""
    code = f"import sys; from anna.cli import {entry}; sys.exit({entry}(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_messages(prog, stderr):
    """The messages of ``prog: error: <message>`` lines; every other stderr line (native logging aside) fails."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not NATIVE_LOG.match(line)]
    prefix = f"{prog}: error: "
    assert lines and all(line.startswith(prefix) for line in lines), stderr
    return [line[len(prefix):] for line in lines]


def fails_in_subprocess(entry, *args):
    result = run_entry(entry, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    return error_messages("anna-" + entry.replace("_main", ""), result.stderr)


def fails(main, args, capsys):
    """Call an entry point in this process; assert exit status 2; return its error messages."""
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    return error_messages(PROGRAMS[main], err)


def succeeds(main, args, capsys):
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out


def one_message(messages):
    assert len(messages) == 1, messages
    return messages[0]


def files_under(folder):
    """Every file below ``folder`` (hidden temporaries included), relative, sorted; [] when it does not exist."""
    folder = Path(folder)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def write_param(path, **keys):
    """A parameter file holding ``keys`` (values None are left out); returns its path."""
    path = Path(path)
    path.write_text("".join(f"{key.upper()}: {value}\n" for key, value in keys.items() if value is not None))
    return path


# ----------------------------------------------------------------------------------------------------------
# Inputs


def star_labels_and_flux(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = MINIMA + rng.uniform(0, 1, (n, 2)) * (MAXIMA - MINIMA)
    flux = 1.0 - 0.3 * np.exp(-0.5 * ((GRID[None, :] - 6700.0) / (5.0 + labels[:, 1:2])) ** 2)
    return labels, flux


def pack_values(n=N_STARS, wave=GRID):
    """A valid pack as its flat float64 values (header, wavelengths, then id, labels, dummy, flux per star)."""
    labels, flux = star_labels_and_flux(n)
    rows = np.c_[np.arange(n) + 100.0, labels, np.zeros(n), flux]
    return np.concatenate([[len(wave), 2], wave, rows.ravel()])


def write_values(path, values, dtype="<f8"):
    np.asarray(values, dtype=np.float64).astype(dtype).tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def frozen_model(tmp_path_factory):
    """Folder holding an (untrained) frozen model over GRID with labels teff, logg, without training-domain
    statistics: anna-infer marks each star it predicts with it ``domain_unchecked``."""
    import keras

    from anna.model import NetworkSpec, build_network, save_frozen

    keras.utils.set_random_seed(3)
    folder = tmp_path_factory.mktemp("model")
    spec = NetworkSpec(npix=len(GRID), nout=2, conv_layers=((5, 4),), fc_dims=(16, 16))
    save_frozen(str(folder), build_network(spec), spec,
                {"output_names": list(NAMES), "wavelengths": GRID.tolist(), "min_params": MINIMA.tolist(),
                 "max_params": MAXIMA.tolist()})
    return folder


def copy_model(frozen_model, folder):
    return Path(shutil.copytree(frozen_model, folder))


@pytest.fixture
def sn_template(tmp_path):
    path = tmp_path / "sn.template"
    np.savetxt(path, np.c_[np.linspace(6600.0, 6800.0, 21), np.linspace(0.8, 1.2, 21)])
    return path


def train_param(folder, training_data, sn_template, **keys):
    """A small anna-train parameter file; were it ever to run, it would train for two iterations."""
    values = {"NUM_PX": 64, "NUM_OUTS": 2, "OUTPUT_NAMES": ", ".join(NAMES), "MIN_PARAMS": "4000, 1",
              "MAX_PARAMS": "7000, 5", "CONV1_SHAPE": "1, 5, 1, 4", "FC1_OUTDIM": 8, "FC2_OUTDIM": 8,
              "NUM_TRAIN_ITERS1": 2, "BATCH_SIZE1": 8, "SAMPLE_INTERVAL": 1, "DO_TRAIN2": "NO",
              "PREPROCESS_TRAIN": "YES", "SN_TEMPLATE": sn_template, "TRAINING_DATA": training_data,
              "SAVE_LOC": Path(folder) / "model", "TBOARD_OUTPUT": "NO", "TRAINING_XVAL": "NO", "SEED": 1}
    values.update(keys)
    return write_param(Path(folder) / "train.param", **values)


def multispec_header(specs):
    """IRAF multispec WCS cards; ``specs`` are the specN attribute strings, one per image row."""
    header = fits.Header()
    header["WCSDIM"] = 2
    header["CTYPE1"] = "MULTISPE"
    header["CTYPE2"] = "MULTISPE"
    header["WAT0_001"] = "system=multispec"
    header["WAT1_001"] = "wtype=multispec label=Wavelength units=angstroms"
    text = "wtype=multispec " + " ".join(f'spec{row} = "{spec}"' for row, spec in enumerate(specs, start=1))
    for number, start in enumerate(range(0, len(text), 68), start=1):
        header[f"WAT2_{number:03d}"] = text[start:start + 68]
    return header


def write_multispec(path, flux_rows, w1=6600.0, dw=0.7, specs=None):
    """Linear multispec image, apertures 1..n, ``flux_rows`` (n, nw) covering w1 + dw * (0..nw-1) Angstrom."""
    flux_rows = np.atleast_2d(flux_rows)
    n, nw = flux_rows.shape
    specs = specs or [f"{row} 1 0 {w1!r} {dw!r} {nw} 0. 0 0" for row in range(1, n + 1)]
    fits.PrimaryHDU(np.asarray(flux_rows, dtype=np.float32), header=multispec_header(specs)).writeto(path)
    return str(path)


def smooth_rows(n, nw=301, seed=0):
    return 1.0 - 0.2 * np.random.default_rng(seed).uniform(0, 1, (n, 1)) * np.hanning(nw)[None, :]


def infer_param(folder, model, **keys):
    """An anna-infer parameter file writing to ``folder/out``.  The test model is untrained, so its predictions
    may lie anywhere: a wide RANGE_MARGIN keeps the out_of_range warning out of the flags under test."""
    return write_param(Path(folder) / "infer.param", INFER_MODEL_LOC=model, INFER_SAVE_LOC=Path(folder) / "out",
                       RANGE_MARGIN=1000, **keys)


# ----------------------------------------------------------------------------------------------------------
# Parameter file


def test_every_parameter_problem_listed_at_once_before_training(tmp_path):
    path = tmp_path / "run.param"
    path.write_text(
        "NUM_PIXX: 64\n"                      # 1 unknown key (so NUM_PX is missing)
        "NUM_OUTS: 2\n"                       # 2
        "OUTPUT_NAMES: teff, logg\n"          # 3
        "MIN_PARAMS: 4000, 1, -2\n"           # 4 three values for two outputs
        "MAX_PARAMS: 7000, 5\n"               # 5
        "LEARN_RATE1: fast\n"                 # 6 not a number
        "KEEP_PROB1: 1.5\n"                   # 7 out of range
        "BATCH_SIZE1: 32\n"                   # 8
        "BATCH_SIZE1: 64   # again\n"         # 9 duplicate
        "DO_TRAIN2: maybe\n"                  # 10 not a flag
        "CONV1_SHAPE: 1, 5, 4\n"              # 11 three numbers instead of four
        "TRAINING_DATA: missing/train.pack\n"  # 12 does not exist
        "SAVE_LOC: model\n"                   # 13
        "PREPROCESS_TRAIN: YES\n"             # 14 needs SN_TEMPLATE, not given
        "TBOARD_OUTPUT: NO\n")                # 15
    messages = fails_in_subprocess("train_main", path)
    p = str(path)
    expected = [
        f"{p}:1: NUM_PIXX: unknown key; did you mean NUM_PX? (got '64')",
        f"{p}:6: LEARN_RATE1: expected a number > 0 (not a number) (got 'fast')",
        f"{p}:7: KEEP_PROB1: probability must be in (0, 1] (got '1.5')",
        f"{p}:9: BATCH_SIZE1: duplicate key: first given on line 8, again on line 9 (got '64')",
        f"{p}:10: DO_TRAIN2: expected YES or NO (or TRUE/FALSE) (got 'maybe')",
        f"{p}:11: CONV1_SHAPE: expected four integers '1, width, 1, kernels' (3 values) (got '1, 5, 4')",
        f"{p}:4: MIN_PARAMS: has 3 values but NUM_OUTS is 2 (got '4000, 1, -2')",
        f"{p}: NUM_PX: required for training, but not given",
        f"{p}: SN_TEMPLATE: required for training when PREPROCESS_TRAIN is YES, but not given",
        f"{p}:12: TRAINING_DATA: file not found: {tmp_path / 'missing' / 'train.pack'} (got 'missing/train.pack')",
    ]
    assert sorted(messages) == sorted(expected)
    assert not (tmp_path / "model").exists()  # nothing started


def test_a_malformed_value_is_not_also_called_missing(tmp_path, capsys):
    path = write_param(tmp_path / "run.param", NUM_PX="sixty-four", NUM_OUTS=2, OUTPUT_NAMES="a, b",
                       MIN_PARAMS="0, 0", MAX_PARAMS="1, 1", TRAINING_DATA=tmp_path / "absent.pack",
                       SAVE_LOC=tmp_path / "model", PREPROCESS_TRAIN="NO", TBOARD_OUTPUT="NO")
    messages = fails(train_main, [path], capsys)
    assert messages == [f"{path}:1: NUM_PX: expected a positive integer (got 'sixty-four')",
                        f"{path}:6: TRAINING_DATA: file not found: {tmp_path / 'absent.pack'} "
                        f"(got '{tmp_path / 'absent.pack'}')"]


def test_empty_parameter_file_lists_every_missing_key(tmp_path, capsys):
    path = tmp_path / "empty.param"
    path.write_text("# nothing yet\n")
    messages = fails(train_main, [path], capsys)
    required = ("NUM_PX", "NUM_OUTS", "TRAINING_DATA", "SAVE_LOC", "OUTPUT_NAMES", "MIN_PARAMS", "MAX_PARAMS")
    assert [f"{path}: {key}: required for training, but not given" for key in required] == messages[:7]
    assert messages[7:] == [f"{path}: SN_TEMPLATE: required for training when PREPROCESS_TRAIN is YES, but not given",
                            f"{path}: LOG_LOC: required for training when TBOARD_OUTPUT is YES, but not given"]


@pytest.mark.parametrize("main, required", [
    (anna_test_main, ("TEST_MODEL_LOC", "TEST_SAVE_LOC", "TESTING_DATA")),
    (infer_main, ("INFER_MODEL_LOC", "INFER_SAVE_LOC")),
])
def test_other_stages_list_their_missing_keys(tmp_path, capsys, main, required):
    path = write_param(tmp_path / "run.param", SEED=1)
    messages = fails(main, [path], capsys)
    for key in required:
        stage = "testing" if main is anna_test_main else "inference"
        assert f"{path}: {key}: required for {stage}, but not given" in messages


def test_unreadable_parameter_files(tmp_path, capsys):
    folder = tmp_path / "a_folder.param"
    folder.mkdir()
    assert fails(train_main, [folder], capsys) == [f"{folder}: is a folder, not a parameter file"]
    inside_missing = tmp_path / "no_such_folder" / "run.param"
    assert fails(anna_test_main, [inside_missing], capsys) == [f"{inside_missing}: parameter file not found"]
    latin1 = tmp_path / "latin1.param"
    latin1.write_bytes(b"NUM_PX: 64\nOUTPUT_NAMES: T\xe9ff, logg\n")
    message = one_message(fails(infer_main, [latin1], capsys))
    assert message == f"{latin1}:2: not UTF-8 text: byte 0xe9 at column 16; save the parameter file as UTF-8"


def test_paths_that_do_not_exist_for_test_and_infer(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where a folder should be")
    path = write_param(tmp_path / "test.param", TEST_MODEL_LOC="nowhere", TEST_SAVE_LOC="taken",
                       TESTING_DATA="test.pack", PREPROCESS_TEST="YES")
    messages = fails(anna_test_main, [path], capsys)
    assert sorted(messages) == sorted([
        f"{path}: SN_TEMPLATE_TEST: required for testing when PREPROCESS_TEST is YES, but not given",
        f"{path}: REL_CONT_E_TEST: required for testing when PREPROCESS_TEST is YES, but not given",
        f"{path}: SN_RANGE_TEST: required for testing when PREPROCESS_TEST is YES, but not given",
        f"{path}:3: TESTING_DATA: file not found: {tmp_path / 'test.pack'} (got 'test.pack')",
        f"{path}:1: TEST_MODEL_LOC: folder not found: {tmp_path / 'nowhere'} (got 'nowhere')",
        f"{path}:2: TEST_SAVE_LOC: exists but is not a folder: {tmp_path / 'taken'} (got 'taken')"])
    path = write_param(tmp_path / "infer.param", INFER_MODEL_LOC="nowhere", INFER_SAVE_LOC="out",
                       INFER_MODE="MS_FITS", MS_FITS_IMAGE="night.fits")
    messages = fails_in_subprocess("infer_main", path)
    assert sorted(messages) == sorted([
        f"{path}:4: MS_FITS_IMAGE: file not found: {tmp_path / 'night.fits'} (got 'night.fits')",
        f"{path}:1: INFER_MODEL_LOC: folder not found: {tmp_path / 'nowhere'} (got 'nowhere')"])
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    path = write_param(tmp_path / "run.param", NUM_PIXX=64)
    result = run_entry("train_main", path, "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "anna.errors.AnnaInputError" in result.stderr and "NUM_PIXX: unknown key" in result.stderr
    quiet = run_entry("train_main", path)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr


# ----------------------------------------------------------------------------------------------------------
# Packs, through anna-train (and its --check, which must refuse exactly what the run refuses)


def _truncated(path):
    return write_values(path, pack_values()[:-3])


def _cut_mid_value(path):
    write_values(path, pack_values())
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 5)
    return str(path)


def _with_star_values(row, column, value):
    def build(path):
        values = pack_values()
        values[2 + len(GRID) + row * (len(GRID) + 4) + column] = value
        return write_values(path, values)
    return build


PACK_SIZE = (2 + 64 + N_STARS * 68) * 8
PACK_CASES = {
    "truncated": (_truncated, {}, f"pack holds {2 + 64 + N_STARS * 68 - 3} values; header + 29 stars of 68 values "
                                  "leaves 65 extra (truncated file, or npix/nout wrong?)"),
    "cut mid-value": (_cut_mid_value, {}, f"size {PACK_SIZE - 5} bytes is not a whole number of float64 values"),
    "npix mismatch": (lambda path: write_values(path, pack_values()), {"NUM_PX": 65},
                      "header npix=64 but the parameter file says NUM_PX=65"),
    "nout mismatch": (lambda path: write_values(path, pack_values()),
                      {"NUM_OUTS": 3, "OUTPUT_NAMES": "teff, logg, feh", "MIN_PARAMS": "4000, 1, -2",
                       "MAX_PARAMS": "7000, 5, 0.5"}, "header nout=2 but the parameter file says NUM_OUTS=3"),
    "zero stars": (lambda path: write_values(path, pack_values()[:66]), {},
                   "pack holds no stars (header and wavelengths only)"),
    "infinite label": (_with_star_values(3, 2, np.inf), {}, f"1 of {N_STARS} stars have infinite labels"),
    "NaN flux": (_with_star_values(5, 4 + 10, np.nan), {}, f"1 of {N_STARS} stars have NaN or infinite fluxes"),
    "infinite flux": (_with_star_values(0, 4, -np.inf), {}, f"1 of {N_STARS} stars have NaN or infinite fluxes"),
    "descending grid": (lambda path: write_values(path, pack_values(wave=GRID[::-1])), {},
                        "wavelengths are not strictly ascending: pixel 1 = 6791.0 follows 6794.0"),
    "float32": (lambda path: write_values(path, pack_values(), "<f4"), {},
                f"the file reads as a float32 pack (npix=64, nout=2, {N_STARS} stars): packs must be written as "
                "float64"),
    "big-endian": (lambda path: write_values(path, pack_values(), ">f8"), {},
                   "the header reads correctly as big-endian float64: packs must be little-endian"),
}


@pytest.mark.parametrize("case", list(PACK_CASES))
def test_bad_training_pack(tmp_path, capsys, sn_template, case):
    build, keys, expected = PACK_CASES[case]
    pack = build(tmp_path / "train.pack")
    path = train_param(tmp_path, pack, sn_template, **keys)
    checked = one_message(fails(train_main, [path, "--check"], capsys))
    message = one_message(fails(train_main, [path], capsys))
    assert message == checked
    assert message.startswith(f"{pack}: ") and expected in message, message
    assert not (tmp_path / "model").exists()  # refused before training started


def test_nan_labels_are_missing_labels_for_check_as_for_training(tmp_path, capsys, sn_template):
    pack = _with_star_values(2, 1, np.nan)(tmp_path / "train.pack")
    out = succeeds(train_main, [train_param(tmp_path, pack, sn_template), "--check"], capsys)
    assert f"training pack: Pack({pack!r}, n_stars={N_STARS}" in out


# ----------------------------------------------------------------------------------------------------------
# S/N templates, through anna-train with PREPROCESS_TRAIN YES


TEMPLATE_CASES = {  # content, ":line" or "", message
    "one row": ("6600 1.0\n", "", "S/N template has 1 data rows; at least 2 are needed"),
    "non-numeric": ("# wave relsn\n6600 1.0\n6700 abc\n6800 1.0\n", ":3",
                    "S/N template row is not numeric (headers must start with '#') (got '6700 abc')"),
    "one column": ("6600 1.0\n6700\n6800 1.0\n", ":2", "S/N template row needs two columns (got '6700')"),
    "short of the grid": ("6620 1.0\n6700 1.0\n6800 1.0\n", "",
                          "S/N template covers 6620.000-6800.000 A but the spectra span 6605.000-6794.000 A"),
    "zero S/N": ("6600 1.0\n6700 0.0\n6800 1.0\n", "",
                 "relative S/N must be positive; row 2 at 6700.000 A (got 0.0)"),
    "negative S/N": ("6600 1.0\n6700 1.0\n6800 -0.5\n", "",
                     "relative S/N must be positive; row 3 at 6800.000 A (got -0.5)"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff", "", "S/N template file is not text (undecodable byte at offset 0)"),
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_bad_sn_template(tmp_path, capsys, case):
    content, line, expected = TEMPLATE_CASES[case]
    template = tmp_path / "sn.template"
    if isinstance(content, bytes):
        template.write_bytes(content)
    else:
        template.write_text(content)
    path = train_param(tmp_path, write_values(tmp_path / "train.pack", pack_values()), template)
    assert one_message(fails(train_main, [path, "--check"], capsys)) == f"{template}{line}: {expected}"
    assert one_message(fails(train_main, [path], capsys)) == f"{template}{line}: {expected}"
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------------------------------------
# FITS files, through anna-infer and anna-spectra


def _not_fits(path):
    path.write_text("hello, I am a text file named like a FITS file\n")


def _no_wcs(path):
    fits.PrimaryHDU(np.ones((2, 301), dtype=np.float32)).writeto(path)


def _empty(path):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU()]).writeto(path)


def _function_type_7(path):
    write_multispec(path, smooth_rows(1), specs=["1 1 2 6600. 0.7 301 0. 0 0 1. 0. 7 2 1. 301. 6700. 100."])


def _dispersion_type_3(path):
    write_multispec(path, smooth_rows(1), specs=["1 1 3 6600. 0.7 301 0. 0 0"])


def _uncalibrated(path):
    write_multispec(path, smooth_rows(1), specs=["1 1 -1 1. 1. 301 0. 0 0"])


FITS_CASES = {
    "not FITS": (_not_fits, "not a FITS file (it does not start with a SIMPLE card) (got 'hello, I am a text file named ')"),
    "no WCS": (_no_wcs, "no usable WCS: neither multispec WAT cards nor CRVAL1"),
    "empty data": (_empty, "no image data (every HDU is empty)"),
    "function type 7": (_function_type_7, "WAT2 spec1: unsupported dispersion function type 7 (supported: "
                                          "1 chebyshev, 2 legendre, 3 cubic spline, 4 linear spline, 5 pixel table, "
                                          "6 sampled table) (got '7')"),
    "dispersion type 3": (_dispersion_type_3, "WAT2 spec1: unsupported dispersion type (expected 0 linear, "
                                              "1 log-linear, 2 non-linear) (got '3')"),
    "not dispersion-calibrated": (_uncalibrated, "WAT2 spec1: no usable WCS: dispersion type -1 (spectrum not "
                                                 "dispersion-calibrated)"),
}


@pytest.mark.parametrize("case", list(FITS_CASES))
def test_bad_fits_file(tmp_path, capsys, frozen_model, case):
    build, expected = FITS_CASES[case]
    image = tmp_path / "night.fits"
    build(image)
    assert one_message(fails(spectra_main, [image], capsys)).startswith(f"{image}: {expected}")
    message = one_message(fails(infer_main, [infer_param(tmp_path, frozen_model, INFER_MODE="MS_FITS",
                                                         MS_FITS_IMAGE=image)], capsys))
    assert message.startswith(f"{image}: {expected}"), message
    assert files_under(tmp_path / "out") == []


def test_bad_fits_end_to_end_with_anna_spectra(tmp_path):
    image = tmp_path / "night.fits"
    _function_type_7(image)
    message = one_message(fails_in_subprocess("spectra_main", image))
    assert message.startswith(f"{image}: WAT2 spec1: unsupported dispersion function type 7")


def test_aperture_full_of_nan_is_a_flagged_row(tmp_path, capsys, frozen_model):
    rows = smooth_rows(3)
    rows[1] = np.nan
    image = write_multispec(tmp_path / "night.fits", rows)
    shown = succeeds(spectra_main, [image], capsys)
    assert "3 spectra" in shown
    succeeds(infer_main, [infer_param(tmp_path, frozen_model, INFER_MODE="MS_FITS", MS_FITS_IMAGE=image)], capsys)
    lines = (tmp_path / "out" / "night_infer.out").read_text().splitlines()
    assert lines[0] == "star_id,file,aperture,beam,teff,logg,bad_pixel_fraction,flags"
    assert lines[2] == "2,night.fits,2,1,nan,nan,1.0000,nonfinite"
    for line in (lines[1], lines[3]):
        fields = line.split(",")
        assert fields[-1] == "domain_unchecked" and np.isfinite([float(v) for v in fields[4:6]]).all()
        assert fields[-2] == "0.0000"


# ----------------------------------------------------------------------------------------------------------
# Frozen models, through anna-test and anna-infer


@pytest.fixture
def test_pack(tmp_path):
    labels, flux = star_labels_and_flux(N_STARS, seed=1)
    path = tmp_path / "test.pack"
    write_pack(path, GRID, np.arange(N_STARS), labels, flux)
    return path


def anna_test_param(folder, model, pack, **keys):
    return write_param(Path(folder) / "test.param", TEST_MODEL_LOC=model, TEST_SAVE_LOC=Path(folder) / "results",
                       TESTING_DATA=pack, **keys)


def _rewrite_archive(model_file, edit_metadata):
    with zipfile.ZipFile(model_file) as archive:
        metadata = json.loads(archive.read("metadata.json"))
        weights = archive.read("weights.npz")
    metadata = edit_metadata(metadata)
    with zipfile.ZipFile(model_file, "w") as archive:
        archive.writestr("metadata.json", metadata if isinstance(metadata, str) else json.dumps(metadata))
        archive.writestr("weights.npz", weights)


def test_missing_frozen_model(tmp_path, capsys, test_pack):
    (tmp_path / "empty").mkdir()
    path = anna_test_param(tmp_path, "empty", test_pack)
    assert fails(anna_test_main, [path], capsys) == [
        f"{path}:1: TEST_MODEL_LOC: no frozen.model in {tmp_path / 'empty'} (train a model first, or point to the "
        "folder that holds frozen.model) (got 'empty')"]
    path = infer_param(tmp_path, tmp_path / "gone", INFER_MODE="DEBUG", DEBUG_DATA=test_pack)
    assert fails(infer_main, [path], capsys) == [
        f"{path}:1: INFER_MODEL_LOC: folder not found: {tmp_path / 'gone'} (got '{tmp_path / 'gone'}')"]


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty file"])
def test_corrupted_frozen_model(tmp_path, capsys, frozen_model, test_pack, damage):
    model = copy_model(frozen_model, tmp_path / "model")
    model_file = model / "frozen.model"
    data = model_file.read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "random bytes": np.random.default_rng(0).bytes(len(data)),
               "empty file": b""}[damage]
    model_file.write_bytes(damaged)
    expected = f"{model_file}: frozen model is corrupted or not a frozen model (BadZipFile: "
    for main, path in ((anna_test_main, anna_test_param(tmp_path, model, test_pack)),
                       (infer_main, infer_param(tmp_path, model, INFER_MODE="DEBUG", DEBUG_DATA=test_pack))):
        assert one_message(fails(main, [path], capsys)).startswith(expected)
    assert files_under(tmp_path / "results") == [] and files_under(tmp_path / "out") == []


def test_frozen_model_of_another_format_version_says_which(tmp_path, frozen_model, test_pack):
    from anna import __version__

    model = copy_model(frozen_model, tmp_path / "model")
    _rewrite_archive(model / "frozen.model", lambda meta: {**meta, "format_version": 7, "anna_version": "9.1.0"})
    message = one_message(fails_in_subprocess("test_main", anna_test_param(tmp_path, model, test_pack)))
    assert message == (f"{model / 'frozen.model'}: frozen model format 7 written by ANNA-TF 9.1.0; this ANNA-TF "
                       f"{__version__} reads formats 1, 2")
    assert files_under(tmp_path / "results") == []


def test_archive_without_the_model_files(tmp_path, capsys, frozen_model, test_pack):
    model = copy_model(frozen_model, tmp_path / "model")
    with zipfile.ZipFile(model / "frozen.model", "w") as archive:
        archive.writestr("notes.txt", "not a model")
    message = one_message(fails(infer_main, [infer_param(tmp_path, model, INFER_MODE="DEBUG",
                                                         DEBUG_DATA=test_pack)], capsys))
    assert message == f"{model / 'frozen.model'}: not an ANNA-TF frozen model (archive holds ['notes.txt'])"


@pytest.mark.parametrize("metadata", ["[]", "drop network"])
def test_frozen_model_with_malformed_metadata(tmp_path, capsys, frozen_model, test_pack, metadata):
    model = copy_model(frozen_model, tmp_path / "model")
    _rewrite_archive(model / "frozen.model", lambda meta: metadata if metadata == "[]"
                     else {key: value for key, value in meta.items() if key != "network"})
    message = one_message(fails(anna_test_main, [anna_test_param(tmp_path, model, test_pack)], capsys))
    assert message.startswith(f"{model / 'frozen.model'}: ")


# ----------------------------------------------------------------------------------------------------------
# Nothing half-written


def test_failing_anna_test_leaves_no_output(tmp_path, capsys, frozen_model):
    labels, flux = star_labels_and_flux(N_STARS, seed=2)
    flux[N_STARS - 1, 7] = np.nan  # the very last star: found while test_stats.out is being written
    pack = tmp_path / "test.pack"
    write_pack(pack, GRID, np.arange(N_STARS), labels, flux)
    path = anna_test_param(tmp_path, frozen_model, pack, TEST_BATCH_SIZE=4)
    message = one_message(fails(anna_test_main, [path], capsys))
    assert message == (f"{pack}: TESTING_DATA: 1 of {N_STARS} stars have NaN or infinite fluxes; anna-test needs "
                       "clean spectra (anna-infer flags such spectra instead)")
    assert files_under(tmp_path / "results") == []


def test_anna_test_refuses_bad_labels_counted_over_the_whole_pack(tmp_path, capsys, frozen_model):
    # anna-test checks the labels as it streams the pack (chunks of 512 stars): a bad label in the first chunk
    # and one in the third are both counted, and nothing is written
    n = 1100
    labels, flux = star_labels_and_flux(n, seed=4)
    labels[3, 1], labels[1050, 0] = np.inf, -np.inf
    pack = tmp_path / "inf.pack"
    write_pack(pack, GRID, np.arange(n), labels, flux)
    message = one_message(fails(anna_test_main, [anna_test_param(tmp_path, frozen_model, pack)], capsys))
    assert message == f"{pack}: 2 of {n} stars have infinite labels"
    assert files_under(tmp_path / "results") == []
    # NaN marks a missing label (MAGIC_NUMBER's default applies): accepted, the star left out of that label
    labels[3, 1], labels[1050, 0] = np.nan, np.nan
    write_pack(pack, GRID, np.arange(n), labels, flux)
    succeeds(anna_test_main, [anna_test_param(tmp_path, frozen_model, pack)], capsys)
    summary = json.loads((tmp_path / "results" / "test_summary.json").read_text())
    assert [label["n"] for label in summary["labels"].values()] == [n - 1, n - 1]


def test_failed_correction_fit_leaves_no_output(tmp_path, capsys, frozen_model):
    labels, flux = star_labels_and_flux(4, seed=3)
    pack = tmp_path / "few.pack"
    write_pack(pack, GRID, np.arange(4), labels, flux)
    path = anna_test_param(tmp_path, frozen_model, pack, FIT_CORRECTION="YES", CORRECTION_DEGREE=5)
    assert "cannot fit a degree-5 correction" in one_message(fails(anna_test_main, [path], capsys))
    assert files_under(tmp_path / "results") == []


def test_failing_anna_infer_leaves_no_output(tmp_path, capsys, frozen_model):
    pack = tmp_path / "debug.pack"
    write_values(pack, pack_values(wave=GRID + 0.5))  # another grid: DEBUG mode does not interpolate
    message = one_message(fails(infer_main, [infer_param(tmp_path, frozen_model, INFER_MODE="DEBUG",
                                                         DEBUG_DATA=pack)], capsys))
    assert message.startswith(f"{pack}: DEBUG_DATA: wavelengths differ from the model's training grid")
    truncated = write_values(tmp_path / "debug.pack", pack_values()[:-1])
    message = one_message(fails(infer_main, [infer_param(tmp_path, frozen_model, INFER_MODE="DEBUG",
                                                         DEBUG_DATA=truncated)], capsys))
    assert "leaves 67 extra (truncated file, or npix/nout wrong?)" in message
    assert files_under(tmp_path / "out") == []


def test_one_bad_input_among_many_writes_only_the_good_ones(tmp_path, capsys, frozen_model):
    folder = tmp_path / "in"
    folder.mkdir()
    write_multispec(folder / "a.fits", smooth_rows(2))
    _not_fits(folder / "b.fits")
    _function_type_7(folder / "c.fits")
    write_multispec(folder / "d.fits", smooth_rows(3))
    path = infer_param(tmp_path, frozen_model, INFER_MODE="FITS", INFER_FILES=folder / "*.fits")
    message = one_message(fails(infer_main, [path], capsys))
    assert message.startswith(f"{path}: INFER_FILES: 2 of 4 inputs could not be read (the other outputs were "
                              f"written); first: {folder / 'b.fits'}: not a FITS file")
    assert files_under(tmp_path / "out") == ["a_infer.out", "d_infer.out"]
    assert len((tmp_path / "out" / "d_infer.out").read_text().splitlines()) == 4


# ----------------------------------------------------------------------------------------------------------
# anna-infer killed part-way, then rerun


N_INPUTS = 40
# Apertures per multispec input; the second input is much longer so that a kill sent as soon as the first output
# appears lands while that one is being written, however loaded the machine is.
APERTURES = {1: 400}
DEFAULT_APERTURES = 4


def _start_infer(path):
    code = "import sys; from anna.cli import infer_main; sys.exit(infer_main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-u", "-c", code, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_output(path):
    """A complete, valid output: header, one row per spectrum, finite values, no flags."""
    number = int(path.name[len("star"):-len("_infer.out")])
    lines = path.read_text().splitlines()
    if number % 5 == 4:  # a text spectrum
        assert lines[0] == "star_id,teff,logg,bad_pixel_fraction,flags" and len(lines) == 2
        assert lines[1].startswith("1,")
    else:
        apertures = APERTURES.get(number, DEFAULT_APERTURES)
        assert lines[0] == "star_id,file,aperture,beam,teff,logg,bad_pixel_fraction,flags" and len(lines) == apertures + 1
        assert [line.split(",")[0] for line in lines[1:]] == [str(n) for n in range(1, apertures + 1)]
    for line in lines[1:]:
        fields = line.split(",")
        assert fields[-1] == "domain_unchecked" and np.isfinite([float(v) for v in fields[-4:-2]]).all(), line


def test_killed_infer_resumes_and_skips_finished_inputs(tmp_path, capsys, frozen_model):
    folder = tmp_path / "in"
    folder.mkdir()
    wave = 6600.0 + 0.7 * np.arange(301)
    for number in range(N_INPUTS):
        if number % 5 == 4:
            np.savetxt(folder / f"star{number:02d}.txt", np.c_[wave, smooth_rows(1, seed=number)[0]])
        else:
            rows = smooth_rows(APERTURES.get(number, DEFAULT_APERTURES), seed=number)
            write_multispec(folder / f"star{number:02d}.fits", rows)
    # One spectrum per forward pass makes the long input take a while (about a millisecond per aperture).
    path = infer_param(tmp_path, frozen_model, INFER_MODE="FITS", INFER_FILES=folder / "*", INFER_BATCH_SIZE=1)
    out = tmp_path / "out"

    proc = _start_infer(path)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*_infer.out")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(out.glob("*_infer.out"))
    assert 1 <= len(finished) < N_INPUTS, "the run was not killed part-way"
    before = {output.name: (output.stat().st_mtime_ns, output.read_bytes()) for output in finished}
    for output in finished:  # whatever has its final name is whole
        _check_output(output)

    report = succeeds(infer_main, [path], capsys)
    assert report.splitlines()[0] == (f"anna-infer (FITS): {N_INPUTS} input(s), skipped {len(finished)} done, "
                                      f"{N_INPUTS - len(finished)} to do")
    outputs = sorted(out.glob("*_infer.out"))
    assert [output.name for output in outputs] == [f"star{n:02d}_infer.out" for n in range(N_INPUTS)]
    for output in outputs:
        _check_output(output)
    for name, (mtime, content) in before.items():  # the finished ones were skipped, not redone
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == content
    leftovers = [name for name in files_under(out) if not name.endswith("_infer.out")]
    assert leftovers == []  # the killed writer's temporary file was cleared when its output was rewritten

    report = succeeds(infer_main, [path], capsys)
    assert f"skipped {N_INPUTS} done, 0 to do" in report.splitlines()[0]
