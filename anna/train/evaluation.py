"""Cross-validation during training: the cost early stopping monitors and the RMS per label the interval line
and TensorBoard show, for a whole set at once.

The cost is the one training minimises (:func:`anna.losses.masked_squared_error`: squared error of the labels
scaled to 0..1, averaged over each star's present labels, then over stars with any label); the RMS is the
same error per label in physical units.  Computed in float64 over batches, so a set of any size costs bounded
memory.
"""

import math

import numpy as np

from anna.model import row_blocks

# Spectra per forward call when evaluating a set (cross-validation, the variance head's parts).
EVAL_BATCH = 2048


def make_evaluator(network, npix, nout, span, batch=EVAL_BATCH):
    """``evaluate(flux, labels, mask) -> (cost, rms)`` for ``network`` (dropout off): ``flux`` (n, npix),
    ``labels`` normalised and ``mask`` (n, nout) 1 where a label is present; ``span`` (nout,) = MAX - MIN turns
    the RMS into physical units.  One compiled forward function per network, traced once."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, npix], tf.float32)], reduce_retracing=True,
                 autograph=False)
    def forward(flux):
        return network(flux, training=False)[:, :nout]

    span = np.asarray(span, dtype=np.float64)

    def evaluate(flux, labels, mask):
        sq_sum = np.zeros(nout)
        counts = np.zeros(nout)
        per_star_cost = []
        for start, block in row_blocks(flux, batch):
            pred = forward(block).numpy().astype(np.float64)
            m = mask[start:start + batch]
            d2 = np.square(pred - labels[start:start + batch]) * m
            sq_sum += d2.sum(axis=0)
            counts += m.sum(axis=0)
            present = m.sum(axis=1)
            per_star_cost.append((d2.sum(axis=1) / np.maximum(present, 1))[present > 0])
        costs = np.concatenate(per_star_cost) if per_star_cost else np.empty(0)
        cost = float(np.mean(costs)) if costs.size else math.nan  # no star with a label: no cost
        rms = np.sqrt(sq_sum / np.maximum(counts, 1)) * span
        return cost, rms

    return evaluate
