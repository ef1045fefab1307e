"""Test setup: 8 fake CPU devices, offline Hugging Face, shared model fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TPU topologies are only compiled for here: the test process and `persllm compile` subprocesses
# may all load libtpu at once.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    return hf_fixtures.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct dequantized from the offline GGUF into an HF directory (once)."""
    return hf_fixtures.gguf_to_hf_dir(hf_fixtures.smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2_hf"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="session")
def sft_reference_run(tmp_path_factory):
    """`persllm sft` on the tiny config, 8 steps in one go on 8 devices (fsdp 8): the run the
    resume, mesh and process tests must reproduce."""
    from tests.train_runs import EIGHT_DEVICES, train

    run_dir = tmp_path_factory.mktemp("sft_reference") / "run"
    train("sft", run_dir, env=EIGHT_DEVICES)
    return run_dir
