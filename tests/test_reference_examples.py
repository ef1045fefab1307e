"""The reference dialogues as the annotator's worked examples (`reference.few_shot`)."""

import asyncio
import json

import numpy as np
import pytest

from persllm_jax.builder import parsing, prompts
from persllm_jax.builder.build import Item
from persllm_jax.builder.references import ReferenceExamples, reference_items
from persllm_jax.llm.client import Completion
from persllm_jax.personas.materials import load_personas
from tests.builder_fakes import EXAMPLES, FakeEmbedder, example_references, offline_builder


def test_few_shot_examples_are_the_nearest_train_split_answers_of_that_persona_and_stage():
    personas, items = example_references()
    embedder = FakeEmbedder()
    few_shot = ReferenceExamples(items, embedder, 3, too_close=0.95)
    train = {(i.persona, s, i.question): a for i in items if i.split == "train" for s, a in i.answers.items()}
    test_answers = {a["response"] for i in items if i.split == "test" for a in i.answers.values()}
    assert test_answers and train
    for item in items[::7]:
        for stage in item.answers:
            shown = few_shot(item.persona, stage, item.question)
            assert len(shown) == 3
            for question, analysis, response in shown:
                # a train-split answer of this persona at this stage, never the question itself
                assert train[(item.persona, stage, question)] == {"analysis": analysis, "response": response}
                assert response not in test_answers and question != item.question
            # the nearest of that persona's train-split questions at that stage below the
            # near-duplicate threshold (the question itself among those at or above it), nearest last
            candidates = [q for (p, s, q) in train if p == item.persona and s == stage]
            similarity = embedder.encode(candidates) @ embedder.encode([item.question])[0]
            assert (item.persona, stage, item.question) not in train or similarity.max() >= 0.95
            expected = sorted(similarity[similarity < 0.95], reverse=True)[:3][::-1]
            got = [float(embedder.encode([q])[0] @ embedder.encode([item.question])[0]) for q, _, _ in shown]
            np.testing.assert_allclose(got, expected, atol=1e-6)
    # in the answer request: the generic example, then these as earlier turns, then the question
    shown = few_shot(items[0].persona, items[0].stage, items[0].question)
    messages = prompts.response_messages(
        name="N", description="D", when="W", objective=[], subjective=[], question="Q?", examples=shown
    )
    assert messages[1:3] == prompts.FEW_SHOT and messages[-1] == {"role": "user", "content": "Q?"}
    assert [m["content"] for m in messages[3:-1:2]] == [q for q, _, _ in shown]
    assert [m["content"] for m in messages[4:-1:2]] == [
        f"[Analysis] {a}\n[Response] {r}" for _, a, r in shown
    ]
    assert parsing.parse_response(messages[4]["content"], 250, True)[0] == shown[0][1:]
    assert len(shown) == 3
    assert ReferenceExamples(items, embedder, 3, too_close=-1.0)(items[0].persona, items[0].stage, "Q?") == []


class _RecordingAnnotator:
    """Stands in for the LLM client: records every request's messages; answers every input with
    a question and every answer request with a parsable reply."""

    def __init__(self):
        self.requests = []

    async def complete(self, messages, *, tag, seed, **params):
        self.requests.append(messages)
        text = (
            "What do you make of a stranger's boots?"
            if tag.startswith("question:")
            else (f"[Analysis] In character.\n[Response] Reply {tag}.")
        )
        return Completion(text, "stop", {"prompt_tokens": 1, "completion_tokens": 1}, cached=False)

    def stats(self):
        return {"prompt_tokens": 0, "completion_tokens": 0, "cache_hits": 0, "failures": 0}

    async def aclose(self):
        pass


@pytest.mark.parametrize("few_shot, include", [(2, True), (2, False), (0, True)])
def test_answer_requests_show_train_split_reference_answers_of_their_persona_and_stage(
    tmp_path, monkeypatch, few_shot, include
):
    """A whole build with `reference.few_shot`: every answer request holds the generic example,
    then `few_shot` reference dialogues of the persona at the stage it answers in, from the train
    split, then the seed's question; no held-out reference answer is shown. The examples do not
    need the references in the build (`reference.include`)."""
    builder = offline_builder(
        tmp_path,
        monkeypatch,
        "personas=[holmes,darwin]",
        f"reference.few_shot={few_shot}",
        f"reference.include={str(include).lower()}",
        "general_data.path=",
    )
    builder.client = annotator = _RecordingAnnotator()
    asyncio.run(builder.run_async())
    rows = [json.loads(line) for line in (tmp_path / "dialogues.jsonl").read_text().splitlines()]
    written = [r for r in rows if "/ref/" in r["id"]]
    personas = {p.id: p for p in load_personas(EXAMPLES)}
    references = {
        i.answers[i.stage]["response"]: i
        for i in reference_items([personas["darwin"], personas["holmes"]], EXAMPLES, 0.2, 0, Item)
    }
    assert len(written) == (len(references) if include else 0)  # the two personas' reference dialogues
    assert {r["split"] for r in written} <= {"train", "test"}
    assert all(references[r["messages"][2]["content"]].split == r["split"] for r in written)
    held_out = {answer for answer, i in references.items() if i.split == "test"}
    assert held_out
    answer_requests = [m for m in annotator.requests if m[0]["content"].startswith("You are ")]
    assert len(answer_requests) == 2 * 2 * 2 * 2  # 2 personas x 2 stages x 2 seeds, each at both stages
    for messages in answer_requests:
        assert messages[1:3] == prompts.FEW_SHOT and len(messages) == 4 + 2 * few_shot
        assert (
            messages[-1]["role"] == "user"
            and messages[-1]["content"] == "What do you make of a stranger's boots?"
        )
        assert not any(answer in m["content"] for m in messages for answer in held_out)
        for question, example in zip(messages[3:-1:2], messages[4:-1:2]):
            analysis, response = example["content"].removeprefix("[Analysis] ").split("\n[Response] ")
            source = references[response]
            assert source.split == "train" and source.question == question["content"]
            assert source.answers[source.stage]["analysis"] == analysis
            # of the request's persona, at the stage it answers in (its `when` line)
            persona = personas[source.persona]
            assert messages[0]["content"].startswith(f"You are {persona.name}. {persona.description}")
            assert f"Now it's {persona.stage(source.stage).when}." in messages[0]["content"]


def test_negative_few_shot_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="reference.few_shot must be >= 0"):
        offline_builder(tmp_path, monkeypatch, "reference.few_shot=-1")
