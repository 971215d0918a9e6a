"""FITS spectrum readers: IRAF multispec / equispec images and plain 1-D spectra with a linear WCS.

Inference reads the spectra it parameterises from FITS files (user guide, section 4.4), usually IRAF
``multispec`` images where every image line is an independent spectrum (a fibre, an echelle order) with its
own dispersion function.  This module turns such a file into a list of :class:`Spectrum` objects: wavelength
and flux arrays (float64) plus the bookkeeping needed to trace every result back to a file row.

Supported world coordinate systems, following the IRAF ``specwcs`` description and, where the two disagree,
what IRAF's MWCS multispec driver actually computes (it produced the reference wavelengths we test against):

* ``system=multispec`` (WAT0): one ``specN`` attribute per physical image line N, held in the WAT2_nnn cards::

      specN = "ap beam dtype w1 dw nw z aplow aphigh [wt zp ftype params coeffs]..."

  dtype 0 (linear) ``w = w1 + dw (p - 1)``; dtype 1 (log-linear) ``w = 10**(w1 + dw (p - 1))``;
  dtype 2 (non-linear) the weighted mean ``w = sum(wt_i (zp_i + W_i(p))) / sum(wt_i)`` of functions W_i:
  1 Chebyshev, 2 Legendre, 3 cubic spline, 4 linear spline, 5 pixel-coordinate table, 6 sampled table.
  Every result is then divided by (1 + z).  ``p`` is the *physical* pixel coordinate (the LTV/LTM keywords
  map image pixels to physical ones), clamped to [0.5, nw + 0.5] as IRAF does.  Only the first ``nw``
  physical pixels hold data; padding past them is trimmed.
  Tables: a pixel table (5) lists the wavelength of physical pixels 1..n; a sampled table (6) lists
  (pixel, wavelength) pairs; both are interpolated linearly between neighbouring entries.
* ``CRVAL1`` / ``CD1_1`` (or ``CDELT1``) / ``CRPIX1`` linear WCS for 1-D spectra and for ``equispec`` images
  whose lines share one dispersion: ``w = CRVAL1 + CD1_1 (l - CRPIX1)`` for image pixel l = 1..N, CD1_1
  taking precedence over CDELT1 as in IRAF.  A missing CRPIX1 is 0, the FITS standard's default, which
  IRAF follows too (CRVAL1 is then the wavelength of the pixel before the first one).
  ``DC-FLAG = 1`` means the axis is log10(wavelength) and the antilog is applied, as IRAF's onedspec does.

Images may be 1-D, 2-D (apertures x pixels) or 3-D (bands x apertures x pixels; band 1 is used, as IRAF's
extraction tasks put the primary spectrum there).  Odd headers that IRAF and other reduction packages write
(non-standard keywords such as ``P.I.``, non-ASCII bytes, BLANK on float data, a missing final padding block)
are read anyway: a reader that gives up on them is useless on real archives.

Speed matters (a night may bring ~100,000 spectra): wavelengths are evaluated with numpy over all pixels of
an aperture at once; there is no per-pixel Python loop.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.spectra import is_fits_content, spectrum_stem

CHEBYSHEV, LEGENDRE, CUBIC_SPLINE, LINEAR_SPLINE, PIXEL_TABLE, SAMPLED_TABLE = 1, 2, 3, 4, 5, 6
FUNCTION_NAMES = {
    CHEBYSHEV: "chebyshev",
    LEGENDRE: "legendre",
    CUBIC_SPLINE: "cubic spline",
    LINEAR_SPLINE: "linear spline",
    PIXEL_TABLE: "pixel table",
    SAMPLED_TABLE: "sampled table",
}
DTYPE_NAMES = {0: "linear", 1: "log-linear", 2: "non-linear"}

# IRAF stores each WAT card value as exactly this many characters (FITS columns 12-79): long attribute
# strings are cut at fixed positions, often inside a number or just after a space, so the pieces must be
# pasted together untouched.
WAT_CHARS_PER_CARD = 68

_CARD_STRING = re.compile(r"\s*'((?:[^']|'')*)'?")
_ATTRIBUTE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?:"([^"]*)"?|(\S*))')


@dataclass(frozen=True)
class Spectrum:
    """One spectrum (one image line) read from a FITS file.

    ``wavelength`` and ``flux`` have shape (n_valid,), float64; wavelengths are in the file's units
    (Angstrom for IRAF-calibrated data) in the order the file gives them.  ``index`` is the 0-based image
    row, so results can always be traced back to the file even when aperture numbers repeat.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    source: str
    index: int
    aperture: int | None
    beam: int | None
    dtype: int | None
    function: str
    n_pixels: int


# ----------------------------------------------------------------------------------------------------------
# Opening the file and reading header strings exactly


def _open_image(path):
    """Return (header, data) of the first HDU holding image data; data as float64, shape as in the file.

    Raises AnnaInputError when the file is missing, is not FITS, or holds no image data.
    """
    if not os.path.exists(path):
        raise AnnaInputError("FITS file not found", path=path)
    if os.path.isdir(path):
        raise AnnaInputError("is a folder, not a FITS file", path=path)
    with open(path, "rb") as handle:
        first = handle.read(80)
    if not is_fits_content(first):
        raise AnnaInputError("not a FITS file (it does not start with a SIMPLE card)", path=path,
                             value=first[:30].decode("latin-1"))
    try:
        with warnings.catch_warnings():
            # Truncated padding, non-ASCII header bytes, BLANK on float data, non-standard keywords:
            # astropy warns and reads on, which is exactly what we want.
            warnings.simplefilter("ignore")
            with fits.open(path, ignore_missing_end=True, memmap=False) as hdus:
                for hdu in hdus:
                    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)):
                        continue
                    data = hdu.data
                    if data is None or data.size == 0:
                        continue
                    return hdu.header, np.array(data, dtype=np.float64)
    except AnnaInputError:
        raise
    except Exception as error:  # astropy raises many types for damaged files
        raise AnnaInputError(f"cannot read as FITS: {type(error).__name__}: {error}", path=path) from None
    raise AnnaInputError("no image data (every HDU is empty)", path=path)


def _card_string(card):
    """The string value of one header card read from its raw 80-character image, trailing spaces kept.

    astropy strips trailing blanks from string values (FITS says they are insignificant), but in IRAF's WAT
    cards a blank at the end of a card separates two numbers.  Doubled quotes are unescaped.  The raw image
    astropy keeps for cards read from a file is used when available (``Card.image`` would re-verify every
    card, which costs more than the rest of the read).
    """
    image = getattr(card, "_image", None) or card.image
    match = _CARD_STRING.match(image, 10) if image[8:10] == "= " else None
    if match is None:
        return ""
    return match.group(1).replace("''", "'")


def _wat_strings(header):
    """All WATn attribute strings of a header, {axis: text}, each concatenated exactly as IRAF does.

    Every card but the last contributes exactly WAT_CHARS_PER_CARD characters (a shorter value written by
    other software is padded with blanks, where IRAF would read on past the closing quote: a separator
    either way).  Cards are taken in numeric order; a duplicate card is ignored (IRAF keeps the first).
    """
    numbered = {}
    for key in header.keys():
        if len(key) > 5 and key.startswith("WAT") and key[3:].partition("_")[0].isdigit():
            axis_text, _, number_text = key[3:].partition("_")
            if number_text.isdigit():
                numbered.setdefault(int(axis_text), {}).setdefault(int(number_text), key)
    strings = {}
    for axis, cards in numbered.items():
        pieces = []
        order = sorted(cards)
        for position, number in enumerate(order):
            value = _card_string(header.cards[cards[number]])
            if position < len(order) - 1:
                value = value.ljust(WAT_CHARS_PER_CARD)
            pieces.append(value)
        strings[axis] = "".join(pieces)
    return strings


def _attributes(text):
    """Parse an IRAF WCS attribute string ``key = value key = "quoted value" ...`` into a dict."""
    found = {}
    for match in _ATTRIBUTE.finditer(text):
        key = match.group(1)
        value = match.group(2) if match.group(2) is not None else match.group(3)
        found.setdefault(key, value)
    return found


def _number(header, key, default, path):
    """A numeric header value, or default when absent; AnnaInputError when present but not a number."""
    if key not in header:
        return default
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        try:
            return float(str(value).strip().replace("D", "E").replace("d", "e"))
        except ValueError:
            raise AnnaInputError("header value is not a number", path=path, key=key, value=str(value)) from None
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# Multispec dispersion functions


@dataclass(frozen=True)
class _Term:
    """One weighted function of a non-linear multispec dispersion: contributes weight * (zero_point + W(p))."""

    weight: float
    zero_point: float
    ftype: int
    size: int              # order, number of spline pieces, or number of table points
    pmin: float            # polynomial / spline range in physical pixels (unused by tables)
    pmax: float
    coefficients: np.ndarray   # polynomial or spline coefficients, pixel-table wavelengths
    sample_pixels: np.ndarray  # sampled table only: physical pixel of each sample (ascending)

    def describe(self):
        name = FUNCTION_NAMES[self.ftype]
        if self.ftype in (CHEBYSHEV, LEGENDRE):
            return f"{name} order {self.size}"
        if self.ftype in (CUBIC_SPLINE, LINEAR_SPLINE):
            return f"{name} {self.size} pieces"
        return f"{name} {len(self.coefficients)} points"

    def evaluate(self, p):
        """W(p) for physical pixel coordinates p (1-D float64 array, already clamped)."""
        c = self.coefficients
        if self.ftype in (CHEBYSHEV, LEGENDRE):
            x = (p - (self.pmax + self.pmin) / 2) * (2 / (self.pmax - self.pmin))
            y = np.full_like(p, c[0])
            if self.size > 1:
                y += c[1] * x
            previous, current = np.ones_like(p), x
            for i in range(3, self.size + 1):
                if self.ftype == CHEBYSHEV:
                    following = 2 * x * current - previous
                else:
                    following = ((2 * i - 3) * x * current - (i - 2) * previous) / (i - 1)
                y += c[i - 1] * following
                previous, current = current, following
            return y
        if self.ftype in (CUBIC_SPLINE, LINEAR_SPLINE):
            s = (p - self.pmin) * (self.size / (self.pmax - self.pmin))
            piece = np.clip(np.trunc(s), 0, self.size - 1).astype(np.intp)
            b = s - piece
            a = 1 - b
            if self.ftype == LINEAR_SPLINE:
                return a * c[piece] + b * c[piece + 1]
            # B-spline basis as IRAF evaluates it: no 1/6 normalisation.
            ab = a * b
            return (a * a * a * c[piece] + (1 + 3 * a * (1 + ab)) * c[piece + 1]
                    + (1 + 3 * b * (1 + ab)) * c[piece + 2] + b * b * b * c[piece + 3])
        if self.ftype == PIXEL_TABLE:
            n = len(c)
            if n == 1:
                return np.full_like(p, c[0])
            left = np.clip(np.trunc(p), 1, n - 1).astype(np.intp)  # 1-based pixel of the left sample
            fraction = p - left
            return (1 - fraction) * c[left - 1] + fraction * c[left]
        # SAMPLED_TABLE: linear interpolation between bracketing samples, extrapolation past the ends.
        xs, ws = self.sample_pixels, c
        if len(xs) == 1:
            return np.full_like(p, ws[0])
        left = np.clip(np.searchsorted(xs, p, side="left") - 1, 0, len(xs) - 2)
        fraction = (p - xs[left]) / (xs[left + 1] - xs[left])
        return (1 - fraction) * ws[left] + fraction * ws[left + 1]


@dataclass(frozen=True)
class _Aperture:
    """Parsed specN attribute."""

    line: int
    aperture: int
    beam: int
    dtype: int
    w1: float
    dw: float
    nw: int
    z: float
    terms: tuple

    def describe(self):
        if self.dtype != 2:
            return DTYPE_NAMES[self.dtype]
        if len(self.terms) == 1:
            return self.terms[0].describe()
        return "+".join(FUNCTION_NAMES[term.ftype] for term in self.terms)

    def wavelengths(self, physical):
        """World coordinates at physical pixel coordinates (float64 array), as IRAF's multispec driver."""
        p = np.clip(physical, 0.5, self.nw + 0.5)
        if self.dtype == 2:
            total = np.zeros_like(p)
            weights = 0.0
            for term in self.terms:
                total += term.weight * (term.zero_point + term.evaluate(p))
                weights += term.weight
            w = total / weights
        else:
            w = self.w1 + self.dw * (p - 1)
            if self.dtype == 1:
                w = 10.0 ** w
        # IRAF divides by (1 + z) after the antilog (its driver does; the specwcs prose shows it inside).
        return w / (1 + self.z)


def _to_float(token, path, key, what):
    try:
        return float(token.replace("D", "E").replace("d", "e"))
    except ValueError:
        raise AnnaInputError(f"{what} is not a number", path=path, key=key, value=token) from None


def _to_int(token, path, key, what):
    value = _to_float(token, path, key, what)
    if not np.isfinite(value) or abs(value - round(value)) > 1e-6:
        raise AnnaInputError(f"{what} must be an integer", path=path, key=key, value=token)
    return int(round(value))


def _parse_terms(tokens, path, key):
    """Parse the function descriptions following the nine common specN fields."""
    terms = []
    i = 0
    count = len(tokens)
    while i < count:
        if count - i < 4:
            raise AnnaInputError("truncated dispersion function (needs weight, zero point, type and size)",
                                 path=path, key=key, value=" ".join(tokens[i:]))
        weight = _to_float(tokens[i], path, key, "function weight")
        zero_point = _to_float(tokens[i + 1], path, key, "function zero point")
        ftype = _to_int(tokens[i + 2], path, key, "function type")
        if ftype not in FUNCTION_NAMES:
            raise AnnaInputError(
                f"unsupported dispersion function type {ftype} (supported: 1 chebyshev, 2 legendre, "
                "3 cubic spline, 4 linear spline, 5 pixel table, 6 sampled table)",
                path=path, key=key, value=tokens[i + 2])
        size = _to_int(tokens[i + 3], path, key, f"{FUNCTION_NAMES[ftype]} order/size")
        if size < 1:
            raise AnnaInputError(f"{FUNCTION_NAMES[ftype]} order/size must be at least 1", path=path, key=key,
                                 value=tokens[i + 3])
        pmin = pmax = np.nan
        sample_pixels = np.empty(0)
        if ftype in (CHEBYSHEV, LEGENDRE, CUBIC_SPLINE, LINEAR_SPLINE):
            n_coefficients = {CHEBYSHEV: size, LEGENDRE: size, CUBIC_SPLINE: size + 3, LINEAR_SPLINE: size + 1}
            needed = 6 + n_coefficients[ftype]
            if count - i < needed:
                raise AnnaInputError(
                    f"{FUNCTION_NAMES[ftype]} (size {size}) needs pmin, pmax and {n_coefficients[ftype]} "
                    f"coefficients, found {max(count - i - 4, 0)} values", path=path, key=key)
            pmin = _to_float(tokens[i + 4], path, key, "pmin")
            pmax = _to_float(tokens[i + 5], path, key, "pmax")
            if not pmax != pmin:
                raise AnnaInputError("pmin equals pmax: the function has no range", path=path, key=key,
                                     value=f"{tokens[i + 4]} {tokens[i + 5]}")
            values = tokens[i + 6:i + needed]
        elif ftype == PIXEL_TABLE:
            needed = 4 + size
            if count - i < needed:
                raise AnnaInputError(f"pixel table needs {size} wavelengths, found {count - i - 4}",
                                     path=path, key=key)
            values = tokens[i + 4:i + needed]
        else:  # SAMPLED_TABLE: "wt zp 6 n dummy p1 w1 p2 w2 ..."
            # IRAF's driver reads n as the number of values that follow (two per sample); the specwcs prose
            # calls it the number of pairs.  Both readings are accepted when the attribute leaves no doubt.
            remaining = count - i - 5
            if remaining == 2 * size:
                n_values = 2 * size
            else:
                n_values = size
            if n_values % 2 or remaining < n_values:
                raise AnnaInputError(
                    f"sampled table with size {size} needs (pixel, wavelength) pairs, found {max(remaining, 0)} "
                    "values", path=path, key=key)
            needed = 5 + n_values
            pairs = np.array([_to_float(t, path, key, "sample") for t in tokens[i + 5:i + needed]])
            sample_pixels = pairs[0::2]
            if np.any(np.diff(sample_pixels) <= 0):
                raise AnnaInputError("sampled table pixels must increase", path=path, key=key)
            values = [str(v) for v in pairs[1::2]]
        coefficients = np.array([_to_float(t, path, key, "coefficient") for t in values], dtype=np.float64)
        terms.append(_Term(weight, zero_point, ftype, size, pmin, pmax, coefficients, sample_pixels))
        i += needed
    return tuple(terms)


def _parse_spec(line, text, path):
    key = f"WAT2 spec{line}"
    tokens = text.split()
    if len(tokens) < 9:
        raise AnnaInputError("needs at least 9 fields (ap beam dtype w1 dw nw z aplow aphigh)",
                             path=path, key=key, value=text.strip())
    aperture = _to_int(tokens[0], path, key, "aperture number")
    beam = _to_int(tokens[1], path, key, "beam number")
    dtype = _to_int(tokens[2], path, key, "dispersion type")
    if dtype == -1:
        raise AnnaInputError("no usable WCS: dispersion type -1 (spectrum not dispersion-calibrated)",
                             path=path, key=key, value=text.strip())
    if dtype not in DTYPE_NAMES:
        raise AnnaInputError("unsupported dispersion type (expected 0 linear, 1 log-linear, 2 non-linear)",
                             path=path, key=key, value=tokens[2])
    w1 = _to_float(tokens[3], path, key, "w1")
    dw = _to_float(tokens[4], path, key, "dw")
    nw = _to_int(tokens[5], path, key, "nw")
    z = _to_float(tokens[6], path, key, "z")
    if nw < 1:
        raise AnnaInputError("no valid pixels (nw < 1)", path=path, key=key, value=tokens[5])
    if z == -1:
        raise AnnaInputError("redshift z = -1 makes 1/(1+z) infinite", path=path, key=key, value=tokens[6])
    terms = ()
    if dtype == 2:
        terms = _parse_terms(tokens[9:], path, key)
        if not terms:
            raise AnnaInputError("non-linear dispersion (dtype 2) without any function", path=path, key=key,
                                 value=text.strip())
        if sum(term.weight for term in terms) == 0:
            raise AnnaInputError("function weights sum to zero", path=path, key=key)
    return _Aperture(line, aperture, beam, dtype, w1, dw, nw, z, terms)


# ----------------------------------------------------------------------------------------------------------
# Whole-file readers


def _rows(data):
    """Flux rows (apertures x pixels) from 1-D, 2-D or 3-D data: band 1 of a 3-D image."""
    if data.ndim == 1:
        return data[np.newaxis, :]
    if data.ndim == 2:
        return data
    if data.ndim == 3:
        return data[0]
    raise AnnaInputError(f"{data.ndim}-D image: only 1-D, 2-D and 3-D spectra are supported")


def _physical_lines(header, n_rows, n_axes, path):
    """Physical image line of each data row (IRAF's specN numbering): p = (l - LTV2) / LTM2_2."""
    ltv2 = _number(header, "LTV2", 0.0, path)
    ltm2 = _number(header, "LTM2_2", 1.0, path) or 1.0
    if n_axes >= 2:
        logical = np.arange(1, n_rows + 1, dtype=np.float64)
        return [int(round(v)) for v in (logical - ltv2) / ltm2]
    # A 1-D image cut from a multispec image: WAXMAP01 may name the removed line; otherwise line 1.
    line = int(round((1 - ltv2) / ltm2))
    waxmap = header.get("WAXMAP01")
    if isinstance(waxmap, str):
        fields = waxmap.split()
        if len(fields) >= 4 and fields[2] == "0":
            try:
                if float(fields[3]) >= 1:
                    line = int(round(float(fields[3])))
            except ValueError:
                pass
    return [line]


def _read_multispec(path, header, data, wat):
    rows = _rows(data)
    n_rows, n_pixels = rows.shape
    wat2 = _attributes(wat.get(2, ""))
    specs = {int(key[4:]): value for key, value in wat2.items() if key.startswith("spec") and key[4:].isdigit()}
    if not specs:
        raise AnnaInputError("no usable WCS: multispec system but no specN attributes in the WAT2 cards",
                             path=path)
    lines = _physical_lines(header, n_rows, data.ndim, path)
    if data.ndim == 1 and lines[0] not in specs and len(specs) == 1:
        lines = list(specs)
    ltv1 = _number(header, "LTV1", 0.0, path)
    ltm1 = _number(header, "LTM1_1", 1.0, path) or 1.0
    physical = (np.arange(1, n_pixels + 1, dtype=np.float64) - ltv1) / ltm1
    spectra = []
    for index, line in enumerate(lines):
        if line not in specs:
            raise AnnaInputError(f"no usable WCS for image row {index + 1}: no spec{line} attribute in the WAT2 "
                                 "cards", path=path)
        aperture = _parse_spec(line, specs[line], path)
        valid = (physical >= 0.5) & (physical <= aperture.nw + 0.5)
        if not valid.any():
            raise AnnaInputError(f"image row {index + 1}: none of the {n_pixels} pixels lies within the nw = "
                                 f"{aperture.nw} valid physical pixels", path=path, key=f"WAT2 spec{line}")
        wavelength = aperture.wavelengths(physical[valid])
        spectra.append(Spectrum(
            wavelength=np.ascontiguousarray(wavelength, dtype=np.float64),
            flux=np.ascontiguousarray(rows[index][valid], dtype=np.float64),
            source=str(path), index=index, aperture=aperture.aperture, beam=aperture.beam,
            dtype=aperture.dtype, function=aperture.describe(), n_pixels=n_pixels))
    return spectra


def _apnum(header, line):
    """(aperture, beam) from the equispec APNUMn keyword, or (None, None)."""
    value = header.get(f"APNUM{line}")
    if not isinstance(value, str):
        return None, None
    fields = value.split()
    try:
        return int(round(float(fields[0]))), (int(round(float(fields[1]))) if len(fields) > 1 else None)
    except (ValueError, IndexError):
        return None, None


def _read_linear(path, header, data):
    rows = _rows(data)
    n_rows, n_pixels = rows.shape
    crval = _number(header, "CRVAL1", None, path)
    if crval is None:
        raise AnnaInputError("no usable WCS: neither multispec WAT cards nor CRVAL1", path=path)
    step = _number(header, "CD1_1", None, path)
    step_key = "CD1_1"
    if not step:
        step, step_key = _number(header, "CDELT1", None, path), "CDELT1"
    if not step:
        raise AnnaInputError("no usable WCS: CRVAL1 without a non-zero CD1_1 or CDELT1", path=path)
    crpix = _number(header, "CRPIX1", 0.0, path)
    dc_flag = _number(header, "DC-FLAG", 0.0, path)
    if dc_flag not in (0.0, 1.0):
        raise AnnaInputError("no usable WCS: DC-FLAG must be 0 (linear) or 1 (log-linear)", path=path,
                             key="DC-FLAG", value=str(header.get("DC-FLAG")))
    wavelength = crval + step * (np.arange(1, n_pixels + 1, dtype=np.float64) - crpix)
    function = f"1-D CRVAL1/{step_key}"
    if dc_flag == 1.0:
        wavelength = 10.0 ** wavelength
        function += " log10 (DC-FLAG=1)"
    if data.ndim > 1:
        function = function.replace("1-D", "equispec", 1)
    ltv2 = _number(header, "LTV2", 0.0, path)
    ltm2 = _number(header, "LTM2_2", 1.0, path) or 1.0
    spectra = []
    for index in range(n_rows):
        line = int(round((index + 1 - ltv2) / ltm2)) if data.ndim > 1 else 1
        aperture, beam = _apnum(header, line)
        spectra.append(Spectrum(
            wavelength=wavelength.copy() if n_rows > 1 else wavelength,
            flux=np.ascontiguousarray(rows[index], dtype=np.float64),
            source=str(path), index=index, aperture=aperture, beam=beam, dtype=None,
            function=function, n_pixels=n_pixels))
    return spectra


def spectra_from_image(header, data, path):
    """Spectra of a 1-D or equispec image with a linear or log-linear WCS (CRVAL1 / CD1_1 or CDELT1 / CRPIX1,
    DC-FLAG), for readers that find the image themselves (a survey file's flux extension)."""
    return _read_linear(os.fspath(path), header, np.asarray(data, dtype=np.float64))


def _system(header, wat):
    """The IRAF WCS system name ("multispec", "equispec", "world", ...) or "" when none is declared."""
    system = _attributes(wat.get(0, "")).get("system", "").lower()
    if not system and str(header.get("CTYPE1", "")).strip().upper() == "MULTISPE":
        system = "multispec"
    return system


def read_spectra(path) -> list[Spectrum]:
    """Read every spectrum (image row) of a FITS file, in row order.

    Handles IRAF multispec images (1-D, 2-D, 3-D; dispersion types 0, 1, 2 with all six function types),
    equispec images and plain 1-D spectra with CRVAL1 / CD1_1 or CDELT1 / CRPIX1 (and DC-FLAG=1 for log10
    wavelengths).  Raises AnnaInputError naming the file and the problem for anything unusable.  An
    aperture whose flux is all NaN is returned as is (the inference stage flags it).
    """
    return _read(os.fspath(path))[0]


def _read(path):
    """(spectra, header, data shape, WCS system, WAT strings) of one file."""
    header, data = _open_image(path)
    if data.ndim > 3:
        raise AnnaInputError(f"{data.ndim}-D image: only 1-D, 2-D and 3-D spectra are supported", path=path,
                             value=str(data.shape))
    wat = _wat_strings(header)
    system = _system(header, wat)
    if system == "multispec":
        spectra = _read_multispec(path, header, data, wat)
    else:
        spectra = _read_linear(path, header, data)
    return spectra, header, data.shape, system, wat


def _shown(value):
    return "-" if value is None else str(value)


def describe_file(path) -> str:
    """A multi-line human summary: WCS format, image shape, and per row the aperture, beam, dispersion type
    and function, valid pixel count and wavelength range."""
    path = os.fspath(path)
    spectra, header, shape, system, wat = _read(path)
    if system == "multispec":
        kind = "IRAF multispec"
    elif system == "equispec":
        kind = "IRAF equispec (shared linear dispersion)"
    else:
        kind = "linear WCS (CRVAL1)"
    units = _attributes(wat.get(1, "")).get("units") or header.get("CUNIT1") or "unspecified"
    dimensions = " x ".join(str(n) for n in shape)
    layout = {1: "1-D (pixels)", 2: "2-D (apertures x pixels)", 3: "3-D (bands x apertures x pixels; band 1 read)"}
    count = f"{len(spectra)} spectrum" if len(spectra) == 1 else f"{len(spectra)} spectra"
    lines = [
        f"{path}",
        f"  format: {kind}; image {dimensions}, {layout[len(shape)]}; {count}; wavelength units: {units}",
        f"  {'row':>4} {'aperture':>8} {'beam':>5} {'dtype':>5}  {'function':<36} {'valid/pixels':>13}"
        "  wavelength range",
    ]
    for spectrum in spectra:
        finite = spectrum.wavelength[np.isfinite(spectrum.wavelength)]
        span = f"{finite.min():.4f} - {finite.max():.4f}" if finite.size else "none"
        counts = f"{len(spectrum.wavelength)}/{spectrum.n_pixels}"
        lines.append(
            f"  {spectrum.index:>4} {_shown(spectrum.aperture):>8} {_shown(spectrum.beam):>5} "
            f"{_shown(spectrum.dtype):>5}  {spectrum.function:<36} {counts:>13}  {span}")
    return "\n".join(lines)


def _text_name(stem, spectrum):
    name = f"{stem}.row{spectrum.index:04d}"
    if spectrum.aperture is not None:
        name += f".ap{spectrum.aperture}"
    return name + ".txt"


def write_text_spectra(path, outdir) -> list[str]:
    """Write every spectrum of ``path`` as a two-column text file ``wavelength flux`` in ``outdir``.

    Values are written with 17 significant digits, which reads back (np.loadtxt) as the identical float64.
    Files are named ``<file stem>.row<NNNN>[.ap<aperture>].txt`` (row first: aperture numbers may repeat),
    each written atomically.  Returns the paths written, in row order.
    """
    path = os.fspath(path)
    spectra = read_spectra(path)
    stem = spectrum_stem(path)
    written = []
    for spectrum in spectra:
        target = os.path.join(os.fspath(outdir), _text_name(stem, spectrum))
        table = np.column_stack([spectrum.wavelength, spectrum.flux])
        with atomic_output(target, "w") as handle:
            np.savetxt(handle, table, fmt="%.17g", delimiter=" ")
        written.append(target)
    return written


# ----------------------------------------------------------------------------------------------------------
# IRAF multispec output

WAT_CHARS_PER_CARD = 68
"""IRAF splits long WCS attribute strings (WATn_mmm) into cards holding exactly 68 characters each."""


def _wat_cards(axis, text):
    """Split ``text`` into the (keyword, value) cards WAT<axis>_001, _002, ... of 68 characters each."""
    return [(f"WAT{axis}_{number:03d}", text[start:start + WAT_CHARS_PER_CARD])
            for number, start in enumerate(range(0, len(text), WAT_CHARS_PER_CARD), start=1)]


def add_multispec_wcs(header, specs):
    """Write IRAF multispec world coordinates for a 2-D (apertures x pixels) image into ``header``.

    ``specs`` are the per-aperture attribute strings "ap beam dtype w1 dw nw z aplow aphigh [...]"; they go into
    WAT2 cards cut at IRAF's 68 characters.
    """
    header["WCSDIM"] = 2
    header["CTYPE1"] = "MULTISPE"
    header["CTYPE2"] = "MULTISPE"
    header["CD1_1"] = 1.0
    header["CD2_2"] = 1.0
    header["LTM1_1"] = 1.0
    header["LTM2_2"] = 1.0
    header["WAT0_001"] = "system=multispec"
    header["WAT1_001"] = "wtype=multispec label=Wavelength units=angstroms"
    wat2 = "wtype=multispec " + " ".join(f'spec{number} = "{spec}"' for number, spec in enumerate(specs, 1))
    for keyword, value in _wat_cards(2, wat2):
        header[keyword] = value
