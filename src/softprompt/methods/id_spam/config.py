"""ID-SPAM's options (defaults from ``specs/id_spam.md``) and the closed form of its parameter count."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.injector import ModelInfo
from ..base import MethodConfig, require

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
    default_lr = 1e-3
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
