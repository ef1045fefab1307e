"""`persllm import-hf --add-tokens` then `persllm export-hf`: the stage tokens survive into HF."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from persllm_jax import load_pretrained
from persllm_jax.io.hf_weights import SafetensorsDir
from tests import hf_fixtures
from tests.cli_helpers import run_cli

STAGE_TOKENS = ["<TIME-I>", "<TIME-II>", "<TIME-III>"]


@pytest.mark.parametrize("tied", [True, False])
def test_added_tokens_round_trip(tied, tmp_path, smollm2_tokenizer):
    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "out"
    variant = "llama_tied_gqa" if tied else "llama_untied_mqa"
    hf_fixtures.save_tiny(variant, src, vocab_size=len(smollm2_tokenizer))
    smollm2_tokenizer.save_pretrained(src)
    old_vocab = len(smollm2_tokenizer)

    # relative paths, as a user types them
    run_cli("import-hf", "src", "ckpt", "--add-tokens", ",".join(STAGE_TOKENS), cwd=tmp_path)
    run_cli("export-hf", "ckpt", "out", cwd=tmp_path)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.convert_tokens_to_ids(STAGE_TOKENS)
    assert ids == [old_vocab, old_vocab + 1, old_vocab + 2]
    for token, token_id in zip(STAGE_TOKENS, ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert token in tokenizer.all_special_tokens or tokenizer.added_tokens_decoder[token_id].special
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template

    source, exported = SafetensorsDir(src), SafetensorsDir(out)
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in names:
        before, after = np.asarray(source.get(name)), np.asarray(exported.get(name))
        assert after.shape == (old_vocab + 3, before.shape[1])
        np.testing.assert_array_equal(after[:old_vocab], before)
        for token_id in ids:  # new rows start at the mean of the existing ones (1e-6: mean in fp32)
            np.testing.assert_allclose(after[token_id], before.mean(axis=0), atol=1e-6, rtol=0)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_model.config.vocab_size == old_vocab + 3
    messages = [
        {"role": "system", "content": "<TIME-II> You are Elizabeth Bennet."},
        {"role": "user", "content": "What do you think of Mr Darcy?"},
    ]
    text_ids = np.asarray([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)])
    assert ids[1] in text_ids
    ours, our_tokenizer = load_pretrained(ckpt)
    assert our_tokenizer.convert_tokens_to_ids(STAGE_TOKENS) == ids
    np.testing.assert_allclose(
        np.asarray(ours(jnp.asarray(text_ids))),
        hf_fixtures.torch_logits(hf_model, text_ids),
        atol=1e-4,
        rtol=0,
    )


def test_tokens_already_there_keep_their_rows(tmp_path, smollm2_tokenizer):
    """Adding the stage tokens again (DPO starting from an SFT run lists them too) leaves their
    trained rows alone; only a token the tokenizer lacks gets the mean row."""
    import jax

    from persllm_jax.io.vocabulary import add_special_tokens

    src = tmp_path / "src"
    hf_fixtures.save_tiny("llama_untied_mqa", src, vocab_size=len(smollm2_tokenizer))
    smollm2_tokenizer.save_pretrained(src)
    run_cli("import-hf", src, tmp_path / "ckpt", "--add-tokens", ",".join(STAGE_TOKENS))
    model, tokenizer = load_pretrained(tmp_path / "ckpt")
    ids = tokenizer.convert_tokens_to_ids(STAGE_TOKENS)
    # stand-in for what SFT learned: distinct values in the stage rows of both tables
    trained = np.random.default_rng(0).normal(size=(len(ids), model.cfg.hidden_size)).astype(np.float32)
    model.embed[...] = model.embed[...].at[jnp.asarray(ids)].set(trained)
    model.lm_head[...] = model.lm_head[...].at[:, jnp.asarray(ids)].set(trained.T)
    embed_before, head_before = np.asarray(model.embed[...]), np.asarray(model.lm_head[...])

    again = add_special_tokens(model, tokenizer, STAGE_TOKENS + ["<TIME-IV>"])
    new_id = tokenizer.convert_tokens_to_ids("<TIME-IV>")
    assert new_id == len(embed_before) and again.cfg.vocab_size == len(embed_before) + 1
    embed, head = np.asarray(jax.device_get(again.embed[...])), np.asarray(jax.device_get(again.lm_head[...]))
    np.testing.assert_array_equal(embed[: len(embed_before)], embed_before)
    np.testing.assert_array_equal(head[:, : len(embed_before)], head_before)
    np.testing.assert_allclose(embed[new_id], embed_before.mean(axis=0), atol=1e-6, rtol=0)
    np.testing.assert_allclose(head[:, new_id], head_before.mean(axis=1), atol=1e-6, rtol=0)
    assert add_special_tokens(again, tokenizer, STAGE_TOKENS) is again  # nothing new: unchanged
