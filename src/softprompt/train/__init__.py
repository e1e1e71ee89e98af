"""Training and evaluation (transformers Trainer with adapter-only checkpoints)."""
