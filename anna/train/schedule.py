"""The plan of each training stage and what changes within it: stage plans (LEARN_RATEn, BATCH_SIZEn...),
early stopping, the learning-rate schedule and the optimiser.  Small pure objects, each tested on its own.
"""

import dataclasses
import math

import numpy as np


# AdamW's weight decay when OPTIMIZER is ADAMW and WEIGHT_DECAY is not given.
DEFAULT_WEIGHT_DECAY = 1e-4


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage's hyperparameters (LEARN_RATEn, NUM_TRAIN_ITERSn, BATCH_SIZEn, KEEP_PROBn)."""

    number: int
    learn_rate: float
    iterations: int
    batch_size: int
    keep_prob: float
    max_seconds: float = None  # MAX_MINUTESn x 60; None = no time limit


def stage_plans(cfg):
    def seconds(minutes):
        return None if minutes is None else 60.0 * minutes

    plans = [StagePlan(1, cfg.learn_rate1, cfg.num_train_iters1, cfg.batch_size1, cfg.keep_prob1,
                       seconds(cfg.max_minutes1))]
    if cfg.do_train2:
        plans.append(StagePlan(2, cfg.learn_rate2, cfg.num_train_iters2, cfg.batch_size2, cfg.keep_prob2,
                               seconds(cfg.max_minutes2)))
    return plans


class EarlyStopping:
    """Tracks the best cost of a stage and its weights; says when ``patience`` intervals passed without gain."""

    def __init__(self, patience, enabled=True):
        self.patience = int(patience)
        self.enabled = enabled
        self.best_cost = math.inf
        self.best_iteration = 0
        self.best_weights = None
        self.bad_intervals = 0

    def update(self, cost, iteration, weights):
        """Record ``cost`` measured at ``iteration``; returns True when it is a new best."""
        if cost < self.best_cost:
            self.best_cost = float(cost)
            self.best_iteration = int(iteration)
            self.best_weights = [np.array(w, copy=True) for w in weights]
            self.bad_intervals = 0
            return True
        self.bad_intervals += 1
        return False

    @property
    def should_stop(self):
        return self.enabled and self.bad_intervals >= self.patience


class LearningRateSchedule:
    """The learning rate within one stage (LR_SCHEDULE), a small pure object so it can be tested alone.

    * CONSTANT: the stage's LEARN_RATEn throughout (ANNA).
    * PLATEAU: multiply the rate by ``factor`` (not below ``minimum``) after ``patience`` sample intervals
      without a new best of the monitored cost; the count restarts after each cut (Keras' ReduceLROnPlateau,
      which astroNN uses).  Early stopping's ES_SAMPLE should be longer than the patience, or the stage ends
      before a cut can help.
    * COSINE: ``minimum + (base - minimum)·(1 + cos(π·p))/2`` with p the stage's progress: iterations done over
      NUM_TRAIN_ITERSn, or, with a time limit, the elapsed share of it when that is further along.  With
      ``decay_start`` s > 0 (LR_DECAY_START) the rate stays at ``base`` for the first share s of the stage and
      the cosine runs over the rest, p = (progress - s) / (1 - s): a network far from convergence keeps
      learning at the full rate, and the decay at the end still settles the weights.

    The rate is set before each compiled call (a chunk of at most NUM_FETCH / BATCH_SIZE steps).  ``state()``
    and ``restore()`` carry it through a checkpoint, so a resumed run continues the schedule where it stopped.
    """

    def __init__(self, kind, base_rate, iterations, max_seconds=None, patience=5, factor=0.5, minimum=0.0,
                 decay_start=0.0):
        self.kind = kind
        self.decay_start = float(decay_start)
        self.base_rate = float(base_rate)
        self.iterations = int(iterations)
        self.max_seconds = max_seconds
        self.patience = int(patience)
        self.factor = float(factor)
        self.minimum = float(minimum)
        self.current = self.base_rate
        self.wait = 0
        self.cuts = []

    def rate(self, iteration, elapsed_seconds=0.0):
        """The rate for steps starting at ``iteration``, ``elapsed_seconds`` into the stage."""
        if self.kind != "COSINE":
            return self.current
        progress = iteration / max(self.iterations, 1)
        if self.max_seconds:
            progress = max(progress, elapsed_seconds / self.max_seconds)
        progress = min(max((progress - self.decay_start) / (1.0 - self.decay_start), 0.0), 1.0)
        return self.minimum + (self.base_rate - self.minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def after_interval(self, improved, iteration):
        """Note one sample interval's outcome; returns the new rate when PLATEAU cut it, else None."""
        if self.kind != "PLATEAU":
            return None
        if improved:
            self.wait = 0
            return None
        self.wait += 1
        if self.wait < self.patience or self.current <= self.minimum:
            return None
        self.current = max(self.minimum, self.current * self.factor)
        self.wait = 0
        self.cuts.append([int(iteration), self.current])
        return self.current

    def state(self):
        return {"current": self.current, "wait": self.wait, "cuts": [list(c) for c in self.cuts]}

    def restore(self, state):
        self.current = float(state["current"])
        self.wait = int(state["wait"])
        self.cuts = [list(c) for c in state["cuts"]]


def stage_schedule(cfg, plan):
    """The :class:`LearningRateSchedule` of a stage, from LR_SCHEDULE, LR_PATIENCE, LR_FACTOR, LR_MIN and
    LR_DECAY_START."""
    return LearningRateSchedule(cfg.lr_schedule, plan.learn_rate, plan.iterations, plan.max_seconds,
                                cfg.lr_patience, cfg.lr_factor, cfg.lr_min, cfg.lr_decay_start)


def make_optimizer(cfg, learn_rate):
    """Adam (ANNA), or AdamW with WEIGHT_DECAY (default DEFAULT_WEIGHT_DECAY) when OPTIMIZER is ADAMW."""
    import keras

    if cfg.optimizer == "ADAMW":
        decay = DEFAULT_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
        return keras.optimizers.AdamW(learning_rate=learn_rate, weight_decay=decay)
    return keras.optimizers.Adam(learning_rate=learn_rate)
