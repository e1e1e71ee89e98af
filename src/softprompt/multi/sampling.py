"""How one generated token is chosen: greedy, or drawn with temperature and top-p from a request's own generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request decodes. ``temperature`` 0 is greedy; ``seed`` makes sampling reproducible whatever the
    batch the request shares; ``stop`` strings end the text (excluded from it); ``stop_token_ids`` default to the
    model's EOS ids."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row's logits [V]: the argmax when ``temperature`` is 0, else a draw from the
    tempered distribution cut to its top-p mass, made on the host with the request's own generator (so a seeded
    request draws the same tokens whatever batch it shares)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
