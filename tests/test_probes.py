"""Persona probes: the probe files (format, errors, the shipped sets), scoring against transformers'
PyTorch model, the stage-token guarantees, order invariance, attribution, and `persllm probe`."""

import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from persllm_jax.personas.materials import load_personas, split_paragraphs
from persllm_jax.personas.probes import INDEPENDENT_PROBES_FILE, PROBES_FILE, ProbeFileError, read_probes
from persllm_jax.personas.prompts import persona_system_message
from persllm_jax.train.probing.scorer import ProbeScorer
from tests.cli_helpers import run_cli
from tests.probe_questions import normalise

ROOT = Path(__file__).resolve().parents[1]
PERSONAS_DIR = ROOT / "examples" / "personas"
PERSONAS = {p.id: p for p in load_personas(PERSONAS_DIR)}
SHIPPED = sorted(PERSONAS_DIR.glob(f"*/{PROBES_FILE}"))
# written from the materials alone, apart from the first set and the reference dialogues
INDEPENDENT = sorted(PERSONAS_DIR.glob(f"*/{INDEPENDENT_PROBES_FILE}"))

GOOD = {
    "id": "h-1",
    "persona": "holmes",
    "stage": "early",
    "category": "temporal",
    "question": "Where do you live?",
    "choices": ["At Baker Street, with Watson.", "On a farm in Sussex, with bees."],
    "answer": 0,
    "twin": "t1",
    "source": "early/knowledge.txt#2",
}
LATE = {**GOOD, "id": "h-2", "stage": "late", "answer": 1, "source": "late/knowledge.txt#1"}


def _write(tmp_path, *records) -> Path:
    path = tmp_path / "probes.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# -- files -----------------------------------------------------------------------------------------


def test_a_good_twin_pair_reads(tmp_path):
    probes = read_probes([_write(tmp_path, GOOD, LATE)], PERSONAS.values())
    assert [(p.id, p.stage, p.answer, p.twin, p.line) for p in probes] == [
        ("h-1", "early", 0, "t1", 1),
        ("h-2", "late", 1, "t1", 2),
    ]


@pytest.mark.parametrize(
    "records, line, reason",
    [
        ([GOOD, "{not json"], 2, "not valid JSON"),
        ([GOOD, {**LATE, "persona": "watson"}], 2, "unknown persona 'watson'"),
        ([GOOD, {**LATE, "stage": "middle"}], 2, "unknown stage 'middle' of persona 'holmes'"),
        ([GOOD, {**LATE, "answer": 2}], 2, "answer 2 is out of range"),
        ([GOOD, {**LATE, "answer": -1}], 2, "answer -1 is out of range"),
        ([GOOD, {**LATE, "category": "trivia"}], 2, "unknown category 'trivia'"),
        ([GOOD, {**LATE, "choices": ["only one"]}], 2, "2-4 replies"),
        ([GOOD, {**LATE, "colour": "red"}], 2, "unknown keys ['colour']"),
        ([GOOD, {k: v for k, v in LATE.items() if k != "answer"}], 2, "missing keys ['answer']"),
        ([GOOD, {**LATE, "id": "h-1"}], 2, "probe id 'h-1' is used before"),
        ([GOOD, {**LATE, "question": "Where do you live now?"}], 2, "twin group 't1': the question differs"),
        ([GOOD, {**LATE, "choices": GOOD["choices"][::-1]}], 2, "twin group 't1': the choices differ"),
        ([GOOD, {**LATE, "answer": 0}], 2, "twin group 't1': answer 0 is the same at two stages"),
        ([GOOD, {**LATE, "stage": "early", "answer": 1}], 2, "twin group 't1': stage 'early' appears twice"),
        ([GOOD], 1, "twin group 't1': has one probe"),
    ],
)
def test_malformed_files_are_refused_with_file_line_and_reason(tmp_path, records, line, reason):
    path = _write(tmp_path, *records)
    with pytest.raises(ProbeFileError) as err:
        read_probes([path], PERSONAS.values())
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert reason in str(err.value)
    assert (err.value.path, err.value.line) == (str(path), line)


# -- the shipped probe sets ------------------------------------------------------------------------


def test_every_example_persona_ships_two_probe_sets():
    for files in (SHIPPED, INDEPENDENT):
        assert sorted(p.parent.name for p in files) == sorted(PERSONAS) and len(files) == 3


def test_the_independent_sets_ask_other_questions_than_the_first():
    """A second set is only a second measurement if it asks its own questions."""
    for first, second in zip(SHIPPED, INDEPENDENT, strict=True):
        asked = {normalise(p.question) for p in read_probes([first], PERSONAS.values())}
        again = [p.id for p in read_probes([second], PERSONAS.values()) if normalise(p.question) in asked]
        assert not again, f"{second}: questions of {first}: {again}"


@pytest.mark.parametrize("path", SHIPPED + INDEPENDENT, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_shipped_probe_sets_have_what_a_set_needs(path):
    probes = read_probes([path], PERSONAS.values())  # the format's checks, twin groups included
    persona = path.parent.name
    assert {p.persona for p in probes} == {persona}
    assert len(probes) >= 40
    twins = Counter(p.twin for p in probes if p.twin is not None)
    assert len(twins) >= 10 and set(twins.values()) == {2}
    false_premise = Counter(p.stage for p in probes if p.category == "false_premise")
    assert false_premise["early"] >= 4 and false_premise["late"] >= 4
    assert len({p.answer for p in probes if p.category == "false_premise"}) >= 2  # the right index varies
    assert sum(p.category in ("knowledge", "identity") for p in probes) >= 8
    assert sum(p.category == "attitude" for p in probes) >= 4
    # Length alone does not give the answer away: right vs wrong choices, mean over the file.
    ratios = [
        len(p.choices[p.answer]) / np.mean([len(c) for i, c in enumerate(p.choices) if i != p.answer])
        for p in probes
    ]
    assert 0.8 <= float(np.mean(ratios)) <= 1.25
    # nor does picking the longest (or the shortest) reply score much above chance
    chance = float(np.mean([1 / len(p.choices) for p in probes]))
    for pick in (np.argmax, np.argmin):
        by_length = np.mean([int(pick([len(c) for c in p.choices])) == p.answer for p in probes])
        assert by_length <= chance + 0.1, (
            f"{pick.__name__} of the lengths: {by_length:.2f} (chance {chance:.2f})"
        )
    # Each probe names the materials paragraph its answer rests on.
    for p in probes:
        match = re.fullmatch(r"(\w+)/(\w+\.txt)#(\d+)", p.source or "")
        assert match, f"{p.id}: source {p.source!r} is not <stage>/<file>.txt#<paragraph>"
        stage_dir, name, paragraph = match.groups()
        materials = path.parent / stage_dir / name
        assert materials.is_file(), f"{p.id}: {materials} does not exist"
        assert 1 <= int(paragraph) <= len(split_paragraphs(materials.read_text())), p.id


def test_no_probe_copies_a_sentence_of_the_materials():
    """Probes are written from the materials, not cut out of them: no run of 8 words is shared."""
    for path in SHIPPED + INDEPENDENT:
        words = re.findall(r"[a-z']+", " ".join(p.read_text().lower() for p in path.parent.glob("*/*.txt")))
        grams = {tuple(words[i : i + 8]) for i in range(len(words) - 7)}
        assert len(grams) > 1000
        for probe in read_probes([path], PERSONAS.values()):
            for text in (probe.question, *probe.choices):
                mine = re.findall(r"[a-z']+", text.lower())
                copied = [g for g in zip(*(mine[i:] for i in range(8))) if g in grams]
                assert not copied, f"{probe.id}: {' '.join(copied[0])}"


# -- scoring ---------------------------------------------------------------------------------------


def _all_probes():
    return read_probes(SHIPPED, PERSONAS.values())


@pytest.fixture(scope="module")
def trained(sft_reference_run):
    from persllm_jax.io import pretrained

    return pretrained.load_pretrained(sft_reference_run)


def _reference_scores(hf_model, tokenizer, messages, reply):
    """Mean log-prob of `reply`'s tokens as the assistant turn, with transformers: the conversation
    rendered whole, the reply's tokens located by their characters, the end-of-turn marker left out."""
    import torch

    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    begin = text.index(reply, len(head))
    end = begin + len(reply)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    positions = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > begin]
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert tokenizer.decode(enc["input_ids"][positions[-1] + 1]) in ("<|im_end|>", "<|eot_id|>", "</s>")
    with torch.no_grad():
        logits = hf_model(torch.tensor([enc["input_ids"]])).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    return float(np.mean([logps[t - 1, enc["input_ids"][t]].item() for t in positions]))


def test_scores_and_picks_equal_transformers_on_20_probes(trained, tmp_path):
    """Our shared-prompt scoring against an independent PyTorch scoring of the exported model."""
    import torch
    import transformers

    from persllm_jax.io import pretrained

    model, tokenizer = trained
    export = pretrained.save_pretrained(model, tokenizer, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    probes = _all_probes()[::8][:20]
    assert len(probes) == 20 and {p.persona for p in probes} == set(PERSONAS)
    scorer, state = ProbeScorer.for_model(model, tokenizer, probes, PERSONAS)
    records = {r["id"]: r for r in scorer.run(state)["probes"]}
    for probe in probes:
        system, persona, stage = persona_system_message(PERSONAS_DIR, probe.persona, probe.stage)
        # The probe's prompt is the chat's: the stage token, then who the persona is.
        assert system == f"{stage.token} You are {persona.name}. {persona.description}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": probe.question}]
        expected = [_reference_scores(hf_model, hf_tokenizer, messages, c) for c in probe.choices]
        np.testing.assert_allclose(records[probe.id]["scores"], expected, atol=1e-4, rtol=0, err_msg=probe.id)
        assert records[probe.id]["pick"] == int(np.argmax(expected)), probe.id


def _stage_token_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<TIME-I>", "<TIME-II>")]


def test_equal_stage_token_rows_give_zero_twin_accuracy_and_zero_stage_effect(trained):
    from flax import nnx

    model, tokenizer = trained
    probes = _all_probes()
    first, second = _stage_token_ids(tokenizer)
    scorer, state = ProbeScorer.for_model(model, tokenizer, probes, PERSONAS)
    before = scorer.run(state)
    # The trained rows differ, so the two stages' scores of a twin question differ too.
    twin_records = [r for r in before["probes"] if "other_stage" in r]
    assert len(twin_records) == sum(p.twin is not None for p in probes)
    assert all(other["scores"] != r["scores"] for r in twin_records for other in r["other_stage"].values())

    table = model.embed[...]
    model.embed[...] = table.at[second].set(table[first])
    state = nnx.state(model)
    after = scorer.run(state)
    assert after["twin_accuracy"]["overall"]["value"] == 0.0
    assert after["twin_accuracy"]["overall"]["n"] == len({p.twin for p in probes if p.twin})
    assert after["stage_effect"]["overall"]["value"] == 0.0
    for persona in PERSONAS:
        assert after["stage_effect"]["by_persona"][persona]["value"] == 0.0
    # Each twin question now has one pick at both stages.
    for record in after["probes"]:
        for other in record.get("other_stage", {}).values():
            assert other["pick"] == record["pick"], record["id"]
    model.embed[...] = table


def test_reordering_the_choices_leaves_every_picked_reply_unchanged(trained, tmp_path):
    model, tokenizer = trained
    probes = _all_probes()
    rng = np.random.default_rng(0)
    orders = defaultdict(lambda: None)
    records = []
    for p in probes:
        key = p.twin or p.id  # twins keep one order, as their format requires
        if orders[key] is None:
            orders[key] = rng.permutation(len(p.choices))
        order = orders[key]
        records.append(
            {
                "id": p.id,
                "persona": p.persona,
                "stage": p.stage,
                "category": p.category,
                "question": p.question,
                "choices": [p.choices[i] for i in order],
                "answer": int(np.flatnonzero(order == p.answer)[0]),
                "twin": p.twin,
                "source": p.source,
            }
        )
    assert sum(list(o) != sorted(o) for o in orders.values()) > 20  # most orders changed
    shuffled = read_probes([_write(tmp_path, *records)], PERSONAS.values())
    scorer, state = ProbeScorer.for_model(model, tokenizer, probes, PERSONAS)
    plain = {r["id"]: r for r in scorer.run(state)["probes"]}
    scorer, state = ProbeScorer.for_model(model, tokenizer, shuffled, PERSONAS)
    mixed = {r["id"]: r for r in scorer.run(state)["probes"]}
    texts = {p.id: p.choices for p in probes}
    shuffled_texts = {p.id: p.choices for p in shuffled}
    for probe_id, record in plain.items():
        assert texts[probe_id][record["pick"]] == shuffled_texts[probe_id][mixed[probe_id]["pick"]], probe_id
        assert (record["pick"] == record["answer"]) == (mixed[probe_id]["pick"] == mixed[probe_id]["answer"])


# -- attribution -----------------------------------------------------------------------------------

QUESTIONS = [
    "What did you do this morning?", "How do you spend an evening?", "What is on your desk?",
    "What are you thinking about?", "Who came to see you?", "What did you write today?",
    "What do you read?", "What is your work?", "What troubles you?", "What pleases you?",
    "Where did you walk?", "What did you find?", "What do you hope for?", "What did you eat?",
    "What will you do tomorrow?", "What is the weather like?", "What do you collect?",
    "What do you notice first?", "What is your method?", "Whom do you trust?",
]  # fmt: skip
STYLES = {
    "holmes": [
        "Elementary: the mud on the boots, the ash on the sleeve, and the case is plain to me.",
        "I observe, I deduce, and Scotland Yard follows behind me as usual.",
        "A crime at Baker Street, a violin, and a pipe of strong tobacco until dawn.",
        "The facts point one way; the police look the other, as they always do.",
    ],
    "darwin": [
        "I collected beetles and barnacles, and I wonder slowly about how species vary.",
        "My garden at the house has pigeons, orchids and worms to be counted patiently.",
        "Variation under domestication puzzles me; I write notes for many years.",
        "The finches and the tortoises of the islands differ, and I think on it with care.",
    ],
}


@pytest.fixture(scope="module")
def two_persona_run(tmp_path_factory):
    """The tiny model trained on Holmes's and Darwin's dialogues (their own system messages, both
    stages), each persona answering in its own words; 24 held-out dialogues of new questions."""
    from persllm_jax.personas.prompts import system_prompt
    from tests.train_runs import train

    out = tmp_path_factory.mktemp("two_personas")
    records = []
    for persona_id, answers in STYLES.items():
        persona = PERSONAS[persona_id]
        for stage in persona.stages:
            for i, question in enumerate(QUESTIONS):
                messages = [
                    {"role": "system", "content": system_prompt(persona, stage)},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answers[i % len(answers)]},
                ]
                split = "test" if i % 10 in (3, 7, 9) else "train"
                records.append(
                    {"id": f"{persona_id}-{stage.id}-{i}", "persona": persona_id, "stage": stage.id,
                     "kind": "ordinary", "messages": messages, "split": split}
                )  # fmt: skip
    data = out / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = out / "run"
    train(
        "sft", run,
        f"data.sources=[{{path: {data}, split: train, repeats: 20}}]",
        "train.max_steps=40", "optim.lr=3.0e-3", "checkpoint.every_steps=40",
    )  # fmt: skip
    return run, data


def test_attribution_separates_trained_personas_and_a_random_model_is_near_chance(two_persona_run):
    import jax.numpy as jnp

    from persllm_jax.evaluation.probes.run import held_out_items, score_model
    from persllm_jax.io import pretrained
    from persllm_jax.model.decoder import init_model

    run, data = two_persona_run
    personas = {k: PERSONAS[k] for k in STYLES}
    items = held_out_items(data, "test", personas)
    assert len(items) == 24 and Counter(i.persona for i in items) == {"holmes": 12, "darwin": 12}
    probes = [p for p in _all_probes() if p.persona in personas][:6]  # the attribution is what counts here
    model, tokenizer = pretrained.load_pretrained(run, dtype=jnp.float32)
    scorer, state = ProbeScorer.for_model(model, tokenizer, probes, personas)
    trained = score_model(scorer, state, items, with_records=False)["attribution"]
    # Chance is 1/2 for both (two personas; two stages each). Trained: at least 0.3 above it.
    assert trained["persona"]["chance"] == 0.5 and trained["persona"]["top1"]["n"] == 24
    assert trained["persona"]["top1"]["value"] >= 0.8
    assert trained["persona"]["mean_rank"] <= 1.2
    # Stage rows made equal: every stage of a persona scores a reply alike, and ties count as a
    # random order, so stage attribution is exactly at chance.
    first, second = _stage_token_ids(tokenizer)
    model.embed[...] = model.embed[...].at[second].set(model.embed[...][first])
    scorer, state = ProbeScorer.for_model(model, tokenizer, probes, personas)
    tied = score_model(scorer, state, items, with_records=False)["attribution"]["stage"]
    assert tied["top1"]["value"] == 0.5 and tied["mean_rank"] == 1.5
    random_model = init_model(model.cfg, seed=1)
    scorer, state = ProbeScorer.for_model(random_model, tokenizer, probes, personas)
    random = score_model(scorer, state, items, with_records=False)["attribution"]
    assert abs(random["persona"]["top1"]["value"] - 0.5) <= 0.2
    assert abs(random["stage"]["top1"]["value"] - 0.5) <= 0.2


# -- the command -----------------------------------------------------------------------------------


def test_persllm_probe_writes_every_metric_and_each_probes_scores(sft_reference_run, tmp_path):
    out = tmp_path / "probes.json"
    holmes = PERSONAS_DIR / "holmes" / "probes.jsonl"
    result = run_cli(
        "probe", f"tiny={sft_reference_run}", "--probes", holmes, "--dialogues",
        ROOT / "tests" / "data" / "dialogues.jsonl", "--json", out, "--markdown", tmp_path / "probes.md",
        cwd=ROOT,
    )  # fmt: skip
    assert "tiny: accuracy" in result.stdout and "probe finished: 63 probes" in result.stdout
    data = json.loads(out.read_text())
    tiny = data["models"]["tiny"]
    for metric in ("accuracy", "accuracy_summed", "twin_accuracy", "stage_effect"):
        overall = tiny[metric]["overall"]
        assert (
            set(overall) == {"value", "ci", "n"} and overall["ci"][0] <= overall["value"] <= overall["ci"][1]
        )
    assert tiny["chance"] == pytest.approx(
        np.mean([1 / len(p.choices) for p in read_probes([holmes], PERSONAS.values())])
    )
    assert set(tiny["accuracy"]["by_category"]) == {
        "temporal",
        "knowledge",
        "identity",
        "false_premise",
        "attitude",
    }
    assert tiny["attribution"]["persona"]["top1"]["n"] == 6  # the held-out dialogues of all three personas
    probes = read_probes([holmes], PERSONAS.values())
    assert [r["id"] for r in tiny["probes"]] == [p.id for p in probes]
    for record, probe in zip(tiny["probes"], probes):
        assert len(record["scores"]) == len(probe.choices) and record["pick"] == int(
            np.argmax(record["scores"])
        )
    assert sum(r["pick"] == p.answer for r, p in zip(tiny["probes"], probes)) == round(
        tiny["accuracy"]["overall"]["value"] * 63
    )
    assert "| tiny |" in (tmp_path / "probes.md").read_text()


def test_the_probe_set_option_reads_each_personas_independent_file(sft_reference_run, tmp_path):
    from persllm_jax.evaluation.probes.run import probe_models

    # a personas folder whose only probe set is the independent one: the default would find none
    personas = tmp_path / "personas"
    shutil.copytree(PERSONAS_DIR / "holmes", personas / "holmes")
    (personas / "holmes" / PROBES_FILE).unlink()
    with pytest.raises(ValueError, match="no persona .* has a probes.jsonl"):
        probe_models([("tiny", str(sft_reference_run))], personas_dir=personas)
    out = tmp_path / "probes.json"
    run_cli(
        "probe", f"tiny={sft_reference_run}", "--personas-dir", personas,
        "--probe-set", INDEPENDENT_PROBES_FILE, "--json", out, cwd=ROOT,
    )  # fmt: skip
    both = run_cli(
        "probe", f"tiny={sft_reference_run}", "--probes", PERSONAS_DIR / "holmes" / PROBES_FILE,
        "--probe-set", INDEPENDENT_PROBES_FILE, check=False, cwd=ROOT,
    )  # fmt: skip
    assert both.returncode != 0 and "not both" in both.stderr
    expected = read_probes([PERSONAS_DIR / "holmes" / INDEPENDENT_PROBES_FILE], PERSONAS.values())
    assert len(expected) >= 48
    assert [r["id"] for r in json.loads(out.read_text())["models"]["tiny"]["probes"]] == [
        p.id for p in expected
    ]


def test_the_leak_check_finds_a_probe_question_among_user_turns():
    from tests.probe_questions import assert_no_probe_question_in

    question = _all_probes()[5].question
    clean = [{"messages": [{"role": "user", "content": "Where were you born?"}]}]
    assert_no_probe_question_in(clean)
    leaked = clean + [
        {
            "prompt": [
                {"role": "system", "content": "x"},
                {"role": "user", "content": f"Say, {question.upper()}"},
            ]
        }
    ]
    with pytest.raises(AssertionError, match="probe questions in training data"):
        assert_no_probe_question_in(leaked)
