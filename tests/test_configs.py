"""Every YAML under configs/ parses; bad keys and values are named."""

from pathlib import Path

import pytest

from persllm_jax import configlib
from persllm_jax.configlib import ConfigError
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.presets import preset
from persllm_jax.train.config import RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def config_class_for(path: Path):
    if path.name.startswith("data_"):
        from persllm_jax.builder.config import BuildConfig

        return BuildConfig
    if path.name.startswith(("demo", "personify")):
        from persllm_jax.pipeline import PipelineConfig

        return PipelineConfig
    if path.name.startswith("eval_"):
        from persllm_jax.evaluation.config import EvalConfig

        return EvalConfig
    if path.name.startswith("talk_"):
        from persllm_jax.inference.talk import TalkConfig

        return TalkConfig
    return RunConfig


@pytest.mark.parametrize("name", ["demo.yaml", "demo_smoke.yaml", "personify_cpu.yaml"])
def test_pipeline_step_overrides_fit_their_configs(name):
    """Each step's base file plus the pipeline's overrides is a valid config of that step."""
    from persllm_jax.builder.config import BuildConfig
    from persllm_jax.evaluation.config import EvalConfig
    from persllm_jax.pipeline import PipelineConfig

    cfg = configlib.load(PipelineConfig, CONFIG_DIR / name)
    for section, cls in (
        (cfg.build, BuildConfig),
        (cfg.sft, RunConfig),
        (cfg.dpo, RunConfig),
        (cfg.eval, EvalConfig),
    ):
        base = configlib.load(cls, CONFIG_DIR.parent / section.config) if section.config else None
        data = configlib.to_dict(base) if base else {"out_dir": "x"}
        configlib.from_dict(cls, configlib.apply_overrides(data, section.overrides))
    with pytest.raises(ConfigError, match="unknown config key 'sft.overides'"):
        configlib.load(PipelineConfig, CONFIG_DIR / name, ["sft.overides=[]"])


def test_there_are_configs():
    assert CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_parses(path):
    config = configlib.load(config_class_for(path), path)
    assert configlib.from_dict(type(config), configlib.to_dict(config)) == config


def test_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\ntrain: {max_steps: 3}\n")
    config = configlib.load(
        RunConfig, path, ["train.max_steps=8", "mesh.fsdp=2", "optim.lr=1e-4", "model.add_tokens=<A>,<B>"]
    )
    assert (config.train.max_steps, config.mesh.fsdp, config.optim.lr) == (8, 2, 1e-4)
    assert config.model.add_tokens == ("<A>", "<B>")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.max_stepz'; valid keys here: max_steps, batch_size"
    ):
        configlib.load(RunConfig, path, ["train.max_stepz=8"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got 'many'"):
        configlib.load(RunConfig, path, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        configlib.load(RunConfig, path, ["train.max_steps"])
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        configlib.load(RunConfig, path)


def test_an_unknown_key_is_blamed_on_where_it_was_given(tmp_path):
    """A bad key on the command line names that override, not the YAML file; one in the file
    names the file."""
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\ntrain: {max_steps: 3}\n")
    with pytest.raises(ConfigError) as err:
        configlib.load(RunConfig, path, ["train.batch_size=4", "train.max_stepz=8", "mesh.fsdp=2"])
    assert str(err.value).startswith("command-line override 'train.max_stepz=8': unknown config key")
    assert "run.yaml" not in str(err.value)
    path.write_text("run_dir: runs/x\ntrain: {max_stepz: 3}\n")
    with pytest.raises(ConfigError) as err:
        configlib.load(RunConfig, path, ["train.batch_size=4"])
    assert str(err.value).startswith(f"{path}: unknown config key 'train.max_stepz'")


def test_model_presets_and_validation():
    assert preset("smollm2_135m").num_params == 134_515_008  # SmolLM2-135M's published count
    assert preset("llama3_8b").num_params == 8_030_261_248  # Llama-3-8B's published count
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        preset("gpt5")
    with pytest.raises(ValueError, match="num_heads 6 is not a multiple of num_kv_heads 4"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"unknown model config keys \['hidden'\]"):
        ModelConfig.from_dict({"hidden": 3})
