"""LoRA: zero-init B, the update it computes, merge/unmerge, names kept, counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import LoraConfig, TuningError, build_method
from speechprompt.tuning.base import LinearName

TOKENS = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))
ALL = list(LinearName)


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _randomize(method) -> None:
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(0, 0.1)


@pytest.mark.parametrize("targets", [[LinearName.Q, LinearName.V], ALL])
def test_step_zero_equals_the_frozen_model_exactly(targets):
    model = _lm()
    with torch.no_grad():
        frozen = model(TOKENS)
        method = build_method(LoraConfig(targets=targets), model)
        assert all(torch.count_nonzero(m.B) == 0 for m in method.modules() if hasattr(m, "B"))
        assert torch.equal(model(TOKENS), frozen)


def test_branch_adds_scaled_low_rank_update():
    model = _lm()
    method = build_method(LoraConfig(rank=2, alpha=6.0, targets=[LinearName.FC1]), model)
    _randomize(method)
    fc1 = model.transformer_layers()[1].fc1
    x = torch.randn(5, 64)
    A, B = fc1.lora.A, fc1.lora.B
    expected = x @ fc1.weight.T + fc1.bias + 3.0 * (x @ A.T @ B.T)
    assert torch.allclose(fc1(x), expected, atol=1e-6)


def test_frozen_names_and_classes_are_kept():
    model = _lm()
    keys = set(model.state_dict())
    method = build_method(LoraConfig(targets=ALL), model)
    assert keys <= set(model.state_dict())
    assert set(model.state_dict()) - keys == set(method.state_dict())
    assert all(type(layer.fc1) is nn.Linear for layer in model.transformer_layers())
    assert "decoder.layers.0.self_attn.v_proj.lora.B" in method.state_dict()


def test_merge_matches_unmerged_and_unmerge_restores_weights():
    model = _lm()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method(LoraConfig(rank=4, targets=ALL), model)
    _randomize(method)
    with torch.no_grad():
        unmerged = model(TOKENS)
        method.merge()
        method.merge()  # idempotent
        merged = model(TOKENS)
        q = model.transformer_layers()[0].self_attn.q_proj
        assert not torch.equal(q.weight, weights["decoder.layers.0.self_attn.q_proj.weight"])
        assert torch.allclose(merged, unmerged, atol=1e-5)
        method.unmerge()
        assert torch.allclose(model(TOKENS), unmerged, atol=1e-5)
    for k, v in weights.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_detach_while_merged_restores_the_frozen_model():
    model = _lm()
    with torch.no_grad():
        frozen = model(TOKENS)
    method = build_method(LoraConfig(), model)
    _randomize(method)
    method.merge()
    method.detach()
    assert not any(hasattr(layer.self_attn.q_proj, "lora") for layer in model.transformer_layers())
    with torch.no_grad():
        assert torch.allclose(model(TOKENS), frozen, atol=1e-5)
    with pytest.raises(TuningError, match="not attached"):
        method.merge()


def test_dropout_acts_only_in_training():
    model = _lm()
    method = build_method(LoraConfig(dropout=0.5), model)
    _randomize(method)
    with torch.no_grad():
        method.eval()
        assert torch.equal(model(TOKENS), model(TOKENS))
        method.train()
        assert not torch.equal(model(TOKENS), model(TOKENS))


def test_hubert_base_q_k_rank_8_has_the_published_count():
    model = HubertModel(HubertConfig.base())  # a real build: faster than on the meta device
    method = build_method(LoraConfig(rank=8, targets=[LinearName.Q, LinearName.K]), model)
    assert method.trainable_parameters() == 12 * 2 * (8 * 768 + 768 * 8) == 294_912  # "0.29M"


def test_lora_and_mask_on_the_same_linear_is_refused():
    model = _lm()
    build_method("mask", model)
    with pytest.raises(TuningError, match="LoRA target q_proj of layer 0 is a MaskedLinear.*another method"):
        build_method(LoraConfig(), model)
    with pytest.raises(TuningError, match="mask target q_proj of layer 0 is a MaskedLinear.*another method"):
        build_method("mask", model)


def test_bad_configs():
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="targets: 'query' is not one of"):
        LoraConfig(targets=["query"])
    with pytest.raises(ConfigError, match="without repeats"):
        LoraConfig(targets=[])
