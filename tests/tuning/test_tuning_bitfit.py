"""BitFit: the method's parameters are the backbone's own biases, by their backbone names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import BitFitConfig, build_method, freeze_except
from speechprompt.tuning.bitfit import BitFitScope

TOKENS = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))


def _lm(seed: int = 0) -> UnitLM:
    torch.manual_seed(seed)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _layer_biases(d: int, ffn: int, layer_norm: bool = True) -> int:
    linear = 4 * d + ffn + d  # q, k, v, out, fc1, fc2
    return linear + (2 * d if layer_norm else 0)


def test_parameters_are_the_backbone_biases_themselves():
    model = _lm()
    method = build_method("bitfit", model)
    named = dict(model.named_parameters())
    for name, p in method.named_parameters():
        assert name.endswith(".bias") and p is named[name]
    assert method.trainable_parameters() == 2 * _layer_biases(64, 128)


@pytest.mark.parametrize("scope,layer_norm,expected", [
    (BitFitScope.LAYERS, True, 2 * _layer_biases(64, 128)),
    (BitFitScope.LAYERS, False, 2 * _layer_biases(64, 128, layer_norm=False)),
    (BitFitScope.ALL, True, 2 * _layer_biases(64, 128) + 64),  # + the final LayerNorm
])
def test_scope_on_the_unit_lm(scope, layer_norm, expected):
    method = build_method(BitFitConfig(scope=scope, layer_norm=layer_norm), _lm())
    assert method.trainable_parameters() == expected


def test_scope_all_on_hubert_reaches_front_end_biases():
    model = HubertModel(HubertConfig.tiny())
    names = set(build_method(BitFitConfig(scope=BitFitScope.ALL), model).state_dict())
    assert {"layer_norm.bias", "post_extract_proj.bias", "encoder.pos_conv.0.bias"} <= names
    assert "encoder.layers.1.final_layer_norm.bias" in names
    assert not any(n.endswith("weight") for n in names)


def test_checkpoint_loads_into_a_fresh_backbone_and_reproduces_it():
    model = _lm()
    method = build_method("bitfit", model)
    opt = torch.optim.Adam(freeze_except(model, method), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(TOKENS).logsumexp(-1).mean().backward()
        opt.step()
    state = method.state_dict()
    with torch.no_grad():
        trained = model(TOKENS)

    fresh = _lm()  # the same frozen base model (same seed), untouched
    with torch.no_grad():
        assert not torch.equal(fresh(TOKENS), trained)
        build_method("bitfit", fresh).load_state_dict(state, strict=True)
        assert torch.equal(fresh(TOKENS), trained)


def test_restore_puts_the_frozen_biases_back():
    model = _lm()
    with torch.no_grad():
        frozen = model(TOKENS)
    method = build_method(BitFitConfig(), model)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(1.0)
        assert not torch.equal(model(TOKENS), frozen)
        method.restore()
        assert torch.equal(model(TOKENS), frozen)


def test_no_weight_ever_trains():
    model = _lm()
    method = build_method("bitfit", model)
    freeze_except(model, method)
    trainable = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert all(not m.weight.requires_grad for m in trainable if isinstance(m, (nn.Linear, nn.LayerNorm)))


def test_bad_scope():
    with pytest.raises(ConfigError, match="scope"):
        BitFitConfig(scope="heads")
