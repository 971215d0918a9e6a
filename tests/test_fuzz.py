"""Fuzz tests: damaged inputs may only ever end in AnnaInputError (one line naming the file), never another
exception, and whatever is accepted is fully usable.

* The pack reader, on random bytes and on mutated valid packs (flipped bytes, truncations, extensions,
  float32 and big-endian rewrites, NaN/inf and odd values injected into header, wavelengths, labels or flux).
* The parameter file read for a stage (``load_config(..., stage=...)``, what the console entry points call):
  on mutated copies of ANNA.param.example it lists the file's own problems first, then the stage's, and adds
  nothing to a file that loads cleanly.  (Plain ``load_config`` is fuzzed in test_params.py.)

The number of examples per test comes from ANNA_FUZZ_EXAMPLES (default 200).
"""

import itertools
import os
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anna.errors import AnnaInputError
from anna.packs import PACK_DTYPE, open_pack
from anna.params import load_config, validate_for_stage
from test_params import mutated_example

FUZZ_EXAMPLES = int(os.environ.get("ANNA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values that sit on the edges of the reader's rules: zero, negative, fractional, just past int32, past 2**53,
# not finite, subnormal, negative zero.
ODD_VALUES = (0.0, -0.0, -1.0, 0.5, 1.0, 2.0, 3.0, 2.0**31, 2.0**53 + 2, 1e300, -1e300, 5e-324, np.nan, np.inf,
              -np.inf)
OPEN_OPTIONS = (
    {},
    {"check_flux": True, "missing_label_value": -9999.0},
    {"check_labels": False, "max_stars": 2},
)


# ----------------------------------------------------------------------------------------------------------
# Packs


def valid_pack_bytes(n_stars, npix, nout, seed):
    """A valid little-endian float64 pack of random content: header, ascending wavelengths, stars."""
    rng = np.random.default_rng(seed)
    wave = 6000.0 + np.cumsum(rng.uniform(0.01, 1.0, npix))
    stars = rng.normal(1.0, 0.5, (n_stars, npix + nout + 2))
    stars[:, 0] = np.arange(n_stars) + 1
    return np.concatenate([[npix, nout], wave, stars.ravel()]).astype(PACK_DTYPE).tobytes()


@st.composite
def mutated_packs(draw):
    """(bytes, npix the file was made with) for a valid pack damaged by 1-4 mutations."""
    npix, nout, n_stars = draw(st.integers(1, 12)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    data = bytearray(valid_pack_bytes(n_stars, npix, nout, draw(st.integers(0, 2**32 - 1))))
    for _ in range(draw(st.integers(1, 4))):
        # Value-level damage is listed more than once: byte-level damage nearly always breaks the size rule
        # alone, while the label, flux and wavelength rules need a well-formed size to be reached.
        action = draw(st.sampled_from(["flip", "flip", "truncate", "truncate values", "extend", "extend stars",
                                       "float32", "big-endian", "odd value", "odd value", "odd value", "odd header",
                                       "repeat block"]))
        n_values = len(data) // 8
        if action == "flip" and data:
            where = draw(st.integers(0, len(data) - 1))
            data[where] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif action == "truncate values":
            del data[8 * draw(st.integers(0, n_values)):]
        elif action == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif action == "extend stars":  # whole stars of garbage: still a well-formed size
            data += np.random.default_rng(len(data)).normal(size=(npix + nout + 2) * draw(st.integers(1, 3))).astype(
                PACK_DTYPE).tobytes()
        elif action in ("float32", "big-endian") and n_values:
            values = np.frombuffer(bytes(data[:n_values * 8]), dtype=PACK_DTYPE)
            with np.errstate(over="ignore", invalid="ignore"):  # garbage past float32's range becomes inf
                data = bytearray(values.astype("<f4" if action == "float32" else ">f8").tobytes())
        elif action == "odd value" and n_values:
            where = draw(st.integers(0, n_values - 1))
            data[where * 8:where * 8 + 8] = struct.pack("<d", draw(st.sampled_from(ODD_VALUES)))
        elif action == "odd header" and n_values >= 2:
            where = draw(st.integers(0, 1))
            value = draw(st.one_of(st.sampled_from(ODD_VALUES), st.integers(-3, 40).map(float)))
            data[where * 8:where * 8 + 8] = struct.pack("<d", value)
        elif action == "repeat block" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[start:start] = data[start:start + draw(st.integers(1, 64))]
    return bytes(data), npix


def check_open(path, **options):
    """open_pack must return a usable Pack or raise AnnaInputError; returns the Pack or None."""
    try:
        pack = open_pack(path, **options)
    except AnnaInputError as error:
        message = str(error)
        assert message.startswith(str(path)) and "\n" not in message, message
        return None
    assert pack.npix >= 1 and pack.nout >= 1 and pack.n_stars >= 1
    if options.get("max_stars") is None:
        assert os.path.getsize(path) == 8 * (2 + pack.npix + pack.n_stars * pack.star_length)
    else:
        assert pack.n_stars <= options["max_stars"]
    wave = pack.wavelengths
    assert wave.shape == (pack.npix,) and np.isfinite(wave).all() and (np.diff(wave) > 0).all()
    table = np.array(pack.table)
    assert table.shape == (pack.n_stars, pack.npix + pack.nout + 2)
    np.testing.assert_array_equal(pack.read_block(0, pack.n_stars), table)
    blocks = list(pack.iter_blocks(chunk_stars=2))
    np.testing.assert_array_equal(np.concatenate([flux for *_, flux in blocks]), np.array(pack.flux))
    np.testing.assert_array_equal(np.concatenate([labels for _, _, labels, _ in blocks]), np.array(pack.labels))
    assert np.array(pack.ids).shape == np.array(pack.dummy).shape == (pack.n_stars,)
    if options.get("check_labels", True):
        assert not np.isinf(table[:, 1:1 + pack.nout]).any()
        if options.get("missing_label_value") is None:
            assert not np.isnan(table[:, 1:1 + pack.nout]).any()
    if options.get("check_flux"):
        assert np.isfinite(table[:, 2 + pack.nout:]).all()
        assert pack.count_nonfinite_flux_stars() == 0
    assert repr(pack).startswith("Pack(")
    return pack


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_pack_random_bytes(tmp_path, data):
    path = tmp_path / "random.pack"
    path.write_bytes(data)
    for options in OPEN_OPTIONS:
        check_open(path, **options)


_NAMES = itertools.count()


@FUZZ
@given(mutated_packs())
def test_fuzz_pack_mutated(tmp_path, case):
    data, npix = case
    # A fresh name per example: an earlier Pack may still map the previous file.
    path = tmp_path / f"mutated{next(_NAMES)}.pack"
    path.write_bytes(data)
    for options in OPEN_OPTIONS + ({"expected_npix": npix},):
        check_open(path, **options)


def test_unmutated_pack_opens_in_fuzz_harness(tmp_path):
    path = tmp_path / "valid.pack"
    path.write_bytes(valid_pack_bytes(5, 7, 3, seed=1))
    for options in OPEN_OPTIONS:
        assert check_open(path, **options) is not None
    path.write_bytes(valid_pack_bytes(5, 7, 3, seed=1)[:-8])
    assert check_open(path) is None


# ----------------------------------------------------------------------------------------------------------
# Parameter file, read for a stage


def _messages(error):
    lines = str(error).split("\n")
    assert all(line.strip() for line in lines)
    return lines


@FUZZ
@given(mutated_example(), st.sampled_from(["train", "test", "infer"]))
def test_fuzz_stage_load_of_mutated_example(tmp_path, case, stage):
    text, overrides = case
    path = tmp_path / "run.param"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    try:
        cfg = load_config(path, overrides)
    except AnnaInputError as error:
        file_problems = _messages(error)
        try:
            load_config(path, overrides, stage=stage)
        except AnnaInputError as staged:
            assert _messages(staged)[:len(file_problems)] == file_problems
        else:
            raise AssertionError("load_config(stage=...) accepted a file that load_config refuses")
        return
    assert load_config(path, overrides, stage=stage) == cfg
    try:
        validate_for_stage(cfg, stage)
    except AnnaInputError as error:
        _messages(error)
