"""Which JAX platforms a command starts. With libtpu installed (the `tpu` and `test` extras carry it
for TPU compilation), JAX tries a TPU backend on every machine, and on one with no TPU chip libtpu
fills the log with accelerator-type and worker-hostname errors before JAX falls back to the CPU.
A machine with no accelerator of any kind therefore runs on the CPU alone; anything else, and any
JAX_PLATFORMS the user gave, is left to JAX. Compiling for a TPU slice (`persllm compile`) loads
libtpu by itself and is not affected."""

from __future__ import annotations

import glob
import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips
ACCELERATOR_NODES = (
    "/dev/accel*",  # TPU v2-v4
    "/dev/vfio/[0-9]*",  # TPU v5 and later
    "/dev/nvidia[0-9]*",
    "/dev/nvidiactl",
    "/dev/kfd",  # AMD GPUs
    "/dev/dxg",  # GPUs under WSL2
)


def has_accelerator(pci_root: str = "/sys/bus/pci/devices", dev_patterns=ACCELERATOR_NODES) -> bool:
    """True where a TPU chip sits on the PCI bus or any accelerator's device node exists."""
    for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return any(glob.glob(pattern) for pattern in dev_patterns)


def cpu_alone_without_accelerators(**where) -> None:
    """Before any device is touched: JAX_PLATFORMS=cpu when the machine has no accelerator (set in the
    environment too, so the processes this one starts agree, and in JAX's config for a JAX already
    imported)."""
    if os.environ.get("JAX_PLATFORMS") or has_accelerator(**where):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")
