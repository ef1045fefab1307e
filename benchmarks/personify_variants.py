"""The recipes `personify_recipes.py` measures: SFT and DPO variants, by name."""

from __future__ import annotations

# name -> the persona prompt style, build-data overrides, SFT overrides, DPO overrides; optionally
# `data_from` (another variant's build instead of its own), `pairs_from` ({variant: repeats}: DPO on
# those builds' pair files), `materials_repeats` (the materials paragraphs in SFT), `sft_from`,
# `dpo_from` (another variant's model to start from), `from_run` (the demo run's models), `on_policy`
# (`dpo.on_policy` settings, its dialogues the build's: pairs of the SFT model's own sampled answers,
# rejected, against the written ones of those kinds, beside the build's pairs). The step
# configs come from the `--run` demo run; the variants measured before the demo's DPO became
# mirrored cross-stage pairs pin what they were measured with (all pairs; DPO rows of 8 x 256, one
# pair per slot), so that a later demo run reproduces them.
ALL_PAIRS = ["pairs.cross_persona.enabled=true"]
PAIR_ROWS = ["dpo.mirrors_together=false", "train.batch_size=8", "train.seq_len=256"]
DEMO_SFT = ["train.max_steps=10", "optim.lr=1.0e-4", "optim.warmup_steps=2"]
# The reference model runs beside the policy (`frozen`): a cached reference would first score every
# training pair (470 with the reference dialogues, about 9 minutes here) for the 112 a run uses.
DEMO_DPO = [
    *PAIR_ROWS,
    "train.max_steps=14",
    "optim.lr=5.0e-6",
    "optim.warmup_steps=2",
    "dpo.reference=frozen",
]
DPO_5E5 = [
    *PAIR_ROWS,
    "train.max_steps=14",
    "optim.lr=5.0e-5",
    "optim.warmup_steps=2",
    "dpo.reference=frozen",
]
LONG_SFT = ["train.max_steps=40", "optim.lr=3.0e-4", "optim.warmup_steps=4"]


def mirrors_together_dpo(steps: int, lr: str = "5.0e-5") -> list[str]:
    """DPO with each pair and its mirror in one step; rows of 768 tokens hold both whole (3 rows
    of 768 = 2304 tokens a side per step, the former demo's 8 x 256 = 2048)."""
    return [
        f"train.max_steps={steps}",
        f"optim.lr={lr}",
        "optim.warmup_steps=4",
        "dpo.reference=frozen",
        "dpo.mirrors_together=true",
        "train.seq_len=768",
        "train.batch_size=3",
    ]


def ipo_stage_dpo(steps: int) -> list[str]:
    """The demo's DPO: each pair with its mirror in one step, lr 1e-4, the IPO loss at beta 0.5."""
    return [*mirrors_together_dpo(steps, lr="1.0e-4"), "dpo.loss_type=ipo", "dpo.beta=0.5"]


def mirrored_persona_after(stage_variant: str) -> dict:
    """A second DPO, 8 steps at lr 5e-5, on mirrored cross-persona pairs (each with its mirror in
    one step), from `stage_variant`'s DPO model."""
    return {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_stage=false", "pairs.cross_persona.mirrored=true"],
        "dpo": [*mirrors_together_dpo(8), "optim.warmup_steps=2"],
        "from_run": ["sft"],
        "dpo_from": stage_variant,
    }


VARIANTS = {
    "demo": {"stage_prompt": "token", "build": ALL_PAIRS, "sft": DEMO_SFT, "dpo": DEMO_DPO},
    "lr3e-4": {"stage_prompt": "token", "build": ALL_PAIRS, "sft": LONG_SFT, "dpo": DEMO_DPO},
    "when_lr3e-4": {"stage_prompt": "token_and_when", "build": ALL_PAIRS, "sft": LONG_SFT, "dpo": DEMO_DPO},
    "when_lr3e-4_dpo5e-5": {
        "stage_prompt": "token_and_when",
        "build": ALL_PAIRS,
        "sft": LONG_SFT,
        "dpo": DPO_5E5,
        "sft_from": "when_lr3e-4",
    },
    "when_lr3e-4_dpo5e-5_one_way": {
        "stage_prompt": "token_and_when",
        "build": [*ALL_PAIRS, "pairs.cross_stage_mirrored=false"],
        "sft": LONG_SFT,
        "dpo": DPO_5E5,
        "sft_from": "when_lr3e-4",
    },
    "when_lr3e-4_dpo5e-5_stage_pairs": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_persona.enabled=false"],
        "sft": LONG_SFT,
        "dpo": DPO_5E5,
        "sft_from": "when_lr3e-4",
    },
    # The demo run's own models, scored on the demo's build: the baseline of the variants below,
    # which start from its SFT run (`when_lr3e-4`'s SFT; measured with the then demo's DPO,
    # `when_lr3e-4`'s).
    "demo_run": {"stage_prompt": "token_and_when", "build": [], "from_run": ["sft", "dpo"]},
    "demo_run_dpo5e-5_one_way_40": {
        "stage_prompt": "token_and_when",
        "build": [*ALL_PAIRS, "pairs.cross_stage_mirrored=false"],
        "dpo": [
            *PAIR_ROWS,
            "train.max_steps=40",
            "optim.lr=5.0e-5",
            "optim.warmup_steps=4",
            "dpo.reference=frozen",
        ],
        "from_run": ["sft"],
    },
    # DPO as above on the mirrored pairs, each cross-stage pair trained in the same step as its
    # mirror (`dpo.mirrors_together`)
    "demo_run_dpo5e-5_mirrors_together_40": {
        "stage_prompt": "token_and_when",
        "build": ALL_PAIRS,
        "dpo": mirrors_together_dpo(40),
        "from_run": ["sft"],
    },
    # The same on the cross-stage pairs alone (mirrored, 106 in train), 27 steps: about three
    # passes over them, as many pair visits as 40 steps of 8
    "demo_run_stage_pairs_dpo5e-5_mirrors_together_27": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_persona.enabled=false"],
        "dpo": mirrors_together_dpo(27),
        "from_run": ["sft"],
    },
    # The same with the chosen answers' NLL in the loss (`dpo.sft_weight=1`): does it keep the
    # persona SFT taught while the stage is learned?
    "demo_run_stage_pairs_dpo5e-5_sft1_mirrors_together_27": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_persona.enabled=false"],
        "dpo": [*mirrors_together_dpo(27), "dpo.sft_weight=1.0"],
        "from_run": ["sft"],
    },
    # Twice the rate for half the steps: the demo's DPO time
    "demo_run_stage_pairs_dpo1e-4_mirrors_together_14": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_persona.enabled=false"],
        "dpo": mirrors_together_dpo(14, lr="1.0e-4"),
        "from_run": ["sft"],
    },
    # The adopted stage DPO, then a second, short DPO on cross-persona pairs alone (8 x 256, one pair
    # a slot), its reference the stage-DPO model: does the persona come back without the stage
    # going?
    "demo_run_stage_then_persona_dpo5e-5_8": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_stage=false"],
        "dpo": [
            *PAIR_ROWS,
            "train.max_steps=8",
            "optim.lr=5.0e-5",
            "optim.warmup_steps=2",
            "dpo.reference=frozen",
        ],
        "from_run": ["sft"],
        "dpo_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_14",
    },
    # The same second DPO on mirrored cross-persona pairs (`pairs.cross_persona.mirrored`), each
    # with its mirror in one step: each answer compared under its own persona's prompt and another's
    "demo_run_stage_then_mirrored_persona_dpo5e-5_8": mirrored_persona_after(
        "demo_run_stage_pairs_dpo1e-4_mirrors_together_14"
    ),
    # The mirrored cross-persona DPO after the 40-step stage DPO below
    "demo_run_stage40_then_mirrored_persona_dpo5e-5_8": mirrored_persona_after(
        "demo_run_stage_pairs_dpo1e-4_mirrors_together_40"
    ),
    # The stage DPO for longer (about four passes over the 106 training pairs with their mirrors)
    "demo_run_stage_pairs_dpo1e-4_mirrors_together_40": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_persona.enabled=false"],
        "dpo": mirrors_together_dpo(40, lr="1.0e-4"),
        "from_run": ["sft"],
    },
    # A second DPO from the 40-step stage DPO on both pair kinds in one run: the cross-stage pairs
    # again (106 units of a pair and its mirror) and three in ten of the mirrored cross-persona
    # pairs' 342 units, drawn anew each epoch: can the persona come back while the stage is kept?
    "demo_run_stage40_then_mixed_dpo1e-4_16": {
        "stage_prompt": "token_and_when",
        "data_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_40",
        "pairs_from": {
            "demo_run_stage_pairs_dpo1e-4_mirrors_together_40": 1.0,
            "demo_run_stage40_then_mirrored_persona_dpo5e-5_8": 0.3,
        },
        "dpo": mirrors_together_dpo(16, lr="1.0e-4"),
        "from_run": ["sft"],
        "dpo_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_40",
    },
    # Forty more steps of the stage DPO from the 40-step model (its reference that model): does a
    # model that separates more of its training twins separate more new ones?
    "demo_run_stage40_then_stage_dpo1e-4_40": {
        "stage_prompt": "token_and_when",
        "data_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_40",
        "dpo": mirrors_together_dpo(40, lr="1.0e-4"),
        "from_run": ["sft"],
        "dpo_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_40",
    },
    # The demo's SFT with the persona materials themselves in the mixture (each paragraph after its
    # stage's system prompt, six copies an epoch beside the dialogues' five), 60 steps so that the
    # dialogues are seen about as often as in the demo's 40; then the 40-step stage DPO. Knowledge
    # probes ask what the materials say, and the demo's SFT leaves them where the base model was.
    "materials6_sft60_stage_dpo1e-4_40": {
        "stage_prompt": "token_and_when",
        "data_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_40",
        "sft": ["train.max_steps=60", "optim.lr=3.0e-4", "optim.warmup_steps=4"],
        "materials_repeats": 6.0,
        "dpo": mirrors_together_dpo(40, lr="1.0e-4"),
    },
    # IPO instead of the sigmoid loss: it pushes each pair's log-ratio difference per answer token
    # (the probes' unit: mean log-prob per token) towards 1 / (2 beta) = 1 nat, where the sigmoid
    # loss's pull fades as the summed margin grows
    "demo_run_stage_pairs_ipo0.5_mirrors_together_14": {
        "stage_prompt": "token_and_when",
        "build": ["pairs.cross_persona.enabled=false"],
        "dpo": ipo_stage_dpo(14),
        "from_run": ["sft"],
    },
    # The same IPO stage DPO for 40 steps (the longer config's budget, about four passes over the
    # mirrored cross-stage pairs), on the same build
    "demo_run_stage_pairs_ipo0.5_mirrors_together_40": {
        "stage_prompt": "token_and_when",
        "data_from": "demo_run_stage_pairs_ipo0.5_mirrors_together_14",
        "dpo": ipo_stage_dpo(40),
        "from_run": ["sft"],
    },
    # The demo's IPO stage DPO with the SFT model's own answers to the false-premise (induced)
    # training questions as rejected answers beside the written corrections (70 pairs, one-way):
    # the second probe sets' false-premise probes find the models playing along with the claim.
    # All 70 an epoch for 14 steps; three in ten (21 beside the 106 cross-stage pairs, drawn anew
    # each epoch), after the 70 took the stage effect from +0.20 to +0.02; all 70 for 40 steps
    # (the longer config's budget): does a longer run keep the stage while the premises are learned?
    **{
        f"demo_run_stage_pairs_ipo0.5_false_premise_on_policy{label}_{steps}": {
            "stage_prompt": "token_and_when",
            "data_from": "demo_run_stage_pairs_ipo0.5_mirrors_together_14",
            "on_policy": {"kinds": "[induced]", **({"repeats": repeats} if repeats != 1 else {})},
            "dpo": ipo_stage_dpo(steps),
            "from_run": ["sft"],
        }
        for label, repeats, steps in (("", 1, 14), ("0.3", 0.3, 14), ("", 1, 40))
    },
    # The adopted stage DPO with another beta: the sigmoid loss stops pulling a pair once its
    # margin, times beta, is large, so a smaller beta moves the model further in the same 14 steps
    # (as the 40-step run did), a larger one less
    **{
        f"demo_run_stage_pairs_dpo1e-4_beta{beta}_mirrors_together_14": {
            "stage_prompt": "token_and_when",
            "dpo": [*mirrors_together_dpo(14, lr="1.0e-4"), f"dpo.beta={beta}"],
            "data_from": "demo_run_stage_pairs_dpo1e-4_mirrors_together_14",
            "from_run": ["sft"],
        }
        for beta in ("0.03", "0.3")
    },
    # LoRA at a high rate: the adapters (rank 64) and the stage tokens' rows, nothing else, train in
    # SFT; DPO as the then demo's.
    "lora64_when_lr2e-3": {
        "stage_prompt": "token_and_when",
        "build": ALL_PAIRS,
        "sft": [
            "train.max_steps=40",
            "optim.lr=2.0e-3",
            "optim.warmup_steps=4",
            "lora.rank=64",
            "lora.alpha=128",
        ],
        "dpo": DEMO_DPO,
    },
    "rows30_lr3e-4": {
        "stage_prompt": "token",
        "build": ALL_PAIRS,
        "sft": [*LONG_SFT, "optim.token_lr_multiplier=30", "optim.token_lr_tokens=[<TIME-I>,<TIME-II>]"],
        "dpo": DEMO_DPO,
    },
}
