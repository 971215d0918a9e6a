"""Which packs anna-train holds in RAM: min(cap, fraction x available memory) of float32 flux, else streamed."""

import numpy as np
import pytest

from anna.augment import (RESIDENT_MEMORY_FRACTION, RESIDENT_PACK_CAP, PackRows, memory_available_bytes,
                          resident_limit_bytes)
from anna.packs import open_pack, write_pack

NPIX, N_STARS = 30, 40
FLUX_BYTES = NPIX * N_STARS * 4  # float32 flux of the tiny pack


@pytest.fixture
def tiny_pack(tmp_path):
    rng = np.random.default_rng(2)
    wave = np.linspace(6000.0, 6029.0, NPIX)
    labels = np.c_[np.arange(N_STARS, dtype=float), rng.uniform(1, 2, N_STARS)]
    flux = rng.uniform(0.5, 1.0, (N_STARS, NPIX))
    write_pack(tmp_path / "tiny.pack", wave, np.arange(1, N_STARS + 1), labels, flux)
    return open_pack(tmp_path / "tiny.pack")


def test_limit_is_the_cap_when_memory_is_plentiful_or_unknown():
    assert resident_limit_bytes(None) == RESIDENT_PACK_CAP
    assert resident_limit_bytes(64 << 30) == RESIDENT_PACK_CAP
    assert resident_limit_bytes(None, cap=1000) == 1000


def test_limit_is_a_fraction_of_available_memory_on_small_machines():
    available = 1 << 30  # 1 GiB available: an eighth of it is below the 256 MiB cap
    assert resident_limit_bytes(available) == int(RESIDENT_MEMORY_FRACTION * available)
    assert resident_limit_bytes(available) < RESIDENT_PACK_CAP
    assert resident_limit_bytes(800, cap=1000, fraction=0.5) == 400
    assert resident_limit_bytes(0) == 0


def test_limit_keeps_the_benchmark_packs_within_two_gigabytes():
    # a 1,000,000-star pack of 1001 pixels (8 GB on disk) and a 250,000-star one are streamed on any machine
    for n_stars in (250_000, 1_000_000):
        assert n_stars * 1001 * 4 > resident_limit_bytes(64 << 30)
    # the tutorial's 5000-star pack stays in RAM on a machine with 1 GiB available
    assert 5000 * 1001 * 4 <= resident_limit_bytes(1 << 30)


def test_memory_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:    2097152 kB\n")
    assert memory_available_bytes(meminfo) == 2097152 * 1024
    meminfo.write_text("MemTotal:       24576000 kB\n")
    assert memory_available_bytes(meminfo) is None
    assert memory_available_bytes(tmp_path / "absent") is None
    meminfo.write_text("MemAvailable: lots\n")
    assert memory_available_bytes(meminfo) is None


def test_pack_at_the_limit_is_resident_and_one_byte_more_is_streamed(tiny_pack):
    at_limit = PackRows(tiny_pack, resident_bytes=resident_limit_bytes(None, cap=FLUX_BYTES))
    below = PackRows(tiny_pack, resident_bytes=resident_limit_bytes(8 * (FLUX_BYTES - 1), cap=10 * FLUX_BYTES))
    assert at_limit.resident
    assert not below.resident and below.resident_bytes == FLUX_BYTES - 1
    indices = np.array([0, 39, 7, 7, 12])
    flux_a, labels_a = at_limit.gather(indices)
    flux_b, labels_b = below.gather(indices)
    np.testing.assert_array_equal(flux_a, flux_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    np.testing.assert_array_equal(flux_a, np.asarray(tiny_pack.flux[indices], dtype=np.float32))
    np.testing.assert_array_equal(labels_a, tiny_pack.labels[indices])


def test_default_applies_the_rule_of_this_machine(tiny_pack):
    rows = PackRows(tiny_pack)  # resident_bytes None: min(cap, fraction x MemAvailable) at construction
    assert 0 < rows.resident_bytes <= RESIDENT_PACK_CAP
    assert rows.resident  # a few kB fit under the limit of any machine that can run anna-train
