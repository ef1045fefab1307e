"""Golden DPO numbers from TRL's DPOTrainer for tests/test_dpo_trl_parity.py.

Run by hand (needs torch, transformers, trl, datasets; CPU is enough, a few seconds):

    python tests/assets/make_dpo_golden.py

Writes tests/assets/dpo_golden/: a word-level ChatML tokenizer, a tiny Llama policy and a different tiny
Llama reference (fp32 safetensors), four conversational preference pairs, and golden.json with, per DPO
configuration, the metrics TRL logs for its first step (computed before any update) and the token ids it
fed the models.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from persllm_jax.train.tasks.dpo_loss import DPO_METRICS  # noqa: E402  (after the offline flags)

OUT = Path(__file__).resolve().parent / "dpo_golden"
BETA = 0.1
# (loss_type, label_smoothing) runs; each is one TRL step on the same four pairs. "sigmoid+sft" is
# TRL's loss_type=[sigmoid, sft] with loss_weights=[1, SFT_WEIGHT] (our dpo.sft_weight).
RUNS = [
    ("sigmoid", 0.0),
    ("sigmoid", 0.1),
    ("ipo", 0.0),
    ("hinge", 0.0),
    ("robust", 0.1),
    ("sigmoid+sft", 0.0),
]
SFT_WEIGHT = 0.5
METRICS = ("loss", *DPO_METRICS)

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = """
system user assistant you are a an the i me my we our it is was be to of and in on at for with from
by as or not no yes do does did can will would should could may might must have has had what who where
when why how which this that these those there here now then today tomorrow yesterday always never
often sometimes very much many more most less few some any all every each other same different good
bad great small big old young new long short happy sad kind cold warm hot quiet loud fast slow early
late poet teacher student king queen soldier farmer doctor writer friend mother father child river
mountain sea sky sun moon star tree flower city village home school book letter song poem war peace
love time day night year life world heart mind word name story answer question help know think feel
see say tell give take make go come write read speak listen live learn teach remember forget believe
hope wish like want need please thank sorry hello goodbye well just also only still again so but if
because about into over under after before ask am
""".split()

# SmolLM2's ChatML template without its default system message: every message renders as
# <|im_start|>{role}\n{content}<|im_end|>\n, and the generation prompt is <|im_start|>assistant\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _system(text):
    return {"role": "system", "content": text}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


PAIRS = [
    {
        "prompt": [_system("you are an old poet"), _user("what is love")],
        "chosen": [_assistant("love is a river that never forget the sea")],
        "rejected": [_assistant("i do not know")],
    },
    {
        "prompt": [_system("you are a kind teacher"), _user("how do i learn to read")],
        "chosen": [_assistant("read a small book every day and ask me when you need help")],
        "rejected": [_assistant("you can not learn")],
    },
    {
        "prompt": [_system("you are the king of a small village"), _user("who are you")],
        "chosen": [_assistant("i am the king and this village is my home")],
        "rejected": [_assistant("i am a doctor from the city and i like fast song very much")],
    },
    {
        "prompt": [_system("you are a quiet farmer"), _user("what do you think about war")],
        "chosen": [_assistant("war is bad i hope for peace")],
        "rejected": [_assistant("war is good")],
    },
]


def build_tokenizer():
    """A word-level ChatML tokenizer; newline is its own token so the template round-trips."""
    import tokenizers
    import transformers
    from tokenizers import AddedToken, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "\n", *WORDS])}
    assert len(vocab) == len(SPECIAL_TOKENS) + 1 + len(WORDS), "duplicate words"
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
    )


def build_model(tokenizer, seed):
    """A tiny fp32 Llama; large init so log-probs differ clearly between policy and reference."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.float32).eval()


def torch_sequence_logps(model, prompt_ids, completion_ids):
    """Summed log-probs of the completion tokens given the prompt, with a plain forward (a cross-check)."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


def run_trl(loss_type, label_smoothing, tokenizer, policy_dir, reference_dir):
    """One DPOTrainer step; returns its logged metrics, the exact loss, and the batch it fed the models."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    captured = {}

    class CapturingDPOTrainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            if "batch" not in captured:
                captured["batch"] = {
                    k: inputs[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask")
                }
            loss = super()._compute_loss(model, inputs, return_outputs)
            captured.setdefault("loss", float((loss[0] if return_outputs else loss).detach()))
            return loss

    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            output_dir=out_dir,
            beta=BETA,
            loss_type=loss_type.split("+"),
            loss_weights=[1.0, SFT_WEIGHT] if "+" in loss_type else None,
            label_smoothing=label_smoothing,
            per_device_train_batch_size=len(PAIRS),
            max_steps=1,
            learning_rate=0.0,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=0,
            disable_dropout=True,
            precompute_ref_log_probs=False,
            disable_tqdm=True,
        )
        trainer = CapturingDPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )
        trainer.train()
        tokenized = [
            {key: list(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for row in trainer.train_dataset
        ]
    logged = trainer.state.log_history[0]
    metrics = {name: float(logged[name]) for name in METRICS}
    return metrics, captured, tokenized


def check_batch(batch, tokenized):
    """The fed batch is [chosen rows; rejected rows] of prompt + completion, right-padded, in some order."""
    rows = []
    for ids, mask, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        n = sum(mask)
        rows.append((tuple(ids[:n]), tuple(completion[:n])))
    expected = set()
    for pair in tokenized:
        for key in ("chosen_ids", "rejected_ids"):
            ids = pair["prompt_ids"] + pair[key]
            expected.add((tuple(ids), tuple([0] * len(pair["prompt_ids"]) + [1] * len(pair[key]))))
    assert set(rows) == expected, "the batch TRL fed the model is not prompt_ids + completion ids"
    assert all(0 not in ids for ids, _ in rows), "a word is missing from the vocabulary (<unk> = 0)"


def main():
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(OUT / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(OUT / "tokenizer")  # what the test loads
    # Reference seed 3: two of the four pairs have chosen reward > rejected, so accuracies is 0.5.
    for name, seed in (("policy", 0), ("reference", 3)):
        build_model(tokenizer, seed).save_pretrained(OUT / name)
    with open(OUT / "pairs.jsonl", "w") as f:
        for pair in PAIRS:
            f.write(json.dumps(pair) + "\n")

    policy = transformers.AutoModelForCausalLM.from_pretrained(OUT / "policy", dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        OUT / "reference", dtype=torch.float32
    ).eval()

    runs, tokenized, batch = [], None, None
    for loss_type, label_smoothing in RUNS:
        metrics, captured, run_tokenized = run_trl(
            loss_type, label_smoothing, tokenizer, OUT / "policy", OUT / "reference"
        )
        check_batch(captured["batch"], run_tokenized)
        assert tokenized is None or run_tokenized == tokenized, "tokenization changed between runs"
        tokenized, batch = run_tokenized, batch or captured["batch"]
        runs.append(
            {
                "loss_type": loss_type,
                "label_smoothing": label_smoothing,
                "beta": BETA,
                "sft_weight": SFT_WEIGHT if loss_type.endswith("+sft") else 0.0,
                "metrics": metrics,
                "loss_unlogged": captured["loss"],
            }
        )
        print(loss_type, label_smoothing, json.dumps(metrics))

    # An independent fp64 forward per pair, to localize a failure in the parity test.
    per_pair = []
    for pair in tokenized:
        entry = {}
        for model_name, model in (("policy", policy), ("reference", reference)):
            for key in ("chosen", "rejected"):
                entry[f"{model_name}_{key}_logps"] = torch_sequence_logps(
                    model, pair["prompt_ids"], pair[f"{key}_ids"]
                )
        per_pair.append(entry)
    mean_chosen = sum(p["policy_chosen_logps"] for p in per_pair) / len(per_pair)
    assert abs(mean_chosen - runs[0]["metrics"]["logps/chosen"]) < 1e-4, (
        "torch cross-check disagrees with TRL"
    )

    golden = {
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
        },
        "notes": (
            "metrics: TRL's logged values for step 1 (computed before the update; learning_rate=0). "
            "pairs: TRL's tokenization in pairs.jsonl order; each training sequence is prompt_ids + "
            "chosen_ids (or rejected_ids), and the completion mask covers exactly chosen_ids/rejected_ids. "
            "trl_batch: the padded batch TRL fed the models in its first run (chosen rows, then rejected "
            "rows, right-padded with <pad>; rows shuffled by the sampler). torch_per_pair: a plain "
            "transformers fp64-softmax cross-check, not TRL output."
        ),
        "special_token_ids": {
            name: tokenizer.convert_tokens_to_ids(name) for name in [*SPECIAL_TOKENS, "\n"]
        },
        "runs": runs,
        "pairs": tokenized,
        "trl_batch": batch,
        "torch_per_pair": per_pair,
    }
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
