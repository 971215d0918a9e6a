"""anna-train: two-stage training with early stopping, TensorBoard logging, checkpoints and a frozen model.

Guide sections 2.2, 4.2 and 4.5.  One call, :func:`run_training`, does the whole stage:

1. open the training pack (memory-mapped) and, with TRAINING_XVAL, the first XVAL_SIZE stars of XVAL_DATA;
   the cross-validation set is noised ONCE with a fixed seed so its cost is comparable across evaluations;
2. build the network with the shared builder (:mod:`anna.model`);
3. for stage 1 and (DO_TRAIN2) stage 2: Adam at LEARN_RATEn on batches of BATCH_SIZEn streamed by the
   threaded producer (:mod:`anna.augment`), dropout 1 − KEEP_PROBn (the producer hands over chunks of
   NUM_FETCH examples, and one compiled call runs the steps of a chunk); every SAMPLE_INTERVAL batches evaluate
   and log the costs and the RMS per label in physical units, checkpoint, and apply early stopping (ES_SAMPLE
   intervals without improvement of the xval cost, or of the batch cost without xval) -- the stage ends on
   its best weights, and stage 2 starts from stage 1's best;
4. write ``SAVE_LOC/frozen.model`` atomically with the final best weights and the provenance.

With UNCERTAINTY: MC_DROPOUT the network also predicts a variance per label (misfit part plus a part scaled
by the spectrum's own noise), trained with the robust loss of Leung & Bovy (2019) on the residual of the
dropout-free value; its two biases are refitted by maximum likelihood every SAMPLE_INTERVAL, and at the end
σ_total (dropout spread and variance head together) is calibrated by maximum likelihood on the
cross-validation set (:func:`calibrate_variance_head`).  Every frozen model also stores statistics of its
training spectra for anna-infer's ``outside_training_domain`` flag.

The cost is the mean squared error of the normalised labels (0..1 scale), the quantity minimised; the RMS per
label is the same error in physical units.  Ctrl-C or SIGTERM stops after the steps of the current chunk
(at most NUM_FETCH examples), keeps the best weights so far as a usable frozen model, whole like any other
(training-domain statistics and calibration computed from those weights; a second signal skips what is left,
and ``anna-train --finish`` computes it later, :mod:`~anna.train.finish`), and says so with the seconds the
stop took.  After a crash or ``kill -9`` the same command resumes from the last checkpoint (at most one
SAMPLE_INTERVAL of work is lost).

The package's modules, each with one concern (as Keras separates a trainer's step, loop and callbacks):
:mod:`~anna.train.loop` (the run: set-up, stages, the frozen model), :mod:`~anna.train.stage` (one stage's
loop and its interval bookkeeping), :mod:`~anna.train.steps` (the compiled training step and
JIT_COMPILE AUTO), :mod:`~anna.train.schedule` (stage plans, early stopping, learning-rate schedules, the
optimiser), :mod:`~anna.train.state` (checkpoints, the resume fingerprint, stop requests),
:mod:`~anna.train.evaluation` (cross-validation cost and RMS), :mod:`~anna.train.variance` (the variance
head's fits), :mod:`~anna.train.describe` (the frozen model's parts beside its weights and the sets they come
from), :mod:`~anna.train.finish` (``anna-train --finish``) and :mod:`~anna.train.summaries` (what goes to
TensorBoard).  The names below are the package's public surface.
"""

from anna.train.describe import DOMAIN_SAMPLE
from anna.train.loop import Trainer, configure_threads, run_training
from anna.train.schedule import EarlyStopping, LearningRateSchedule, StagePlan, make_optimizer, stage_plans
from anna.train.state import read_checkpoint, training_fingerprint, write_checkpoint
from anna.train.steps import (COMPILED_FORMS, FORMS_OF_SETTING, choose_compiled_form, compiled_form_cache_path,
                              make_train_steps)
from anna.train.summaries import histogram_buckets, write_histogram
from anna.train.variance import calibrate_variance_head, fit_variance_scales, refit_variance_biases

__all__ = ["COMPILED_FORMS", "DOMAIN_SAMPLE", "FORMS_OF_SETTING", "EarlyStopping", "LearningRateSchedule",
           "StagePlan", "Trainer", "calibrate_variance_head", "choose_compiled_form", "compiled_form_cache_path",
           "configure_threads", "fit_variance_scales", "histogram_buckets", "make_optimizer", "make_train_steps",
           "read_checkpoint", "refit_variance_biases", "run_training", "stage_plans", "training_fingerprint",
           "write_checkpoint", "write_histogram"]
