"""Distinction BLEU: known answers, a hand-computed BLEU, and agreement with sacrebleu itself."""

import math

import pytest
import sacrebleu

from persllm_jax.evaluation.distinction import RECORD_KEYS, bleu, distinction_bleu

STAGES = {"holmes": ("early", "late"), "darwin": ("early", "late"), "bennet": ("early", "late")}
OWN_STAGE = {"holmes": "early", "darwin": "late", "bennet": "early"}  # the stage each persona answers "as Q"


def record(item_id, persona, stage, as_persona, as_stage, sample, answer, model="sft", kind="ordinary"):
    return {
        "model": model,
        "item_id": item_id,
        "persona": persona,
        "stage": stage,
        "kind": kind,
        "as_persona": as_persona,
        "as_stage": as_stage,
        "sample": sample,
        "question": f"question {item_id}",
        "reference": f"reference {item_id}",
        "answer": answer,
    }


def runner_records(items, answer_of, model="sft"):
    """Every variant the runner produces for `items` [(item_id, persona, stage)], with answer_of(...)."""
    out = []
    for item_id, persona, stage in items:
        for sample in (0, 1):
            out.append(
                record(
                    item_id,
                    persona,
                    stage,
                    persona,
                    stage,
                    sample,
                    answer_of(item_id, persona, stage, sample),
                    model,
                )
            )
        for other in STAGES[persona]:
            if other != stage:
                out.append(
                    record(
                        item_id,
                        persona,
                        stage,
                        persona,
                        other,
                        0,
                        answer_of(item_id, persona, other, 0),
                        model,
                    )
                )
        for q in STAGES:
            if q != persona:
                out.append(
                    record(
                        item_id,
                        persona,
                        stage,
                        q,
                        OWN_STAGE[q],
                        0,
                        answer_of(item_id, q, OWN_STAGE[q], 0),
                        model,
                    )
                )
    return out


ITEMS = [
    ("h1", "holmes", "early"),
    ("h2", "holmes", "late"),
    ("d1", "darwin", "late"),
    ("b1", "bennet", "early"),
]


def test_hand_computed_bleu():
    # hyp/ref share 5/6 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams; equal lengths, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(53.728, abs=1e-3)


def test_identical_texts_score_100():
    text = "I have rooms in Montague Street and I study chemistry at Barts"
    result = distinction_bleu(runner_records(ITEMS, lambda *_: text))["sft"]
    for persona, metrics in result["personas"].items():
        assert metrics["intra"] == pytest.approx(100.0), persona
        assert metrics["stage"] == pytest.approx(100.0), persona
        assert metrics["inter"] == pytest.approx(100.0), persona
    assert result["average"]["intra"] == pytest.approx(100.0)
    assert result["personas"]["holmes"]["n_items"] == 2


def test_disjoint_vocabularies_score_0():
    vocab = {
        ("holmes", "early"): "violin chemistry deduction baker street lodgings",
        ("holmes", "late"): "bees sussex downs retirement honey hives",
        ("darwin", "early"): "beagle voyage finches galapagos barnacles fossils",
        ("darwin", "late"): "origin species selection orchids worms down",
        ("bennet", "early"): "longbourn netherfield ball sisters walking mud",
        ("bennet", "late"): "pemberley derbyshire garden library lake park",
    }
    result = distinction_bleu(runner_records(ITEMS, lambda _i, p, s, _n: vocab[(p, s)]))["sft"]
    for persona, metrics in result["personas"].items():
        assert metrics["intra"] == pytest.approx(100.0), persona  # both samples use the same words
        assert metrics["stage"] == 0.0, persona
        assert metrics["inter"] == 0.0, persona
    assert result["average"] == {
        "intra": pytest.approx(100.0),
        "stage": 0.0,
        "inter": 0.0,
        "n_intra": 3,
        "n_stage": 3,
        "n_inter": 3,
        "n_personas": 3,
        "n_items": 4,
    }


def test_matches_sacrebleu_corpus_bleu_directly():
    def answer(item_id, persona, stage, sample):
        base = f"{persona} speaks in the {stage} years about the {item_id} question"
        return base + (" once more with feeling" if sample else " and the matter of the case")

    records = runner_records(ITEMS, answer)
    result = distinction_bleu(records)["sft"]["personas"]

    def own(item_id, sample):
        return next(
            r["answer"]
            for r in records
            if r["item_id"] == item_id
            and r["sample"] == sample
            and (r["as_persona"], r["as_stage"]) == (r["persona"], r["stage"])
        )

    def as_(item_id, persona, stage):
        return next(
            r["answer"]
            for r in records
            if r["item_id"] == item_id and (r["as_persona"], r["as_stage"]) == (persona, stage)
        )

    hyps = [own("h1", 0), own("h2", 0)]
    assert result["holmes"]["intra"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [[own("h1", 1), own("h2", 1)]]).score
    )
    stage_refs = [as_("h1", "holmes", "late"), as_("h2", "holmes", "early")]
    assert result["holmes"]["stage"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [stage_refs]).score)
    inter = [
        sacrebleu.corpus_bleu(hyps, [[as_("h1", q, OWN_STAGE[q]), as_("h2", q, OWN_STAGE[q])]]).score
        for q in ("darwin", "bennet")
    ]
    assert result["holmes"]["inter"] == pytest.approx(sum(inter) / 2)
    values = [result["holmes"][m] for m in ("intra", "stage", "inter")]
    assert all(0.0 < v < 100.0 for v in values) and len(set(values)) == 3  # a non-trivial case


def test_several_other_stages_are_averaged():
    # Three stages: each item is compared with both other stages; the two rounds' corpus BLEUs are averaged.
    texts = {"early": "a b c d e f g h", "middle": "a b c d x y z w", "late": "a b q r s t u v"}
    records = []
    for item_id, stage in (("i1", "early"), ("i2", "late")):
        for as_stage, text in texts.items():
            records.append(record(item_id, "p", stage, "p", as_stage, 0, text))
    result = distinction_bleu(records)["sft"]["personas"]["p"]
    round0 = bleu([texts["early"], texts["late"]], [texts["middle"], texts["early"]])
    round1 = bleu([texts["early"], texts["late"]], [texts["late"], texts["middle"]])
    assert result["stage"] == pytest.approx((round0 + round1) / 2)
    assert result["intra"] is None and result["inter"] is None


def test_missing_variants_are_none_and_skipped_in_averages():
    full = runner_records(ITEMS[:2], lambda i, p, s, n: f"{p} {s} answer {i} sample {n} words here")
    # darwin: only the own-identity sample 0 -> nothing to compare with
    only_own = [record("d1", "darwin", "late", "darwin", "late", 0, "just one answer here today")]
    result = distinction_bleu(full + only_own)["sft"]
    assert result["personas"]["darwin"] == {"intra": None, "stage": None, "inter": None, "n_items": 1}
    holmes = result["personas"]["holmes"]
    assert result["average"]["intra"] == pytest.approx(holmes["intra"])
    assert result["average"]["n_intra"] == 1 and result["average"]["n_personas"] == 2
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in result["average"].values())


def test_models_are_kept_apart():
    records = runner_records(ITEMS, lambda *_: "same words for every single answer", model="base")
    records += runner_records(ITEMS, lambda i, p, s, n: f"{p} {s} {i} {n} distinct text", model="dpo")
    result = distinction_bleu(records)
    assert set(result) == {"base", "dpo"}
    assert result["base"]["average"]["inter"] == pytest.approx(100.0)
    assert result["dpo"]["average"]["inter"] < 100.0


def test_bad_records_are_named():
    good = record("h1", "holmes", "early", "holmes", "early", 0, "x")
    broken = {k: v for k, v in good.items() if k != "as_stage"}
    with pytest.raises(ValueError, match=r"record 1 lacks \['as_stage'\]"):
        distinction_bleu([good, broken])
    with pytest.raises(ValueError, match="records 0 and 1 are both"):
        distinction_bleu([good, dict(good)])
    with pytest.raises(ValueError, match="belongs to holmes/early"):
        distinction_bleu([good, record("h1", "darwin", "early", "darwin", "early", 1, "x")])
    assert set(RECORD_KEYS) == set(good)
