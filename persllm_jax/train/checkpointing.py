"""Training checkpoints with Orbax: train state, data position, model config and tokenizer.

Layout of a run directory:
    persllm_model.json, tokenizer/     written once when the run starts (what the model is)
    checkpoints/<step>/params          parameters (also what `load_pretrained(run_dir)` reads); a LoRA
                                       run keeps only its adapters here and rebuilds its base from the
                                       recipe in persllm_model.json
    checkpoints/<step>/opt_state       optimizer state, as a flat list of arrays
    checkpoints/<step>/data            JSON: step, data position, batch size and seeds
    checkpoints/<step>/rows            JSON per process: the input pipeline's state of each batch row

Restore order: the latest finished step under checkpoints/ (Orbax only renames a step directory
into place once every item is written, so a run killed mid-save resumes from the step before).
Saves are asynchronous; `wait` blocks until the last one is on disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from persllm_jax.train.state import TrainState, trained

log = logging.getLogger(__name__)


class RowStatesHandler(ocp.CheckpointHandler):
    """Each process writes the input-pipeline states of its batch rows to its own file; a restore
    reads every file, so each process finds its rows whatever the number of processes was."""

    def save(self, directory, args: RowStatesSave):
        path = Path(directory) / f"rows_{jax.process_index()}.json"
        path.write_text(json.dumps(args.states))

    def restore(self, directory, args: RowStatesRestore | None = None) -> dict[str, Any]:
        states: dict[str, Any] = {}
        for path in sorted(Path(directory).glob("rows_*.json")):
            states.update(json.loads(path.read_text()))
        return states

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(RowStatesHandler, for_save=True)
@dataclasses.dataclass
class RowStatesSave(ocp.args.CheckpointArgs):
    states: dict


@ocp.args.register_with_handler(RowStatesHandler, for_restore=True)
@dataclasses.dataclass
class RowStatesRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int, every_steps: int):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        self.every_steps = every_steps
        # The parameters a checkpoint holds: those that train (all, or a LoRA run's adapters). The
        # loop sets it once the model is known; the frozen rest comes from the run's base on restore.
        self.trainable = nnx.Param
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True, save_interval_steps=1
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "data", "rows")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int, max_steps: int) -> bool:
        return step == max_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, state: TrainState, data: dict, rows: dict) -> None:
        params = nnx.to_pure_dict(trained(state.params, self.trainable))
        opt_leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state.opt_state))}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_leaves),
                data=ocp.args.JsonSave(data),
                rows=RowStatesSave(rows),
            ),
            force=True,
        )
        log.info("checkpoint of step %d started in %s", step, self.directory)

    def restore(self, step: int, abstract_state: TrainState, base=None) -> tuple[TrainState, dict, dict]:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStruct leaves). When only
        some parameters train (LoRA), the others come from `base()`: the run's starting parameters."""
        saved = trained(abstract_state.params, self.trainable)
        opt_leaves, opt_def = jax.tree.flatten(abstract_state.opt_state)
        opt_target = {str(i): leaf for i, leaf in enumerate(opt_leaves)}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nnx.to_pure_dict(saved)),
                opt_state=ocp.args.StandardRestore(opt_target),
                data=ocp.args.JsonRestore(),
                rows=RowStatesRestore(),
            ),
        )
        params = jax.tree.map(lambda x: x, saved)
        nnx.replace_by_pure_dict(params, restored["params"])
        if self.trainable is not nnx.Param:
            if base is None:
                raise ValueError("this checkpoint holds only the trained parameters; give the base")
            params = nnx.merge_state(params, nnx.split_state(base(), self.trainable, ...)[1])
        opt_state = jax.tree.unflatten(
            opt_def, [restored["opt_state"][str(i)] for i in range(len(opt_leaves))]
        )
        data = dict(restored["data"])
        state = TrainState(step=abstract_state.step, params=params, opt_state=opt_state)
        return state, data, dict(restored["rows"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
