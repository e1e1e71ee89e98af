"""One-layer linear attention with task prompts and optional per-task heads.

The model of spec section 2 (the official ``LinearAttn``), holding ``R``
independent copies ("runs", i.e. restarts) in one module so that restarts
train in parallel: every parameter has a leading run axis, the training loss
is the *sum* over runs, and since Adam is element-wise the runs stay exactly
independent.

For task ``k`` with context tokens ``z_i = [x_i; y_i]`` and query ``z = [x; 0]``::

    q = W_q z,  K = [P_k; Z] W_k^T,  V = [P_k; Z] W_v^T,
    o = (q^T K^T / sqrt(d+1)) V,  y_hat = v^T o

with ``v = e_{d+1}`` fixed, or a trainable head ``v_k`` per task. No softmax,
no residual, no 1/n, and the query is not a key (cross-attention).

:meth:`LinearAttn.forward` evaluates the same function through the Gram
matrix ``G = sum_j t_j t_j^T`` of the key/value tokens::

    y_hat = (W_k^T W_q z)^T G (W_v^T v) / sqrt(d+1),

which costs ``O((d+1)^2)`` per prompt and run instead of ``O(n (d+1)^2)``
(associativity only; :meth:`LinearAttn.forward_tokens` is the literal
token-level version and the tests check both agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .sampling import TaskBatch

__all__ = ["LinearAttn", "tokens"]


def tokens(batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Context tokens ``Z = [X, y]``, shape ``(..., B, n, d+1)``, and query tokens ``[x; 0]``, ``(..., B, d+1)``."""
    Z = torch.cat([batch.X, batch.y[..., None]], dim=-1)
    zq = torch.cat([batch.xq, torch.zeros_like(batch.xq[..., :1])], dim=-1)
    return Z, zq


class LinearAttn(nn.Module):
    """``runs`` independent one-layer linear-attention models (spec section 2).

    Args:
        d: input dimension (tokens have ``d + 1`` entries).
        num_tasks: K.
        runs: number of independent copies trained in parallel.
        prompt_len: prompt tokens per task (``m``; 0 disables prompts).
        heads: if True, a trainable readout ``v_k`` per task replaces ``e_{d+1}``.
        generator: optional RNG for the PyTorch-default-like initialisation
            (``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); prompts N(0, 1)).
    """

    def __init__(
        self,
        d: int,
        num_tasks: int,
        runs: int = 1,
        prompt_len: int = 1,
        heads: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        D = d + 1
        self.d, self.D, self.K, self.runs = d, D, num_tasks, runs
        self.prompt_len = prompt_len
        bound = 1.0 / math.sqrt(D)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.Wq = uniform(runs, D, D)
        self.Wk = uniform(runs, D, D)
        self.Wv = uniform(runs, D, D)
        self.prompts = (
            nn.Parameter(torch.randn(runs, num_tasks, prompt_len, D, generator=generator)) if prompt_len > 0 else None
        )
        self.heads = uniform(runs, num_tasks, D) if heads else None
        readout = torch.zeros(D)
        readout[-1] = 1.0
        self.register_buffer("readout", readout)

    # ----------------------------------------------------------------- pieces
    def attention_parameters(self) -> list[nn.Parameter]:
        """``W_q, W_k, W_v`` (what PT trains and FT freezes)."""
        return [self.Wq, self.Wk, self.Wv]

    def task_parameters(self) -> list[nn.Parameter]:
        """Prompts and heads (whichever exist)."""
        return [p for p in (self.prompts, self.heads) if p is not None]

    def _value_readout(self, k: int) -> torch.Tensor:
        """``w = W_v^T v`` per run, shape ``(R, D)``."""
        if self.heads is None:
            return self.Wv[:, -1, :]  # W_v^T e_{d+1} is the last row of W_v
        return torch.einsum("rij,ri->rj", self.Wv, self.heads[:, k])

    def forward(
        self,
        k: int,
        Z: torch.Tensor | None,
        zq: torch.Tensor,
        gram: torch.Tensor | None = None,
        use_prompt: bool = True,
    ) -> torch.Tensor:
        """Predictions ``(R, B)`` for task ``k``.

        Args:
            k: task index (selects the prompt and head).
            Z: context tokens ``(B, n, D)`` (unused when ``gram`` is given).
            zq: query tokens ``(B, D)``, shared by all runs.
            gram: optional precomputed ``Z^T Z``: ``(B, D, D)`` shared by all
                runs, or ``(g, B, D, D)`` with ``R`` divisible by ``g``, run
                ``r`` using group ``r // (R // g)`` (so that runs at different
                context lengths train in one step).
            use_prompt: prepend the task prompt (False gives the plain model).
        """
        if gram is None:
            gram = Z.transpose(1, 2) @ Z
        dt = zq.dtype
        R, D = self.runs, self.D
        groups = 1 if gram.dim() == 3 else gram.shape[0]
        if R % groups:
            raise ValueError(f"{R} runs cannot be split into {groups} gram groups")
        w = self._value_readout(k).to(dt)  # (R, D)
        qk = torch.einsum("rji,rjl,bl->rbi", self.Wk.to(dt), self.Wq.to(dt), zq)  # W_k^T W_q z
        if groups == 1:
            gw = torch.einsum("bij,rj->rbi", gram.reshape(-1, D, D), w)
        else:
            gw = torch.einsum("gbij,grj->grbi", gram, w.view(groups, R // groups, D)).reshape(R, -1, D)
        if use_prompt and self.prompts is not None:
            P = self.prompts[:, k].to(dt)  # (R, m, D)
            gw = gw + torch.einsum("rmi,rmj,rj->ri", P, P, w)[:, None, :]
        return (qk * gw).sum(-1) / math.sqrt(D)

    def forward_all(self, gram: torch.Tensor, zq: torch.Tensor, use_prompt: bool = True) -> torch.Tensor:
        """Predictions ``(R, K, B)`` for all tasks at once (the training path).

        Args:
            gram: ``Z^T Z`` per task, ``(K, B, D, D)``, or per task and group
                ``(K, g, B, D, D)`` with run ``r`` in group ``r // (R // g)``.
            zq: query tokens per task, ``(K, B, D)``.
            use_prompt: prepend each task's prompt.
        """
        dt = zq.dtype
        R, D, K = self.runs, self.D, self.K
        if gram.dim() == 4:
            gram = gram[:, None]
        groups = gram.shape[1]
        if R % groups:
            raise ValueError(f"{R} runs cannot be split into {groups} gram groups")
        Wv = self.Wv.to(dt)
        if self.heads is None:
            w = Wv[:, -1, :][:, None, :].expand(R, K, D)
        else:
            w = torch.einsum("rij,rki->rkj", Wv, self.heads.to(dt))
        qk_mat = self.Wk.to(dt).transpose(1, 2) @ self.Wq.to(dt)  # W_k^T W_q, (R, D, D)
        qk = torch.einsum("ril,kbl->rkbi", qk_mat, zq)
        gw = torch.einsum("kgbij,grkj->grkbi", gram, w.reshape(groups, R // groups, K, D)).reshape(R, K, -1, D)
        if use_prompt and self.prompts is not None:
            P = self.prompts.to(dt)  # (R, K, m, D)
            gw = gw + torch.einsum("rkmi,rkmj,rkj->rki", P, P, w)[:, :, None, :]
        return (qk * gw).sum(-1) / math.sqrt(D)

    def forward_tokens(self, k: int, Z: torch.Tensor, zq: torch.Tensor, use_prompt: bool = True) -> torch.Tensor:
        """Literal token-level forward (reference for tests), predictions ``(R, B)``."""
        R, B = self.runs, Z.shape[0]
        T = Z[None].expand(R, *Z.shape)
        if use_prompt and self.prompts is not None:
            P = self.prompts[:, k][:, None].expand(R, B, self.prompt_len, self.D).to(Z.dtype)
            T = torch.cat([P, T], dim=2)
        q = torch.einsum("rij,bj->rbi", self.Wq.to(Z.dtype), zq)
        keys = torch.einsum("rbtj,rij->rbti", T, self.Wk.to(Z.dtype))
        vals = torch.einsum("rbtj,rij->rbti", T, self.Wv.to(Z.dtype))
        scores = torch.einsum("rbi,rbti->rbt", q, keys) / math.sqrt(self.D)
        o = torch.einsum("rbt,rbti->rbi", scores, vals)
        if self.heads is None:
            return o[..., -1]
        return torch.einsum("rbi,ri->rb", o, self.heads[:, k].to(Z.dtype))

    def predictor(self, use_prompt: bool = True, dtype: torch.dtype = torch.float64):
        """A Monte-Carlo predictor ``(k, TaskBatch) -> (R, B)`` (see :mod:`.montecarlo`)."""

        def predict(k: int, batch: TaskBatch) -> torch.Tensor:
            Z, zq = tokens(batch)
            return self.forward(k, Z.to(dtype), zq.to(dtype), use_prompt=use_prompt)

        return predict

    def reduced_view(self, k: int = 0) -> dict[str, torch.Tensor]:
        """The blocks of spec section 3 per run: ``A, a`` of ``W_KQ`` and ``u_x, u_y`` of ``w_PV`` (task ``k``'s head).

        ``W_KQ = W_q^T W_k / sqrt(d+1)`` and ``w_PV = W_v^T v``; at the plain
        optimum ``a = 0, u_x = 0`` and ``u_y A`` is the preconditioner ``W``.
        """
        with torch.no_grad():
            wkq = self.Wq.transpose(1, 2) @ self.Wk / math.sqrt(self.D)
            wpv = self._value_readout(k)
            d = self.d
            # detach: views of parameters keep requires_grad even under no_grad
            wkq, wpv = wkq.detach(), wpv.detach()
            return {"A": wkq[:, :d, :d], "a": wkq[:, :d, d], "u_x": wpv[:, :d], "u_y": wpv[:, d]}

    def subset(self, runs: Sequence[int] | slice) -> LinearAttn:
        """A copy holding only the given runs' parameters (same device and dtype)."""
        idx = list(range(self.runs))[runs] if isinstance(runs, slice) else list(runs)
        out = LinearAttn(self.d, self.K, runs=len(idx), prompt_len=self.prompt_len, heads=self.heads is not None)
        out = out.to(device=self.Wq.device, dtype=self.Wq.dtype)
        with torch.no_grad():
            for name, p in self.named_parameters():
                getattr(out, name).copy_(p[idx])
        return out
