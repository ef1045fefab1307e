"""The run config of `persllm sft` and `persllm dpo`: one frozen dataclass per concern."""

from __future__ import annotations

import dataclasses

from persllm_jax.model.config import DEFAULT_LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = ""  # HF dir, .gguf file, persllm model dir or run dir; or empty with `preset`
    # random initialization: tiny | tiny_qwen3 | tiny_gemma3 | smollm2_135m | llama3_1b | llama3_8b |
    # llama3_70b | qwen3_8b | qwen3_32b | gemma3_12b | gemma3_27b
    preset: str = ""
    tokenizer: str = ""  # tokenizer (HF dir or .gguf) when `preset` is used
    dtype: str = "float32"  # parameter and optimizer-state dtype
    compute_dtype: str = "float32"  # matmul dtype: float32 | bfloat16
    remat: str = "full"  # none | full | dots
    attention_impl: str = "xla"  # xla | cudnn (GPU) | splash (TPU; Pallas interpret mode elsewhere)
    add_tokens: tuple[str, ...] = ()  # special tokens to add, e.g. the stage tokens
    seed: int = 0  # initialization seed for presets


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0  # 0: train every weight; > 0: train low-rank adapters only, the base frozen
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank, as PEFT scales it
    # regular expressions over the projections' paths (layers/attn/q_proj, ..., layers/mlp/down_proj)
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # the fraction of each adapter's input dropped in a training step, as PEFT's lora_dropout
    # (the masks follow from lora.seed and the step, so a resumed run draws the same ones)
    dropout: float = 0.0
    seed: int = 0  # initialization of the adapters' A matrices, and the dropout masks
    # "added": the embedding rows of model.add_tokens (the stage tokens, which start untrained and
    # alike) train with the adapters; "none": they stay as they start
    train_embeddings_rows: str = "added"
    # QLoRA: the frozen base's projection kernels stored as "int8" (a scale per output channel) or
    # "nf4" (4-bit NormalFloat, a scale per 64 inputs) and dequantized into model.compute_dtype
    base_quantization: str = "none"


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str  # JSONL / Parquet file or a `datasets` directory
    repeats: float = 1.0  # how many times the source is seen per epoch (fractions sample)
    split: str = "train"  # rows whose `split` field differs are skipped; "" keeps all


@dataclasses.dataclass(frozen=True)
class DataSection:
    sources: tuple[DataSource, ...] = ()
    shuffle_seed: int = 0
    workers: int = 2  # background tokenizing threads per batch row


@dataclasses.dataclass(frozen=True)
class TrainSection:
    max_steps: int = 100
    batch_size: int = 16  # rows per optimizer step, over all hosts (unpacked: sequences, DPO pairs)
    seq_len: int = 3000  # tokens per row (DPO: per side; packed DPO fills a chosen and a rejected row)
    packing: bool = True  # several examples per row, each attending only to itself
    packing_bins: int = 8  # rows the best-fit packer fills at once
    max_segments: int = 64  # most examples (DPO: pairs) in one packed row
    grad_accum_steps: int = 1
    log_every: int = 1
    logits_chunk: int = 512  # sequence positions per chunk of the vocabulary projection in the loss
    stop_after: int = 0  # leave (with a checkpoint) after this step; the same command resumes
    allow_config_change: bool = False  # resume even when optim / data / model / dpo settings changed


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 5e-5
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of lr
    weight_decay: float = 0.1
    # false: norm weights and biases are not decayed (as Hugging Face and TRL train); true decays all
    decay_norms_and_biases: bool = False
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0
    # The embedding (and untied output) rows of `token_lr_tokens` learn at lr x this: the stage
    # tokens start as one shared row and must move apart within a short run. Tokens: empty means
    # model.add_tokens.
    token_lr_multiplier: float = 1.0
    token_lr_tokens: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MeshSection:
    # sizes within one slice; -1 takes the devices the other axes leave
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # slices joined by the data-center network (TPU multi-slice; GPU: hosts) along data / fsdp
    dcn_data: int = 1
    dcn_fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 500
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class OnPolicySection:
    """Pairs of the starting model's own answers (rejected) against written ones (chosen), sampled
    before the first step (train/tasks/on_policy.py)."""

    dialogues: str = ""  # an SFT dialogues file whose train-split questions it answers; "": none
    kinds: tuple[str, ...] = ("induced",)  # which dialogues (their `kind`): false premises by default
    repeats: float = 1.0  # times an epoch, as a data source's
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0  # row i samples with seed + i


@dataclasses.dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0
    # cached (log-probs computed once) | frozen (a second model in memory) | base (LoRA runs: the
    # policy with its adapters off, in the step, no second copy of the weights)
    reference: str = "cached"
    # A pair and its mirror (the same question and answers, chosen and rejected swapped, under
    # another prompt: a cross-stage pair at the other stage) in the same row of the same step, so
    # that what the two pairs share cancels in the step's gradient and what tells their prompts
    # apart remains (packed DPO only)
    mirrors_together: bool = False
    # The chosen answers' negative log-likelihood (mean over their tokens) added to the preference
    # loss with this weight: TRL's `loss_type: [sigmoid, sft]` with `loss_weights: [1, w]` (once
    # `rpo_alpha`). DPO alone tends to lower the chosen answers' likelihood with the rejected ones';
    # this keeps them likely under their own prompt.
    sft_weight: float = 0.0
    on_policy: OnPolicySection = OnPolicySection()


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every_steps: int = 0  # held-out evaluation before step 1 and every this many steps (0: never)
    sources: tuple[DataSource, ...] = ()  # empty: the `test` split of the training sources
    # Persona probes at each evaluation (eval/probes/*), for the personas of the run that have them
    with_probes: bool = True
    probes: tuple[
        str, ...
    ] = ()  # probe files; empty = <personas_dir>/<persona>/probes.jsonl of the run's personas
    personas_dir: str = "examples/personas"


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator_address: str = ""  # host:port; empty = JAX_COORDINATOR_ADDRESS or single process
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    dpo: DPOSection = DPOSection()
    eval: EvalSection = EvalSection()
    distributed: DistributedSection = DistributedSection()
