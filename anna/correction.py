"""The residual-trend correction of guide 4.3.1, both sides of its file: anna-test fits TrueValue =
poly(InferredValue) per label and writes ``correction.json`` beside the frozen model; anna-infer (with
APPLY_CORRECTION) reads it back, applies it, and scales the uncertainties by the polynomial's slope.

The file is tied to the exact frozen model by its sha256, so a retrained model never meets an old correction.
Shared core: both stages import this module, it imports no stage.
"""

import json
import os

import numpy as np

from anna.atomic import file_sha256, write_json
from anna.errors import AnnaInputError
from anna.frozen_file import resolve_model_path

CORRECTION_FILE = "correction.json"
CORRECTION_FORMAT = "anna-tf correction"
CORRECTION_FORMAT_VERSION = 1


def correction_location(model_loc):
    """``correction.json`` path for a model location given as its folder or as the frozen-model file."""
    model_loc = os.fspath(model_loc)
    folder = model_loc if os.path.isdir(model_loc) else os.path.dirname(os.path.abspath(model_loc))
    return os.path.join(folder, CORRECTION_FILE)


def model_fingerprint(model_loc):
    """sha256 of the frozen-model file: ties a correction to the exact network it was fitted for."""
    return file_sha256(resolve_model_path(model_loc))




def fit_correction(true, inferred, names, degree):
    """Fit TrueValue = poly(InferredValue) of ``degree`` per label; returns ``{name: numpy Polynomial}``.

    ``true`` and ``inferred`` are (n, nout) in physical units; non-finite pairs are left out.  The fit uses
    numpy's scaled domain (the range of the inferred values), which keeps high degrees well conditioned;
    that domain is also the range inside which anna-infer trusts the correction.
    """
    polynomials = {}
    for k, name in enumerate(names):
        x = np.asarray(inferred[:, k], dtype=np.float64)
        y = np.asarray(true[:, k], dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        if np.count_nonzero(keep) <= degree or np.ptp(x[keep]) == 0:
            raise AnnaInputError(f"cannot fit a degree-{degree} correction for {name}: "
                                 f"{int(np.count_nonzero(keep))} usable stars with "
                                 f"{len(np.unique(x[keep]))} distinct inferred values", key="CORRECTION_DEGREE",
                                 value=degree)
        polynomials[name] = np.polynomial.Polynomial.fit(x[keep], y[keep], int(degree))
    return polynomials


def apply_correction(polynomials, inferred, names):
    """Corrected labels (n, nout) and a per-row bool (n,) marking values outside a fit's inferred range."""
    inferred = np.asarray(inferred, dtype=np.float64)
    corrected = inferred.copy()
    outside = np.zeros(inferred.shape[0], dtype=bool)
    for k, name in enumerate(names):
        polynomial = polynomials[name]
        column = inferred[:, k]
        finite = np.isfinite(column)
        corrected[finite, k] = polynomial(column[finite])
        low, high = polynomial.domain
        outside |= finite & ((column < low) | (column > high))
    return corrected, outside


def save_correction(path, polynomials, *, degree, fingerprint, testing_data, n_stars, scatter):
    """Write the correction file atomically.  ``scatter`` is ``{name: {before: stats, after: stats}}``."""
    labels = {}
    for name, polynomial in polynomials.items():
        labels[name] = {"coef": polynomial.coef.tolist(), "domain": polynomial.domain.tolist(),
                        "window": polynomial.window.tolist(), "before": scatter[name]["before"],
                        "after": scatter[name]["after"]}
    write_json(path, {"format": CORRECTION_FORMAT, "format_version": CORRECTION_FORMAT_VERSION,
                      "relation": "true = numpy.polynomial.Polynomial(coef, domain, window)(inferred)",
                      "degree": int(degree), "model_sha256": fingerprint, "testing_data": testing_data,
                      "n_stars": int(n_stars),
                      "note": "before/after statistics are measured on the stars the correction was fitted to",
                      "labels": labels})


def load_correction(model_loc, names, *, key="APPLY_CORRECTION", source=None):
    """Read ``correction.json`` beside the model; returns ``{name: Polynomial}`` for every name in ``names``.

    Refuses a missing file, a file for other labels, or one fitted for a different frozen model.
    """
    path = correction_location(model_loc)
    if not os.path.exists(path):
        raise AnnaInputError(f"is YES but there is no {path} (fit one with anna-test and FIT_CORRECTION YES)",
                             path=source, key=key)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format") != CORRECTION_FORMAT or data.get("format_version") != CORRECTION_FORMAT_VERSION:
            raise AnnaInputError("not an ANNA-TF correction file (format tag missing or of another version)",
                                 path=path)
        labels = data["labels"]
        missing = [name for name in names if name not in labels]
        if missing:
            raise AnnaInputError(f"correction has no entry for {missing}; it covers {sorted(labels)}", path=path)
        polynomials = {name: np.polynomial.Polynomial(labels[name]["coef"], domain=labels[name]["domain"],
                                                      window=labels[name]["window"]) for name in names}
    except AnnaInputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AnnaInputError(f"correction file is malformed ({type(exc).__name__}: {exc})", path=path) from None
    if data.get("model_sha256") != model_fingerprint(model_loc):
        raise AnnaInputError("correction was fitted for a different frozen model (the model changed since "
                             "anna-test wrote it); rerun anna-test with FIT_CORRECTION YES", path=path)
    return polynomials


def correction_slopes(polynomials, inferred, names):
    """|dp/dx| of each label's correction polynomial at the inferred values (n, nout): how errors scale."""
    slopes = np.ones_like(np.asarray(inferred, dtype=np.float64))
    for k, name in enumerate(names):
        column = inferred[:, k]
        finite = np.isfinite(column)
        slopes[finite, k] = np.abs(polynomials[name].deriv()(column[finite]))
        slopes[~finite, k] = np.nan
    return slopes
