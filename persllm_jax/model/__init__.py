"""The model: a Llama-family decoder in Flax NNX, its configuration and presets, rotary position
embeddings, attention, and the logical-axis sharding rules that place every parameter and
activation on a device mesh. Nothing here reads files or knows about training; it depends only
on jax and flax."""
