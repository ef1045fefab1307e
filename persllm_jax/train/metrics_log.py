"""Where training metrics go: metrics.jsonl, TensorBoard, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Process 0 writes; other processes hold a disabled log."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        if resume_step is not None:
            self._drop_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # TensorBoard events are optional; metrics.jsonl is always written
            return
        self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def _drop_after(self, step: int) -> None:
        # Steps logged after the checkpoint we resume from are about to be trained again.
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items() if self._writer is not None else ():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key.replace("=", "_"), value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_title(task: str, run_dir: Path) -> str:
    """A plot title that names the run: `SFT run demo/sft` (its directory and the one above)."""
    run_dir = Path(run_dir).resolve()
    return f"{task.upper()} run {run_dir.parent.name}/{run_dir.name}"


def plot_loss(metrics_path: Path, out_png: Path, title: str) -> Path | None:
    """Loss (and, for DPO, reward accuracy) against step: training per step, held-out as points."""
    records = read_metrics(metrics_path) if metrics_path.exists() else []
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["loss"] + (["rewards/accuracies"] if any("rewards/accuracies" in r for r in records) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(
            [r["step"] for r in records if key in r], [r[key] for r in records if key in r], label="train"
        )
        held = [r for r in records if f"eval/{key}" in r]
        if held:
            ax.plot([r["step"] for r in held], [r[f"eval/{key}"] for r in held], "o-", label="held-out")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
