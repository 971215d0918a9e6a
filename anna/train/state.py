"""What survives a stopped run: the checkpoint (state and arrays in one file, written in the background), the
fingerprint of the parameters a resume must match, and the Ctrl-C / SIGTERM request that ends a run cleanly.
"""

import contextlib
import json
import os
import signal
import time
import zipfile

from anna.atomic import read_array_archive, write_array_archive
from anna.errors import AnnaInputError

CHECKPOINT_NAME = "checkpoint.anna"
PARTIAL_MODEL_NAME = "frozen.partial.model"


class SkipRest(BaseException):
    """Raised by a signal inside :meth:`StopRequest.skippable`: what is left of that block is skipped.

    A BaseException, as KeyboardInterrupt is: library code that catches Exception must not swallow it."""

    def __init__(self, signal_name):
        super().__init__(f"skipped by {signal_name}")
        self.signal_name = signal_name


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a stop happens between batches, never mid-write.

    The run passes through three phases, and a signal means what the user waiting at that moment wants:

    * training (the default): the first signal sets the flag (``signal_name``, and ``signal_time`` for the cost
      of stopping); a second gives up at once (KeyboardInterrupt: no model, the checkpoint stays);
    * inside :meth:`skippable` (the parts of the frozen model computed after training): a signal raises
      :class:`SkipRest` in the block, so the model is written at once without the parts not yet done;
    * after :meth:`hold` (the model being written): signals are recorded and nothing is interrupted, since a
      model written whole, in a second or two, is what the user is waiting for.
    """

    def __init__(self):
        self.signal_name = None
        self.signal_time = None
        self.skipped_by = None
        self._phase = "training"
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._phase == "skippable":
            self._phase = "hold"
            self.skipped_by = name
            raise SkipRest(name)
        if self._phase == "hold":
            return
        if self.signal_name is not None:  # second Ctrl-C during training: give up at once
            raise KeyboardInterrupt
        self.signal_name = name
        self.signal_time = time.perf_counter()

    @contextlib.contextmanager
    def skippable(self):
        """A block a signal cuts short (:class:`SkipRest` is raised in it); the hold phase follows it."""
        self._phase = "skippable"
        try:
            yield self
        finally:
            self._phase = "hold"

    def hold(self):
        """From now on signals interrupt nothing (the frozen model is being written)."""
        self._phase = "hold"

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
