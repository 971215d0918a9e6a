"""``anna-train --finish``: complete a frozen model that lacks a part beside its weights.

anna-train computes the training-domain statistics and, with a variance head, the uncertainty calibration
whenever it writes a frozen model; a model lacks them only when they were skipped (a second Ctrl-C or SIGTERM
while a stopped run wrote its model) or when an earlier ANNA-TF wrote it after a stop.  Such a model still
predicts, but anna-infer cannot flag spectra outside the training domain and MC-dropout σ is not calibrated
(a stopped APOGEE-size model gave σ twice the real errors).  This command computes the missing parts exactly
as training would have (:mod:`anna.train.describe`: the same training sample, the same cross-validation set
noised with the run's seed) from the weights in the model, without a checkpoint, and writes the model back
atomically; a whole model is left alone.
"""

import os

from anna.train.describe import (FINISH_COMMAND, PART_TITLES, TRAINING_DOMAIN, calibration_set, compute_parts,
                                 noise_models, parts_of, training_sample)

# Keys that decide how the parts' sets are drawn and noised: --finish refuses a parameter file that changed them
# since training (the parts would describe other data than the network saw).
SET_KEYS = ("PREPROCESS_TRAIN", "SN_RANGE_TRAIN", "REL_CONT_E_TRAIN", "MIN_PARAMS", "MAX_PARAMS", "MAGIC_NUMBER",
            "TRAINING_XVAL", "PREPROCESS_XVAL", "XVAL_SIZE")


def finish_model(cfg, report=print):
    """Compute what SAVE_LOC's frozen model lacks and write it back; returns {"frozen_model", "computed"}.

    Raises AnnaInputError (one line, exit status 2) when SAVE_LOC holds no frozen model, or when the parameter
    file's training pack or set keys differ from those the model was trained with."""
    import keras

    from anna.atomic import file_sha256
    from anna.augment import PackRows
    from anna.frozen_file import FROZEN_MODEL_NAME
    from anna.model import load_frozen, save_frozen
    from anna.packs import open_pack

    path = os.path.join(cfg.save_loc, FROZEN_MODEL_NAME)
    if not os.path.exists(path):
        raise cfg.error("SAVE_LOC", f"no frozen model to finish ({path} does not exist; {FINISH_COMMAND} completes a "
                                    "model anna-train wrote)")
    model = load_frozen(path)
    missing = [part for part in parts_of(model.spec) if part in model.missing_parts(mc_samples=cfg.mc_samples)]
    if not missing:
        whole = ", ".join(PART_TITLES[part] for part in parts_of(model.spec))
        report(f"{path} is whole (it has its {whole}): nothing to do")
        return {"frozen_model": path, "computed": []}
    _check_same_sets(cfg, model.metadata)
    pack = open_pack(cfg.training_data, expected_npix=model.spec.npix, expected_nout=model.nout, check_flux=True,
                     missing_label_value=cfg.magic_number)
    trained_on = (model.metadata.get("training_pack") or {}).get("sha256")
    uses_training_set = TRAINING_DOMAIN in missing or not cfg.training_xval
    if uses_training_set and trained_on is not None and file_sha256(pack.path) != trained_on:
        raise cfg.error("TRAINING_DATA", f"is not the pack {path} was trained on (its SHA-256 differs from the one "
                                         "the model records): the missing parts describe the training data")
    # the run's seed draws and noises the sets as training did (a model without one: SEED, else 0)
    seed = int(model.metadata.get("seed", cfg.seed if cfg.seed is not None else 0))
    keras.utils.set_random_seed(seed)  # the dropout masks of the calibration, as reproducible as training's
    noise, xval_noise = noise_models(cfg, pack.wavelengths)
    sample = []

    def training_set():
        if not sample:  # streamed rows: only the sample is read, whatever the pack's size
            sample.append(training_sample(pack, PackRows(pack, resident_bytes=0), model.scaler, noise, seed,
                                          cfg.magic_number))
        return sample[0]

    def calibration_spectra():
        return calibration_set(cfg, pack, model.scaler, noise, xval_noise, seed, cfg.magic_number,
                               lambda: training_sample(pack, PackRows(pack, resident_bytes=0), model.scaler, None,
                                                       seed, cfg.magic_number))

    values, records = compute_parts(model.network, model.spec, missing, training_set, calibration_spectra,
                                    cfg.mc_samples, by=FINISH_COMMAND, names=model.output_names, report=report)
    metadata = dict(model.metadata)
    metadata.update(values)
    metadata["model_parts"] = {**(metadata.get("model_parts") or {}), **records}
    save_frozen(path, model.network, model.spec, metadata)
    computed = [part for part in missing if part in values]
    report(f"frozen model {path} completed: its {' and '.join(PART_TITLES[part] for part in computed)} written")
    return {"frozen_model": path, "computed": computed}


def _check_same_sets(cfg, metadata):
    """Refuse a parameter file whose SET_KEYS differ from the ones the model records (keys it does not record
    are not compared)."""
    trained = metadata.get("parameters") or {}
    given = cfg.as_dict()
    for key in SET_KEYS:
        if key in trained and key in given and trained[key] != given[key]:
            raise cfg.error(key, f"differs from the value the model was trained with ({trained[key]!r}); "
                                 f"{FINISH_COMMAND} computes the missing parts from the data as training saw them")
