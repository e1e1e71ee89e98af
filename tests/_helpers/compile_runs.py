"""Builders of the compiled-training tests (test_compile_*.py): a short bucketed training run on a CSV."""

from softprompt.train import TrainConfig


def bucketed_run(model: str, data: str, output: str, compile_mode: str | None, **kw) -> dict:
    """``softprompt.train.train`` of prefix tuning (2 tokens) on ``data`` (sentence, sentiment) with 3 length
    buckets, batches of 2 and 10 steps unless ``kw`` says otherwise; returns its metrics."""
    from softprompt.train import train

    options = {"max_steps": 10, "batch_size": 2, **kw}
    cfg = TrainConfig(method="prefix", model=model, output=output, file=data, text_column="sentence",
                      label_column="sentiment", compile=compile_mode, length_buckets=3, max_length=40,
                      logging_steps=1, method_options={"num_virtual_tokens": 2}, **options)
    return train(cfg)
