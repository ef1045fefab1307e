"""`stage_prompt` in persona.yaml: `token` (the paper's prompt, the default) or `token_and_when` (the
stage's `when` line after the token). Every path that writes a persona prompt writes the one the
persona asks for: build-data's dialogues and pairs (reference dialogues included), the training
tokens, chat, `persllm serve`'s chat page, talk, eval's answers, the probes and the attribution.
(The API of `persllm serve` writes no persona prompt: its clients send the messages.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from persllm_jax.builder import outputs, pairs
from persllm_jax.builder.build import Item
from persllm_jax.builder.references import reference_items
from persllm_jax.personas.materials import MaterialsError, load_personas

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "personas"
HOLMES_EARLY_WHEN = (
    "1881-1887: newly sharing rooms at 221B Baker Street with Dr John Watson (A Study in Scarlet)"
)
HOLMES_DESCRIPTION_START = "You are Sherlock Holmes. The consulting detective of 221B Baker Street"


def with_stage_prompt(tmp_path: Path, value: str) -> Path:
    folder = tmp_path / "personas"
    shutil.copytree(EXAMPLES, folder)
    for path in folder.glob("*/persona.yaml"):
        path.write_text(path.read_text().replace("\nstages:", f"\nstage_prompt: {value}\nstages:", 1))
    return folder


@pytest.fixture(scope="module")
def when_personas(tmp_path_factory):
    return with_stage_prompt(tmp_path_factory.mktemp("when"), "token_and_when")


def expected(token_and_when: bool) -> str:
    """Holmes' early system prompt, spelled out here rather than by the code under test."""
    stage = f"<TIME-I> {HOLMES_EARLY_WHEN}." if token_and_when else "<TIME-I>"
    return f"{stage} {HOLMES_DESCRIPTION_START}"


def test_the_option_is_read_and_checked(tmp_path):
    assert {p.stage_prompt for p in load_personas(EXAMPLES)} == {"token"}
    bad = with_stage_prompt(tmp_path / "bad", "token_then_when")
    with pytest.raises(MaterialsError, match=r"persona.yaml:\d+: 'stage_prompt' is 'token_then_when'; valid"):
        load_personas(bad)
    no_when = with_stage_prompt(tmp_path / "no_when", "token_and_when")
    yaml_path = no_when / "holmes" / "persona.yaml"
    yaml_path.write_text(yaml_path.read_text().replace(f'    when: "{HOLMES_EARLY_WHEN}"\n', ""))
    with pytest.raises(MaterialsError, match=r"holmes/persona.yaml:\d+: stages\[0\] has no 'when' line"):
        load_personas(no_when)


@pytest.mark.parametrize("token_and_when", [False, True])
def test_build_data_writes_the_persona_prompt(token_and_when, tmp_path):
    folder = with_stage_prompt(tmp_path, "token_and_when") if token_and_when else EXAMPLES
    personas = {p.id: p for p in load_personas(folder)}
    stages = {(p.id, s.id): s for p in personas.values() for s in p.stages}
    # The shipped reference files hold the paper's prompt; they are read in the persona's own.
    items = reference_items([personas["holmes"]], folder, 0.2, 0, Item)
    early = [i for i in items if i.stage == "early"]
    assert early, "holmes ships early reference dialogues"
    for item in early:
        assert outputs.dialogue_row(item, personas, stages)["messages"][0]["content"].startswith(
            expected(token_and_when)
        )
    mined = [p for p in pairs.cross_stage_pairs(items, personas, stages) if p["stage"] == "early"]
    assert mined, "the reference groups give cross-stage pairs"
    for row in mined:
        assert row["prompt"][0]["content"].startswith(expected(token_and_when))


def test_training_tokens_carry_the_stage_token_then_the_when_line(when_personas, smollm2_tokenizer):
    from persllm_jax.data.chat_tokenize import tokenize_sft
    from persllm_jax.data.formats import sft_example

    tokenizer = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)
    tokenizer.add_tokens(["<TIME-I>", "<TIME-II>"], special_tokens=True)
    personas = {p.id: p for p in load_personas(when_personas)}
    stages = {(p.id, s.id): s for p in personas.values() for s in p.stages}
    item = next(
        i for i in reference_items([personas["holmes"]], when_personas, 0.2, 0, Item) if i.stage == "early"
    )
    example = tokenize_sft(tokenizer, sft_example(outputs.dialogue_row(item, personas, stages)))
    ids = example.input_ids.tolist()
    token = tokenizer.convert_tokens_to_ids("<TIME-I>")
    start = ids.index(token)
    text = tokenizer.decode(ids[start + 1 :])
    assert text.startswith(f" {HOLMES_EARLY_WHEN}. You are Sherlock Holmes."), text[:200]
    assert not example.loss_mask[: start + 1].any(), "the prompt is not trained on"


def test_chat_talk_eval_and_probes_ask_with_the_persona_prompt(when_personas, smollm2_tokenizer, monkeypatch):
    from persllm_jax.evaluation import answers
    from persllm_jax.inference import talk as talk_module
    from persllm_jax.inference.serving.app import personas_for_page
    from persllm_jax.personas.probes import read_probes
    from persllm_jax.personas.prompts import persona_system_message
    from persllm_jax.train.probing.scorer import encode_probes

    personas = {p.id: p for p in load_personas(when_personas)}
    # chat
    system, _, _ = persona_system_message(when_personas, "holmes", "early")
    assert system.startswith(expected(True))
    # the chat page of `persllm serve --personas-dir`: the prompt it shows and sends
    (holmes,) = [p for p in personas_for_page(when_personas) if p["id"] == "holmes"]
    assert holmes["stages"][0]["id"] == "early"
    assert holmes["stages"][0]["system_prompt"].startswith(expected(True))
    # talk: the system prompts its two agents are given
    seen = {}
    monkeypatch.setattr(talk_module.pretrained, "load_pretrained", lambda *a, **k: (None, None))
    monkeypatch.setattr(talk_module, "Generator", lambda *a, **k: None)
    monkeypatch.setattr(
        talk_module, "converse", lambda gens, systems, names, cfg: seen.update(systems=systems) or []
    )
    monkeypatch.setattr(talk_module, "write_transcript", lambda *a: {})
    cfg = talk_module.TalkConfig(
        out_dir="unused",
        personas_dir=str(when_personas),
        agents=(
            talk_module.Agent(persona="holmes", stage="early", model="m"),
            talk_module.Agent(persona="darwin", stage="late", model="m"),
        ),
    )
    talk_module.talk(cfg)
    assert seen["systems"][0].startswith(expected(True))
    assert seen["systems"][1].startswith("<TIME-II> 1860s-1882: at Down House")
    # eval: the conversation an answer is generated from
    request = {"as_persona": "holmes", "as_stage": "early", "question": "Who are you?"}
    assert answers.conversation(request, personas)[0]["content"].startswith(expected(True))
    # probes (and attribution, which encodes its prompts the same way): the tokens scored
    tokenizer = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)
    tokenizer.add_tokens(["<TIME-I>", "<TIME-II>"], special_tokens=True)
    probes = [
        p
        for p in read_probes([EXAMPLES / "holmes" / "probes.jsonl"], personas.values())
        if p.stage == "early"
    ][:1]
    (encoded,) = [
        v
        for (pid, stage, choice), v in encode_probes(tokenizer, probes, personas).items()
        if stage == "early" and choice == 0
    ]
    prompt = tokenizer.decode(encoded.prompt)
    assert f"<TIME-I> {HOLMES_EARLY_WHEN}. You are Sherlock Holmes." in prompt


def test_the_pipeline_gives_every_step_its_stage_prompt(tmp_path):
    """`stage_prompt` in the pipeline config: every step reads one copy of the persona folders that
    asks for it (build-data, the probes during SFT and DPO, eval, talk and reload are given it)."""
    import yaml

    from persllm_jax.configlib import ConfigError
    from persllm_jax.pipeline.runner import Pipeline, PipelineConfig

    cfg = PipelineConfig(
        out_dir=str(tmp_path / "run"), personas_dir=str(EXAMPLES), stage_prompt="token_and_when"
    )
    pipeline = Pipeline(cfg, config_path=ROOT / "configs" / "demo.yaml")
    folder = pipeline.personas_dir()
    assert folder == str(tmp_path / "run" / "personas") and pipeline.personas_dir() == folder
    personas = {p.id: p for p in load_personas(folder)}
    assert {p.stage_prompt for p in personas.values()} == {"token_and_when"}
    assert sorted(personas) == sorted(p.id for p in load_personas(EXAMPLES))
    config = pipeline._train_config("sft", cfg.sft, tmp_path / "base", [{"path": "d.jsonl"}])
    assert yaml.safe_load(Path(config).read_text())["eval"]["personas_dir"] == folder
    plain = Pipeline(PipelineConfig(out_dir=str(tmp_path / "plain"), personas_dir=str(EXAMPLES)))
    assert plain.personas_dir() == str(EXAMPLES)
    bad = Pipeline(
        PipelineConfig(out_dir=str(tmp_path / "bad"), personas_dir=str(EXAMPLES), stage_prompt="when")
    )
    with pytest.raises(ConfigError, match="stage_prompt: 'when' is not one of token, token_and_when"):
        bad.personas_dir()


def test_a_training_step_stopped_early_is_not_done(tmp_path, monkeypatch):
    """A trainer stopped by SIGTERM checkpoints and exits 0: the pipeline must not take the step as
    done (nor start DPO from a half-trained SFT); it says where the run stopped and how to resume."""
    import yaml

    from persllm_jax.pipeline.runner import Pipeline, PipelineConfig, PipelineError

    cfg = PipelineConfig(out_dir=str(tmp_path / "run"), personas_dir=str(EXAMPLES))
    pipeline = Pipeline(cfg, config_path=ROOT / "configs" / "demo.yaml")
    config = pipeline._train_config("sft", cfg.sft, tmp_path / "base", [{"path": "d.jsonl"}])
    max_steps = yaml.safe_load(Path(config).read_text())["train"]["max_steps"]
    stops_at = [max_steps // 2]

    def trainer_that_checkpoints(step, *args):  # what `persllm sft` leaves when it exits 0
        pipeline.path(step, "checkpoints", str(stops_at[0])).mkdir(parents=True)

    monkeypatch.setattr(pipeline, "_persllm", trainer_that_checkpoints)
    stopped = (
        rf"step sft stopped at step {max_steps // 2} of {max_steps} .*persllm pipeline --config .*demo\.yaml"
    )
    with pytest.raises(PipelineError, match=stopped):
        pipeline._train("sft", config)
    stops_at[0] = max_steps
    pipeline._train("sft", config)  # it reached max_steps: done
