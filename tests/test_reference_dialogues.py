"""The hand-written reference dialogues of the example personas: they parse, cite their materials,
meet the counts, ask some questions at both stages, and hold no probe question."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from persllm_jax.personas.materials import MaterialsError, load_personas
from persllm_jax.personas.reference_dialogues import read_reference_dialogues, reference_file
from tests.probe_questions import assert_no_probe_question_in

ROOT = Path(__file__).resolve().parents[1]
PERSONAS_DIR = ROOT / "examples" / "personas"
PERSONAS = {p.id: p for p in load_personas(PERSONAS_DIR)}


@pytest.mark.parametrize("persona_id", sorted(PERSONAS))
def test_reference_dialogues_of_each_example_persona(persona_id):
    persona = PERSONAS[persona_id]
    path = reference_file(PERSONAS_DIR, persona_id)
    assert path is not None, f"{persona_id} ships no reference.jsonl"
    records = read_reference_dialogues(path, persona)  # keys, system messages, seeds, groups
    counts = Counter((r["stage"], r["kind"]) for r in records)
    for stage in ("early", "late"):
        assert counts[(stage, "ordinary")] >= 40, (stage, counts)
        assert counts[(stage, "opinion")] >= 12, (stage, counts)
        assert counts[(stage, "induced")] >= 12, (stage, counts)
    groups = Counter(r["group"] for r in records if r["group"])
    assert len(groups) >= 15 and set(groups.values()) == {2}
    for stage in ("early", "late"):
        questions = [r["messages"][1]["content"] for r in records if r["stage"] == stage]
        assert len(set(questions)) == len(questions), f"{stage}: a question asked twice"
    assert_no_probe_question_in(records)
    # Written from the materials, not cut out of them: no run of 8 words is shared.
    words = re.findall(
        r"[a-z']+", " ".join(p.read_text().lower() for p in (PERSONAS_DIR / persona_id).glob("*/*.txt"))
    )
    grams = {tuple(words[i : i + 8]) for i in range(len(words) - 7)}
    for record in records:
        mine = re.findall(r"[a-z']+", record["messages"][2]["content"].lower())
        copied = [g for g in zip(*(mine[i:] for i in range(8))) if g in grams]
        assert not copied, f"{record['id']}: {' '.join(copied[0])}"


def _one(**changes):
    persona = PERSONAS["holmes"]
    record = {
        "id": "holmes/early/ref/001",
        "persona": "holmes",
        "stage": "early",
        "kind": "ordinary",
        "messages": [
            {"role": "system", "content": f"<TIME-I> You are {persona.name}. {persona.description}"},
            {"role": "user", "content": "Where do you lodge?"},
            {"role": "assistant", "content": "In Baker Street, with a doctor lately back from the war."},
        ],
        "analysis": "The visitor asks where he lives.",
        "seed_id": "holmes/early/knowledge/002",
        "group": None,
        "origin": "reference",
    }
    return {**record, **changes}


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"kind": "gossip"}, "unknown kind 'gossip'"),
        ({"stage": "middle"}, "has no stage 'middle'"),
        ({"seed_id": "holmes/late/knowledge/002"}, "is not a materials paragraph of stage 'early'"),
        ({"seed_id": "holmes/early/knowledge/999"}, "is not a materials paragraph of stage 'early'"),
        ({"origin": "annotated"}, 'origin must be "reference"'),
        ({"group": "g1"}, "group 'g1' must ask its question once at each of two or more stages"),
    ],
)
def test_malformed_reference_dialogues_are_refused_with_file_and_line(tmp_path, changes, reason):
    path = tmp_path / "reference.jsonl"
    path.write_text(json.dumps(_one(id="holmes/early/ref/000")) + "\n" + json.dumps(_one(**changes)) + "\n")
    with pytest.raises(MaterialsError) as err:
        read_reference_dialogues(path, PERSONAS["holmes"])
    assert str(err.value).startswith(f"{path}:2: ") and reason in str(err.value)
