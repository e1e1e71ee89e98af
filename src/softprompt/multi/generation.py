"""Text generation in which every row of one decoding batch carries its own adapter (or none).

    engine = GenerationEngine(model)                       # model: a MultiAdapterModel on a causal LM
    rid = engine.submit(prompt_ids, "summarise", SamplingParams(max_new_tokens=64, temperature=0.7, seed=1))
    while engine.busy:
        for event in engine.step(): ...                    # TokenEvent(request_id, token_id, finish_reason)

Iteration-level batching: requests wait in a queue; before each decoding step, waiting requests are prefilled and
join the batch, and after it, rows that finished (EOS, a stop string, ``max_new_tokens``) leave. Joining requests
share prefill passes whatever their prompt lengths (left-padded, within a padding cap) wherever their adapters can
share a pass (``multi.plan``, as for classification: bare rows, prompts, prefixes and gates together, insertions of
one shape together); each row computes what its adapter's own ``generate()`` computes for it alone. From then on a
row's adapter is the per-layer prefix that prefill produced (gates folded in, generated prompts already turned into
prefixes, see ``engine.compose.resolved_prefixes``), so rows of any method share one decoding batch and the KV cache
holds each row's own sequence: its real tokens, plus the virtual tokens of an input-layer prompt (prompt tuning,
P-tuning), which are part of the sequence in their own ``generate()`` too. Rows are left-padded in the shared cache;
positions count each row's own tokens, so padding changes nothing.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..engine.compose import Part, compose, insert_row_prompts
from ..engine.state import STATE_KWARG
from ..errors import ConfigError, SequenceTooLongError
from .batch_prefixes import BatchPrefixes
from .decode_batch import DynamicBatch
from .plan import group_key, plan_rows
from .sampling import SamplingParams, sample_token
from .static_batch import StaticBatch, check_buffer_size, choose_decoding

__all__ = ["GenerationEngine", "SamplingParams", "TokenEvent"]


@dataclass
class TokenEvent:
    """One new token of one request; ``finish_reason`` is "stop" or "length" on its last token, else None."""

    request_id: int
    token_id: int
    finish_reason: str | None = None


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_at: int | None = None  # character index of the first stop string in the decoded text


@dataclass
class _Row:
    request: _Request
    position: int  # position id of the row's next token


class GenerationEngine:
    """Continuous batching over a :class:`~softprompt.multi.MultiAdapterModel` whose base is a causal LM.

    ``max_rows``: rows decoded together (waiting requests join as rows leave).
    ``max_prefill_tokens``: tokens one prefill pass may hold, padding included (a longer single prompt still runs,
        alone); bounds the activation memory of many requests joining at once.
    ``max_prefill_padding``: the largest share of a pass's tokens that may be padding when prompts of different
        lengths share a pass; 0 prefills each length on its own.
    ``decoding``: "dynamic" (a cache that grows by one column per step), or fixed-shape buffers of ``max_context``
        columns: "static" (eager), "cuda_graphs" (each step replays a CUDA graph captured once per batch-size bucket;
        eager off CUDA); "auto" picks one (``static_batch.choose_decoding``) and says why in ``decoding_reason``.
    ``policy``: "mixed" (any adapter joins any batch) or "per_adapter" (a batch holds one adapter's rows; when it
        drains, the adapter of the oldest waiting request goes next), the schedule a server without per-row
        adapters must follow, kept as the baseline of the serving benchmark.
    """

    def __init__(self, model, *, max_rows: int = 32, policy: str = "mixed", max_prefill_tokens: int = 8192,
                 max_prefill_padding: float = 0.5, decoding: str = "auto", max_context: int = 2048):
        if policy not in ("mixed", "per_adapter"):
            raise ConfigError(f"policy must be 'mixed' or 'per_adapter', got {policy!r}")
        self.policy = policy
        if not model.info.is_causal or not hasattr(model.base_model, "lm_head"):
            raise ConfigError(f"generation needs a causal language model; {type(model.base_model).__name__} is not "
                              "one (load the MultiAdapterModel with task_kind='causal_lm')")
        self.model = model
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        if not 0 <= max_prefill_padding < 1:
            raise ConfigError(f"max_prefill_padding is a fraction in [0, 1), got {max_prefill_padding}")
        self.max_prefill_padding = max_prefill_padding
        self.waiting: deque[_Request] = deque()
        self.rows: list[_Row] = []
        self._next_id = 0
        self.requests: dict[int, _Request] = {}
        # transformers 5.24+ names the KV cache argument `cache`; 5.17 knows only `past_key_values`.
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if decoding not in ("auto", "dynamic", "static", "cuda_graphs"):
            raise ConfigError(f"decoding must be 'auto', 'dynamic', 'static' or 'cuda_graphs', got {decoding!r}")
        # The rows' caches, masks and prefixes: grown step by step, or fixed buffers a CUDA graph can replay.
        # No request can use more columns than the model has positions (``check``): no buffer needs them.
        max_context = min(max_context, model.info.max_positions or max_context)
        widest = max((max(model.adapter(n).shape.prefix, default=0) for n in model.adapter_names), default=0)
        decoding, self.decoding_reason = (choose_decoding(model, max_rows, max_context, widest)
                                          if decoding == "auto" else (decoding, f"decoding={decoding!r} (as asked)"))
        self.decoding = decoding
        if decoding != "dynamic":
            check_buffer_size(model, max_rows, max_context, widest)
        self._checked_prefix = 0 if decoding == "dynamic" else widest  # what the check counted (_check_prefix_room)
        self.max_context = None if decoding == "dynamic" else max_context
        self.batch = (DynamicBatch(model, self._cache_arg) if decoding == "dynamic" else
                      StaticBatch(model, self._cache_arg, max_rows, max_context, cuda_graphs=decoding == "cuda_graphs"))
        eos = model.base_model.generation_config.eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or decoding."""
        return bool(self.waiting or self.rows)

    # ---- requests ----------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], adapter: str | None = None, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Checked now: the adapter exists and the request fits the context."""
        params = params or SamplingParams()
        self.check(prompt_ids, adapter, params)
        generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator(device="cpu").manual_seed(seed)
        request = _Request(self._next_id, list(prompt_ids), adapter, params, generator)
        self._next_id += 1
        self.requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def check(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> None:
        """Raise a one-line error if the request cannot run: empty prompt, unknown adapter, bad sampling values,
        or prompt + adapter positions + max_new_tokens beyond the model's context."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if params.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        extra = 0
        if adapter is not None:
            entry = self.model.adapter(adapter)
            extra = entry.shape.prompt + entry.method.position_shift()
            self._check_prefix_room(adapter, max(entry.shape.prefix, default=0))
        limit = self.model.info.max_positions
        needed = len(prompt_ids) + extra + params.max_new_tokens
        if self.max_context is not None and needed > self.max_context:
            raise SequenceTooLongError(
                f"{len(prompt_ids)} prompt tokens + {extra} adapter positions + max_new_tokens "
                f"{params.max_new_tokens} = {needed} exceeds the engine's max_context of {self.max_context} (its "
                f"fixed decoding buffers); lower max_tokens to at most {self.max_context - len(prompt_ids) - extra}")
        if limit is not None and needed > limit:
            raise SequenceTooLongError(
                f"{len(prompt_ids)} prompt tokens + {extra} adapter positions + max_new_tokens "
                f"{params.max_new_tokens} = {needed} exceeds the model's context of {limit}; lower max_tokens to at "
                f"most {limit - len(prompt_ids) - extra}"
            )
        if not 0 <= params.temperature <= 100 or not 0 < params.top_p <= 1:
            raise ConfigError(f"temperature must be in [0, 100] and top_p in (0, 1], got {params.temperature} and "
                              f"{params.top_p}")
        if params.seed is not None and not -(2**63) <= params.seed < 2**64:  # what torch.Generator takes
            raise ConfigError(f"seed must be between -2**63 and 2**64 - 1, got {params.seed}")
        vocab = self.model.base_model.get_input_embeddings().weight.shape[0]
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")

    def _check_prefix_room(self, adapter: str, width: int) -> None:
        """An adapter loaded after the engine started may have a wider prefix than the fixed buffers were checked for:
        its first row widens them (a new buffer, the old one held while rows are copied over), so that allocation is
        checked against the free memory now, before the request is queued."""
        if self.max_context is None or width <= self._checked_prefix:
            return
        try:
            check_buffer_size(self.model, self.max_rows, self.max_context, width)
        except ConfigError as exc:
            raise ConfigError(f"adapter {adapter!r} has {width} prefix columns, more than the {self._checked_prefix} "
                              f"the fixed decoding buffers were sized for, and widening them does not fit: {exc}; or "
                              "start the engine with this adapter loaded") from None
        self._checked_prefix = width

    def stop_ids(self, params: SamplingParams) -> list[int]:
        """The token ids that end a request: its own ``stop_token_ids``, else the model's EOS ids."""
        return params.stop_token_ids if params.stop_token_ids is not None else self.eos_ids

    def result(self, request_id: int) -> list[int]:
        """The tokens generated so far for a request (stop strings are cut by the caller, see ``stop_text_at``)."""
        return list(self.requests[request_id].tokens)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's record."""
        self.requests.pop(request_id, None)

    # ---- one iteration -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (prefill: their first token), decode one token for every other row, and retire
        the rows that finished. Returns the new tokens in order."""
        events: list[TokenEvent] = []
        decoded = bool(self.rows)
        if decoded:
            events += self._decode()
        joining: list[_Request] = []
        while len(self.rows) + len(joining) < self.max_rows:
            request = self._next_waiting(joining)
            if request is None:
                break
            joining.append(request)
        if joining:
            first: dict[int, TokenEvent] = {}
            for group in self._prefill_groups(joining):
                first.update((e.request_id, e) for e in self._prefill(group))
            events += [first[r.id] for r in joining]
        if decoded or joining:
            self._retire()
        return events

    def _next_waiting(self, joining: list[_Request]) -> _Request | None:
        if not self.waiting:
            return None
        batch = [r.request for r in self.rows] + joining
        if self.policy == "mixed" or not batch:
            return self.waiting.popleft()
        current = batch[0].adapter
        for i, request in enumerate(self.waiting):
            if request.adapter == current:
                del self.waiting[i]
                return request
        return None

    def _prefill_groups(self, joining: list[_Request]) -> list[list[_Request]]:
        """Requests that can be prefilled in one forward pass, whatever their prompt lengths: rows whose adapters can
        share a pass (``multi.plan``: bare rows, prompts, prefixes and gates mix; insertions of one shape mix) are
        left-padded to one width (masked; positions count each row's own tokens), prompts placed per row and prefixes
        stacked row by row. Adapters with a layer hook nobody described prefill per (adapter, prompt length),
        unpadded. A pass holds at most ``max_prefill_tokens`` tokens counting padding, of which at most
        ``max_prefill_padding`` may be padding; longer prompts go first. With fixed decoding buffers, every row's
        padded prompt plus its new tokens fits ``max_context``."""
        keys = []
        for request in joining:
            shape = None if request.adapter is None else self.model.adapter(request.adapter).shape
            key = group_key(request.adapter, shape, self.model.info.num_layers)
            keys.append(key + (len(request.prompt_ids),) if key[0] == "solo" else key)
        passes = []
        for rows in plan_rows(keys):
            current: list[_Request] = []
            real = 0
            for request in sorted((joining[i] for i in rows), key=lambda r: -self._own_length(r)):
                n = self._own_length(request)
                group = current + [request]
                padded = self._width(group) * len(group)
                # Fixed decoding buffers: a row padded to the pass's width must still fit its new tokens.
                span = self._width(group) + max(r.params.max_new_tokens for r in group)
                if current and (padded > self.max_prefill_tokens or span > (self.max_context or span)
                                or padded - real - n > self.max_prefill_padding * padded):
                    passes.append(current)
                    current, real = [], 0
                current.append(request)
                real += n
            passes.append(current)
        return passes

    def _prompt_length(self, request: _Request) -> int:
        return 0 if request.adapter is None else self.model.adapter(request.adapter).shape.prompt

    def _own_length(self, request: _Request) -> int:
        """Columns of the row's own sequence in a prefill pass: its tokens and its adapter's input prompt."""
        return len(request.prompt_ids) + self._prompt_length(request)

    def _width(self, group: list[_Request]) -> int:
        """Columns of a prefill pass (``insert_row_prompts``: the longest prompt plus the longest input prompt)."""
        return max(len(r.prompt_ids) for r in group) + max(self._prompt_length(r) for r in group)

    def run(self) -> None:
        """Step until every request has finished."""
        while self.busy:
            self.step()

    def _prefill(self, group: list[_Request]) -> list[TokenEvent]:
        """One forward pass over a group of :meth:`_prefill_groups`; each request's row is computed as its adapter's
        own ``generate()`` computes it, and the unfinished rows join the batch."""
        model = self.model
        base = model.base_model
        device = model.device
        n = len(group)
        width = max(len(r.prompt_ids) for r in group)
        pads = [width - len(r.prompt_ids) for r in group]  # left padding: every row's last token in the last column
        rows_of: dict[str, list[int]] = {}
        for i, request in enumerate(group):
            if request.adapter is not None:
                rows_of.setdefault(request.adapter, []).append(i)
        methods = {name: model.adapter(name).method for name in rows_of}
        shifts = [0 if r.adapter is None else methods[r.adapter].position_shift() for r in group]
        ids, mask, shift, *indices = _to_device(
            device, [[0] * pad + r.prompt_ids for pad, r in zip(pads, group)],
            [[0] * pad + [1] * (width - pad) for pad in pads], shifts, *rows_of.values())
        inputs: dict = {"input_ids": ids, "attention_mask": mask}
        embed = base.get_input_embeddings()
        parts = []
        for name, index in zip(rows_of, indices):
            contribution = model.adapter(name).contribution(ids, mask, index, embed)
            parts.append(Part(contribution, index, methods[name].hook_shape()))
        prompts = [(p.rows, p.contribution.input_prompt, p.contribution.prompt_at) for p in parts
                   if p.contribution.input_prompt is not None]
        if prompts:  # slots for shorter prompts join the left padding; each prompt stays next to its row's tokens
            inputs = insert_row_prompts(embed(ids), mask, prompts, causal=True)
            del inputs["keep"]
            mask = inputs["attention_mask"]
        state = compose(parts, n, mask, dtype=base.dtype) if parts else None
        # Positions count each row's own tokens (padding and slots, which nothing attends to, get 0).
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0) + shift[:, None]
        cache = DynamicCache()
        kwargs = {STATE_KWARG: state} if state is not None else {}
        kwargs[self._cache_arg] = cache
        out = base(**inputs, use_cache=True, logits_to_keep=1, **kwargs)
        tokens = self._next_tokens(out.logits[:, -1], group)
        block = BatchPrefixes.from_state(state, n, cache.layers[0].keys.dtype, device)
        rows = [_Row(request, shifts[i] + self._own_length(request)) for i, request in enumerate(group)]
        events = [self._accept(row, token) for row, token in zip(rows, tokens)]
        joined = [i for i, e in enumerate(events) if e.finish_reason is None]
        if joined:
            if len(joined) < n:
                index = torch.tensor(joined, device=device)
                cache.batch_select_indices(index)
                mask = mask[index]
                block = None if block is None else block.select(index)
            self.batch.join(cache, mask, block)
            self.rows.extend(rows[i] for i in joined)
        return events

    def _decode(self) -> list[TokenEvent]:
        device = self.model.device
        last, positions = _to_device(device, [[r.request.tokens[-1]] for r in self.rows],
                                     [[r.position] for r in self.rows])
        logits = self.batch.forward(last, positions)
        tokens = self._next_tokens(logits, [r.request for r in self.rows])
        events = []
        for row, token in zip(self.rows, tokens):
            row.position += 1
            events.append(self._accept(row, token))
        return events

    def _next_tokens(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """Each row's next token. One device-to-host copy for the batch, not one per row: greedy rows take the
        argmax on the device, sampled rows draw on the host from their own generators."""
        greedy = logits.argmax(-1).tolist()
        sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0]
        host = dict(zip(sampled, logits[sampled].float().cpu())) if sampled else {}
        return [sample_token(host[i], r.params, r.generator) if i in host else greedy[i]
                for i, r in enumerate(requests)]

    # ---- rows ----------------------------------------------------------------------------------------------------
    def _accept(self, row: _Row, token: int) -> TokenEvent:
        request = row.request
        request.tokens.append(token)
        params = request.params
        stop_ids = self.stop_ids(params)
        reason = None
        if token in stop_ids:
            reason = "stop"
        elif params.stop and self.model.tokenizer is not None:
            text = self.model.tokenizer.decode(request.tokens, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                request.stop_text_at, reason = min(hits), "stop"
        if reason is None and len(request.tokens) >= params.max_new_tokens:
            reason = "length"
        request.finish_reason = reason
        return TokenEvent(request.id, token, reason)

    def _retire(self) -> None:
        """Drop the rows that finished (the batch keeps the others' caches and prefixes)."""
        keep = [i for i, r in enumerate(self.rows) if r.request.finish_reason is None]
        if len(keep) < len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]


def _to_device(device: torch.device, *values: list) -> list[torch.Tensor]:
    """Integer lists (flat, or rows of one length) as tensors on ``device``, from one non-blocking host-to-device
    copy. A blocking copy waits until the device has finished its queue, so one per tensor made the host wait for
    the previous step's work several times per step."""
    shapes = [(len(v), len(v[0])) if v and isinstance(v[0], list) else (len(v),) for v in values]
    flat = [x for v, shape in zip(values, shapes) for x in (v if len(shape) == 1 else (y for row in v for y in row))]
    sizes = [shape[0] * (shape[1] if len(shape) == 2 else 1) for shape in shapes]
    packed = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
    return [t.view(shape) for t, shape in zip(packed.split(sizes), shapes)]

