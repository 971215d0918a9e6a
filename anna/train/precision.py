"""MIXED_PRECISION: float16 compute with loss scaling, on a GPU only.

Why these pieces, and why only on a GPU:

* The network's hidden layers are built with Keras' ``mixed_float16`` DTypePolicy, passed to each layer by
  :func:`anna.model.build_network` (``dtype_policy=``), never set process-wide: a global policy would leak
  into every network the process builds afterwards (cross-validation copies, anna-test in the same process,
  the frozen model's loader).  The policy keeps every variable float32 and computes in float16.
* The layers that give the labels and the log-variances stay float32: the losses, early stopping and the
  variance head's refit read them, and a float16 log-variance would overflow in exp() long before float32.
* The optimiser is wrapped in ``keras.optimizers.LossScaleOptimizer``: small float16 gradients underflow to
  zero, so the loss is scaled up before the gradient (the training step asks the optimiser for
  ``scale_loss``) and the gradients scaled down before the update; a step with a non-finite gradient is
  skipped and the scale lowered.
* The frozen model is an ordinary float32 model: the weights are float32 variables under the policy, and the
  file records no policy, so it loads and predicts anywhere.

On a CPU float16 arithmetic is emulated and slower than float32, and bfloat16 was measured slower than float32
on this project's CPU too, so without a GPU the key is refused (one line, exit status 2) rather than quietly
slowing a run down.  The GPU test is made when the stage starts (``--check`` and anna-train).
"""

from anna.errors import AnnaInputError

KEY = "MIXED_PRECISION"
POLICY_NAME = "mixed_float16"


def gpu_names(tf=None):
    """The GPUs TensorFlow can use in this process (physical devices), as names."""
    if tf is None:
        import tensorflow as tf
    return [device.name for device in tf.config.list_physical_devices("GPU")]


def require_gpu(cfg, tf=None):
    """Refuse MIXED_PRECISION: YES without a GPU: :class:`AnnaInputError` naming the key (one line, exit 2)."""
    if not getattr(cfg, "mixed_precision", False):
        return
    if not gpu_names(tf):
        message = ("YES needs a GPU (float16 compute with loss scaling), and TensorFlow sees none on this "
                   f"machine; on a CPU float16 and bfloat16 are slower than float32, so set {KEY}: NO")
        if hasattr(cfg, "error"):  # the parameter file's own location (file:line, or --set)
            raise cfg.error(KEY, message)
        raise AnnaInputError(message, key=KEY, value="YES")


def network_policy(cfg):
    """The DTypePolicy of the training network's hidden layers: ``mixed_float16`` with MIXED_PRECISION: YES,
    else None (the float32 default)."""
    if not getattr(cfg, "mixed_precision", False):
        return None
    import keras

    return keras.DTypePolicy(POLICY_NAME)


def wrap_optimizer(optimizer, policy):
    """``optimizer`` inside a ``keras.optimizers.LossScaleOptimizer`` when ``policy`` computes in float16, else
    ``optimizer`` itself.  The wrapper passes the learning rate through (schedules assign it as before)."""
    if policy is None or getattr(policy, "compute_dtype", "float32") != "float16":
        return optimizer
    import keras

    return keras.optimizers.LossScaleOptimizer(optimizer)
