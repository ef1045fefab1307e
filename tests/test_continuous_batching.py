"""Continuous batching over the paged KV cache: requests that arrive while others decode, sampled
rows that join mid-stream, the prefix cache, and the page pool's bookkeeping.

The SmolLM2 tests compare with transformers' greedy `generate` run on each prompt alone (fp32,
token for token), with the same request run alone through our generator (sampled: the same
tokens), and with a cold prefill (logits within 1e-5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax import load_pretrained
from persllm_jax.inference.generation import Generator
from persllm_jax.inference.kv_pages import OutOfPages, PagePool
from persllm_jax.inference.sampling import SamplingParams
from persllm_jax.inference.scheduler import Request
from tests.echo_generator import EchoGenerator

NEW_TOKENS = 24
PERSONA = (
    "You are Sherlock Holmes, consulting detective of 221B Baker Street, at the early stage of your "
    "career. Answer as Holmes would: clipped, precise, drawing conclusions from small details."
)
QUESTIONS = [
    "What is the capital of France?",
    "Describe your morning routine.",
    "Hi",
    "Which instrument do you play, and why does it help you think when a case is difficult?",
    "Name three colours that a painter of the sea would need.",
    "What would you deduce from a muddy boot?",
    # long enough to prefill in several 128-token chunks, each reading the ones before from pages
    "A stranger calls at Baker Street in the evening. His left boot is splashed with a reddish clay, "
    "his right cuff is worn shiny along its edge, and a ticket for the morning train from Reading "
    "shows at his waistcoat pocket. He carries a walking stick with a chipped silver band, and his "
    "hat, though new, has been brushed against the nap by someone in a hurry. He says he is a clerk "
    "who has never left London, that he writes all day with his left hand, and that he has come "
    "about a missing brother who was last seen at a hotel near the river. His hands are brown to "
    "the wrist, and there is a faint smell of tar about his coat. Explain, in a few sentences and "
    "with care, how a careful observer can tell where this stranger has travelled from, which of "
    "his statements you doubt, and what you would ask him first before taking the case.",
    "Who is Watson?",
]


def _conversation(question: str, persona: bool = True) -> list[dict]:
    system = [{"role": "system", "content": PERSONA}] if persona else []
    return [*system, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir):
    model, tokenizer = load_pretrained(smollm2_hf_dir, dtype=jnp.float32)
    return model, tokenizer


def _run_staggered(gen: Generator, prompts, params, arrivals) -> dict[int, object]:
    """Add prompt i once the scheduler has run `arrivals[i]` steps; step until all are done."""
    done: dict[int, object] = {}
    steps = 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == steps:
                gen.scheduler.add(
                    Request(prompts[i], params[i], on_done=lambda c, i=i: done.__setitem__(i, c))
                )
        gen.scheduler.step()
        steps += 1
    return done


@pytest.mark.slow
def test_greedy_requests_arriving_at_different_times_equal_transformers(smollm2, smollm2_hf_dir):
    """8 prompts of different lengths (with and without a persona prompt, one of two 128-token
    prefill chunks), arriving over 30 steps into 4 slots: rows join and leave while others decode; each
    reply equals transformers' greedy generation of that prompt alone."""
    import torch
    import transformers

    model, tokenizer = smollm2
    gen = Generator(model, tokenizer, max_batch=4, prefill_chunk=128)
    conversations = [_conversation(q, persona=i % 3 != 2) for i, q in enumerate(QUESTIONS)]
    prompts = [gen.encode_chat(c) for c in conversations]
    assert len({len(p) for p in prompts}) == len(prompts)
    assert max(map(len, prompts)) > 128 + 64, "a prompt of two chunks, each tiled over the pages before it"
    arrivals = [0, 0, 3, 5, 9, 14, 22, 30]
    params = [SamplingParams(max_new_tokens=NEW_TOKENS)] * len(prompts)
    ours = _run_staggered(gen, prompts, params, arrivals)

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, torch_dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = out[0, len(prompt) :].tolist()
        expected = expected[: next((k for k, t in enumerate(expected) if t in gen.eos_ids), len(expected))]
        assert ours[i].token_ids == expected, (
            i,
            tokenizer.decode(ours[i].token_ids),
            tokenizer.decode(expected),
        )
    assert gen.pages.stats.hits > 0, "the persona prompt is shared: later rows reuse its pages"
    assert not gen.scheduler.rows and gen.pages.available == gen.pages.capacity


@pytest.mark.slow
def test_a_sampled_row_that_joins_mid_stream_draws_what_it_draws_alone(smollm2):
    model, tokenizer = smollm2
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=11)
    others = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=40, seed=3)
    gen = Generator(model, tokenizer, max_batch=4)
    joiner = gen.encode_chat(_conversation(QUESTIONS[5]))
    alone = gen.complete([joiner], sampled)[0]

    busy = Generator(model, tokenizer, max_batch=4)
    prompts = [busy.encode_chat(_conversation(q)) for q in QUESTIONS[:3]] + [joiner]
    joined = _run_staggered(busy, prompts, [others, others, others, sampled], [0, 0, 0, 7])
    assert joined[3].token_ids == alone.token_ids, (tokenizer.decode(joined[3].token_ids), alone.text)
    assert len(alone.token_ids) > 5
    # and the rows beside it did not all draw the same thing (the seeds differ per request)
    assert len({tuple(joined[i].token_ids) for i in range(3)}) == 3


@pytest.mark.slow
def test_prefix_cache_hits_give_the_logits_of_a_cold_prefill(smollm2):
    """A second persona prompt reuses the first one's cached pages; its first-token logits equal a
    cold prefill's within 1e-5 when both compute in the same 16-token chunks (the cached keys and
    values are the ones a cold prefill computes), and within 1e-4 of a cold prefill in one chunk
    (fp32 sums in another order: the tolerance of every fp32 logit check in this project)."""
    model, tokenizer = smollm2
    warm = Generator(model, tokenizer, max_batch=2, prefill_chunk=16)
    cold = Generator(model, tokenizer, max_batch=2, prefill_chunk=16, prefix_cache=False)
    one_chunk = Generator(model, tokenizer, max_batch=2, prefix_cache=False)
    first, second = (warm.encode_chat(_conversation(q)) for q in QUESTIONS[:2])
    shared = next(k for k, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 32, "the persona prompt makes a long shared prefix"
    greedy = SamplingParams(max_new_tokens=4)
    warm.complete([first], greedy)
    assert warm.pages.stats.hits == 0
    hit = warm.complete([second], greedy, keep_first_logits=True)[0]
    assert hit.cached_tokens == shared // 16 * 16 and warm.pages.stats.hits == 1
    assert warm.pages.stats.tokens_saved == hit.cached_tokens
    for reference, tolerance in ((cold, 1e-5), (one_chunk, 1e-4)):
        expected = reference.complete([second], greedy, keep_first_logits=True)[0]
        assert expected.cached_tokens == 0 and reference.pages.stats.hits == 0
        np.testing.assert_allclose(hit.first_logits, expected.first_logits, atol=tolerance, rtol=0)
        assert hit.token_ids == expected.token_ids


@pytest.mark.slow
def test_a_burst_sharing_a_prompt_prefix_computes_it_once(smollm2):
    """Four persona requests sent together: the first prefills alone, the other three wait until
    its blocks are cached and read the persona prompt from there (three hits), and every answer is
    the one a generator without a prefix cache gives (greedy, token for token)."""
    model, tokenizer = smollm2
    warm = Generator(model, tokenizer, max_batch=4)
    cold = Generator(model, tokenizer, max_batch=4, prefix_cache=False)
    prompts = [warm.encode_chat(_conversation(q)) for q in QUESTIONS[:4]]
    shared = min(next(k for k, (a, b) in enumerate(zip(prompts[0], p)) if a != b) for p in prompts[1:])
    assert shared > 32, "the persona prompt makes a long shared prefix"
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    burst = warm.complete(prompts, greedy)
    assert [c.cached_tokens for c in burst] == [0] + [shared // 16 * 16] * 3
    assert warm.pages.stats.hits == 3 and warm.pages.stats.tokens_saved == 3 * (shared // 16 * 16)
    alone = cold.complete(prompts, greedy)
    assert [c.token_ids for c in burst] == [c.token_ids for c in alone]


def test_a_request_waits_for_the_prefix_a_prefilling_row_will_cache():
    """On the real scheduler (a stand-in model): a request whose prompt a prefilling row will mostly
    cache waits for it while keeping a slot, then reads the shared blocks from the cache; one that
    would gain a single block does not wait; one cancelled while waiting ends as cancelled; and an
    admission that fails midway loses no waiting request and leaves the failed row to `abort`."""
    gen = EchoGenerator(delay_s=0, max_batch=2, max_length=256)
    scheduler = gen.scheduler
    done = {}

    def request(name: str, system: str, question: str) -> Request:
        prompt = gen.encode_chat(
            [{"role": "system", "content": system}, {"role": "user", "content": question}]
        )
        return Request(prompt, SamplingParams(max_new_tokens=4), on_done=lambda c: done.__setitem__(name, c))

    long_system = "You are Holmes. " * 6  # 96 characters: six 16-token blocks
    a, b, c = (
        request("a", long_system, "one?"),
        request("b", long_system, "two?"),
        request("c", "x", "three?"),
    )
    for r in (a, b, c):
        scheduler.add(r)
    scheduler.step()  # a prefills; b waits for its blocks and keeps the second slot from c
    assert [row.request for row in scheduler.rows] == [a] and list(scheduler.waiting) == [b, c]
    while len(done) < 3:
        scheduler.step()
    assert (done["a"].cached_tokens, done["b"].cached_tokens, done["c"].cached_tokens) == (0, 96, 0)

    # a single shared block (16 of 120 tokens to compute) is not worth a wait
    d, e = request("d", "y" * 16, "four? " * 16), request("e", "y" * 16, "five? " * 16)
    scheduler.add(d)
    scheduler.add(e)
    scheduler.step()
    assert [row.request for row in scheduler.rows] == [d, e]
    while len(done) < 5:
        scheduler.step()

    cancelled = {"f": False}
    f, g = request("f", "You are Watson. " * 6, "six?"), request("g", "You are Watson. " * 6, "seven?")
    g.cancelled = lambda: cancelled["f"]
    scheduler.add(f)
    scheduler.add(g)
    scheduler.step()
    assert list(scheduler.waiting) == [g]
    cancelled["f"] = True
    while len(done) < 7:
        scheduler.step()
    assert done["g"].finish_reason == "cancelled" and done["f"].finish_reason != "cancelled"

    h, i = request("h", "z" * 96, "eight?"), request("i", "z" * 96, "nine?")
    reset_seen = scheduler.reset_seen

    def failing(slot, prompt):
        if prompt == h.prompt:
            raise RuntimeError("the device ran out of memory")
        reset_seen(slot, prompt)

    scheduler.reset_seen = failing
    scheduler.add(h)
    scheduler.add(i)
    with pytest.raises(RuntimeError, match="out of memory"):
        scheduler.step()
    assert list(scheduler.waiting) == [i] and [row.request for row in scheduler.rows] == [h]
    assert scheduler.abort(RuntimeError("model call failed")) == 1 and not scheduler.rows


def test_page_pool_shares_prefix_blocks_and_evicts_the_least_recently_used():
    pool = PagePool(num_pages=7, page_size=4)  # 6 usable pages
    a = list(range(10))  # blocks [0..3], [4..7], then 2 tokens
    pages_a, cached = pool.acquire(a, 12)
    assert cached == 0 and len(pages_a) == 3 and 0 not in pages_a
    pool.register(a, pages_a)
    b = a[:8] + [99, 98, 97]  # the same two full blocks
    pages_b, cached = pool.acquire(b, 12)
    assert cached == 8 and pages_b[:2] == pages_a[:2] and pages_b[2] not in pages_a
    pool.release(pages_a)
    pool.release(pages_b)
    assert pool.available == 6  # the two shared blocks stay cached, idle
    c = [50 + i for i in range(20)]  # needs 5 pages: evicts the least recently used idle block first
    pages_c, cached = pool.acquire(c, 20)
    assert cached == 0 and pool.stats.evictions == 1
    with pytest.raises(OutOfPages):
        pool.acquire([1, 2, 3, 4, 5], 8)  # 2 pages needed, 1 left
    pool.release(pages_c)
    again, cached = pool.acquire(a, 12)
    assert cached == 4, "the second block was evicted, the first (used more recently) was not"
    # a prompt that is all cached blocks still computes its last token
    d = a[:8]
    pool.register(a, again)
    _, cached = pool.acquire(d, 12)
    assert cached == 4
