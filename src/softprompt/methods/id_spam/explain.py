"""Explanations for ID-SPAM: which input tokens shaped the generated prompt.

ID-SPAM pools its single-head self-attention output by a mean over the real tokens, so the pooled vector is
A = sum_j w_j v_j with

    w_j = (1 / |real|) * sum over real query tokens q of softmax_q(j)

where softmax_q(j) is the attention probability that query token q gives key token j (padding keys are masked, so
each softmax row sums to 1 over the real tokens). The average is over *query tokens* (all real input tokens, the
special ones included); w is therefore a distribution over the real tokens (sum 1, 0 on padding) and w_j is token j's
exact share in the vector that W_down/W_up turn into the prompt. It does not include what happens after pooling (the
MLP, the frozen model); it says which words the prompt was built from, not why the model answered as it did.

``explain`` returns [(token, w_j)], ``write_html``/``write_png`` render it; ``write`` picks the format by suffix.
The ``softprompt explain`` CLI is wired elsewhere to these functions.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import torch

from ...errors import ConfigError
from .module import IDSPAM

TokenWeights = list[tuple[str, float]]


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the tensor we need has been seen."""


def _method(model) -> IDSPAM:
    method = getattr(model, "method", None)
    if not isinstance(method, IDSPAM):
        name = type(method).__name__ if method is not None else type(model).__name__
        method_name = getattr(getattr(model, "method_config", None), "method", name)
        raise ConfigError(f"explain needs an ID-SPAM adapter (method 'idspam'); this adapter's method is "
                          f"{method_name!r}, whose prompt does not depend on the input tokens")
    return method


@torch.no_grad()
def generator_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """The embeddings the generator reads [B, N, n]: word embeddings, or (embed_source="full") the hidden states
    entering layer 0, obtained by running the frozen model up to that point only."""
    method = _method(model)
    if method.config.embed_source == "word":
        return model.base_model.get_input_embeddings()(input_ids)
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Captured

    handle = model.injector.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["hidden"]


@torch.no_grad()
def explain_batch(model, tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
                  max_length: int | None = None, keep_padding: bool = False) -> list[TokenWeights]:
    """:func:`explain` for several texts (padded together). Padding tokens are dropped unless ``keep_padding``,
    in which case they appear with weight 0."""
    method = _method(model)
    # Pad only when needed: GPT-2-style tokenizers have no pad token and refuse padding=True even for one text.
    enc = tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, padding=len(texts) > 1,
                    truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"].to(model.device)
    mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).to(model.device)
    extra = {"token_type_ids": enc["token_type_ids"].to(model.device)} if "token_type_ids" in enc else {}
    was_training = model.training
    model.eval()  # embedding dropout would otherwise perturb embed_source="full"
    try:
        weights = method.token_weights(generator_inputs(model, ids, mask, **extra), mask).cpu()
    finally:
        model.train(was_training)
    out: list[TokenWeights] = []
    for row_ids, row_mask, row_w in zip(ids.cpu(), mask.cpu(), weights):
        tokens = tokenizer.convert_ids_to_tokens(row_ids.tolist())
        out.append([(tok, float(w)) for tok, m, w in zip(tokens, row_mask.tolist(), row_w.tolist())
                    if keep_padding or m])
    return out


def explain(model, tokenizer, text: str, text_pair: str | None = None, *,
            max_length: int | None = None) -> TokenWeights:
    """[(token, weight)] for every token of ``text`` (tokenised as in training, special tokens included).

    weight = the pooled self-attention weight of the ID-SPAM generator: the attention probability each real query
    token gives this token, averaged over the real query tokens (see the module docstring). The weights sum to 1.
    """
    return explain_batch(model, tokenizer, [text], [text_pair] if text_pair is not None else None,
                         max_length=max_length)[0]


# ---- rendering ----------------------------------------------------------------------------------------------------
def _display(token: str) -> tuple[str, bool]:
    """(text to show, whether it continues the previous word) for WordPiece/BPE/SentencePiece tokens."""
    if token.startswith("##"):
        return token[2:], True
    for marker in ("Ġ", "▁"):  # GPT-2 byte-level BPE / SentencePiece word starts
        if token.startswith(marker):
            return token[len(marker):] or marker, False
    return token.replace("Ċ", "\\n"), False


def to_html(pairs: TokenWeights, title: str | None = None) -> str:
    """A self-contained HTML page: tokens shaded by weight (darkest = largest), weights in tooltips."""
    top = max((w for _, w in pairs), default=0.0) or 1.0
    spans = []
    for i, (token, w) in enumerate(pairs):
        text, joined = _display(token)
        alpha = max(0.0, min(1.0, w / top))
        sep = "" if joined or i == 0 else " "
        spans.append(
            f'{sep}<span class="tok" style="background: rgba(214, 39, 40, {alpha:.3f})" '
            f'title="{html.escape(token)}: {w:.4f}">{html.escape(text)}</span>'
        )
    heading = html.escape(title or "ID-SPAM: which input tokens shaped the prompt")
    rows = "".join(
        f"<tr><td>{i}</td><td><code>{html.escape(t)}</code></td><td>{w:.4f}</td></tr>" for i, (t, w) in enumerate(pairs)
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + heading + "</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:2}"
        ".tok{padding:.1em .15em;border-radius:.2em}table{border-collapse:collapse;line-height:1.3}"
        "td{padding:.1em .8em;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h2>{heading}</h2><p>{''.join(spans)}</p>"
        "<p><small>Shade = pooled self-attention weight of the ID-SPAM generator: the attention each real input "
        "token receives, averaged over all real query tokens (weights sum to 1). Darkest = "
        f"{top:.4f}.</small></p><details><summary>weights</summary><table>"
        f"<tr><th>#</th><th>token</th><th>weight</th></tr>{rows}</table></details></body></html>\n"
    )


def write_html(pairs: TokenWeights, path: str | Path, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(pairs, title), encoding="utf-8")
    return path


def write_png(pairs: TokenWeights, path: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """A bar chart of the weights with a heat strip above it, one column per token (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "$" would switch matplotlib to mathtext.
    labels = [_display(t)[0].replace("$", r"\$") for t, _ in pairs]
    weights = [w for _, w in pairs]
    n = len(pairs)
    fig = Figure(figsize=(max(4.0, 0.38 * n + 1.5), 3.6))
    FigureCanvasAgg(fig)  # rendering without pyplot: no global backend state is touched
    strip, bars = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 4]})
    strip.imshow([weights], aspect="auto", cmap="Reds", vmin=0, vmax=max(weights, default=1) or 1,
                 extent=(-0.5, n - 0.5, 0, 1))
    strip.set_yticks([])
    bars.bar(range(n), weights, color="tab:red")
    bars.set_xticks(range(n))
    bars.set_xticklabels(labels, rotation=90, fontsize=8)
    bars.set_xlim(-0.5, n - 0.5)
    bars.set_ylabel("pooled attention")
    strip.set_title(title or "ID-SPAM: which input tokens shaped the prompt", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def write(pairs: TokenWeights, path: str | Path, title: str | None = None) -> Path:
    """Write ``pairs`` as HTML (.html/.htm) or PNG (.png), chosen by the file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        return write_html(pairs, path, title)
    if suffix == ".png":
        return write_png(pairs, path, title)
    raise ValueError(f"unsupported output {path!s}: use a .html or .png file name")


__all__ = ["explain", "explain_batch", "generator_inputs", "to_html", "write", "write_html", "write_png"]
