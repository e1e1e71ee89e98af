"""``softprompt demo``: the main job end to end on 2 CPU cores with the real MiniLM and the real SST-2."""

from __future__ import annotations

import json
import time


def run_demo(output: str = "runs/demo-sst2-prefix", steps: int = 300, data_dir: str | None = None) -> int:
    """Train a 20-token prefix on SST-2, print dev accuracy, save, reload, check the reload, predict."""
    from .train import TrainConfig, evaluate, predict, train

    print(f"[demo] training prefix tuning (20 tokens) on glue/sst2 with MiniLM-L6 for {steps} steps ...", flush=True)
    cfg = TrainConfig(method="prefix", model="minilm", task="glue/sst2", output=output, max_steps=steps,
                      batch_size=32, max_length=64, data_dir=data_dir, logging_steps=100,
                      method_options={"num_virtual_tokens": 20},
                      overwrite=True)  # the demo's own folder: a second `make demo` replaces the first one's adapter
    start = time.time()
    metrics = train(cfg)
    print(f"[demo] trained {metrics['trainable_params']:,} parameters in {metrics['train_seconds']:.0f} s; "
          f"SST-2 dev accuracy {100 * metrics['eval_accuracy']:.1f}% ({metrics['eval_examples']} examples)")
    reloaded = evaluate(output, task="glue/sst2", data_dir=data_dir)
    same = abs(reloaded["eval_accuracy"] - metrics["eval_accuracy"]) < 1e-9
    print(f"[demo] reloaded adapter from {output}: dev accuracy {100 * reloaded['eval_accuracy']:.1f}% "
          f"({'identical' if same else 'DIFFERENT'})")
    for row in predict(output, ["A gorgeous, witty and deeply moving film.",
                                "The plot is thin and the jokes fall flat."]):
        print("[demo] predict:", json.dumps(row))
    print(f"[demo] done in {time.time() - start:.0f} s")
    return 0 if same else 1
