"""``softprompt theory ...``: closed-form curves, Monte-Carlo checks and training from the command line.

The main CLI calls :func:`add_theory_parser`; for local use,
``python -m softprompt.theory.cli curves --config zero_cov_12 ...`` works too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .arguments import at_least, finite_float, int_list, overrides, regime_list
from .closed_form import REGIMES, as_n_array, theory_curves
from .config import PRESETS, TaskMixture, preset, resolve_config
from .limits import check_closed_forms, check_training, fit_mc_chunk

__all__ = ["add_theory_parser", "curves", "main"]


# ------------------------------------------------------------------------ work
def curves(
    mix: TaskMixture,
    ns: Sequence[int],
    regimes: Sequence[str] = REGIMES,
    mc_draws: int = 0,
    train_cfg: Any = None,
    regime_steps: dict[str, int] | None = None,
    regime_lr: dict[str, float] | None = None,
    device: str = "cpu",
    log=print,
) -> dict[str, Any]:
    """Theory values per regime and n, plus optional Monte-Carlo and training results.

    Args:
        mix: the mixture.
        ns: context lengths.
        regimes: regimes to report (the references ``oracle`` and ``jt_gc`` have theory and MC only).
        mc_draws: Monte-Carlo draws per task for each closed form (0: none; otherwise at least 2).
        train_cfg: a :class:`~softprompt.theory.train.TrainConfig` to also train the model, or None.
        regime_steps: per-regime step counts overriding ``train_cfg.steps``.
        regime_lr: per-regime learning rates overriding ``train_cfg.lr``.
        device: torch device of the Monte-Carlo draws (float64).
        log: progress printer.

    Returns:
        A JSON-friendly dict (the schema that :func:`~softprompt.theory.plot.plot_curves` reads).
    """
    if mc_draws < 0 or mc_draws == 1:
        raise ValueError(f"mc_draws must be 0 (no Monte-Carlo) or >= 2 (a standard error needs two), got {mc_draws}")
    ns = [int(v) for v in as_n_array(ns)]
    # Every size is checked before the first computation, so a run that cannot fit fails in seconds, not after
    # the Monte-Carlo rows of a long run.
    check_closed_forms(mix.d, mix.K, len(ns))
    if mc_draws:
        fit_mc_chunk(mix.d, max(ns), min(mc_draws, 100_000), device=device)
    if train_cfg is not None:
        check_training(mix.d, mix.K, ns, train_cfg.batch, train_cfg.runs, train_cfg.dtype.itemsize,
                       str(train_cfg.device))
    theory = theory_curves(mix, ns, regimes, normalise=True)
    raw = theory_curves(mix, ns, regimes, normalise=False)
    result: dict[str, Any] = {
        "config": mix.to_dict(),
        "norm": mix.norm,
        "n": ns,
        "theory": {r: v.tolist() for r, v in theory.items()},
        "theory_raw": {r: v.tolist() for r, v in raw.items()},
    }
    if mc_draws > 0:
        from .montecarlo import monte_carlo

        result["mc"] = {}
        for r in regimes:
            t0 = time.perf_counter()
            res = [monte_carlo(mix, n, r, draws=mc_draws, seed=1000 + 17 * i, device=device) for i, n in enumerate(ns)]
            result["mc"][r] = {
                "normalised": [x.normalised for x in res],
                "se_normalised": [x.se_normalised for x in res],
                "z": [(x.normalised - t) / x.se_normalised for x, t in zip(res, theory[r])],
                "draws_per_task": mc_draws,
            }
            log(f"[mc] {r}: {time.perf_counter() - t0:.1f}s")
    if train_cfg is not None:
        from .train import train_multi

        result["train"] = {}
        trainable = [r for r in regimes if r in REGIMES]
        # FT's first phase *is* PT training; reuse it instead of training PT twice.
        order = (["ft"] if "ft" in trainable else []) + [r for r in trainable if r != "ft"]
        done: dict[str, dict[int, Any]] = {}
        for r in order:
            if r in done:
                continue
            cfg = replace(
                train_cfg,
                steps=(regime_steps or {}).get(r, train_cfg.steps),
                lr=(regime_lr or {}).get(r, train_cfg.lr),
            )
            if r == "ft":
                pre_steps = (regime_steps or {}).get("pt", train_cfg.pretrain_steps or train_cfg.steps)
                cfg = replace(cfg, pretrain_steps=pre_steps)
            if r == "pt" and "pt" in done:
                continue
            log(f"[train] {r}: steps={cfg.steps} lr={cfg.lr} runs={cfg.runs} batch={cfg.batch} device={cfg.device}")
            res = train_multi(mix, r, ns, cfg)
            done[r] = res
            if r == "ft" and "pt" in trainable:
                done["pt"] = {n: res[n].pretrain for n in ns}
        for r in trainable:
            res = done[r]
            result["train"][r] = {
                "best": [res[n].best for n in ns],
                "best_se": [res[n].best_se for n in ns],
                "mean": [res[n].mean for n in ns],
                "std": [res[n].std for n in ns],
                "runs": [res[n].normalised.tolist() for n in ns],
                "theory_same_draws": [res[n].theory_mc.normalised for n in ns],
                "best_vs_theory_rel": [res[n].best_vs_theory[0] for n in ns],
                "best_vs_theory_rel_se": [res[n].best_vs_theory[1] for n in ns],
                "structure": [res[n].structure for n in ns],
                "seconds": res[ns[0]].seconds,
                "config": res[ns[0]].config.to_dict(),
            }
    return result


def _print_table(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # resolved at call time so that redirection/capture works
    ns = result["n"]
    head = f"{'regime':<8}{'source':<14}" + "".join(f"{('n=' + str(n)):>10}" for n in ns)
    print(f"config {result['config']['name']}  (normaliser tr(M Sx) = {result['norm']:.6g})", file=out)
    print(head, file=out)
    for r, vals in result["theory"].items():
        print(f"{r:<8}{'theory':<14}" + "".join(f"{v:>10.4f}" for v in vals), file=out)
        if r in result.get("mc", {}):
            mc = result["mc"][r]
            print(f"{'':<8}{'MC':<14}" + "".join(f"{v:>10.4f}" for v in mc["normalised"]), file=out)
            print(f"{'':<8}{'MC z-score':<14}" + "".join(f"{v:>10.2f}" for v in mc["z"]), file=out)
        if r in result.get("train", {}):
            tr = result["train"][r]
            print(f"{'':<8}{'trained best':<14}" + "".join(f"{v:>10.4f}" for v in tr["best"]), file=out)
            print(f"{'':<8}{'trained mean':<14}" + "".join(f"{v:>10.4f}" for v in tr["mean"]), file=out)
            rel = "".join(f"{100 * v:>9.2f}%" for v in tr["best_vs_theory_rel"])
            print(f"{'':<8}{'best/theory-1':<14}" + rel, file=out)


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv and argv[0] == "theory":  # called through the main ``softprompt`` CLI
        argv = argv[1:]
    return "softprompt theory " + " ".join(argv)


def _cmd_curves(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        _check_output("--json", args.json)
        _check_output("--plot", args.plot)
        mix = resolve_config(args.config)
        regimes = args.regimes
        ns = args.n
        train_cfg = None
        if args.train:
            import torch

            from .train import TrainConfig

            train_cfg = TrainConfig(
                steps=args.steps,
                pretrain_steps=args.pretrain_steps,
                lr=args.lr,
                batch=args.batch,
                runs=args.runs,
                weight_decay=args.weight_decay,
                eval_batches=args.eval_batches,
                eval_batch=args.batch,
                seed=args.seed,
                device=args.device,
                dtype=torch.float64 if args.float64 else torch.float32,
            )
        t0 = time.perf_counter()
        log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        result = curves(
            mix,
            ns,
            regimes,
            mc_draws=args.mc_draws if args.mc else 0,
            train_cfg=train_cfg,
            regime_steps=overrides(args.regime_steps, at_least(1)),
            regime_lr=overrides(args.regime_lr, finite_float(0.0, inclusive=False)),
            device=args.device,
            log=log,
        )
    except (ValueError, argparse.ArgumentTypeError) as exc:
        return _error(str(exc))
    result["meta"] = {
        "command": _command_line() if args.record_argv else None,
        "seconds": time.perf_counter() - t0,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if args.train:
        import torch

        result["meta"]["torch"] = torch.__version__
        on_gpu = str(args.device).startswith("cuda")
        result["meta"]["device_name"] = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    _print_table(result)
    try:
        if args.json:
            p = Path(args.json)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {p}")
        if args.plot:
            from .plot import plot_curves

            print(f"wrote {plot_curves(result, args.plot, layout=args.layout)}")
    except OSError as exc:
        return _error(f"cannot write {exc.filename or args.json or args.plot}: {exc.strerror or exc}; "
                      "choose another --json/--plot path")
    return 0


def _error(message: str) -> int:
    """One line on stderr, exit code 2 (the convention of the main CLI for a bad input)."""
    print(f"softprompt theory: error: {message}", file=sys.stderr)
    return 2


def _check_output(flag: str, path: str | None) -> None:
    """Refuse an output path that can never be written, before hours of training are spent."""
    if path and Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name such as {Path(path) / 'curves'}"
                         + (".json" if flag == "--json" else ".png"))


def _cmd_configs(args: argparse.Namespace) -> int:
    if args.show:
        try:
            mix = resolve_config(args.show)
        except ValueError as exc:
            return _error(str(exc))
        print(json.dumps(mix.to_dict(), indent=1))
        return 0
    for name in PRESETS:
        mix = preset(name)
        mean = round(float(mix.mean[0]), 12) + 0.0  # + 0.0 turns -0.0 into 0.0
        print(f"{name:<34} norm={mix.norm:<8.4g} global mean={mean:+.3g}  {mix.description}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import load_result, plot_curves

    try:
        _check_output("output", args.out)
        result = load_result(args.json)
    except ValueError as exc:
        return _error(str(exc))
    try:
        print(f"wrote {plot_curves(result, args.out, layout=args.layout)}")
    except OSError as exc:
        return _error(f"cannot write {args.out}: {exc.strerror or exc}; choose another output path")
    return 0


def add_theory_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``theory`` (with ``curves``, ``configs`` and ``plot``) on a subparsers object.

    Each leaf parser sets ``func``: a handler taking the namespace and returning an exit code.
    """
    p = subparsers.add_parser(
        "theory",
        help="task-specific prompts on linear attention: closed forms, Monte-Carlo, training",
        description="Theory lab for task-specific prompts in multi-task in-context learning (arXiv 2503.02102).",
    )
    sub = p.add_subparsers(dest="theory_command", metavar="{curves,configs,plot}")

    def _help(_: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)

    c = sub.add_parser("curves", help="normalised optimal loss per regime and n (+ Monte-Carlo, + training, + figure)")
    c.add_argument("--config", default="zero_cov_12", help="preset name (see 'theory configs') or a JSON/YAML file")
    c.add_argument("--n", type=int_list, default=[1, 10, 20, 30, 40, 50], help="comma-separated context lengths")
    c.add_argument("--regimes", type=regime_list, default=list(REGIMES),
                   help="subset of pt,ft,jt,dec and the references oracle,jt_gc")
    c.add_argument("--json", help="write the results here")
    c.add_argument("--plot", help="write a PNG figure here")
    c.add_argument("--layout", choices=("panels", "overlay"), default="panels")
    c.add_argument("--mc", action="store_true", help="Monte-Carlo check of every closed form")
    c.add_argument("--mc-draws", type=at_least(2, " (a standard error needs two draws)"), default=200_000,
                   help="Monte-Carlo draws per task (default 200000)")
    c.add_argument("--train", action="store_true", help="train the linear-attention model in each regime")
    c.add_argument("--steps", type=at_least(1), default=20_000,
                   help="optimiser steps per regime (FT: of the prompt phase)")
    c.add_argument("--pretrain-steps", type=at_least(1), default=None,
                   help="FT's PT phase (default: --steps, or the pt entry of --regime-steps)")
    c.add_argument("--regime-steps", help="per-regime steps, e.g. dec=60000,pt=20000")
    c.add_argument("--regime-lr", help="per-regime learning rates, e.g. dec=0.01")
    c.add_argument("--lr", type=finite_float(0.0, inclusive=False), default=1e-3)
    c.add_argument("--batch", type=at_least(1), default=3072,
                   help="prompts per task per step (and per evaluation batch)")
    c.add_argument("--runs", type=at_least(1), default=4, help="restarts (trained in parallel); the best is reported")
    c.add_argument("--weight-decay", type=finite_float(0.0, inclusive=True), default=0.0)
    c.add_argument("--eval-batches", type=at_least(1), default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (training and Monte-Carlo)")
    c.add_argument("--float64", action="store_true", help="train in float64 (default float32)")
    c.add_argument("--threads", type=at_least(1), default=None,
                   help="torch CPU threads; 1 is fastest for these tiny ops on a busy CPU")
    c.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    c.add_argument("--no-record-argv", dest="record_argv", action="store_false",
                   help="do not store the command line in the JSON")
    c.set_defaults(func=_cmd_curves)

    g = sub.add_parser("configs", help="list the named configurations, or show one as JSON")
    g.add_argument("--show", metavar="CONFIG", help="print this preset or file as a JSON config")
    g.set_defaults(func=_cmd_configs)

    pl = sub.add_parser("plot", help="redraw a figure from a curves JSON")
    pl.add_argument("json", help="a JSON written by 'theory curves --json'")
    pl.add_argument("out", help="output PNG")
    pl.add_argument("--layout", choices=("panels", "overlay"), default="panels")
    pl.set_defaults(func=_cmd_plot)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m softprompt.theory.cli curves ...``."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.theory.cli")
    subs = parser.add_subparsers(dest="command")
    add_theory_parser(subs)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept both "curves ..." and "theory curves ..." for convenience.
    if not argv or argv[0] != "theory":
        argv = ["theory", *argv]
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
