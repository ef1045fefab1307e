"""Bad checkpoints fail with messages that name the file or tensor and what was expected."""

import json
import struct

import pytest

from persllm_jax import load_pretrained
from persllm_jax.io.hf_weights import WeightMismatchError
from persllm_jax.io.safetensors_file import SafetensorsError
from persllm_jax.model.config import UnsupportedModelError
from tests import hf_fixtures
from tests.cli_helpers import run_cli


@pytest.fixture
def tiny_dir(tmp_path):
    hf_fixtures.save_tiny("llama_tied_gqa", tmp_path / "model")
    return tmp_path / "model"


def test_truncated_safetensors(tiny_dir):
    path = tiny_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: tensor '.*' .*truncated or corrupt"):
        load_pretrained(tiny_dir)


def test_garbage_header(tiny_dir):
    path = tiny_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"not json at all" + b"\0" * 64)
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: header is not valid JSON"):
        load_pretrained(tiny_dir)


def test_missing_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors file in .*model"):
        load_pretrained(tiny_dir)


def test_missing_shard_named_in_index(tiny_dir):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002\.safetensors is listed in .*index"):
        load_pretrained(tiny_dir)


def test_unsupported_architecture(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError,
        match="GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, "
        "Qwen3ForCausalLM, Gemma3ForCausalLM",
    ):
        load_pretrained(tiny_dir)


def test_multimodal_gemma3_refused(tmp_path):
    hf_fixtures.save_tiny("gemma3_sliding", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Gemma3ForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError, match=r"Gemma3ForConditionalGeneration.*\(Gemma 3's text model only\)"
    ):
        load_pretrained(tmp_path)


def test_soft_capped_logits_refused(tmp_path):
    hf_fixtures.save_tiny("gemma3_sliding", tmp_path, final_logit_softcapping=30.0)
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping=30.0 is not supported"):
        load_pretrained(tmp_path)


def test_sliding_window_layers_need_xla_attention(tmp_path):
    hf_fixtures.save_tiny("mistral_sliding", tmp_path)
    with pytest.raises(ValueError, match="attention_impl='cudnn' does not run sliding-window layers yet"):
        load_pretrained(tmp_path, attention_impl="cudnn")


def test_shape_mismatch_names_tensor_and_shapes(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["intermediate_size"] = 128  # the weights have 96
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightMismatchError,
        match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' in .*model\.safetensors has shape \[96, 64\], expected \[128, 64\]",
    ):
        load_pretrained(tiny_dir)


def test_unexpected_tensor(tiny_dir):
    import numpy as np

    from persllm_jax.io import safetensors_file

    source = safetensors_file.SafetensorsFile(tiny_dir / "model.safetensors")
    tensors = {name: np.asarray(source.get(name)) for name in source.keys()}
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    safetensors_file.write(tiny_dir / "model.safetensors", tensors)
    with pytest.raises(
        WeightMismatchError, match=r"unexpected tensors \['model\.layers\.0\.self_attn\.q_norm\.weight'\]"
    ):
        load_pretrained(tiny_dir)


def test_cli_reports_error_without_traceback(tiny_dir, tmp_path):
    (tiny_dir / "model.safetensors").unlink()
    result = run_cli("import-hf", tiny_dir, tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "persllm import-hf: error: no *.safetensors file in" in result.stderr
    assert "Traceback" not in result.stderr
