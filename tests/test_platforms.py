"""A machine with no accelerator runs JAX on the CPU alone, so that libtpu (installed for TPU
compilation) does not fill every command's log with failed TPU start-up; a machine with a TPU or
GPU, or a user's own JAX_PLATFORMS, is left to JAX."""

from __future__ import annotations

import os

from persllm_jax import platforms
from tests.cli_helpers import run_cli, user_environment
from tests.hf_fixtures import save_tiny


def _pci_device(root, name: str, vendor: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "vendor").write_text(vendor + "\n")


def test_a_tpu_chip_or_an_accelerator_node_is_found(tmp_path):
    pci, dev = tmp_path / "pci", tmp_path / "dev"
    dev.mkdir()
    _pci_device(pci, "0000:00:04.0", "0x8086")  # an Intel bridge: not an accelerator
    assert not platforms.has_accelerator(str(pci), (str(dev / "nvidia[0-9]*"),))
    (dev / "nvidia0").touch()
    assert platforms.has_accelerator(str(pci), (str(dev / "nvidia[0-9]*"),))
    _pci_device(pci, "0000:00:05.0", "0x1ae0")  # Google's vendor id: a TPU chip
    assert platforms.has_accelerator(str(pci), ())


def test_only_a_machine_without_accelerators_is_pinned_to_the_cpu(tmp_path, monkeypatch):
    pci = tmp_path / "pci"
    _pci_device(pci, "0000:00:05.0", "0x1ae0")
    monkeypatch.delenv("JAX_PLATFORMS")
    platforms.cpu_alone_without_accelerators(pci_root=str(pci), dev_patterns=())
    assert "JAX_PLATFORMS" not in os.environ  # a TPU host: JAX picks
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    platforms.cpu_alone_without_accelerators(pci_root=str(tmp_path / "none"), dev_patterns=())
    assert os.environ["JAX_PLATFORMS"] == "cuda,cpu"  # the user's choice stands
    monkeypatch.delenv("JAX_PLATFORMS")
    platforms.cpu_alone_without_accelerators(pci_root=str(tmp_path / "none"), dev_patterns=())
    assert os.environ["JAX_PLATFORMS"] == "cpu"


def test_a_command_on_this_cpu_writes_no_libtpu_start_up_errors(tmp_path):
    """Run as a user runs it: no JAX_PLATFORMS and no TPU settings (the tests' own are removed);
    ALLOW_MULTIPLE_LIBTPU_LOAD stays, so libtpu would start here even while another process holds it."""
    assert not platforms.has_accelerator(), "this test describes a machine without accelerators"
    save_tiny("llama_tied_gqa", tmp_path / "src")
    result = run_cli(
        "import-hf", tmp_path / "src", tmp_path / "out", env=user_environment(), replace_env=True
    )
    output = result.stdout + result.stderr
    for debris in ("TPU accelerator type", "worker hostname", "InitGoogle", "libtpu"):
        assert debris not in output, output
    assert (tmp_path / "out").is_dir()
