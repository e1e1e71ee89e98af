"""Data model of the theory lab: a mixture of K linear-regression tasks.

Task k is drawn with probability ``pi_k``; given the task, the regression
vector is ``beta ~ N(mu_k, Sigma_beta_k)``, inputs are ``x ~ N(0, Sigma_x)``
and labels ``y = x^T beta + xi`` with ``xi ~ N(0, sigma_k^2)``.

Everything here is float64 numpy; the class validates user input and raises
``ValueError`` messages that name the offending field, because configurations
also come from user JSON/YAML files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .limits import check_mixture

__all__ = [
    "PRESETS",
    "TaskMixture",
    "load_config",
    "preset",
    "preset_names",
    "resolve_config",
]

_ALLOWED_KEYS = {"name", "description", "d", "mus", "cs", "covs", "pis", "sigma", "sigma_x"}


def _field_error(field: str, msg: str) -> ValueError:
    return ValueError(f"theory config field '{field}': {msg}")


def _as_float_array(value: Any, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _field_error(field, f"must be numeric ({exc})") from None
    if not np.all(np.isfinite(arr)):
        raise _field_error(field, "contains a non-finite value")
    return arr


def _check_psd(mat: np.ndarray, field: str, strict: bool) -> None:
    if not np.allclose(mat, mat.T, rtol=1e-10, atol=1e-12):
        raise _field_error(field, "matrix must be symmetric")
    eig_min = float(np.linalg.eigvalsh(mat).min())
    scale = max(1.0, float(np.abs(mat).max()))
    if strict and eig_min <= 1e-12 * scale:
        raise _field_error(field, f"matrix must be positive definite (smallest eigenvalue {eig_min:.3g})")
    if eig_min < -1e-10 * scale:
        raise _field_error(field, f"matrix must be positive semi-definite (smallest eigenvalue {eig_min:.3g})")


class TaskMixture:
    """A K-task mixture of linear regressions (the paper's data model).

    Args:
        d: input dimension.
        mus: K task means; each entry a scalar ``m`` (meaning ``m * 1_d``, the
            convention of the official code) or a length-``d`` vector.
        cs: K task covariances of beta; each a scalar ``c`` (``c * I``), a
            length-``d`` vector (a diagonal) or a ``d x d`` PSD matrix.
        pis: K mixture weights, non-negative; they are normalised to sum to 1
            (as the official data generator does).
        sigma: label-noise standard deviation, a scalar or one per task.
        sigma_x: input covariance ``Sigma_x``: ``None`` (identity, as in the
            official code), a scalar variance ``s`` (``s * I``), a length-``d``
            diagonal or a ``d x d`` positive-definite matrix.
        name: optional label used in outputs.
        description: optional free text.
    """

    def __init__(
        self,
        d: int,
        mus: Sequence[Any],
        cs: Sequence[Any],
        pis: Sequence[float],
        sigma: float | Sequence[float] = 0.0,
        sigma_x: Any = None,
        name: str = "custom",
        description: str = "",
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 1:
            raise _field_error("d", f"must be a positive integer, got {d!r}")
        d = int(d)
        self.d = d
        self.name = str(name)
        self.description = str(description)

        pis_arr = _as_float_array(pis, "pis").reshape(-1)
        k = pis_arr.size
        if k < 1:
            raise _field_error("pis", "needs at least one task")
        if np.any(pis_arr < 0) or pis_arr.sum() <= 0:
            raise _field_error("pis", "weights must be non-negative with a positive sum")
        self.pis = pis_arr / pis_arr.sum()
        self.K = k
        # Before any d x d matrix exists: d = 100000 would otherwise ask numpy for 74.5 GiB per matrix.
        check_mixture(d, k)

        if not isinstance(mus, (list, tuple, np.ndarray)) or len(mus) != k:
            raise _field_error("mus", f"needs one entry per task ({k} tasks from 'pis')")
        mu_rows = []
        for i, m in enumerate(mus):
            arr = _as_float_array(m, f"mus[{i}]")
            if arr.ndim == 0:
                arr = np.full(d, float(arr))
            elif arr.shape != (d,):
                raise _field_error(f"mus[{i}]", f"must be a scalar or a length-{d} vector, got shape {arr.shape}")
            mu_rows.append(arr)
        self.mus = np.stack(mu_rows)

        if not isinstance(cs, (list, tuple, np.ndarray)) or len(cs) != k:
            raise _field_error("cs", f"needs one entry per task ({k} tasks from 'pis')")
        cov_list = []
        for i, c in enumerate(cs):
            arr = _as_float_array(c, f"cs[{i}]")
            if arr.ndim == 0:
                if arr < 0:
                    raise _field_error(f"cs[{i}]", "a scalar covariance must be >= 0")
                mat = float(arr) * np.eye(d)
            elif arr.shape == (d,):
                if np.any(arr < 0):
                    raise _field_error(f"cs[{i}]", "a diagonal covariance must be >= 0")
                mat = np.diag(arr)
            elif arr.shape == (d, d):
                mat = 0.5 * (arr + arr.T)
                _check_psd(arr, f"cs[{i}]", strict=False)
            else:
                raise _field_error(f"cs[{i}]", f"must be a scalar, a length-{d} vector or a {d}x{d} matrix, "
                                               f"got shape {arr.shape}")
            cov_list.append(mat)
        self.covs = np.stack(cov_list)

        sig = _as_float_array(sigma, "sigma")
        if sig.ndim == 0:
            sig = np.full(k, float(sig))
        elif sig.shape != (k,):
            raise _field_error("sigma", f"must be a scalar or one value per task ({k}), got shape {sig.shape}")
        if np.any(sig < 0):
            raise _field_error("sigma", "noise standard deviations must be >= 0")
        self.sigmas = sig

        if sigma_x is None:
            sx = np.eye(d)
        else:
            arr = _as_float_array(sigma_x, "sigma_x")
            if arr.ndim == 0:
                if arr <= 0:
                    raise _field_error("sigma_x", "a scalar input variance must be > 0")
                sx = float(arr) * np.eye(d)
            elif arr.shape == (d,):
                if np.any(arr <= 0):
                    raise _field_error("sigma_x", "a diagonal input covariance must be > 0")
                sx = np.diag(arr)
            elif arr.shape == (d, d):
                _check_psd(arr, "sigma_x", strict=True)
                sx = 0.5 * (arr + arr.T)
            else:
                raise _field_error("sigma_x", f"must be null, a scalar, a length-{d} vector or a {d}x{d} matrix, "
                                              f"got shape {arr.shape}")
        self.sigma_x = sx

    # ------------------------------------------------------------------ moments
    @property
    def mean(self) -> np.ndarray:
        """Global mean ``sum_k pi_k mu_k`` (the plain-model pitfall when non-zero)."""
        return self.pis @ self.mus

    @property
    def M_mu(self) -> np.ndarray:
        """``M_mu = sum_k pi_k mu_k mu_k^T``."""
        return np.einsum("k,ki,kj->ij", self.pis, self.mus, self.mus)

    @property
    def Sigma_bar(self) -> np.ndarray:
        """Unbiased (within-task) covariance ``sum_k pi_k Sigma_beta_k``."""
        return np.einsum("k,kij->ij", self.pis, self.covs)

    @property
    def Sigma_tilde(self) -> np.ndarray:
        """Second moment ``E[beta beta^T] = Sigma_bar + M_mu``."""
        return self.Sigma_bar + self.M_mu

    @property
    def noise_var(self) -> float:
        """Mixture noise variance ``sum_k pi_k sigma_k^2`` (the spec's common sigma^2)."""
        return float(self.pis @ self.sigmas**2)

    @property
    def is_isotropic_x(self) -> bool:
        """True when ``Sigma_x`` is exactly the identity (the spec's isotropic forms apply)."""
        return bool(np.array_equal(self.sigma_x, np.eye(self.d)))

    @property
    def norm(self) -> float:
        """Normaliser ``tr(M Sigma_x) = E[(x^T beta)^2]`` (the y-axis L*/E||y||^2)."""
        return float(np.trace(self.Sigma_tilde @ self.sigma_x))

    def centred(self) -> TaskMixture:
        """The same mixture with every task mean shifted by the global mean (``mu_k - sum_j pi_j mu_j``)."""
        return TaskMixture(
            self.d, self.mus - self.mean, self.covs, self.pis, self.sigmas, self.sigma_x,
            name=f"{self.name}_centred", description=self.description,
        )

    # ---------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict that :meth:`from_dict` reads back exactly."""
        def compact_vec(v: np.ndarray) -> Any:
            return float(v[0]) if np.all(v == v[0]) else v.tolist()

        def compact_mat(m: np.ndarray) -> Any:
            if np.array_equal(m, np.diag(np.diag(m))):
                dg = np.diag(m)
                return float(dg[0]) if np.all(dg == dg[0]) else dg.tolist()
            return m.tolist()

        return {
            "name": self.name,
            "description": self.description,
            "d": self.d,
            "mus": [compact_vec(m) for m in self.mus],
            "cs": [compact_mat(c) for c in self.covs],
            "pis": self.pis.tolist(),
            "sigma": compact_vec(self.sigmas),
            "sigma_x": None if self.is_isotropic_x else compact_mat(self.sigma_x),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskMixture:
        """Build from a mapping with keys ``d, mus, cs|covs, pis[, sigma, sigma_x, name, description]``.

        Raises:
            ValueError: naming the field that is missing, unknown or malformed.
        """
        if not isinstance(data, Mapping):
            # ValueError (not TypeError): every malformed user config is reported the same way.
            raise ValueError("theory config must be a JSON/YAML object (mapping)")
        unknown = set(data) - _ALLOWED_KEYS
        if unknown:
            raise _field_error(min(unknown), f"unknown key (allowed: {sorted(_ALLOWED_KEYS)})")
        if "cs" in data and "covs" in data:
            raise _field_error("covs", "give either 'cs' or 'covs', not both")
        for key in ("d", "mus", "pis"):
            if key not in data:
                raise _field_error(key, "is required")
        if "cs" not in data and "covs" not in data:
            raise _field_error("cs", "is required")
        return cls(
            d=data["d"],
            mus=data["mus"],
            cs=data["cs"] if "cs" in data else data["covs"],
            pis=data["pis"],
            sigma=data.get("sigma", 0.0),
            sigma_x=data.get("sigma_x"),
            name=data.get("name", "custom"),
            description=data.get("description", ""),
        )

    def __repr__(self) -> str:
        return (
            f"TaskMixture(name={self.name!r}, d={self.d}, K={self.K}, pis={self.pis.round(4).tolist()}, "
            f"norm={self.norm:.4g}, noise_var={self.noise_var:.4g})"
        )


# ---------------------------------------------------------------- named presets
# Spec section 7 (all from the official experiments list; d = 10, pi = (0.3, 0.7)).
_ZERO = (1.4, -0.6)
_NONZERO = (1.0, -1.0)
_PI = (0.3, 0.7)

_PRESET_TABLE: dict[str, dict[str, Any]] = {
    "zero_cov_12": {"mus": _ZERO, "cs": (1.0, 2.0), "description": "global mean 0, covariances 1 and 2 (main figure)"},
    "zero_cov_11": {"mus": _ZERO, "cs": (1.0, 1.0), "description": "global mean 0, covariances 1 and 1"},
    "zero_cov_22": {"mus": _ZERO, "cs": (2.0, 2.0), "description": "global mean 0, covariances 2 and 2"},
    "zero_cov_11_different_means": {
        "mus": (2.1, -0.9), "cs": (1.0, 1.0), "description": "global mean 0, means 2.1/-0.9"
    },
    "nonzero_cov_11": {"mus": _NONZERO, "cs": (1.0, 1.0), "description": "global mean -0.4, covariances 1 and 1"},
    "nonzero_cov_22": {"mus": _NONZERO, "cs": (2.0, 2.0), "description": "global mean -0.4, covariances 2 and 2"},
    "nonzero_cov_12": {"mus": _NONZERO, "cs": (1.0, 2.0), "description": "global mean -0.4, covariances 1 and 2"},
    "nonzero_cov_11_different_means": {
        "mus": (1.7, -1.3), "cs": (1.0, 1.0), "description": "global mean -0.4, means 1.7/-1.3"
    },
    "noisy_zero_cov_11": {
        "mus": _ZERO, "cs": (1.0, 1.0), "sigma": 0.3, "description": "zero_cov_11 with label noise sigma=0.3"
    },
    "noisy_nonzero_cov_11": {
        "mus": _NONZERO, "cs": (1.0, 1.0), "sigma": 0.3, "description": "nonzero_cov_11 with label noise sigma=0.3"
    },
    # Despite its name, the official config scales a *diagonal* 2^-i beta covariance.
    "isotropic_covariance_zero_mean": {
        "mus": _ZERO,
        "cs": tuple([2.0 ** -i for i in range(10)] for _ in range(2)),
        "description": "Sigma_beta = diag(2^-i), i=0..9 (name kept from the official code)",
    },
}
# Multi-layer ablation configurations (the 1-layer theory still applies to them).
for _ratio, _c in (("0.1", 9.0), ("0.5", 1.0), ("0.9", 1.0 / 9.0)):
    _PRESET_TABLE[f"single_task_mu_ratio_{_ratio}"] = {
        "mus": (1.0,), "cs": (_c,), "pis": (1.0,), "description": f"single task, mu=1, c={_c:.4g}"
    }
for _ratio, _c in (("0.1", 22.799999999999997), ("0.5", 2.3200000000000003), ("0.9", 0.04444444444444473)):
    _PRESET_TABLE[f"multi_task_mu_ratio_{_ratio}"] = {
        "mus": (-1.0, 1.0), "cs": (_c, _c), "pis": (0.5, 0.5), "description": f"two tasks, mu=-1/+1, c={_c:.4g}"
    }

PRESETS: tuple[str, ...] = tuple(_PRESET_TABLE)


def preset_names() -> list[str]:
    """Names of the built-in configurations (spec section 7)."""
    return list(PRESETS)


def preset(name: str, d: int = 10) -> TaskMixture:
    """Return a named configuration from spec section 7 (d = 10 by default)."""
    if name not in _PRESET_TABLE:
        raise ValueError(f"unknown theory config {name!r}; known: {', '.join(PRESETS)}")
    spec = dict(_PRESET_TABLE[name])
    cs = spec.pop("cs")
    if d != 10 and any(np.ndim(c) for c in cs):
        cs = tuple([2.0 ** -i for i in range(d)] for _ in cs)
    return TaskMixture(
        d=d,
        mus=list(spec.pop("mus")),
        cs=list(cs),
        pis=list(spec.pop("pis", _PI)),
        sigma=spec.pop("sigma", 0.0),
        name=name,
        description=spec.pop("description", ""),
    )


def load_config(path: str | Path) -> TaskMixture:
    """Load a user configuration from a JSON file (or YAML, when PyYAML is importable)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the theory config ({exc}); give a UTF-8 JSON/YAML file") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional: not a dependency of the library
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError(f"{p}: YAML configs need PyYAML; use JSON instead") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    else:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
    try:
        mix = TaskMixture.from_dict(data)
    except ValueError as exc:  # same type (ConfigError stays ConfigError), with the file named first
        raise type(exc)(f"{p}: {exc}") from None
    if mix.name == "custom":
        mix.name = p.stem
    return mix


def resolve_config(spec: str) -> TaskMixture:
    """A preset name, or a path to a JSON/YAML config file."""
    if spec in _PRESET_TABLE:
        return preset(spec)
    p = Path(spec)
    if p.suffix.lower() in (".json", ".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ValueError(f"theory config file not found: {spec}")
        return load_config(p)
    raise ValueError(f"unknown theory config {spec!r}; give a preset ({', '.join(PRESETS)}) or a .json/.yaml file")

