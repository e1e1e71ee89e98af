"""Prefix tuning / P-tuning v2 (Li & Liang, arXiv 2101.00190; Liu et al., arXiv 2110.07602).

Every selected layer gets P learned key and value vectors per key/value head, prepended inside attention.
Lengths may differ per layer (PT-2*, from APT's gates) or be 0. Optionally the prefixes are produced by a
reparameterisation MLP during training; the saved adapter always holds the projected tables (so it loads without the
MLP) plus the MLP itself (so training can resume, which PEFT cannot: huggingface/peft#2256).
"""

from __future__ import annotations

import torch
from torch import nn

from ...engine.injector import ModelInfo
from ..base import Contribution, MethodInputs, PromptMethod
from .config import PrefixConfig


class PrefixTuning(PromptMethod):
    """Per-layer key/value tables ``tables[i]`` of shape [2, H_kv, P_i, D], or an MLP that produces them."""

    reads_inputs = False

    def __init__(self, config: PrefixConfig, info: ModelInfo):
        super().__init__(config, info)
        self.lengths = config.lengths(info.num_layers)
        shape = lambda p: (2, info.num_kv_heads, p, info.head_dim)
        gen = torch.Generator().manual_seed(config.seed)
        self.tables = nn.ParameterDict(
            {str(i): nn.Parameter(torch.randn(shape(p), generator=gen) * config.init_std)
             for i, p in enumerate(self.lengths) if p > 0}
        )
        self.mlp: nn.Module | None = None
        if config.projection:
            width = 2 * info.num_kv_heads * info.head_dim
            self.tables = nn.ParameterDict()  # produced by the MLP
            # Seeded by config.seed (not the global RNG), so that the run's seed varies the MLP's init too.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.wte = nn.Embedding(max(self.lengths), info.hidden_size)
                self.mlp = nn.Sequential(
                    nn.Linear(info.hidden_size, config.projection_hidden_size), nn.Tanh(),
                    nn.Linear(config.projection_hidden_size, info.num_layers * width),
                )
        self.drop = nn.Dropout(config.dropout)

    # ---- initialisation from the frozen model ----------------------------------------------------------------
    def init_from_model(self, embed: nn.Module, tokenizer=None, capture=None) -> None:
        """``capture(input_ids) -> {layer: (key [1,H,N,D], value)}`` runs the frozen model and returns its K/V."""
        if self.mlp is not None or self.config.init == "random" or capture is None:
            return
        longest = max(self.lengths)
        if self.config.init == "text":
            if tokenizer is None:
                raise ValueError("init='text' needs a tokenizer: pass tokenizer=... to softprompt.wrap")
            ids = tokenizer(self.config.init_text, add_special_tokens=False)["input_ids"]
            ids = (ids * (longest // max(len(ids), 1) + 1))[:longest]
        else:
            vocab = embed.weight.shape[0]
            low = 1000 if vocab > 5000 else 0
            gen = torch.Generator().manual_seed(self.config.seed)
            ids = torch.randint(low, vocab, (longest,), generator=gen).tolist()
        kv = capture(torch.tensor([ids], device=embed.weight.device))
        with torch.no_grad():
            for name, table in self.tables.items():
                k, v = kv[int(name)]
                p = table.shape[2]
                table[0].copy_(k[0, :, :p].float())
                table[1].copy_(v[0, :, :p].float())

    # ---- forward -----------------------------------------------------------------------------------------------
    def layer_tables(self) -> dict[int, torch.Tensor]:
        """layer -> [2, H_kv, P, D]."""
        if self.mlp is None:
            return {int(i): t for i, t in self.tables.items()}
        info = self.info
        flat = self.mlp(self.wte.weight)  # [P_max, L*2*H*D]
        per = flat.view(flat.shape[0], info.num_layers, 2, info.num_kv_heads, info.head_dim).permute(1, 2, 3, 0, 4)
        return {i: per[i, :, :, :p] for i, p in enumerate(self.lengths) if p > 0}

    def position_shift(self) -> int:
        return max(self.lengths) if self.config.shift_positions else 0

    def forward(self, inputs: MethodInputs) -> Contribution:
        return Contribution(prefixes=key_value_pairs(self.forward_tables()))

    def forward_tables(self) -> dict[int, torch.Tensor]:
        """layer -> [2, H_kv, P, D] as this forward uses them: after dropout (training) and ``config.scale``."""
        tables = self.layer_tables()
        if self.training and self.drop.p > 0:  # else skip L no-op module calls: CPU time at small shapes
            tables = {i: self.drop(t) for i, t in tables.items()}
        scale = float(self.config.scale)
        if scale != 1.0:  # skipped at 1.0 so that the default stays bit-identical to PEFT (tests/test_parity_peft)
            tables = {i: t * scale for i, t in tables.items()}
        return tables

    # ---- saving: projected tables always, the MLP too for resuming ---------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"tables.{i}": t.detach().contiguous() for i, t in self.layer_tables().items()}
        if self.mlp is not None:
            mlp = {k: v for k, v in self.state_dict().items() if not k.startswith("tables")}
            out.update({f"mlp_state.{k}": v.detach() for k, v in mlp.items()})
        return out

    def import_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        tables = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("tables.")}
        mlp = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("mlp_state.")}
        if self.mlp is not None and mlp:
            self.load_state_dict(mlp, strict=True)
            return
        if self.mlp is not None:
            self.fold()
        self.load_state_dict({f"tables.{k}": v for k, v in tables.items()}, strict=True)

    def fold(self) -> None:
        """Replace the reparameterisation MLP by the tables it produces (inference form)."""
        if self.mlp is None:
            return
        with torch.no_grad():
            tables = {str(i): nn.Parameter(t.detach().clone()) for i, t in self.layer_tables().items()}
        self.mlp, self.wte = None, None
        self.tables = nn.ParameterDict(tables)


def key_value_pairs(tables: dict[int, torch.Tensor], scale: torch.Tensor | None = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (key, value), each [1, H, P, D], from [2, H, P, D] tables. Tables of one shape (the common case) go
    through one stack and one unbind for all layers: a slice per key and per value costs 2 ops per layer in the
    forward and more in the backward (each slice's gradient is a zero tensor with a copy), host time in every step
    of a small model. The values and gradients are the same either way.

    ``scale`` ([L, 1 or 2, 1, 1, 1], one row per table in ``tables``' order) multiplies each layer's key and value
    (or, with 2 columns, each separately): one multiply for every layer on the stacked tables (APT's lambdas)."""
    first = next(iter(tables.values()), None)
    if first is None or any(t.shape != first.shape for t in tables.values()):
        if scale is not None:  # the rare path (lengths differ): a multiply per layer
            tables = {i: t * s for (i, t), s in zip(tables.items(), scale.unbind(0))}
        return {i: (t[:1], t[1:]) for i, t in tables.items()}
    stacked = torch.stack(list(tables.values()))  # [L, 2, H, P, D]
    if scale is not None:
        stacked = stacked * scale
    flat = stacked.flatten(0, 1).unsqueeze(1).unbind(0)  # 2L x [1, H, P, D]
    return {i: (flat[2 * j], flat[2 * j + 1]) for j, i in enumerate(tables)}
