"""Files ANNA-TF writes: atomic output (results appear whole under their final name or not at all), JSON
through it, and the content hash that ties one file to another (a correction or a frozen model to the exact
file it was made from)."""

import hashlib
import io
import json
import math
import os
import tempfile
import zipfile

import numpy as np


class atomic_output:
    """Context manager: open a temporary file beside ``path``; on success fsync and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched, so a crash never leaves a
    half-written result under the final name.  Parent folders are created as needed.
    """

    def __init__(self, path, mode="w", **open_kwargs):
        self.path = os.fspath(path)
        self.mode = mode
        self.open_kwargs = open_kwargs

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        prefix = "." + os.path.basename(self.path) + "."
        _remove_orphans(folder, prefix)
        # the writer's pid is in the name, so a later run can tell a dead writer's leftover from a live one's
        fd, self.tmp_path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=folder)
        # mkstemp creates 0600 files; give the result the permissions an ordinary open() would (0666 - umask)
        os.fchmod(fd, 0o666 & ~_current_umask())
        self.handle = os.fdopen(fd, self.mode, **self.open_kwargs)
        return self.handle

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
        finally:
            if exc_type is None:
                os.replace(self.tmp_path, self.path)
            elif os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
        return False


def _current_umask():
    """The process umask, read without changing it where /proc allows (os.umask can only set-and-return)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_orphans(folder, prefix):
    """Delete temporary files for the same target left by writers that no longer run (killed with -9).

    Files of live processes (another run writing the same output now) are left alone.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass


def process_alive(pid):
    """Whether process ``pid`` of this machine still runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def jsonable(value):
    """Nested structure with numpy scalars/arrays turned into Python values and NaN/inf into None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path, data):
    with atomic_output(path, "w", encoding="utf-8") as handle:
        json.dump(jsonable(data), handle, indent=1)
        handle.write("\n")


def file_sha256(path, block=1 << 22):
    """Hex sha256 of a file's bytes, read in blocks so that a pack of any size hashes in bounded memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_array_archive(path, documents, arrays, compress=False):
    """One zip file, written atomically: each of ``documents`` ({name: text}) as a member, then each of
    ``arrays`` ({name: list of arrays}) as ``<name>.npz``.  The container of frozen models (documents
    compressed) and checkpoints (stored: written every interval, read once).  Arrays are always stored: float
    weights deflate by about 8 %, and inflating them cost 0.25 s of every load of a StarNet-shaped 7214-pixel
    model (0.05 s at 1001 pixels), where its metadata (JSON, mostly the training-domain description) deflates
    to a third at 0.01 s."""
    with atomic_output(path, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, text in documents.items():
                archive.writestr(name, text, compress_type=zipfile.ZIP_DEFLATED if compress else None)
            for name, values in arrays.items():
                buffer = io.BytesIO()
                np.savez(buffer, *[np.asarray(v) for v in values])
                archive.writestr(f"{name}.npz", buffer.getvalue())


def read_array_archive(path):
    """(documents {name: text}, arrays {name: list of arrays}) of a :func:`write_array_archive` file.  Raises
    zipfile, zlib, OS and value errors as they come: the caller knows what the file should have been."""
    documents, arrays = {}, {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(".npz"):
                with np.load(io.BytesIO(archive.read(name))) as stored:
                    arrays[name[:-4]] = [stored[f"arr_{i}"] for i in range(len(stored.files))]
            else:
                documents[name] = archive.read(name).decode("utf-8")
    return documents, arrays
