"""Data: reading records, recognising TRL formats, tokenizing with assistant masks, mixing sources."""

from persllm_jax.data.chat_tokenize import (
    TokenizedExample,
    TokenizedPair,
    TrainingArrays,
    to_training_arrays,
    tokenize_conversation,
    tokenize_preference,
    tokenize_prompt_completion,
    tokenize_sft,
    tokenize_text,
)
from persllm_jax.data.formats import (
    PreferenceExample,
    SFTExample,
    classify,
    normalize,
    preference_example,
    sft_example,
)
from persllm_jax.data.mixture import Mixture, batch_rows, epoch_order
from persllm_jax.data.readers import DataError, location, read_records

__all__ = [
    "DataError",
    "Mixture",
    "PreferenceExample",
    "SFTExample",
    "TokenizedExample",
    "TokenizedPair",
    "TrainingArrays",
    "batch_rows",
    "classify",
    "epoch_order",
    "location",
    "normalize",
    "preference_example",
    "read_records",
    "sft_example",
    "to_training_arrays",
    "tokenize_conversation",
    "tokenize_preference",
    "tokenize_prompt_completion",
    "tokenize_sft",
    "tokenize_text",
]
