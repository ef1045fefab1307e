"""HF -> ours -> HF: identical weights, identical logits in transformers, no loading warnings."""

import json
import logging

import numpy as np
import pytest
import transformers

from persllm_jax import load_pretrained, save_pretrained
from persllm_jax.io import hf_weights
from persllm_jax.io.safetensors_file import SafetensorsFile
from tests import hf_fixtures


def _state_dict(directory):
    source = hf_weights.SafetensorsDir(directory)
    return {name: np.asarray(source.get(name)) for name in source.names()}


def _load_hf_quietly(directory, caplog):
    with caplog.at_level(logging.WARNING):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    bad = [
        r.getMessage()
        for r in caplog.records
        if "newly initialized" in r.getMessage()
        or "not used" in r.getMessage()
        or "MISSING" in r.getMessage()
        or "UNEXPECTED" in r.getMessage()
    ]
    assert not bad, bad
    return model.eval()


@pytest.mark.parametrize(
    "variant",
    [
        "llama_tied_gqa",
        "llama_untied_mqa",
        "qwen2",
        "mistral",
        "llama_attention_bias",
        "qwen3_tied_head_dim",
        "qwen3_untied_bias",
        "gemma3_sliding",
        "mistral_sliding",
    ],
)
def test_round_trip_identical(variant, tmp_path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    source_model = hf_fixtures.save_tiny(variant, src)
    model, _ = load_pretrained(src)
    save_pretrained(model, None, out)

    source_tensors, exported = _state_dict(src), _state_dict(out)
    assert sorted(exported) == sorted(source_tensors)
    for name, tensor in source_tensors.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    for name in ("config.json", "generation_config.json"):
        assert (out / name).is_file()

    reloaded = _load_hf_quietly(out, caplog)
    ids = np.random.RandomState(0).randint(0, 320, (2, 24))
    np.testing.assert_array_equal(
        hf_fixtures.torch_logits(reloaded, ids), hf_fixtures.torch_logits(source_model, ids)
    )


def test_sharded_export_loads(tmp_path, caplog):
    """Export split into several safetensors files with an index; transformers reads them."""
    src, out = tmp_path / "src", tmp_path / "out"
    source_model = hf_fixtures.save_tiny("llama_untied_mqa", src)
    model, _ = load_pretrained(src)
    save_pretrained(model, None, out, max_shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3
    for file in files:  # every shard but oversized single tensors stays under the limit
        f = SafetensorsFile(out / file)
        if len(f.keys()) > 1:
            assert (out / file).stat().st_size < 40_000 + 4096
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    reloaded = _load_hf_quietly(out, caplog)
    ours, _ = load_pretrained(out)  # and our loader reads the sharded layout back
    ids = np.random.RandomState(1).randint(0, 320, (1, 16))
    np.testing.assert_array_equal(
        hf_fixtures.torch_logits(reloaded, ids), hf_fixtures.torch_logits(source_model, ids)
    )
    np.testing.assert_array_equal(np.asarray(ours.embed[...]), np.asarray(model.embed[...]))


def test_bf16_export(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    hf_fixtures.save_tiny("llama_tied_gqa", src)
    import jax.numpy as jnp

    model, _ = load_pretrained(src, dtype=jnp.bfloat16)
    save_pretrained(model, None, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = SafetensorsFile(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert exported.dtype(name).name == "bfloat16"
    source = np.asarray(SafetensorsFile(src / "model.safetensors").get(name))
    np.testing.assert_array_equal(
        np.asarray(exported.get(name)).astype(np.float32),
        source.astype(exported.dtype(name)).astype(np.float32),
    )
