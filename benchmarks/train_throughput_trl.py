"""The PyTorch children of `train_throughput.py`: torch's own peak matmul rate, and TRL's
`SFTTrainer` and `DPOTrainer` on the same model shape (`LlamaForCausalLM` from the equivalent
`LlamaConfig`, random init), fed random text whose rows all fill the sequence length.

torch, transformers, datasets and trl are imported inside the functions, and the model config is
loaded without the package (`model_config_module`), so that no JAX enters these processes.
"""

from __future__ import annotations

import math
import tempfile
import time

from train_throughput_common import ROOT, OtherLoad, load_result, model_config_module, peak_rss_bytes

TOKENIZER = ROOT / "tests" / "data" / "tokenizer"


# ---------------------------------------------------------------------------------------------
# Child: torch's peak matmul rate.


def child_probe_torch(args) -> dict:
    """Torch's own peak matmul rate in the run's dtype (for reading TRL's numbers; MFU uses JAX's)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = 8192 if cuda else 2048
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = (torch.randn(n, n, generator=gen) / math.sqrt(n)).to(device, dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = math.inf
    for i in range(6):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if i:
            best = min(best, time.perf_counter() - start)
    return {
        "torch_version": torch.__version__,
        "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_peak_flops": 2.0 * n**3 / best,
        "memory_available_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
    }


# ---------------------------------------------------------------------------------------------
# Children: TRL's SFTTrainer and DPOTrainer.


class _Words:
    """Random text from the tokenizer's own whole-word tokens, checked to reach a token count."""

    def __init__(self, tokenizer, seed: int):
        import numpy as np

        vocab = tokenizer.get_vocab()
        self.words = sorted(
            t[1:]
            for t in vocab
            if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and len(t) > 3
        )
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)

    def text(self, min_tokens: int) -> str:
        """At least min_tokens tokens (each word is one token after a space; a few more overall)."""
        n = min_tokens
        while True:
            text = " ".join(self.words[i] for i in self.rng.integers(0, len(self.words), n))
            count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if count >= min_tokens:
                return text
            n += min_tokens - count


def child_trl(args, kind: str, lora_rank: int = 0) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    base_rss = peak_rss_bytes()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mc = model_config_module()
    hf_config = mc.to_hf_config(mc.preset(args.model))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).float()
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    if len(tokenizer) > hf_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; the model {hf_config.vocab_size}")
    words = _Words(tokenizer, seed=0)
    num_steps = args.warmup + args.steps
    rows = args.batch if kind == "sft" else args.batch // 2

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.load, self.step_load, self.per_step = [], OtherLoad(), OtherLoad(), []

        def on_step_begin(self, args_, state, control, **kwargs):
            sync()
            if len(self.times) == args.warmup:
                self.load.start()
            self.step_load = OtherLoad()
            self.step_load.start()
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.start)
            self.per_step.append(self.step_load.stop())
            if len(self.times) == args.warmup + args.steps:
                self.load.stop()

    timer = StepTimer()
    common = dict(
        max_steps=num_steps,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        max_length=args.seq,
        learning_rate=5e-5,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-5,
        max_grad_norm=1.0,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        use_cpu=not cuda,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        if kind == "sft":
            data = datasets.Dataset.from_dict(
                {"text": [words.text(args.seq + 1) for _ in range(rows * num_steps)]}
            )
            config = trl.SFTConfig(output_dir=out_dir, packing=False, dataset_text_field="text", **common)
            peft_config = None
            if lora_rank:  # the same adapters as ours: every projection, alpha = 2 x rank, no dropout
                import peft

                projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                peft_config = peft.LoraConfig(
                    r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=projections,
                    task_type="CAUSAL_LM",
                )  # fmt: skip
            trainer = trl.SFTTrainer(
                model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer],
                peft_config=peft_config,
            )  # fmt: skip
            lengths = [min(len(ids), args.seq) for ids in trainer.train_dataset["input_ids"]]
        else:
            prompt_tokens = max(1, args.seq // 4)
            data = datasets.Dataset.from_list(
                [
                    {
                        "prompt": words.text(prompt_tokens),
                        "chosen": " " + words.text(args.seq),
                        "rejected": " " + words.text(args.seq),
                    }
                    for _ in range(rows * num_steps)
                ]
            )
            config = trl.DPOConfig(
                output_dir=out_dir,
                precompute_ref_log_probs=True,
                precompute_ref_batch_size=rows,
                beta=0.1,
                loss_type=["sigmoid"],
                **common,
            )
            trainer = trl.DPOTrainer(
                model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer]
            )
            lengths = [
                min(len(row["prompt_ids"]) + len(row[side]), args.seq)
                for row in trainer.train_dataset
                for side in ("chosen_ids", "rejected_ids")
            ]
        setup_s = time.perf_counter() - start  # tokenization, and for DPO the reference precompute
        if min(lengths) != args.seq:
            raise RuntimeError(f"some rows are shorter than {args.seq} tokens: {min(lengths)}")
        setup_peak = torch.cuda.max_memory_allocated() if cuda else 0  # the DPO precompute's peak
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "step_times_s": timer.times,
        "losses": losses,
        "tokens_per_step": args.batch * args.seq,
        "setup_s": setup_s,
        "optimizer": str(config.optim),
        "attention": model.config._attn_implementation,
        "gradient_checkpointing": args.trl_gradient_checkpointing,
        **load_result(timer.load, args.steps, timer.per_step),
    }
    if cuda:
        out["peak_memory_bytes"] = max(torch.cuda.max_memory_allocated(), setup_peak)
        out["memory_kind"] = "torch.cuda.max_memory_allocated"
        out["base_memory_bytes"] = None
    else:
        out["peak_memory_bytes"] = peak_rss_bytes()
        out["memory_kind"] = "peak RSS"
        out["base_memory_bytes"] = base_rss
    return out
