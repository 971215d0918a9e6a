"""Pack format (guide 4.2.1): round trip, every validation rule, memory-mapped access within an RSS budget."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from anna.errors import AnnaInputError
from anna.packs import open_pack, write_pack


def _pack(tmp_path, n=5, npix=4, nout=2, name="p.pack", **kw):
    wave = np.linspace(6600, 6601.5, npix)
    ids = np.arange(n) + 2.0**52 + 1  # needs float64 to survive
    labels = np.arange(n * nout, dtype=float).reshape(n, nout)
    flux = np.random.default_rng(0).normal(1, 0.01, (n, npix))
    path = tmp_path / name
    write_pack(path, wave, ids, labels, flux, dummy=np.full(n, 7.5), **kw)
    return path, wave, ids, labels, flux


def test_round_trip_exact(tmp_path):
    path, wave, ids, labels, flux = _pack(tmp_path)
    pack = open_pack(path, expected_npix=4, expected_nout=2)
    assert (pack.npix, pack.nout, pack.n_stars) == (4, 2, 5)
    np.testing.assert_array_equal(pack.wavelengths, wave)
    np.testing.assert_array_equal(pack.ids, ids)
    assert pack.ids[0] == 2.0**52 + 1
    np.testing.assert_array_equal(pack.labels, labels)
    np.testing.assert_array_equal(pack.flux, flux)
    np.testing.assert_array_equal(pack.dummy, 7.5)
    raw = np.fromfile(path, dtype="<f8")
    assert raw[0] == 4 and raw[1] == 2 and raw.size == 2 + 4 + 5 * (4 + 2 + 2)
    block = pack.read_block(1, 3)
    np.testing.assert_array_equal(block[:, 2 + 2:], flux[1:3])


def test_first_n_stars(tmp_path):
    path, *_ , flux = _pack(tmp_path, n=10)
    pack = open_pack(path, max_stars=3)
    assert pack.n_stars == 3 and pack.flux.shape == (3, 4)
    np.testing.assert_array_equal(pack.flux, flux[:3])


@pytest.mark.parametrize("header, message", [
    ((0, 2), "header npix is not a positive integer"),
    ((4.5, 2), "header npix is not a positive integer"),
    ((4, -1), "header nout is not a positive integer"),
    ((4, np.nan), "header nout is not a positive integer"),
])
def test_bad_header(tmp_path, header, message):
    path = tmp_path / "bad.pack"
    np.array(list(header) + [1.0] * 20, dtype="<f8").tofile(path)
    with pytest.raises(AnnaInputError, match=message) as info:
        open_pack(path)
    assert str(path) in str(info.value)


def test_header_disagrees_with_parameter_file(tmp_path):
    path, *_ = _pack(tmp_path)
    with pytest.raises(AnnaInputError, match=r"header npix=4 but the parameter file says NUM_PX=5"):
        open_pack(path, expected_npix=5)
    with pytest.raises(AnnaInputError, match=r"header nout=2 but the parameter file says NUM_OUTS=3"):
        open_pack(path, expected_nout=3)


def test_truncated_pack_reports_numbers(tmp_path):
    path, *_ = _pack(tmp_path)
    data = np.fromfile(path, dtype="<f8")[:-3]
    data.tofile(path)
    with pytest.raises(AnnaInputError) as info:
        open_pack(path)
    assert "pack holds 43 values; header + 4 stars of 8 values leaves 5 extra" in str(info.value)


def test_zero_stars(tmp_path):
    path = tmp_path / "empty.pack"
    np.array([3, 1, 1.0, 2.0, 3.0], dtype="<f8").tofile(path)
    with pytest.raises(AnnaInputError, match="no stars"):
        open_pack(path)


def test_descending_grid(tmp_path):
    path = tmp_path / "desc.pack"
    np.array([3, 1, 3.0, 2.0, 1.0, 1, 0.5, 0, 1, 1, 1], dtype="<f8").tofile(path)
    with pytest.raises(AnnaInputError, match="not strictly ascending: pixel 1 = 2.0 follows 3.0"):
        open_pack(path)


def test_nonfinite_labels_and_flux(tmp_path):
    path, wave, ids, labels, flux = _pack(tmp_path)
    labels[1, 0] = np.inf
    write_pack(path, wave, ids, labels, flux)
    with pytest.raises(AnnaInputError, match="1 of 5 stars have infinite labels"):
        open_pack(path)
    labels[1, 0] = np.nan
    write_pack(path, wave, ids, labels, flux)
    with pytest.raises(AnnaInputError, match="1 of 5 stars have NaN labels"):
        open_pack(path)
    assert open_pack(path, missing_label_value=-9999.0).n_stars == 5  # NaN = missing label when allowed
    labels[1, 0] = 0
    flux[[0, 3], 2] = np.nan
    write_pack(path, wave, ids, labels, flux)
    assert open_pack(path).count_nonfinite_flux_stars() == 2
    with pytest.raises(AnnaInputError, match="2 of 5 stars have NaN or infinite fluxes"):
        open_pack(path, check_flux=True)


def test_float32_pack_is_recognised(tmp_path):
    path = tmp_path / "f32.pack"
    np.array([4, 1, 1, 2, 3, 4] + [0, 5, 0, 1, 1, 1, 1] * 3, dtype="<f4").tofile(path)
    with pytest.raises(AnnaInputError, match="float32 pack .*must be written as float64"):
        open_pack(path)


def test_big_endian_pack_is_recognised(tmp_path):
    path = tmp_path / "be.pack"
    np.array([4, 1, 1, 2, 3, 4] + [0, 5, 0, 1, 1, 1, 1] * 3, dtype=">f8").tofile(path)
    with pytest.raises(AnnaInputError, match="big-endian"):
        open_pack(path)


def test_missing_file(tmp_path):
    with pytest.raises(AnnaInputError, match="does not exist"):
        open_pack(tmp_path / "nope.pack")


def test_writer_is_atomic_on_failure(tmp_path):
    path, *_ = _pack(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_pack(path, [1.0, 2.0], [1], [[1.0]], [[1.0, 2.0, 3.0]])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_large_pack_opened_and_read_within_rss_budget(tmp_path):
    """A 400 MB pack is opened, validated and sampled by a process whose peak RSS stays far below its size."""
    path = tmp_path / "big.pack"
    npix, nout, n = 1001, 5, 50_000  # 50000 * 1008 * 8 bytes = 403 MB
    with open(path, "wb") as handle:
        np.array([npix, nout], "<f8").tofile(handle)
        np.linspace(6625, 6825, npix).astype("<f8").tofile(handle)
        block = np.ones((5000, npix + nout + 2), "<f8")
        for _ in range(n // 5000):
            block.tofile(handle)
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from anna.packs import open_pack
        from anna.augment import PackRows
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pack = open_pack({str(path)!r}, expected_npix={npix}, check_flux=True)
        rows = PackRows(pack, resident_bytes=0)
        flux, labels = rows.gather(np.random.default_rng(0).integers(0, pack.n_stars, 2000))
        assert flux.shape == (2000, {npix}) and (flux == 1).all()
        assert pack.flux[-1].sum() == {npix}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mb = int(out.stdout.strip().splitlines()[-1])
    assert path.stat().st_size > 400e6
    assert growth_mb < 100, f"peak RSS grew by {growth_mb} MB reading a 403 MB pack"


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path, *_ = _pack(tmp_path)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
