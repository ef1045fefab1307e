"""Every prompt the annotator sees, in one place, readable as text.

Two steps per seed paragraph: raise one input of a given kind from the
seed, then answer it in the persona's voice with retrieved materials and Chain-of-Thought,
`[Analysis]` first and `[Response]` second.
"""

from __future__ import annotations

from collections.abc import Sequence

QUESTION_SYSTEM = (
    "You write inputs for a conversation with a specific person. You are given one paragraph of "
    "material about that person. Write exactly one input of the requested kind, addressed to the "
    "person as 'you'. Output only the input itself on one line, starting with 'Input:'."
)

QUESTION_KINDS = {
    "ordinary": (
        "Kind: an ordinary question. Ask something the person could answer from the material, "
        "in a natural, specific way. One or two sentences; neither trivial nor long."
    ),
    "opinion": (
        "Kind: an opinion. Write a relaxed remark of two or three sentences, on a topic slightly "
        "related to the material, whose viewpoint {stance} the person's, to start a discussion."
    ),
    "induced": (
        "Kind: a question with a false premise. Ask about something that contradicts the "
        "material: a place the person never went, a thing they never did, a wrong name or date. "
        "Ask it confidently, as if the false part were true."
    ),
}

OPINION_STANCES = ("agrees with", "differs from", "strongly conflicts with")

QUESTION_USER = """Person: {name}, {description}
Time: {when}
Material:
{seed}

{kind_instruction}

Input:"""

RESPONSE_SYSTEM = """You are {name}. {description}
Now it's {when}. You only know what you would know at this time of your life.

What you know and have lived:
{objective}

How you speak (imitate this style, do not copy it):
{subjective}

Reply to the user in two parts. First "[Analysis]": what the user asks or claims, whether it \
contains an error or a false premise about you, and what you think of it. Then "[Response]": your \
reply, in your own voice, in the first person. If the user's input contains a false premise, \
point the error out instead of playing along. Keep the reply conversational, not formal, and \
short (under 120 words). You need not agree with the user."""

FEW_SHOT = [
    {
        "role": "user",
        "content": "I hear you learned to fly aeroplanes as a young man. Which was your favourite?",
    },
    {
        "role": "assistant",
        "content": (
            "[Analysis] The user claims I flew aeroplanes. Nothing I have lived says so: that is a "
            "false premise, and I should say so plainly.\n"
            "[Response] Aeroplanes? You have been misinformed, I am afraid. I have never flown "
            "anything, nor wished to. Ask me about what I have actually done."
        ),
    },
]


# One worked example, so that small annotators see the expected shape: a new sentence, not the
# material copied back.
QUESTION_EXAMPLE = [
    {
        "role": "user",
        "content": QUESTION_USER.format(
            name="Captain Ahab",
            description="captain of the whaler Pequod",
            when="1851, at sea",
            seed="I lost my leg to the white whale off the coast of Japan, and I have sworn to hunt him down.",
            kind_instruction=QUESTION_KINDS["ordinary"],
        ),
    },
    {"role": "assistant", "content": "Input: Captain, where exactly did you first meet the white whale?"},
]


def question_messages(*, name: str, description: str, when: str, seed: str, kind: str, stance_index: int = 0):
    instruction = QUESTION_KINDS[kind].format(stance=OPINION_STANCES[stance_index % len(OPINION_STANCES)])
    user = QUESTION_USER.format(
        name=name, description=description, when=when, seed=seed, kind_instruction=instruction
    )
    return [
        {"role": "system", "content": QUESTION_SYSTEM},
        *QUESTION_EXAMPLE,
        {"role": "user", "content": user},
    ]


def response_messages(
    *,
    name: str,
    description: str,
    when: str,
    objective: list[str],
    subjective: list[str],
    question: str,
    examples: Sequence[tuple[str, str, str]] = (),
):
    """The answer request; `examples` ((question, analysis, response) each, the persona's own
    answers at this stage) follow the generic example as earlier turns of the conversation."""
    system = RESPONSE_SYSTEM.format(
        name=name,
        description=description,
        when=when,
        objective="\n\n".join(objective) or "(nothing retrieved)",
        subjective="\n\n".join(subjective) or "(no records)",
    )
    worked = []
    for asked, analysis, response in examples:
        worked += [
            {"role": "user", "content": asked},
            {"role": "assistant", "content": f"[Analysis] {analysis}\n[Response] {response}"},
        ]
    return [{"role": "system", "content": system}, *FEW_SHOT, *worked, {"role": "user", "content": question}]
