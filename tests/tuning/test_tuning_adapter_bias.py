"""AdapterBias: what the shift computes and reads, the zero-vector start, its LayerNorm option, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import AdapterBiasConfig, TuningError, build_method, freeze_except, method_config
from speechprompt.tuning.adapter_bias import AlphaInput

pytestmark = pytest.mark.usefixtures("one_thread")


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _hubert() -> HubertModel:
    torch.manual_seed(0)
    return HubertModel(HubertConfig.tiny()).eval()


TOKENS = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))


def _perturb(method: nn.Module) -> None:
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("alpha_input", list(AlphaInput))
def test_the_shift_is_alpha_of_the_read_activation_times_the_vector(alpha_input):
    model = _lm()
    layer = model.transformer_layers()[1]
    hidden = torch.randn(3, 5, layer.fc2.in_features)  # what the FFN's activation hands to fc2
    with torch.no_grad():
        plain = layer.fc2(hidden)
    method = build_method(AdapterBiasConfig(alpha_input=alpha_input), model)
    _perturb(method)
    shift = method.get_submodule("decoder.layers.1.fc2.adapter_bias")
    read = hidden if alpha_input is AlphaInput.FFN_HIDDEN else plain
    with torch.no_grad():
        expected = plain + (read @ shift.alpha.weight.T + shift.alpha.bias) * shift.vector  # (3, 5, D)
        torch.testing.assert_close(layer.fc2(hidden), expected)
    assert shift.alpha.in_features == (layer.fc2.in_features if alpha_input is AlphaInput.FFN_HIDDEN
                                       else layer.fc2.out_features)


def test_every_token_moves_along_one_direction_per_layer():
    model = _hubert()
    method = build_method("adapter_bias", model)
    _perturb(method)
    layer = model.transformer_layers()[0]
    h = torch.randn(2, 9, layer.fc2.in_features)
    with torch.no_grad():
        delta = layer.fc2(h) - F.linear(h, layer.fc2.weight, layer.fc2.bias)  # (2, 9, D)
    v = method.get_submodule("encoder.layers.0.fc2.adapter_bias").vector.detach()
    ratio = delta / v  # each token's own scalar, the same for every feature
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert ratio[..., 0].std() > 0.01  # ... but different from token to token


def test_zero_vector_start_is_the_frozen_model_and_alpha_learns_once_the_vector_moves():
    model = _lm()
    with torch.no_grad():
        frozen = model(TOKENS)
    method = build_method("adapter_bias", model)
    params = freeze_except(model, method)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), frozen)
    opt = torch.optim.Adam(params, lr=1e-2)
    shifts = [method.get_submodule(f"decoder.layers.{i}.fc2.adapter_bias") for i in range(2)]
    alpha0 = [s.alpha.weight.detach().clone() for s in shifts]
    for _ in range(3):
        opt.zero_grad()
        model(TOKENS).logsumexp(-1).mean().backward()
        opt.step()
    assert all(s.vector.abs().sum() > 0 for s in shifts)
    assert all(not torch.equal(s.alpha.weight, a) for s, a in zip(shifts, alpha0))


def test_counts_names_and_the_layer_norm_option():
    model = _hubert()  # D = 32, ffn 64, 2 layers
    method = build_method("adapter_bias", model)
    assert method.trainable_parameters() == 2 * (32 + 64 + 1)
    assert set(method.state_dict()) == {f"encoder.layers.{i}.fc2.adapter_bias.{n}" for i in range(2)
                                        for n in ("vector", "alpha.weight", "alpha.bias")}
    method.detach()

    with_norm = build_method(AdapterBiasConfig(layer_norm=True, layers=[-1]), model)
    params = freeze_except(model, with_norm)
    norm = model.transformer_layers()[1].final_layer_norm
    assert set(with_norm.state_dict()) == {"encoder.layers.1.fc2.adapter_bias.vector",
                                           "encoder.layers.1.fc2.adapter_bias.alpha.weight",
                                           "encoder.layers.1.fc2.adapter_bias.alpha.bias",
                                           "encoder.layers.1.final_layer_norm.weight",
                                           "encoder.layers.1.final_layer_norm.bias"}
    assert any(p is norm.weight for p in params) and norm.weight.requires_grad  # the backbone's own tensor
    assert not model.transformer_layers()[0].final_layer_norm.weight.requires_grad
    assert with_norm.trainable_parameters() == 32 + 64 + 1 + 2 * 32


def test_detach_removes_the_hook_and_the_child():
    model = _lm()
    keys = set(model.state_dict())
    with torch.no_grad():
        frozen = model(TOKENS)
    method = build_method("adapter_bias", model)
    _perturb(method)
    with torch.no_grad():
        assert not torch.equal(model(TOKENS), frozen)
    method.detach()
    fc2 = model.transformer_layers()[0].fc2
    assert not hasattr(fc2, "adapter_bias") and not fc2._forward_hooks
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(TOKENS), frozen)


def test_methods_that_would_stack_on_fc2_are_refused():
    model = _lm()
    build_method("adapter_bias", model)
    with pytest.raises(TuningError, match="not a plain nn.Linear"):
        build_method("mask", model)  # a MaskedLinear wrapper would silently drop the shift
    with pytest.raises(TuningError, match="already attached|not a plain nn.Linear"):
        build_method("adapter_bias", model)
    other = _lm()
    build_method(method_config("lora", {"targets": ["fc2"]}), other)
    with pytest.raises(TuningError, match="not a plain nn.Linear"):
        build_method("adapter_bias", other)


def test_bad_config():
    with pytest.raises(ConfigError, match="alpha_input"):
        AdapterBiasConfig(alpha_input="ffn_input")
    with pytest.raises(TuningError, match="out of range"):
        build_method(AdapterBiasConfig(layers=[4]), _lm())
