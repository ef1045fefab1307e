"""`persllm build-data` end to end against the real `transformers serve` (SmolLM2-135M) on loopback,
through a counting, fault-injecting proxy."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli
from tests.fault_proxy import FaultProxy
from tests.probe_questions import assert_no_probe_question_in

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "data_demo.yaml"
# Small prompts and answers keep a CPU-served 135M model fast enough for CI.
SMALL = [
    "retrieval.objective_words=120",
    "retrieval.subjective_words=60",
    "llm.max_tokens=64",
    "llm.concurrency=2",
    "llm.timeout_s=300",  # the server answers one request at a time; queued ones wait
    f"general_data.path={ROOT}/tests/data/general.jsonl",
    f"personas_dir={ROOT}/examples/personas",
]
DIALOGUE_KEYS = {"id", "persona", "stage", "kind", "messages", "analysis", "seed_id", "split"}
PAIR_KEYS = {"id", "persona", "stage", "source", "prompt", "chosen", "rejected", "split"}
STAGE_TOKENS = {"early": "<TIME-I>", "late": "<TIME-II>"}


@pytest.fixture(scope="module")
def server(smollm2_transformers_server):
    return smollm2_transformers_server


def build(out_dir, base_url, model, *overrides, check=True):
    return run_cli(
        "build-data",
        "--config",
        CONFIG,
        f"out_dir={out_dir}",
        f"llm.base_url={base_url}",
        f"llm.model={model}",
        *SMALL,
        *overrides,
        check=check,
        cwd=ROOT,
    )


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    with FaultProxy(server.base_url) as proxy:
        result = build(out, proxy.url, server.model, "limits.seeds_per_stage=1")
    return out, result


@pytest.mark.slow
def test_outputs_written_and_valid(built):
    out, result = built
    for name in ("annotations.jsonl", "dialogues.jsonl", "pairs.jsonl", "stats.json"):
        assert (out / name).is_file(), name
    assert (out / "hf" / "dialogues" / "dataset_dict.json").is_file()
    assert list((out / "tfds" / "persllm_dialogues").glob("*/*.array_record-*"))
    dialogues, pairs = read_jsonl(out / "dialogues.jsonl"), read_jsonl(out / "pairs.jsonl")
    assert_no_probe_question_in(dialogues + pairs)
    persona_rows = [d for d in dialogues if d["kind"] != "general"]
    annotated = [d for d in persona_rows if "/ref/" not in d["id"]]
    assert annotated, "no annotated dialogue survived: see stats.json drop_reasons"
    assert any(d["kind"] == "general" for d in dialogues)
    for row in dialogues:
        assert set(row) == DIALOGUE_KEYS and row["split"] in ("train", "test")
        assert [m["role"] for m in row["messages"]][-1] == "assistant"
    for row in persona_rows:
        assert row["kind"] in ("ordinary", "opinion", "induced")
        system = row["messages"][0]
        assert system["role"] == "system" and system["content"].startswith(STAGE_TOKENS[row["stage"]] + " ")
    for row in pairs:
        assert set(row) == PAIR_KEYS and row["source"] in ("cross_persona", "cross_stage")
        assert row["prompt"][0]["content"].startswith(STAGE_TOKENS[row["stage"]] + " ")
        assert row["chosen"][0]["content"].strip() != row["rejected"][0]["content"].strip()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dialogues"] == len(persona_rows)
    # every shipped reference dialogue joins (reference.include defaults to true)
    assert stats["reference_dialogues"] == len(persona_rows) - len(annotated) == 414
    assert stats["general_dialogues"] == len(dialogues) - len(persona_rows)
    assert stats["pairs"] == len(pairs)
    assert stats["llm"]["requests_sent"] > 0 and stats["seeds"] == 6
    assert sum(stats["drop_reasons"].values()) == stats["dropped"]
    annotations = read_jsonl(out / "annotations.jsonl")
    assert len(annotations) == stats["seeds"] and len({a["id"] for a in annotations}) == len(annotations)
    for a in annotations:
        for answer in a["answers"].values():
            assert answer["retrieved"]["objective"] or answer["retrieved"]["subjective"]
    assert "build-data finished" in result.stdout


@pytest.mark.slow
def test_splits_and_pairs_are_clean(built):
    out, _ = built
    dialogues = [d for d in read_jsonl(out / "dialogues.jsonl") if d["kind"] != "general"]
    splits_by_seed, splits_by_question = {}, {}
    for d in dialogues:
        if "/ref/" in d["id"]:  # reference dialogues split by question (asked at one or two stages)
            splits_by_question.setdefault((d["persona"], d["messages"][1]["content"]), set()).add(d["split"])
        else:  # annotated ones by seed paragraph
            splits_by_seed.setdefault(d["seed_id"], set()).add(d["split"])
    assert splits_by_seed.values() and splits_by_question.values(), "nothing to check"
    assert all(len(s) == 1 for s in splits_by_seed.values())
    assert all(len(s) == 1 for s in splits_by_question.values())
    annotations = read_jsonl(out / "annotations.jsonl")
    author = {}
    for a in annotations:
        for answer in a["answers"].values():
            if answer.get("response"):
                author.setdefault(answer["response"], set()).add(a["persona"])
    for d in dialogues:
        author.setdefault(d["messages"][2]["content"], set()).add(d["persona"])
    split_of = {a["id"]: a["split"] for a in annotations} | {d["id"]: d["split"] for d in dialogues}
    mined = {}
    for pair in read_jsonl(out / "pairs.jsonl"):
        item_id = pair["id"].split("/cross_")[0]
        assert pair["split"] == split_of[item_id]  # a pair inherits its question's split
        if pair["source"] == "cross_persona":
            assert author[pair["rejected"][0]["content"]] - {pair["persona"]}
        origin = "reference" if "/ref/" in item_id else "annotated"
        mined[(origin, pair["source"])] = mined.get((origin, pair["source"]), 0) + 1
    # both kinds are mined from the reference dialogues: every question asked at both stages
    # gives two cross-stage pairs, every reference dialogue one cross-persona pair
    assert mined[("reference", "cross_stage")] == 2 * 54
    assert mined[("reference", "cross_persona")] == 414


@pytest.mark.slow
def test_outputs_load_into_trl_and_train(built, tmp_path):
    import transformers
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    out, _ = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "tests" / "data" / "tokenizer")
    for row in read_jsonl(out / "dialogues.jsonl") + read_jsonl(out / "pairs.jsonl"):
        assert is_conversational(row)
        rendered = maybe_apply_chat_template(row, tokenizer)
        assert rendered.values(), "nothing to check"
        assert all(isinstance(v, str) and v for v in rendered.values())
    common = [
        "model.preset=tiny",
        f"model.tokenizer={ROOT}/tests/data/tokenizer",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.seq_len=512",
        "mesh.fsdp=1",
    ]
    run_cli(
        "sft",
        "--config",
        ROOT / "configs" / "sft_tiny.yaml",
        f"run_dir={tmp_path}/sft",
        f"data.sources=[{{path: {out}/dialogues.jsonl, split: train}}]",
        *common,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    pairs = read_jsonl(out / "pairs.jsonl")
    assert pairs, "no preference pair was mined: see stats.json"
    run_cli(
        "dpo",
        "--config",
        ROOT / "configs" / "dpo_tiny.yaml",
        f"run_dir={tmp_path}/dpo",
        f"data.sources=[{{path: {out}/pairs.jsonl, split: ''}}]",
        *common,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert len(read_jsonl(tmp_path / "dpo" / "metrics.jsonl")) == 2


def _annotation_set(out):
    return sorted(
        (
            a["id"],
            a["question"],
            json.dumps({s: x.get("raw") for s, x in a["answers"].items()}, sort_keys=True),
        )
        for a in read_jsonl(out / "annotations.jsonl")
    )


@pytest.mark.slow
def test_ids_do_not_depend_on_where_the_build_runs(built, server, tmp_path):
    """The same build from another directory (the materials, the general chats and the LLM-call
    cache copied there, run from there): dialogues.jsonl and pairs.jsonl hold the same ids, and no id
    holds a path of either machine."""
    import shutil

    first, _ = built
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "examples" / "personas", elsewhere / "personas")
    (elsewhere / "general").mkdir()
    shutil.copy(ROOT / "tests" / "data" / "general.jsonl", elsewhere / "general" / "general.jsonl")
    shutil.copytree(first / "cache", elsewhere / "out" / "cache")
    with FaultProxy(server.base_url) as proxy:
        run_cli(
            "build-data", "--config", CONFIG, "out_dir=out", f"llm.base_url={proxy.url}",
            f"llm.model={server.model}", *SMALL, "limits.seeds_per_stage=1", "personas_dir=personas",
            "general_data.path=general/general.jsonl", cwd=elsewhere,
        )  # fmt: skip
    for name in ("dialogues.jsonl", "pairs.jsonl"):
        ids = [row["id"] for row in read_jsonl(first / name)]
        assert ids and ids == [row["id"] for row in read_jsonl(elsewhere / "out" / name)], name
        assert not [i for i in ids if str(ROOT) in i or str(tmp_path.parents[1]) in i or ".jsonl" in i]
    general = [row["id"] for row in read_jsonl(first / "dialogues.jsonl") if row["kind"] == "general"]
    assert general and all(i.startswith("general/") for i in general)


@pytest.mark.slow
def test_killed_build_resumes_with_the_same_records(server, tmp_path):
    greedy = ["personas=[holmes]", "limits.seeds_per_stage=1", "llm.temperature=0", "general_data.path="]
    with FaultProxy(server.base_url) as proxy:
        build(tmp_path / "whole", proxy.url, server.model, *greedy)
    with FaultProxy(server.base_url) as proxy:
        out = tmp_path / "killed"
        args = [
            "build-data",
            "--config",
            str(CONFIG),
            f"out_dir={out}",
            f"llm.base_url={proxy.url}",
            f"llm.model={server.model}",
            *SMALL,
            *greedy,
        ]
        process = subprocess.Popen(
            [sys.executable, "-m", "persllm_jax.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        cache = out / "cache" / "cache.jsonl"
        deadline = time.time() + 600
        while not (cache.is_file() and len(cache.read_text().splitlines()) >= 3):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        answered = [
            json.loads(line)["request"]["messages"] for line in cache.read_text().splitlines() if line
        ]
        result = run_cli(*args, cwd=ROOT)
        # Nothing answered before the kill reaches the server again (a request still in flight at
        # the kill had no answer to keep, so it is sent once more).
        assert answered, "nothing to check"
        assert all(proxy.forwarded_for_messages(m) == 1 for m in answered)
        assert proxy.max_forwarded() <= 2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["llm"]["cache_hits"] >= len(answered)
    assert _annotation_set(out) == _annotation_set(tmp_path / "whole")
    ids = [a["id"] for a in read_jsonl(out / "annotations.jsonl")]
    assert len(ids) == len(set(ids))
    assert "build-data finished" in result.stdout


@pytest.mark.slow
def test_faults_are_retried_and_failures_counted(server, tmp_path):
    faults = {
        "429": 0.1,
        "500": 0.1,
        "503": 0.05,
        "truncate": 0.05,
        "nonjson": 0.05,
        "drop": 0.05,
        "empty": 0.05,
    }
    with FaultProxy(server.base_url, probabilities=faults, seed=3, retry_after=0.5) as proxy:
        # every request for an induced question fails forever; the rest must complete through the faults
        proxy.fail_always("Kind: a question with a false premise", "500")
        out = tmp_path / "out"
        result = build(
            out,
            proxy.url,
            server.model,
            "personas=[holmes]",
            "limits.seeds_per_stage=3",
            "questions.kinds={ordinary: 1, induced: 1}",
            "questions.max_attempts=1",
            "llm.max_retries=8",
            "llm.backoff_s=0.05",  # the induced requests fail all 9 attempts: no minute-long waits
            "llm.backoff_cap_s=0.5",
            "general_data.path=",
        )
        assert sum(proxy.faults.values()) > 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["llm"]["retries_total"] > 0
    assert "build-data finished" in result.stdout
    induced = [a for a in read_jsonl(out / "annotations.jsonl") if a["kind"] == "induced"]
    assert induced, "the seeded kinds drew no induced question"
    assert stats["llm"]["failures"] == len(induced)
    assert induced, "nothing to check"
    assert all(a["dropped"].startswith("question request failed") for a in induced)


def test_malformed_materials_named(tmp_path):
    personas = tmp_path / "personas"
    (personas / "x" / "early").mkdir(parents=True)
    (personas / "x" / "persona.yaml").write_text(
        "name: X\nstages:\n  - {id: early, token: '<TIME-I>'}\n  - {id: late}\n"
    )
    result = run_cli(
        "build-data",
        "--config",
        CONFIG,
        f"personas_dir={personas}",
        f"out_dir={tmp_path}/out",
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "persona.yaml" in result.stderr and "token" in result.stderr


def test_unknown_build_key_named(tmp_path):
    result = run_cli("build-data", "--config", CONFIG, "llm.modle=x", check=False, cwd=ROOT)
    assert result.returncode == 2
    assert "unknown config key 'llm.modle'" in result.stderr and "base_url" in result.stderr


@pytest.mark.slow
def test_a_slow_server_is_not_stormed(server, tmp_path):
    """The real server made slow (one request at a time, 0.2 s more each, abandoned requests still computed):
    a fixed pool of 8 with a 6 s timeout resends while the first copies queue; the adaptive client
    cuts its limit when answers are late, keeps waiting for them instead of sending copies, and finishes
    the build with fewer requests and no failures."""
    stats = {}
    for adaptive in (False, True):
        with FaultProxy(server.base_url, slow_s=0.2) as proxy:
            out = tmp_path / f"adaptive_{adaptive}"
            build(
                out, proxy.url, server.model, "personas=[holmes]", "limits.seeds_per_stage=3",
                "general_data.path=", "llm.concurrency=8", "llm.timeout_s=6",
                # each copy the fixed pool sends is computed (and waited for): five retries make the
                # storm without a minutes-long backlog
                "llm.max_retries=5",
                f"llm.adaptive={str(adaptive).lower()}",
            )  # fmt: skip
            while proxy.server_in_flight:  # count what the server still computes for gone clients
                time.sleep(0.2)
            stats[adaptive] = json.loads((out / "stats.json").read_text())["llm"]
            stats[adaptive]["reached_server"] = proxy.forwarded_total
            timeline = list(proxy.in_flight_timeline)
    fixed, adaptive = stats[False], stats[True]
    assert fixed["retries"].get("timeout", 0) > 0, "the fixed pool must meet the overload"
    assert adaptive["failures"] == 0 and adaptive["answered"] > fixed["answered"], (adaptive, fixed)
    assert adaptive["requests_sent"] < fixed["requests_sent"], (adaptive, fixed)
    assert adaptive["reached_server"] < fixed["reached_server"]
    assert adaptive["concurrency_decreases"] >= 1 and adaptive["late_requests"] >= 1
    # From the moment the limit settled, the server never holds more requests (its own queue included)
    # than that limit.
    since = adaptive["concurrency_settled_since"]
    settled = [n for t, n in timeline if t >= since]
    assert len(settled) >= 10 and max(settled) <= adaptive["concurrency_settled"], (settled, adaptive)
