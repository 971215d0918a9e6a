"""Survey-size inference (group ``survey_infer``): anna-infer on packs of the tutorial network (1001 px) and of a
StarNet2017-shaped network (conv 4x8, conv 16x8, max-pool 4, dense 256/128) on LAMOST-size (3909 px) and
APOGEE-size (7214 px) spectra, against a plain Keras ``predict`` of the same network at its best batch size;
MC dropout (N = 100) on the APOGEE-size network; and anna-infer's peak memory against the pack's size.

Each network is run on a 20,000-star pack and, for the two shorter spectra, also on a pack of a survey's
scale (``survey_infer_large``: 200,000 tutorial spectra, 100,000 LAMOST-size ones).  anna-infer's fixed
start-up (model load, batch plan, form choice, then compiling or loading the compiled network) is about half
a second; against a baseline that has done all of that untimed, it weighs on a 20,000-star pack of 1001-pixel
spectra (1.3 s of network work) as it does not on a survey's run.  Each row's note gives the best run's time to
its forward-pass line (everything before the first block but the compile), so both readings are there.

Every measurement runs in a process of its own (``measure_child.py``), so each peak resident memory (RSS) is
that measurement's alone.  anna-infer runs with its defaults (INFER_BATCH_SIZE AUTO, MAX_MEMORY_GB 2,
JIT_COMPILE AUTO), and its time covers everything after the interpreter has started: model load, the batch
plan, the compiled-form choice, reading, flags, training-domain statistics, prediction and the CSV.  The
baseline process reads the whole pack into memory first (not timed), then times ``model.predict`` at several
batch sizes with ``jit_compile`` True and False, and the best rate is the baseline.  Both processes run in
the environment the commands set (anna/runtime.py: TensorFlow's pooling CPU allocator), so the allocator's
gain is in both figures and not in the ratio.  Targets: >= 0.8x the baseline and <= 2 GB peak RSS.

The networks are untrained (speed does not depend on the weights); their frozen models carry training-domain
statistics of noisy spectra, as anna-train writes them, so anna-infer computes the domain flags as it would
for a trained model.
"""

import json
import os
import subprocess
import sys

import numpy as np

from data import DOMAIN_SPECTRA, LABEL_NAMES, write_param_file, write_tiled_pack
from harness import Row, Target, at_most, starnet_spec

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
BASELINE_BATCHES = "128,256,512,1024,2048"
MC_SAMPLES = 100
GB = 1e9


def child(ctx, *args):
    """Run one ``measure_child.py`` measurement; its JSON result."""
    done = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "measure_child.py"), *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {args[0]} failed ({done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def survey_pack(ctx, npix, n_stars):
    """A pack of ``n_stars`` spectra of ``npix`` pixels: APOGEE-like example spectra for 7214 (``--survey-data``
    or made here), the data store's synthetic survey spectra for other lengths, repeated to size."""
    path = ctx.ws.sub("survey_infer", f"pack_{npix}_{n_stars}.pack")
    if os.path.exists(path):
        return path
    from anna.packs import open_pack

    if npix == 7214:
        from rows_survey import survey_data

        source = open_pack(os.path.join(survey_data(ctx), "train.pack"))
    else:
        source = open_pack(ctx.data.example(npix)["train"])
    base = min(source.n_stars, 2000)
    ctx.log(f"  writing a {n_stars}-star pack of {npix} px ({n_stars * (npix + 7) * 8 / GB:.2f} GB)")
    return write_tiled_pack(path, source.wavelengths, np.array(source.labels[:base]),
                            np.array(source.flux[:base]), n_stars)


def network_model(ctx, name, pack_path, conv_layers, fc_dims, dropout_rate=0.0, heteroscedastic=False):
    """A frozen model (folder) of an untrained network for the pack's grid, with training-domain statistics of
    DOMAIN_SPECTRA of the pack's spectra noised at S/N 100."""
    folder = ctx.ws.sub("survey_infer", "models", name, "x")
    folder = os.path.dirname(folder)
    if os.path.exists(os.path.join(folder, "frozen.model")):
        return folder
    from anna.domain import training_domain_statistics
    from anna.model import NetworkSpec, build_network, save_frozen
    from anna.packs import open_pack
    from anna.synth import DEFAULT_LABEL_RANGES

    pack = open_pack(pack_path)
    spec = NetworkSpec(npix=pack.npix, nout=pack.nout, conv_layers=tuple(conv_layers), fc_dims=tuple(fc_dims),
                       heteroscedastic=heteroscedastic)
    network = build_network(spec, dropout_rate=dropout_rate)
    flux = np.array(pack.flux[:DOMAIN_SPECTRA])
    flux += np.random.default_rng(4).normal(0.0, 0.01, flux.shape)
    ranges = np.asarray(DEFAULT_LABEL_RANGES[:pack.nout])
    metadata = {"output_names": list(LABEL_NAMES[:pack.nout]), "min_params": ranges[:, 0].tolist(),
                "max_params": ranges[:, 1].tolist(), "wavelengths": pack.wavelengths.tolist(),
                "mc_dropout_rate": float(dropout_rate), "complete": True,
                "note": "untrained network written by the benchmark script",
                "training_domain": training_domain_statistics(flux)}
    if heteroscedastic:
        metadata["variance_calibration"] = {"model_variance_scale": [1.0] * pack.nout,
                                            "note": "benchmark model: unit scales (speed only)"}
    save_frozen(folder, network, spec, metadata)
    return folder


def infer_row(ctx, label, model_dir, pack_path, n_stars, extra=None, baseline=None):
    """anna-infer on the pack (child process) against the plain predict baseline (child process; ``baseline``:
    one already measured).  Returns (runs, baseline, best rate); each run's ``startup`` is the seconds from
    its start to its first block's start (model load, plan, form choice, first compile)."""
    ctx.log(f"  {label}: anna-infer DEBUG on {n_stars} stars")
    runs = []
    for number in range(ctx.sizes.repeats):  # each run into a fresh folder: a rerun would skip finished outputs
        out = ctx.ws.fresh_dir("survey_infer", "out", label.replace(" ", "_"), f"run{number}")
        values = {"INFER_MODE": "DEBUG", "DEBUG_DATA": pack_path, "INFER_MODEL_LOC": model_dir,
                  "INFER_SAVE_LOC": out, **(extra or {})}
        param = write_param_file(ctx.ws.sub("survey_infer", "params", f"{label.replace(' ', '_')}_{number}.param"),
                                 values)
        runs.append(child(ctx, "infer", param))
        if "skipped 0 done" not in runs[-1]["lines"][0]:
            raise RuntimeError(f"anna-infer skipped its input: {runs[-1]['lines'][0]}")
    for line in runs[0]["lines"][:4]:
        ctx.log(f"    | {line}")
    if baseline is None:
        ctx.log(f"  {label}: plain Keras predict, batches {BASELINE_BATCHES}")
        baseline = child(ctx, "predict", model_dir, pack_path, BASELINE_BATCHES)
    rates = [n_stars / run["seconds"] for run in runs]
    best = max(rates)
    return runs, baseline, best


def rates_text(rates):
    """Each run's rate, as the rows' notes list them."""
    return ", ".join(format(rate, ",.0f") for rate in rates) + "/s"


def startup_text(runs, n_stars):
    """The best run's seconds to its forward-pass line (model load, plan, form choice)."""
    run = max(runs, key=lambda run: n_stars / run["seconds"])
    seconds = next((at for line, at in zip(run["lines"], run.get("line_seconds", ())) if line.startswith("forward pass")),
                   None)
    return "" if seconds is None else f"; {seconds:.2f} s of it before the first block (model load, plan, form)"


def survey_inference(ctx):
    sizes = ctx.sizes
    n = sizes.survey_infer_stars
    rows, details = [], {}
    from anna.model import NetworkSpec

    networks = [
        ("tutorial network, 1001 px", NetworkSpec(npix=1001, nout=5)),
        ("StarNet2017-shaped, LAMOST-size 3909 px", starnet_spec(3909)),
        ("StarNet2017-shaped, APOGEE-size 7214 px", starnet_spec(7214)),
    ]
    for label, spec in networks:
        npix = spec.npix
        pack = survey_pack(ctx, npix, n)
        model_dir = network_model(ctx, f"net_{npix}", pack, spec.conv_layers, spec.fc_dims)
        runs, baseline, best = infer_row(ctx, label, model_dir, pack, n)
        rates = [n / run["seconds"] for run in runs]
        peak = max(run["peak_rss"] for run in runs)
        plan = next((line for line in runs[0]["lines"] if line.startswith("INFER_BATCH_SIZE")), "")
        form = next((line for line in runs[0]["lines"] if line.startswith("forward pass")), "")
        rows.append(Row("survey_infer", f"anna-infer DEBUG, {label} ({n} stars)", best, "spectra/s",
                        baseline["rate"], Target("ratio", ">=", 0.8, ">= 0.8x"),
                        f"best of {len(runs)} runs incl. model load, plan, form choice, reading, flags, domain "
                        f"statistics, CSV ({rates_text(rates)}"
                        f"{startup_text(runs, n)}); "
                        f"{plan.split(' (')[0]}; {form.split(' (')[0]}; baseline = model.predict on the pack in "
                        f"memory, best of {len(baseline['rates'])} settings ({baseline['best']})"))
        rows.append(Row("survey_infer", f"  peak RSS of that anna-infer ({label})", peak / GB, "GB",
                        baseline["peak_rss"] / GB, at_most(2.0, "2 GB"),
                        "largest of the runs; baseline = the plain predict process (whole pack in memory)",
                        higher_is_better=False))
        details[label] = {"runs": runs, "baseline": baseline}
        large = dict(ctx.sizes.survey_infer_large).get(npix)
        if large:
            rows += large_pack_rows(ctx, label, model_dir, npix, large, baseline, details)
        if npix == 7214:
            rows += test_rows(ctx, model_dir, pack, n, baseline, details)
    rows += mc_rows(ctx, details)
    rows += rss_against_pack_size(ctx, details)
    return rows, details


def large_pack_rows(ctx, label, model_dir, npix, n, baseline, details):
    """anna-infer on a pack of a survey's scale (``n`` stars), against the same in-memory baseline (its rate
    per spectrum does not depend on the pack's size)."""
    need = n * (npix + 7) * 8 + 4e9
    name = f"anna-infer DEBUG, {label} ({n:,} stars)"
    if ctx.ws.free_bytes() < need:
        return [Row("survey_infer", name, unit="spectra/s", status="skipped",
                    note=f"only {ctx.ws.free_bytes() / GB:.0f} GB free on the workspace disk, {need / GB:.0f} GB needed")]
    pack = survey_pack(ctx, npix, n)
    runs, _, best = infer_row(ctx, f"{label} large", model_dir, pack, n, baseline=baseline)
    peak = max(run["peak_rss"] for run in runs)
    rates = [n / run["seconds"] for run in runs]
    details[f"{label}, {n} stars"] = {"runs": runs}
    rows = [Row("survey_infer", name, best, "spectra/s", baseline["rate"], Target("ratio", ">=", 0.8, ">= 0.8x"),
                f"best of {len(runs)} runs, everything included as above ({rates_text(rates)}"
                f"{startup_text(runs, n)}); "
                f"baseline = the 20,000-star row's plain predict ({baseline['best']})"),
            Row("survey_infer", f"  peak RSS of that anna-infer ({n:,} stars)", peak / GB, "GB",
                baseline["peak_rss"] / GB, at_most(2.0, "2 GB"), "largest of the runs; baseline = the plain "
                "predict process of the 20,000-star row", higher_is_better=False)]
    if n * (npix + 7) * 8 > 2e9:
        os.remove(pack)
    return rows


def test_rows(ctx, model_dir, pack, n, baseline, details):
    """anna-test on the APOGEE-size pack, without noising (the network's work, as the baseline's) and with
    PREPROCESS_TEST at S/N 60 (what testing usually does: the noise is extra work the baseline has not)."""
    rows = []
    for noised in (False, True):
        label = "anna-test, APOGEE-size 7214 px" + (", PREPROCESS_TEST S/N 60" if noised else "")
        values = {"TEST_MODEL_LOC": model_dir, "TESTING_DATA": pack,
                  "TEST_SAVE_LOC": ctx.ws.fresh_dir("survey_infer", "test", "noised" if noised else "plain"),
                  "PREPROCESS_TEST": "YES" if noised else "NO"}
        if noised:
            from rows_survey import survey_data

            values.update({"SN_RANGE_TEST": "60, 60", "REL_CONT_E_TEST": "-0.01, 0.01",
                           "SN_TEMPLATE_TEST": os.path.join(survey_data(ctx), "sn.template")})
        param = write_param_file(ctx.ws.sub("survey_infer", "params", f"test_{int(noised)}.param"), values)
        ctx.log(f"  {label}: anna-test on {n} stars, {ctx.sizes.repeats} run(s)")
        # best of the same number of runs as the anna-infer rows: a single run read 0.79x where the next
        # three of the same code, minutes later, gave 0.86-0.89x (2026-12-02)
        runs = [child(ctx, "test", param) for _ in range(ctx.sizes.repeats)]
        rates = [n / run["seconds"] for run in runs]
        rows.append(Row("survey_infer", f"{label} ({n} stars)", max(rates), "spectra/s", baseline["rate"],
                        Target("ratio", ">=", 0.8, ">= 0.8x") if not noised else None,
                        f"best of {len(runs)} runs of run_test up to the plots and summary (residual CSV, statistics, "
                        f"PNG plots included; {rates_text(rates)}); baseline = the "
                        "same plain predict as the anna-infer row"))
        rows.append(Row("survey_infer", "  peak RSS of that anna-test", max(run["peak_rss"] for run in runs) / GB,
                        "GB", baseline["peak_rss"] / GB, at_most(2.0, "2 GB"),
                        "largest of the runs; baseline = the plain predict process", higher_is_better=False))
        details[label] = {"runs": runs}
    return rows


def mc_rows(ctx, details):
    """MC dropout (N = MC_SAMPLES) end to end on the APOGEE-size network with a variance head."""
    n = ctx.sizes.survey_mc_stars
    pack = survey_pack(ctx, 7214, n)
    starnet = starnet_spec(7214)
    model_dir = network_model(ctx, "net_7214_mc", pack, starnet.conv_layers, starnet.fc_dims, dropout_rate=0.1,
                              heteroscedastic=True)
    label = "MC dropout N=100, APOGEE-size"
    out = ctx.ws.fresh_dir("survey_infer", "out", "mc")
    param = write_param_file(ctx.ws.sub("survey_infer", "params", "mc.param"), {
        "INFER_MODE": "DEBUG", "DEBUG_DATA": pack, "INFER_MODEL_LOC": model_dir, "INFER_SAVE_LOC": out,
        "UNCERTAINTY": "MC_DROPOUT", "MC_SAMPLES": MC_SAMPLES})
    ctx.log(f"  {label}: anna-infer on {n} stars")
    run = child(ctx, "infer", param)
    ctx.log(f"  {label}: plain sampling, {MC_SAMPLES} XLA passes per batch of 256")
    baseline = child(ctx, "mc", model_dir, pack, MC_SAMPLES)
    rate = n / run["seconds"]
    plan = next((line for line in run["lines"] if line.startswith("INFER_BATCH_SIZE")), "")
    details[label] = {"run": run, "baseline": baseline}
    return [Row("survey_infer", f"anna-infer MC dropout N={MC_SAMPLES}, StarNet2017-shaped 7214 px ({n} stars)",
                rate, "spectra/s", baseline["rate"],
                note=f"end to end with the uncertainty columns; MC{plan.split('; MC')[-1] if plan else ''}; "
                     f"baseline = {MC_SAMPLES} full passes per spectrum (XLA, training=True) on the pack in "
                     f"memory, mean and spread"),
            Row("survey_infer", "  peak RSS of that anna-infer", run["peak_rss"] / GB, "GB",
                baseline["peak_rss"] / GB, at_most(2.0, "2 GB"), "baseline = the plain sampling process",
                higher_is_better=False)]


def rss_against_pack_size(ctx, details):
    """Peak RSS of anna-infer DEBUG (APOGEE-size network) on packs of each ``survey_rss_stars`` size; baseline
    = the smallest pack's peak (ratio 1 = flat)."""
    rows = []
    starnet = starnet_spec(7214)
    model_dir = network_model(ctx, "net_7214", survey_pack(ctx, 7214, ctx.sizes.survey_infer_stars),
                              starnet.conv_layers, starnet.fc_dims)
    reference = None
    for n in ctx.sizes.survey_rss_stars:
        need = n * (7214 + 7) * 8 + 4e9
        free = ctx.ws.free_bytes()
        name = f"peak RSS of anna-infer DEBUG, {n:,} stars of 7214 px ({n * 7221 * 8 / GB:.1f} GB pack)"
        if free < need:
            rows.append(Row("survey_infer", name, unit="GB", status="skipped", higher_is_better=False,
                            note=f"only {free / GB:.0f} GB free on the workspace disk, {need / GB:.0f} GB needed"))
            continue
        pack = survey_pack(ctx, 7214, n)
        out = ctx.ws.fresh_dir("survey_infer", "out", f"rss_{n}")
        param = write_param_file(ctx.ws.sub("survey_infer", "params", f"rss_{n}.param"), {
            "INFER_MODE": "DEBUG", "DEBUG_DATA": pack, "INFER_MODEL_LOC": model_dir, "INFER_SAVE_LOC": out})
        ctx.log(f"  anna-infer DEBUG on {n} stars (peak RSS)")
        run = child(ctx, "infer", param)
        peak = run["peak_rss"] / GB
        if reference is None:
            reference = peak
        rows.append(Row("survey_infer", name, peak, "GB", reference, at_most(2.0, "2 GB"),
                        f"{n / run['seconds']:,.0f} spectra/s; baseline = the smallest pack's peak (ratio 1 = flat)",
                        higher_is_better=False))
        details[f"rss_{n}"] = run
        if n != ctx.sizes.survey_infer_stars and n * 7221 * 8 > 5e9:
            os.remove(pack)
    return rows
