"""``--check``: validate a parameter file for one stage and open every input it names, without running it.

Opening means what the stage itself checks before its real work: pack headers and sizes plus one streamed
pass over a pack's labels and fluxes (with the stage's own rules: NaN labels are missing labels, NaN fluxes are
refused for training and testing), templates, FITS headers and the wavelength solution.  Nothing is trained or
predicted, so a check passes exactly when the stage would get past its input checks.
"""

import os


def check_inputs_before_runtime(cfg, stage):
    """The input checks that need no network, made before TensorFlow is loaded, so that a bad input is reported
    at once and alone (the commands call this first; ``--check`` and the stages then check everything).

    What is read costs little whatever the size of the data: pack headers, sizes and wavelengths (a truncated or
    mis-sized pack), the frozen model's metadata and format, templates, and which INFER_FILES exist.  Raises
    AnnaInputError on the first problem.
    """
    from anna.frozen_file import read_frozen_file
    from anna.packs import open_pack
    from anna.templates import read_wavelength_template, relative_sn_on_grid

    if stage == "train":
        pack = open_pack(cfg.training_data, expected_npix=cfg.num_px, expected_nout=cfg.num_outs, check_labels=False)
        if cfg.preprocess_train or (cfg.training_xval and cfg.preprocess_xval):
            relative_sn_on_grid(cfg.sn_template, pack.wavelengths)
        if cfg.training_xval:
            open_pack(cfg.xval_data, expected_npix=cfg.num_px, expected_nout=cfg.num_outs, max_stars=cfg.xval_size,
                      check_labels=False)
    elif stage == "test":
        _, metadata, _ = read_frozen_file(cfg.test_model_loc, weights=False)
        pack = open_pack(cfg.testing_data, expected_npix=len(metadata["wavelengths"]),
                         expected_nout=len(metadata["output_names"]), check_labels=False)
        if cfg.preprocess_test:
            relative_sn_on_grid(cfg.sn_template_test, pack.wavelengths)
    elif stage == "infer":
        read_frozen_file(cfg.infer_model_loc, weights=False)
        if cfg.wave_template:
            read_wavelength_template(cfg.wave_template)
        if cfg.infer_mode == "DEBUG":
            open_pack(cfg.debug_data, check_labels=False)
        else:
            infer_inputs(cfg)  # every file INFER_FILES names exists


def check_stage(cfg, stage):
    """Return summary lines for ``stage`` ("train", "test", "infer"); raise AnnaInputError on any problem."""
    from anna.packs import open_pack
    from anna.templates import read_wavelength_template, relative_sn_on_grid

    lines = [f"parameter file {cfg.source}: valid for anna-{stage}"]
    if stage == "train":
        # The same checks anna-train makes: NaN labels are missing labels (MAGIC_NUMBER), NaN fluxes are refused.
        pack = open_pack(cfg.training_data, expected_npix=cfg.num_px, expected_nout=cfg.num_outs, check_flux=True,
                         missing_label_value=cfg.magic_number)
        lines.append(f"training pack: {pack!r}")
        if cfg.preprocess_train or (cfg.training_xval and cfg.preprocess_xval):
            rel = relative_sn_on_grid(cfg.sn_template, pack.wavelengths)
            lines.append(f"S/N template {cfg.sn_template}: relative S/N {rel.min():.3f}-{rel.max():.3f} on the grid")
        if cfg.training_xval:
            xval = open_pack(cfg.xval_data, expected_npix=cfg.num_px, expected_nout=cfg.num_outs,
                             max_stars=cfg.xval_size, check_flux=True, missing_label_value=cfg.magic_number)
            lines.append(f"cross-validation pack: {xval!r}")
        if cfg.mixed_precision:
            from anna.train.precision import gpu_names, require_gpu

            require_gpu(cfg)
            lines.append(f"MIXED_PRECISION: float16 compute with loss scaling on {', '.join(gpu_names())}")
        lines.append(f"frozen model will be written to {os.path.join(cfg.save_loc, 'frozen.model')}")
    elif stage == "test":
        from anna.model import load_frozen

        model = load_frozen(cfg.test_model_loc)
        lines.append(_model_line(model))
        pack = open_pack(cfg.testing_data, expected_npix=len(model.wavelengths), expected_nout=model.nout,
                         check_flux=True, missing_label_value=cfg.magic_number)
        lines.append(f"test pack: {pack!r}")
        if cfg.preprocess_test:
            relative_sn_on_grid(cfg.sn_template_test, pack.wavelengths)
            lines.append(f"S/N template {cfg.sn_template_test}: covers the grid")
    elif stage == "infer":
        from anna.model import load_frozen

        model = load_frozen(cfg.infer_model_loc)
        lines.append(_model_line(model))
        if cfg.wave_template:
            grid = read_wavelength_template(cfg.wave_template)
            lines.append(f"wavelength template {cfg.wave_template}: {len(grid)} px")
        for path in infer_inputs(cfg):
            lines.append(f"input {path}: {_describe_input(cfg, path)}")
    return lines


def _model_line(model):
    return (f"frozen model: {len(model.wavelengths)} px {model.wavelengths[0]:.3f}-{model.wavelengths[-1]:.3f} A, "
            f"labels {', '.join(model.output_names)} (ANNA-TF {model.metadata.get('anna_version')})")


def infer_inputs(cfg):
    """The input files anna-infer will read, in order: the mode's single input, or what INFER_FILES names."""
    from anna.params import expand_infer_files

    single = {"DEBUG": cfg.debug_data, "MS_FITS": cfg.ms_fits_image, "TEXT": cfg.text_image}.get(cfg.infer_mode)
    return [single] if single else expand_infer_files(cfg)


def _describe_input(cfg, path):
    if cfg.infer_mode == "DEBUG":
        from anna.packs import open_pack

        return repr(open_pack(path, check_labels=False))  # anna-infer ignores a DEBUG pack's labels
    from anna.spectra import looks_like_fits

    # as anna-infer reads it: TEXT mode text, MS_FITS mode FITS, INFER_FILES by anna.spectra's rule
    if cfg.infer_mode == "TEXT" or (cfg.infer_mode != "MS_FITS" and not looks_like_fits(path)):
        from anna.templates import read_two_columns

        wave, _ = read_two_columns(path, "text spectrum")
        return f"text spectrum, {len(wave)} px, {wave[0]:.3f}-{wave[-1]:.3f} A"
    from anna.fits_io import read_spectra
    from anna.survey.registry import identify_file, read_survey_file

    if identify_file(path) is not None:  # a survey file, read as anna-infer reads it
        kind, spectra = read_survey_file(path)
        return f"{kind}, {len(spectra)} spectra"
    spectra = read_spectra(path)
    return f"FITS, {len(spectra)} spectra"
