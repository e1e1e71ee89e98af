"""ID-SPAM's prompt generator alone: parameter counts, float64 hand computation, padding, pooling and dropout."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers.id_spam import info
from conftest import tiny

import softprompt as sp
from softprompt.methods.id_spam import IDSPAM, IDSPAMConfig, id_spam_parameter_count


# ---- parameter counts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected", [(768, 2_064_384), (1024, 3_538_944)])
def test_parameter_count_matches_paper(n, expected):
    module = IDSPAM(IDSPAMConfig(), info(n))
    count = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert count == expected == 3 * n * n + 384 * n == id_spam_parameter_count(n)


def test_parameter_count_tiny_model_and_general_form():
    model = sp.wrap(tiny("bert", "cls"), IDSPAMConfig())
    n = model.info.hidden_size
    assert model.num_parameters_summary()[0] == 3 * n * n + 384 * n
    assert set(model.trainable_parameters()) >= {f"method.{k}" for k in ("q.weight", "k.weight", "v.weight",
                                                                          "down.weight", "up.weight", "up.bias")}
    for kw in ({"qkv_bias": True, "down_bias": True}, {"up_bias": False}, {"pooling": "mean"},
               {"num_virtual_tokens": 4, "bottleneck": 7}):
        cfg = IDSPAMConfig(**kw)
        module = IDSPAM(cfg, info(48))
        assert sum(p.numel() for p in module.parameters()) == id_spam_parameter_count(
            48, cfg.num_virtual_tokens, cfg.bottleneck, qkv_bias=cfg.qkv_bias, down_bias=cfg.down_bias,
            up_bias=cfg.up_bias, pooling=cfg.pooling)


# ---- the generator ------------------------------------------------------------------------------------------------
def reference_prompt(module: IDSPAM, e: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2 by hand in float64: explicit softmax, masked mean, MLP. Returns (prompt [B,t,n], weights [B,N])."""
    d = {k: v.double() for k, v in module.state_dict().items()}
    e = e.double()
    real = mask.bool()

    def lin(x, name):
        return x @ d[f"{name}.weight"].T + d.get(f"{name}.bias", 0.0)

    q, k, v = lin(e, "q"), lin(e, "k"), lin(e, "v")
    scores = q @ k.transpose(1, 2) / math.sqrt(e.shape[-1])
    probs = torch.softmax(scores.masked_fill(~real[:, None, :], float("-inf")), dim=-1)
    out = probs @ v
    a = (out * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    w = (probs * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    s = lin(torch.relu(lin(a, "down")), "up")
    if module.config.up_activation == "relu":
        s = torch.relu(s)
    return s.view(e.shape[0], module.config.num_virtual_tokens, e.shape[-1]), w


@pytest.mark.parametrize("up_activation", ["relu", "none"])
def test_generator_equals_float64_hand_computation(up_activation, padded):
    _, mask = padded
    cfg = IDSPAMConfig(num_virtual_tokens=3, bottleneck=5, up_activation=up_activation, qkv_bias=True,
                       down_bias=True, dropout=0.0)
    module = IDSPAM(cfg, info(16)).eval()
    torch.manual_seed(2)
    e = torch.randn(3, 9, 16)
    ref, ref_w = reference_prompt(module, e, mask)
    with torch.no_grad():
        out = module.generate_prompt(e, mask)
        w = module.token_weights(e, mask)
        a = module.pool(e, mask)
        v = module.v(e)
    assert out.shape == (3, 3, 16)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (w.double() - ref_w).abs().max().item() < 1e-6
    # The explanation weights are exactly the pooling weights: A = sum_j w_j v_j.
    assert ((w[..., None] * v).sum(1) - a).abs().max().item() < 1e-5
    if up_activation == "relu":
        assert (out >= 0).all()
    else:
        assert (out < 0).any()
    # Same module in float64: agreement to float64 rounding.
    with torch.no_grad():
        out64 = module.double().generate_prompt(e.double(), mask)
    assert (out64 - ref).abs().max().item() < 1e-12


def test_padding_does_not_change_a_rows_prompt(padded):
    _, mask = padded
    module = IDSPAM(IDSPAMConfig(dropout=0.0), info(16)).eval()
    torch.manual_seed(4)
    e = torch.randn(3, 9, 16) * 3  # padded slots hold garbage embeddings on purpose
    with torch.no_grad():
        batch = module.generate_prompt(e, mask)
        for row in range(3):
            keep = mask[row].bool()
            alone = module.generate_prompt(e[row : row + 1, keep], torch.ones(1, int(keep.sum())))
            assert (batch[row] - alone[0]).abs().max().item() < 1e-6
        assert (module.token_weights(e, mask)[~mask.bool()] == 0).all()


def test_mean_pooling_ablation(padded):
    _, mask = padded
    module = IDSPAM(IDSPAMConfig(pooling="mean", dropout=0.0), info(16)).eval()
    assert not hasattr(module, "q")
    e = torch.randn(3, 9, 16)
    real = mask.bool()[..., None].float()
    a = (e * real).sum(1) / real.sum(1)
    with torch.no_grad():
        expected = torch.relu(module.up(torch.relu(module.down(a)))).view(3, 10, 16)
        assert (module.generate_prompt(e, mask) - expected).abs().max().item() < 1e-6
        w = module.token_weights(e, mask)
    assert torch.allclose(w.sum(-1), torch.ones(3)) and (w[~mask.bool()] == 0).all()


@pytest.mark.parametrize("site", ["prompt", "generator"])
def test_dropout_sites(site, padded):
    _, mask = padded
    module = IDSPAM(IDSPAMConfig(dropout=0.5, dropout_site=site, up_activation="none"), info(16))
    e = torch.randn(3, 9, 16)
    module.train()
    torch.manual_seed(0)
    a = module.generate_prompt(e, mask)
    b = module.generate_prompt(e, mask)
    assert not torch.equal(a, b)
    assert ((a == 0).float().mean() > 0.3) == (site == "prompt")  # only prompt-site dropout zeroes entries of S
    module.eval()
    assert torch.equal(module.generate_prompt(e, mask), module.generate_prompt(e, mask))


def test_generator_site_drops_the_pooled_vector_and_the_bottleneck(padded):
    """dropout_site="generator": S = up(drop(relu(down(drop(A))))), written out with the same random stream; S itself
    is not dropped (the spec's alternative site)."""
    _, mask = padded
    module = IDSPAM(IDSPAMConfig(dropout=0.5, dropout_site="generator", up_activation="none"), info(16))
    e = torch.randn(3, 9, 16)
    module.train()
    torch.manual_seed(0)
    got = module.generate_prompt(e, mask)
    torch.manual_seed(0)
    h = module.drop(torch.relu(module.down(module.drop(module.pool(e, mask)))))
    want = module.up(h).view(3, module.config.num_virtual_tokens, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
