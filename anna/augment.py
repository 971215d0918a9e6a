"""Augmentation: S/N noise from a template plus continuum offsets, and the training-batch producer.

The noise model (guide section 4.2.1, with ANNA's bugs corrected): for every spectrum a signal-to-noise
SN ~ U(SN_RANGE) is drawn, each pixel gets Gaussian noise of sigma = 1 / (SN * rel_sn(lambda)), rel_sn being
the S/N template interpolated onto the pack's grid, and then the whole spectrum is scaled by (1 + delta),
delta ~ U(REL_CONT_E), to mimic continuum-placement error.

One function, :func:`noisy_copy`, implements it; it serves twice:

* on fixed sets, noised once: the cross-validation set (so its cost is comparable between evaluations) and
  anna-test's PREPROCESS_TEST;
* in :class:`BatchProducer`, a ``tf.data`` pipeline: PP_THREADS parallel producer calls each draw NUM_FETCH
  random stars (with replacement), gather their rows from the pack, and noise them; a prefetch buffer of
  MAX_PP_DEPTH examples (at most MAX_QUEUE_BYTES of flux) is the bounded queue the training loop consumes.
  Each call's randomness comes from a generator seeded with (SEED, stage, chunk number), so the stream is
  identical for a given seed whatever the thread timing, and a resumed run can restart it at any chunk.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

# Packs whose float32 flux fits under resident_limit_bytes() are held in RAM; larger ones are read row by row
# from disk (pread: the kernel's page cache keeps what fits, outside the process's resident set), so resident
# memory stays bounded whatever the pack size.  The limit is min(RESIDENT_PACK_CAP, RESIDENT_MEMORY_FRACTION x
# MemAvailable).  The cap keeps anna-train under 2 GB at every pack size (benchmarks/, peak RSS rows: the run
# itself takes ~1.4 GB, so the old 1 GiB limit would have taken a 250k-star pack to ~2.4 GB).  It is not zero
# because streaming costs CPU: a 1000-star producer chunk of 1001 pixels from a page-cached pack took ~4 ms more
# than from RAM (17 against 13 ms with noise; benchmarks/, producer chunk row), beside ~100 ms of training steps
# per chunk on 2 cores.  The fraction keeps a machine with little memory free from spending it on the pack.
RESIDENT_PACK_CAP = 256 << 20
RESIDENT_MEMORY_FRACTION = 0.125
# The queue of ready batches never holds more than this many bytes of flux, whatever MAX_PP_DEPTH asks: the
# queue only has to ride out the producer's jitter (a few batches), and ANNA's tutorial depth of 200000
# 1001-pixel examples would otherwise hold 0.8 GB of RAM for nothing (benchmarks/: peak RSS row).
MAX_QUEUE_BYTES = 64 << 20


def memory_available_bytes(meminfo="/proc/meminfo"):
    """MemAvailable of ``meminfo`` in bytes (the kernel's estimate of what can be allocated without swapping),
    or None where the file or the line is missing (systems other than Linux)."""
    try:
        with open(meminfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    scale = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
                    return int(fields[1]) * scale
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_limit_bytes(available=None, cap=RESIDENT_PACK_CAP, fraction=RESIDENT_MEMORY_FRACTION):
    """Largest float32 flux (bytes) of a pack that :class:`PackRows` holds in RAM: ``min(cap, fraction x
    available)``, ``available`` being the memory available in bytes (:func:`memory_available_bytes`); ``cap``
    alone when that is unknown (None)."""
    if available is None:
        return int(cap)
    return int(max(0, min(int(cap), int(fraction * available))))


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """What PREPROCESS_* does: ``rel_sn`` (npix,), ``sn_range`` (low, high), ``cont_range`` (low, high)."""

    rel_sn: np.ndarray
    sn_range: tuple
    cont_range: tuple
    # BAD_PIXEL_FRACTION: pixels dropped after noising and set to the neutral value (anna.badpixels)
    bad_pixel_fraction: float = 0.0
    bad_pixel_fill: str = "INTERPOLATE"


def noisy_copy(flux, rel_sn, sn_range, cont_range, seed, dtype=np.float64):
    """Noised copy of ``flux`` (n, npix) and the S/N drawn for each spectrum (n,); deterministic for ``seed``.

    ``seed`` may be an int, a tuple of ints (e.g. (run seed, chunk number)) or a numpy Generator to draw from.
    ``dtype`` float32 halves the memory traffic and uses numpy's float32 normal sampler (the training
    producer's choice); the noise model is the same.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sn = rng.uniform(sn_range[0], sn_range[1], size=np.shape(flux)[0])
    return noisy_copy_at(flux, rel_sn, sn, cont_range, rng, dtype=dtype), sn


def noisy_copy_at(flux, rel_sn, sn, cont_range, seed, dtype=np.float64):
    """Noised copy of ``flux`` (n, npix) at the given S/N of each spectrum (``sn`` (n,)): the noise model of
    :func:`noisy_copy` (σ_pixel = 1 / (S/N · rel_sn(λ)), then flux · (1 + δ), δ ~ U(``cont_range``)), for
    sets whose S/N is chosen rather than drawn (the σ calibration's S/N levels, :mod:`anna.train.describe`)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    flux = np.asarray(flux, dtype=dtype)
    sn = np.asarray(sn, dtype=np.float64)
    noisy = rng.standard_normal(flux.shape, dtype=dtype)
    noisy *= (1.0 / np.asarray(rel_sn, dtype=np.float64)).astype(dtype)[None, :]
    noisy *= (1.0 / sn).astype(dtype)[:, None]
    noisy += flux
    delta = rng.uniform(cont_range[0], cont_range[1], size=flux.shape[0])
    noisy *= (1.0 + delta).astype(dtype)[:, None]
    return noisy


def drop_pixels(flux, noise, rng):
    """BAD_PIXEL_FRACTION: ``flux`` (n, npix) with random pixels and runs of pixels marked bad and set to the
    neutral value exactly as anna-infer sets a file's bad pixels (:mod:`anna.badpixels`); unchanged when the
    fraction is 0."""
    if noise is None or not noise.bad_pixel_fraction:
        return flux
    from anna.badpixels import fill_bad, random_bad_mask

    return fill_bad(flux, random_bad_mask(rng, flux.shape, noise.bad_pixel_fraction), noise.bad_pixel_fill)


class PackRows:
    """Random-access rows of a pack as float32: in RAM when small, streamed with pread when large.

    ``gather(indices)`` returns (flux (k, npix) float32, labels (k, nout) float64) for int64 ``indices``.
    The flux is held in RAM when its float32 size is at most ``resident_bytes`` (None: the rule of
    :func:`resident_limit_bytes` on this machine's available memory).  Streaming reads each requested row with
    one positioned read, which keeps the process's resident memory independent of the pack size
    (memory-mapping would count every touched page against the process).  The labels are always in RAM.
    """

    def __init__(self, pack, resident_bytes=None):
        if resident_bytes is None:
            resident_bytes = resident_limit_bytes(memory_available_bytes())
        self.pack = pack
        self.npix = pack.npix
        self.nout = pack.nout
        self.labels = np.empty((pack.n_stars, pack.nout), dtype=np.float64)
        self.resident_bytes = int(resident_bytes)
        self.resident = pack.n_stars * pack.npix * 4 <= self.resident_bytes
        if self.resident:
            self.flux = np.empty((pack.n_stars, pack.npix), dtype=np.float32)
        for start, stop, labels, flux in pack.iter_blocks():
            self.labels[start:stop] = labels
            if self.resident:
                self.flux[start:stop] = flux
        if not self.resident:
            self._fd = os.open(pack.path, os.O_RDONLY)
            self._row_bytes = pack.star_length * 8
            self._first_row = (2 + pack.npix) * 8
            self._flux_offset = (pack.nout + 2) * 8

    def gather(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        labels = self.labels[indices]
        if self.resident:
            return self.flux[indices], labels
        flux = np.empty((len(indices), self.npix), dtype=np.float32)
        nbytes = self.npix * 8
        for row, index in enumerate(indices):
            offset = self._first_row + int(index) * self._row_bytes + self._flux_offset
            flux[row] = np.frombuffer(os.pread(self._fd, nbytes, offset), dtype="<f8")
        return flux, labels


class BatchProducer:
    """Infinite stream of (flux, normalised labels, label mask) training batches as a ``tf.data.Dataset``.

    ``rows``: :class:`PackRows`; ``scaler``: label normaliser; ``noise``: :class:`NoiseModel` or None (no
    augmentation); ``threads`` producer calls in flight (PP_THREADS); ``fetch`` stars drawn per producer call
    (NUM_FETCH, rounded to whole batches); ``depth`` examples buffered ahead (MAX_PP_DEPTH, at most
    MAX_QUEUE_BYTES of flux).  Missing labels (NaN or ``missing_value``) come out as 0 with mask 0.

    ``shard`` (index, count), for one worker of several (DISTRIBUTE MULTI_WORKER): draw only rows index,
    index + count, ... of the pack, with the worker's own random stream (SEED, stage, chunk, index); None: every
    row, the stream (SEED, stage, chunk).
    """

    def __init__(self, rows, scaler, noise, *, batch_size, seed, stage, threads=1, fetch=1000, depth=10000,
                 missing_value=None, shard=None):
        self.rows = rows
        self.scaler = scaler
        self.noise = noise
        self.batch_size = int(batch_size)
        self.batches_per_chunk = max(1, int(fetch) // self.batch_size)
        self.chunk_size = self.batches_per_chunk * self.batch_size
        self.seed = int(seed)
        self.stage = int(stage)
        self.threads = max(1, int(threads))
        batch_bytes = self.batch_size * rows.npix * 4
        self.depth_batches = max(2, min(int(depth) // self.batch_size, MAX_QUEUE_BYTES // batch_bytes))
        self.missing_value = missing_value
        self.stream = ()
        self.shard_rows = None
        if shard is not None:
            index, count = (int(value) for value in shard)
            self.stream = (index,)
            self.shard_rows = np.arange(index, rows.pack.n_stars, count, dtype=np.int64)

    def _draw_chunk(self, chunk):
        """One producer call: random rows (with replacement), noised when augmenting, and their normalised
        labels.  Everything random comes from one generator seeded with (SEED, stage, chunk)."""
        rng = np.random.default_rng((self.seed, self.stage, int(chunk), *self.stream))
        if self.shard_rows is None:
            indices = rng.integers(0, self.rows.pack.n_stars, size=self.chunk_size)
        else:
            indices = self.shard_rows[rng.integers(0, len(self.shard_rows), size=self.chunk_size)]
        flux, labels = self.rows.gather(indices)
        if self.noise is not None:
            # the same function as for the fixed sets; numpy's float32 sampler needs ~9 ms of one core per
            # 1000 x 1001 values, no more than TensorFlow's stateless sampler did (8-12 ms), and on 2 cores
            # the producer's CPU time is taken from the training step (benchmarks/, training throughput row)
            flux, _ = noisy_copy(flux, self.noise.rel_sn, self.noise.sn_range, self.noise.cont_range, rng,
                                 dtype=np.float32)
            flux = drop_pixels(flux, self.noise, rng)
        mask = np.isfinite(labels)
        if self.missing_value is not None:
            mask &= labels != self.missing_value
        normalised = np.where(mask, self.scaler.normalise(np.where(mask, labels, 0.0)), 0.0)
        return flux, normalised.astype(np.float32), mask.astype(np.float32)

    def dataset(self, start_batch=0):
        """Dataset of batches beginning at batch number ``start_batch`` of this stage's stream."""
        first_chunk, skip = divmod(int(start_batch), self.batches_per_chunk)
        batches = self.chunk_dataset(first_chunk, prefetch=False).unbatch()
        if skip:
            batches = batches.skip(skip)
        return batches.prefetch(self.depth_batches)

    def chunk_dataset(self, first_chunk=0, prefetch=True):
        """Dataset of whole producer chunks from chunk number ``first_chunk``: (flux, labels, mask) shaped
        (batches_per_chunk, batch_size, ...), batch b of chunk c being batch c * batches_per_chunk + b of the
        stream.  anna-train takes chunks and runs their batches in one compiled call (anna.train)."""
        npix, nout = self.rows.npix, self.rows.nout

        def produce(chunk):
            flux, labels, mask = tf.numpy_function(self._draw_chunk, [chunk], [tf.float32, tf.float32, tf.float32],
                                                   stateful=False)
            flux.set_shape([self.chunk_size, npix])
            labels.set_shape([self.chunk_size, nout])
            mask.set_shape([self.chunk_size, nout])
            shape = [self.batches_per_chunk, self.batch_size]
            return (tf.reshape(flux, shape + [npix]), tf.reshape(labels, shape + [nout]),
                    tf.reshape(mask, shape + [nout]))

        chunks = tf.data.Dataset.counter(start=int(first_chunk), dtype=tf.int64)
        chunks = chunks.map(produce, num_parallel_calls=self.threads, deterministic=True)
        if prefetch:
            chunks = chunks.prefetch(max(1, self.depth_batches // self.batches_per_chunk))
        options = tf.data.Options()
        options.deterministic = True
        # No autotuning: the threads and the prefetch depth are set above (PP_THREADS, MAX_PP_DEPTH).  Its model
        # thread waits between optimisation rounds, up to a minute once training has run a while, and the
        # iterator's destructor, at the end of every stage, waited for it: a SIGINT-stopped MC-dropout run on
        # 7214-pixel spectra took 45-67 s from the signal to the model, 50 of them in that destructor.
        options.autotune.enabled = False
        return chunks.with_options(options)
