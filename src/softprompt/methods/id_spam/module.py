"""ID-SPAM (Muppidi, Nandy, Bandyopadhyay, ACL 2025, arXiv 2506.05629): input-dependent soft prompts.

A small trainable network reads the frozen model's *token embeddings* of the input and generates t prompt vectors
that are inserted in front of the input of one transformer layer m (spec ``specs/id_spam.md``):

    E  = word embeddings of the input               [B, N, n]   (frozen; no positions, no LayerNorm by default)
    O  = softmax((E W_Q)(E W_K)^T / sqrt(n)) (E W_V) [B, N, n]   one head, d_k = n, padding keys masked (Eq. 1)
    A  = mean of O over the real (non-pad) tokens    [B, n]
    S  = resize( act( W_up relu(W_down A + b_down) + b_up ), [t, n] )                        (Eq. 2)

``act`` is ReLU (the paper's Eq. 2) or the identity (the paper's prose); see ``up_activation``.

Because the softmax rows are averaged before they meet V, A = sum_j w_j (E W_V)_j with
w_j = mean over real queries q of softmax_q(j): w is a distribution over the real input tokens that says exactly how
much each token's value vector shapes the prompt. :meth:`IDSPAM.token_weights` returns it (used by
``softprompt.methods.id_spam_explain``).

Insertion is done by the engine (``Contribution.insertion``): encoders get S concatenated into the hidden states
before layer m (after [CLS]/<s> by default; the engine strips the rows after the last layer so heads read the
usual positions); causal decoders get the equivalent key/value prefixes of layers m..L-1 (S run alone through those
layers at positions 0..t-1, real tokens keep positions 0..N-1), which generate() computes once from the prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from ...engine.injector import ModelInfo
from ...engine.state import InjectionState, Insertion
from ...pooling import masked_mean
from ..base import (
    Contribution,
    HookShape,
    MethodInputs,
    PromptMethod,
)
from .config import IDSPAMConfig


def _attention_probs(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities [B, Nq, Nk] of one head of width n (scale 1/sqrt(n), the paper's
    1/sqrt(d_k)); ``keys`` [B, Nk] bool marks the keys that may be attended to."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.masked_fill(~keys[:, None, :], float("-inf")).softmax(-1)


class IDSPAM(PromptMethod):
    """The ID-SPAM prompt generator. Parameters: ``q``/``k``/``v`` (n x n), ``down`` (n -> c), ``up`` (c -> t n)."""

    def __init__(self, config: IDSPAMConfig, info: ModelInfo):
        super().__init__(config, info)
        n, t, c = info.hidden_size, config.num_virtual_tokens, config.bottleneck
        self.layer = config.insert_layer(info.num_layers)
        # Seeded init that leaves the global RNG untouched (the default nn.Linear init draws from it).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.pooling == "attention":
                self.q = nn.Linear(n, n, bias=config.qkv_bias)
                self.k = nn.Linear(n, n, bias=config.qkv_bias)
                self.v = nn.Linear(n, n, bias=config.qkv_bias)
            self.down = nn.Linear(n, c, bias=config.down_bias)
            self.up = nn.Linear(c, t * n, bias=config.up_bias)
        self.drop = nn.Dropout(config.dropout)

    # ---- the generator ----------------------------------------------------------------------------------------
    def _masks(self, attention_mask: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(key mask, query mask), both bool [B, N]. A row without any real token attends everywhere (no NaN)."""
        batch, length = shape[0], shape[1]
        if attention_mask is None or not self.config.mask_padding:
            ones = torch.ones(batch, length, dtype=torch.bool, device=self._device())
            return ones, ones
        real = attention_mask.to(device=self._device()).bool()
        keys = real | ~real.any(-1, keepdim=True)
        return keys, real

    def _device(self) -> torch.device:
        return self.up.weight.device

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(x), self.k(x), self.v(x)

    def pool(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A [B, n]: Eq. 1 (single-head self-attention, masked mean over real tokens), or the plain mean."""
        x = embeddings.to(device=self._device(), dtype=self.up.weight.dtype)
        keys, queries = self._masks(attention_mask, x.shape)
        if self.config.pooling == "attention":
            q, k, v = self._project(x)
            # One head of width n, written out rather than through SDPA: B x N x N scores are small here, and
            # CUDA's memory-efficient SDPA kernel (the one a masked single wide head gets) has a non-deterministic
            # backward, which made ID-SPAM's GPU runs differ between repeats of the same seed.
            x = _attention_probs(q, k, keys) @ v
        return masked_mean(x, queries)  # in x's dtype: bf16 under autocast

    def generate_prompt(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """S [B, t, n] from the generator's input embeddings [B, N, n] and the padding mask [B, N] (Eq. 1-2)."""
        gen_drop = self.config.dropout_site == "generator"
        a = self.pool(embeddings, attention_mask)
        if gen_drop:
            a = self.drop(a)
        h = torch.relu(self.down(a))
        if gen_drop:
            h = self.drop(h)
        s = self.up(h)
        if self.config.up_activation == "relu":
            s = torch.relu(s)
        s = s.view(s.shape[0], self.config.num_virtual_tokens, self.info.hidden_size)
        return s if gen_drop else self.drop(s)

    @torch.no_grad()
    def token_weights(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled attention weights w [B, N] of the generator over the input tokens, for explanations.

        w_j = (1 / |real|) * sum over real query tokens q of softmax_q(j), the attention probability that query q
        gives key j. Since A = sum_j w_j v_j exactly, w_j is token j's share in the pooled vector that the prompt is
        generated from. Each row sums to 1 over the real tokens and is 0 on padding (with ``mask_padding``). For
        ``pooling="mean"`` it is the uniform 1 / |real|. Computed in float32 from the explicit softmax (the forward
        uses the same probabilities in the compute dtype).
        """
        x = embeddings.to(device=self._device(), dtype=torch.float32)
        keys, queries = self._masks(attention_mask, x.shape)
        qm = queries.to(x.dtype)
        if self.config.pooling == "mean":
            return qm / qm.sum(-1, keepdim=True).clamp(min=1)
        q, k, _ = (p.float() for p in self._project(x.to(self.up.weight.dtype)))
        probs = _attention_probs(q, k, keys)  # [B, Nq, Nk]
        return (probs * qm[..., None]).sum(1) / qm.sum(-1, keepdim=True).clamp(min=1)

    # ---- engine interface ---------------------------------------------------------------------------------------
    def insertion_length(self) -> int:
        return self.config.num_virtual_tokens

    def hook_shape(self) -> HookShape | None:
        if self.config.embed_source != "full":
            return None  # the prompt is made before the forward: a plain insertion, no hook
        return HookShape(insertion=(self.layer, self.config.num_virtual_tokens, self._at()))

    def _at(self) -> int:
        if self.info.is_causal:
            return 0  # ignored by the decoder route (prefixes), kept 0 for clarity
        return 1 if self.config.position == "after_cls" else 0

    def forward(self, inputs: MethodInputs) -> Contribution:
        if self.config.embed_source == "full":
            # The embedding layer's output is the hidden state entering layer 0: generate there.
            return Contribution(layer_hook=self._full_embedding_hook)
        if inputs.input_ids is None:
            raise ValueError(
                "ID-SPAM with embed_source='word' reads the word embeddings of input_ids, but the model was called "
                "with inputs_embeds only; pass input_ids or use IDSPAMConfig(embed_source='full')"
            )
        prompt = self.generate_prompt(inputs.token_embeddings(), inputs.attention_mask)
        return Contribution(insertion=Insertion(self.layer, prompt, at=self._at()))

    def _full_embedding_hook(self, index: int, hidden: torch.Tensor, state: InjectionState) -> None:
        if index != 0 or not state.needs_insertion():
            return
        mask = state.attention_mask
        if mask is not None and mask.shape[1] != hidden.shape[1]:
            mask = mask[:, -hidden.shape[1]:]
        state.insertion = Insertion(self.layer, self.generate_prompt(hidden, mask), at=self._at())
