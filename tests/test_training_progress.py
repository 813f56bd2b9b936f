"""Training progress on the driver: a line per job that moved, with step/total, loss, rate, ETA and elapsed time; a
worker group still starting is said to be; every job's last step is shown, however short the run."""

from __future__ import annotations

import time

from pipelines.training.progress import (Position, ProgressPrinter, duration, position_file, progress_line, read_position,
                                         write_position)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_says_where_training_is_and_when_it_will_end():
    line = progress_line(Position(job=1, step=120, steps=1000, loss=1.23456, train_seconds=40.0), ["add", "sort"], 95.0)
    assert line == "  sort (job 2/2): step 120/1000  loss 1.2346  3.00 steps/s  ETA 4m53s  elapsed 1m35s"
    assert "ETA ?" in progress_line(Position(0, 0, 10, 0.0, 0.0), ["add"], 3.0)
    assert [duration(s) for s in (None, 9.6, 65, 3725)] == ["?", "10s", "1m05s", "1h02m"]


def test_positions_round_trip_and_a_missing_or_partial_file_is_no_position(tmp_path):
    path = position_file(tmp_path, 0)
    assert read_position(path) is None
    write_position(path, Position(0, 3, 6, 2.5, 0.1))
    assert read_position(path) == Position(0, 3, 6, 2.5, 0.1)
    path.write_text('{"job": 0, "st')
    assert read_position(path) is None


def test_the_printer_says_the_group_is_starting_then_shows_each_job_that_moved_and_every_last_step(tmp_path):
    lines: list[str] = []
    clock = Clock()
    with ProgressPrinter(tmp_path, ["reverse", "sort"], 2, lines.append, every=0.05, clock=clock):
        time.sleep(0.2)
        assert lines[0] == "  starting 2 training workers (Ray Train, DeepSpeed)…"
        assert lines[1].startswith("  still starting the worker group…")
        write_position(position_file(tmp_path, 0), Position(0, 6, 6, 4.0, 0.5))
        write_position(position_file(tmp_path, 1), Position(1, 2, 6, 4.5, 0.2))
        clock.now += 12
        time.sleep(0.2)
        write_position(position_file(tmp_path, 1), Position(1, 6, 6, 4.1, 0.6))  # the last step, right before the end
    shown = [line for line in lines if "step" in line]
    assert shown == ["  reverse (job 1/2): step 6/6  loss 4.0000  12.00 steps/s  ETA 0s  elapsed 12s",
                     "  sort (job 2/2): step 2/6  loss 4.5000  10.00 steps/s  ETA 0s  elapsed 12s",
                     "  sort (job 2/2): step 6/6  loss 4.1000  10.00 steps/s  ETA 0s  elapsed 12s"]
    first = lines.index(shown[0])
    assert not any("still starting" in line for line in lines[first:])
