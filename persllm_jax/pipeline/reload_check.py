"""Proof that an export works outside this project: transformers (PyTorch) loads the exported
directory and answers as each persona and stage, with the chat template saved beside it."""

from __future__ import annotations

import json
from pathlib import Path

from persllm_jax.data.chat_templates import template_options
from persllm_jax.personas.materials import load_personas
from persllm_jax.personas.prompts import persona_conversation


def answer_with_transformers(
    hf_dir: str | Path, personas_dir: str | Path, question: str, max_new_tokens: int, out_dir: str | Path
) -> dict[str, Path]:
    """Greedy answers of the exported model to `question`, once per persona and stage."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    for persona in load_personas(personas_dir):
        for stage in persona.stages:
            messages = persona_conversation(persona, stage, question)
            enc = tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
                **template_options(tokenizer),
            )
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            answer = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            rows.append({"persona": persona.id, "name": persona.name, "stage": stage.id, "answer": answer})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    lines = [f"# transformers answers from {hf_dir}", "", f"Question: {question}", ""]
    lines += [f"- **{r['name']}** ({r['stage']}): {r['answer']}" for r in rows]
    (out / "answers.md").write_text("\n".join(lines) + "\n")
    return {"jsonl": out / "answers.jsonl", "md": out / "answers.md"}
