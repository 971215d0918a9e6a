"""Parameter file: syntax, typing, per-stage validation, overrides, the example file, and a fuzz test.

Every error test checks the message names the file, the line (or '--set'), the key and the offending value,
because that message is all a user sees.
"""

import json
import os
import pickle
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anna.errors import AnnaInputError
from anna.params import (INFER_MODES, KEY_TABLE, Config, expand_infer_files, known_keys, load_config,
                         validate_for_stage)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "ANNA.param.example"
FUZZ_EXAMPLES = int(os.environ.get("ANNA_FUZZ_EXAMPLES", "200"))

TRAIN_MINIMAL = """\
NUM_PX: 50
NUM_OUTS: 2
TRAINING_DATA: data/train.pack
SAVE_LOC: out/model
OUTPUT_NAMES: teff, logg
MIN_PARAMS: 4000, 1.0
MAX_PARAMS: 7000, 5.0
SN_TEMPLATE: sn.template
LOG_LOC: out/logs
"""

INFER_MINIMAL = """\
INFER_MODEL_LOC: model
INFER_SAVE_LOC: out
INFER_MODE: DEBUG
DEBUG_DATA: debug.pack
"""


def write(folder, text, name="run.param"):
    path = Path(folder) / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_text(folder, text, overrides=()):
    return load_config(write(folder, text), overrides)


def error_of(folder, text, overrides=()):
    with pytest.raises(AnnaInputError) as info:
        load_text(folder, text, overrides)
    return str(info.value)


def stage_error(cfg, stage, **kwargs):
    with pytest.raises(AnnaInputError) as info:
        validate_for_stage(cfg, stage, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ syntax


def test_values_are_typed(tmp_path):
    cfg = load_text(tmp_path, TRAIN_MINIMAL + "CONV1_SHAPE: 1, 21, 1, 8\nKEEP_PROB1: 0.5\nLEARN_RATE1: 1e-4\n"
                                              "REL_CONT_E_TRAIN: -0.02, 0.03\nUNCERTAINTY: mc_dropout\n")
    assert cfg.num_px == 50 and isinstance(cfg.num_px, int)
    assert cfg.conv1_shape == (1, 21, 1, 8)
    assert cfg.keep_prob1 == 0.5 and cfg.learn_rate1 == 1e-4
    assert cfg.rel_cont_e_train == (-0.02, 0.03)
    assert cfg.output_names == ("teff", "logg")
    assert cfg.min_params == (4000.0, 1.0) and isinstance(cfg.min_params[0], float)
    assert cfg.uncertainty == "MC_DROPOUT"
    assert cfg.source == str(tmp_path / "run.param")


def test_defaults_for_keys_not_given(tmp_path):
    empty = load_text(tmp_path, "# nothing set\n")
    for spec in KEY_TABLE:
        assert getattr(empty, spec.name.lower()) == spec.default
        assert not empty.was_set(spec.name)
    cfg = load_text(tmp_path, "NUM_PX: 10\n")
    assert cfg.conv1_shape == (1, 45, 1, 10) and cfg.fc1_outdim == 128 and cfg.do_train2 is True
    assert cfg.keep_prob2 == 1.0 and cfg.sn_range_train == (175.0, 250.0) and cfg.seed is None
    assert cfg.correction_degree == 1 and cfg.range_margin == 0.05 and cfg.input_centering == "ONE"
    assert not cfg.was_set("FC1_OUTDIM") and cfg.line_of("FC1_OUTDIM") is None
    assert cfg.was_set("num_px") and cfg.line_of("NUM_PX") == 1


def test_comments_blank_lines_and_whitespace(tmp_path):
    cfg = load_text(tmp_path, "# heading\n\n   \t\n  NUM_PX :  1001   # trailing comment\n"
                              "# FC1_OUTDIM: 7\nFC2_OUTDIM:64#no space before the hash\r\n")
    assert cfg.num_px == 1001 and cfg.fc2_outdim == 64 and cfg.fc1_outdim == 128
    assert cfg.line_of("NUM_PX") == 4 and cfg.line_of("FC2_OUTDIM") == 6


def test_split_at_first_colon_only(tmp_path):
    cfg = load_text(tmp_path, "SAVE_LOC: C:/runs/x\nOUTPUT_NAMES: a:b, c\nINFER_FILES: http://host/x\n")
    assert cfg.text_of("SAVE_LOC") == "C:/runs/x"
    assert cfg.save_loc.endswith("C:/runs/x")
    assert cfg.output_names == ("a:b", "c")
    assert cfg.text_of("INFER_FILES") == "http://host/x"


@pytest.mark.parametrize("word, expected", [("YES", True), ("yes", True), ("Yes", True), ("true", True),
                                            ("TRUE", True), ("NO", False), ("no", False), ("False", False)])
def test_flags(tmp_path, word, expected):
    assert load_text(tmp_path, f"DO_TRAIN2: {word}\n").do_train2 is expected


def test_keys_are_case_insensitive_and_aliases_map(tmp_path):
    cfg = load_text(tmp_path, "num_pix: 300\nSN_TEMPLATE_TRAIN: t/sn.txt\n")
    assert cfg.num_px == 300 and cfg.was_set("NUM_PX") and cfg.was_set("NUM_PIX")
    assert cfg.sn_template == str(tmp_path / "t" / "sn.txt")


def test_empty_value_keeps_default_but_remembers_line(tmp_path):
    cfg = load_text(tmp_path, "NUM_PX: 5\nSEED:\nFC1_OUTDIM:   # nothing\n")
    assert cfg.seed is None and cfg.fc1_outdim == 128
    assert not cfg.was_set("SEED") and cfg.line_of("SEED") == 2 and cfg.line_of("FC1_OUTDIM") == 3


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(folder, "TRAINING_DATA: data/../data/train.pack\nSAVE_LOC: /abs/model\nLOG_LOC: ~/logs\n")
    cfg = load_config(os.path.relpath(path))
    assert cfg.source == str(path)
    assert cfg.training_data == str(folder / "data" / "train.pack")
    assert cfg.save_loc == "/abs/model"
    assert cfg.log_loc == os.path.join(os.path.expanduser("~"), "logs")


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(AnnaInputError, match="parameter file not found") as info:
        load_config(tmp_path / "nope.param")
    assert str(tmp_path / "nope.param") in str(info.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(AnnaInputError, match="folder"):
        load_config(tmp_path)


def test_path_with_nul_byte():
    with pytest.raises(AnnaInputError):
        load_config("bad\0name.param")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "NUM_PX: 5\n")
    path.chmod(0)
    try:
        with pytest.raises(AnnaInputError, match="cannot read"):
            load_config(path)
    finally:
        path.chmod(0o600)


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path, b"NUM_PX: 5\nOUTPUT_NAMES: t\xe9ff\n")
    with pytest.raises(AnnaInputError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:2: ") and "UTF-8" in str(info.value) and "0xe9" in str(info.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    assert load_config(write(tmp_path, "\ufeffNUM_PX: 5\n".encode("utf-8"))).num_px == 5


def test_line_without_colon(tmp_path):
    message = error_of(tmp_path, "NUM_PX: 5\nFC1_OUTDIM = 5\n")
    assert message == f"{tmp_path / 'run.param'}:2: expected 'KEY: value' (use ':' not '=') (got 'FC1_OUTDIM = 5')"


def test_missing_key_name(tmp_path):
    message = error_of(tmp_path, ": 5\n")
    assert message.startswith(f"{tmp_path / 'run.param'}:1: missing key name") and "': 5'" in message


def test_control_characters_rejected(tmp_path):
    message = error_of(tmp_path, "SAVE_LOC: a\x00b\n")
    assert f"{tmp_path / 'run.param'}:1: SAVE_LOC:" in message and "U+0000" in message


def test_unknown_key_suggests_closest(tmp_path):
    message = error_of(tmp_path, "NUM_PX: 5\nLEARNING_RATE1: 0.1\n")
    assert message == (f"{tmp_path / 'run.param'}:2: LEARNING_RATE1: unknown key; did you mean LEARN_RATE1? "
                       "(got '0.1')")


def test_unknown_key_without_close_match(tmp_path):
    message = error_of(tmp_path, "ZZZZ: 1\n")
    assert message.startswith(f"{tmp_path / 'run.param'}:1: ZZZZ: unknown key") and "did you mean" not in message


def test_duplicate_key_names_both_lines(tmp_path):
    message = error_of(tmp_path, "NUM_PX: 5\nFC1_OUTDIM: 3\nNUM_PX: 7\n")
    assert message.startswith(f"{tmp_path / 'run.param'}:3: NUM_PX: duplicate key")
    assert "line 1" in message and "line 3" in message and message.endswith("(got '7')")


def test_duplicate_through_alias(tmp_path):
    message = error_of(tmp_path, "NUM_PX: 5\nNUM_PIX: 7\n")
    assert ":2: NUM_PIX: duplicate key" in message and "NUM_PX" in message and "line 1" in message


@pytest.mark.parametrize("line, expected", [
    ("NUM_PX: abc", "NUM_PX: expected a positive integer (got 'abc')"),
    ("NUM_PX: 12.5", "NUM_PX: expected a positive integer (got '12.5')"),
    ("NUM_PX: 0", "NUM_PX: must be a positive integer (a count) (got '0')"),
    ("BATCH_SIZE1: -3", "BATCH_SIZE1: must be a positive integer (a count) (got '-3')"),
    ("NUM_PX: 99999999999", "NUM_PX: must be a positive integer (got '99999999999')"),
    ("LEARN_RATE1: fast", "LEARN_RATE1: expected a number > 0"),
    ("LEARN_RATE1: 0", "LEARN_RATE1: must be a number > 0 (got '0')"),
    ("LEARN_RATE1: nan", "LEARN_RATE1: expected a number > 0"),
    ("MAGIC_NUMBER: 1e999", "MAGIC_NUMBER: expected a number (number too large) (got '1e999')"),
    ("KEEP_PROB1: 0", "KEEP_PROB1: probability must be in (0, 1] (got '0')"),
    ("KEEP_PROB2: 1.5", "KEEP_PROB2: probability must be in (0, 1] (got '1.5')"),
    ("DO_TRAIN2: maybe", "DO_TRAIN2: expected YES or NO (or TRUE/FALSE) (got 'maybe')"),
    ("REL_CONT_E_TRAIN: 0.01, -0.01", "REL_CONT_E_TRAIN: range given high-to-low; write the low value first"),
    ("REL_CONT_E_TRAIN: 0.01", "REL_CONT_E_TRAIN: expected two numbers 'low, high' (1 values)"),
    ("SN_RANGE_TRAIN: 0, 100", "SN_RANGE_TRAIN: signal-to-noise must be positive (got '0, 100')"),
    ("SN_RANGE_TEST: -5, 100", "SN_RANGE_TEST: signal-to-noise must be positive (got '-5, 100')"),
    ("CONV1_SHAPE: 2, 45, 1, 10", "CONV1_SHAPE: the first and third numbers must be 1"),
    ("CONV2_SHAPE: 1, 45, 10", "CONV2_SHAPE: expected four integers '1, width, 1, kernels' (3 values)"),
    ("CONV1_SHAPE: 1, 0, 1, 10", "CONV1_SHAPE: kernel width and number of kernels must be positive"),
    ("MIN_PARAMS: 1, x", "MIN_PARAMS: expected comma-separated numbers; item 2 'x': not a number"),
    ("MAX_PARAMS: 1,, 2", "MAX_PARAMS: empty item in comma-separated list (got '1,, 2')"),
    ("OUTPUT_NAMES: a, b, a", "OUTPUT_NAMES: names must be distinct; repeated: a"),
    ("CORRECTION_DEGREE: 6", "CORRECTION_DEGREE: must be an integer from 0 to 5 (got '6')"),
    ("SEED: -1", "SEED: must be an integer from 0 to 4294967295 (got '-1')"),
    ("INPUT_CENTERING: median", "INPUT_CENTERING: expected one of ONE, MEAN (got 'median')"),
    ("INFER_MODE: spectra", "INFER_MODE: expected one of DEBUG, MS_FITS, TEXT, FITS (got 'spectra')"),
    ("RANGE_MARGIN: -0.1", "RANGE_MARGIN: must be a number >= 0 (got '-0.1')"),
])
def test_type_errors_name_file_line_key_value(tmp_path, line, expected):
    message = error_of(tmp_path, "# first line\n" + line + "\n")
    assert message.startswith(f"{tmp_path / 'run.param'}:2: ")
    assert expected in message
    assert f"(got '{line.split(':', 1)[1].strip()}')" in message


def test_all_load_problems_reported_at_once(tmp_path):
    with pytest.raises(AnnaInputError) as info:
        load_text(tmp_path, "NUM_PX: x\nBOGUS: 1\nKEEP_PROB1: 2\nNUM_PX: 3\nno colon here\n")
    lines = str(info.value).split("\n")
    assert [line.split(": ")[0].rsplit(":", 1)[1] for line in lines] == ["1", "2", "3", "4", "5"]
    assert len(info.value.problems) == 5


def test_list_lengths_must_match_num_outs(tmp_path):
    message = error_of(tmp_path, "NUM_OUTS: 3\nOUTPUT_NAMES: a, b, c\nMIN_PARAMS: 1, 2\nMAX_PARAMS: 5, 6, 7, 8\n")
    path = tmp_path / "run.param"
    assert f"{path}:3: MIN_PARAMS: has 2 values but NUM_OUTS is 3 (got '1, 2')" in message
    assert f"{path}:4: MAX_PARAMS: has 4 values but NUM_OUTS is 3 (got '5, 6, 7, 8')" in message
    assert "OUTPUT_NAMES" not in message


def test_list_lengths_must_match_each_other_without_num_outs(tmp_path):
    message = error_of(tmp_path, "MIN_PARAMS: 1, 2\nMAX_PARAMS: 5, 6, 7\n")
    assert f"{tmp_path / 'run.param'}:2: MAX_PARAMS: has 3 values but MIN_PARAMS has 2" in message


def test_min_must_be_below_max(tmp_path):
    message = error_of(tmp_path, "OUTPUT_NAMES: teff, logg, feh\nMIN_PARAMS: 4000, 5.0, 0.1\n"
                                 "MAX_PARAMS: 7000, 5.0, -0.5\n")
    assert message.startswith(f"{tmp_path / 'run.param'}:2: MIN_PARAMS: must be below MAX_PARAMS")
    assert "item 2 (logg): min 5 >= max 5" in message and "item 3 (feh): min 0.1 >= max -0.5" in message
    assert "item 1" not in message and message.endswith("(got '4000, 5.0, 0.1')")


# ------------------------------------------------------------------------------------------------ overrides


def test_overrides_replace_file_values(tmp_path):
    cfg = load_text(tmp_path, TRAIN_MINIMAL, overrides=["NUM_PX=80", "do_train2=no", "SEED = 7"])
    assert cfg.num_px == 80 and cfg.do_train2 is False and cfg.seed == 7
    assert cfg.was_set("SEED") and cfg.line_of("NUM_PX") is None and cfg.line_of("NUM_OUTS") == 2


def test_override_later_wins_and_empty_resets(tmp_path):
    cfg = load_text(tmp_path, "FC1_OUTDIM: 64\n", overrides=["FC2_OUTDIM=3", "FC2_OUTDIM=4", "FC1_OUTDIM="])
    assert cfg.fc2_outdim == 4 and cfg.fc1_outdim == 128 and not cfg.was_set("FC1_OUTDIM")


def test_override_paths_resolve_against_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "params"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(folder, "SAVE_LOC: model\n"), ["LOG_LOC=logs"])
    assert cfg.save_loc == str(folder / "model") and cfg.log_loc == str(tmp_path / "logs")


def test_override_errors_say_set(tmp_path):
    message = error_of(tmp_path, "NUM_PX: 5\n", overrides=["NUM_PX=zero", "KEEP_PROB=0.5", "NUM_OUTS"])
    lines = message.split("\n")
    assert lines[0] == "--set: NUM_PX: expected a positive integer (got 'zero')"
    assert lines[1] == "--set: KEEP_PROB: unknown key; did you mean KEEP_PROB1 or KEEP_PROB2? (got '0.5')"
    assert lines[2] == "--set: expected KEY=VALUE (got 'NUM_OUTS')"


def test_stage_errors_point_at_set_for_overridden_keys(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "frozen.model").write_text("x")
    cfg = load_text(tmp_path, INFER_MINIMAL, overrides=[f"DEBUG_DATA={tmp_path / 'missing.pack'}"])
    message = stage_error(cfg, "infer")
    assert message.startswith("--set: DEBUG_DATA: file not found")


# ------------------------------------------------------------------------------------------------ stages


def test_train_requirements_listed_together(tmp_path):
    cfg = load_text(tmp_path, "FC1_OUTDIM: 64\n")
    message = stage_error(cfg, "train", check_paths=False)
    path = tmp_path / "run.param"
    for key in ("NUM_PX", "NUM_OUTS", "TRAINING_DATA", "SAVE_LOC", "OUTPUT_NAMES", "MIN_PARAMS", "MAX_PARAMS"):
        assert f"{path}: {key}: required for training, but not given" in message.split("\n")
    assert f"{path}: SN_TEMPLATE: required for training when PREPROCESS_TRAIN is YES, but not given" in message
    assert f"{path}: LOG_LOC: required for training when TBOARD_OUTPUT is YES, but not given" in message
    assert "XVAL_DATA" not in message and "TEST_" not in message and "INFER" not in message


def test_required_key_given_empty_points_at_its_line(tmp_path):
    cfg = load_text(tmp_path, TRAIN_MINIMAL.replace("NUM_PX: 50", "NUM_PX:"))
    message = stage_error(cfg, "train", check_paths=False)
    assert message == f"{tmp_path / 'run.param'}:1: NUM_PX: required for training, but empty (got '')"


def test_minimal_train_file_passes(tmp_path):
    validate_for_stage(load_text(tmp_path, TRAIN_MINIMAL), "train", check_paths=False)


@pytest.mark.parametrize("extra, missing", [
    ("PREPROCESS_TRAIN: NO\nTRAINING_XVAL: YES\nXVAL_DATA: x.pack\n",
     "SN_TEMPLATE: required for training when TRAINING_XVAL is YES and PREPROCESS_XVAL is YES"),
    ("TRAINING_XVAL: YES\n", "XVAL_DATA: required for training when TRAINING_XVAL is YES"),
    ("TBOARD_OUTPUT: NO\nTIMELINE_OUTPUT: YES\n", "LOG_LOC: required for training when TIMELINE_OUTPUT is YES"),
])
def test_conditional_train_requirements(tmp_path, extra, missing):
    text = "\n".join(line for line in TRAIN_MINIMAL.splitlines()
                     if not line.startswith(("SN_TEMPLATE", "LOG_LOC"))) + "\n" + extra
    message = stage_error(load_text(tmp_path, text), "train", check_paths=False)
    assert f"{tmp_path / 'run.param'}: {missing}, but not given" in message.split("\n")


def test_no_log_loc_needed_without_logging_or_sn_template_without_preprocessing(tmp_path):
    text = "\n".join(line for line in TRAIN_MINIMAL.splitlines()
                     if not line.startswith(("SN_TEMPLATE", "LOG_LOC")))
    text += "\nTBOARD_OUTPUT: NO\nPREPROCESS_TRAIN: NO\n"
    validate_for_stage(load_text(tmp_path, text), "train", check_paths=False)


def test_kernel_wider_than_spectrum(tmp_path):
    cfg = load_text(tmp_path, TRAIN_MINIMAL + "CONV1_SHAPE: 1, 60, 1, 4\n")
    message = stage_error(cfg, "train", check_paths=False)
    assert message == (f"{tmp_path / 'run.param'}:10: CONV1_SHAPE: convolution 1: kernel width 60 exceeds the 50 "
                       f"pixels that reach it (NUM_PX 50) (got '1, 60, 1, 4')")


def test_test_stage_requirements(tmp_path):
    cfg = load_text(tmp_path, "PREPROCESS_TEST: YES\n")
    message = stage_error(cfg, "test", check_paths=False)
    path = tmp_path / "run.param"
    for key in ("TEST_MODEL_LOC", "TEST_SAVE_LOC", "TESTING_DATA"):
        assert f"{path}: {key}: required for testing, but not given" in message
    for key in ("SN_TEMPLATE_TEST", "REL_CONT_E_TEST", "SN_RANGE_TEST"):
        assert f"{path}: {key}: required for testing when PREPROCESS_TEST is YES, but not given" in message
    assert "NUM_PX" not in message and "MIN_PARAMS" not in message


def test_infer_does_not_need_training_keys(tmp_path):
    cfg = load_text(tmp_path, INFER_MINIMAL)
    validate_for_stage(cfg, "infer", check_paths=False)
    assert cfg.num_px is None and cfg.min_params is None
    message = stage_error(cfg, "train", check_paths=False)
    assert "NUM_PX: required for training" in message


def test_infer_requires_model_and_save_locations(tmp_path):
    message = stage_error(load_text(tmp_path, "INFER_MODE: DEBUG\nDEBUG_DATA: d.pack\n"), "infer",
                          check_paths=False)
    assert message.split("\n") == [
        f"{tmp_path / 'run.param'}: INFER_MODEL_LOC: required for inference, but not given",
        f"{tmp_path / 'run.param'}: INFER_SAVE_LOC: required for inference, but not given"]


def test_unknown_stage_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        validate_for_stage(load_text(tmp_path, INFER_MINIMAL), "deploy")


# ------------------------------------------------------------------------------------------------ infer modes

LOCATIONS = "INFER_MODEL_LOC: model\nINFER_SAVE_LOC: out\n"


@pytest.mark.parametrize("text, mode", [
    ("INFER_MODE: debug\nDEBUG_DATA: d.pack\n", "DEBUG"),
    ("INFER_MODE: MS_FITS\nMS_FITS_IMAGE: s.fits\n", "MS_FITS"),
    ("INFER_MODE: TEXT\nTEXT_IMAGE: s.txt\n", "TEXT"),
    ("INFER_MODE: TEXT\nINFER_FILES: spectra/*.txt\n", "TEXT"),
    ("INFER_MODE: FITS\nINFER_FILES: spectra/*.fits\n", "FITS"),
    ("DEBUG_MODE: YES\nDEBUG_DATA: d.pack\n", "DEBUG"),
    ("SINGLE_MS_MODE: YES\nMS_FITS_IMAGE: s.fits\n", "MS_FITS"),
    ("DEBUG_MODE: YES\nSINGLE_MS_MODE: YES\nDEBUG_DATA: d.pack\n", "DEBUG"),
    ("DEBUG_MODE: NO\nSINGLE_MS_MODE: YES\nINFER_MODE: MS_FITS\nMS_FITS_IMAGE: s.fits\n", "MS_FITS"),
    ("DEBUG_MODE: NO\nSINGLE_MS_MODE: NO\nINFER_MODE: FITS\nINFER_FILES: a.list\n", "FITS"),
    ("INFER_FILES: spectra/*.fits\n", "FITS"),
])
def test_infer_mode_resolution(tmp_path, text, mode):
    cfg = load_text(tmp_path, LOCATIONS + text)
    assert cfg.infer_mode == mode and mode in INFER_MODES
    validate_for_stage(cfg, "infer", check_paths=False)


@pytest.mark.parametrize("text, flag", [
    ("DEBUG_MODE: YES\nINFER_MODE: MS_FITS\n", "DEBUG_MODE: YES means DEBUG"),
    ("SINGLE_MS_MODE: YES\nINFER_MODE: TEXT\n", "SINGLE_MS_MODE: YES means MS_FITS"),
    ("DEBUG_MODE: NO\nINFER_MODE: DEBUG\n", "DEBUG_MODE is NO"),
    ("SINGLE_MS_MODE: no\nINFER_MODE: ms_fits\n", "SINGLE_MS_MODE is NO"),
])
def test_infer_mode_styles_disagree(tmp_path, text, flag):
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'run.param'}:2: INFER_MODE: disagrees with the legacy flags")
    assert flag in message


def test_no_infer_mode_says_which_keys_choose_it(tmp_path):
    cfg = load_text(tmp_path, LOCATIONS + "DEBUG_DATA: d.pack\n")
    assert cfg.infer_mode is None
    message = stage_error(cfg, "infer", check_paths=False)
    assert message.startswith(f"{tmp_path / 'run.param'}: INFER_MODE: no inference input chosen")
    for key in ("INFER_MODE", "DEBUG_MODE", "SINGLE_MS_MODE", "INFER_FILES"):
        assert key in message


@pytest.mark.parametrize("text, expected", [
    ("INFER_MODE: DEBUG\n", "DEBUG_DATA: required for DEBUG inference (chosen by INFER_MODE; give DEBUG_DATA)"),
    ("SINGLE_MS_MODE: YES\n", "MS_FITS_IMAGE: required for MS_FITS inference (chosen by SINGLE_MS_MODE; "
                              "give MS_FITS_IMAGE or INFER_FILES)"),
    ("INFER_MODE: TEXT\n", "TEXT_IMAGE: required for TEXT inference (chosen by INFER_MODE; "
                           "give TEXT_IMAGE or INFER_FILES)"),
    ("INFER_MODE: FITS\n", "INFER_FILES: required for FITS inference (chosen by INFER_MODE; give INFER_FILES)"),
])
def test_infer_mode_needs_its_input_key(tmp_path, text, expected):
    message = stage_error(load_text(tmp_path, LOCATIONS + text), "infer", check_paths=False)
    assert message == f"{tmp_path / 'run.param'}: {expected}, but not given"


# ------------------------------------------------------------------------------------------------ paths


def test_missing_input_files_reported_with_lines(tmp_path):
    cfg = load_text(tmp_path, TRAIN_MINIMAL + "TRAINING_XVAL: YES\nXVAL_DATA: xv.pack\n")
    message = stage_error(cfg, "train")
    path = tmp_path / "run.param"
    assert message.split("\n") == [
        f"{path}:3: TRAINING_DATA: file not found: {tmp_path / 'data' / 'train.pack'} (got 'data/train.pack')",
        f"{path}:8: SN_TEMPLATE: file not found: {tmp_path / 'sn.template'} (got 'sn.template')",
        f"{path}:11: XVAL_DATA: file not found: {tmp_path / 'xv.pack'} (got 'xv.pack')"]


def test_existing_inputs_pass_and_output_folders_need_not_exist(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.pack").write_bytes(b"")
    (tmp_path / "sn.template").write_text("1 1\n")
    cfg = load_text(tmp_path, TRAIN_MINIMAL)
    assert not os.path.exists(cfg.save_loc)
    validate_for_stage(cfg, "train")


def test_output_location_that_is_a_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.pack").write_bytes(b"")
    (tmp_path / "sn.template").write_text("1 1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model").write_text("not a folder")
    message = stage_error(load_text(tmp_path, TRAIN_MINIMAL), "train")
    assert message == (f"{tmp_path / 'run.param'}:4: SAVE_LOC: exists but is not a folder: "
                       f"{tmp_path / 'out' / 'model'} (got 'out/model')")


def test_input_that_is_a_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "frozen.model").write_text("x")
    (tmp_path / "debug.pack").mkdir()
    message = stage_error(load_text(tmp_path, INFER_MINIMAL), "infer")
    assert message == f"{tmp_path / 'run.param'}:4: DEBUG_DATA: is a folder, not a file: {tmp_path / 'debug.pack'} " \
                      "(got 'debug.pack')"


def test_model_folder_must_hold_frozen_model(tmp_path):
    (tmp_path / "debug.pack").write_bytes(b"")
    message = stage_error(load_text(tmp_path, INFER_MINIMAL), "infer")
    assert message == f"{tmp_path / 'run.param'}:1: INFER_MODEL_LOC: folder not found: {tmp_path / 'model'} " \
                      "(got 'model')"
    (tmp_path / "model").mkdir()
    message = stage_error(load_text(tmp_path, INFER_MINIMAL), "infer")
    assert message.startswith(f"{tmp_path / 'run.param'}:1: INFER_MODEL_LOC: no frozen.model in")
    (tmp_path / "model" / "frozen.model").write_text("x")
    validate_for_stage(load_text(tmp_path, INFER_MINIMAL), "infer")
    # the frozen-model file itself is accepted too, as the model loader does
    validate_for_stage(load_text(tmp_path, INFER_MINIMAL.replace("LOC: model", "LOC: model/frozen.model")),
                       "infer")


def test_infer_files_glob_and_list(tmp_path):
    spectra = tmp_path / "spectra"
    spectra.mkdir()
    for name in ("b.fits", "a.fits", "c.txt"):
        (spectra / name).write_bytes(b"SIMPLE  =                    T")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "frozen.model").write_text("x")
    cfg = load_text(tmp_path, LOCATIONS + "INFER_FILES: spectra/*.fits\n")
    assert expand_infer_files(cfg) == [str(spectra / "a.fits"), str(spectra / "b.fits")]
    validate_for_stage(cfg, "infer")

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "inputs.list").write_text("# inputs\nspectra/c.txt\n\n" + str(spectra / "a.fits") + "\n")
    cfg = load_text(tmp_path, LOCATIONS + "INFER_MODE: FITS\nINFER_FILES: lists/inputs.list\n")
    assert expand_infer_files(cfg) == [str(spectra / "c.txt"), str(spectra / "a.fits")]

    (lists / "inputs.list").write_text("spectra/gone.fits\nspectra/a.fits\nspectra/also_gone.fits\n")
    message = stage_error(cfg, "infer")
    assert message.split("\n") == [
        f"{lists / 'inputs.list'}:1: input file not found: {spectra / 'gone.fits'} (got 'spectra/gone.fits')",
        f"{lists / 'inputs.list'}:3: input file not found: {spectra / 'also_gone.fits'} "
        "(got 'spectra/also_gone.fits')"]

    cfg = load_text(tmp_path, LOCATIONS + "INFER_FILES: spectra/*.nothing\n")
    assert stage_error(cfg, "infer") == (f"{tmp_path / 'run.param'}:3: INFER_FILES: no file matches "
                                         f"{spectra / '*.nothing'} (got 'spectra/*.nothing')")


def test_infer_files_naming_one_spectrum(tmp_path):
    (tmp_path / "star.txt").write_text("6600.0 0.98\n6600.2 0.97\n")
    (tmp_path / "star.fits").write_bytes(b"SIMPLE  =                    T")
    for name in ("star.txt", "star.fits"):
        cfg = load_text(tmp_path, LOCATIONS + f"INFER_MODE: TEXT\nINFER_FILES: {name}\n")
        assert expand_infer_files(cfg) == [str(tmp_path / name)]


# ------------------------------------------------------------------------------------------------ Config


def test_config_is_immutable_and_serialisable(tmp_path):
    cfg = load_text(tmp_path, TRAIN_MINIMAL)
    with pytest.raises(AttributeError):
        cfg.num_px = 3
    with pytest.raises(AttributeError):
        cfg.source = "x"
    with pytest.raises(AttributeError):
        del cfg.num_px
    with pytest.raises(AttributeError, match="did you mean 'num_px'"):
        cfg.num_pxx
    assert isinstance(cfg.output_names, tuple)
    data = cfg.as_dict()
    assert sorted(data) == sorted(known_keys())
    assert json.loads(json.dumps(data)) == data
    data["NUM_PX"] = 1
    assert cfg.num_px == 50
    assert pickle.loads(pickle.dumps(cfg)) == cfg and pickle.loads(pickle.dumps(cfg)).line_of("NUM_PX") == 1


def test_known_keys_cover_table_and_are_unique():
    keys = known_keys()
    assert len(keys) == len(set(keys)) == len(KEY_TABLE)
    assert keys[0] == "NUM_PX" and "INFER_MODE" in keys and "NUM_PIX" not in keys
    for spec in KEY_TABLE:
        assert spec.doc and set(spec.stages) <= {"train", "test", "infer", "tune"}
        assert set(spec.required_for) <= set(spec.stages)


# ------------------------------------------------------------------------------------------------ example


def test_example_file_loads_and_validates_for_every_stage():
    cfg = load_config(EXAMPLE)
    for stage in ("train", "test", "infer"):
        validate_for_stage(cfg, stage, check_paths=False)
    base = str(REPO_ROOT)
    assert cfg.training_data == os.path.join(base, "example_data", "train.pack")
    assert cfg.sn_template == os.path.join(base, "templates", "sn.hydra.template")
    assert cfg.output_names == ("teff", "logg", "feh", "vmic", "vsini")
    assert cfg.min_params == (4000.0, 2.7, -0.5, 0.0, 0.0) and cfg.max_params == (7000.0, 4.8, 0.2, 3.0, 40.0)
    assert cfg.num_px == 1001 and cfg.infer_mode == "MS_FITS" and cfg.num_outs == 5


def test_example_file_documents_every_key_in_table_order():
    keys = [line.split(":", 1)[0] for line in EXAMPLE.read_text().splitlines()
            if line[:1].isalpha()]
    assert keys == known_keys()
    for line in EXAMPLE.read_text().splitlines():
        if line[:1].isalpha():
            assert "#" in line, f"no comment on {line!r}"


# ------------------------------------------------------------------------------------------------ fuzz

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def parse_or_input_error(path, overrides=()):
    """load + validate must either succeed or raise AnnaInputError; anything else fails the test."""
    try:
        cfg = load_config(path, overrides)
    except AnnaInputError as error:
        assert str(error)
        return None
    assert isinstance(cfg, Config)
    json.dumps(cfg.as_dict())
    for stage in ("train", "test", "infer"):
        for check_paths in (False, True):
            try:
                validate_for_stage(cfg, stage, check_paths=check_paths)
            except AnnaInputError as error:
                assert str(error)
    return cfg


@FUZZ
@given(st.text())
def test_fuzz_random_text(tmp_path, text):
    parse_or_input_error(write(tmp_path, text))


@FUZZ
@given(st.binary())
def test_fuzz_random_bytes(tmp_path, data):
    parse_or_input_error(write(tmp_path, data))


_EXAMPLE_LINES = EXAMPLE.read_text().splitlines()
_NASTY = st.sampled_from(["", ":", "#", ",", "=", " ", "\t", "\x00", "\r", "nan", "-0", "1e999", "yes", "**",
                          "~", "/", "..", "\u00e9", "\ud800", "1, 2", "0", "-1", "99999999999999999999"])
_FRAGMENT = st.one_of(_NASTY, st.text(max_size=12))


@st.composite
def mutated_example(draw):
    lines = list(_EXAMPLE_LINES)
    for _ in range(draw(st.integers(1, 6))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "duplicate", "value", "insert", "key", "splice"]))
        line = lines[index]
        if action == "drop":
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, line)
        elif action == "value" and ":" in line:
            lines[index] = line.split(":", 1)[0] + ": " + draw(_FRAGMENT)
        elif action == "insert":
            lines.insert(index, draw(_FRAGMENT))
        elif action == "key" and ":" in line:
            lines[index] = draw(_FRAGMENT) + ":" + line.split(":", 1)[1]
        else:
            cut = draw(st.integers(0, len(line)))
            lines[index] = line[:cut] + draw(_FRAGMENT) + line[cut:]
        if not lines:
            lines = [""]
    overrides = draw(st.lists(st.one_of(
        st.builds(lambda key, value: f"{key}={value}", st.sampled_from(known_keys()), _FRAGMENT), _FRAGMENT),
        max_size=3))
    return "\n".join(lines) + "\n", overrides


@FUZZ
@given(mutated_example())
def test_fuzz_mutated_example(tmp_path, case):
    text, overrides = case
    path = tmp_path / "run.param"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    parse_or_input_error(path, overrides)


def test_unmutated_example_parses_in_fuzz_harness(tmp_path):
    path = write(tmp_path, EXAMPLE.read_text())
    assert parse_or_input_error(path) is not None


def test_shuffled_valid_lines_still_parse(tmp_path):
    lines = [line for line in _EXAMPLE_LINES if line.strip()]
    random.Random(3).shuffle(lines)
    cfg = load_config(write(tmp_path, "\n".join(lines)))
    assert cfg.num_px == 1001


def test_resume_neutral_keys_are_the_keys_training_does_not_read_plus_the_marked_ones():
    from anna.params import KEY_TABLE, TRAIN, resume_neutral_keys

    neutral = resume_neutral_keys()
    # a key anna-test or anna-infer alone reads may change between a killed training run and its resume ...
    assert {"TESTING_DATA", "INFER_SAVE_LOC", "MAX_REL_SIGMA", "APPLY_CORRECTION"} <= neutral
    # ... and so may the training keys that only say where logs go, how many threads, how long to run
    assert {"LOG_LOC", "TBOARD_OUTPUT", "MAX_MINUTES1", "MAX_MINUTES2", "XV_THREADS", "RESUME"} <= neutral
    # but nothing that decides what training computes
    assert not {"LEARN_RATE1", "BATCH_SIZE1", "SEED", "CONV_LAYERS", "LR_SCHEDULE", "LR_DECAY_START",
                "TRAINING_DATA", "SN_RANGE_TRAIN", "JIT_COMPILE", "NUM_PX"} & neutral
    assert all(spec.name in neutral for spec in KEY_TABLE if TRAIN not in spec.stages)
