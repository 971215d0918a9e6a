"""Augmentation: noise statistics match sigma = 1/(SN rel_sn), continuum offsets, determinism, queue stream."""

import numpy as np
import pytest

from anna.augment import BatchProducer, NoiseModel, PackRows, noisy_copy
from anna.model import LabelScaler
from anna.packs import open_pack, write_pack


def test_noisy_copy_statistics_match_template():
    npix, n = 50, 20000
    rel = np.linspace(0.5, 1.5, npix)
    flux = np.ones((n, npix))
    noisy, sn = noisy_copy(flux, rel, (100.0, 100.0), (0.0, 0.0), seed=3)
    assert np.all(sn == 100.0)
    expected = 1.0 / (100.0 * rel)
    measured = noisy.std(axis=0)
    # sampling error of a std from n draws is sigma / sqrt(2n) ~ 0.5 %; allow 5 standard errors
    np.testing.assert_allclose(measured, expected, rtol=5 / np.sqrt(2 * n))
    np.testing.assert_allclose(noisy.mean(axis=0), 1.0, atol=5 * expected.max() / np.sqrt(n))


def test_noisy_copy_continuum_offsets_and_sn_range():
    flux = np.ones((5000, 10))
    noisy, sn = noisy_copy(flux, np.ones(10), (1e9, 1e9), (-0.02, 0.01), seed=1)
    scale = noisy.mean(axis=1)  # noise negligible: each spectrum is 1 + delta
    assert scale.min() >= 0.98 - 1e-6 and scale.max() <= 1.01 + 1e-6
    assert scale.mean() == pytest.approx(0.995, abs=0.001)
    _, sn = noisy_copy(flux, np.ones(10), (50, 150), (0, 0), seed=1)
    assert 50 <= sn.min() and sn.max() <= 150 and sn.mean() == pytest.approx(100, abs=2)


def test_noisy_copy_deterministic():
    flux = np.ones((10, 10))
    a, _ = noisy_copy(flux, np.ones(10), (50, 60), (-0.01, 0.01), seed=(4, 2))
    b, _ = noisy_copy(flux, np.ones(10), (50, 60), (-0.01, 0.01), seed=(4, 2))
    c, _ = noisy_copy(flux, np.ones(10), (50, 60), (-0.01, 0.01), seed=(4, 3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture
def flat_pack(tmp_path):
    npix, n = 40, 300
    wave = np.linspace(6000, 6039, npix)
    labels = np.c_[np.arange(n, dtype=float), np.full(n, 5.0)]
    write_pack(tmp_path / "flat.pack", wave, np.arange(n), labels, np.ones((n, npix)))
    return open_pack(tmp_path / "flat.pack")


def _producer(pack, noise, seed=5, resident=True, threads=2):
    rows = PackRows(pack, resident_bytes=1 << 40 if resident else 0)
    return BatchProducer(rows, LabelScaler([0, 0], [300, 10]), noise, batch_size=32, seed=seed, stage=1,
                         threads=threads, fetch=128, depth=256)


def test_producer_noise_matches_template(flat_pack):
    rel = np.linspace(0.6, 1.4, flat_pack.npix)
    noise = NoiseModel(rel, (80.0, 80.0), (0.0, 0.0))
    batches = [b for _, b in zip(range(200), _producer(flat_pack, noise).dataset())]
    flux = np.concatenate([b[0].numpy() for b in batches])
    np.testing.assert_allclose(flux.std(axis=0), 1 / (80 * rel), rtol=5 / np.sqrt(2 * len(flux)))
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert np.all((labels[:, 0] >= 0) & (labels[:, 0] < 1)) and np.allclose(labels[:, 1], 0.5)
    # stars drawn with replacement over the whole pack
    drawn = np.round(labels[:, 0] * 300).astype(int)
    assert len(np.unique(drawn)) > 250


def test_producer_stream_is_deterministic_and_resumable(flat_pack):
    noise = NoiseModel(np.ones(flat_pack.npix), (50.0, 100.0), (-0.01, 0.01))
    first = [b[0].numpy() for _, b in zip(range(10), _producer(flat_pack, noise, threads=2).dataset())]
    again = [b[0].numpy() for _, b in zip(range(10), _producer(flat_pack, noise, threads=1).dataset())]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    resumed = [b[0].numpy() for _, b in zip(range(4), _producer(flat_pack, noise).dataset(start_batch=6))]
    for a, b in zip(first[6:], resumed):
        np.testing.assert_array_equal(a, b)
    other = next(iter(_producer(flat_pack, noise, seed=6).dataset()))[0].numpy()
    assert not np.array_equal(other, first[0])


def test_streamed_and_resident_rows_agree(flat_pack):
    streamed = _producer(flat_pack, None, resident=False)
    resident = _producer(flat_pack, None, resident=True)
    assert not streamed.rows.resident and resident.rows.resident
    a = next(iter(streamed.dataset()))
    b = next(iter(resident.dataset()))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_missing_labels_masked(tmp_path):
    wave = np.linspace(6000, 6009, 10)
    labels = np.array([[1.0, -9999.0], [np.nan, 2.0]] * 10)
    write_pack(tmp_path / "m.pack", wave, np.arange(20), labels, np.ones((20, 10)))
    pack = open_pack(tmp_path / "m.pack", missing_label_value=-9999.0)
    rows = PackRows(pack)
    producer = BatchProducer(rows, LabelScaler([0, 0], [4, 4]), None, batch_size=8, seed=1, stage=1, fetch=8,
                             depth=16, missing_value=-9999.0)
    _, norm, mask = (x.numpy() for x in next(iter(producer.dataset())))
    for row_labels, row_mask in zip(norm, mask):
        assert row_mask.sum() == 1
        assert np.all(np.isfinite(row_labels))


def test_queue_holds_at_most_max_queue_bytes(flat_pack):
    """MAX_PP_DEPTH is an upper bound: a huge depth is cut to MAX_QUEUE_BYTES of flux, a small one is kept."""
    from anna.augment import MAX_QUEUE_BYTES

    rows = PackRows(flat_pack)
    scaler = LabelScaler([0, 0], [300, 10])
    huge = BatchProducer(rows, scaler, None, batch_size=10, seed=1, stage=1, depth=10**12)
    assert 2 <= huge.depth_batches and huge.depth_batches * 10 * rows.npix * 4 <= MAX_QUEUE_BYTES
    assert BatchProducer(rows, scaler, None, batch_size=10, seed=1, stage=1, depth=50).depth_batches == 5


def test_chunk_stream_is_not_autotuned(flat_pack):
    """tf.data's autotuning stays off for the producer's stream: its threads and depth are PP_THREADS and
    MAX_PP_DEPTH, and its model thread, which sleeps up to a minute between rounds, held up the iterator's
    destructor at the end of every stage (a SIGINT-stopped survey run took 62-67 s instead of ~21 s to write its
    model; benchmarks/, uncertainty row).  The stream is the same either way."""
    producer = _producer(flat_pack, None)
    for stream in (producer.chunk_dataset(), producer.dataset()):
        assert stream.options().autotune.enabled is False
    first = next(iter(producer.chunk_dataset()))
    again = next(iter(producer.chunk_dataset().with_options(_autotuned())))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _autotuned():
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = True
    return options
