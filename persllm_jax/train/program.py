"""The training program built from the run config alone (no weights, no data read): the model's
graph and abstract parameters, the optimizer and schedule, every leaf's sharding, and the jitted
train step. `persllm sft|dpo` runs it; `persllm compile` compiles the same program ahead of time
for a TPU slice to see its memory before paying for one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from persllm_jax.io.pretrained import state_shardings_for
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import abstract_model
from persllm_jax.train.config import RunConfig
from persllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from persllm_jax.train.state import TrainState, abstract_state, init_state, state_shardings, trainable_filter
from persllm_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    mesh: Mesh
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    abstract_params: nnx.State  # shapes and dtypes, each carrying its sharding
    params_shardings: nnx.State
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState  # of the whole train state
    grad_accum_steps: int
    trainable: type  # the kind of parameter that trains (nnx.Param, or nnx.LoRAParam with adapters)
    dropout_seed: int | None = None  # the adapters' dropout masks (None: no dropout)

    def abstract_state(self) -> TrainState:
        """The train state without memory: what a checkpoint restores into, what AOT compiles for."""
        return abstract_state(self.optimizer, self.abstract_params, self.shardings, self.trainable)

    def init_state(self, params: nnx.State) -> TrainState:
        make = lambda p: init_state(p, self.optimizer, self.trainable)  # noqa: E731
        return jax.jit(make, out_shardings=self.shardings)(params)

    def jit_step(self, loss_fn: Callable, batch_shardings, frozen_shardings) -> Callable:
        """The train step, jitted with the state's shardings in and out and the state donated."""
        step = make_train_step(
            self.graphdef,
            loss_fn,
            self.optimizer,
            self.schedule,
            self.grad_accum_steps,
            grad_shardings=self.shardings.params,
            trainable=self.trainable,
            dropout_seed=self.dropout_seed,
        )
        return jax.jit(
            step,
            in_shardings=(self.shardings, batch_shardings, frozen_shardings),
            out_shardings=(self.shardings, None),
            donate_argnums=(0,),
        )


def build_program(
    cfg: RunConfig, model_cfg: ModelConfig, mesh: Mesh, token_rows: tuple[int, ...] = ()
) -> TrainProgram:
    """`token_rows`: the vocabulary rows that learn at `optim.token_lr_multiplier` x lr."""
    graphdef, abstract_params = nnx.split(abstract_model(model_cfg))
    params_shardings = state_shardings_for(abstract_params, mesh)
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps, token_rows)
    trainable = trainable_filter(model_cfg)
    shardings, abstract_sharded_params = state_shardings(
        optimizer, abstract_params, params_shardings, mesh, trainable
    )
    return TrainProgram(
        mesh=mesh,
        model_cfg=model_cfg,
        graphdef=graphdef,
        abstract_params=abstract_sharded_params,
        params_shardings=params_shardings,
        optimizer=optimizer,
        schedule=learning_rate_schedule(cfg.optim, cfg.train.max_steps),
        shardings=shardings,
        grad_accum_steps=cfg.train.grad_accum_steps,
        trainable=trainable,
        dropout_seed=cfg.lora.seed if model_cfg.lora_rank and model_cfg.lora_dropout > 0 else None,
    )
