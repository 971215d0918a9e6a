"""Training packs: ANNA's flat little-endian float64 binary format (user guide, section 4.2.1).

Layout, all values float64 little-endian::

    npix, nout, wavelength[0..npix-1],
    then for each star: id, label[0..nout-1], dummy, flux[0..npix-1]

so a star occupies ``npix + nout + 2`` values.  The reader memory-maps the file: a pack larger than RAM is
usable and nothing is read until a row is touched.  Ids stay float64 so large integer ids survive exactly
(up to 2**53).  The writer writes to a temporary file in the destination folder and renames it, so an
interrupted write never leaves a half-written pack under the final name.
"""

import os

import numpy as np

from anna.atomic import atomic_output
from anna.errors import AnnaInputError

PACK_DTYPE = np.dtype("<f8")
HEADER_VALUES = 2  # npix, nout


def _is_positive_integer(value):
    return bool(np.isfinite(value)) and value >= 1 and float(value).is_integer() and value < 2**31


def _float32_hint(path, nbytes):
    """Explain a bad header when the file looks like float32 (a common mistake when repacking)."""
    if nbytes < 8:
        return ""
    head32 = np.fromfile(path, dtype="<f4", count=2)
    if len(head32) == 2 and all(_is_positive_integer(v) for v in head32):
        npix, nout = int(head32[0]), int(head32[1])
        star = npix + nout + 2
        body = nbytes // 4 - HEADER_VALUES - npix
        if body >= 0 and body % star == 0:
            return (f"; the file reads as a float32 pack (npix={npix}, nout={nout}, {body // star} stars): "
                    "packs must be written as float64, e.g. array.astype('<f8').tofile(path)")
    headbe = np.fromfile(path, dtype=">f8", count=2)
    if len(headbe) == 2 and all(_is_positive_integer(v) for v in headbe):
        return "; the header reads correctly as big-endian float64: packs must be little-endian ('<f8')"
    return ""


# Whole-pack passes read this many bytes per block by default: 64 MiB is 1100 stars of 7214 pixels (4096 stars
# per block, the earlier fixed count, took 240 MB at that length) and still 8000 of 1001.
BLOCK_BYTES = 64 << 20
# Pack.read_rows reads through one buffer of about this many bytes: below glibc's 32 MiB limit for reusing
# freed memory, so after the first read no read pays page faults for fresh memory again.
READ_BUFFER_BYTES = 8 << 20


class Pack:
    """A memory-mapped training pack.

    Attributes are numpy views into the mapped file (nothing is copied until used):
    ``wavelengths`` (npix,), ``ids`` (n_stars,), ``labels`` (n_stars, nout), ``dummy`` (n_stars,),
    ``flux`` (n_stars, npix).  Slicing ``flux[a:b]`` reads only those rows from disk.
    """

    def __init__(self, path, npix, nout, n_stars, memmap):
        self.path = str(path)
        self.npix = npix
        self.nout = nout
        self.n_stars = n_stars
        self._memmap = memmap
        self.wavelengths = np.asarray(memmap[HEADER_VALUES:HEADER_VALUES + npix])
        rows = memmap[HEADER_VALUES + npix:HEADER_VALUES + npix + n_stars * self.star_length]
        self.table = rows.reshape(n_stars, self.star_length)
        self.ids = self.table[:, 0]
        self.labels = self.table[:, 1:1 + nout]
        self.dummy = self.table[:, 1 + nout]
        self.flux = self.table[:, 2 + nout:]

    @property
    def star_length(self):
        """Number of float64 values one star occupies: id, labels, dummy, fluxes."""
        return self.npix + self.nout + 2

    def __len__(self):
        return self.n_stars

    def __repr__(self):
        return (f"Pack({self.path!r}, n_stars={self.n_stars}, npix={self.npix}, nout={self.nout}, "
                f"{self.wavelengths[0]:.3f}-{self.wavelengths[-1]:.3f} A)")

    def iter_chunks(self, chunk_stars=None):
        """Yield ``(start, stop)`` row ranges that cover the pack, for bounded-memory passes over it; by default
        as many stars as fit :data:`BLOCK_BYTES`."""
        chunk_stars = int(chunk_stars or max(1, BLOCK_BYTES // (self.star_length * PACK_DTYPE.itemsize)))
        for start in range(0, self.n_stars, chunk_stars):
            yield start, min(start + chunk_stars, self.n_stars)

    def read_block(self, start, stop):
        """Stars ``start:stop`` as an in-memory (stop-start, star_length) float64 array.

        Whole-pack passes (validation, mean spectrum, testing) use this rather than the memory map: plain reads
        keep the process's resident memory at one block, while every page touched through a map counts
        against it until the kernel reclaims it.
        """
        offset = (HEADER_VALUES + self.npix + start * self.star_length) * PACK_DTYPE.itemsize
        count = (stop - start) * self.star_length
        block = np.fromfile(self.path, dtype=PACK_DTYPE, count=count, offset=offset)
        return block.reshape(stop - start, self.star_length)

    def read_rows(self, start, stop, flux_dtype=np.float64):
        """(ids (n,), labels (n, nout), flux (n, npix) as ``flux_dtype``) of stars ``start:stop``, by plain reads.

        The rows go through one reused buffer of about READ_BUFFER_BYTES, so a block of survey spectra costs
        its own arrays only: read whole (:meth:`read_block`), a thousand 7214-pixel spectra were a fresh 58 MB
        float64 array, then a float32 copy, and the page faults of the fresh memory took as long as the reading
        (benchmarks/, survey-size inference).  A flux beyond float32's range becomes infinite in float32.
        """
        n = stop - start
        ids, labels = np.empty(n), np.empty((n, self.nout))
        flux = np.empty((n, self.npix), dtype=flux_dtype)
        rows_per_read = max(1, READ_BUFFER_BYTES // (self.star_length * PACK_DTYPE.itemsize))
        buffer = np.empty((min(rows_per_read, n), self.star_length), dtype=PACK_DTYPE)
        with open(self.path, "rb") as handle:
            handle.seek((HEADER_VALUES + self.npix + start * self.star_length) * PACK_DTYPE.itemsize)
            for first in range(0, n, rows_per_read):
                rows = buffer[:min(rows_per_read, n - first)]
                if handle.readinto(memoryview(rows).cast("B")) != rows.nbytes:
                    raise AnnaInputError(f"pack ended early while reading stars {start + first + 1}.."
                                         f"{start + first + len(rows)} (was it truncated after opening?)",
                                         path=self.path)
                ids[first:first + len(rows)] = rows[:, 0]
                labels[first:first + len(rows)] = rows[:, 1:1 + self.nout]
                with np.errstate(over="ignore"):
                    flux[first:first + len(rows)] = rows[:, 2 + self.nout:]
        return ids, labels, flux

    def iter_blocks(self, chunk_stars=None):
        """Yield ``(start, stop, labels, flux)`` in-memory blocks covering the pack (bounded memory)."""
        for start, stop in self.iter_chunks(chunk_stars):
            block = self.read_block(start, stop)
            yield start, stop, block[:, 1:1 + self.nout], block[:, 2 + self.nout:]

    def count_nonfinite_flux_stars(self, chunk_stars=None):
        """Number of stars having at least one NaN or infinite flux (reads the pack in blocks)."""
        bad = 0
        for _, _, _, flux in self.iter_blocks(chunk_stars):
            bad += int(np.count_nonzero(~np.isfinite(flux).all(axis=1)))
        return bad


def open_pack(path, *, expected_npix=None, expected_nout=None, max_stars=None, check_labels=True,
              check_flux=False, missing_label_value=None):
    """Open and validate a pack without loading it.

    ``expected_npix``/``expected_nout`` come from the parameter file (NUM_PX, NUM_OUTS) and must agree with
    the header.  ``max_stars`` keeps only the first stars (XVAL_SIZE semantics); nothing past them is read.
    ``check_labels`` refuses infinite labels and NaN labels (unless ``missing_label_value`` says missing
    labels are allowed, in which case NaN and that value mark a missing label).  ``check_flux`` refuses
    non-finite fluxes, giving the count of affected stars.  Every problem raises :class:`AnnaInputError`
    whose message holds the numbers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AnnaInputError("pack file does not exist" if not os.path.exists(path) else "not a regular file",
                             path=path)
    nbytes = os.path.getsize(path)
    if nbytes % PACK_DTYPE.itemsize:
        raise AnnaInputError(f"size {nbytes} bytes is not a whole number of float64 values; "
                             "a pack is a flat little-endian float64 array" + _float32_hint(path, nbytes),
                             path=path)
    nvalues = nbytes // PACK_DTYPE.itemsize
    if nvalues < HEADER_VALUES:
        raise AnnaInputError(f"pack holds {nvalues} values; it needs at least the npix and nout header",
                             path=path)
    try:
        memmap = np.memmap(path, dtype=PACK_DTYPE, mode="r")
    except (OSError, ValueError) as exc:
        raise AnnaInputError(f"cannot memory-map pack: {exc}", path=path) from None
    npix_raw, nout_raw = float(memmap[0]), float(memmap[1])
    for name, raw in (("npix", npix_raw), ("nout", nout_raw)):
        if not _is_positive_integer(raw):
            raise AnnaInputError(f"header {name} is not a positive integer" + _float32_hint(path, nbytes),
                                 path=path, value=raw)
    npix, nout = int(npix_raw), int(nout_raw)
    if expected_npix is not None and npix != expected_npix:
        raise AnnaInputError(f"header npix={npix} but the parameter file says NUM_PX={expected_npix}", path=path)
    if expected_nout is not None and nout != expected_nout:
        raise AnnaInputError(f"header nout={nout} but the parameter file says NUM_OUTS={expected_nout}",
                             path=path)
    star_length = npix + nout + 2
    body = nvalues - HEADER_VALUES - npix
    if body < 0:
        raise AnnaInputError(f"pack holds {nvalues} values, fewer than its header and {npix} wavelengths",
                             path=path)
    n_stars, extra = divmod(body, star_length)
    if extra:
        raise AnnaInputError(f"pack holds {nvalues} values; header + {n_stars} stars of {star_length} values "
                             f"leaves {extra} extra (truncated file, or npix/nout wrong?)"
                             + _float32_hint(path, nbytes), path=path)
    if n_stars == 0:
        raise AnnaInputError("pack holds no stars (header and wavelengths only)", path=path)
    if max_stars is not None:
        n_stars = min(n_stars, int(max_stars))
    pack = Pack(path, npix, nout, n_stars, memmap)

    wave = pack.wavelengths
    if not np.isfinite(wave).all():
        raise AnnaInputError(f"{int(np.count_nonzero(~np.isfinite(wave)))} wavelengths are NaN or infinite",
                             path=path)
    steps = np.diff(wave)
    if npix > 1 and not (steps > 0).all():
        where = int(np.argmax(steps <= 0))
        raise AnnaInputError(f"wavelengths are not strictly ascending: pixel {where + 1} = {float(wave[where + 1])!r} "
                             f"follows {float(wave[where])!r}", path=path)
    if check_labels:
        _check_labels(pack, missing_label_value)
    if check_flux:
        bad = pack.count_nonfinite_flux_stars()
        if bad:
            raise AnnaInputError(f"{bad} of {n_stars} stars have NaN or infinite fluxes", path=path)
    return pack


def _check_labels(pack, missing_label_value):
    bad_inf, bad_nan = 0, 0
    for _, _, labels, _ in pack.iter_blocks():
        inf, nan = count_bad_label_stars(labels, missing_label_value)
        bad_inf, bad_nan = bad_inf + inf, bad_nan + nan
    refuse_bad_labels(pack, bad_inf, bad_nan)


def count_bad_label_stars(labels, missing_label_value=None):
    """(stars with an infinite label, stars with a NaN label) among (n, nout) ``labels``; NaN labels count
    only when ``missing_label_value`` is None (otherwise NaN marks a missing label, which is allowed).

    Shared by open_pack's check and by whole-pack passes that check the labels as they read them (anna-test),
    instead of reading the pack once more for them first."""
    bad_inf = int(np.count_nonzero(np.isinf(labels).any(axis=1)))
    bad_nan = int(np.count_nonzero(np.isnan(labels).any(axis=1))) if missing_label_value is None else 0
    return bad_inf, bad_nan


def refuse_bad_labels(pack, bad_inf, bad_nan):
    """Raise the one-line error for a pack whose labels :func:`count_bad_label_stars` found bad, if any."""
    if bad_inf:
        raise AnnaInputError(f"{bad_inf} of {pack.n_stars} stars have infinite labels", path=pack.path)
    if bad_nan:
        raise AnnaInputError(f"{bad_nan} of {pack.n_stars} stars have NaN labels", path=pack.path)


def write_pack(path, wavelengths, ids, labels, flux, dummy=None):
    """Write a pack atomically (temporary file in the same folder, then rename).

    ``wavelengths`` (npix,) ascending; ``ids`` (n,); ``labels`` (n, nout); ``flux`` (n, npix);
    ``dummy`` (n,) or None for zeros.  Values are stored as little-endian float64.
    """
    wavelengths = np.asarray(wavelengths, dtype=PACK_DTYPE)
    flux = np.asarray(flux, dtype=PACK_DTYPE)
    labels = np.asarray(labels, dtype=PACK_DTYPE)
    ids = np.asarray(ids, dtype=PACK_DTYPE).reshape(-1)
    n_stars = len(ids)
    if labels.ndim == 1:
        labels = labels.reshape(n_stars, -1)
    npix, nout = wavelengths.shape[0], labels.shape[1]
    dummy = np.zeros(n_stars, PACK_DTYPE) if dummy is None else np.asarray(dummy, dtype=PACK_DTYPE).reshape(-1)
    if flux.shape != (n_stars, npix) or labels.shape != (n_stars, nout) or dummy.shape != (n_stars,):
        raise ValueError(f"write_pack: inconsistent shapes ids {ids.shape}, labels {labels.shape}, "
                         f"dummy {dummy.shape}, flux {flux.shape}, wavelengths {wavelengths.shape}")
    if npix > 1 and not (np.diff(wavelengths) > 0).all():
        raise ValueError("write_pack: wavelengths must be strictly ascending")
    table = np.empty((n_stars, npix + nout + 2), dtype=PACK_DTYPE)
    table[:, 0] = ids
    table[:, 1:1 + nout] = labels
    table[:, 1 + nout] = dummy
    table[:, 2 + nout:] = flux
    header = np.concatenate([[npix, nout], wavelengths]).astype(PACK_DTYPE)
    with atomic_output(path, "wb") as handle:
        header.tofile(handle)
        table.tofile(handle)
