"""Persona materials: the shipped examples load, and malformed folders fail naming the file and line."""

import re
import shutil
from pathlib import Path

import pytest

from persllm_jax.personas.materials import (
    KINDS,
    MaterialsError,
    Paragraph,
    load_personas,
    objective,
    split_paragraphs,
    stage_tokens,
    subjective,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "personas"
PARA = "word " * 45  # one valid paragraph's worth of text

# --------------------------------------------------------------------------------------------
# the shipped examples


@pytest.fixture(scope="module")
def examples():
    return load_personas(EXAMPLES)


def test_examples_load(examples):
    assert [p.id for p in examples] == ["darwin", "elizabeth", "holmes"]
    names = {p.id: p.name for p in examples}
    assert names == {"darwin": "Charles Darwin", "elizabeth": "Elizabeth Bennet", "holmes": "Sherlock Holmes"}
    for persona in examples:
        assert persona.language == "en"
        assert len(persona.description.split()) >= 10
        assert [s.id for s in persona.stages] == ["early", "late"]
        assert [s.token for s in persona.stages] == ["<TIME-I>", "<TIME-II>"]
        assert persona.stages, "nothing to check"
        assert all(s.when for s in persona.stages)
    assert stage_tokens(examples) == ["<TIME-I>", "<TIME-II>"]


def test_examples_paragraph_counts_and_lengths(examples):
    for persona in examples:
        for stage in persona.stages:
            for kind in KINDS:
                paragraphs = stage.of_kind(kind)
                where = f"{persona.id}/{stage.id}/{kind}.txt"
                assert 12 <= len(paragraphs) <= 20, (where, len(paragraphs))
                for p in paragraphs:
                    assert 40 <= p.n_words <= 120, (p.id, p.n_words)
                    assert "\n" not in p.text and p.text == p.text.strip()
                    assert p.category == ("subjective" if kind == "speech" else "objective")
                    assert Path(p.source).name == f"{kind}.txt" and p.line >= 1


def test_examples_ids_unique_and_stable(examples):
    paragraphs = [p for persona in examples for p in persona.paragraphs]
    ids = [p.id for p in paragraphs]
    assert len(ids) == len(set(ids))
    assert ids, "nothing to check"
    assert all(re.fullmatch(r"[a-z]+/(early|late)/(knowledge|experiences|speech)/\d{3}", i) for i in ids)
    holmes = next(p for p in examples if p.id == "holmes")
    first = holmes.stage("early").of_kind("knowledge")[0]
    assert first.id == "holmes/early/knowledge/001" and first.line == 1
    assert first.persona == "holmes" and first.stage == "early"
    # the line recorded is where the paragraph starts in its file
    for p in paragraphs[:: max(1, len(paragraphs) // 25)]:
        lines = Path(p.source).read_text(encoding="utf-8").splitlines()
        assert p.text.startswith(lines[p.line - 1].strip())
        assert p.line == 1 or not lines[p.line - 2].strip()


def test_examples_stages_differ(examples):
    by_id = {p.id: p for p in examples}

    def text(persona, stage, kind=None):
        st = by_id[persona].stage(stage)
        return " ".join(p.text for p in (st.of_kind(kind) if kind else st.paragraphs))

    # late knowledge the early persona does not have, and vice versa
    assert "Moriarty" in text("holmes", "late") and "Moriarty" not in text("holmes", "early")
    assert "bees" in text("holmes", "late") and "bees" not in text("holmes", "early")
    assert "Origin" in text("darwin", "late") and "Origin" not in text("darwin", "early")
    assert "natural selection" not in text("darwin", "early")
    assert "Pemberley" in text("elizabeth", "late", "experiences")
    # Elizabeth's opinion of Darcy flips
    early, late = text("elizabeth", "early"), text("elizabeth", "late")
    assert "proudest" in early and "last man in the world" in early
    assert "Till this moment I never knew myself" in late and "Mrs Darcy" in late
    # no paragraph is shared between stages or personas
    texts = [p.text for persona in examples for p in persona.paragraphs]
    assert len(texts) == len(set(texts))


def test_objective_subjective_stores(examples):
    paragraphs = [p for persona in examples for p in persona.paragraphs]
    obj, subj = objective(paragraphs), subjective(paragraphs)
    assert obj and subj and len(obj) + len(subj) == len(paragraphs)
    assert {p.kind for p in obj} == {"knowledge", "experiences"}
    assert {p.kind for p in subj} == {"speech"}
    assert not {p.id for p in obj} & {p.id for p in subj}
    assert isinstance(obj[0], Paragraph)


def test_dataclasses_are_frozen(examples):
    persona = examples[0]
    with pytest.raises(AttributeError):
        persona.name = "x"
    with pytest.raises(AttributeError):
        persona.stages[0].paragraphs[0].text = "x"
    with pytest.raises(KeyError, match="no stage 'middle'"):
        persona.stage("middle")


# --------------------------------------------------------------------------------------------
# building malformed folders


YAML = """\
name: Test Person
description: A persona for tests.
language: en
stages:
  - id: early
    token: "<TIME-I>"
    when: "youth"
  - id: late
    token: "<TIME-II>"
    when: "old age"
"""


def make_persona(root: Path, pid: str = "tester", yaml_text: str = YAML, stages=("early", "late")) -> Path:
    folder = root / pid
    folder.mkdir(parents=True)
    (folder / "persona.yaml").write_text(yaml_text, encoding="utf-8")
    for stage in stages:
        (folder / stage).mkdir()
        for kind in KINDS:
            (folder / stage / f"{kind}.txt").write_text(
                f"{stage} {kind} one {PARA}\n\n{stage} {kind} two {PARA}\n"
            )
    return folder


def expect_error(root: Path, file: Path, line: int | None = None, match: str = "") -> MaterialsError:
    with pytest.raises(MaterialsError) as info:
        load_personas(root)
    err = info.value
    message = str(err)
    assert str(file) in message, message
    assert err.path == str(file)
    if line is not None:
        assert f"{file}:{line}:" in message, message
        assert err.line == line
    if match:
        assert re.search(match, message), message
    return err


def test_minimal_persona_loads(tmp_path):
    make_persona(tmp_path)
    (persona,) = load_personas(tmp_path)
    assert persona.id == "tester" and persona.name == "Test Person"
    assert [s.when for s in persona.stages] == ["youth", "old age"]
    assert len(persona.paragraphs) == 12
    assert persona.stages[1].of_kind("speech")[1].id == "tester/late/speech/002"
    assert persona.stages[1].of_kind("speech")[1].line == 3


def test_language_and_description_optional(tmp_path):
    make_persona(tmp_path, yaml_text=YAML.replace("description: A persona for tests.\nlanguage: en\n", ""))
    (persona,) = load_personas(tmp_path)
    assert persona.language == "en" and persona.description == ""


def test_missing_persona_yaml(tmp_path):
    folder = make_persona(tmp_path)
    (folder / "persona.yaml").unlink()
    expect_error(tmp_path, folder / "persona.yaml", match="missing persona.yaml")


@pytest.mark.parametrize(
    "field, old, new, line",
    [
        ("name", "name: Test Person\n", "", 1),
        ("stages", YAML[YAML.index("stages:") :], "", 1),
        ("id", '  - id: late\n    token: "<TIME-II>"', '  - token: "<TIME-II>"', 8),
        ("token", '  - id: late\n    token: "<TIME-II>"', "  - id: late", 8),
    ],
)
def test_missing_required_field(tmp_path, field, old, new, line):
    assert old in YAML
    folder = make_persona(tmp_path, yaml_text=YAML.replace(old, new))
    expect_error(tmp_path, folder / "persona.yaml", line, match=f"missing required field '{field}'")


def test_unknown_key(tmp_path):
    folder = make_persona(tmp_path, yaml_text=YAML.replace("language: en\n", "language: en\nage: 40\n"))
    err = expect_error(tmp_path, folder / "persona.yaml", 4, match="unknown key 'age'")
    assert "valid keys: name, description, language, stage_prompt, stages" in str(err)


def test_unknown_stage_key(tmp_path):
    folder = make_persona(
        tmp_path, yaml_text=YAML.replace('    when: "youth"', '    when: "youth"\n    year: 1881')
    )
    err = expect_error(tmp_path, folder / "persona.yaml", 8, match=r"stages\[0\]: unknown key 'year'")
    assert "valid keys: id, token, when" in str(err)


def test_duplicate_stage_id(tmp_path):
    folder = make_persona(tmp_path, yaml_text=YAML.replace("id: late", "id: early"), stages=("early",))
    expect_error(tmp_path, folder / "persona.yaml", 8, match="duplicate stage id 'early'.*line 5")


def test_duplicate_stage_token(tmp_path):
    folder = make_persona(tmp_path, yaml_text=YAML.replace("<TIME-II>", "<TIME-I>"))
    expect_error(tmp_path, folder / "persona.yaml", 9, match="duplicate stage token '<TIME-I>'.*line 6")


def test_duplicate_yaml_key(tmp_path):
    folder = make_persona(tmp_path, yaml_text=YAML + "name: Other\n")
    expect_error(tmp_path, folder / "persona.yaml", 11, match="duplicate key 'name'")


@pytest.mark.parametrize("token", ["TIME-I", "<TIME I>", "<>", "<TIME-I", "<<TIME-I>>"])
def test_bad_token_form(tmp_path, token):
    folder = make_persona(tmp_path, yaml_text=YAML.replace('"<TIME-II>"', f'"{token}"'))
    expect_error(tmp_path, folder / "persona.yaml", 9, match="must look like <NAME>")


def test_invalid_yaml(tmp_path):
    folder = make_persona(tmp_path, yaml_text=YAML.replace("  - id: late", "  - id: [late"))
    expect_error(tmp_path, folder / "persona.yaml", match="invalid YAML")


def test_empty_yaml(tmp_path):
    folder = make_persona(tmp_path, yaml_text="# nothing here\n")
    expect_error(tmp_path, folder / "persona.yaml", match="empty")


def test_unknown_stage_folder(tmp_path):
    folder = make_persona(tmp_path)
    shutil.copytree(folder / "late", folder / "middle")
    err = expect_error(tmp_path, folder / "middle", match="unknown stage 'middle'")
    assert "declared stages: early, late" in str(err)


def test_stage_without_folder(tmp_path):
    folder = make_persona(tmp_path, stages=("early",))
    expect_error(tmp_path, folder / "persona.yaml", 8, match=r"stage 'late' has no folder")


@pytest.mark.parametrize("kind", KINDS)
def test_missing_materials_file(tmp_path, kind):
    folder = make_persona(tmp_path)
    (folder / "late" / f"{kind}.txt").unlink()
    expect_error(tmp_path, folder / "late" / f"{kind}.txt", match=f"missing materials file {kind}.txt")


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n  \r\n"])
def test_empty_materials_file(tmp_path, content):
    folder = make_persona(tmp_path)
    (folder / "early" / "speech.txt").write_text(content)
    expect_error(tmp_path, folder / "early" / "speech.txt", match="empty materials file")


def test_unknown_materials_file(tmp_path):
    folder = make_persona(tmp_path)
    (folder / "early" / "letters.txt").write_text(PARA)
    expect_error(tmp_path, folder / "early" / "letters.txt", match="unknown materials file 'letters.txt'")


def test_undecodable_materials(tmp_path):
    folder = make_persona(tmp_path)
    path = folder / "late" / "experiences.txt"
    path.write_bytes(b"first paragraph line\nsecond line\n\nthird caf\xe9 line\n")
    expect_error(tmp_path, path, 4, match=r"not valid UTF-8.*0xe9")


def test_undecodable_yaml(tmp_path):
    folder = make_persona(tmp_path)
    path = folder / "persona.yaml"
    path.write_bytes(YAML.replace("A persona for tests.", "Caf\xe9").encode("latin-1"))
    expect_error(tmp_path, path, 2, match="not valid UTF-8")


def test_missing_personas_dir(tmp_path):
    with pytest.raises(MaterialsError, match="does not exist"):
        load_personas(tmp_path / "nowhere")
    with pytest.raises(MaterialsError, match="no persona folders"):
        load_personas(tmp_path)


# --------------------------------------------------------------------------------------------
# tolerated formatting


def test_windows_line_endings_trailing_whitespace_and_wrapping(tmp_path):
    folder = make_persona(tmp_path)
    raw = (
        "\ufeffFirst line of one  \r\nparagraph wrapped\t\r\n   over three lines.\r\n"
        "  \t \r\n\r\n\r\n"
        "Second paragraph.   \r\n"
    )
    (folder / "early" / "knowledge.txt").write_bytes(raw.encode("utf-8"))
    (folder / "persona.yaml").write_bytes(YAML.replace("\n", "  \r\n").encode("utf-8"))
    (persona,) = load_personas(tmp_path)
    first, second = persona.stage("early").of_kind("knowledge")
    assert first.text == "First line of one paragraph wrapped over three lines."
    assert (first.line, second.line) == (1, 7)
    assert second.text == "Second paragraph."
    assert persona.stages[1].token == "<TIME-II>"


def test_split_paragraphs_lines():
    assert split_paragraphs("\n\na\nb\n\n\nc\n") == [(3, "a b"), (7, "c")]
    assert split_paragraphs("") == []


def test_several_personas_sorted_and_tokens_in_order(tmp_path):
    make_persona(tmp_path, "zed")
    make_persona(tmp_path, "abe", yaml_text=YAML.replace("<TIME-II>", "<TIME-III>"))
    (tmp_path / "README.md").write_text("not a persona")
    personas = load_personas(tmp_path)
    assert [p.id for p in personas] == ["abe", "zed"]
    assert stage_tokens(personas) == ["<TIME-I>", "<TIME-III>", "<TIME-II>"]
