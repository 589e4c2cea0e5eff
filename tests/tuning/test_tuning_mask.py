"""S3-Router masks: exact per-layer sparsity, straight-through gradients, score inits, packed bitmasks, sweeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import MaskConfig, S3Router, TuningError, build_method, freeze_except, sparsity_sweep
from speechprompt.tuning.base import LinearName
from speechprompt.tuning.mask import MaskedLinear, ScoreInit, keep_count

TOKENS = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def test_keep_count_rounds_up_and_is_exact():
    assert keep_count(10, 0.9) == 9 and keep_count(10, 0.7) == 7 and keep_count(10, 1.0) == 10
    assert keep_count(4096, 0.9) == 3687  # 3686.4 rounded up: at most 10% removed
    for n in (1, 7, 100, 8192):
        for r in (0.05, 0.3, 0.5, 0.73, 0.9, 0.99):
            k = keep_count(n, r)
            assert n - k <= (1 - r) * n + 1e-9 and n - k > (1 - r) * n - 1


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.73, 0.1])
@pytest.mark.parametrize("init", list(ScoreInit))
def test_sparsity_is_exact_in_every_layer(keep, init):
    model = _lm()
    if init is ScoreInit.MAGNITUDE:  # many tied scores must still give the exact count
        with torch.no_grad():
            model.transformer_layers()[0].fc1.weight[:8].fill_(0.5)
    method = build_method(MaskConfig(keep_ratio=keep, init=init), model)
    for path, router in method.routers().items():
        mask = router()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == keep_count(mask.numel(), keep), path
    assert len(method.routers()) == 2 * 6


@pytest.mark.parametrize("backbone", ["unit_lm", "hubert"])
def test_keep_ratio_one_equals_the_frozen_model(backbone):
    torch.manual_seed(0)
    if backbone == "unit_lm":
        model, x = _lm(), TOKENS
        run = model
    else:
        model, x = HubertModel(HubertConfig.tiny()).eval(), torch.randn(2, 900)
        run = model.extract_features
    with torch.no_grad():
        frozen = run(x)
        build_method(MaskConfig(keep_ratio=1.0, init=ScoreInit.KAIMING), model)
        assert torch.equal(run(x), frozen)


def test_masked_forward_uses_weight_times_mask_and_gradients_reach_scores_only():
    model = _lm()
    method = build_method(MaskConfig(keep_ratio=0.5, targets=[LinearName.FC2]), model)
    freeze_except(model, method)
    fc2 = model.transformer_layers()[0].fc2
    assert isinstance(fc2, MaskedLinear)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(fc2(x), x @ (fc2.weight * fc2.router()).T + fc2.bias)
    model(TOKENS).logsumexp(-1).sum().backward()
    for router in method.routers().values():
        assert router.scores.grad is not None and router.scores.grad.abs().sum() > 0
    assert fc2.weight.grad is None
    # Straight through: the scores' gradient is the weight-space gradient of the mask times sign(score).
    assert torch.count_nonzero(fc2.router.scores.grad) > fc2.router().sum()  # removed weights get gradient too


def test_score_inits():
    model = _lm()
    w = model.transformer_layers()[0].fc1.weight.detach()
    path = "decoder.layers.0.fc1"
    by_magnitude = S3Router(MaskConfig(init=ScoreInit.MAGNITUDE), model).routers()[path]
    assert torch.equal(by_magnitude.scores.detach(), w.abs())
    kept = by_magnitude().bool()
    assert w.abs()[kept].min() >= w.abs()[~kept].max()  # the first mask is magnitude pruning
    by_rank = S3Router(MaskConfig(init=ScoreInit.RANK), model).routers()[path]
    ranks = by_rank.scores.detach()
    assert ranks.max() == 1.0 and ranks.min() == 1.0 / w.numel()
    assert torch.equal(ranks.flatten().argsort(), w.abs().flatten().argsort())
    assert torch.equal(by_rank(), by_magnitude())
    kaiming = S3Router(MaskConfig(init=ScoreInit.KAIMING), model).routers()[path]
    assert not torch.equal(kaiming(), by_magnitude())


def test_ffn_only_and_layer_selection():
    model = _lm()
    method = build_method(MaskConfig(ffn_only=True, layers=[1]), model)
    assert set(method.routers()) == {"decoder.layers.1.fc1", "decoder.layers.1.fc2"}
    assert method.config.targets == [LinearName.FC1, LinearName.FC2]
    assert type(model.transformer_layers()[0].fc1) is nn.Linear


def test_threshold_mode():
    model = _lm()
    method = build_method(MaskConfig(threshold=0.1, init=ScoreInit.MAGNITUDE, targets=[LinearName.FC1]), model)
    w = model.transformer_layers()[0].fc1.weight.detach()
    assert torch.equal(method.routers()["decoder.layers.0.fc1"](), (w.abs() > 0.1).float())


def test_packed_bitmask_round_trip_gives_identical_outputs():
    model = _lm()
    method = build_method(MaskConfig(keep_ratio=0.8, init=ScoreInit.KAIMING), model)
    with torch.no_grad():
        expected = model(TOKENS)
    exported = method.export_state_dict()
    for path, router in method.routers().items():
        packed = exported[f"{path}.router.mask"]
        assert packed.dtype == torch.uint8 and packed.numel() == (router().numel() + 7) // 8
    method.detach()

    other = build_method(MaskConfig(keep_ratio=0.8, init=ScoreInit.KAIMING), model)  # other random scores
    with torch.no_grad():
        assert not torch.equal(model(TOKENS), expected)
        other.load_exported_state_dict(exported)
        assert torch.equal(model(TOKENS), expected)
    assert other.trainable_parameters() == 0 and other.state_dict() == {}  # fixed: inference only
    assert all(torch.equal(other.export_state_dict()[k], v) for k, v in exported.items())
    with pytest.raises(TuningError, match="fixed"):
        other.set_keep_ratio(0.5)


def test_bad_bitmasks_are_refused():
    model = _lm()
    method = build_method(MaskConfig(targets=[LinearName.FC1]), model)
    exported = method.export_state_dict()
    with pytest.raises(TuningError, match="missing"):
        method.load_exported_state_dict({})
    key = next(iter(exported))
    with pytest.raises(TuningError, match="packed bytes"):
        method.load_exported_state_dict({**exported, key: exported[key][:-1]})
    with pytest.raises(TuningError, match="packed bytes"):
        method.load_exported_state_dict({**exported, key: exported[key].to(torch.int32)})
    assert not any(router.fixed for router in method.routers().values())  # a refused load changes nothing


def test_sparsity_sweep_is_magnitude_pruning_and_restores_the_ratio():
    model = _lm()
    with torch.no_grad():
        frozen = model(TOKENS)
    method = build_method(MaskConfig(keep_ratio=0.9), model)

    def error() -> float:
        with torch.no_grad():
            return float((model(TOKENS) - frozen).abs().mean())

    rows = sparsity_sweep(method, [1.0, 0.9, 0.5, 0.2], error)
    assert [r["keep_ratio"] for r in rows] == [1.0, 0.9, 0.5, 0.2]
    assert rows[0]["metric"] == 0.0 and rows[0]["sparsity"] == 0.0
    sparsities = [r["sparsity"] for r in rows]
    assert sparsities == sorted(sparsities) and abs(sparsities[2] - 0.5) < 1e-3
    assert rows[3]["metric"] > rows[1]["metric"]
    assert all(r.keep_ratio == 0.9 for r in method.routers().values())
    assert abs(method.sparsity() - 0.1) < 1e-3


def test_detach_restores_the_original_linears():
    model = _lm()
    originals = [layer.self_attn.q_proj for layer in model.transformer_layers()]
    keys = set(model.state_dict())
    method = build_method("mask", model)
    assert set(model.state_dict()) - keys == set(method.state_dict())  # only the scores are added
    method.detach()
    assert [layer.self_attn.q_proj for layer in model.transformer_layers()] == originals
    assert set(model.state_dict()) == keys


def test_bad_configs():
    with pytest.raises(ConfigError, match="keep_ratio"):
        MaskConfig(keep_ratio=0.0)
    with pytest.raises(ConfigError, match="after ffn_only"):
        MaskConfig(ffn_only=True, targets=[LinearName.Q])
    with pytest.raises(ConfigError, match="init"):
        MaskConfig(init="xavier")
