"""Atomic output: whole files or nothing, and leftovers of killed writers cleared without touching live ones."""

import os
import subprocess
import sys

import pytest

from anna.atomic import atomic_output


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as handle:
            handle.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["result.csv"]
    with atomic_output(target) as handle:
        handle.write("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["result.csv"]


def test_orphans_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".result.csv.{dead_pid}.abc123.tmp"
    live = tmp_path / f".result.csv.{os.getpid()}.def456.tmp"
    other_target = tmp_path / f".other.csv.{dead_pid}.abc123.tmp"
    for path in (orphan, live, other_target):
        path.write_text("partial")
    with atomic_output(tmp_path / "result.csv") as handle:
        handle.write("done\n")
    assert not orphan.exists()
    assert live.exists() and other_target.exists()
