"""DISTRIBUTE: where the training steps run.  ``NONE`` (one device, the default), ``MIRRORED``
(``tf.distribute.MirroredStrategy`` over this machine's GPUs, or over its logical CPU devices when it has no GPU
and more than one is configured) or ``MULTI_WORKER`` (``tf.distribute.MultiWorkerMirroredStrategy``, the cluster
from the standard ``TF_CONFIG`` environment variable).

What stays the same under every strategy, and why:

* BATCH_SIZEn is the global batch: each of R replicas takes BATCH_SIZEn / R spectra, its loss is its own mean
  divided by R, and the gradients are summed over the replicas (Keras' optimiser all-reduces them), so a step
  applies the gradient of the mean over the global batch, as one device would.  The learning rate is therefore
  NOT scaled: the step is the single-device step (to float32 rounding; the dropout masks are drawn per replica).
* Cross-validation, early stopping, the learning-rate schedule and the variance head's bias refit run on every
  worker on the same (mirrored) weights, with the batch costs and the refit's residuals reduced over all
  replicas, so every worker takes the same decisions at the same iterations.
* The frozen model is an ordinary one: its weights are read back from the mirrored variables.

MULTI_WORKER: worker k of W draws its batches from its own shard of the pack's rows (rows k, k+W, ...), with
its augmentation seeded by (SEED, stage, chunk, k); only the chief (the ``chief`` task, else worker 0) writes
checkpoints, TensorBoard logs and the frozen model.  Every worker resumes from the chief's checkpoint in
SAVE_LOC, so SAVE_LOC must be a folder all workers see (one machine, or a shared file system).
"""

import contextlib
import dataclasses
import json
import os

from anna.errors import AnnaInputError

TF_CONFIG = "TF_CONFIG"
# Seconds a collective operation (a gradient all-reduce) may wait for a peer before it fails: a worker whose
# peer died ends with an error instead of waiting for ever, and the run is resumed from the last checkpoint.
COLLECTIVE_TIMEOUT_SECONDS = 120.0


@dataclasses.dataclass
class Distribution:
    """The strategy of a run and this process's place in it.

    ``strategy`` None for NONE; ``worker_index`` / ``num_workers`` (1 unless MULTI_WORKER); ``local_replicas``
    the replicas this process holds (its devices); ``replicas`` all of them.
    """

    kind: str
    strategy: object = None
    worker_index: int = 0
    num_workers: int = 1
    local_replicas: int = 1
    is_chief: bool = True
    devices: tuple = ()

    @property
    def replicas(self):
        return self.num_workers * self.local_replicas

    @property
    def distributed(self):
        return self.strategy is not None

    def scope(self):
        """Where variables (network, optimiser) must be created: the strategy's scope, or nothing."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def worker_batch(self, batch_size, key):
        """This worker's share of a global batch; the global batch must split evenly over the replicas."""
        if batch_size % self.replicas:
            raise AnnaInputError(f"the global batch of {batch_size} does not split evenly over {self.replicas} "
                                 f"replicas ({self.num_workers} worker(s) x {self.local_replicas} device(s)) of "
                                 f"DISTRIBUTE {self.kind}", key=key, value=batch_size)
        return batch_size // self.num_workers

    @property
    def shard(self):
        """(index, count) of the pack's rows this worker draws from, or None (every row)."""
        return (self.worker_index, self.num_workers) if self.num_workers > 1 else None

    def describe(self):
        """What the frozen model records about the strategy."""
        return {"strategy": self.kind, "workers": self.num_workers, "replicas": self.replicas,
                "devices_per_worker": list(self.devices)}


def parse_tf_config(text):
    """(cluster, task type, task index, worker index, worker count) from TF_CONFIG's text; AnnaInputError with
    one line when it is not the standard form ``{"cluster": {"worker": ["host:port", ...], ["chief": [...]]},
    "task": {"type": "worker", "index": 0}}``."""
    def bad(why):
        return AnnaInputError(f"{why}; expected {{\"cluster\": {{\"worker\": [\"host:port\", ...]}}, "
                              "\"task\": {\"type\": \"worker\", \"index\": N}}", key=f"{TF_CONFIG} (environment)")

    if text is None or not text.strip():
        raise bad("DISTRIBUTE MULTI_WORKER needs the cluster in the TF_CONFIG environment variable, which is unset")
    try:
        config = json.loads(text)
    except ValueError as error:
        raise bad(f"not JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise bad("no \"cluster\" object")
    cluster = config["cluster"]
    for job, addresses in cluster.items():
        if job not in ("chief", "worker", "evaluator", "ps"):
            raise bad(f"unknown job {job!r} in the cluster")
        if not isinstance(addresses, list) or not addresses:
            raise bad(f"the cluster's {job!r} is not a non-empty list of addresses")
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not isinstance(address, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise bad(f"address {address!r} of {job!r} is not host:port")
    if "ps" in cluster or "evaluator" in cluster:
        raise bad("parameter servers and evaluators are not used by MULTI_WORKER (only chief and worker)")
    if "worker" not in cluster and "chief" not in cluster:
        raise bad("the cluster lists no workers")
    if len(cluster.get("chief", [])) > 1:
        raise bad("more than one chief")
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise bad(f"the task's type {None if not isinstance(task, dict) else task.get('type')!r} is not a job of "
                  "the cluster")
    index = task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task["type"]]):
        raise bad(f"the task's index {index!r} is not one of the {len(cluster[task['type']])} "
                  f"{task['type']!r} addresses")
    # worker order: the chief first, then the workers; shards and augmentation seeds follow it
    order = [("chief", i) for i in range(len(cluster.get("chief", [])))] + \
            [("worker", i) for i in range(len(cluster.get("worker", [])))]
    return cluster, task["type"], index, order.index((task["type"], index)), len(order)


def _local_devices(tf):
    """MIRRORED's devices: every GPU, else every logical CPU device when more than one is configured
    (``tf.config.set_logical_device_configuration``), else the one CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tuple(device.name for device in gpus)
    return tuple(device.name for device in tf.config.list_logical_devices("CPU"))


def make_distribution(cfg, environ=None):
    """The run's :class:`Distribution`; call before TensorFlow runs anything else (MULTI_WORKER's collectives are
    set up when the strategy is made).  A bad TF_CONFIG is an :class:`AnnaInputError` (one line, exit 2)."""
    kind = getattr(cfg, "distribute", "NONE") or "NONE"
    if kind == "NONE":
        return Distribution("NONE")
    if kind == "MULTI_WORKER":  # checked before TensorFlow starts: a bad cluster costs no start-up time
        environ = os.environ if environ is None else environ
        cluster, task_type, task_index, worker_index, num_workers = parse_tf_config(environ.get(TF_CONFIG))
    import tensorflow as tf

    if kind == "MIRRORED":
        devices = _local_devices(tf)
        strategy = tf.distribute.MirroredStrategy(devices=list(devices))
        return Distribution(kind, strategy, local_replicas=strategy.num_replicas_in_sync, devices=devices)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise AnnaInputError(f"the cluster could not be joined ({str(error).splitlines()[0]})",
                             key=f"{TF_CONFIG} (environment)") from None
    local = strategy.num_replicas_in_sync // num_workers
    is_chief = task_type == "chief" or ("chief" not in cluster and task_type == "worker" and task_index == 0)
    return Distribution(kind, strategy, worker_index=worker_index, num_workers=num_workers,
                        local_replicas=max(1, local), is_chief=is_chief,
                        devices=tuple(strategy.extended.worker_devices))
