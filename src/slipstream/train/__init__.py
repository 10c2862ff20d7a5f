"""The training loop, strategies, backends, callbacks and checkpoints (issue: one training loop)."""
