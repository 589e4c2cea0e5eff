"""CHAPTER's CNN adapters: the front end's empty slots change nothing, each adapter sits after its conv block and
computes a residual bottleneck, it trains whatever ``feature_grad_mult`` says, and the counts are exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_encoders import our_tiny, waveforms

from speechprompt.checkpoint import base_fingerprint
from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.wav2vec2 import ConvFeatureExtractor
from speechprompt.tuning import CnnAdapterConfig, TuningError, build_method, freeze_except
from speechprompt.tuning.adapter import AdapterSlot
from speechprompt.tuning.cnn_adapter import ConvBottleneck

pytestmark = pytest.mark.usefixtures("one_thread")


def _hubert(**overrides) -> HubertModel:
    torch.manual_seed(0)
    return HubertModel(dataclasses.replace(HubertConfig.tiny(), **overrides)).eval()


def _perturb(method) -> None:
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.2)


def test_empty_slots_leave_the_state_dict_and_fingerprint_alone():
    model = our_tiny("wav2vec2")
    front = model.feature_extractor
    assert isinstance(front, ConvFeatureExtractor) and list(front.conv_adapters) == [None] * 5
    assert not any("conv_adapters" in k for k in model.state_dict())
    before = base_fingerprint(model)
    method = build_method("cnn_adapter", model)
    assert all(a is not None for a in front.conv_adapters)
    method.detach()
    assert list(front.conv_adapters) == [None] * 5 and base_fingerprint(model) == before


def test_each_adapter_is_a_residual_bottleneck_after_its_conv_block():
    model = our_tiny("hubert")
    x, _ = waveforms(batch=2, samples=1600)
    method = build_method(CnnAdapterConfig(conv_layers=[1]), model)
    _perturb(method)
    front = model.feature_extractor
    adapter: ConvBottleneck = front.conv_adapters[1]
    with torch.no_grad():
        h = front.conv_layers[1](front.conv_layers[0](x[:, None, :]))  # (B, C, T1) after block 1
        expected = h + adapter.up(F.gelu(adapter.down(h)))
        for conv in front.conv_layers[2:]:
            expected = conv(expected)
        torch.testing.assert_close(front(x), expected, rtol=0, atol=0)
    assert front.conv_adapters[0] is None and front.conv_adapters[2] is None
    assert adapter.down(h).shape[-1] == h.shape[-1]  # 'same' padding: frames keep their count


def test_adapters_train_even_where_the_checkpoint_freezes_the_front_end():
    model = _hubert(feature_grad_mult=0.0)  # fairseq's "no gradient into the convs" (fine-tuned checkpoints)
    x, pad = waveforms(batch=2, samples=1600)
    method = build_method(CnnAdapterConfig(bottleneck=4), model)
    params = freeze_except(model, method)
    model.extract_features(x, pad).pow(2).mean().backward()
    ups = [front_adapter.up.weight.grad for front_adapter in model.feature_extractor.conv_adapters]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)
    assert all(p.grad is None for p in model.feature_extractor.conv_layers.parameters())
    assert {id(p) for p in params} == {id(p) for p in method.parameters()}


def test_counts_with_and_without_the_transformer_adapters():
    model = our_tiny("wavlm")  # 5 conv blocks of 16 channels, 2 layers of width 32
    method = build_method(CnnAdapterConfig(bottleneck=4, kernel_size=3), model)
    per_conv = 16 * 4 * 3 + 4 + 4 * 16 + 16
    assert method.trainable_parameters() == 5 * per_conv
    assert set(method.state_dict()) == {f"feature_extractor.conv_adapters.{i}.{m}.{w}" for i in range(5)
                                        for m in ("down", "up") for w in ("weight", "bias")}
    method.detach()

    chapter = build_method(CnnAdapterConfig(bottleneck=4, kernel_size=1, conv_layers=[-1],
                                            transformer_slots=[AdapterSlot.POST_ATTN, AdapterSlot.POST_FFN],
                                            transformer_bottleneck=8), model)
    houlsby = 32 * 8 + 8 + 8 * 32 + 32
    assert chapter.trainable_parameters() == (16 * 4 + 4 + 4 * 16 + 16) + 2 * 2 * houlsby
    assert chapter.sites[0] == "feature_extractor.conv_adapters.4"
    assert model.transformer_layers()[1].post_ffn is chapter.get_submodule("encoder.layers.1.post_ffn")


def test_a_taken_slot_and_bad_configs_are_refused():
    model = our_tiny("data2vec")
    build_method(CnnAdapterConfig(conv_layers=[0]), model)
    with pytest.raises(TuningError, match="conv_adapters.0 is already taken"):
        build_method("cnn_adapter", model)
    assert model.feature_extractor.conv_adapters[1] is None  # the failed attach left nothing behind
    with pytest.raises(ConfigError, match="odd"):
        CnnAdapterConfig(kernel_size=2)
    with pytest.raises(ConfigError, match="repeats"):
        CnnAdapterConfig(transformer_slots=["post_ffn", "post_ffn"])
    with pytest.raises(TuningError, match="out of range"):
        build_method(CnnAdapterConfig(conv_layers=[5]), our_tiny("wav2vec2"))
