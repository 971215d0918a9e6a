"""``anna-info MODEL``: what a frozen model holds, read from its file without loading TensorFlow.

The network, the labels and their ranges, the wavelength grid, the training parameters that differ from the
defaults, each stage's result, the versions that wrote it, the training pack's hash, its uncertainties and
their calibration, and the parts it lacks.  Everything comes from the model's metadata
(anna.frozen_file.read_frozen_file) and the shapes of its weights.
"""

import os

import numpy as np


def describe_frozen_model(location):
    """Lines describing the frozen model at ``location`` (file or folder); raises AnnaInputError if it is not one."""
    from anna.frozen_file import read_frozen_file

    path, meta, weights = read_frozen_file(location)
    network = meta["network"]
    names = meta["output_names"]
    wave = np.asarray(meta["wavelengths"], dtype=float)
    lines = [f"frozen model {path} ({os.path.getsize(path):,} bytes)",
             f"  written {meta.get('created_utc', '?')} by ANNA-TF {meta.get('anna_version', '?')}, TensorFlow "
             f"{meta.get('tensorflow_version', '?')} (format {meta.get('format_version')})"
             + ("" if meta.get("complete", True) else "; training was stopped before its end")]
    n_weights = sum(int(np.prod(np.shape(array))) for array in weights)
    lines.append(f"network: {meta.get('network_description') or _network_text(network)}; {n_weights:,} weights; "
                 f"{network.get('npix')} px in, {network.get('nout')} labels out"
                 + ("; variance head" if network.get("heteroscedastic") else ""))
    lines.append("labels (range the network was scaled to):")
    for name, low, high in zip(names, meta["min_params"], meta["max_params"]):
        lines.append(f"  {name:>12}  {low:g} .. {high:g}")
    steps = np.diff(wave)
    step = (f"step {steps.min():.4g}-{steps.max():.4g} A" if len(steps) and not np.allclose(steps, steps[0])
            else f"step {steps[0]:.4g} A" if len(steps) else "")
    lines.append(f"grid: {len(wave)} px, {wave[0]:.3f}-{wave[-1]:.3f} A, {step}")
    lines += _training_lines(meta)
    lines += _uncertainty_lines(meta, names)
    lines += _parts_lines(meta)
    return lines


def _network_text(network):
    convolutions = ", ".join(f"{layer['kernels']}x{layer['width']}" for layer in network.get("conv_layers", []))
    return f"{convolutions} | {', '.join(map(str, network.get('fc_dims', [])))}"


def _training_lines(meta):
    lines = []
    pack = meta.get("training_pack")
    if pack:
        lines.append(f"training pack: {pack.get('path')} ({pack.get('n_stars'):,} stars, sha256 {pack.get('sha256')})")
    if meta.get("parameter_file"):
        lines.append(f"parameter file: {meta['parameter_file']}" + (f", SEED {meta['seed']}" if meta.get("seed")
                                                                     is not None else ""))
    changed = _non_default_parameters(meta.get("parameters") or {})
    if changed:
        lines.append("training parameters (those not at their default):")
        lines += [f"  {key}: {value}" for key, value in changed]
    for stage in meta.get("stages") or []:
        rate = stage.get("learning_rate") or {}
        cuts = len(rate.get("cuts") or [])
        lines.append(f"stage {stage.get('stage')}: {stage.get('iterations')} iterations in "
                     f"{stage.get('seconds', 0):.0f} s, ended by {stage.get('stopped_by')}; best "
                     f"{stage.get('monitored', 'cost')} cost {stage.get('best_cost', float('nan')):.6g} at iteration "
                     f"{stage.get('best_iteration')}; learning rate {rate.get('initial', float('nan')):g}"
                     + (f" -> {rate.get('final'):g} ({cuts} cuts)" if cuts or rate.get("final") != rate.get("initial")
                        else ""))
    return lines


def _non_default_parameters(parameters):
    """(KEY, value as written) for the training parameters that differ from KEY_TABLE's defaults."""
    from anna.params import KEY_TABLE

    defaults = {spec.name: spec.default for spec in KEY_TABLE}
    changed = []
    for key, value in parameters.items():
        default = defaults.get(key)
        if value is None or key not in defaults or _same(value, default):
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):  # CONV_LAYERS
            value = ", ".join(f"{layer['kernels']}x{layer['width']}" for layer in value)
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, bool):
            value = "YES" if value else "NO"
        changed.append((key, value))
    return changed


def _same(value, default):
    if isinstance(default, tuple):
        default = list(default)
    return value == default


def _uncertainty_lines(meta, names):
    network = meta["network"]
    rate = float(meta.get("mc_dropout_rate", 0.0))
    if network.get("heteroscedastic") and rate > 0:
        lines = [f"uncertainties: MC_DROPOUT by default in anna-test and anna-infer (dropout rate {rate:.3g} "
                 "in the last stage, variance head); UNCERTAINTY: NONE turns them off"]
    elif rate > 0:
        lines = [f"uncertainties: none by default (no variance head); UNCERTAINTY: MC_DROPOUT gives the spread of "
                 f"dropout passes (rate {rate:.3g})"]
    else:
        return ["uncertainties: none (no dropout in the last stage)"]
    calibration = meta.get("variance_calibration")
    if calibration:
        span = np.asarray(meta["max_params"], dtype=float) - np.asarray(meta["min_params"], dtype=float)
        lines.append(f"calibration of sigma ({calibration.get('set', 'cross-validation set')}): mean "
                     "d^2/sigma^2 before -> after, median sigma_total")
        before = calibration.get("mean_chi2_before") or [np.nan] * len(names)
        after = calibration.get("mean_chi2_after") or [np.nan] * len(names)
        median = calibration.get("median_sigma_total") or [np.nan] * len(names)
        for k, name in enumerate(names):
            lines.append(f"  {name:>12}  {before[k]:.3g} -> {after[k]:.3g}, {median[k] * span[k]:.4g}")
        levels = calibration.get("noise_levels")
        if levels:
            lines.append("  sigma factor by S/N (sqrt of the variance factor), S/N " +
                         " / ".join("+".join(f"{sn:.3g}" for sn in pooled) for pooled in levels["sn"]) + ":")
            factors = np.sqrt(np.asarray(levels["variance_factor"], dtype=float))
            for k, name in enumerate(names):
                lines.append(f"  {name:>12}  " + " / ".join(f"{v:.3g}" for v in factors[:, k]))
    return lines


def _parts_lines(meta):
    parts = meta.get("model_parts") or {}
    lines = []
    domain = meta.get("training_domain")
    record = parts.get("training_domain") or {}
    lines.append("training-domain statistics: " + (f"yes ({record.get('spectra', '?')} spectra)" if domain else
                                                   "MISSING (every star is flagged domain_unchecked; anna-train "
                                                   "--finish completes the model)"))
    for part, record in parts.items():
        if record.get("status") not in (None, "computed"):
            lines.append(f"  {part}: {record.get('status')}")
    return lines
