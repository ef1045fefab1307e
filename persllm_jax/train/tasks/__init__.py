"""The training tasks: each turns records into global batches, defines its loss and metrics
(overall and per persona / stage) and checks on resume that the data is still the same. SFT
trains on assistant tokens; DPO on preference pairs against a cached or frozen reference."""
