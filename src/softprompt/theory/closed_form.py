"""Closed-form optimal parameters and losses of the four training regimes.

All functions are pure float64 numpy and vectorised over the number of
in-context examples ``n`` (a scalar or a 1-D array; outputs carry a leading
``N = len(n)`` axis).

Every regime is expressed in one *reduced* parameterisation of the
one-layer linear attention (spec section 3)::

    y_hat = x^T ( c_k + W_k X^T (y - X g_k) )

* ``W_k``: the preconditioner of one step of gradient descent (``u_y A``);
* ``c_k``: the per-task bias the prompt adds (``W b_k`` in the spec);
* ``g_k``: the per-task centring that per-task heads add (``u_x,k = -u_y g_k``).

PT has ``c = g = 0``; FT and JT have ``g = 0``; the decoupled regime (prompt +
heads) has ``c_k = g_k = mu_k``. ``W_k`` is shared across tasks except in the
``oracle`` reference (not in the paper): the per-task optimum, which no shared
``W`` can beat.

A second reference that is not in the paper, ``jt_gc``, is JT plus one *shared*
centring vector ``g = sum_k pi_k mu_k``: the KQV model's shared ``u_x`` term
(spec section 3, "global-mean pitfall") represents it exactly, so on
configurations with a non-zero global mean trained JT can go below ``L_JT``
down to ``L_jt_gc``. It equals JT on the globally centred mixture (for
``Sigma_x = I`` this shared ``g`` is optimal for every ``W``) and coincides
with JT when the global mean is 0.

Two implementations are kept on purpose: :func:`closed_form` uses the general
input-covariance forms (spec section 5, "General Sigma_x"), and
:func:`closed_form_isotropic` transcribes the spec's isotropic table
literally; tests check they agree at ``Sigma_x = I``. :func:`exact_loss`
gives the exact expected loss of *any* reduced parameters, from Gaussian
fourth moments, and is the third independent check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import TaskMixture
from .limits import check_closed_forms

__all__ = [
    "ALL_REGIMES",
    "REGIMES",
    "REGIME_LABELS",
    "ClosedForm",
    "ReducedParams",
    "as_n_array",
    "closed_form",
    "closed_form_isotropic",
    "exact_loss",
    "theory_curves",
]

#: The paper's four regimes, from fully coupled to fully decoupled.
REGIMES: tuple[str, ...] = ("pt", "ft", "jt", "dec")
#: Plus two references that are not in the paper (see the module docstring).
ALL_REGIMES: tuple[str, ...] = REGIMES + ("oracle", "jt_gc")
REGIME_LABELS: dict[str, str] = {
    "pt": "Plain training (PT)",
    "ft": "Fine-tuning with prompts (FT)",
    "jt": "Joint training with prompts (JT)",
    "dec": "Prompts + heads (decoupled)",
    "oracle": "Per-task optimal W (oracle)",
    "jt_gc": "JT + global centring (shared u_x)",
}


def as_n_array(n: float | Iterable[float]) -> np.ndarray:
    """Validate ``n`` (non-negative integers) and return it as a 1-D float64 array."""
    arr = np.atleast_1d(np.asarray(list(n) if not np.isscalar(n) else n, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("n must be a non-negative integer or a non-empty 1-D list of them")
    if np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise ValueError(f"n must hold non-negative integers, got {arr.tolist()}")
    return arr


@dataclass(frozen=True)
class ReducedParams:
    """Reduced-model parameters ``y_hat = x^T (c_k + W_k X^T (y - X g_k))``.

    Attributes:
        n: context lengths, shape ``(N,)``.
        W: preconditioners, shape ``(N, K, d, d)``.
        c: per-task biases, shape ``(N, K, d)``.
        g: per-task centring vectors, shape ``(N, K, d)``.
    """

    n: np.ndarray
    W: np.ndarray
    c: np.ndarray
    g: np.ndarray

    def at(self, i: int) -> ReducedParams:
        """The parameters for the ``i``-th context length only (leading axis kept, size 1)."""
        return ReducedParams(self.n[i : i + 1], self.W[i : i + 1], self.c[i : i + 1], self.g[i : i + 1])

    @property
    def b(self) -> np.ndarray:
        """The spec's prompt vector ``b_k`` with ``W b_k = c_k`` (least squares if W is singular)."""
        out = np.empty_like(self.c)
        for i in range(self.W.shape[0]):
            for k in range(self.W.shape[1]):
                out[i, k] = np.linalg.lstsq(self.W[i, k], self.c[i, k], rcond=None)[0]
        return out


@dataclass(frozen=True)
class ClosedForm:
    """Optimal reduced parameters and loss of one regime, over ``n``.

    Attributes:
        regime: one of :data:`ALL_REGIMES`.
        params: the optimal :class:`ReducedParams`.
        loss: expected query MSE (label noise included), shape ``(N,)``.
        norm: the normaliser ``tr(M Sigma_x)`` of the mixture.
    """

    regime: str
    params: ReducedParams
    loss: np.ndarray
    norm: float

    @property
    def W(self) -> np.ndarray:
        """Shared preconditioner, shape ``(N, d, d)`` (task 0's for the oracle)."""
        return self.params.W[:, 0]

    @property
    def b(self) -> np.ndarray:
        """Prompt vectors ``b_k`` (``W b_k = c_k``), shape ``(N, K, d)``."""
        return self.params.b

    @property
    def normalised(self) -> np.ndarray:
        """``loss / tr(M Sigma_x)``: the paper's y-axis."""
        return self.loss / self.norm

    def __iter__(self):  # allows ``W, b, loss = closed_form(...)`` as in the spec's API
        return iter((self.W, self.b, self.loss))


# ----------------------------------------------------------------- helpers
def _tr(a: np.ndarray) -> np.ndarray:
    return np.trace(a, axis1=-2, axis2=-1)


def _right_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ inv(b)`` without forming the inverse."""
    return np.swapaxes(np.linalg.solve(np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2)), -1, -2)


def _pgd(num: np.ndarray, cov_term: np.ndarray, shift: np.ndarray, sx: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``W = num Sx [ (n+1) Sx cov_term Sx + extra ]^-1`` in the C/n form.

    ``shift`` is the already-assembled matrix that is added to the bracket
    (the ``(tr + sigma^2) Sx`` part and, for JT, ``Sx M_mu Sx``). Using C/n
    instead of C keeps ``n = 0`` well defined. When the whole bracket is 0
    (no variance and no noise) the optimum is ``W = 0``.
    """
    nn = n[:, None, None]
    bracket = (nn + 1.0) * (sx @ cov_term @ sx) + shift
    lhs = np.broadcast_to(num @ sx, bracket.shape)
    zero = np.abs(bracket).reshape(bracket.shape[0], -1).max(axis=1) == 0.0
    out = np.zeros_like(bracket)
    if np.any(~zero):
        out[~zero] = _right_solve(lhs[~zero], bracket[~zero])
    return out


def _stack_tasks(w: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(w[:, None], k, axis=1)


def _check_regime(regime: str) -> str:
    r = regime.lower()
    # Only unambiguous aliases: the code's "prompt" task type is both FT and JT.
    aliases = {"plain": "pt", "none": "pt", "decoupled": "dec", "prompt+heads": "dec", "prompt and heads": "dec"}
    r = aliases.get(r, r)
    if r not in ALL_REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {ALL_REGIMES}")
    return r


# ------------------------------------------------------------- general forms
def closed_form(mix: TaskMixture, n: float | Iterable[float], regime: str, normalise: bool = False) -> ClosedForm:
    """Optimal reduced parameters and loss of ``regime`` for any input covariance.

    Uses ``C = n tr(M Sx) Sx + n(n+1) Sx M Sx + n sigma^2 Sx`` and
    ``W = n M Sx C^-1`` (spec section 5, general Sigma_x), with ``M`` the
    regime's second moment: ``Sigma_tilde`` for PT/FT, ``Sigma_bar`` for the
    decoupled regime, and for JT ``M_cov = Sigma_bar`` in the first factor with
    ``C - n^2 Sx M_mu Sx`` in the inverse.

    Args:
        mix: the task mixture.
        n: context length(s).
        regime: ``pt``, ``ft``, ``jt``, ``dec``, ``oracle`` or ``jt_gc``.
        normalise: if True, ``loss`` is divided by ``mix.norm``.
    """
    regime = _check_regime(regime)
    n = as_n_array(n)
    nn = n[:, None, None]
    sx, s2, K, d = mix.sigma_x, mix.noise_var, mix.K, mix.d
    eye = np.eye(d)
    st, sb, mm = mix.Sigma_tilde, mix.Sigma_bar, mix.M_mu
    zeros = np.zeros((n.size, K, d))
    mus = np.broadcast_to(mix.mus, (n.size, K, d)).copy()

    if regime in ("pt", "ft"):
        w = _pgd(st, st, (np.trace(st @ sx) + s2) * sx, sx, n)
        loss = np.trace(st @ sx) + s2 - n * _tr(w @ sx @ st @ sx)
        c = zeros
        if regime == "ft":
            # The prompts remove the squared bias: c_k = (I - n W Sx) mu_k.
            resid = np.einsum("nij,kj->nki", eye - nn * (w @ sx), mix.mus)
            loss = loss - np.einsum("k,nki,ij,nkj->n", mix.pis, resid, sx, resid)
            c = resid
        params = ReducedParams(n, _stack_tasks(w, K), c, zeros)
    elif regime == "jt":
        # The context labels still carry the task mean, hence M_mu and tr(Sigma_tilde) in the inverse.
        shift = sx @ mm @ sx + (np.trace(st @ sx) + s2) * sx
        w = _pgd(sb, sb, shift, sx, n)
        loss = np.trace(sb @ sx) + s2 - n * _tr(w @ sx @ sb @ sx)
        c = np.einsum("nij,kj->nki", eye - nn * (w @ sx), mix.mus)
        params = ReducedParams(n, _stack_tasks(w, K), c, zeros)
    elif regime == "dec":
        w = _pgd(sb, sb, (np.trace(sb @ sx) + s2) * sx, sx, n)
        loss = np.trace(sb @ sx) + s2 - n * _tr(w @ sx @ sb @ sx)
        params = ReducedParams(n, _stack_tasks(w, K), mus, mus.copy())
    elif regime == "jt_gc":
        # JT on beta - mean; mapped back: c_k = c'_k + mean, g = mean for every task.
        inner = closed_form(mix.centred(), n, "jt")
        mean = np.broadcast_to(mix.mean, (n.size, K, d))
        params = ReducedParams(n, inner.params.W, inner.params.c + mean, mean.copy())
        loss = inner.loss
    else:  # oracle: per-task optimum of the decoupled model
        ws, losses = [], []
        for k in range(K):
            ck, s2k = mix.covs[k], float(mix.sigmas[k] ** 2)
            wk = _pgd(ck, ck, (np.trace(ck @ sx) + s2k) * sx, sx, n)
            ws.append(wk)
            losses.append(np.trace(ck @ sx) + s2k - n * _tr(wk @ sx @ ck @ sx))
        params = ReducedParams(n, np.stack(ws, axis=1), mus, mus.copy())
        loss = np.einsum("k,kn->n", mix.pis, np.stack(losses))

    loss = np.asarray(loss, dtype=np.float64)
    if normalise:
        loss = loss / mix.norm
    return ClosedForm(regime, params, loss, mix.norm)


# ----------------------------------------------------------- isotropic forms
def closed_form_isotropic(mix: TaskMixture, n: float | Iterable[float], regime: str) -> ClosedForm:
    """The spec's isotropic table (``Sigma_x = I``), transcribed literally.

    ``W_PT = St[(n+1)St + (tr St + s^2) I]^-1``, ``L_PT = tr St + s^2 - n tr(W_PT St)``;
    ``L_FT = L_PT - tr(M_mu (nW-I)^T (nW-I))``;
    ``W_JT = Sb[(n+1)Sb + M_mu + (tr St + s^2) I]^-1``, ``L_JT = tr Sb + s^2 - n tr(W_JT Sb)``;
    ``W_dec = Sb[(n+1)Sb + (tr Sb + s^2) I]^-1``, ``L_dec = tr Sb + s^2 - n tr(W_dec Sb)``.

    Raises:
        ValueError: if ``mix.sigma_x`` is not the identity, or for the oracle.
    """
    regime = _check_regime(regime)
    if not mix.is_isotropic_x:
        raise ValueError("closed_form_isotropic needs sigma_x = I; use closed_form for a general input covariance")
    if regime in ("oracle", "jt_gc"):
        raise ValueError(f"{regime} has no isotropic-table form; use closed_form")
    n = as_n_array(n)
    nn = n[:, None, None]
    d, K, s2 = mix.d, mix.K, mix.noise_var
    eye = np.eye(d)
    st, sb, mm = mix.Sigma_tilde, mix.Sigma_bar, mix.M_mu
    zeros = np.zeros((n.size, K, d))

    def inv(a: np.ndarray) -> np.ndarray:
        return np.linalg.inv(a)

    if regime in ("pt", "ft"):
        w = st @ inv((nn + 1) * st + (np.trace(st) + s2) * eye)
        loss = np.trace(st) + s2 - n * _tr(w @ st)
        c = zeros
        if regime == "ft":
            e = nn * w - eye
            loss = loss - _tr(mm @ np.swapaxes(e, -1, -2) @ e)
            c = np.einsum("nij,kj->nki", -e, mix.mus)
        params = ReducedParams(n, _stack_tasks(w, K), c, zeros)
    elif regime == "jt":
        w = sb @ inv((nn + 1) * sb + mm + (np.trace(st) + s2) * eye)
        loss = np.trace(sb) + s2 - n * _tr(w @ sb)
        c = np.einsum("nij,kj->nki", eye - nn * w, mix.mus)
        params = ReducedParams(n, _stack_tasks(w, K), c, zeros)
    else:
        w = sb @ inv((nn + 1) * sb + (np.trace(sb) + s2) * eye)
        loss = np.trace(sb) + s2 - n * _tr(w @ sb)
        mus = np.broadcast_to(mix.mus, (n.size, K, d)).copy()
        params = ReducedParams(n, _stack_tasks(w, K), mus, mus.copy())
    return ClosedForm(regime, params, np.asarray(loss, dtype=np.float64), mix.norm)


# ----------------------------------------------------------------- exact loss
def exact_loss(mix: TaskMixture, params: ReducedParams, per_task: bool = False) -> np.ndarray:
    """Exact expected query MSE of arbitrary reduced parameters (label noise included).

    With ``a = mu_k - c_k``, ``m = mu_k - g_k``, ``Q = m m^T + Sigma_k`` and
    ``S = X^T X`` (so ``E S = n Sx`` and ``E[S Q S] = n(n+1) Sx Q Sx + n tr(Q Sx) Sx``
    for Gaussian rows), the coefficient error ``r = beta - c_k - W X^T(y - X g_k)``
    has ``E[r r^T] = a a^T + Sigma_k - n(a m^T Sx W^T + W Sx m a^T)
    - n(Sigma_k Sx W^T + W Sx Sigma_k) + W D W^T`` with
    ``D = n(n+1) Sx Q Sx + n(tr(Q Sx) + sigma_k^2) Sx``, and the loss is
    ``tr(Sx E[r r^T]) + sigma_k^2``.

    Returns:
        shape ``(N,)`` (pi-weighted), or ``(N, K)`` if ``per_task``.
    """
    sx = mix.sigma_x
    n = params.n[:, None, None, None]
    W, c, g = params.W, params.c, params.g
    mu = np.broadcast_to(mix.mus, c.shape)
    a = mu - c
    m = mu - g
    cov = mix.covs[None]
    q = np.einsum("nki,nkj->nkij", m, m) + cov
    s2 = (mix.sigmas**2)[None, :, None, None]
    d_mat = n * (n + 1) * (sx @ q @ sx) + n * (_tr(q @ sx)[..., None, None] + s2) * sx
    wt = np.swapaxes(W, -1, -2)
    wsm = np.einsum("nkij,jl,nkl->nki", W, sx, m)  # W Sx m
    e = (
        np.einsum("nki,nkj->nkij", a, a)
        + cov
        - n * (np.einsum("nki,nkj->nkij", a, wsm) + np.einsum("nki,nkj->nkij", wsm, a))
        - n * (cov @ sx @ wt + W @ sx @ cov)
        + W @ d_mat @ wt
    )
    per = _tr(sx @ e) + mix.sigmas[None, :] ** 2
    return per if per_task else per @ mix.pis


# --------------------------------------------------------------------- curves
def theory_curves(
    mix: TaskMixture,
    n: Sequence[float] | np.ndarray,
    regimes: Sequence[str] = REGIMES,
    normalise: bool = True,
) -> dict[str, np.ndarray]:
    """Optimal loss per regime over ``n`` (normalised by ``tr(M Sigma_x)`` by default).

    Raises:
        ConfigError: when the closed forms over all of ``n`` would not fit in memory (see :mod:`.limits`).
    """
    check_closed_forms(mix.d, mix.K, as_n_array(n).size)
    return {r: closed_form(mix, n, r, normalise=normalise).loss for r in regimes}
