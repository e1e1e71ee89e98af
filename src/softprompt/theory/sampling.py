"""Fresh draws from a :class:`~softprompt.theory.config.TaskMixture` (torch, any device)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import TaskMixture

__all__ = ["TaskBatch", "TaskSampler"]


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """A factor ``L`` with ``L L^T = mat`` that also works for singular PSD matrices."""
    vals, vecs = np.linalg.eigh(mat)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


@dataclass
class TaskBatch:
    """One batch of prompts for a single task.

    Attributes:
        X: context inputs, ``(B, n, d)``.
        y: context labels, ``(B, n)``.
        xq: query inputs, ``(B, d)``.
        yq: query labels (noisy, the training/evaluation target), ``(B,)``.
    """

    X: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


class TaskSampler:
    """Draws per-task batches ``beta ~ N(mu_k, Sigma_k)``, ``x ~ N(0, Sigma_x)``, ``y = x^T beta + xi``.

    Args:
        mix: the mixture.
        device: torch device for the draws.
        dtype: torch dtype (float64 for references, float32 for training).
        seed: seed of the sampler's own generator (draws are reproducible
            and independent of the global RNG).
    """

    def __init__(
        self, mix: TaskMixture, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64, seed: int = 0
    ) -> None:
        self.mix = mix
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=self.device)
        self._mus = t(mix.mus)
        self._beta_sqrt = t(np.stack([_psd_sqrt(c) for c in mix.covs]))
        self._x_sqrt = None if mix.is_isotropic_x else t(np.linalg.cholesky(mix.sigma_x))
        self._sigmas = [float(s) for s in mix.sigmas]
        self._sigma_t = t(mix.sigmas)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def sample(self, k: int, n: int, batch: int) -> TaskBatch:
        """Draw ``batch`` independent prompts of task ``k`` with ``n`` context examples."""
        d = self.mix.d
        beta = self._mus[k] + self._randn(batch, d) @ self._beta_sqrt[k].T
        X = self._randn(batch, n, d)
        xq = self._randn(batch, d)
        if self._x_sqrt is not None:
            X = X @ self._x_sqrt.T
            xq = xq @ self._x_sqrt.T
        y = torch.einsum("bnd,bd->bn", X, beta)
        yq = (xq * beta).sum(-1)
        if self._sigmas[k] > 0:
            y = y + self._sigmas[k] * self._randn(batch, n)
            yq = yq + self._sigmas[k] * self._randn(batch)
        return TaskBatch(X, y, xq, yq)

    def sample_all(self, n: int, batch: int) -> TaskBatch:
        """Draw ``batch`` prompts of *every* task at once; tensors get a leading task axis ``K``.

        Shapes: ``X (K, B, n, d)``, ``y (K, B, n)``, ``xq (K, B, d)``, ``yq (K, B)``.
        One call per tensor kind instead of one per task keeps GPU launches few.
        """
        K, d = self.mix.K, self.mix.d
        beta = self._mus[:, None, :] + torch.einsum("kij,kbj->kbi", self._beta_sqrt, self._randn(K, batch, d))
        X = self._randn(K, batch, n, d)
        xq = self._randn(K, batch, d)
        if self._x_sqrt is not None:
            X = X @ self._x_sqrt.T
            xq = xq @ self._x_sqrt.T
        y = (X @ beta[..., None])[..., 0]
        yq = (xq * beta).sum(-1)
        if any(s > 0 for s in self._sigmas):
            y = y + self._sigma_t[:, None, None] * self._randn(K, batch, n)
            yq = yq + self._sigma_t[:, None] * self._randn(K, batch)
        return TaskBatch(X, y, xq, yq)
