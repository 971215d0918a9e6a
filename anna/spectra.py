"""Which kind of spectrum file a path holds: the one rule every reader, the parameter check and anna-pack use.

A file is FITS when its content says so (it starts with a ``SIMPLE`` card, or is compressed: gzip, bzip2 or
zip, which astropy opens), else when its name does (``.fits``, ``.fit``, ``.fts``, optionally followed by a
compression extension).  Anything else is taken as a text spectrum.  Deciding by content first means a FITS
file named ``star.dat`` is read as FITS and ``star.fits.gz`` is never mistaken for text.  This module reads
at most a few bytes and imports nothing heavy, so the parameter check can use it before TensorFlow or
astropy load.
"""

import os

from anna.errors import AnnaInputError

FITS_EXTENSIONS = (".fits", ".fit", ".fts")
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".fz", ".z")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"PK\x03\x04")
HEAD_BYTES = 80  # one FITS card


def is_fits_content(head):
    """True when the first bytes of a file are those of a FITS file or of a compressed file."""
    return head.startswith(b"SIMPLE") or head.startswith(COMPRESSED_MAGIC)


def without_compression_extension(name):
    """``name`` without one trailing compression extension ('x.fits.gz' -> 'x.fits')."""
    lower = name.lower()
    for extension in COMPRESSION_EXTENSIONS:
        if lower.endswith(extension):
            return name[:-len(extension)]
    return name


def has_fits_name(path):
    """True when the file name ends in a FITS extension, optionally compressed."""
    return without_compression_extension(os.path.basename(os.fspath(path))).lower().endswith(FITS_EXTENSIONS)


def looks_like_fits(path):
    """The rule above, for a file that exists (an unreadable one is an input error naming it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError as exc:
        raise AnnaInputError(f"cannot read input: {exc.strerror or exc}", path=path) from None
    return is_fits_content(head) or has_fits_name(path)


def spectrum_stem(path):
    """File name without folder, compression extension and FITS or text extension ('a/b/x.fits.gz' -> 'x')."""
    name = without_compression_extension(os.path.basename(os.fspath(path)))
    return os.path.splitext(name)[0] or name
