"""`persllm eval` below the judge: likelihood metrics against PyTorch, DPO metrics against the
formula, the answer plan, and a whole evaluation of a tiny model (the judge runs against a real
server in tests/test_readme.py, the demo at smoke scale)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from persllm_jax import configlib, load_pretrained
from persllm_jax.data import formats
from persllm_jax.data.readers import read_records
from persllm_jax.evaluation import answers, likelihood
from persllm_jax.evaluation.config import EvalConfig
from persllm_jax.evaluation.runner import evaluate
from persllm_jax.personas.materials import load_personas
from persllm_jax.train.tasks.dpo import pair_arrays
from persllm_jax.train.tasks.sft import sft_arrays
from tests import hf_fixtures

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PERSONAS = {p.id: p for p in load_personas(ROOT / "examples" / "personas")}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer plus the stage tokens, as an HF dir."""
    out = tmp_path_factory.mktemp("tiny_eval")
    tokenizer = transformers.AutoTokenizer.from_pretrained(DATA / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<TIME-I>", "<TIME-II>"]})
    hf_fixtures.save_tiny("llama_tied_gqa", out, vocab_size=len(tokenizer), max_position_embeddings=512)
    tokenizer.save_pretrained(out)
    return out


def _torch_answer_logps(hf_model, arrays: dict) -> float:
    """Summed log-probability of the masked targets, from transformers' forward pass in float64."""
    logits = hf_fixtures.torch_logits(hf_model, arrays["input_ids"][None], arrays["attention_mask"][None])[0]
    logits = logits.astype(np.float64)
    logps = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    picked = np.take_along_axis(logps, arrays["targets"][:, None].astype(np.int64), axis=-1)[:, 0]
    return float((picked * arrays["loss_mask"]).sum())


def test_likelihoods_match_transformers(tiny_dir):
    """Per-dialogue NLL and per-pair answer log-probs (batched, padded) equal PyTorch's to 1e-3
    absolute on sums of ~20-60 tokens (fp32 accumulation)."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model, tokenizer = load_pretrained(tiny_dir)
    scorer = likelihood.LikelihoodScorer(model, tokenizer, seq_len=256, batch_size=4)
    dialogues = [formats.sft_example(r) for r in read_records(DATA / "dialogues.jsonl")][:6]
    nll, counts = scorer.dialogue_nll(dialogues)
    for example, ours, count in zip(dialogues, nll, counts):
        arrays = sft_arrays(tokenizer, example, 256)
        assert count == arrays["loss_mask"].sum() > 0
        assert ours == pytest.approx(-_torch_answer_logps(hf_model, arrays), abs=1e-3)
    pairs = [formats.preference_example(r) for r in read_records(DATA / "pairs.jsonl")][:5]
    chosen, rejected = scorer.pair_logps(pairs)
    for example, c, r in zip(pairs, chosen, rejected):
        arrays = pair_arrays(tokenizer, example, 256)
        side = {k[len("chosen_") :]: v for k, v in arrays.items() if k.startswith("chosen_")}
        assert c == pytest.approx(_torch_answer_logps(hf_model, side), abs=1e-3)
        side = {k[len("rejected_") :]: v for k, v in arrays.items() if k.startswith("rejected_")}
        assert r == pytest.approx(_torch_answer_logps(hf_model, side), abs=1e-3)


def test_perplexity_and_dpo_metrics_known_answers():
    ppl = likelihood.perplexity(np.array([2 * math.log(4), math.log(4)]), np.array([2, 1]))
    assert ppl["perplexity"] == pytest.approx(4.0) and ppl["n_tokens"] == 3
    policy = (np.array([-10.0, -20.0, -5.0, -8.0]), np.array([-12.0, -15.0, -5.0, -9.0]))
    reference = (np.array([-11.0, -19.0, -6.0, -8.0]), np.array([-11.0, -19.0, -4.0, -8.0]))
    m = likelihood.dpo_metrics(policy, reference, beta=0.5)
    # rewards: chosen 0.5*(+1, -1, +1, 0) = (.5, -.5, .5, 0); rejected 0.5*(-1, +4, -1, -1) = (-.5, 2, -.5, -.5)
    assert m["reward_accuracy"] == pytest.approx(3 / 4)
    assert m["reward_margin"] == pytest.approx(np.mean([1.0, -2.5, 1.0, 0.5]))
    assert m["chosen_reward"] == pytest.approx(0.125) and m["rejected_reward"] == pytest.approx(0.125)
    assert m["preference_accuracy"] == pytest.approx(2 / 4) and m["n_pairs"] == 4


def test_answer_plan_covers_intra_stage_and_inter():
    records = read_records(DATA / "dialogues.jsonl", split="test")
    items = answers.test_items(records, PERSONAS)
    assert items and all(i.kind != "general" for i in items)
    plan = answers.answer_requests(items[:1], PERSONAS)
    item = items[0]
    identities = {(r["as_persona"], r["as_stage"], r["sample"]) for r in plan}
    other_stage = next(s.id for s in PERSONAS[item.persona].stages if s.id != item.stage)
    others = {p for p in PERSONAS if p != item.persona}
    assert identities == {
        (item.persona, item.stage, 0),
        (item.persona, item.stage, 1),
        (item.persona, other_stage, 0),
        *((q, item.stage, 0) for q in others),  # every example persona has the same stage ids
    }
    system = answers.conversation(plan[-1], PERSONAS)[0]["content"]
    assert system.startswith(PERSONAS[plan[-1]["as_persona"]].stage(plan[-1]["as_stage"]).token)
    capped = answers.test_items(records, PERSONAS, max_items=3)
    assert len(capped) == 3 and len({(i.persona, i.stage) for i in capped}) == 3  # spread over groups


def test_evaluate_tiny_models_end_to_end(tiny_dir, tmp_path):
    """Two models (the same weights under two names), judge off: report files, cached resume."""
    cfg = configlib.from_dict(
        EvalConfig,
        {
            "out_dir": str(tmp_path / "eval"),
            "models": [{"name": "sft", "path": str(tiny_dir)}, {"name": "dpo", "path": str(tiny_dir)}],
            "data": {
                "dialogues": str(DATA / "dialogues.jsonl"),
                "pairs": str(DATA / "pairs.jsonl"),
                "personas_dir": str(ROOT / "examples" / "personas"),
                "max_items": 2,
            },
            "generation": {"max_new_tokens": 6, "batch_size": 8},
            "likelihood": {"seq_len": 256, "batch_size": 4},
            "judge": {"enabled": False},
        },
    )
    result = evaluate(cfg)
    out = tmp_path / "eval"
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"sft", "dpo"}
    dpo = report["models"]["dpo"]["dpo"]
    # Identical weights: every reward is exactly zero, so no pair counts as won.
    assert dpo["reward_margin"] == 0 and dpo["reward_accuracy"] == 0 and dpo["reference"] == "sft"
    sources = {r["source"] for r in read_records(DATA / "pairs.jsonl", split="test")}
    assert set(dpo["by_source"]) == sources
    assert sum(v["n_pairs"] for v in dpo["by_source"].values()) == dpo["n_pairs"]
    assert (
        report["models"]["sft"]["perplexity"]["perplexity"]
        == report["models"]["dpo"]["perplexity"]["perplexity"]
    )
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * (2 + 1 + 2)  # models x items x (two samples, other stage, two personas)
    assert (out / "report.md").exists() and (out / "comparison_table.png").exists()
    assert result["metrics"]["models"]["sft"]["distinction"]["average"]["n_items"] == 2
    # The probes section: the examples' probe sets, the same picks for the same weights.
    probes = report["probes"]
    assert probes["meta"]["probes"] == sum(
        len((ROOT / "examples" / "personas" / p / "probes.jsonl").read_text().splitlines())
        for p in ("darwin", "elizabeth", "holmes")
    )
    assert probes["meta"]["held_out_dialogues"] == 2
    sft, dpo = probes["models"]["sft"], probes["models"]["dpo"]
    assert [r["pick"] for r in sft["probes"]] == [r["pick"] for r in dpo["probes"]]
    assert sft["accuracy"]["overall"] == dpo["accuracy"]["overall"]
    assert sft["attribution"]["persona"]["top1"]["n"] == 2
    report = (out / "report.md").read_text()
    # the probe table (base, SFT and DPO side by side) comes first, then BLEU and the judge
    assert report.index("## Persona probes") < report.index("## Model comparison")
    stamp = (out / "models" / "sft" / "answers.json").stat().st_mtime_ns
    probes_stamp = (out / "models" / "sft" / "probes.json").stat().st_mtime_ns
    evaluate(cfg)
    assert (out / "models" / "sft" / "answers.json").stat().st_mtime_ns == stamp  # resumed, not redone
    assert (out / "models" / "sft" / "probes.json").stat().st_mtime_ns == probes_stamp
