"""Parsing, cleaning, splitting, retrieval budgets and pair mining on known inputs."""

import asyncio
import collections
from pathlib import Path

import numpy as np
import pytest

from persllm_jax.builder import cleaning, outputs, pairs, parsing
from persllm_jax.builder.build import Item, _check_kinds
from persllm_jax.builder.retrieval import fill_budget, nearest
from persllm_jax.llm.client import Completion
from persllm_jax.personas.reference_dialogues import read_reference_dialogues, reference_file
from tests.builder_fakes import EXAMPLES, FakeEmbedder, example_references, offline_builder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "[Analysis] A false premise.\n[Response] I never went to Paris.",
            ("A false premise.", "I never went to Paris."),
        ),
        ("**Analysis:** hmm\n**Response:** Quite so, Watson.", ("hmm", "Quite so, Watson.")),
        ("Analysis: the user asks.\nResponse: Elementary.", ("the user asks.", "Elementary.")),
        ("### Analysis\nx\n### Response\nWell then.", ("x", "Well then.")),
        ("[ANALYSIS]: a\n[RESPONSE]: b", ("a", "b")),
        (
            "[Analysis] I must craft a response here.\n[Response] Indeed.",
            ("I must craft a response here.", "Indeed."),
        ),
        ("[Analysis] a\n[Response] Yes.\n[Analysis] a again\n[Response] Yes again", ("a", "Yes.")),
    ],
)
def test_parse_response_variants(text, expected):
    assert parsing.parse_response(text) == (expected, None)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty response"),
        ("I would say my response is no.", "missing [Response]"),
        ("[Analysis] fine\n[Response]   ", "missing [Response]"),
        ("[Response] " + "the same words again " * 20, "degenerate response"),
        ("[Response] " + " ".join(f"word{i}" for i in range(300)), "over-long response"),
    ],
)
def test_parse_response_drops(text, reason):
    assert parsing.parse_response(text) == (None, reason)


def test_parse_question():
    assert parsing.parse_question('Input: "Did you ever visit Paris?"') == ("Did you ever visit Paris?", None)
    assert parsing.parse_question("**Question:** What is your method?\n\nNotes: ...") == (
        "What is your method?",
        None,
    )
    assert parsing.parse_question("  ") == (None, "empty question")
    assert parsing.parse_question("Input: Why?") == (None, "question too short")
    assert parsing.parse_question("Input: " + "why is it so " * 10)[1] == "degenerate question"
    material = "I am a complete gaucho, drinking my mate and smoking my cigar, and sleeping outdoors."
    copied = "Input: I am a complete gaucho, drinking my mate and smoking my cigar."
    assert parsing.parse_question(copied, material=material) == (None, "question copies the material")
    assert parsing.parse_question("Input: Do you still drink mate every day?", material=material)[1] is None


def test_kind_weights_validated():
    assert _check_kinds({"ordinary": 1, "induced": 1}) == {"ordinary": 1.0, "opinion": 0.0, "induced": 1.0}
    with pytest.raises(
        ValueError, match=r"unknown questions.kinds \['trivia'\]; valid kinds: ordinary, opinion"
    ):
        _check_kinds({"trivia": 1})


def test_fill_budget_keeps_seed_first_and_respects_budget():
    lengths = [50, 400, 100, 300, 80]
    order = [3, 1, 2, 0, 4]  # by similarity
    picked = fill_budget(order, lengths, budget_words=500, first=0)
    assert picked[0] == 0
    assert sum(lengths[i] for i in picked) <= 500
    assert picked == [0, 3, 2]  # 400 would overflow after 300; 80 still fits? 50+300+100=450, +80 > 500
    assert fill_budget(order, lengths, budget_words=10, first=1) == [1]  # the seed stays even alone


def test_nearest_orders_by_cosine():
    store = np.eye(3, dtype=np.float32)
    query = np.asarray([0.1, 0.9, 0.3], np.float32)
    assert list(nearest(query, store)) == [1, 2, 0]


def _item(persona, stage, seed, question, answer, other=None):
    item = Item(
        id=f"{persona}/{stage}/{seed}/ordinary",
        persona=persona,
        stage=stage,
        kind="ordinary",
        seed_id=f"{persona}/{stage}/{seed}",
        question=question,
    )
    item.answers[stage] = {"response": answer}
    if other:
        item.answers[other[0]] = {"response": other[1]}
    return item


def test_near_duplicates_dropped_across_stages_within_persona():
    items = [
        _item("a", "early", 1, "where do you live now", "x"),
        _item("a", "late", 2, "where do you live now", "y"),  # same question, other stage
        _item("b", "early", 1, "where do you live now", "z"),  # other persona: kept
        _item("a", "early", 3, "what is your favourite food", "w"),
    ]
    kept, dropped = cleaning.drop_near_duplicates(items, FakeEmbedder(), threshold=0.95)
    assert [i.id for i in dropped] == ["a/late/2/ordinary"]
    assert len(kept) == 3


def test_split_by_seed_paragraph_is_seeded_and_leak_free():
    items = [_item("a", "early", s, f"q {s}", "x") for s in range(20)]
    items += [_item("a", "early", s, f"q {s} again", "x") for s in range(20)]  # same seeds, 2nd item
    for item in items[20:]:
        item.id += "-2"
    cleaning.assign_splits(items, test_fraction=0.2, seed=7)
    by_seed = {}
    for item in items:
        by_seed.setdefault(item.seed_id, set()).add(item.split)
    assert by_seed.values(), "nothing to check"
    assert all(len(splits) == 1 for splits in by_seed.values())
    assert sum(1 for s in by_seed.values() if s == {"test"}) == 4
    first = [i.split for i in items]
    cleaning.assign_splits(items, test_fraction=0.2, seed=7)
    assert [i.split for i in items] == first
    cleaning.assign_splits(items, test_fraction=0.2, seed=8)
    assert [i.split for i in items] != first


class _P:
    def __init__(self, name):
        self.name, self.description, self.stage_prompt = name, f"{name} of the tests.", "token"


class _S:
    def __init__(self, token):
        self.token, self.when = token, ""


PERSONAS = {"a": _P("A"), "b": _P("B"), "c": _P("C")}
STAGES = {(p, s): _S(t) for p in PERSONAS for s, t in (("early", "<TIME-I>"), ("late", "<TIME-II>"))}


def test_cross_stage_pairs_both_directions():
    item = _item("a", "early", 1, "where do you live", "In London.", other=("late", "On the Downs."))
    item.split = "train"
    rows = pairs.cross_stage_pairs([item], PERSONAS, STAGES)
    assert [(r["stage"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("early", "In London.", "On the Downs."),
        ("late", "On the Downs.", "In London."),
    ]
    assert rows[0]["prompt"][0]["content"].startswith("<TIME-I> ")
    assert rows[1]["prompt"][0]["content"].startswith("<TIME-II> ")
    same = _item("a", "early", 2, "q", "Same.", other=("late", "same."))
    same.split = "train"
    assert pairs.cross_stage_pairs([same], PERSONAS, STAGES) == []


def test_cross_stage_pairs_one_direction():
    item = _item("a", "early", 1, "where do you live", "In London.", other=("late", "On the Downs."))
    item.split = "train"
    rows = pairs.cross_stage_pairs([item], PERSONAS, STAGES, mirrored=False)
    assert [(r["stage"], r["chosen"][0]["content"]) for r in rows] == [("early", "In London.")]


def test_reference_dialogues_split_by_question_group():
    personas, items = example_references()
    records = {
        r["id"]: r for p in personas for r in read_reference_dialogues(reference_file(EXAMPLES, p.id), p)
    }
    assert len(items) == len(records) == 414
    groups = {}
    for item in items:
        groups.setdefault(records[item.id]["group"] or item.id, set()).add(item.split)
    assert all(len(splits) == 1 for splits in groups.values()), "a question group straddles the splits"
    for persona in personas:
        keys = {records[i.id]["group"] or i.id for i in items if i.persona == persona.id}
        test = {
            records[i.id]["group"] or i.id for i in items if i.persona == persona.id and i.split == "test"
        }
        assert len(test) == int(0.2 * len(keys) + 0.5), persona.id
    assert [i.split for i in example_references()[1]] == [i.split for i in items], "the split is seeded"
    assert [i.split for i in example_references(seed=1)[1]] != [i.split for i in items]


def test_reference_dialogues_give_both_pair_kinds():
    personas, items = example_references()
    by_id = {p.id: p for p in personas}
    stages = {(p.id, s.id): s for p in personas for s in p.stages}
    answer = {(i.id, i.stage): i.answers[i.stage]["response"] for i in items}
    asked_twice = [i for i in items if len(i.answers) == 2]
    # 54 questions asked at both stages; the first dialogue of each carries both answers
    assert len(asked_twice) == 54
    cross_stage = pairs.cross_stage_pairs(items, by_id, stages)
    assert len(cross_stage) == 2 * 54
    own_answers = set(answer.values())
    for row in cross_stage:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen in own_answers and rejected in own_answers and chosen != rejected
        assert row["prompt"][0]["content"].startswith(stages[(row["persona"], row["stage"])].token + " ")
        # the chosen answer is the one written for the prompt's stage
        assert any(answer.get((i.id, row["stage"])) == chosen for i in items if i.persona == row["persona"])
    split_of = {i.answers[i.stage]["response"]: (i.persona, i.split) for i in items}
    cross_persona = pairs.cross_persona_pairs(items, FakeEmbedder(), by_id, stages, skip_top=5)
    assert len(cross_persona) == len(items)
    for row in cross_persona:
        rejected_persona, rejected_split = split_of[row["rejected"][0]["content"]]
        assert rejected_persona != row["persona"] and rejected_split == row["split"]


def test_cross_persona_skips_top_and_never_identical(monkeypatch):
    items = []
    for k in range(8):
        for persona in "abc":
            item = _item(persona, "early", k, f"topic{k} question about things", f"{persona} answer {k}")
            item.split = "train"
            items.append(item)
    # Which answer item 0 would get as its rejected one if identical answers were allowed: plant
    # a copy of item 0's answer exactly there.
    with monkeypatch.context() as m:
        m.setattr(pairs, "_same", lambda a, b: False)
        unchecked = pairs.cross_persona_pairs(items, FakeEmbedder(), PERSONAS, STAGES, skip_top=2)
    first = next(r for r in unchecked if r["chosen"][0]["content"] == "a answer 0")
    picked = next(i for i in items if i.answers["early"]["response"] == first["rejected"][0]["content"])
    picked.answers["early"]["response"] = "A  answer 0"  # the same answer, up to case and spacing
    rows = pairs.cross_persona_pairs(items, FakeEmbedder(), PERSONAS, STAGES, skip_top=2)
    row0 = next(r for r in rows if r["chosen"][0]["content"] == "a answer 0")
    assert row0["rejected"][0]["content"] not in ("A  answer 0", "a answer 0")
    assert len(rows) == len(items)
    for row in rows:
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        rejected_from = row["id"].rsplit("/", 1)[1]  # ids end with the persona the rejected answer is from
        assert rejected_from in PERSONAS and rejected_from != row["persona"]
        assert row["source"] == "cross_persona" and row["split"] == "train"


class _Example:
    """A pairs.jsonl row as the DPO loader's examples carry it."""

    def __init__(self, row):
        self.prompt_messages, self.chosen_messages = row["prompt"], row["chosen"]
        self.rejected_messages = row["rejected"]


def test_mirrored_cross_persona_pairs_ask_whose_prompt_an_answer_fits():
    """`pairs.cross_persona.mirrored`: each pair is followed by its mirror, the same question under
    the rejected answer's persona (at that answer's stage), the two answers swapped; the DPO loader
    takes the two as one unit (the same `mirror_key`, one each side)."""
    from persllm_jax.train.tasks.dpo import mirror_key

    def items_asking(question):
        items = []
        for k in range(6):
            for persona, stage in (("a", "early"), ("b", "late"), ("c", "early")):
                item = _item(persona, stage, k, question(k, persona), f"{persona} answer {k}")
                item.split = "train"
                items.append(item)
        return items

    # the same question asked of every persona: two that draw each other's answer make one unit
    shared = items_asking(lambda k, persona: f"topic{k} question about things")
    rows = pairs.cross_persona_pairs(shared, FakeEmbedder(), PERSONAS, STAGES, skip_top=1, mirrored=True)
    keys = collections.Counter(mirror_key(_Example(row)) for row in rows)
    assert len(rows) < 2 * len(shared) and all(n == 1 for n in keys.values())
    assert {(key, 1 - side) for key, side in keys} == set(keys), "every pair has its mirror"

    items = items_asking(lambda k, persona: f"topic{k} question about things, for {persona}")
    one_way = pairs.cross_persona_pairs(items, FakeEmbedder(), PERSONAS, STAGES, skip_top=1)
    rows = pairs.cross_persona_pairs(items, FakeEmbedder(), PERSONAS, STAGES, skip_top=1, mirrored=True)
    assert len(one_way) == len(items) and rows[0::2] == one_way
    for pair, mirror in zip(rows[0::2], rows[1::2]):
        other = pair["id"].rsplit("/", 1)[1]
        assert mirror["id"] == f"{pair['id']}-chosen" and mirror["persona"] == other != pair["persona"]
        rejected_item = next(
            i for i in items if i.answers[i.stage]["response"] == pair["rejected"][0]["content"]
        )
        assert mirror["stage"] == rejected_item.stage
        assert (
            mirror["prompt"][0]["content"]
            == outputs.system_message(other, mirror["stage"], PERSONAS, STAGES)["content"]
        )
        assert mirror["prompt"][1] == pair["prompt"][1]  # the same question
        assert (mirror["chosen"], mirror["rejected"]) == (pair["rejected"], pair["chosen"])
        assert mirror["split"] == pair["split"] and mirror["source"] == "cross_persona"
        (key, side), (mirror_key_, mirror_side) = mirror_key(_Example(pair)), mirror_key(_Example(mirror))
        assert key == mirror_key_ and {side, mirror_side} == {0, 1}


class _HeldAnnotator:
    """Stands in for the LLM client in `Builder.annotate`: records each request's tag as it is
    sent, and holds the first seed's input request until every other seed's answers have been
    sent (a build that waited for all inputs before any answer would never send them). The first
    seed's first input reply does not parse, so it is asked again with the next seed."""

    def __init__(self, items):
        self.held, self.sent, self.expected_answers = items[0].id, [], 2 * (len(items) - 1)
        self.others_answered = asyncio.Event()

    async def complete(self, messages, *, tag, seed, **params):
        self.sent.append((tag, seed))
        kind, item_id = tag.split(":")[:2]
        if sum(t.startswith("response:") for t, _ in self.sent) >= self.expected_answers:
            self.others_answered.set()
        if kind == "question" and item_id == self.held:
            await asyncio.wait_for(self.others_answered.wait(), timeout=10)
            text = "" if tag.endswith(":0") else "What did you make of the stranger's boots, sir?"
        elif kind == "question":
            text = "How do you tell a man's trade from his hands?"
        else:
            text = f"[Analysis] In character.\n[Response] Reply {tag}."
        return Completion(text, "stop", {"prompt_tokens": 1, "completion_tokens": 1}, cached=False)

    def stats(self):
        return {"prompt_tokens": 0, "completion_tokens": 0, "cache_hits": 0, "failures": 0}


def test_each_seed_is_annotated_without_waiting_for_the_others(tmp_path, monkeypatch):
    """Inputs and answers of different seeds interleave: the other seeds' answers go out while one
    seed's input is still pending (and retried); each item keeps its answers in stage order, its
    own stage first."""
    builder = offline_builder(tmp_path, monkeypatch, "personas=[holmes]", "llm.temperature=0.7")
    cfg = builder.cfg
    items = builder.seed_items()
    builder.client = annotator = _HeldAnnotator(items)
    asyncio.run(builder.annotate(items))
    tags = [tag for tag, _ in annotator.sent]
    held = items[0].id
    assert tags[-3:-2] == [f"question:{held}:1"] and annotator.sent[-3][1] == cfg.llm.seed + 1
    assert sorted(tags[-2:]) == [f"response:{held}:early:0", f"response:{held}:late:0"]
    assert len(tags) == 2 * len(items) + len(items) + 1
    for item in items:
        assert item.drop_reason is None and item.question
        assert list(item.answers) == [item.stage, *({"early", "late"} - {item.stage})]
        for stage, record in item.answers.items():
            assert record["response"] == f"Reply response:{item.id}:{stage}:0."
