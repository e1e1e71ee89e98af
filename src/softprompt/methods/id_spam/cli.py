"""``softprompt explain``: which input tokens drove an ID-SPAM prompt."""

from __future__ import annotations

from ...cli.common import add_adapter_flags


def cmd_explain(args) -> int:
    from ...loading import load_for_inference
    from .explain import explain, write

    model, tokenizer, _ = load_for_inference(args.adapter, args.base_model)
    pairs = explain(model, tokenizer, args.text)
    for token, weight in pairs:
        print(f"{weight:8.4f}  {token}")
    if args.out:
        write(pairs, args.out, title=args.text)
        print(f"wrote {args.out}")
    return 0


def add_id_spam_parsers(sub) -> None:
    """Register ``explain``."""
    p = sub.add_parser("explain", help="which input tokens drove an ID-SPAM prompt")
    add_adapter_flags(p)
    p.add_argument("--text", required=True)
    p.add_argument("--out", help="tokens.html or tokens.png")
    p.set_defaults(func=cmd_explain)
