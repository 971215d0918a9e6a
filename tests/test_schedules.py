"""Learning-rate schedules (CONSTANT, PLATEAU, COSINE), AdamW, and the per-stage time limit: the schedule as a
pure object, then through anna-train (TensorBoard, frozen-model metadata, resume after kill -9)."""

import math

import numpy as np
import pytest

from anna.model import load_frozen
from anna.params import load_config
from anna.train import LearningRateSchedule, read_checkpoint, run_training

from test_train import QUIET, _start_training, _wait_for_checkpoint, write_params


def test_constant_keeps_the_rate():
    schedule = LearningRateSchedule("CONSTANT", 1e-3, 1000)
    assert [schedule.rate(i) for i in (0, 500, 1000)] == [1e-3] * 3
    assert all(schedule.after_interval(False, i) is None for i in range(20))
    assert schedule.rate(999) == 1e-3


def test_plateau_cuts_after_patience_and_restarts_the_count():
    schedule = LearningRateSchedule("PLATEAU", 1e-3, 1000, patience=3, factor=0.5, minimum=2e-4)
    outcomes = [True, False, False, False, False, True, False, False, False, False, False, False, False, False]
    cuts = [schedule.after_interval(improved, 50 * (i + 1)) for i, improved in enumerate(outcomes)]
    # 3 intervals without a new best -> cut at interval 4; an improvement resets; then cuts every 3 intervals
    # until the floor 2e-4 (1e-3 -> 5e-4 -> 2.5e-4 -> 2e-4, then no more cuts)
    assert cuts == [None, None, None, 5e-4, None, None, None, None, 2.5e-4, None, None, 2e-4, None, None]
    assert schedule.rate(700) == 2e-4
    assert schedule.cuts == [[200, 5e-4], [450, 2.5e-4], [600, 2e-4]]


def test_cosine_follows_the_formula_by_iterations_or_time():
    schedule = LearningRateSchedule("COSINE", 1e-3, 1000, minimum=1e-5)
    for iteration in (0, 250, 500, 750, 1000):
        expected = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * iteration / 1000))
        assert schedule.rate(iteration) == pytest.approx(expected, rel=1e-12)
    assert schedule.rate(0) == pytest.approx(1e-3) and schedule.rate(1000) == pytest.approx(1e-5)
    timed = LearningRateSchedule("COSINE", 1e-3, 1000, max_seconds=100.0)
    # half the time gone but a tenth of the iterations: the time decides (the stage will end by time)
    assert timed.rate(100, elapsed_seconds=50.0) == pytest.approx(0.5e-3, rel=1e-12)
    assert timed.rate(900, elapsed_seconds=10.0) == pytest.approx(timed.rate(900), rel=1e-12)
    assert timed.rate(0, elapsed_seconds=500.0) == 0.0


def test_cosine_with_decay_start_holds_the_rate_then_decays_over_the_rest():
    schedule = LearningRateSchedule("COSINE", 1e-3, 1000, minimum=1e-5, decay_start=0.6)
    assert [schedule.rate(i) for i in (0, 300, 600)] == [1e-3, 1e-3, 1e-3]
    for iteration in (700, 800, 900, 1000):
        p = (iteration / 1000 - 0.6) / 0.4
        assert schedule.rate(iteration) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * p)),
                                                         rel=1e-12)
    assert schedule.rate(800) == pytest.approx(0.5 * (1e-3 + 1e-5), rel=1e-12)  # halfway through the decay
    timed = LearningRateSchedule("COSINE", 1e-3, 10**6, max_seconds=100.0, decay_start=0.5)
    assert timed.rate(10, elapsed_seconds=49.0) == 1e-3
    assert timed.rate(10, elapsed_seconds=75.0) == pytest.approx(0.5e-3, rel=1e-12)
    assert timed.rate(10, elapsed_seconds=100.0) == 0.0


def test_schedule_state_round_trips():
    schedule = LearningRateSchedule("PLATEAU", 1e-3, 1000, patience=1)
    schedule.after_interval(False, 50)
    schedule.after_interval(False, 100)
    restored = LearningRateSchedule("PLATEAU", 1e-3, 1000, patience=1)
    restored.restore(schedule.state())
    assert restored.rate(100) == schedule.rate(100) == 2.5e-4 and restored.cuts == schedule.cuts


def _event_scalars(log_dir, tag):
    """(step, value) of a scalar summary, read back by TensorBoard's own event reader."""
    import glob

    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = sorted(glob.glob(f"{log_dir}/run-*"))[-1]
    accumulator = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    events = sorted(accumulator.Tensors(tag), key=lambda event: event.wall_time)
    return [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in events]


def _latest_by_step(scalars):
    """{step: value}, the latest write winning (a resumed run logs again the steps a killed one had logged)."""
    return dict(scalars)


def test_cosine_and_adamw_through_training_reach_tensorboard_and_the_model(tmp_path, toy_packs):
    cfg = load_config(write_params(tmp_path, toy_packs, LR_SCHEDULE="COSINE", LR_MIN=1e-5, LEARN_RATE2=1e-4,
                                   OPTIMIZER="ADAMW", WEIGHT_DECAY=1e-3, NUM_TRAIN_ITERS1=200, NUM_TRAIN_ITERS2=60,
                                   SAMPLE_INTERVAL=20, JIT_COMPILE="NO"))
    result = run_training(cfg, report=QUIET)
    logged = _event_scalars(cfg.log_loc, "learning_rate")
    assert len(logged) == 10 + 3
    stage1 = [rate for step, rate in logged[:10]]
    assert all(a > b for a, b in zip(stage1, stage1[1:]))  # decays through the stage
    # the rate logged at an interval is the one set for that interval's last chunk (NUM_FETCH 256 / batch 32 =
    # 8 steps; the interval's last call starts at a multiple of 8 or of 20)
    history = [record for record in result["history"] if record["stage"] == 1]
    for record, (_, rate) in zip(history, logged[:10]):
        assert record["learning_rate"] == pytest.approx(rate, rel=1e-6)
        start = max((record["iteration"] - 1) // 8 * 8, record["iteration"] - 20)
        assert rate == pytest.approx(1e-5 + (2e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * start / 200)), rel=1e-6)
    metadata = load_frozen(cfg.save_loc).metadata
    assert metadata["optimizer"] == {"name": "ADAMW", "weight_decay": 1e-3}
    assert metadata["lr_schedule"]["kind"] == "COSINE" and metadata["lr_schedule"]["decay_start"] == 0.0
    assert metadata["stages"][0]["learning_rate"]["final"] < 0.1 * 2e-3


def test_time_limit_ends_stage_one_with_best_weights_and_stage_two_still_runs(tmp_path, toy_packs):
    cfg = load_config(write_params(tmp_path, toy_packs, MAX_MINUTES1=0.05, NUM_TRAIN_ITERS1=10 ** 6,
                                   NUM_TRAIN_ITERS2=40, SAMPLE_INTERVAL=20, TBOARD_OUTPUT="NO", JIT_COMPILE="NO",
                                   ES_SAMPLE=10 ** 6))
    lines = []
    result = run_training(cfg, report=lines.append)
    first, second = result["stages"]
    assert first["stopped_by"] == "time_limit" and 20 <= first["iterations"] < 10 ** 6
    assert first["seconds"] >= 3.0 and first["seconds"] < 3.0 + 30
    assert second["stopped_by"] == "iterations" and second["iterations"] == 40
    assert any("time limit of 0.05 min reached" in line for line in lines)
    stage1 = [record for record in result["history"] if record["stage"] == 1]
    best = min(stage1, key=lambda record: record["xval_cost"])
    assert first["best_cost"] == pytest.approx(min(best["xval_cost"], first["best_cost"]))
    assert load_frozen(cfg.save_loc).metadata["stages"][0]["stopped_by"] == "time_limit"


def _kill_after_checkpoints(path, checkpoint, count):
    proc = _start_training(path)
    _wait_for_checkpoint(checkpoint)
    for _ in range(count - 1):
        _wait_for_checkpoint(checkpoint, newer_than=checkpoint.stat().st_mtime_ns)
    proc.kill()
    proc.communicate(timeout=60)


def _resume(path, capsys):
    """The rerun after the kill, through the function the console command calls, in this process (the command's
    own exit status and lines after a kill -9 are tests/test_train.py's); returns what it printed."""
    from anna.cli import train_main

    capsys.readouterr()
    status = train_main([str(path)])
    out = capsys.readouterr()
    assert status == 0, out.err
    return out.out


def test_plateau_schedule_resumes_exactly_after_kill_9(tmp_path, toy_packs, capsys):
    """A rate far too high stops improving at once, so PLATEAU (patience 1) cuts it interval after interval;
    after kill -9 the rerun continues from the checkpoint's rate and count, not from LEARN_RATE1."""
    path = write_params(tmp_path, toy_packs, LR_SCHEDULE="PLATEAU", LR_PATIENCE=1, LR_FACTOR=0.7,
                        LEARN_RATE1=0.5, NUM_TRAIN_ITERS1=300, SAMPLE_INTERVAL=20, DO_TRAIN2="NO",
                        ES_SAMPLE=10 ** 6, JIT_COMPILE="NO")
    checkpoint = tmp_path / "model" / "checkpoint.anna"
    _kill_after_checkpoints(path, checkpoint, 4)
    state, _ = read_checkpoint(checkpoint)
    assert state["schedule"]["cuts"], "the test needs a cut before the kill"
    saved_rate, stopped_at = state["schedule"]["current"], state["iteration"]
    assert saved_rate < 0.5
    out = _resume(path, capsys)
    model = load_frozen(tmp_path / "model")
    first = next(line for line in out.splitlines() if line.startswith("stage 1 iter"))
    assert int(first.split()[3].rstrip(":")) == stopped_at + 20
    logged = _latest_by_step(_event_scalars(tmp_path / "logs", "learning_rate"))
    assert logged[stopped_at + 20] == pytest.approx(saved_rate, rel=1e-6)  # continues at the saved rate
    cuts = model.metadata["stages"][0]["learning_rate"]["cuts"]
    assert cuts[:len(state["schedule"]["cuts"])] == state["schedule"]["cuts"]  # the cuts before the kill kept


def test_cosine_schedule_after_kill_9_matches_an_uninterrupted_run(tmp_path, toy_packs, capsys):
    iterations = 240  # the kill comes after the third checkpoint (iteration ~60): the rest is the resume's
    keys = dict(LR_SCHEDULE="COSINE", NUM_TRAIN_ITERS1=iterations, SAMPLE_INTERVAL=20, DO_TRAIN2="NO",
                ES_SAMPLE=10 ** 6, JIT_COMPILE="NO")
    reference_folder = tmp_path / "reference"
    reference_folder.mkdir()
    reference = run_training(load_config(write_params(reference_folder, toy_packs, TBOARD_OUTPUT="NO", **keys)),
                             report=QUIET)
    expected = {record["iteration"]: record["learning_rate"] for record in reference["history"]}

    path = write_params(tmp_path, toy_packs, **keys)
    checkpoint = tmp_path / "model" / "checkpoint.anna"
    _kill_after_checkpoints(path, checkpoint, 3)
    stopped_at = read_checkpoint(checkpoint)[0]["iteration"]
    _resume(path, capsys)
    logged = _latest_by_step(_event_scalars(tmp_path / "logs", "learning_rate"))
    resumed = {step: rate for step, rate in logged.items() if step > stopped_at}
    assert sorted(resumed) == list(range(stopped_at + 20, iterations + 1, 20))
    for step, rate in resumed.items():
        assert rate == pytest.approx(expected[step], rel=1e-6)  # float32 in the event file


def test_early_stopping_keeps_the_best_cost_iteration_and_a_copy_of_its_weights():
    from anna.train import EarlyStopping

    stopper = EarlyStopping(patience=3)
    weights = [np.zeros(3)]
    assert stopper.update(0.5, 50, weights) is True
    weights[0][:] = 7.0  # the stopper holds a copy, not the caller's array
    assert stopper.update(0.6, 100, weights) is False and stopper.update(0.5, 150, weights) is False
    assert (stopper.best_cost, stopper.best_iteration, stopper.bad_intervals) == (0.5, 50, 2)
    np.testing.assert_array_equal(stopper.best_weights[0], np.zeros(3))
    assert not stopper.should_stop
    assert stopper.update(0.4, 200, weights) is True and stopper.bad_intervals == 0  # a new best resets the count
    for iteration in (250, 300, 350):
        stopper.update(0.45, iteration, weights)
    assert stopper.should_stop and stopper.best_iteration == 200 and stopper.best_weights[0][0] == 7.0


def test_early_stopping_disabled_never_stops_but_still_tracks_the_best():
    from anna.train import EarlyStopping

    stopper = EarlyStopping(patience=1, enabled=False)
    stopper.update(1.0, 10, [np.ones(2)])
    for iteration in range(20, 100, 10):
        stopper.update(2.0, iteration, [np.zeros(2)])
    assert not stopper.should_stop and stopper.best_iteration == 10 and stopper.bad_intervals == 8


def test_checkpoint_round_trips_state_and_arrays(tmp_path):
    from anna.train import write_checkpoint

    arrays = {"weights": [np.arange(6.0).reshape(2, 3), np.float32(2.5) * np.ones(4, np.float32)],
              "optimizer": [np.int64(3)]}
    write_checkpoint(tmp_path / "c.anna", '{"iteration": 150, "seed": 7}', arrays)
    state, back = read_checkpoint(tmp_path / "c.anna")
    assert state == {"iteration": 150, "seed": 7} and sorted(back) == ["optimizer", "weights"]
    for name in arrays:
        for stored, original in zip(back[name], arrays[name]):
            np.testing.assert_array_equal(stored, original)
            assert np.asarray(stored).dtype == np.asarray(original).dtype
