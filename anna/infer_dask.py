"""anna-infer on a Dask cluster (INFER_SCHEDULER): the same inputs, predictions and outputs as the run in one
process (:mod:`anna.infer`), with the work spread over Dask ``distributed`` workers.

* ``tcp://host:port`` (or ``tls://``): a running scheduler -- a ``dask-jobqueue`` SLURM/PBS cluster, a
  ``dask scheduler`` with ``dask worker`` processes, another program's ``LocalCluster``.  The workers must be
  able to import ANNA-TF and to read the inputs, the model and INFER_SAVE_LOC at the same paths.
* ``local:N``: a ``LocalCluster`` of N single-threaded worker processes on this machine, for this run only.

Each worker loads the frozen model once, when the run registers :class:`ModelOnWorker` with the scheduler (a
worker plugin; a worker started later, e.g. one restarted after a crash, gets it too), not once per task.
INFER_FILES are cut into tasks of consecutive inputs; a task predicts its inputs as the one-process run does
(:class:`anna.infer._FileBatcher`: several small inputs per forward pass) and writes each output itself,
atomically.  A pack in DEBUG mode is cut into row blocks; each task returns its block's rows as text and the
client writes the one output, atomically, in row order.

What the run promises: an unreadable input is a named failure in the report, never the end of the run (as in
one process); when a worker dies, Dask runs its tasks again elsewhere, and a task run again skips the inputs
whose outputs are already complete (the rerun rule of :mod:`anna.infer`), so nothing is lost and nothing is
written twice.  The run prints the dashboard's address, a progress line per finished task, and the per-input
lines of a local run.
"""

import csv
import importlib.util
import io
import math
import os
import time

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.infer import (Predictor, _FileBatcher, _has_error_columns, _is_done, _OutputTable, _report_written,
                        output_header, pack_rows_block)

try:  # the dask extra; without it INFER_SCHEDULER says what to install (_distributed)
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:
    WorkerPlugin = object

PLUGIN_NAME = "anna-infer-model"
# Tasks per worker the inputs are cut into: enough that a lost worker costs little work and the last tasks
# balance, few enough that the per-task cost (a few ms of scheduling) stays small beside the work.
TASKS_PER_WORKER = 4
# At most this many inputs per task, however many inputs there are.
MAX_INPUTS_PER_TASK = 256
# DEBUG mode: forward-pass batches per row-block task.
BATCHES_PER_BLOCK = 4


def _distributed(cfg):
    try:
        import distributed
    except ImportError:
        raise AnnaInputError("needs Dask's distributed package, which is not installed "
                             "(pip install \"anna-tf[dask]\")", path=cfg.source, key="INFER_SCHEDULER",
                             value=cfg.infer_scheduler) from None
    return distributed


class ModelOnWorker(WorkerPlugin):
    """A Dask worker plugin: loads the frozen model and builds the :class:`~anna.infer.Predictor` once per
    worker (``setup``), with the settings the client chose (batch, forward form, correction, MC passes), so the
    workers predict exactly as the one-process run would.  ``intra_op_threads`` (local clusters): TensorFlow's
    threads per worker, so that N workers share the machine's cores instead of each taking all of them."""

    name = PLUGIN_NAME

    def __init__(self, settings, intra_op_threads=None):
        self.settings = settings
        self.intra_op_threads = intra_op_threads
        self.predictor = None

    def setup(self, worker=None):
        from anna.runtime import prepare_tensorflow_environment

        prepare_tensorflow_environment()
        import tensorflow as tf

        from anna.model import load_frozen

        if self.intra_op_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.intra_op_threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TensorFlow already ran in this process: it keeps its threads
                pass
        s = self.settings
        model = load_frozen(s["model_loc"], dropout_seed=s["dropout_seed"])
        if s["forward_form"] is not None:  # the client's choice (JIT_COMPILE), so numbers match its run
            model.forward_form = s["forward_form"]
        self.predictor = Predictor(model, s["batch"], s["range_margin"], s["correction"], s["mc_samples"],
                                   s["max_rel_sigma"], None)

    def teardown(self, worker=None):
        self.predictor = None


def _predictor():
    from distributed import get_worker

    return get_worker().plugins[PLUGIN_NAME].predictor


def infer_inputs_task(items, dependencies):
    """One task: predict and write each input of ``items`` ((label, path, reader, output) tuples) not already
    complete.  Returns the report lines, the outputs written and the inputs that failed, as the client needs."""
    predictor = _predictor()
    lines, failures, complete = [], [], []
    with _FileBatcher(predictor, lines.append) as batcher:
        for label, path, reader, output in items:
            if _is_done(output, [path, *dependencies]) and _has_error_columns(output) == predictor.with_errors:
                # a task run again after its worker was lost: this input's output is already whole
                complete.append(output)
                lines.append(f"{label}: complete before its worker was lost -> {output}")
                continue
            started = time.monotonic()
            try:
                blocks = list(reader(path, predictor.model))
            except AnnaInputError as error:
                failures.append(str(error))
                lines.append(f"{label}: FAILED: {error}")
                continue
            batcher.add(label, output, blocks, started)
    return {"lines": lines, "written": batcher.written + complete, "failures": failures}


def infer_rows_task(path, start, stop):
    """One DEBUG-mode task: pack rows start..stop-1 predicted; returns their CSV rows (text), the header and the
    counts (spectra, without result, flagged)."""
    from anna.packs import open_pack

    predictor = _predictor()
    pack = open_pack(path, check_labels=False)
    text = io.StringIO()
    table = _OutputTable.rows_only(predictor, text)  # the client writes the header once
    for first in range(start, stop, predictor.batch_size):
        last = min(stop, first + predictor.batch_size)
        block = pack_rows_block(pack, first, last)
        table.write_block(block, *predictor.predict(block))
    return {"start": start, "text": text.getvalue(), "counts": table.counts}


def _connect(cfg, distributed):
    """(client, cluster or None, TensorFlow threads per worker or None): the scheduler INFER_SCHEDULER names,
    or a LocalCluster of this run."""
    address = cfg.infer_scheduler
    timeout = float(cfg.infer_scheduler_timeout)
    if address.startswith("local:"):
        import logging

        workers = int(address.split(":", 1)[1])
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                           silence_logs=logging.ERROR)
        return distributed.Client(cluster, timeout=timeout), cluster, max(1, (os.cpu_count() or 1) // workers)
    try:
        client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise AnnaInputError(f"no Dask scheduler answered within {timeout:g} s (INFER_SCHEDULER_TIMEOUT): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}",
                             path=cfg.source, key="INFER_SCHEDULER", value=address) from None
    return client, None, None


def _groups(items, workers):
    """``items`` cut into runs of consecutive inputs, TASKS_PER_WORKER per worker (at most
    MAX_INPUTS_PER_TASK inputs each)."""
    size = max(1, min(MAX_INPUTS_PER_TASK, math.ceil(len(items) / max(1, TASKS_PER_WORKER * workers))))
    return [items[start:start + size] for start in range(0, len(items), size)]


def infer_on_cluster(cfg, model, todo, n_planned, batch, mc_samples, correction, dependencies, report):
    """anna-infer's work (what :func:`anna.infer._infer_inputs` does in one process) on INFER_SCHEDULER's Dask
    cluster; returns the outputs written (or found complete after a lost worker)."""
    distributed = _distributed(cfg)
    client, cluster, intra_op_threads = _connect(cfg, distributed)
    try:
        workers = len(client.scheduler_info().get("workers", {})) or 1
        dashboard = client.dashboard_link
        if cluster is not None and importlib.util.find_spec("bokeh") is None:  # Dask serves no dashboard then
            dashboard = "not served (pip install bokeh to get one)"
        report(f"Dask scheduler {client.scheduler.address}: {workers} worker(s); dashboard {dashboard}")
        settings = {"model_loc": cfg.infer_model_loc, "dropout_seed": cfg.seed or 0,
                    "forward_form": getattr(model, "forward_form", None), "batch": int(batch),
                    "range_margin": float(cfg.range_margin), "correction": correction, "mc_samples": mc_samples,
                    "max_rel_sigma": cfg.max_rel_sigma}
        client.register_plugin(ModelOnWorker(settings, intra_op_threads), name=PLUGIN_NAME)
        if cfg.infer_mode == "DEBUG":
            return [_debug_pack_on_cluster(client, distributed, path, output, batch, report, number, len(todo))
                    for number, (path, _, output) in enumerate(todo, start=1)]
        return _files_on_cluster(cfg, client, distributed, todo, n_planned, dependencies, workers, report)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _files_on_cluster(cfg, client, distributed, todo, n_planned, dependencies, workers, report):
    items = [(f"[{number}/{len(todo)}] {path}", path, reader, output)
             for number, (path, reader, output) in enumerate(todo, start=1)]
    groups = _groups(items, workers)
    futures = client.map(infer_inputs_task, groups, dependencies=list(dependencies), pure=False)
    written, failures, inputs_done = [], [], 0
    for done, future in enumerate(distributed.as_completed(futures), start=1):
        result = future.result()
        for line in result["lines"]:
            report(line)
        written.extend(result["written"])
        failures.extend(result["failures"])
        inputs_done += len(groups[futures.index(future)])
        report(f"Dask: {done}/{len(futures)} tasks done, {inputs_done}/{len(todo)} inputs")
    order = {output: number for number, (_, _, output) in enumerate(todo)}
    written.sort(key=order.get)
    if failures and n_planned == 1:  # one input: its own error, as in one process
        raise AnnaInputError(failures[0])
    if failures:
        raise AnnaInputError(f"{len(failures)} of {len(todo)} inputs could not be read (the other outputs were "
                             f"written); first: {failures[0]}", path=cfg.source, key="INFER_FILES")
    return written


def _debug_pack_on_cluster(client, distributed, path, output, batch, report, number, total):
    """One pack in row blocks over the workers; the client writes the one output in row order."""
    from anna.packs import open_pack

    started = time.monotonic()
    pack = open_pack(path, check_labels=False)
    block = batch * BATCHES_PER_BLOCK
    starts = list(range(0, pack.n_stars, block))
    futures = [client.submit(infer_rows_task, path, start, min(pack.n_stars, start + block), pure=False)
               for start in starts]
    results = {}
    for done, future in enumerate(distributed.as_completed(futures), start=1):
        result = future.result()
        results[result["start"]] = result
        report(f"Dask: {done}/{len(futures)} row blocks of {path} done")
    predictor_names = _names_and_errors(client)
    counts = [0, 0, 0]
    with atomic_output(output, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerow(output_header(*predictor_names))
        for start in starts:
            handle.write(results[start]["text"])
            counts = [a + b for a, b in zip(counts, results[start]["counts"])]
    _report_written(report, f"[{number}/{total}] {path}", tuple(counts), output, started)
    return output


def _names_and_errors(client):
    """(output names, meta columns, with error columns, with noise columns) of the workers' predictor, for the
    DEBUG header."""
    def describe():
        predictor = _predictor()
        return list(predictor.model.output_names), (), predictor.with_errors, predictor.with_noise

    return client.submit(describe, pure=False).result()

