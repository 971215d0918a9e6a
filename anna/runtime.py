"""The TensorFlow runtime ANNA-TF's commands run in: the environment it must see before it is imported, and its
thread pools.  Shared core: every command calls :func:`prepare_tensorflow_environment` before importing a
stage, and a stage calls :func:`configure_threads` before TensorFlow runs anything.

Why the allocator: with TensorFlow's default CPU allocator every large activation is a fresh ``malloc``, which
glibc serves above 32 MiB with ``mmap`` and returns with ``munmap`` when the batch is done, so each batch of a
survey network pays a page fault per 4 KiB of its activations.  Measured on 2 cores, a StarNet-shaped network
on 7214-pixel spectra spent 2.1 s of kernel time per 4000 spectra in those faults (570,000 of them), and
predicted 1,300 spectra/s; with TensorFlow's pooling (BFC) allocator on the CPU, which keeps freed blocks for
the next batch, the faults went and the rate rose to 2,500 spectra/s at the same peak memory
(benchmarks/, inference rows).

Why the persistent XLA cache: a command that runs a network compiled by XLA compiles it at start, per batch
shape: 0.3-0.6 s for the tutorial network, more for survey networks, paid again by every run, which for
anna-infer over a night's files or a short anna-test is a large part of the run.  TensorFlow can keep the
compiled programs on disk (``--tf_xla_persistent_cache_directory`` in ``TF_XLA_FLAGS``); ANNA-TF points it at
a folder of its cache named after the CPU (model and instruction-set flags) and the TensorFlow version, so a
home folder shared by the nodes of a cluster never hands one CPU a program built for another.
"""

import os
import re
import sys
import tempfile

# Environment TensorFlow reads when it starts; set only where the user has not set them.
TENSORFLOW_ENVIRONMENT = {
    # C++ start-up notices (CPU features, oneDNN) are noise on a user's terminal; errors still show
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # the pooling allocator on the CPU (module docstring)
    "TF_CPU_ALLOCATOR_USE_BFC": "true",
}


# The TF_XLA_FLAGS flag that keeps XLA's compiled programs on disk (module docstring).
XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def prepare_tensorflow_environment(environ=None, quiet=True):
    """Put :data:`TENSORFLOW_ENVIRONMENT` into ``environ`` (default ``os.environ``) where not already set, and
    XLA's persistent cache (:func:`xla_cache_folder`) into ``TF_XLA_FLAGS`` unless the flags already name one;
    ``quiet`` False (``--debug``) leaves TensorFlow's log level alone, so that it shows everything.

    Must run before TensorFlow is imported to have any effect; returns the names it set."""
    environ = os.environ if environ is None else environ
    added = []
    for name, value in TENSORFLOW_ENVIRONMENT.items():
        if not quiet and name == "TF_CPP_MIN_LOG_LEVEL":
            continue
        if name not in environ:
            environ[name] = value
            added.append(name)
    flags = environ.get("TF_XLA_FLAGS", "")
    if XLA_CACHE_FLAG not in flags:
        environ["TF_XLA_FLAGS"] = f"{flags} {XLA_CACHE_FLAG}={xla_cache_folder(environ)}".strip()
        added.append("TF_XLA_FLAGS")
    return added


def cache_folder(environ=None):
    """ANNA-TF's cache folder: $ANNA_TF_CACHE_DIR, else ~/.cache/anna-tf."""
    environ = os.environ if environ is None else environ
    return environ.get("ANNA_TF_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "anna-tf")


def xla_cache_folder(environ=None):
    """Where XLA keeps compiled programs: ``xla-<digest>`` in :func:`cache_folder`, the digest of this CPU's
    model and instruction-set flags and the installed TensorFlow's version (read without importing it)."""
    import hashlib
    from importlib import metadata

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    cpu += line
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        import platform

        cpu = f"{platform.machine()} {platform.processor()}"
    try:
        version = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha1(f"{cpu}\n{version}".encode()).hexdigest()[:12]
    return os.path.join(cache_folder(environ), f"xla-{digest}")


# ----------------------------------------------------------------------------------------------------------
# A quiet start: what TensorFlow's C++ runtime prints while it loads
#
# TensorFlow's runtime writes to the process's stderr file descriptor while it is imported and while it looks
# for GPUs, before its log level applies: absl's "All log messages before absl::InitializeLog()" banner, notices
# (I...) about oneDNN and CUDA drivers, and on a machine without a GPU driver an error line (E... failed call to
# cuInit) that reads as a failure though nothing failed.  start_tensorflow catches that descriptor for the
# import and the GPU search and keeps only what matters.

# absl's banner, printed once before its logging is set up
_ABSL_BANNER = re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$")
# one line of the runtime's own log: severity letter, date, time (before absl is set up, seconds since 1970),
# thread, source file:line]
_RUNTIME_LOG_LINE = re.compile(r"^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ (?P<source>[^\]]+)\] (?P<message>.*)$")
# what the runtime says when it looks for CUDA and finds none usable (no driver, no device, no libraries)
_GPU_SEARCH = re.compile(r"cuInit|cuda|CUDA|GPU|cuDNN|cuFFT|cuBLAS|TensorRT|NUMA", re.IGNORECASE)
# a GPU the kernel driver knows of, whether or not TensorFlow can use it
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def gpu_device_present():
    """A device file of an NVIDIA (or AMD, or WSL) GPU: a GPU is in the machine, usable by TensorFlow or not."""
    return any(os.path.exists(path) for path in _GPU_DEVICE_FILES)


def runtime_notices(caught_text, gpus_seen, gpu_present):
    """What of the runtime's start-up output a user should see: ``(notices, passed_on)``.

    ``notices`` are plain sentences (a GPU is present but TensorFlow cannot use it); ``passed_on`` are lines
    this function does not know, given back as they were (they may matter).  Dropped: absl's banner, every
    notice (I), and the GPU search's warnings and errors when there is no GPU to find or one was found.
    """
    notices, passed_on, gpu_trouble = [], [], []
    for line in caught_text.splitlines():
        if not line.strip() or _ABSL_BANNER.match(line):
            continue
        match = _RUNTIME_LOG_LINE.match(line)
        if match is None:
            passed_on.append(line)
        elif match["severity"] == "I":
            continue
        elif _GPU_SEARCH.search(match["message"]) or _GPU_SEARCH.search(match["source"]):
            gpu_trouble.append(match["message"])
        else:
            passed_on.append(line)
    if gpu_present and not gpus_seen:
        reason = f" ({gpu_trouble[-1]})" if gpu_trouble else ""
        notices.append(f"a GPU is present but TensorFlow cannot use it{reason}; running on the CPU "
                       "(--debug shows TensorFlow's own messages)")
    return notices, passed_on


def start_tensorflow(debug=False):
    """Import TensorFlow and Keras and let the runtime look for GPUs, quietly; returns the notices to show.

    The process's stderr file descriptor is caught for the import and the GPU search (module comment above)
    and :func:`runtime_notices` decides what of it is shown: notices come back as plain sentences for the
    command to print as its own lines, unknown lines are written to stderr as they were.  With ``debug``
    everything is written as it came.  Call :func:`prepare_tensorflow_environment` first.
    """
    if "tensorflow" in sys.modules:  # already started (a second command in one process)
        return []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import keras  # noqa: F401  (its start-up messages belong to the same window)
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", errors="replace")
    if debug:
        sys.stderr.write(text)
        sys.stderr.flush()
        return []
    notices, passed_on = runtime_notices(text, bool(gpus), gpu_device_present())
    for line in passed_on:
        print(line, file=sys.stderr)
    return notices


def versions_text(prog):
    """``--version``'s line: the command, ANNA-TF's, TensorFlow's and Python's versions.

    TensorFlow's version is read from its installed metadata, so ``--version`` answers without loading it."""
    import platform
    from importlib import metadata

    from anna import __version__

    try:
        tensorflow = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        tensorflow = "not installed"
    return f"{prog} (ANNA-TF) {__version__}, TensorFlow {tensorflow}, Python {platform.python_version()}"


def configure_threads():
    """Use every core for the maths ops and two inter-op threads (the producer and the training step).

    Must run before TensorFlow starts its runtime; later calls (tests in one process) are harmless no-ops.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 1)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass


# ----------------------------------------------------------------------------------------------------------
# Remembered timings: which compiled form was fastest for a network on this machine


def compiled_form_cache_path():
    """Where JIT_COMPILE AUTO remembers its choices: compiled-forms.json in :func:`cache_folder`."""
    return os.path.join(cache_folder(), "compiled-forms.json")


def machine_description():
    """CPU model, cores, TensorFlow version and GPU count: part of every remembered choice's key."""
    import platform

    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU"))}


def read_remembered(cache_path=None):
    """The remembered choices (a dict key -> entry); empty when the file is missing or unreadable."""
    import json

    try:
        with open(cache_path or compiled_form_cache_path(), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(key, entry, cache_path=None):
    """Add ``key`` -> ``entry`` to the remembered choices (atomically); returns None, or the error text when the
    file could not be written (the caller reports it: later runs will time again)."""
    import json

    from anna.atomic import atomic_output

    cache_path = cache_path or compiled_form_cache_path()
    cache = read_remembered(cache_path)
    cache[key] = entry
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with atomic_output(cache_path, "w") as handle:
            json.dump(cache, handle, indent=1)
    except OSError as error:
        return str(error.strerror or error)
    return None
