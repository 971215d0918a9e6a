"""What survives a stopped run: the checkpoint (state and arrays in one file, written in the background), the
fingerprint of the parameters a resume must match, and the Ctrl-C / SIGTERM request that ends a run cleanly.
"""

import json
import os
import signal
import zipfile

from anna.atomic import read_array_archive, write_array_archive
from anna.errors import AnnaInputError

CHECKPOINT_NAME = "checkpoint.anna"
PARTIAL_MODEL_NAME = "frozen.partial.model"


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a stop happens between batches, never mid-write."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self):
        return self.signal_name is not None


def training_fingerprint(cfg):
    """Parameters that decide what training computes; a checkpoint is resumed only when they are unchanged."""
    from anna.params import resume_neutral_keys

    neutral = resume_neutral_keys()
    return {key: value for key, value in cfg.as_dict().items() if key not in neutral}


def is_complete_model(path):
    if not os.path.exists(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(json.loads(archive.read("metadata.json")).get("complete", False))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return False


def write_checkpoint(path, state_json, arrays):
    """Checkpoint = ``state.json`` (already serialised) and one npz per list of arrays, in one file; atomic."""
    write_array_archive(path, {"state.json": state_json}, arrays)


def read_checkpoint(path):
    try:
        documents, arrays = read_array_archive(path)
        state = json.loads(documents["state.json"])
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise AnnaInputError(f"checkpoint is unreadable ({exc}); delete it or set RESUME: NO", path=path) from None
    return state, arrays
