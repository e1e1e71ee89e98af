"""The one composer: method contributions in, the per-forward :class:`InjectionState` (and model inputs) out.

Every caller builds its state here: :class:`~softprompt.model.SoftPromptModel` (one method for every row), the
multi-adapter model (each adapter's contribution on its own rows), and the prefix-representation encoder (one prefix
per row). A new ``Contribution`` field is therefore taught to this file only.

A contribution's tensors carry a batch dimension of 1 (shared by its rows) or of its own row count. With one part
covering the whole batch, the contribution passes through unchanged, except that prefixes of one shape are cast and
expanded to the batch for all layers in one operation (``_batched``); with several, prefixes are stacked row by row
(padded and hidden by ``prefix_mask`` when lengths differ), insertions stacked, gates merged, and layer hooks run on
their own rows. Per-forward work done here is work that the attention function does not repeat in every layer call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .attention import gated_prefix
from .state import InjectionState, Insertion, LayerHook, LayerInjection


@dataclass
class Contribution:
    """What a method adds to one forward pass.

    input_prompt: [B or 1, t, hidden] vectors placed in front of the token embeddings (position ``prompt_at``).
    prefixes: layer index -> (key, value), each [B or 1, H_kv, P, D].
    prefix_mask: layer index -> [B or 1, P] bool, True where a row sees that prefix column (absent: every column);
        lets rows of one contribution carry prefixes of different lengths, or none (a decoding batch's rows).
    insertion: vectors inserted into the hidden states before one layer.
    layer_hook: called with each layer's input hidden states (gates, prompts generated inside the forward).
    """

    input_prompt: torch.Tensor | None = None
    prompt_at: int = 0
    prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prefix_mask: dict[int, torch.Tensor] = field(default_factory=dict)
    insertion: Insertion | None = None
    layer_hook: LayerHook | None = None


@dataclass(frozen=True)
class HookShape:
    """What a method's layer hook does, declared by the method so that the composer can mix its rows with others.

    gate: "kv" / "v" when the hook gates the method's own prefixes (APT), else None.
    insertion: (layer, length, position) when the hook inserts vectors it generates inside the forward (LPT's
        generator, ID-SPAM on full embeddings), else None.
    """

    gate: str | None = None
    insertion: tuple[int, int, int] | None = None


@dataclass
class Part:
    """One contribution and the rows it applies to (``rows`` None = every row of the batch; indices ascending, so a
    part that names every row names them in batch order)."""

    contribution: Contribution
    rows: torch.Tensor | None = None
    hook: HookShape | None = None


def compose(parts: Sequence[Part], batch: int, attention_mask: torch.Tensor | None = None, *,
            replays: bool = False, dtype: torch.dtype | None = None) -> InjectionState:
    """The injection state of one forward pass of ``batch`` rows.

    Rows that no part names run bare (no prefix, gate 1). Input-layer prompts are not part of the state: they change
    the model inputs (see :func:`insert_prompt` and :func:`insert_row_prompts`). ``dtype``: the dtype attention
    computes in (the model's; autocast's wins when it is on). Several parts' prefixes are then stacked straight into
    it, so that no layer casts them (fp32 adapters on a bf16 model); None keeps the prefixes' own.
    """
    state = InjectionState(attention_mask=attention_mask, replays=replays)
    if len(parts) == 1 and (parts[0].rows is None or len(parts[0].rows) == batch):
        only = parts[0].contribution  # one method for every row: its tensors are used as they are
        joint = only.layer_hook is not None  # a hook may gate the prefixes (APT): give it key and value as one
        for i, (k, v, kv) in _batched(only.prefixes, batch, joint).items():
            state.layers[i] = LayerInjection(key=k, value=v, prefix_mask=only.prefix_mask.get(i), key_value=kv)
        state.insertion, state.layer_hook = only.insertion, only.layer_hook
        return state
    covered = sum(len(p.rows) for p in parts) == batch
    _stack_prefixes(batch, parts, covered, state, dtype)
    _insertions_and_hooks(batch, parts, state, attention_mask)
    return state


def compute_dtype(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype attention will see for prefixes like ``t``: autocast's when it is on for ``t``'s device, else
    ``dtype`` (the model's, when the caller knows it), else ``t``'s own (attention casts whatever still differs, e.g.
    fp32 prefixes of a model loaded in bf16)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else (dtype or t.dtype)


def _batched(prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: int, joint: bool = False
             ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Shared prefixes ([1, H, P, D], one shape for every layer) cast and expanded to ``batch`` rows for all layers
    at once: one stack, one cast and one expand (one autograd node each, whose backward sums the batch once) instead
    of a cast and an expand per key and value in every layer call. Other prefixes pass through unchanged.

    layer -> (key, value, key_value): with ``joint``, key_value is the layer's key and value as one [2, batch, H, P,
    D] view of the same stack (``LayerInjection.key_value``: a gate on both is then one multiply), else None."""
    tables = [t for kv in prefixes.values() for t in kv]
    first = tables[0] if tables else None
    if first is None or first.shape[0] != 1 or any(t.shape != first.shape for t in tables):
        return {i: (k, v, None) for i, (k, v) in prefixes.items()}
    dtype = compute_dtype(first)
    if batch == 1 and all(t.dtype == dtype for t in tables):
        # Nothing to cast or expand: the tensors stay what they are. A caller that keeps one state over buffers it
        # rewrites between forwards (the fixed decoding buffers of multi.static_batch) needs views to stay views.
        return {i: (k, v, None) for i, (k, v) in prefixes.items()}
    stacked = torch.stack(tables).to(dtype).expand(-1, batch, -1, -1, -1)
    flat = stacked.unbind(0)
    # Key j and value j are rows 2j and 2j + 1 of the stack: pairs[j] is [2, batch, H, P, D], two ops per forward.
    pairs = stacked.unflatten(0, (-1, 2)).unbind(0) if joint else [None] * len(prefixes)
    return {i: (flat[2 * j], flat[2 * j + 1], pairs[j]) for j, i in enumerate(prefixes)}


def _stack_prefixes(g: int, parts: Sequence[Part], covered: bool, state: InjectionState,
                    dtype: torch.dtype | None = None) -> None:
    """Per-layer key/value prefixes, one row per example (padded and masked when lengths differ), in the dtype
    attention computes in (see :func:`compose`)."""
    layers = sorted({i for p in parts for i in p.contribution.prefixes})
    if not layers or _stack_all_layers(g, parts, layers, covered, state, dtype):
        return
    pick, pick_of = None, None  # row -> part index, shared by the layers
    visibility: dict[tuple, torch.Tensor] = {}  # layers whose rows see the same columns share one mask tensor
    for layer in layers:
        present = [p for p in parts if layer in p.contribution.prefixes]
        tables = [p.contribution.prefixes[layer] for p in present]
        lengths = [k.shape[-2] for k, _ in tables]
        width = max(lengths)
        masks = [p.contribution.prefix_mask.get(layer) for p in present]
        uniform = covered and len(present) == len(parts) and len(set(lengths)) == 1 and all(m is None for m in masks)
        if uniform and all(k.shape[0] == 1 and v.shape[0] == 1 for k, v in tables):
            # The common case (static tables of one length): stack the tables and pick one per row, two kernels
            # per layer whatever the number of parts.
            if pick_of != [id(p) for p in present]:
                pick, pick_of = torch.empty(g, dtype=torch.long, device=tables[0][0].device), [id(p) for p in present]
                for j, p in enumerate(present):
                    pick[p.rows] = j
            keys = torch.cat([k for k, _ in tables])
            values = torch.cat([v for _, v in tables])
            target = compute_dtype(keys, dtype)
            if keys.dtype != target:  # cast the small stacked tables, before the pick per row
                keys, values = keys.to(target), values.to(target)
            state.layers[layer] = LayerInjection(key=keys[pick], value=values[pick])
            continue
        # The rare path (lengths or masks differ): one padded buffer per layer, in the dtype attention computes in.
        k0 = tables[0][0]
        key = k0.new_zeros(g, k0.shape[1], width, k0.shape[3], dtype=compute_dtype(k0, dtype))
        value = key.clone()
        for p, (k, v), n in zip(present, tables, lengths):
            key[p.rows, :, :n] = k.expand(len(p.rows), *k.shape[1:]).to(key.dtype)
            value[p.rows, :, :n] = v.expand(len(p.rows), *v.shape[1:]).to(key.dtype)
        inj = LayerInjection(key=key, value=value)
        if not uniform:
            # Attention builds its mask once per distinct mask tensor in a forward (and in every decoding step that
            # reuses the state): equal visibility must be one tensor, not one per layer.
            signature = (width, *((id(p), n, id(own)) for p, n, own in zip(present, lengths, masks)))
            if signature not in visibility:
                visible = torch.zeros(g, width, dtype=torch.bool, device=key.device)
                for p, n, own in zip(present, lengths, masks):
                    visible[p.rows, :n] = True if own is None else own.to(device=key.device, dtype=torch.bool)
                visibility[signature] = visible
            inj.prefix_mask = visibility[signature]
        state.layers[layer] = inj


def _stack_all_layers(g: int, parts: Sequence[Part], layers: list[int], covered: bool, state: InjectionState,
                      dtype: torch.dtype | None = None) -> bool:
    """The regular case, every layer at once: each part has prefixes in every layer of ``layers``, all of one shape.
    One buffer [G, 2L, H, P_max, D] takes each part's stacked tables with one write per part, and one visibility
    mask (None when every row sees every column) serves every layer, so attention builds its mask once per forward.
    Returns False (nothing done) for other cases, which go layer by layer."""
    stacks = []
    for p in parts:
        if p.contribution.prefix_mask:
            return False
        tables = [t for i in layers if i in p.contribution.prefixes for t in p.contribution.prefixes[i]]
        if len(tables) != 2 * len(layers) or any(t.shape != tables[0].shape for t in tables):
            return False
        stack = torch.stack(tables, dim=1)  # [1 or rows, 2L, H, P, D]
        target = compute_dtype(stack, dtype)
        stacks.append(stack if stack.dtype == target else stack.to(target))  # one cast per part for every layer
    lengths = [s.shape[-2] for s in stacks]
    s0 = stacks[0]
    buf = s0.new_zeros(g, s0.shape[1], s0.shape[2], max(lengths), s0.shape[4])
    for p, s in zip(parts, stacks):
        buf[p.rows, :, :, : s.shape[-2]] = s.expand(len(p.rows), *s.shape[1:])
    visible = None
    if not covered or len(set(lengths)) > 1:
        visible = torch.zeros(g, max(lengths), dtype=torch.bool, device=buf.device)
        for p, n in zip(parts, lengths):
            visible[p.rows, :n] = True
    flat = buf.unbind(1)
    for j, i in enumerate(layers):
        state.layers[i] = LayerInjection(key=flat[2 * j], value=flat[2 * j + 1], prefix_mask=visible)
    return True


def _insertions_and_hooks(g: int, parts: Sequence[Part], state: InjectionState, mask: torch.Tensor | None) -> None:
    """Static insertions are stacked now; layer hooks (gates, generated prompts) run on their own rows."""
    inserting = [p for p in parts if p.contribution.insertion is not None]
    hooked = [p for p in parts if p.contribution.layer_hook is not None]
    spec = next((s for s in map(_insertion_spec, parts) if s is not None), None)
    if not hooked:
        if inserting:
            state.insertion = _stack_insertion(g, spec, [(p.rows, p.contribution.insertion.vectors)
                                                         for p in inserting])
        return
    # Each hooked part sees its own rows and a state of its own (its caches live there, e.g. APT's gates).
    own = [InjectionState(attention_mask=None if mask is None else mask[p.rows]) for p in hooked]
    static = [(p.rows, p.contribution.insertion.vectors) for p in inserting]

    def hook(index: int, hidden: torch.Tensor, combined: InjectionState) -> None:
        for p, mine in zip(hooked, own):
            p.contribution.layer_hook(index, hidden[p.rows], mine)
            inj = mine.layers.get(index)
            if inj is not None and inj.gate is not None and index in combined.layers:
                _merge_gate(combined.layers[index], inj, p.rows, g, p.hook.gate if p.hook else None)
        if spec is not None and index == spec[0] and combined.insertion is None:
            vectors = static + [(p.rows, mine.insertion.vectors) for p, mine in zip(hooked, own)
                                if mine.insertion is not None]
            combined.insertion = _stack_insertion(g, spec, vectors)

    state.layer_hook = hook


def _insertion_spec(part: Part) -> tuple[int, int, int] | None:
    ins = part.contribution.insertion
    if ins is not None:
        return ins.layer, int(ins.vectors.shape[1]), ins.at
    return part.hook.insertion if part.hook is not None else None


def _stack_insertion(g: int, spec: tuple[int, int, int], vectors: list[tuple[torch.Tensor, torch.Tensor]]) -> Insertion:
    """One Insertion for the batch: row r gets its own part's vectors (zeros for rows without one)."""
    layer, t, at = spec
    v0 = vectors[0][1]
    out = v0.new_zeros(g, t, v0.shape[-1])
    for rows, v in vectors:
        out[rows] = v.to(out.dtype).expand(len(rows), *v.shape[1:])
    return Insertion(layer, out, at=at)


def _merge_gate(combined: LayerInjection, own: LayerInjection, rows: torch.Tensor, g: int, mode: str | None) -> None:
    """Write one part's gate [b|1, (H,) P] into the batch's gate [G, H|1, P_max] (1 for the other rows)."""
    gate = own.gate
    gate = gate.reshape(gate.shape[0], -1 if gate.dim() > 2 else 1, gate.shape[-1])
    p = gate.shape[-1]
    width = combined.prefix_length
    current = combined.gate
    heads = gate.shape[1]
    if current is None:
        current = gate.new_ones(g, heads, width)
    elif current.shape[1] < heads:
        current = current.expand(g, heads, width).clone()
    current[rows, :, :p] = gate.expand(len(rows), current.shape[1], p).to(current.dtype)
    combined.gate = current
    combined.gate_values_only = mode == "v"


# ---- input-layer prompts ---------------------------------------------------------------------------------------------
def insert_prompt(embeds: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, at: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt [1 or B, t, d] for every row, at position ``at``: (embeddings, attention mask) grown by t."""
    batch = embeds.shape[0]
    prompt = prompt.to(embeds.dtype)
    prompt = prompt.expand(batch, *prompt.shape[1:]) if prompt.shape[0] == 1 else prompt
    embeds = torch.cat([embeds[:, :at], prompt, embeds[:, at:]], dim=1)
    ones = mask.new_ones(batch, prompt.shape[1])
    return embeds, torch.cat([mask[:, :at], ones, mask[:, at:]], dim=1)


def insert_row_prompts(emb: torch.Tensor, mask: torch.Tensor, prompts: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                       *, causal: bool, token_types: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Rows with prompts of different lengths (or none) in one batch: ``prompts`` holds (rows, prompt, at).

    Row layout (k = leading padding, T = longest prompt, t = the row's prompt, at = its position): encoders
    ``tokens[:k+at] prompt tokens[k+at:] slots(T-t)``: slots go last, so the absolute positions of real tokens are
    those of the row alone; decoders ``slots(T-t) tokens[:k+at] prompt tokens[k+at:]``: slots join the left padding
    and the prompt stays next to the real tokens, so relative (rotary) positions are those of the row alone. Slots are
    masked. Everything is built with one gather per tensor (no per-row Python loop). Returns ``inputs_embeds``,
    ``attention_mask``, ``token_type_ids`` (when given) and ``keep`` (where each real token landed).
    """
    g, n = mask.shape
    device = mask.device
    total = max(p.shape[1] for _, p, _ in prompts)
    t = torch.zeros(g, dtype=torch.long, device=device)
    at = torch.zeros(g, dtype=torch.long, device=device)
    table = emb.new_zeros(g, total, emb.shape[-1])
    for rows, prompt, where in prompts:
        t[rows] = prompt.shape[1]
        at[rows] = where
        table[rows, : prompt.shape[1]] = prompt.to(emb.dtype).expand(len(rows), *prompt.shape[1:])
    k = (mask != 0).to(torch.long).argmax(1)  # first real token (0 for right padding)
    length = n + total
    j = torch.arange(length, device=device)[None, :].expand(g, length)
    if causal:
        j = j - (total - t)[:, None]  # slots in front
    split = (k + at)[:, None]
    in_prompt = (j >= split) & (j < split + t[:, None])
    zero = n + total  # index of an all-zero source column: slots
    src = torch.where(j < split, j, torch.where(in_prompt, n + j - split, j - t[:, None]))
    src = torch.where((j < 0) | (j >= n + t[:, None]), zero, src)
    src_emb = torch.cat([emb, table, emb.new_zeros(g, 1, emb.shape[-1])], dim=1)
    out = {"inputs_embeds": src_emb.gather(1, src[..., None].expand(g, length, emb.shape[-1]))}
    prompt_mask = (torch.arange(total, device=device)[None] < t[:, None]).to(mask.dtype)
    out["attention_mask"] = torch.cat([mask, prompt_mask, mask.new_zeros(g, 1)], dim=1).gather(1, src)
    if token_types is not None:
        src_tt = torch.cat([token_types, token_types.new_zeros(g, total + 1)], dim=1)
        out["token_type_ids"] = src_tt.gather(1, src)  # prompt and slots: type 0, as SoftPromptModel
    i = torch.arange(n, device=device)[None, :]
    keep = i + torch.where(i >= split, t[:, None], 0)
    out["keep"] = keep + (total - t)[:, None] if causal else keep
    return out


def resolved_prefixes(state: InjectionState, dtype: torch.dtype, device: torch.device, rows: int = 1
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's prefix, [rows, H, P, D], as attention used it in a finished no-grad forward of ``rows`` rows:
    cast, gated, and with insertions already turned into prefixes (causal decoders). Decoding steps that reuse it
    need neither the method nor its hooks, which lets a batch mix rows whose prefixes were made by different
    methods."""
    out = {}
    for index, inj in state.layers.items():
        if inj.prefix_length:
            out[index] = gated_prefix(inj, rows, dtype, device)
    return out
