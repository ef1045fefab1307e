"""Small copies of the real Llama-3 and Qwen2 tokenizers for the assistant-mask audit in tests/test_chat_data.py.

Run by hand (needs the `gguf` package; a few seconds):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp
    python tests/assets/make_tokenizers.py /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models

The llama.cpp source ships each model family's complete vocabulary (`ggml-vocab-<name>.gguf`: every token,
every merge, the token types) with reference tokenizations (`.inp` / `.out`) made by the original Hugging
Face tokenizers. This script:

1. builds the full tokenizer from the vocabulary, with the model's own pre-tokenizer pattern, byte-level
   mapping and special tokens, and checks it reproduces every reference tokenization;
2. keeps the first MERGES_KEPT merges plus every merge and token that the full tokenizer uses on the test
   texts (tests/test_chat_data.py and the chat templates), with the real token ids, and checks that the
   small tokenizer segments those texts exactly as the full one does;
3. writes `tokenizers/<name>/` (tokenizer.json, tokenizer_config.json with the published chat template) and
   `tokenizers/<name>/covered.json`: the texts the small copy is exact on, with the full tokenizer's ids,
   which the tests check so a new test text that the copy cannot tokenize exactly fails loudly.

Byte-level BPE is exact on a subset of merges whenever the subset holds every merge the full merge list
applies to the text, in the same order: the merge chosen at each step is the lowest-ranked applicable one,
and it is in the subset. Step 2 checks this on the texts rather than trusting it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

ASSETS = Path(__file__).resolve().parent
OUT = ASSETS / "tokenizers"
MERGES_KEPT = 4000
CONTROL, USER_DEFINED = 3, 4

# The pre-tokenizer patterns of the published tokenizer.json files (Llama-3 groups digits in threes,
# Qwen2 splits every digit).
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
FAMILIES = {
    "llama3": {
        "gguf": "ggml-vocab-llama-bpe.gguf",
        "pattern": _WORDS + r"\p{N}{1,3}" + _REST,
        "nfc": False,
        "ignore_merges": True,
        "bos": "<|begin_of_text|>",
        "config": {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "model_max_length": 131072,
        },
        "template": "llama3.jinja",
    },
    "qwen2": {
        "gguf": "ggml-vocab-qwen2.gguf",
        "pattern": _WORDS + r"\p{N}" + _REST,
        "nfc": True,
        "ignore_merges": False,
        "bos": None,
        "config": {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 32768,
        },
        "template": "qwen2.jinja",
    },
}


def read_vocabulary(path: Path) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    return tokens, types, merges


def build(
    family: dict, vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int]
) -> Tokenizer:
    # The special tokens sit in the model's vocabulary too: an added token takes the id the model gives it,
    # which keeps their real ids when the small copy's vocabulary has gaps.
    model = models.BPE({**vocab, **specials}, merges, ignore_merges=family["ignore_merges"], fuse_unk=False)
    tokenizer = Tokenizer(model)
    if family["nfc"]:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    steps = [processors.ByteLevel(trim_offsets=False)]
    if family["bos"]:
        bos = family["bos"]
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])]
            )
        )
    tokenizer.post_processor = processors.Sequence(steps)
    tokenizer.add_special_tokens(
        [AddedToken(content, special=True, normalized=False) for content in specials]
    )
    for content, token_id in specials.items():
        assert tokenizer.token_to_id(content) == token_id, (content, token_id)
    return tokenizer


def reference_cases(models_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    separator = "\n__ggml_vocab_test__\n"
    texts = (models_dir / f"{name}.inp").read_text(encoding="utf-8").split(separator)
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__").removesuffix("\n")
    outputs = (models_dir / f"{name}.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(outputs) == len(texts), (len(outputs), len(texts))
    return [(text, [int(x) for x in out.split()]) for text, out in zip(texts, outputs)]


def test_texts() -> list[str]:
    """Every text tests/test_chat_data.py tokenizes with these tokenizers."""
    sys.path.insert(0, str(ASSETS.parents[1]))
    from tests import test_chat_data as audit

    return sorted(audit.audited_texts())


def rendered(texts: list[str], template_name: str) -> list[str]:
    """The texts inside each role's turn, as the chat template renders them (the boundaries under audit)."""
    import jinja2

    template = jinja2.Environment().from_string(
        (ASSETS / "chat_templates" / template_name).read_text().removesuffix("\n")
    )
    out = []
    for role in ("system", "user", "assistant"):
        for text in texts:
            out.append(
                template.render(
                    messages=[{"role": role, "content": text}], bos_token="", add_generation_prompt=True
                )
            )
    return out


def small_copy(family, tokens, merges, specials, full: Tokenizer, texts: list[str]) -> Tokenizer:
    token_ids = {t: i for i, t in enumerate(tokens)}
    maker: dict[str, tuple[str, str]] = {}
    for a, b in merges:  # merge list order is rank order: keep each token's first (lowest-ranked) merge
        maker.setdefault(a + b, (a, b))

    needed = set()

    def add(token: str) -> None:
        stack = [token]
        while stack:
            t = stack.pop()
            if t in needed or t in specials:
                continue
            needed.add(t)
            if t in maker:
                stack.extend(maker[t])

    for token in tokens:  # the byte alphabet: single characters of the byte-level mapping
        if len(token) == 1 and token not in specials:
            add(token)
    for a, b in merges[:MERGES_KEPT]:
        add(a + b)
    for text in texts:
        for token in full.encode(text, add_special_tokens=False).tokens:
            add(token)
    kept_merges = [(a, b) for a, b in merges if a in needed and b in needed and a + b in needed]
    vocab = {t: token_ids[t] for t in needed}
    return build(family, vocab, kept_merges, specials)


def main(models_dir: Path) -> None:
    texts = test_texts()
    for name, family in FAMILIES.items():
        tokens, types, merges = read_vocabulary(models_dir / family["gguf"])
        specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)}
        vocab = {t: i for i, t in enumerate(tokens) if t not in specials}
        full = build(family, vocab, merges, specials)

        cases = reference_cases(models_dir, family["gguf"])
        for text, expected in cases:
            got = full.encode(text, add_special_tokens=False).ids
            assert got == expected, (name, text, got, expected)

        covered = texts + rendered(texts, family["template"])
        small = small_copy(family, tokens, merges, specials, full, covered)
        for text in covered:
            assert (
                small.encode(text, add_special_tokens=False).ids
                == full.encode(text, add_special_tokens=False).ids
            ), text

        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        small.save(str(folder / "tokenizer.json"))
        template = (
            (ASSETS / "chat_templates" / family["template"]).read_text(encoding="utf-8").removesuffix("\n")
        )
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(family["config"])
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        coverage = [{"text": t, "ids": full.encode(t, add_special_tokens=False).ids} for t in covered]
        (folder / "covered.json").write_text(json.dumps(coverage, ensure_ascii=False, indent=0) + "\n")
        size = (folder / "tokenizer.json").stat().st_size
        print(
            f"{name}: full tokenizer matches {len(cases)} reference tokenizations; small copy "
            f"{len(small.get_vocab())} tokens, {size / 1024:.0f} KiB, exact on {len(covered)} test texts"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
