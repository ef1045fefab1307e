"""A training process that vanishes (SIGKILL) leaves `attempt.json` saying it was running; the next
process in the run directory says what most likely happened. One that ended as Python sees an end
(finished or an error) leaves nothing to say."""

from __future__ import annotations

import json
import logging

import pytest

from persllm_jax.train.attempts import Attempt


def test_a_vanished_process_is_diagnosed_by_the_next(tmp_path, caplog):
    killed = Attempt(tmp_path, command="persllm sft --config x.yaml")
    killed.__enter__()
    killed.step_done(3)  # ... and then SIGKILL: no __exit__
    record = json.loads((tmp_path / "attempt.json").read_text())
    assert record["status"] == "running" and record["step"] == 3 and record["peak_memory_gib"] > 0
    with caplog.at_level(logging.WARNING, logger="persllm_jax.train.attempts"):
        with Attempt(tmp_path) as again:
            again.step_done(4)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"pid {record['pid']}" in warning and "stopped after step 3 without exiting" in warning
    assert "out-of-memory killer" in warning and f"peak memory was {record['peak_memory_gib']} GiB" in warning
    assert json.loads((tmp_path / "attempt.json").read_text())["status"] == "ended"
    caplog.clear()
    with pytest.raises(RuntimeError), Attempt(tmp_path):
        raise RuntimeError("loss is nan")
    ended = json.loads((tmp_path / "attempt.json").read_text())
    assert ended["status"] == "ended" and ended["error"] == "RuntimeError: loss is nan"
    with caplog.at_level(logging.WARNING, logger="persllm_jax.train.attempts"), Attempt(tmp_path):
        pass
    assert not caplog.records, "an ended process is not a vanished one"
