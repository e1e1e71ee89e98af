"""softprompt.inductor: the Inductor setting every compiled training path applies (known wrong-gradient bugs)."""

from __future__ import annotations

import types

import torch._inductor
from torch._inductor import config

from softprompt.inductor import disable_mix_order_reduction


def test_disable_mix_order_reduction_turns_the_fusion_off(mix_order_on):
    assert config.triton.mix_order_reduction is True
    assert disable_mix_order_reduction() is True  # torch 2.13 here, 2.11 on the GPU: both have the setting
    assert config.triton.mix_order_reduction is False


def test_a_torch_without_the_setting_is_left_alone(monkeypatch):
    older = types.SimpleNamespace(triton=types.SimpleNamespace(cudagraphs=False))  # a torch before 2.10
    monkeypatch.setattr(torch._inductor, "config", older)
    assert disable_mix_order_reduction() is False
    assert vars(older.triton) == {"cudagraphs": False}
