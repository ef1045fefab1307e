"""Reading data, recognising TRL formats, and the assistant-token masks on real chat templates."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from persllm_jax.data import (
    DataError,
    PreferenceExample,
    SFTExample,
    classify,
    normalize,
    preference_example,
    read_records,
    sft_example,
    to_training_arrays,
    tokenize_conversation,
    tokenize_preference,
    tokenize_sft,
    tokenize_text,
)
from tests.chat_masks import decode, masked_runs

ASSETS = Path(__file__).parent / "assets"
STAGE_TOKENS = ["<TIME-I>", "<TIME-II>", "<TIME-III>"]

CONVERSATIONS = {
    "system_two_turns": [
        {"role": "system", "content": "<TIME-II> You are Ada Lovelace in 1843."},
        {"role": "user", "content": "What are you working on?"},
        {"role": "assistant", "content": "Notes on Mr Babbage's Analytical Engine."},
        {"role": "user", "content": "Can it do more than arithmetic?"},
        {"role": "assistant", "content": "It might compose music,\nif harmony were expressed in numbers."},
    ],
    "no_system_three_turns": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Good day to you."},
        {"role": "user", "content": "Say something with symbols: café, naïve, 1+1=2 ✓"},
        {"role": "assistant", "content": "Voilà: café, naïve, 1+1=2 ✓ 😀"},
        {"role": "user", "content": "And a list?"},
        {"role": "assistant", "content": "- one\n- two\n\n- three"},
    ],
}

DIALOGUE = {
    "id": "ada-0001",
    "persona": "ada",
    "stage": "early",
    "kind": "ordinary",
    "messages": CONVERSATIONS["system_two_turns"],
    "analysis": None,
    "seed_id": "seed-7",
    "split": "train",
}
PAIR = {
    "id": "ada-pair-0001",
    "persona": "ada",
    "stage": "early",
    "source": "cross_stage",
    "prompt": CONVERSATIONS["system_two_turns"][:2],
    "chosen": [{"role": "assistant", "content": "Notes on the Engine."}],
    "rejected": [{"role": "assistant", "content": "I am retired and write no more."}],
    "split": "train",
}
# Texts used below beyond the conversations; tests/assets/make_tokenizers.py keeps the small Llama-3 and
# Qwen2 tokenizers exact on all of them.
EXTRA_TEXTS = [" Hi ", "Hello."]


def between_stage_tokens(text: str) -> list[str]:
    """The pieces of a text that BPE sees once the stage tokens are added (each stage token is matched first)."""
    return [piece for piece in re.split("|".join(map(re.escape, STAGE_TOKENS)), text) if piece]


def audited_texts() -> set[str]:
    """Every text the tests below tokenize with the Llama-3 and Qwen2 copies, whole and as BPE sees it."""
    texts = {m["content"] for messages in CONVERSATIONS.values() for m in messages} | set(EXTRA_TEXTS)
    texts |= {m["content"] for m in DIALOGUE["messages"]}
    texts |= {m["content"] for key in ("prompt", "chosen", "rejected") for m in PAIR[key]}
    return texts | {piece for text in texts for piece in between_stage_tokens(text)}


# ---------------------------------------------------------------- tokenizers with three templates


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer):
    """SmolLM2's own tokenizer and ChatML template, plus the stage tokens (a copy: the fixture is shared)."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_tokens(STAGE_TOKENS, special_tokens=True)
    return tokenizer


def _real_tokenizer(name: str):
    """A small copy of the real tokenizer (real merges, pre-tokenizer, special tokens and ids; see
    tests/assets/make_tokenizers.py) with its published chat template, plus the stage tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / name)
    tokenizer.add_tokens(STAGE_TOKENS, special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def llama3():
    return _real_tokenizer("llama3")


@pytest.fixture(scope="module")
def qwen2():
    return _real_tokenizer("qwen2")


@pytest.fixture(params=["chatml", "llama3", "qwen2"])
def templated(request):
    """(tokenizer, end-of-turn token) for each template under audit."""
    end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}[request.param]
    return request.getfixturevalue(request.param), end_of_turn


# ---------------------------------------------------------------- the mask audit


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_mask_selects_assistant_contents_and_end_of_turn(templated, conversation):
    tokenizer, end_of_turn = templated
    messages = CONVERSATIONS[conversation]
    example = tokenize_conversation(tokenizer, messages, sample_id=conversation)

    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert example.input_ids.tolist() == reference
    assert example.input_ids.dtype == np.int32 and example.loss_mask.dtype == np.bool_

    runs = masked_runs(example.input_ids, example.loss_mask)
    expected = [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    assert [decode(tokenizer, run) for run in runs] == expected
    # the token after each end-of-turn token (a newline or the next header) is not trained
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    for t in np.flatnonzero(example.input_ids == eot_id):
        if example.loss_mask[t] and t + 1 < len(example.input_ids):
            assert not example.loss_mask[t + 1]


def test_templates_render_as_published(llama3, qwen2):
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello."}]
    assert llama3.apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert qwen2.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        # the published ids of each model's turn header
        ("llama3", "<|start_header_id|>user<|end_header_id|>\n\n", [128006, 882, 128007, 271]),
        ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n", [128006, 78191, 128007, 271]),
        ("qwen2", "<|im_start|>user\n", [151644, 872, 198]),
        ("qwen2", "<|im_start|>assistant\n", [151644, 77091, 198]),
    ],
)
def test_small_tokenizers_keep_real_ids(name, text, ids, request):
    tokenizer = request.getfixturevalue(name)
    assert tokenizer.encode(text, add_special_tokens=False) == ids


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_small_tokenizers_are_exact_on_every_test_text(name, request):
    """The small copies hold only the merges these tests need: every text the audit tokenizes must be one
    that tests/assets/make_tokenizers.py checked against the full tokenizer (rerun it after adding one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / name)  # as made: no stage tokens
    covered = json.loads((ASSETS / "tokenizers" / name / "covered.json").read_text(encoding="utf-8"))
    texts = audited_texts()
    missing = texts - {entry["text"] for entry in covered}
    assert not missing, f"rerun tests/assets/make_tokenizers.py; not covered: {sorted(missing)}"
    assert len(covered) >= len(texts)
    for entry in covered:
        assert tokenizer.encode(entry["text"], add_special_tokens=False) == entry["ids"], entry["text"]


def test_mask_matches_hf_generation_tags(chatml):
    """On a ChatML template with {% generation %} tags around content + <|im_end|>, HF's mask equals ours."""
    tagged = copy.deepcopy(chatml)
    tagged.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    messages = CONVERSATIONS["system_two_turns"]
    hf = tagged.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ours = tokenize_conversation(tagged, messages, sample_id="tagged")
    assert ours.input_ids.tolist() == hf["input_ids"]
    assert ours.loss_mask.astype(int).tolist() == hf["assistant_masks"]


def test_stage_tokens_stay_single_tokens(chatml, llama3, qwen2):
    # each stage token gets an id past the model's vocabulary (SmolLM2 49152, Llama-3 128256, Qwen2 151646)
    for tokenizer, vocabulary in ((chatml, 49152), (llama3, 128256), (qwen2, 151646)):
        example = tokenize_sft(tokenizer, sft_example(DIALOGUE))
        stage_id = tokenizer.convert_tokens_to_ids("<TIME-II>")
        assert stage_id >= vocabulary and stage_id in example.input_ids.tolist()
        assert tokenizer.encode("<TIME-II>", add_special_tokens=False) == [stage_id]


def test_missing_stage_token_is_an_error(smollm2_tokenizer):
    with pytest.raises(DataError, match=r"ada-0001.*<TIME-II>.*not a token"):
        tokenize_sft(smollm2_tokenizer, sft_example(DIALOGUE))


def test_template_that_rewrites_history_is_an_error(chatml):
    rewriting = copy.deepcopy(chatml)
    # marks the last message, so a prefix's render is not a prefix of the whole render
    rewriting.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %}{{ ' (last)' }}{% endif %}"
        "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"sample rw-1: .*not a prefix"):
        tokenize_conversation(rewriting, CONVERSATIONS["system_two_turns"], sample_id="rw-1")


def test_prompt_completion_trains_the_completion_only(chatml):
    record = {
        "id": "pc-1",
        "prompt": CONVERSATIONS["system_two_turns"][:4],  # holds an earlier assistant turn
        "completion": [CONVERSATIONS["system_two_turns"][4]],
    }
    example = sft_example(record)
    assert example.train_from == 4
    tokenized = tokenize_sft(chatml, example)
    runs = masked_runs(tokenized.input_ids, tokenized.loss_mask)
    assert [decode(chatml, run) for run in runs] == [record["completion"][0]["content"] + "<|im_end|>"]

    strings = tokenize_sft(chatml, sft_example({"prompt": "The sky is", "completion": " blue."}))
    runs = masked_runs(strings.input_ids, strings.loss_mask)
    assert [decode(chatml, run) for run in runs] == [" blue." + chatml.eos_token]


def test_plain_text_trains_every_token(chatml):
    example = tokenize_text(chatml, "Once upon a time.", "lm-1")
    assert example.loss_mask.all() and example.input_ids[-1] == chatml.eos_token_id
    arrays = to_training_arrays(example, seq_len=16, pad_id=0)
    n = len(example.input_ids)
    assert arrays.loss_mask.tolist() == [True] * (n - 1) + [False] * (16 - n + 1)


# ---------------------------------------------------------------- truncation and shifting


def test_training_arrays_shift_and_pad(chatml):
    example = tokenize_conversation(chatml, CONVERSATIONS["system_two_turns"], sample_id="s")
    n, seq_len = len(example.input_ids), len(example.input_ids) + 7
    arrays = to_training_arrays(example, seq_len, pad_id=-1)
    assert all(a.shape == (seq_len,) for a in arrays[:4])
    assert arrays.length.shape == () and int(arrays.length) == n
    assert arrays.input_ids.dtype == np.int32 and arrays.targets.dtype == np.int32
    np.testing.assert_array_equal(arrays.input_ids[:n], example.input_ids)
    np.testing.assert_array_equal(arrays.targets[: n - 1], example.input_ids[1:])
    np.testing.assert_array_equal(arrays.loss_mask[: n - 1], example.loss_mask[1:])
    assert arrays.attention_mask.tolist() == [True] * n + [False] * 7
    assert (arrays.input_ids[n:] == -1).all() and (arrays.targets[n - 1 :] == -1).all()
    assert not arrays.loss_mask[n - 1 :].any()
    # each trained target is an assistant token predicted from the token before it
    for t in np.flatnonzero(arrays.loss_mask):
        assert example.loss_mask[t + 1] and arrays.targets[t] == example.input_ids[t + 1]


def test_truncation_keeps_the_first_tokens(chatml):
    example = tokenize_conversation(chatml, CONVERSATIONS["system_two_turns"], sample_id="s")
    first_answer_end = int(np.flatnonzero(example.loss_mask)[0]) + 3
    seq_len = first_answer_end + 2
    assert seq_len < len(example.input_ids)
    arrays = to_training_arrays(example, seq_len, pad_id=0)
    np.testing.assert_array_equal(arrays.input_ids, example.input_ids[:seq_len])
    np.testing.assert_array_equal(arrays.targets[:-1], example.input_ids[1:seq_len])
    np.testing.assert_array_equal(arrays.loss_mask[:-1], example.loss_mask[1:seq_len])
    assert not arrays.loss_mask[-1]  # the last kept token's successor was cut
    assert arrays.attention_mask.all()


def test_no_assistant_message_is_an_error(chatml):
    record = {"id": "no-answer", "messages": CONVERSATIONS["system_two_turns"][:2]}
    with pytest.raises(DataError, match=r"sample no-answer: no assistant message"):
        tokenize_sft(chatml, sft_example(record))


def test_assistant_tokens_beyond_seq_len_is_an_error(chatml):
    example = tokenize_conversation(chatml, CONVERSATIONS["system_two_turns"], sample_id="too-long")
    first = int(np.flatnonzero(example.loss_mask)[0])
    to_training_arrays(example, first + 1, pad_id=0)  # one assistant target fits
    with pytest.raises(DataError, match=r"sample too-long: no trainable token within the first"):
        to_training_arrays(example, first, pad_id=0)


# ---------------------------------------------------------------- preference pairs


def test_preference_masks_cover_the_answers(chatml):
    pair = tokenize_preference(chatml, preference_example(PAIR), seq_len=96)
    prompt_ids = chatml.apply_chat_template(PAIR["prompt"], add_generation_prompt=True, return_dict=False)
    for side, arrays in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = chatml.apply_chat_template(PAIR["prompt"] + PAIR[side], return_dict=False)
        n = len(full)
        assert (
            arrays.input_ids[:n].tolist() == full
            and arrays.input_ids[: len(prompt_ids)].tolist() == prompt_ids
        )
        trained = arrays.targets[arrays.loss_mask].tolist()
        assert decode(chatml, trained) == PAIR[side][0]["content"] + "<|im_end|>"
        assert arrays.loss_mask.sum() == n - len(prompt_ids) - 1  # all but the final newline

    strings = preference_example(
        {"id": "p2", "prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    )
    pair = tokenize_preference(chatml, strings, seq_len=16)
    assert decode(chatml, pair.chosen.targets[pair.chosen.loss_mask].tolist()) == " blue." + chatml.eos_token
    assert (
        decode(chatml, pair.rejected.targets[pair.rejected.loss_mask].tolist())
        == " green." + chatml.eos_token
    )


# ---------------------------------------------------------------- readers


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _public(records):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(DIALOGUE), "", json.dumps(PAIR), '{"id": "x", '])
    with pytest.raises(DataError, match=r"bad\.jsonl line 4: invalid JSON"):
        read_records(path)
    path = _write_jsonl(tmp_path / "list.jsonl", [json.dumps(DIALOGUE), "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl line 2: expected a JSON object, got list"):
        read_records(path)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_jsonl_positions_and_split_filter(tmp_path):
    test_record = {**DIALOGUE, "id": "ada-0002", "split": "test"}
    no_split = {"messages": DIALOGUE["messages"]}
    path = _write_jsonl(
        tmp_path / "d.jsonl", [json.dumps(DIALOGUE), "", json.dumps(test_record), json.dumps(no_split)]
    )
    records = read_records(path)
    assert [(r["_index"], r["_line"]) for r in records] == [(0, 1), (1, 3), (2, 4)]
    assert records, "nothing to check"
    assert all(r["_source"] == str(path) for r in records)
    assert _public(records) == [DIALOGUE, test_record, no_split]
    assert [r.get("id") for r in read_records(path, split="train")] == ["ada-0001", None]
    test_split = read_records(path, split="test")
    assert [r.get("id") for r in test_split] == ["ada-0002", None]
    assert test_split[0]["_line"] == 3  # positions survive filtering


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [DIALOGUE, {**DIALOGUE, "id": "ada-0002", "split": "test"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    read = read_records(tmp_path / "d.parquet")
    assert _public(read) == records and [r["_index"] for r in read] == [0, 1]
    assert [r["id"] for r in read_records(tmp_path / "d.parquet", split="test")] == ["ada-0002"]
    assert isinstance(normalize(read[0]), SFTExample)


def test_datasets_directory_round_trip(tmp_path):
    import datasets

    datasets.Dataset.from_list([PAIR]).save_to_disk(tmp_path / "single")
    assert _public(read_records(tmp_path / "single")) == [PAIR]

    test_pair = {**PAIR, "id": "ada-pair-0002", "split": "test"}
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([PAIR]), "test": datasets.Dataset.from_list([test_pair])}
    )
    splits.save_to_disk(tmp_path / "dict")
    assert _public(read_records(tmp_path / "dict")) == [PAIR]  # "train" by default
    test = read_records(tmp_path / "dict", split="test")
    assert _public(test) == [test_pair] and test[0]["_source"] == f"{tmp_path / 'dict'}[test]"
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: test, train"):
        read_records(tmp_path / "dict", split="validation")
    assert isinstance(normalize(test[0]), PreferenceExample)


# ---------------------------------------------------------------- formats


USER = [{"role": "user", "content": "What color is the sky?"}]
BLUE, GREEN = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Green."}]


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": USER + BLUE}, "conversational"),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            "sharegpt",
        ),
        ({"prompt": "The sky is", "completion": " blue."}, "prompt_completion"),
        ({"prompt": USER, "completion": BLUE}, "prompt_completion"),
        ({"text": "The sky is blue."}, "language_modeling"),
        ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "preference"),
        ({"prompt": USER, "chosen": BLUE, "rejected": GREEN}, "preference"),
        ({"chosen": USER + BLUE, "rejected": USER + GREEN}, "implicit_preference"),
        ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "implicit_preference"),
        ({"text": "x", "messages": None}, "language_modeling"),  # None counts as absent (Parquet fills)
    ],
)
def test_trl_formats_are_classified(record, expected):
    assert classify(record) == expected
    example = normalize(record)
    assert isinstance(example, PreferenceExample if "preference" in expected else SFTExample)


def test_our_records_carry_persona_and_stage():
    sft = sft_example({**DIALOGUE, "_source": "d.jsonl", "_index": 0, "_line": 1})
    assert (sft.id, sft.persona, sft.stage, sft.text) == ("ada-0001", "ada", "early", None)
    assert sft.messages == tuple(DIALOGUE["messages"]) and sft.origin == "d.jsonl line 1"
    pair = preference_example(PAIR)
    assert (pair.persona, pair.stage, pair.is_conversational) == ("ada", "early", True)
    assert pair.prompt_messages == tuple(PAIR["prompt"]) and pair.chosen_messages == tuple(PAIR["chosen"])
    plain = sft_example({"text": "hi", "_source": "t.parquet", "_index": 5})
    assert (plain.id, plain.persona, plain.stage) == ("t.parquet row 5", None, None)


def test_implicit_prompt_is_split_off():
    system = [{"role": "system", "content": "<TIME-I> You are Ada."}]
    pair = preference_example({"chosen": system + USER + BLUE, "rejected": system + USER + GREEN})
    assert pair.prompt_messages == tuple(system + USER)
    assert pair.chosen_messages == tuple(BLUE) and pair.rejected_messages == tuple(GREEN)

    pair = preference_example({"chosen": "The sky is bright.", "rejected": "The sky is brown."})
    assert (pair.prompt_messages, pair.chosen_messages, pair.rejected_messages) == (
        "The sky is",
        " bright.",
        " brown.",
    )
    with pytest.raises(DataError, match="share no prefix"):
        preference_example({"chosen": BLUE, "rejected": GREEN, "_source": "p.jsonl", "_index": 0, "_line": 9})
    with pytest.raises(DataError, match="identical"):
        preference_example({"chosen": USER + BLUE, "rejected": USER + BLUE})


def test_unknown_format_names_source_and_keys(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    (record,) = read_records(path)
    with pytest.raises(DataError) as info:
        normalize(record)
    message = str(info.value)
    assert "qa.jsonl line 1" in message and "['answer', 'question']" in message
    assert "prompt + chosen + rejected" in message and "messages" in message and "text" in message


def test_wrong_kind_of_record_is_an_error():
    with pytest.raises(DataError, match=r"sample 'ada-pair-0001'.*preference record, but an SFT format"):
        sft_example(PAIR)
    with pytest.raises(DataError, match=r"sample 'ada-0001'.*conversational record, but a preference format"):
        preference_example(DIALOGUE)
    with pytest.raises(DataError, match="all be strings or all message lists"):
        preference_example({"prompt": "The sky is", "chosen": BLUE, "rejected": GREEN})
    with pytest.raises(DataError, match=r"`messages\[1\]` needs a string `role`"):
        sft_example({"messages": [USER[0], {"content": "no role"}]})
    with pytest.raises(DataError, match="prompt / completion must all be strings or all message lists"):
        sft_example({"prompt": "The sky is", "completion": BLUE})
