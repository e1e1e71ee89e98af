"""Monte-Carlo on fresh draws against the closed forms and the exact-loss formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softprompt.theory.closed_form import (
    ALL_REGIMES,
    ReducedParams,
    closed_form,
    exact_loss,
)
from softprompt.theory.config import TaskMixture, preset
from softprompt.theory.montecarlo import evaluate_paired, monte_carlo, reduced_predictor
from softprompt.theory.sampling import TaskSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


DRAWS = 40_000


def general_mixture() -> TaskMixture:
    """K = 3, d = 4, full beta covariances, per-task noise and a general Sigma_x."""
    rng = np.random.default_rng(11)
    d = 4
    covs = []
    for s in (0.5, 1.0, 2.0):
        a = rng.normal(size=(d, d))
        covs.append(s * (a @ a.T) / d)
    b = rng.normal(size=(d, d))
    return TaskMixture(
        d=d,
        mus=[rng.normal(size=d), -0.5, rng.normal(size=d)],
        cs=covs,
        pis=[0.2, 0.5, 0.3],
        sigma=[0.0, 0.3, 0.5],
        sigma_x=b @ b.T / d + 0.5 * np.eye(d),
        name="general",
    )


@pytest.mark.parametrize("mix_name", ["nonzero_cov_11", "general"])
@pytest.mark.parametrize("n", [3, 20])
def test_closed_forms_match_monte_carlo(mix_name: str, n: int) -> None:
    mix = general_mixture() if mix_name == "general" else preset(mix_name)
    for i, r in enumerate(ALL_REGIMES):
        theory = closed_form(mix, n, r).loss[0]
        mc = monte_carlo(mix, n, r, draws=DRAWS, seed=100 * n + i)
        assert abs(mc.loss - theory) < 4 * mc.se, (r, mc.loss, theory, mc.se)
        assert mc.se < 0.02 * theory  # the check has teeth: a 8% error would fail


def test_exact_loss_of_arbitrary_params_matches_monte_carlo() -> None:
    mix = general_mixture()
    rng = np.random.default_rng(5)
    n = np.array([7.0])
    K, d = mix.K, mix.d
    params = ReducedParams(
        n,
        0.05 * rng.normal(size=(1, K, d, d)),
        rng.normal(size=(1, K, d)),
        rng.normal(size=(1, K, d)),
    )
    theory = exact_loss(mix, params, per_task=True)[0]
    mc = monte_carlo(mix, 7, params, draws=DRAWS, seed=3)
    for k in range(K):
        assert abs(mc.per_task[k] - theory[k]) < 4 * mc.per_task_se[k]
    assert abs(mc.loss - theory @ mix.pis) < 4 * mc.se


def test_sampler_moments() -> None:
    mix = general_mixture()
    s = TaskSampler(mix, seed=0)
    b = s.sample(2, 3, 100_000)
    # E[x x^T] = Sigma_x, and E[y^2] = tr((Sigma_k + mu mu^T) Sigma_x) + sigma_k^2.
    emp = (b.X.reshape(-1, mix.d).T @ b.X.reshape(-1, mix.d) / b.X.reshape(-1, mix.d).shape[0]).numpy()
    np.testing.assert_allclose(emp, mix.sigma_x, atol=0.03)
    m2 = mix.covs[2] + np.outer(mix.mus[2], mix.mus[2])
    ey2 = np.trace(m2 @ mix.sigma_x) + mix.sigmas[2] ** 2
    assert float((b.yq**2).mean()) == pytest.approx(ey2, rel=0.03)
    a = s.sample_all(5, 10)
    assert a.X.shape == (3, 10, 5, 4) and a.yq.shape == (3, 10)


def test_paired_evaluation_resolves_small_gaps() -> None:
    mix = preset("zero_cov_12")
    cf = closed_form(mix, 10, "jt")
    ref = reduced_predictor(cf.params)
    # A slightly detuned W: 2% scaled.
    W2 = cf.params.W * 1.02
    detuned = ReducedParams(cf.params.n, W2, cf.params.c, cf.params.g)
    pred = reduced_predictor(detuned)

    def both(k, batch):
        return torch.stack([ref(k, batch), pred(k, batch)])

    runs, r = evaluate_paired(mix, 10, both, ref, draws=20_000, seed=9)
    assert runs[0].paired_diff == 0.0 and runs[0].paired_diff_se == 0.0
    true_gap = exact_loss(mix, detuned)[0] - cf.loss[0]
    assert true_gap > 0
    assert abs(runs[1].paired_diff - true_gap) < 4 * runs[1].paired_diff_se
    # The paired standard error is far below the loss's own standard error.
    assert runs[1].paired_diff_se < 0.1 * runs[1].se
    assert r.loss == pytest.approx(runs[0].loss)
