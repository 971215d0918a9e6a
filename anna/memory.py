"""How many spectra anna-test and anna-infer send through the network at once: batches sized by memory.

A fixed count cannot suit every network.  4096 spectra suited the tutorial network (1001 pixels, 10 kernels:
about 0.1 MB of activations per spectrum), but a StarNet-shaped network on 7214-pixel APOGEE spectra makes
about 0.9 MB per spectrum, so the same count needed 3.7 GB per batch and the whole run 6.3 GB.  With
``INFER_BATCH_SIZE`` / ``TEST_BATCH_SIZE`` AUTO (the default) the batch is the largest that fits
``MAX_MEMORY_GB``, the peak memory the whole process may use:

    batch = (MAX_MEMORY_GB − memory already in use − HEADROOM) / bytes per spectrum, within MIN..MAX_BATCH

*bytes per spectrum* is measured on the built network: every layer's output for one spectrum, summed as if
all were alive at once, times :data:`ALLOCATOR_FACTOR` for what the allocator's pool keeps beside them, plus
what the reading side holds per spectrum (:data:`PIPELINE_BYTES_PER_PIXEL`).  With MC dropout the
part of the network after the first dropout layer runs once per pass on tiled rows, so one graph call handles
as many spectra as the same budget allows for (network + passes × top) bytes per spectrum.  An explicit count
still wins, and MC dropout then keeps the budget for its calls.

This module owns the rule and its numbers; :class:`anna.model.FrozenModel` measures the network and applies
the plan.  It is shared core: the stages import it, it imports no stage.
"""

import dataclasses
import os
import resource
import sys

import numpy as np

GIB = 1 << 30
# Kept free of batches under MAX_MEMORY_GB for what the estimate does not see: compiled code and the
# compiler's own working memory, the Python objects of the output rows, allocator fragmentation.
HEADROOM_BYTES = 256 << 20
# Bytes per pixel per spectrum that the reading side holds besides the network: in anna-infer a block read as
# float64 (8), its float32 copy for the network (4) and the training-domain statistics' float32 temporaries
# (3 x 4), for the block being predicted and the next one being read (x 2); in anna-test the chunk as read,
# its noised copy and the noise draws (float64, 3 x 8), and the float32 copy.
PIPELINE_BYTES_PER_PIXEL = 48
# The network's measured activations are counted this many times: TensorFlow's pooling allocator keeps freed
# blocks and their fragments, and grows its pool in doubling regions.  Measured: a StarNet-shaped network on
# 7214-pixel spectra (0.83 MB of activations per spectrum) took 2.06 GB at its peak with 512 spectra per batch
# over 0.70 GB in use before, 2.3 MB per spectrum beyond what reading holds, i.e. 2.8x (benchmarks/,
# survey_infer rows).
ALLOCATOR_FACTOR = 3
# Batches are rounded down to a power of two (a handful of compiled batch shapes) within these bounds:
# below 16 spectra the per-call cost dominates; above 4096 nothing was faster (benchmarks/, inference rows).
MIN_BATCH = 16
MAX_BATCH = 4096


def resident_bytes():
    """Memory the process holds now (resident set), in bytes; the peak so far where /proc is unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_resident_bytes()


def peak_resident_bytes():
    """The process's peak resident set so far, in bytes: VmHWM from /proc where there is one, else
    ``ru_maxrss`` (KiB on Linux, bytes on macOS).  Why VmHWM first: Linux carries ``ru_maxrss`` across
    ``exec``, so a process started by a large parent reports the parent's peak as its own (every measurement
    child of the benchmarks showed its 2.06 GB parent), while VmHWM belongs to the process's own memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def floats_per_row(model):
    """Floats of every layer output of a Keras ``model`` for one input row, summed (the input included)."""
    total = 0
    for layer in model.layers:
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        total += sum(int(np.prod(output.shape[1:])) for output in outputs)
    return total


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How anna-test and anna-infer cut their spectra: ``batch`` spectra per read block and network call;
    ``mc_spectra_per_call`` spectra per MC-dropout graph call (None without MC dropout); ``text`` the one
    line reported at start-up."""

    batch: int
    mc_spectra_per_call: int = None
    text: str = ""


def power_of_two_at_most(value, low=MIN_BATCH, high=MAX_BATCH):
    """The largest power of two <= ``value``, clipped to [low, high]."""
    value = int(max(value, 1))
    return int(min(max(1 << (value.bit_length() - 1), low), high))


def plan_batches(setting, max_memory_gb, spectrum_bytes, npix, mc_bytes=None, in_use=None, key="BATCH_SIZE"):
    """The :class:`BatchPlan` for a batch-size key's ``setting`` ("AUTO" or a count).

    ``spectrum_bytes``: the network's bytes per spectrum in one forward pass; ``mc_bytes``: with MC dropout,
    (bytes per sample-row of the part after the first dropout layer, passes); ``in_use``: bytes the process already holds
    (default: measured now).  ``key`` names the setting in the report."""
    budget = float(max_memory_gb) * GIB
    in_use = resident_bytes() if in_use is None else int(in_use)
    free = budget - in_use - HEADROOM_BYTES
    per_spectrum = ALLOCATOR_FACTOR * spectrum_bytes + PIPELINE_BYTES_PER_PIXEL * npix
    budget_text = f"MAX_MEMORY_GB {max_memory_gb:g}, {in_use / GIB:.2f} GB in use"
    short = free < MIN_BATCH * per_spectrum
    if setting == "AUTO":
        batch = power_of_two_at_most(free / per_spectrum)
        text = (f"{key} AUTO: {batch} spectra per batch ({per_spectrum / 2**20:.2f} MB each: network "
                f"{ALLOCATOR_FACTOR} x {spectrum_bytes / 2**20:.2f}, reading "
                f"{PIPELINE_BYTES_PER_PIXEL * npix / 2**20:.2f}; {budget_text})")
    else:
        batch = int(setting)
        text = f"{key} {batch} (as set; AUTO would fit {power_of_two_at_most(free / per_spectrum)} in {budget_text})"
    mc_per_call = None
    if mc_bytes is not None:
        top, passes = mc_bytes
        left = free - batch * PIPELINE_BYTES_PER_PIXEL * npix
        # one call: the dropout-free pass (shared trunk, variance head) plus the top once per pass
        mc_per_call = int(max(1, min(batch, left // (ALLOCATOR_FACTOR * (spectrum_bytes + passes * top)))))
        text += f"; MC dropout: {mc_per_call} spectra x {passes} passes per call"
    if short:
        text += (f"; WARNING: the budget leaves room for fewer than {MIN_BATCH} spectra, so the run may use more "
                 "than MAX_MEMORY_GB (raise it)")
    return BatchPlan(batch=batch, mc_spectra_per_call=mc_per_call, text=text)
