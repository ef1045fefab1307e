"""All four judge steps against the real `transformers serve` (SmolLM2-135M) on loopback, then the report.

A 135M judge often ignores the format, so the test checks that results are well formed and fully counted,
not what the judge decided. A counting proxy in front of the server shows that a second run sends nothing.
"""

import json

import pytest

from persllm_jax.evaluation import JudgeSettings, collect_metrics, run_judge, write_report
from persllm_jax.evaluation.judge.parsing import LABELS, SCORE_MAX, SCORE_MIN
from persllm_jax.llm.endpoint import EndpointConfig
from tests.fault_proxy import FaultProxy

# Short replies keep a CPU-served 135M model fast; SmolLM2 names the label after ~15 tokens of preamble
# and a ranking needs room for a small JSON list.
SETTINGS = JudgeSettings(
    label_max_tokens=24, score_max_tokens=12, yes_no_max_tokens=4, rank_max_tokens=48, max_answer_chars=300
)
ITEMS = [
    {
        "item_id": "holmes-early-1",
        "persona": "holmes",
        "stage": "early",
        "kind": "ordinary",
        "question": "Where do you live?",
        "reference": "At 221B Baker Street, which I share with Dr Watson.",
        "answers": {"base": "I live in a small flat.", "sft": "Baker Street, 221B, with my friend Watson."},
    },
    {
        "item_id": "holmes-early-2",
        "persona": "holmes",
        "stage": "early",
        "kind": "induced",
        "question": "Why did you give up detective work to become a baker?",
        "reference": "A baker? Nonsense. I have never given up my work, and I never shall.",
        "answers": {
            "base": "I love baking bread every morning.",
            "sft": "I was never a baker; the work is my life.",
        },
    },
]
MODELS = ["base", "sft"]


def answer_records():
    records = []
    for item in ITEMS:
        for model, answer in item["answers"].items():
            fields = {k: v for k, v in item.items() if k != "answers"}
            records.append(
                {
                    **fields,
                    "model": model,
                    "as_persona": "holmes",
                    "as_stage": "early",
                    "sample": 0,
                    "answer": answer,
                }
            )
    return records


@pytest.fixture(scope="module")
def server(smollm2_transformers_server):
    return smollm2_transformers_server


def judge(url, model, cache_dir):
    return run_judge(
        answer_records(),
        # the server answers one request at a time; queued ones wait
        EndpointConfig(base_url=url, model=model, concurrency=2, timeout_s=300.0),
        cache_dir,
        settings=SETTINGS,
        persona_names={"holmes": "Sherlock Holmes"},
        models=MODELS,
        progress=False,
    )


def assert_counts_add_up(counts):
    assert counts["asked"] == counts["parsed"] + counts["unparsed"] + counts["failed"], counts
    assert min(counts["parsed"], counts["unparsed"], counts["failed"]) >= 0


@pytest.mark.slow
def test_judge_end_to_end_on_real_server(server, tmp_path):
    cache_dir = tmp_path / "judge_cache"
    with FaultProxy(server.base_url) as proxy:
        first = judge(proxy.url, server.model, cache_dir)
        sent = proxy.forwarded_total

        judgments = first["judgments"]
        assert judgments, "nothing to check"
        assert all(j["ok"] for j in judgments), [j["error"] for j in judgments if not j["ok"]]
        # (a) one classification per item, each a known label or counted as unparsed
        classify = [j for j in judgments if j["step"] == "classify"]
        assert sorted(j["item_id"] for j in classify) == [i["item_id"] for i in ITEMS]
        assert classify, "nothing to check"
        assert all(j["value"] in (*LABELS, None) for j in classify)
        cls = first["classification"]
        assert cls["asked"] == 2 and cls["failed"] == 0
        assert_counts_add_up(cls)
        assert sum(cls["counts"].values()) == cls["parsed"]
        labels = {j["item_id"]: j["value"] for j in classify}
        for model in MODELS:
            summary = first["models"][model]
            # (b) every answer is scored with its item's rubric, or counted as not scored
            for key in ("knowledge", "attitude"):
                assert_counts_add_up(summary[key])
                assert summary[key]["asked"] == sum(v == key for v in labels.values())
                if summary[key]["parsed"]:
                    assert SCORE_MIN <= summary[key]["mean"] <= SCORE_MAX
            scored = summary["knowledge"]["asked"] + summary["attitude"]["asked"]
            assert scored + summary["not_scored"]["neither"] + summary["not_scored"]["unlabelled"] == len(
                ITEMS
            )
            # (c) the one induced item
            induction = summary["anti_induction"]
            assert induction["asked"] == 1 and induction["yes"] + induction["no"] == induction["parsed"]
            assert_counts_add_up(induction)
            assert induction["rate"] in (None, 0.0, 1.0)
            # (d) both items ranked, or counted as unparsed
            assert summary["ranking"]["n_ranked"] <= len(ITEMS)
            assert set(summary["by_persona"]) == {"holmes"}
        for j in judgments:
            if j["step"].startswith("score_") and j["value"] is not None:
                assert SCORE_MIN <= j["value"] <= SCORE_MAX
            if j["step"] == "rank":
                assert sorted(j["letters"]) == ["A", "B"] and sorted(j["letters"].values()) == MODELS
                if j["value"] is not None:
                    assert sorted(e["model"] for e in j["value"]) == MODELS
                    assert all(1 <= e["rank"] <= 2 for e in j["value"])
        ranking = first["ranking"]
        assert ranking["asked"] == len(ITEMS) and ranking["failed"] == 0
        assert_counts_add_up(ranking)
        assert all(first["models"][m]["ranking"]["n_ranked"] == ranking["parsed"] for m in MODELS)
        for row in first["parse_counts"]:
            assert_counts_add_up(row)
        asked = sum(row["asked"] for row in first["parse_counts"])
        assert first["client"]["requests_sent"] == sent == asked == len(judgments)

        # A second run is answered from the cache: nothing reaches the server, results are identical.
        second = judge(proxy.url, server.model, cache_dir)
        assert proxy.forwarded_total == sent
        assert second["client"]["requests_sent"] == 0 and second["client"]["cache_hits"] == asked
        assert second["judgments"] == first["judgments"]
        assert {k: v for k, v in second.items() if k != "client"} == {
            k: v for k, v in first.items() if k != "client"
        }

    written = write_report(
        tmp_path / "report", collect_metrics(MODELS, judge=first), title="Judge smoke test"
    )
    assert json.loads(written["json"].read_text())["judge"]["ranking"]["asked"] == len(ITEMS)
    assert "## Judge parse counts" in written["md"].read_text()
