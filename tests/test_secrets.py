"""API keys: a config can point at an environment variable (`api_key: env:NAME`), and the
pipeline writes such pointers, never keys, into the configs it hands its steps."""

from __future__ import annotations

import pytest
import yaml

from persllm_jax.builder.config import BuildConfig
from persllm_jax.llm.endpoint import resolve_api_key
from persllm_jax.pipeline.runner import Pipeline, PipelineConfig


def test_env_pointers_resolve_and_name_a_missing_variable(monkeypatch):
    monkeypatch.setenv("PERSLLM_TEST_KEY", "sk-abc")
    assert resolve_api_key("env:PERSLLM_TEST_KEY") == "sk-abc"
    assert resolve_api_key("sk-literal") == "sk-literal" and resolve_api_key("") is None
    monkeypatch.delenv("PERSLLM_TEST_KEY")
    with pytest.raises(ValueError, match="environment variable PERSLLM_TEST_KEY is not set"):
        resolve_api_key("env:PERSLLM_TEST_KEY")


def test_the_pipeline_moves_keys_into_the_steps_environment(tmp_path):
    runner = Pipeline(PipelineConfig(out_dir=str(tmp_path)))
    path = runner._write_config(
        "build-data", {"llm": {"model": "m"}}, BuildConfig, ["llm.api_key=sk-secret-1"]
    )
    text = path.read_text()
    assert "sk-secret-1" not in text
    assert yaml.safe_load(text)["llm"]["api_key"] == "env:PERSLLM_BUILD_DATA_LLM_API_KEY"
    assert runner.step_env == {"PERSLLM_BUILD_DATA_LLM_API_KEY": "sk-secret-1"}
