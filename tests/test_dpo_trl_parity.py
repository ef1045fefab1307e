"""Our DPO numbers against TRL's DPOTrainer on the same tiny models and pairs (tests/assets/dpo_golden).

The golden file comes from tests/assets/make_dpo_golden.py (TRL 1.16). TRL's conversational DPO
tokenization, which our trainer must reproduce:

* prompt_ids = apply_chat_template(prompt, add_generation_prompt=True), so the prompt ends with
  `<|im_start|>assistant\\n`;
* prompt + chosen = apply_chat_template(prompt + chosen) (no generation prompt); the completion is
  everything after the common prefix with prompt_ids: the answer's tokens, then the template's own
  `<|im_end|>` and its trailing `\\n`. Both are completion tokens (scored and counted in IPO's length);
* TRL appends no extra EOS for conversational data (it does only for plain-text prompts), and adds no
  BOS unless the template renders one; the sequence fed to the model is prompt_ids + completion ids,
  right-padded, with the completion mask 1 exactly on the completion ids;
* log-probs: token t+1 scored from position t, summed over the completion mask (`logps/*` are sums).
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax import load_pretrained
from persllm_jax.losses import dpo_loss
from persllm_jax.train.batches import SFTBatch
from persllm_jax.train.tasks.dpo_loss import (
    DPO_METRICS,
    chosen_nll,
    metric_sums,
    pair_logps,
    preference_loss,
)

GOLDEN_DIR = Path(__file__).parent / "assets" / "dpo_golden"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN_DIR / "golden.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(GOLDEN_DIR / "tokenizer")


@pytest.fixture(scope="module")
def pairs():
    return [json.loads(line) for line in (GOLDEN_DIR / "pairs.jsonl").read_text().splitlines()]


def _batch(pairs_ids, pad_id):
    """[chosen rows; rejected rows] of prompt + completion, right-padded, as TRL's collator builds them."""
    rows = [(p["prompt_ids"], p[key]) for key in ("chosen_ids", "rejected_ids") for p in pairs_ids]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    ids_BT = np.full((len(rows), width), pad_id, np.int32)
    attention_BT = np.zeros((len(rows), width), np.int32)
    completion_BT = np.zeros((len(rows), width), np.int32)
    for row, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        ids_BT[row, :n] = prompt + completion
        attention_BT[row, :n] = 1
        completion_BT[row, len(prompt) : n] = 1
    return ids_BT, attention_BT, completion_BT


def _side(ids_BT, attention_BT, completion_BT) -> SFTBatch:
    """TRL's rows in our batch layout: targets are the next tokens, loss_mask marks completion targets."""
    pad = lambda x: np.concatenate([x[:, 1:], np.zeros_like(x[:, :1])], axis=1)  # noqa: E731
    rows = ids_BT.shape[0]
    return SFTBatch(
        input_ids=jnp.asarray(ids_BT),
        targets=jnp.asarray(pad(ids_BT)),
        loss_mask=jnp.asarray(pad(completion_BT).astype(bool)),
        attention_mask=jnp.asarray(attention_BT.astype(bool)),
        persona_ids=jnp.full((rows,), -1, jnp.int32),
        stage_ids=jnp.full((rows,), -1, jnp.int32),
        length=jnp.asarray(attention_BT.sum(axis=1).astype(np.int32)),
    )


@pytest.fixture(scope="module")
def sides(golden, tokenizer) -> tuple[SFTBatch, SFTBatch]:
    """TRL's chosen rows and rejected rows of the golden pairs, in our batch layout."""
    ids_BT, attention_BT, completion_BT = _batch(golden["pairs"], tokenizer.pad_token_id)
    half = ids_BT.shape[0] // 2
    return (
        _side(ids_BT[:half], attention_BT[:half], completion_BT[:half]),
        _side(ids_BT[half:], attention_BT[half:], completion_BT[half:]),
    )


@pytest.fixture(scope="module")
def our_logps(sides):
    """{policy, reference} -> (chosen, rejected, chosen lengths, rejected lengths), computed by the
    trainer's own `pair_logps` (chunked head, one forward for both answers)."""
    chosen, rejected = sides
    out = {}
    for name in ("policy", "reference"):
        model, model_tokenizer = load_pretrained(GOLDEN_DIR / name)
        assert model_tokenizer is None  # the model dirs carry no tokenizer
        out[name] = tuple(
            np.asarray(x, np.float64) for x in pair_logps(model, chosen, rejected, chunk_size=8)
        )
    return out


def _our_label_smoothing(run):
    # TRL 1.16's sigmoid loss ignores label_smoothing (only robust/exo/aot read it); our sigmoid applies
    # the cDPO form, so TRL's smoothed-sigmoid run is our plain sigmoid.
    return 0.0 if run["loss_type"] == "sigmoid" else run["label_smoothing"]


def _our_metrics(run, our_logps):
    """The trainer's per-pair losses and TRL-named metric sums, divided by the number of pairs."""
    policy_c, policy_r, len_c, len_r = map(jnp.asarray, our_logps["policy"])
    ref_c, ref_r, _, _ = map(jnp.asarray, our_logps["reference"])
    loss_B, chosen_B, rejected_B = preference_loss(
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        len_c,
        len_r,
        beta=run["beta"],
        loss_type=run["loss_type"].removesuffix("+sft"),  # the SFT term is dpo.sft_weight
        label_smoothing=_our_label_smoothing(run),
    )
    pairs = loss_B.shape[0]
    sums = metric_sums(chosen_B, rejected_B, policy_c, policy_r)
    loss = float(loss_B.sum()) / pairs + run["sft_weight"] * float(chosen_nll(policy_c, len_c))
    return {"loss": loss, **{k: float(v) / pairs for k, v in sums.items()}}


def _run_id(run):
    return f"{run['loss_type']}-ls{run['label_smoothing']}"


def test_golden_has_the_expected_runs(golden):
    assert golden["versions"]["trl"].startswith("1.")
    assert [_run_id(r) for r in golden["runs"]] == [
        "sigmoid-ls0.0",
        "sigmoid-ls0.1",
        "ipo-ls0.0",
        "hinge-ls0.0",
        "robust-ls0.1",
        "sigmoid+sft-ls0.0",
    ]
    # the answers' lengths differ, so a per-answer mean of the SFT term would not match a token mean
    assert len({len(p["chosen_ids"]) for p in golden["pairs"]}) > 1


@pytest.mark.parametrize("index", range(6))
def test_metrics_match_trl(index, golden, our_logps):
    run = golden["runs"][index]
    ours = _our_metrics(run, our_logps)
    for name in ("loss", *DPO_METRICS):
        trl_value = run["metrics"][name]
        assert abs(ours[name] - trl_value) <= TOLERANCE, (_run_id(run), name, ours[name], trl_value)
    assert abs(run["loss_unlogged"] - run["metrics"]["loss"]) <= 1e-7  # TRL logs the loss unrounded


def test_per_pair_logps_match_torch(golden, our_logps):
    """Per sequence (TRL only logs means): our log-probs against a plain transformers forward."""
    policy_c, policy_r, _, _ = our_logps["policy"]
    ref_c, ref_r, _, _ = our_logps["reference"]
    torch_pairs = golden["torch_per_pair"]
    for name, ours in (
        ("policy_chosen_logps", policy_c),
        ("policy_rejected_logps", policy_r),
        ("reference_chosen_logps", ref_c),
        ("reference_rejected_logps", ref_r),
    ):
        want = np.asarray([p[name] for p in torch_pairs])
        np.testing.assert_allclose(ours, want, rtol=0, atol=TOLERANCE, err_msg=name)
    # Rewards must not be trivially zero or the metric checks above would prove little, and no pair may be
    # so close to a tie that rewards/accuracies hangs on rounding.
    assert np.abs(policy_c - ref_c).max() > 1.0
    assert np.abs((policy_c - ref_c) - (policy_r - ref_r)).min() > 0.1


def test_trl_sigmoid_ignores_label_smoothing(golden, our_logps):
    """TRL 1.16: sigmoid with label_smoothing=0.1 logs the same loss as without; our cDPO form differs."""
    by_id = {_run_id(r): r for r in golden["runs"]}
    plain, smoothed = by_id["sigmoid-ls0.0"], by_id["sigmoid-ls0.1"]
    assert smoothed["metrics"]["loss"] == plain["metrics"]["loss"]
    policy_c, policy_r, _, _ = our_logps["policy"]
    ref_c, ref_r, _, _ = our_logps["reference"]
    cdpo, _, _ = dpo_loss(*map(jnp.asarray, (policy_c, policy_r, ref_c, ref_r)), label_smoothing=0.1)
    assert abs(float(np.mean(np.asarray(cdpo))) - plain["metrics"]["loss"]) > 1e-3


def test_chat_template_prefix_diff_reproduces_trl_ids(golden, tokenizer, pairs):
    """apply_chat_template(prompt, generation prompt) is a prefix of apply_chat_template(prompt + answer);
    the remainder is TRL's completion, ending in <|im_end|> and "\\n", with no extra EOS."""
    im_end, newline = tokenizer.convert_tokens_to_ids(["<|im_end|>", "\n"])
    assert tokenizer.eos_token_id == im_end
    assert len(pairs) == len(golden["pairs"])

    def render(messages, **kwargs):
        return list(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
        )

    for pair, trl_ids in zip(pairs, golden["pairs"]):
        prompt_ids = render(pair["prompt"], add_generation_prompt=True)
        assert prompt_ids == trl_ids["prompt_ids"]
        assert tokenizer.convert_ids_to_tokens(prompt_ids[-3:]) == ["<|im_start|>", "assistant", "\n"]
        for key in ("chosen", "rejected"):
            full_ids = render(pair["prompt"] + pair[key])
            assert full_ids[: len(prompt_ids)] == prompt_ids
            completion_ids = full_ids[len(prompt_ids) :]
            assert completion_ids == trl_ids[f"{key}_ids"]
            assert completion_ids[-2:] == [im_end, newline] and im_end not in completion_ids[:-2]
            answer_ids = tokenizer(pair[key][0]["content"], add_special_tokens=False)["input_ids"]
            assert completion_ids == answer_ids + [im_end, newline]


def test_trl_batch_is_prompt_plus_completion(golden, tokenizer):
    """The padded batch TRL fed its models holds exactly our rows (in the sampler's order)."""
    ids_BT, attention_BT, completion_BT = _batch(golden["pairs"], tokenizer.pad_token_id)
    trl = golden["trl_batch"]
    ours = {
        (tuple(i), tuple(a), tuple(c))
        for i, a, c in zip(ids_BT.tolist(), attention_BT.tolist(), completion_BT.tolist())
    }
    theirs = {
        (tuple(i), tuple(a), tuple(c))
        for i, a, c in zip(trl["input_ids"], trl["attention_mask"], trl["completion_mask"])
    }
    assert ours == theirs
    assert np.asarray(trl["input_ids"]).shape == ids_BT.shape


def test_trainer_loss_with_sft_weight_matches_trl(golden, sides, our_logps):
    """The train step's own loss function (`dpo_batch_loss`, reference log-probs carried by the batch
    as a cached reference gives them) with dpo.sft_weight, against TRL's loss_type=[sigmoid, sft]."""
    from persllm_jax.train.batches import DPOBatch
    from persllm_jax.train.config import DPOSection
    from persllm_jax.train.tasks.dpo_loss import dpo_batch_loss

    run = next(r for r in golden["runs"] if _run_id(r) == "sigmoid+sft-ls0.0")
    ref_c, ref_r, _, _ = our_logps["reference"]
    batch = DPOBatch(
        chosen=sides[0],
        rejected=sides[1],
        ref_chosen_logps=jnp.asarray(ref_c, jnp.float32),
        ref_rejected_logps=jnp.asarray(ref_r, jnp.float32),
    )
    model, _ = load_pretrained(GOLDEN_DIR / "policy")
    weight = run["sft_weight"]
    losses, nll = {}, {}
    for w in (0.0, weight):
        loss_sum, pairs, sums = dpo_batch_loss(
            model, batch, None, dpo=DPOSection(beta=run["beta"], sft_weight=w), chunk_size=8
        )
        losses[w] = float(loss_sum) / float(pairs)
        nll[w] = float(sums.get("nll_loss", np.nan)) / float(pairs)
    assert abs(losses[weight] - run["metrics"]["loss"]) <= TOLERANCE
    assert abs(losses[0.0] - golden["runs"][0]["metrics"]["loss"]) <= TOLERANCE
    # the term is large enough here that leaving it out would fail the first check
    assert losses[weight] - losses[0.0] > 1.0
    # the logged nll_loss is the term before its weight
    assert abs(nll[weight] * weight - (losses[weight] - losses[0.0])) <= TOLERANCE
