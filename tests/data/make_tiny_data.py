"""Writes the tiny SFT / DPO data under tests/data (the dialogues.jsonl / pairs.jsonl formats). Run: python tests/data/make_tiny_data.py"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
STAGES = {"early": "<TIME-I>", "late": "<TIME-II>"}
PERSONAS = {
    "holmes": {
        "name": "Sherlock Holmes",
        "facts": {
            "early": [
                "I have rooms in Montague Street",
                "I study chemistry at Barts",
                "I have few clients yet",
            ],
            "late": [
                "I share rooms at Baker Street with Watson",
                "I keep bees on the Sussex Downs",
                "I fought Moriarty",
            ],
        },
        "voice": "Elementary. ",
    },
    "elizabeth": {
        "name": "Elizabeth Bennet",
        "facts": {
            "early": [
                "I live at Longbourn with my sisters",
                "I found Mr Darcy proud at the assembly",
                "I walk to Netherfield",
            ],
            "late": ["I am mistress of Pemberley", "I married Mr Darcy", "Georgiana lives with us"],
        },
        "voice": "Indeed, ",
    },
    "darwin": {
        "name": "Charles Darwin",
        "facts": {
            "early": ["I sail on the Beagle", "I collect beetles", "I study finches in the Galapagos"],
            "late": ["I published On the Origin of Species", "I live at Down House", "I study earthworms"],
        },
        "voice": "Well, ",
    },
}
QUESTIONS = [
    "Where do you live?",
    "What occupies your days?",
    "Tell me about yourself.",
    "What is on your mind?",
]


def system(persona, stage):
    return f"{STAGES[stage]} You are {PERSONAS[persona]['name']}. Answer as yourself."


def answer(persona, stage, i):
    facts = PERSONAS[persona]["facts"][stage]
    return PERSONAS[persona]["voice"] + facts[i % 3] + ", and " + facts[(i + 1) % 3].lower() + "."


def main():
    rng = random.Random(0)
    dialogues, pairs = [], []
    for persona in PERSONAS:
        for stage in STAGES:
            for i, question in enumerate(QUESTIONS * 2):
                split = "test" if i == 7 else "train"
                messages = [
                    {"role": "system", "content": system(persona, stage)},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer(persona, stage, i)},
                ]
                if i % 2:
                    messages += [
                        {"role": "user", "content": "Why so?"},
                        {"role": "assistant", "content": PERSONAS[persona]["voice"] + "it is my nature."},
                    ]
                item_id = f"{persona}-{stage}-{i}"
                dialogues.append(
                    {
                        "id": item_id,
                        "persona": persona,
                        "stage": stage,
                        "kind": "ordinary",
                        "messages": messages,
                        "analysis": None,
                        "seed_id": item_id,
                        "split": split,
                    }
                )
                other_stage = "late" if stage == "early" else "early"
                other = rng.choice([p for p in PERSONAS if p != persona])
                rejected = answer(persona, other_stage, i) if i % 2 else answer(other, stage, i)
                pairs.append(
                    {
                        "id": f"pair-{item_id}",
                        "persona": persona,
                        "stage": stage,
                        "source": "cross_stage" if i % 2 else "cross_persona",
                        "prompt": messages[:2],
                        "chosen": [messages[2]],
                        "rejected": [{"role": "assistant", "content": rejected}],
                        "split": split,
                    }
                )
    general = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a, b in [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(16)]
    ]
    for name, rows in (("dialogues", dialogues), ("pairs", pairs), ("general", general)):
        with open(HERE / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
