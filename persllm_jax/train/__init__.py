"""Training: the run config, the optimizer and schedule, the jitted train step with gradient
accumulation, the training loop with Orbax checkpoints that resume exactly, the metrics log and
its plots, multi-host start-up, and in `tasks/` what differs between SFT and DPO (batches, loss,
metrics, the cached reference log-probs). Uses model, io, data and the loss functions."""
