"""Training and evaluation: ``train(TrainConfig(...))`` through transformers' Trainer with adapter-only checkpoints,
``evaluate(adapter_dir, task=...)`` and ``predict(adapter_dir, texts)``."""

from .evaluate import evaluate, predict
from .runner import TrainConfig, train

__all__ = ["TrainConfig", "evaluate", "predict", "train"]
