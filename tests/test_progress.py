"""Progress off a terminal: plain log lines with the count, the rate and the time left, from the start
of a stage; no carriage returns."""

from __future__ import annotations

import logging
import time

from persllm_jax import progress


def test_progress_off_a_terminal_writes_plain_lines(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress, "on_terminal", lambda: False)

    def at(t, fn, *args, **kwargs):
        now[0] = t
        fn(*args, **kwargs)

    with caplog.at_level(logging.INFO, logger="persllm.progress"):
        bar = progress.Progress(100, "answers", unit="req")  # t=0: the started line
        at(10.0, bar.update, 10)  # under 30 s since the last line: none
        at(31.0, bar.update, 20)  # a line
        bar.set_postfix(hits=3)
        at(45.0, bar.update, 10)  # none
        at(62.0, bar.update, 20)  # a line
        at(70.0, bar.close)  # the done line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "answers: 0/100 (0%), started",
        "answers: 30/100 (30%), 0.968 req/s, 00:31 elapsed, 01:12 left",
        "answers: 60/100 (60%), 0.968 req/s, 01:02 elapsed, 00:41 left, hits 3",
        "answers: 60/100 (60%), 0.857 req/s, 01:10 elapsed, done, hits 3",
    ]
    assert not any("\r" in line for line in lines)


def test_a_stage_with_nothing_finished_still_writes_a_line_every_period(caplog, monkeypatch):
    """A stage waiting on its first result (a batch on a CPU server, a step compiling) is not silent:
    the heartbeat writes a line each period, with the rate 0 and the time left unknown."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="persllm.progress"):
        began = time.monotonic()
        bar = progress.Progress(10, "answers", unit="req", every_s=0.2)
        time.sleep(0.7)
        bar.update(10)  # due or not, the stage now closes with its done line
        bar.close()
        waited = time.monotonic() - began
        time.sleep(0.5)  # a closed stage writes no more
    lines = [r.getMessage() for r in caplog.records]
    heartbeats = lines[1:-1]
    assert lines[0] == "answers: 0/10 (0%), started"
    assert lines[-1].startswith("answers: 10/10 (100%), ") and lines[-1].endswith(" elapsed, done")
    # one line per whole period waited, at most (the heartbeat may run late on a loaded machine)
    assert 1 <= len(heartbeats) <= int(waited / 0.2), lines
    for line in heartbeats:  # update(10) completes the stage: its line is the done line
        assert line.startswith("answers: 0/10 (0%), 0 req/s, ") and line.endswith(
            " elapsed, time left unknown"
        )
