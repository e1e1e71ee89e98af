"""``dnd.delta.delta_cosine``: the cosine of two LoRA updates from rank-by-rank products equals the cosine of the
explicitly formed updates ΔW = B·A (all modules flattened and concatenated), in float64."""

import math

import pytest
import torch

from softprompt.dnd.delta import delta_cosine, lora_pairs


def lora(seed: int, modules=("q_proj", "v_proj", "down_proj"), rank: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (12, 12), "v_proj": (4, 12), "down_proj": (12, 20)}  # (out, in)
    out = {}
    for layer in range(2):
        for m in modules:
            stem = f"base_model.model.model.layers.{layer}.self_attn.{m}."
            o, i = shapes[m]
            out[stem + "lora_A.weight"] = torch.randn(rank, i, generator=g)
            out[stem + "lora_B.weight"] = torch.randn(o, rank, generator=g)
    return out


def explicit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (b.double() @ a.double()).flatten() for k, (a, b) in lora_pairs(state).items()}


def reference(x, y) -> float:
    dx, dy = explicit(x), explicit(y)
    keys = sorted(dx.keys() | dy.keys())
    vx = torch.cat([dx.get(k, torch.zeros_like(dy.get(k, torch.zeros(0)))) for k in keys])
    vy = torch.cat([dy.get(k, torch.zeros_like(dx.get(k, torch.zeros(0)))) for k in keys])
    return float(vx @ vy / (vx.norm() * vy.norm()))


def test_matches_the_formed_updates():
    a, b = lora(1), lora(2)
    assert delta_cosine(a, b) == pytest.approx(reference(a, b), rel=1e-12, abs=1e-15)
    assert delta_cosine(a, a) == pytest.approx(1.0, rel=1e-12)
    neg = {k: -v if k.endswith("lora_B.weight") else v for k, v in a.items()}
    assert delta_cosine(a, neg) == pytest.approx(-1.0, rel=1e-12)


def test_invariant_to_the_lora_factorisation_and_scale():
    """ΔW = B·A is unchanged by B·M, M⁻¹·A (the factorisation a generator may land on) and the cosine by scale."""
    a = lora(3)
    m = (torch.randn(3, 3, generator=torch.Generator().manual_seed(4)) + 3 * torch.eye(3)).double()
    twisted = {}
    for k, v in a.items():
        twisted[k] = (torch.linalg.solve(m, v.double()).float() if k.endswith("lora_A.weight")
                      else (v.double() @ m).float() * 2.5)
    assert delta_cosine(a, twisted) == pytest.approx(1.0, rel=1e-6)


def test_modules_only_one_adapter_has_count_in_its_norm():
    a, b = lora(5), lora(6, modules=("q_proj",))
    assert delta_cosine(a, b) == pytest.approx(reference(a, b), rel=1e-12)
    assert not math.isclose(delta_cosine(a, b), delta_cosine({k: v for k, v in a.items() if "q_proj" in k}, b))


def test_zero_update_and_a_missing_half():
    a = lora(7)
    zero = {k: torch.zeros_like(v) if k.endswith("lora_B.weight") else v for k, v in a.items()}
    assert delta_cosine(a, zero) == 0.0
    broken = {k: v for k, v in a.items() if not k.endswith("lora_B.weight")}
    with pytest.raises(ValueError, match=r"no .*lora_B\.weight"):
        delta_cosine(broken, a)
