"""Prefix tuning: shapes and counts, the MLP reparameterisation and folding it away, both backbones."""

from __future__ import annotations

import pytest
import torch

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.transformer import LayerKV
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import PrefixConfig, PrefixTuning, TuningError, build_method, freeze_except


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _hubert() -> HubertModel:
    torch.manual_seed(0)
    return HubertModel(HubertConfig.tiny()).eval()


TOKENS = torch.randint(4, 104, (2, 5), generator=torch.Generator().manual_seed(0))


def test_direct_prefix_count_and_layer_kv_layout():
    model = _lm()  # 2 layers, d=64, 4 heads of 16
    method = build_method(PrefixConfig(length=3), model)
    assert method.trainable_parameters() == 2 * 2 * 3 * 64
    prefix = method.forward_kwargs(batch_size=2)["prefix"]
    assert len(prefix) == 2 and all(p.key.shape == p.value.shape == (2, 4, 3, 16) for p in prefix)
    # Head h of layer i, position j is slice [h*16:(h+1)*16] of the stored (L, D) row, as the attention splits heads.
    raw = method.prefix.detach()  # (layers, 2, L, D)
    assert torch.equal(prefix[1].value[0, 2, 1], raw[1, 1, 1, 32:48])
    assert torch.equal(prefix[0].key[1, 3, 0], raw[0, 0, 0, 48:64])


def test_prefix_reaches_the_model_as_given():
    model = _lm()
    method = build_method(PrefixConfig(length=2), model)
    manual = [LayerKV(kv.key.clone(), kv.value.clone()) for kv in method.forward_kwargs()["prefix"]]
    with torch.no_grad():
        assert torch.equal(model(TOKENS, **method.forward_kwargs()), model(TOKENS, prefix=manual))
        assert not torch.equal(model(TOKENS, prefix=manual), model(TOKENS))


def test_reparameterised_count_and_fold_gives_identical_outputs():
    model = _lm()
    torch.manual_seed(1)
    method = build_method(PrefixConfig(length=3, reparameterize=True, hidden_size=8), model)
    L, D, h, out = 3, 64, 8, 2 * 2 * 64
    assert method.trainable_parameters() == L * D + (D * h + h) + (h * out + out)
    freeze_except(model, method)
    with torch.no_grad():
        before = model(TOKENS, **method.forward_kwargs())
    method.fold()
    assert set(method.state_dict()) == {"prefix"} and method.trainable_parameters() == 2 * 2 * 3 * 64
    assert method.config.reparameterize is False
    with torch.no_grad():
        assert torch.equal(model(TOKENS, **method.forward_kwargs()), before)


def test_export_is_always_the_folded_prefix_and_loads_into_a_reparameterised_method():
    model = _lm()
    cfg = PrefixConfig(length=2, reparameterize=True, hidden_size=4)
    method = build_method(cfg, model)
    exported = method.export_state_dict()
    assert set(exported) == {"prefix"} and exported["prefix"].shape == (2, 2, 2, 64)
    other = build_method(cfg, model)
    other.load_exported_state_dict(exported)
    with torch.no_grad():
        assert torch.equal(model(TOKENS, **other.forward_kwargs()), model(TOKENS, **method.forward_kwargs()))


def test_mlp_gradients_flow_in_training():
    model = _lm()
    method = build_method(PrefixConfig(length=2, reparameterize=True, hidden_size=8), model)
    freeze_except(model, method)
    model(TOKENS, **method.forward_kwargs()).sum().backward()
    assert method.embedding.grad.abs().sum() > 0 and method.mlp[0].weight.grad.abs().sum() > 0


def test_hubert_prefix_changes_features_and_trains():
    model = _hubert()
    wav = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    method = build_method(PrefixConfig(length=4), model)
    assert method.trainable_parameters() == 2 * 2 * 4 * 32
    freeze_except(model, method)
    out = model.extract_features(wav, **method.forward_kwargs())
    assert out.shape == model.extract_features(wav).shape and not torch.equal(out, model.extract_features(wav))
    out.pow(2).mean().backward()
    assert method.prefix.grad.abs().sum() > 0


def test_bad_configs_and_mismatched_models():
    with pytest.raises(ConfigError, match="length"):
        PrefixConfig(length=0)
    with pytest.raises(ConfigError, match="hidden_size"):
        PrefixConfig(hidden_size=0)
    method = PrefixTuning(PrefixConfig(), _lm())
    with pytest.raises(TuningError, match="built for 2 layers x 4 heads x 16"):
        method.attach(_hubert())
