"""Bottleneck adapters: exact identity at step 0, the published counts, slots, scale and detach."""

from __future__ import annotations

import pytest
import torch

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import AdapterConfig, TuningError, build_method
from speechprompt.tuning.adapter import AdapterSlot

HOULSBY = [AdapterSlot.POST_ATTN, AdapterSlot.POST_FFN]


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _hubert(pre_ln: bool = False) -> HubertModel:
    torch.manual_seed(0)
    return HubertModel(HubertConfig.tiny(layer_norm_first=pre_ln)).eval()


def _out(model, x):
    return model(x) if isinstance(model, UnitLM) else model.extract_features(x)


MODELS = {
    "unit_lm": (_lm, torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))),
    "hubert_post_ln": (_hubert, torch.randn(2, 900, generator=torch.Generator().manual_seed(0))),
    "hubert_pre_ln": (lambda: _hubert(True), torch.randn(2, 900, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("backbone", list(MODELS))
@pytest.mark.parametrize("slots", [HOULSBY, [AdapterSlot.POST_FFN], [AdapterSlot.PARALLEL_FFN], list(AdapterSlot)])
def test_step_zero_equals_the_frozen_model_exactly(backbone, slots):
    build, x = MODELS[backbone]
    model = build()
    with torch.no_grad():
        frozen = _out(model, x)
        build_method(AdapterConfig(slots=slots, scale=0.1 if slots == [AdapterSlot.PARALLEL_FFN] else 1.0), model)
        assert torch.equal(_out(model, x), frozen)


def test_hubert_base_post_ffn_adapter_has_the_published_count():
    model = HubertModel(HubertConfig.base())  # a real build: faster than on the meta device
    method = build_method(AdapterConfig(slots=[AdapterSlot.POST_FFN], bottleneck=32), model)
    assert method.trainable_parameters() == 12 * (768 * 32 + 32 + 32 * 768 + 768) == 599_424  # "0.60M"


def test_aat_parallel_adapter_width_from_ratio():
    model = _hubert()  # d = 32
    method = build_method(AdapterConfig(slots=[AdapterSlot.PARALLEL_FFN], bottleneck_ratio=0.25), model)
    adapter = model.transformer_layers()[0].parallel_ffn
    assert adapter.down.out_features == 8 and not adapter.residual
    assert method.trainable_parameters() == 2 * (32 * 8 + 8 + 8 * 32 + 32)


def test_adapters_are_registered_under_their_slot_paths_and_selected_layers():
    model = _lm()
    method = build_method(AdapterConfig(slots=[AdapterSlot.POST_FFN], layers=[-1]), model)
    assert set(method.state_dict()) == {f"decoder.layers.1.post_ffn.{p}.{w}" for p in ("down", "up")
                                        for w in ("weight", "bias")}
    layers = model.transformer_layers()
    assert layers[0].post_ffn is None and layers[1].post_ffn is method.get_submodule("decoder.layers.1.post_ffn")


def test_serial_and_parallel_branches_compute_what_they_claim():
    model = _lm()
    method = build_method(AdapterConfig(slots=[AdapterSlot.POST_FFN, AdapterSlot.PARALLEL_FFN], scale=0.5), model)
    layer = model.transformer_layers()[0]
    with torch.no_grad():
        for p in method.parameters():
            p.normal_()
    x = torch.randn(3, 64)
    for adapter, residual in ((layer.post_ffn, x), (layer.parallel_ffn, 0)):
        branch = adapter.up(torch.nn.functional.gelu(adapter.down(x))) * 0.5
        assert torch.allclose(adapter(x), residual + branch)


def test_taken_slot_is_refused_and_detach_frees_it():
    model = _lm()
    first = build_method(AdapterConfig(slots=[AdapterSlot.POST_FFN]), model)
    with pytest.raises(TuningError, match="already taken"):
        build_method(AdapterConfig(slots=[AdapterSlot.POST_FFN]), model)
    assert all(layer.post_attn is None for layer in model.transformer_layers())  # the failed attach left nothing
    first.detach()
    assert all(layer.post_ffn is None for layer in model.transformer_layers())
    build_method(AdapterConfig(slots=[AdapterSlot.POST_FFN]), model)


def test_bad_configs():
    with pytest.raises(ConfigError, match="without repeats"):
        AdapterConfig(slots=[AdapterSlot.POST_FFN, AdapterSlot.POST_FFN])
    with pytest.raises(ConfigError, match="not one of"):
        AdapterConfig(slots=["post_mlp"])
    with pytest.raises(ConfigError, match="activation"):
        AdapterConfig(activation="swish")
    with pytest.raises(ConfigError, match="bottleneck_ratio"):
        AdapterConfig(bottleneck_ratio=0.0)
    with pytest.raises(TuningError, match="out of range"):
        build_method(AdapterConfig(layers=[5]), _lm())
