"""Evaluation during training (`eval.every_steps`): held-out loss and DPO's reward metrics over the
`test` split, before any update and every N steps, the same with packing on and off."""

import math
from pathlib import Path

import pytest

from persllm_jax.train.metrics_log import read_metrics
from tests.train_runs import EIGHT_DEVICES, train

# One persona's probe set (63 probes) keeps the runs short on 8 CPU devices; the others are alike.
HOLMES_PROBES = Path(__file__).resolve().parents[1] / "examples" / "personas" / "holmes" / "probes.jsonl"


def _held_out(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/loss" in r]


@pytest.mark.slow
def test_sft_held_out_loss_is_the_same_packed_and_unpacked(tmp_path):
    records = {}
    for packing in ("true", "false"):
        run_dir = tmp_path / packing
        train(
            "sft",
            run_dir,
            f"train.packing={packing}",
            "eval.every_steps=2",
            f"eval.probes=[{HOLMES_PROBES}]",
            "train.max_steps=4",
            env=EIGHT_DEVICES,
        )
        records[packing] = _held_out(run_dir)
        assert [r["step"] for r in records[packing]] == [0, 2, 4]
        assert (run_dir / "loss.png").is_file()
    packed, unpacked = records["true"][0], records["false"][0]
    # the 6 held-out dialogues of tests/data (split: test), every assistant token of them
    assert packed["eval/trained_tokens"] == unpacked["eval/trained_tokens"] > 0
    assert math.isclose(packed["eval/loss"], unpacked["eval/loss"], rel_tol=1e-5)
    for name in ("eval/loss/persona=holmes", "eval/loss/stage=late"):
        assert math.isclose(packed[name], unpacked[name], rel_tol=1e-5), name
    assert records["true"][-1]["eval/loss"] < packed["eval/loss"], "training lowers the held-out loss"
    # The persona probes at every evaluation; the same parameters before step 1 give the same picks
    # packed or not.
    for record in records["true"] + records["false"]:
        assert (
            0.0 <= record["eval/probes/accuracy"] <= 1.0 and 0.0 <= record["eval/probes/twin_accuracy"] <= 1.0
        )
        assert -1.0 <= record["eval/probes/stage_effect"] <= 1.0
    for key in ("eval/probes/accuracy", "eval/probes/twin_accuracy", "eval/probes/stage_effect"):
        assert packed[key] == unpacked[key], key
    scalars = _tensorboard_scalars(tmp_path / "true" / "tensorboard")
    assert [step for step, _ in scalars["eval/probes/accuracy"]] == [0, 2, 4]
    assert [v for _, v in scalars["eval/probes/accuracy"]] == pytest.approx(
        [r["eval/probes/accuracy"] for r in records["true"]]
    )


def _tensorboard_scalars(folder):
    """{tag: [(step, value)]} read from the event files (TFRecord framing around Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_dpo_held_out_metrics_at_step_0(tmp_path):
    """Before any update the policy is the reference: log 2 and zero rewards on the held-out
    pairs, sliced by persona, stage and how the pairs were mined; packed equals unpacked."""
    first = {}
    for packing in ("true", "false"):
        run_dir = tmp_path / packing
        train(
            "dpo",
            run_dir,
            f"train.packing={packing}",
            "eval.every_steps=4",
            f"eval.probes=[{HOLMES_PROBES}]",
            "train.max_steps=4",
            env=EIGHT_DEVICES,
        )
        held = _held_out(run_dir)
        assert [r["step"] for r in held] == [0, 4]
        first[packing] = held[0]
        assert abs(held[0]["eval/loss"] - math.log(2)) < 1e-6
        for key in ("eval/rewards/chosen", "eval/rewards/margins", "eval/rewards/margins/source=cross_stage"):
            assert abs(held[0][key]) < 1e-6, key
        assert held[0]["eval/pairs"] == 6  # the held-out pairs of tests/data, all mined across stages
        assert {"eval/rewards/accuracies/persona=holmes", "eval/loss/source=cross_stage"} <= held[0].keys()
    for key in (
        "eval/logps/chosen",
        "eval/logps/rejected",
        "eval/probes/accuracy",
        "eval/probes/stage_effect",
    ):
        assert math.isclose(first["true"][key], first["false"][key], rel_tol=1e-5), key
