"""The linear-attention model: exact reduction to the closed forms, and training towards them."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.theory.closed_form import closed_form
from softprompt.theory.config import TaskMixture, preset
from softprompt.theory.model import LinearAttn, tokens
from softprompt.theory.montecarlo import reduced_predictor
from softprompt.theory.sampling import TaskSampler
from softprompt.theory.train import prefix_grams, train, train_multi

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


def small_mixture() -> TaskMixture:
    """d = 3, two tasks with zero global mean (so plain KQV cannot learn a global bias)."""
    return TaskMixture(d=3, mus=[1.4, -0.6], cs=[1.0, 2.0], pis=[0.3, 0.7], name="small")


def test_gram_forward_equals_token_forward() -> None:
    mix = preset("zero_cov_12")
    batch = TaskSampler(mix, seed=1).sample(1, 6, 7)
    Z, zq = tokens(batch)
    for heads in (False, True):
        gen = torch.Generator().manual_seed(0)
        model = LinearAttn(10, 2, runs=3, prompt_len=2, heads=heads, generator=gen).double()
        for use_prompt in (False, True):
            a = model(1, Z, zq, use_prompt=use_prompt)
            b = model.forward_tokens(1, Z, zq, use_prompt=use_prompt)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_all_task_forward_and_prefix_grams() -> None:
    mix = small_mixture()
    ns = [4, 1, 7]
    batch = TaskSampler(mix, seed=2).sample_all(max(ns), 5)
    Z, zq = tokens(batch)
    model = LinearAttn(3, 2, runs=6, heads=True, generator=torch.Generator().manual_seed(1)).double()
    grams = prefix_grams(Z, ns)  # (K, g, B, D, D)
    out = model.forward_all(grams, zq)  # (R, K, B)
    for g, n in enumerate(ns):
        for k in range(2):
            sub = Z[k, :, :n]
            torch.testing.assert_close(grams[k, g], sub.transpose(1, 2) @ sub)
            ref = model.forward_tokens(k, sub, zq[k])[2 * g : 2 * g + 2]
            torch.testing.assert_close(out[2 * g : 2 * g + 2, k], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regime", ["pt", "ft", "jt", "dec", "jt_gc"])
def test_attention_represents_the_closed_form_exactly(regime: str) -> None:
    """Spec section 3: with W_q = I and W_k = sqrt(D) [[W, 0], [0, 0]] the model is the reduced one.

    ``jt_gc`` (shared centring, no heads) is realised by the last row of W_v,
    ``(u_x, u_y) = (-g, 1)``: the "global-mean pitfall" term of the spec.
    """
    mix = TaskMixture(d=4, mus=[[1.0, 0.5, -0.3, 2.0], -1.0], cs=[1.0, [0.5, 1.0, 2.0, 0.1]], pis=[0.4, 0.6], sigma=0.2)
    n = 5
    params = closed_form(mix, n, regime).params
    d, D = mix.d, mix.d + 1
    model = LinearAttn(d, 2, runs=1, prompt_len=1, heads=regime == "dec").double()
    W = torch.as_tensor(params.W[0, 0])
    with torch.no_grad():
        model.Wq.copy_(torch.eye(D)[None])
        wk = torch.zeros(D, D, dtype=torch.float64)
        wk[:d, :d] = math.sqrt(D) * W  # W_KQ = W_q^T W_k / sqrt(D) = [[W, 0], [0, 0]]
        model.Wk.copy_(wk[None])
        wv = torch.eye(D, dtype=torch.float64)
        if regime == "jt_gc":
            wv[d, :d] = -torch.as_tensor(params.g[0, 0])  # shared u_x = -u_y g
        model.Wv.copy_(wv[None])  # w_PV = W_v^T v
        for k in range(2):
            # Centring vector of task k: per-task head (dec) or the shared W_v row (jt_gc).
            g = torch.as_tensor(params.g[0, k])
            c = torch.as_tensor(params.c[0, k])
            px = torch.linalg.solve(W, c)  # prompt term: W p_x (u_x.p_x + u_y p_y) = c_k
            if regime == "dec":
                model.heads[0, k, :d] = -g
                model.heads[0, k, d] = 1.0
            model.prompts[0, k, 0, :d] = px
            model.prompts[0, k, 0, d] = 1.0 + g @ px
    ref = reduced_predictor(params)
    batch = TaskSampler(mix, seed=4).sample(1, n, 50)
    got = model.predictor(use_prompt=regime != "pt")(1, batch)[0]
    torch.testing.assert_close(got, ref(1, batch), rtol=1e-10, atol=1e-10)
    red = model.reduced_view()
    torch.testing.assert_close(red["A"][0] * red["u_y"][0], W)
    assert float(red["a"].abs().max()) == 0.0


def test_subset_and_config_validation() -> None:
    model = LinearAttn(3, 2, runs=4, heads=True)
    sub = model.subset([1, 3])
    torch.testing.assert_close(sub.Wq, model.Wq[[1, 3]])
    torch.testing.assert_close(sub.heads, model.heads[[1, 3]])
    with pytest.raises(ValueError, match="regime"):
        train(small_mixture(), "bogus", 3, steps=1)
    with pytest.raises(ValueError, match="distinct"):
        train_multi(small_mixture(), "pt", [3, 3], steps=1)


@pytest.mark.parametrize(
    "regime, steps, lr, batch, runs, tol",
    # Prompt+heads leaves a plateau late (spec: "training approaches it slowly"), hence a
    # larger step size and 4 restarts; in a seed sweep (1-3) the best run ended 0.5-3.5% above.
    [("pt", 500, 1e-2, 512, 2, 0.03), ("jt", 500, 1e-2, 512, 2, 0.03), ("dec", 1500, 3e-2, 256, 4, 0.06)],
)
def test_training_approaches_closed_form(regime: str, steps: int, lr: float, batch: int, runs: int, tol: float) -> None:
    """Adam + step decay on the real attention model gets within a few % of the closed-form optimum."""
    mix = small_mixture()
    res = train(mix, regime, 4, steps=steps, lr=lr, batch=batch, runs=runs, eval_batches=4, eval_batch=2048, seed=1)
    rel, se = res.best_vs_theory
    # Paired with the closed form on the same draws: the gap must be small...
    assert rel < tol, (rel, se)
    # ...and the trained model cannot beat the optimum by more than noise + the small
    # extra freedom of the full attention (spec section 3 counts only the reduced terms).
    assert rel > -0.01 - 4 * se
    assert res.best <= res.mean + 1e-12 and len(res.normalised) == runs
    assert res.history[-1][1] < res.history[0][1]
    if regime == "dec":
        # 19% below L_JT here: only reachable by centring the context labels with the heads.
        assert res.best < closed_form(mix, 4, "jt", normalise=True).loss[0]
        assert min(res.structure["cos_u_x_minus_mu"]) > 0.9


def test_fine_tuning_improves_on_its_pretrained_model() -> None:
    mix = small_mixture()
    ns = [4, 8]
    res = train_multi(mix, "ft", ns, steps=600, pretrain_steps=800, lr=1e-2, batch=512, runs=2, eval_batches=4,
                      eval_batch=2048, seed=2)
    for n in ns:
        ft, pt = res[n], res[n].pretrain
        assert pt is not None and pt.regime == "pt"
        assert ft.best < pt.best  # prompts remove the task-mean bias
        assert abs(ft.best_vs_theory[0]) < 0.03
        assert abs(pt.best_vs_theory[0]) < 0.03
        assert ft.theory < pt.theory
        # Frozen attention: the FT phase must not have moved W_q, W_k, W_v.
        torch.testing.assert_close(ft.model.Wk, pt.model.Wk)
