"""Weights in and out: safetensors files, the Hugging Face key map, `load_pretrained` /
`save_pretrained` for HF directories, GGUF files and our own model directories, growing the
vocabulary with stage tokens, the layout of a run directory, and finding the offline model
packages. Uses the model package; knows nothing of training or generation."""
