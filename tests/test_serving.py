"""`persllm serve`: the OpenAI-compatible server.

Fast tests drive the HTTP layer and the batching worker in-process around `EchoGenerator`
(tests/echo_generator.py), the real scheduler over a stand-in model that can fail on demand (a
real model cannot be made to fail a call). Slow tests start the real `persllm serve` on SmolLM2-135M in a subprocess
and talk to it with the `openai` client and with `persllm build-data`.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from persllm_jax.inference import serving
from tests.browser import chromium_page
from tests.cli_helpers import run_cli
from tests.echo_generator import EchoGenerator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo_server():
    generator = EchoGenerator()
    with serving.ServerThread(generator, model_name="echo", batch_window_s=0.2) as server:
        server.generator = generator
        yield server


def client_for(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, **kwargs)


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# Request parsing


def test_parse_request_defaults_and_aliases():
    body = {"messages": say("hi"), "max_tokens": 5, "max_completion_tokens": 7, "top_k": -1, "foo": 1}
    request = serving.parse_request(body)
    assert request.max_tokens == 7 and request.top_k == 0
    assert request.temperature == 1.0 and request.top_p == 1.0 and request.repetition_penalty == 1.0
    assert request.stop == () and request.stream is False
    seeds = {serving.parse_request({"messages": say("hi")}).seed for _ in range(8)}
    assert len(seeds) > 1, "without a seed every request samples with a fresh one"
    assert serving.parse_request({"messages": say("hi"), "seed": 3, "stop": "x"}).stop == ("x",)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert serving.parse_request({"messages": [{"role": "developer", "content": parts}]}).messages == [
        {"role": "system", "content": "ab"}
    ]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"messages": say("hi"), "n": 2}, "n=1"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": say("hi"), "max_tokens": 0}, "max_tokens"),
        ({"messages": say("hi"), "temperature": "hot"}, "temperature"),
        ({"messages": say("hi"), "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ],
)
def test_parse_request_rejects(body, words):
    with pytest.raises(serving.RequestError) as err:
        serving.parse_request(body)
    assert err.value.status == 400 and words in err.value.message


# ---------------------------------------------------------------------------------------------
# HTTP layer and batching, in-process around EchoGenerator


def test_plain_and_streamed_replies(echo_server):
    client = client_for(echo_server)
    reply = client.chat.completions.create(model="echo", messages=say("hello there"), max_tokens=30)
    assert reply.object == "chat.completion" and reply.model == "echo"
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len("echo: hello there")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            messages=say("hello there"),
            model="echo",
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    short = client.chat.completions.create(model="echo", messages=say("hello there"), max_tokens=4)
    assert short.choices[0].message.content == "echo" and short.choices[0].finish_reason == "length"
    status, stopped = http_json(  # without "model": accepted
        echo_server.base_url + "/chat/completions", {"messages": say("hello there"), "stop": ["th"]}
    )
    assert status == 200 and stopped["choices"][0]["message"]["content"] == "echo: hello "


def test_models_health_and_errors(echo_server):
    client = client_for(echo_server)
    assert [m.id for m in client.models.list().data] == ["echo"]
    status, body = http_json(echo_server.base_url.removesuffix("/v1") + "/health")
    assert status == 200 and body["status"] == "ok"

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=say("hi"))
    assert "'echo'" in err.value.body["message"] and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="echo", messages=say("hi"), n=2)
    assert "n=1" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="echo", messages=say("x" * 80))
    assert "maximum context length is 64" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="echo", messages=say("hi"), max_tokens=60)
    assert "60 in the completion" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # checked before the stream starts
        client.chat.completions.create(model="echo", messages=say("hi"), top_p=1.5, stream=True)
    assert "top_p" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="echo", messages=say("BADTEMPLATE"))
    assert "alternate" in err.value.body["message"]
    status, body = http_json(echo_server.base_url + "/chat/completions", {"messages": "hi"})
    assert status == 400 and set(body["error"]) >= {"message", "type"}
    status, body = http_json(echo_server.base_url + "/nowhere")
    assert status == 404 and "message" in body["error"]
    for page in ("/docs", "/openapi.json"):  # the interactive pages are off unless --docs
        status, _ = http_json(echo_server.base_url.removesuffix("/v1") + page)
        assert status == 404, page


def test_failed_batch_answers_500_and_the_server_goes_on(echo_server):
    client = client_for(echo_server)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="echo", messages=say("FAIL please"))
    assert "injected generation failure" in err.value.body["message"]
    with pytest.raises(openai.APIError, match="injected generation failure"):
        list(client.chat.completions.create(model="echo", messages=say("FAIL please"), stream=True))
    assert client.chat.completions.create(model="echo", messages=say("ok")).choices[0].message.content == (
        "echo: ok"
    )


def test_concurrent_requests_share_a_batch(echo_server):
    client = client_for(echo_server)
    words = [f"word{i}" for i in range(6)]

    def ask(word):
        stream = word.endswith(("1", "3"))
        if stream:
            chunks = client.chat.completions.create(model="echo", messages=say(word), stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model="echo", messages=say(word)).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(words)) as pool:
        answers = list(pool.map(ask, words))
    assert answers == [f"echo: {w}" for w in words]
    assert max(echo_server.generator.batch_sizes) > 1, echo_server.generator.batch_sizes


def test_server_process_reports_a_bad_model_path(tmp_path):
    server = serving.ServerProcess(tmp_path / "missing", startup_timeout=120)
    with pytest.raises(RuntimeError, match="model path does not exist"):
        server.start()
    assert server.process is None


# ---------------------------------------------------------------------------------------------
# The real `persllm serve` on SmolLM2-135M

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    # Over 128 prompt tokens: batched with the others, it pads them to a longer length bucket.
    "Here is some context about the sea. " * 20 + "Summarise it in one sentence.",
]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_gguf):
    with serving.ServerProcess(smollm2_gguf, model_name="smollm2", max_batch=4) as server:
        yield server


def greedy(client, question: str, max_tokens: int = 16) -> str:
    reply = client.chat.completions.create(
        model="smollm2", messages=say(question), max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content


@pytest.mark.slow
def test_smollm2_plain_and_stream(smollm2_server):
    client = client_for(smollm2_server, timeout=300)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    reply = client.chat.completions.create(
        model="smollm2", messages=say(QUESTIONS[0]), max_tokens=16, temperature=0
    )
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.usage.prompt_tokens > 10
    assert 0 < reply.usage.completion_tokens <= 16
    chunks = list(
        client.chat.completions.create(
            model="smollm2", messages=say(QUESTIONS[0]), max_tokens=16, temperature=0, stream=True
        )
    )
    assert len(chunks) > 3, "the reply should arrive in several chunks"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    # Sampling is seeded per request: the same seed gives the same text.
    sampled = [
        client.chat.completions.create(
            model="smollm2", messages=say(QUESTIONS[2]), max_tokens=12, temperature=1.0, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.slow
def test_smollm2_bad_requests(smollm2_server):
    client = client_for(smollm2_server, timeout=300)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="smollm2", messages=say("hi"), n=2)
    with pytest.raises(openai.NotFoundError, match="smollm2"):
        client.chat.completions.create(model="gpt-4-turbo", messages=say("hi"))
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192"):
        client.chat.completions.create(model="smollm2", messages=say("word " * 9000))
    with pytest.raises(openai.BadRequestError, match="in the completion"):
        client.chat.completions.create(model="smollm2", messages=say("hi"), max_tokens=9000)


@pytest.mark.slow
def test_smollm2_concurrent_greedy_equals_single(smollm2_server):
    client = client_for(smollm2_server, timeout=300)
    single = [greedy(client, q) for q in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: greedy(client, q), QUESTIONS))
    assert together == single
    beside = [int(n) for n in re.findall(r"; (\d+) running;", smollm2_server.log_tail(100_000))]
    assert max(beside) > 0, f"concurrent requests never ran together: {beside}"


@pytest.mark.slow
def test_build_data_against_persllm_serve(smollm2_server, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "build-data",
        "--config",
        ROOT / "configs" / "data_demo.yaml",
        f"out_dir={out}",
        f"llm.base_url={smollm2_server.base_url}",
        "llm.model=smollm2",
        "llm.max_tokens=64",
        "llm.concurrency=4",
        "llm.timeout_s=600",
        "limits.seeds_per_stage=1",
        "personas=[holmes, elizabeth]",
        "retrieval.objective_words=120",
        "retrieval.subjective_words=60",
        f"general_data.path={ROOT}/tests/data/general.jsonl",
        f"personas_dir={ROOT}/examples/personas",
        "reference.include=false",  # only what the served annotator wrote
        cwd=ROOT,
    )
    assert "build-data finished" in result.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["seeds"] == 4 and stats["llm"]["requests_sent"] > 0
    assert stats["llm"]["failures"] == 0, stats["llm"]
    dialogues = [json.loads(line) for line in (out / "dialogues.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    keys = {"id", "persona", "stage", "kind", "messages", "analysis", "seed_id", "split"}
    assert dialogues, "nothing to check"
    assert all(set(d) == keys for d in dialogues)
    assert stats["dialogues"] == sum(d["kind"] != "general" for d in dialogues)
    pair_keys = {"id", "persona", "stage", "source", "prompt", "chosen", "rejected", "split"}
    assert pairs, "nothing to check"
    assert all(set(p) == pair_keys for p in pairs) and stats["pairs"] == len(pairs)
    assert re.search(r"; [1-9]\d* running;", smollm2_server.log_tail(200_000)), "never two rows at once"


# ---------------------------------------------------------------------------------------------
# Under load and faults


def test_a_flood_over_the_queue_gets_429_and_every_admitted_request_is_answered():
    generator = EchoGenerator(delay_s=0.02, max_batch=2)
    with serving.ServerThread(generator, model_name="echo", max_queue=3, batch_window_s=0.01) as server:
        url = server.base_url + "/chat/completions"

        def ask(i):
            body = json.dumps({"messages": say(f"q{i}")}).encode()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read()), None
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read()), err.headers.get("Retry-After")

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, range(16)))
    refused = [r for r in results if r[0] == 429]
    answered = [(i, r) for i, r in enumerate(results) if r[0] == 200]
    assert refused and answered, [r[0] for r in results]
    assert {r[0] for r in results} == {200, 429}  # nothing else: no 500, no timeout
    assert all(r[2] == "1" and "--max-queue 3" in r[1]["error"]["message"] for r in refused)
    assert all(r[1]["choices"][0]["message"]["content"] == f"echo: q{i}" for i, r in answered)


def test_a_streaming_client_that_leaves_stops_its_row():
    generator = EchoGenerator(delay_s=0.05)
    question = "a long question that takes a while to echo"
    with serving.ServerThread(generator, model_name="echo", batch_window_s=0.01) as server:
        stream = client_for(server).chat.completions.create(model="echo", messages=say(question), stream=True)
        chunks = iter(stream)
        for _ in range(4):
            next(chunks)
        stream.close()  # the client goes away mid-reply
        deadline = time.monotonic() + 10
        while server.engine.cancelled_rows == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        full = len("echo: " + question)
        assert server.engine.cancelled_rows >= 1
        (drawn,) = [n for text, n in generator.drawn.items() if question in text]
        assert 3 <= drawn < full - 5, drawn
        # the slot is free again and the server goes on serving
        assert not generator.scheduler.rows
        assert (
            client_for(server)
            .chat.completions.create(model="echo", messages=say("hi"))
            .choices[0]
            .message.content
            == "echo: hi"
        )


def test_an_api_key_is_required_when_set():
    with serving.ServerThread(EchoGenerator(), model_name="echo", api_key="sk-right") as server:
        wrong = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.chat.completions.create(model="echo", messages=say("hi"))
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        status, body = http_json(server.base_url + "/chat/completions", {"messages": say("hi")})  # no key
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0)
        assert (
            right.chat.completions.create(model="echo", messages=say("hi")).choices[0].message.content
            == "echo: hi"
        )
        status, body = http_json(server.base_url.removesuffix("/v1") + "/health")
        assert status == 200


def test_a_dead_worker_fails_requests_instead_of_hanging(echo_server):
    client = client_for(echo_server, timeout=30)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="echo", messages=say("DIE now"))
    assert err.value.status_code == 503 and "worker died" in err.value.body["message"]
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="echo", messages=say("hi"))
    assert err.value.status_code == 503
    status, _ = http_json(echo_server.base_url.removesuffix("/v1") + "/health")
    assert status == 503


# ---------------------------------------------------------------------------------------------
# The chat page, in Debian's Chromium (headless, driven by playwright)

PERSONAS = ROOT / "examples" / "personas"
ARTIFACTS = ROOT / "test-artifacts"


def expected_system_prompt(persona_id: str, stage_id: str) -> str:
    from persllm_jax.personas.materials import load_personas
    from persllm_jax.personas.prompts import system_prompt

    persona = next(p for p in load_personas(PERSONAS) if p.id == persona_id)
    return system_prompt(persona, next(s for s in persona.stages if s.id == stage_id))


def wait_for_replies(page, n: int) -> list:
    """The page's assistant messages once `n` are complete; fails on an error the page shows."""
    page.wait_for_function(
        "!document.getElementById('error').hidden || "
        f"document.querySelectorAll(\"#messages li.assistant[data-done='true']\").length >= {n}",
        timeout=300_000,
    )
    assert page.is_hidden("#error"), page.inner_text("#error")
    return page.locator("#messages li.assistant").all()


@pytest.mark.slow
def test_chat_page_streams_a_persona_and_switches_stage(smollm2_server):
    """The real server and model: pick Holmes early, see the system prompt the page sends, get a
    streamed reply, switch to the late stage for the next turn, then ask the last question again
    at the other stage. The page's requests carry each stage's system prompt and the history."""
    sent = []
    with chromium_page() as page:
        page.on(
            "request",
            lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None,
        )
        page.goto(smollm2_server.base_url.removesuffix("/v1") + "/")
        page.wait_for_function("document.querySelectorAll('#persona option').length === 3")
        page.select_option("#persona", "holmes")
        page.select_option("#stage", "early")
        early, late = (expected_system_prompt("holmes", s) for s in ("early", "late"))
        assert page.input_value("#system") == early
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#input", "Who are you, and where do you live?")
        page.click("#send")
        (first,) = wait_for_replies(page, 1)
        assert first.get_attribute("data-stage") == "early"
        assert int(first.get_attribute("data-chunks")) > 1, "the reply arrived in one piece, not streamed"
        reply = first.locator(".text").inner_text()
        assert reply.strip()

        page.select_option("#stage", "late")
        assert page.input_value("#system") == late
        page.fill("#input", "What has changed since?")
        page.click("#send")
        wait_for_replies(page, 2)
        page.click("#compare")
        replies = wait_for_replies(page, 3)
        assert [r.get_attribute("data-stage") for r in replies] == ["early", "late", "early"]
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)
    history = [
        {"role": "user", "content": "Who are you, and where do you live?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "What has changed since?"},
    ]
    assert [r["messages"] for r in sent] == [
        [{"role": "system", "content": early}, history[0]],
        [{"role": "system", "content": late}, *history],
        [{"role": "system", "content": early}, *history],
    ]
    assert all(r["stream"] and r["temperature"] == 0 and r["max_tokens"] == 24 for r in sent)
    assert (ARTIFACTS / "chat_page.png").stat().st_size > 10_000


def test_chat_page_asks_for_the_api_key():
    echo = EchoGenerator(max_length=1024)  # room for a persona's system prompt
    with serving.ServerThread(echo, model_name="echo", api_key="sk-right", personas_dir=PERSONAS) as server:
        root = server.base_url.removesuffix("/v1")
        status, body = http_json(root + "/ui/personas")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        with chromium_page() as page:
            page.goto(root + "/")
            page.wait_for_selector("#key-needed", state="visible")
            assert page.locator("#persona option").count() == 0
            page.fill("#api-key", "sk-wrong")
            page.dispatch_event("#api-key", "change")
            page.wait_for_timeout(500)
            assert page.is_visible("#key-needed") and page.locator("#persona option").count() == 0
            page.fill("#api-key", "sk-right")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelectorAll('#persona option').length === 3")
            assert not page.is_visible("#key-needed")
            page.fill("#input", "hello")
            page.click("#send")
            (reply,) = wait_for_replies(page, 1)
            assert reply.locator(".text").inner_text() == "echo: hello"
