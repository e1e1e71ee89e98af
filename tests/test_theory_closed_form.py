"""Closed forms of the theory lab: spec table, isotropic vs general forms, optimality, ordering, limits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softprompt.theory.closed_form import (
    ALL_REGIMES,
    REGIMES,
    ReducedParams,
    as_n_array,
    closed_form,
    closed_form_isotropic,
    exact_loss,
    theory_curves,
)
from softprompt.theory.config import (
    PRESETS,
    TaskMixture,
    load_config,
    preset,
    resolve_config,
)

NS = [1, 10, 20, 30, 40, 50]

# Spec section 8, "Theory values (normalised loss, derived)".
SPEC_TABLE = {
    "zero_cov_12": {
        "pt": [0.876, 0.474, 0.327, 0.251, 0.204, 0.172],
        "ft": [0.676, 0.451, 0.319, 0.247, 0.202, 0.170],
        "jt": [0.631, 0.415, 0.301, 0.237, 0.195, 0.165],
        "dec": [0.614, 0.351, 0.238, 0.180, 0.144, 0.121],
    },
    "nonzero_cov_11": {
        "pt": [0.836, 0.426, 0.298, 0.233, 0.191, 0.162],
        "ft": [0.563, 0.402, 0.291, 0.229, 0.189, 0.161],
        "jt": [0.478, 0.343, 0.261, 0.211, 0.177, 0.152],
        "dec": [0.458, 0.262, 0.177, 0.134, 0.108, 0.090],
    },
}


def random_mixture(rng: np.random.Generator, general_x: bool = True) -> TaskMixture:
    """A random mixture: any K, d, vector means, full PSD covariances, per-task noise, general Sigma_x."""
    d = int(rng.integers(2, 6))
    K = int(rng.integers(1, 4))
    covs = []
    for _ in range(K):
        a = rng.normal(size=(d, d)) * rng.uniform(0.2, 1.5)
        covs.append((a @ a.T / d).tolist())
    sx = None
    if general_x:
        b = rng.normal(size=(d, d))
        sx = (b @ b.T / d + 0.3 * np.eye(d)).tolist()
    return TaskMixture(
        d=d,
        mus=[rng.normal(size=d).tolist() for _ in range(K)],
        cs=covs,
        pis=rng.dirichlet(np.ones(K)).tolist(),
        sigma=rng.uniform(0, 0.7, size=K).tolist(),
        sigma_x=sx,
    )


@pytest.mark.parametrize("name", list(SPEC_TABLE))
@pytest.mark.parametrize("regime", REGIMES)
def test_spec_theory_table(name: str, regime: str) -> None:
    got = closed_form(preset(name), NS, regime, normalise=True).loss
    np.testing.assert_allclose(got, SPEC_TABLE[name][regime], atol=1e-3 + 1e-12)


def test_spec_norms_and_boundary_values() -> None:
    assert preset("zero_cov_12").norm == pytest.approx(25.4)
    assert preset("nonzero_cov_11").norm == pytest.approx(20.0)
    # The three entries the spec flags as sitting on a rounding boundary.
    assert closed_form(preset("zero_cov_12"), 30, "jt", True).loss[0] == pytest.approx(0.23648, abs=5e-6)
    assert closed_form(preset("zero_cov_12"), 20, "dec", True).loss[0] == pytest.approx(0.23749, abs=5e-6)
    assert closed_form(preset("nonzero_cov_11"), 1, "pt", True).loss[0] == pytest.approx(0.83550, abs=5e-6)
    # Spec section 6: zero_cov_12 at n = 10.
    expect = {"pt": 0.4736, "ft": 0.4512, "jt": 0.4154, "dec": 0.3506}
    for r, v in expect.items():
        assert closed_form(preset("zero_cov_12"), 10, r, True).loss[0] == pytest.approx(v, abs=5e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_isotropic_table_equals_general_form_on_presets(name: str) -> None:
    mix = preset(name)
    for r in REGIMES:
        a = closed_form(mix, NS, r)
        b = closed_form_isotropic(mix, NS, r)
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.params.W, b.params.W, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(a.params.c, b.params.c, rtol=1e-10, atol=1e-12)


def test_isotropic_equals_general_on_random_full_covariances() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        mix = random_mixture(rng, general_x=False)
        for r in REGIMES:
            np.testing.assert_allclose(
                closed_form(mix, [0, 1, 7, 40], r).loss, closed_form_isotropic(mix, [0, 1, 7, 40], r).loss, rtol=1e-11
            )


def test_isotropic_form_refuses_general_sigma_x() -> None:
    mix = random_mixture(np.random.default_rng(1))
    with pytest.raises(ValueError, match="sigma_x"):
        closed_form_isotropic(mix, 3, "pt")


@pytest.mark.parametrize("seed", range(4))
def test_exact_loss_of_closed_form_params_equals_closed_form_loss(seed: int) -> None:
    mix = random_mixture(np.random.default_rng(seed))
    for r in ALL_REGIMES:
        cf = closed_form(mix, [0, 1, 5, 33], r)
        np.testing.assert_allclose(exact_loss(mix, cf.params), cf.loss, rtol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_closed_forms_are_stationary_minima(seed: int) -> None:
    """Perturbing the optimal parameters never lowers the exact loss (and the change is second order)."""
    rng = np.random.default_rng(100 + seed)
    mix = random_mixture(rng)
    n = np.array([6.0])
    eye = np.eye(mix.d)
    for r in ("pt", "ft", "jt", "dec", "oracle"):
        cf = closed_form(mix, n, r)
        base = exact_loss(mix, cf.params)[0]
        for _ in range(5):
            E = rng.normal(size=cf.params.W.shape)
            if r != "oracle":
                E[:] = E[:, :1]  # shared W across tasks
            dirc = rng.normal(size=cf.params.c.shape)
            deltas = []
            for eps in (1e-2, 1e-3):
                W, c = cf.params.W + eps * E, cf.params.c
                if r == "ft":
                    W = cf.params.W  # FT keeps the pretrained W; only the prompts move
                    c = c + eps * dirc
                elif r == "jt":
                    # JT re-optimises the prompts for the perturbed W.
                    c = np.einsum("nkij,kj->nki", eye - n[0] * W @ mix.sigma_x, mix.mus)
                new = exact_loss(mix, ReducedParams(n, W, c, cf.params.g))[0]
                assert new >= base - 1e-12 * abs(base)
                deltas.append(new - base)
            # Stationary point: the increase is quadratic (x100 for x10 the step), not linear.
            assert deltas[0] / deltas[1] == pytest.approx(100.0, rel=0.05)


def test_ordering_on_presets() -> None:
    for name in PRESETS:
        t = theory_curves(preset(name), range(61), ALL_REGIMES)
        tol = 1e-12
        assert np.all(t["dec"] <= t["jt"] + tol), name
        assert np.all(t["jt"] <= t["ft"] + tol), name
        assert np.all(t["ft"] <= t["pt"] + tol), name
        assert np.all(t["oracle"] <= t["dec"] + tol), name
        assert np.all(t["dec"] <= t["jt_gc"] + tol) and np.all(t["jt_gc"] <= t["jt"] + tol), name
        if np.allclose(preset(name).mean, 0):
            np.testing.assert_allclose(t["jt_gc"], t["jt"], rtol=1e-12)


def test_ordering_on_random_configurations() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(60):
        mix = random_mixture(rng, general_x=bool(rng.integers(0, 2)))
        t = theory_curves(mix, [0, 1, 2, 5, 10, 50, 200], ALL_REGIMES)
        tol = 1e-10
        assert np.all(t["dec"] <= t["jt"] + tol)
        assert np.all(t["jt"] <= t["ft"] + tol)
        assert np.all(t["ft"] <= t["pt"] + tol)
        assert np.all(t["oracle"] <= t["dec"] + tol)
        assert np.all(t["dec"] <= t["jt_gc"] + tol) and np.all(t["jt_gc"] <= t["jt"] + tol)


def test_limits_stated_in_spec() -> None:
    mix = preset("zero_cov_12")
    ns = np.arange(0, 201)
    t = theory_curves(mix, ns)
    # n = 0: PT predicts 0 (loss = E y^2); every prompted regime predicts x^T mu_k.
    assert t["pt"][0] == pytest.approx(1.0)
    for r in ("ft", "jt", "dec"):
        assert t[r][0] == pytest.approx(np.trace(mix.Sigma_bar) / mix.norm)
    # FT converges to PT as n grows (n W_PT -> I shrinks the bias term).
    gap = t["pt"] - t["ft"]
    assert np.all(np.diff(gap[1:]) < 0) and gap[200] < 1e-3 * gap[1]
    # The FT - JT gap is largest at small n.
    assert int(ns[np.argmax(t["ft"] - t["jt"])]) <= 5
    # Every regime improves with n, except FT between n = 0 and 1: with the
    # attention frozen at the PT optimum, the first example adds more variance
    # than the (already prompt-corrected) bias it removes.
    for r in ("pt", "jt", "dec"):
        assert np.all(np.diff(t[r]) < 0)
    assert np.all(np.diff(t["ft"][1:]) < 0) and t["ft"][1] > t["ft"][0]


def test_prompts_explain_the_mean_icl_the_variance() -> None:
    # Pure-mean tasks (no within-task variance, no noise): prompts alone are perfect, PT is not.
    mix = TaskMixture(d=4, mus=[1.0, -2.0], cs=[0.0, 0.0], pis=[0.5, 0.5])
    t = theory_curves(mix, [1, 10, 50])
    np.testing.assert_allclose(t["jt"], 0.0, atol=1e-14)
    np.testing.assert_allclose(t["dec"], 0.0, atol=1e-14)
    assert np.all(t["pt"] > 0.01)
    # Zero means: prompts carry nothing, all four regimes coincide.
    mix0 = TaskMixture(d=5, mus=[0.0, 0.0], cs=[1.0, 3.0], pis=[0.4, 0.6], sigma=0.2)
    t0 = theory_curves(mix0, [0, 1, 10, 50])
    for r in ("ft", "jt", "dec"):
        np.testing.assert_allclose(t0[r], t0["pt"], rtol=1e-12)


def test_invariances() -> None:
    rng = np.random.default_rng(7)
    mix = random_mixture(rng)
    ns = [0, 1, 4, 25]
    base = {r: closed_form(mix, ns, r).loss for r in ALL_REGIMES}
    # Joint rotation of (Sigma_x, mu, Sigma_beta) leaves every loss unchanged.
    q, _ = np.linalg.qr(rng.normal(size=(mix.d, mix.d)))
    rot = TaskMixture(
        mix.d,
        [q @ m for m in mix.mus],
        [q @ c @ q.T for c in mix.covs],
        mix.pis,
        mix.sigmas,
        sigma_x=q @ mix.sigma_x @ q.T,
    )
    for r in ALL_REGIMES:
        np.testing.assert_allclose(closed_form(rot, ns, r).loss, base[r], rtol=1e-9)
    # Sigma_x = s I is the same problem as Sigma_x = I with beta scaled by sqrt(s).
    iso = random_mixture(rng, general_x=False)
    s = 2.7
    scaled_x = TaskMixture(iso.d, iso.mus, iso.covs, iso.pis, iso.sigmas, sigma_x=s)
    scaled_b = TaskMixture(iso.d, np.sqrt(s) * iso.mus, s * iso.covs, iso.pis, iso.sigmas)
    for r in ALL_REGIMES:
        np.testing.assert_allclose(closed_form(scaled_x, ns, r).loss, closed_form(scaled_b, ns, r).loss, rtol=1e-10)
    # Without noise the normalised losses are scale free in beta.
    z = preset("zero_cov_12")
    big = TaskMixture(z.d, 3 * z.mus, 9 * z.covs, z.pis)
    for r in REGIMES:
        np.testing.assert_allclose(closed_form(big, ns, r, True).loss, closed_form(z, ns, r, True).loss, rtol=1e-11)


def test_noise_enters_every_regime_including_decoupled() -> None:
    # Spec pitfall: the notebook's noisy decoupled loss omits +sigma^2; ours includes it.
    quiet = preset("zero_cov_11")
    noisy = preset("noisy_zero_cov_11")
    for r in REGIMES:
        lq = closed_form(quiet, 10**7, r).loss[0]
        ln = closed_form(noisy, 10**7, r).loss[0]
        assert ln == pytest.approx(0.09, rel=1e-3) and lq == pytest.approx(0.0, abs=1e-4)


def test_b_recovers_prompt_vector() -> None:
    cf = closed_form(preset("nonzero_cov_11"), [3, 10], "jt")
    W = cf.params.W
    np.testing.assert_allclose(np.einsum("nkij,nkj->nki", W, cf.b), cf.params.c, atol=1e-10)
    W0, b0, loss0 = closed_form(preset("nonzero_cov_11"), [3, 10], "ft")  # spec's (W, b, loss) API
    assert W0.shape == (2, 10, 10) and b0.shape == (2, 2, 10) and loss0.shape == (2,)


def test_n_validation() -> None:
    assert as_n_array(3).tolist() == [3.0]
    for bad in (-1, 2.5, [1, -2], []):
        with pytest.raises(ValueError):
            as_n_array(bad)
    with pytest.raises(ValueError, match="regime"):
        closed_form(preset("zero_cov_12"), 1, "bogus")


# -------------------------------------------------------------- configurations
@pytest.mark.parametrize(
    "data, field",
    [
        ({"mus": [1, -1], "cs": [1, 1], "pis": [0.5, 0.5]}, "'d'"),
        ({"d": 3, "mus": [1, -1], "cs": [1, 1], "pis": [0.5, -0.5]}, "'pis'"),
        ({"d": 3, "mus": [1], "cs": [1, 1], "pis": [0.5, 0.5]}, "'mus'"),
        ({"d": 3, "mus": [1, [1, 2]], "cs": [1, 1], "pis": [0.5, 0.5]}, r"'mus\[1\]'"),
        ({"d": 2, "mus": [1, 1], "cs": [1, [[1, 2], [2, 1]]], "pis": [0.5, 0.5]}, r"'cs\[1\]'"),
        ({"d": 2, "mus": [1, 1], "cs": [1, -1], "pis": [0.5, 0.5]}, r"'cs\[1\]'"),
        ({"d": 2, "mus": [1, 1], "cs": [1, 1], "pis": [0.5, 0.5], "sigma": [0.1]}, "'sigma'"),
        ({"d": 2, "mus": [1, 1], "cs": [1, 1], "pis": [0.5, 0.5], "sigma_x": [[1, 0], [0, 0]]}, "'sigma_x'"),
        ({"d": 2, "mus": [1, 1], "cs": [1, 1], "pis": [0.5, 0.5], "noise": 0.1}, "'noise'"),
        ({"d": 0, "mus": [], "cs": [], "pis": []}, "'d'"),
        ({"d": 2, "mus": ["a", 1], "cs": [1, 1], "pis": [0.5, 0.5]}, r"'mus\[0\]'"),
    ],
)
def test_bad_user_config_names_the_field(tmp_path, data, field) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=field):
        load_config(path)
    with pytest.raises(ValueError, match=field):
        resolve_config(str(path))


def test_config_roundtrip_and_resolution(tmp_path) -> None:
    rng = np.random.default_rng(3)
    mix = random_mixture(rng)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mix.to_dict()))
    back = resolve_config(str(path))
    for attr in ("mus", "covs", "pis", "sigmas", "sigma_x"):
        np.testing.assert_allclose(getattr(back, attr), getattr(mix, attr))
    assert resolve_config("zero_cov_12").name == "zero_cov_12"
    with pytest.raises(ValueError, match="unknown theory config"):
        resolve_config("no_such_preset")
    with pytest.raises(ValueError, match="not found"):
        resolve_config(str(tmp_path / "missing.json"))
    # Preset round trip through to_dict keeps the compact scalar form.
    assert preset("zero_cov_12").to_dict()["cs"] == [1.0, 2.0]
    covs = TaskMixture.from_dict(preset("isotropic_covariance_zero_mean").to_dict()).covs
    assert covs[0][9, 9] == pytest.approx(2.0**-9)
