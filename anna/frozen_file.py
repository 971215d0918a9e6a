"""The frozen-model file read without TensorFlow: where it is, whether it is one, and what it says about itself.

A frozen model is one zip file (anna.atomic.write_array_archive) holding ``metadata.json`` and the weights.
Everything that can be known from the metadata alone — that the file exists and is a readable ANNA-TF model of
a known format version, its labels, grid and training parameters — is read here, so that a command finds a
bad model before it loads TensorFlow, and ``anna-info`` describes a model without loading it at all.
:func:`anna.model.load_frozen` reads the file through :func:`read_frozen_file` and builds the network.
"""

import json
import os
import zipfile
import zlib

from anna.atomic import read_array_archive
from anna.errors import AnnaInputError

FROZEN_MODEL_NAME = "frozen.model"
FORMAT_NAME = "anna-tf frozen model"
FORMAT_VERSION = 2
# Formats this version reads: 1 had (width, kernels) pairs and one pooling after the last convolution.
READABLE_FORMAT_VERSIONS = (1, 2)
# What load_frozen and its users rely on; a model lacking any of these is refused with a clear message.
REQUIRED_METADATA = ("network", "output_names", "wavelengths", "min_params", "max_params")


def resolve_model_path(location):
    """Accept either the frozen-model file or the folder holding ``frozen.model`` (SAVE_LOC style)."""
    location = os.fspath(location)
    if os.path.isdir(location):
        return os.path.join(location, FROZEN_MODEL_NAME)
    return location


def read_frozen_file(location, weights=True):
    """``(path, metadata, weights)`` of the frozen model at ``location`` (file or folder), checked: an
    AnnaInputError names the file and what is wrong.  ``weights`` False reads only the metadata member
    (weights None): the quick look of the input checks and anna-info."""
    path = resolve_model_path(location)
    if not os.path.exists(path):
        raise AnnaInputError("no frozen model here (train first, or point TEST_MODEL_LOC/INFER_MODEL_LOC "
                             "at the folder holding frozen.model)", path=path)
    try:
        if weights:
            documents, arrays = read_array_archive(path)
        else:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                documents = {name: None for name in names if not name.endswith(".npz")}
                if "metadata.json" in documents:
                    documents["metadata.json"] = archive.read("metadata.json").decode("utf-8")
                arrays = {name[:-4]: None for name in names if name.endswith(".npz")}
        if "metadata.json" not in documents or "weights" not in arrays:
            members = sorted(list(documents) + [f"{name}.npz" for name in arrays])
            raise AnnaInputError(f"not an ANNA-TF frozen model (archive holds {members})", path=path)
        metadata = json.loads(documents["metadata.json"])
    except AnnaInputError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError) as exc:
        raise AnnaInputError(f"frozen model is corrupted or not a frozen model ({type(exc).__name__}: {exc})",
                             path=path) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise AnnaInputError("not an ANNA-TF frozen model (metadata has no ANNA-TF format tag)", path=path)
    if metadata.get("format_version") not in READABLE_FORMAT_VERSIONS:
        from anna import __version__
        raise AnnaInputError(
            f"frozen model format {metadata.get('format_version')} written by ANNA-TF "
            f"{metadata.get('anna_version')}; this ANNA-TF {__version__} reads formats "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}",
            path=path)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise AnnaInputError(f"frozen model metadata lacks {', '.join(missing)} (damaged or hand-edited file)",
                             path=path)
    return path, metadata, arrays["weights"]
