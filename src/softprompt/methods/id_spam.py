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

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.injector import ModelInfo
from ..engine.state import InjectionState, Insertion
from .base import Contribution, MethodConfig, MethodInputs, PromptMethod, require

UP_ACTIVATIONS = ("relu", "none")
DROPOUT_SITES = ("prompt", "generator")
EMBED_SOURCES = ("word", "full")
POOLINGS = ("attention", "mean")
POSITIONS = ("after_cls", "front")


@dataclass
class IDSPAMConfig(MethodConfig):
    """Options of ID-SPAM. Defaults follow ``specs/id_spam.md``; the paper fixes only t = 10.

    num_virtual_tokens: prompt length t (paper: 10).
    layer: m, the number of layers before the insertion point (0 = right after the embeddings); default the middle
        layer L // 2 (the paper finds middle layers best; m is swept in its grid).
    bottleneck: c, width of W_down. 34 is inferred from the paper's parameter counts (3n^2 + 384n), never stated.
    up_activation: "relu" applies ReLU after W_up as in the paper's Eq. 2 (prompt entries >= 0); "none" follows
        the paper's prose (no activation). The paper disagrees with itself; default "relu" per the spec.
    dropout: dropout probability (paper grid {0.1, 0.2, 0.3}; 0.1 is our pick, the chosen values are unreported).
    dropout_site: "prompt" drops entries of S (default); "generator" drops the pooled vector A and the bottleneck
        activation instead.
    embed_source: "word" feeds the generator the word embeddings only (the paper's "token embedding"); "full" feeds
        it the embedding layer's output (positions, token types, LayerNorm: whatever enters layer 0).
    pooling: "attention" (ID-SPAM) or "mean" (the paper's ablation: plain masked mean of the embeddings, no
        Q/K/V parameters).
    mask_padding: mask padding keys in the attention and padding queries in the mean (default on; off only to
        study the effect: padded batches then depend on the amount of padding).
    qkv_bias / down_bias / up_bias: the bias layout; the default (False, False, True) reproduces the paper's counts.
    position: encoders only. "after_cls" inserts S after the first token so [CLS]/<s>-reading heads read it
        unchanged; "front" inserts S before it (the spec's ``read_index=t``: the engine strips the inserted rows
        after the last layer, so the head reads the first real token). For encoders with absolute position
        embeddings the two are mathematically identical (attention is permutation-equivariant after the
        embeddings). Causal decoders always get the prompt in front (as key/value prefixes).
    seed: seed of the parameter initialisation (PyTorch ``nn.Linear`` default init, as the spec says).
    """

    method = "idspam"
    num_virtual_tokens: int = 10
    layer: int | None = None
    bottleneck: int = 34
    up_activation: str = "relu"
    dropout: float = 0.1
    dropout_site: str = "prompt"
    embed_source: str = "word"
    pooling: str = "attention"
    mask_padding: bool = True
    qkv_bias: bool = False
    down_bias: bool = False
    up_bias: bool = True
    position: str = "after_cls"
    seed: int = 0

    def validate(self, info: ModelInfo | None = None) -> None:
        require(self.num_virtual_tokens >= 1, f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        require(self.bottleneck >= 1, f"bottleneck must be >= 1, got {self.bottleneck}")
        require(self.up_activation in UP_ACTIVATIONS,
                f"up_activation must be one of {UP_ACTIVATIONS}, got {self.up_activation!r}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.dropout_site in DROPOUT_SITES,
                f"dropout_site must be one of {DROPOUT_SITES}, got {self.dropout_site!r}")
        require(self.embed_source in EMBED_SOURCES,
                f"embed_source must be one of {EMBED_SOURCES}, got {self.embed_source!r}")
        require(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        require(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        require(self.layer is None or self.layer >= 0, f"layer must be >= 0, got {self.layer}")
        if info is not None and self.layer is not None:
            require(self.layer < info.num_layers,
                    f"layer must be in 0..{info.num_layers - 1} for this model ({info.num_layers} layers), "
                    f"got {self.layer}")

    def insert_layer(self, num_layers: int) -> int:
        """m: the configured layer or the middle one."""
        return num_layers // 2 if self.layer is None else self.layer


def id_spam_parameter_count(hidden: int, t: int = 10, c: int = 34, *, qkv_bias: bool = False,
                            down_bias: bool = False, up_bias: bool = True, pooling: str = "attention") -> int:
    """Closed form of the generator's trainable parameters (spec §2).

    3n^2 (+3n with Q/K/V biases) + c n (+c with a W_down bias) + c n t (+n t with a W_up bias); the Q/K/V terms
    vanish with ``pooling="mean"``. With the defaults this is 3n^2 + 384n.
    """
    n = hidden
    qkv = (3 * n * n + (3 * n if qkv_bias else 0)) if pooling == "attention" else 0
    return qkv + c * n + (c if down_bias else 0) + c * n * t + (n * t if up_bias else 0)


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
        qm = queries[..., None].to(x.dtype)
        if self.config.pooling == "attention":
            q, k, v = self._project(x)
            # One head of width n, written out rather than through SDPA: B x N x N scores are small here, and
            # CUDA's memory-efficient SDPA kernel (the one a masked single wide head gets) has a non-deterministic
            # backward, which made ID-SPAM's GPU runs differ between repeats of the same seed.
            x = _attention_probs(q, k, keys) @ v
            qm = qm.to(x.dtype)  # bf16 under autocast
        return (x * qm).sum(1) / qm.sum(1).clamp(min=1)

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


def _register() -> None:
    from . import register_method

    register_method(IDSPAMConfig.method, IDSPAMConfig, IDSPAM)


_register()

__all__ = ["IDSPAM", "IDSPAMConfig", "id_spam_parameter_count"]
