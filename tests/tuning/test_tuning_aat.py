"""AAT: the MLP adapter beside the FFN and the spatial adapter after self-attention, in the shared layer's slots, and
the paper's parameter counts on a default-size AST."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_encoders import our_tiny

from speechprompt.config import ConfigError
from speechprompt.models.ast import ASTConfig, ASTModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import AATConfig, build_method, count_parameters, method_config
from speechprompt.tuning.adapter import Bottleneck

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_adapters_sit_in_the_slots_of_their_names():
    model = our_tiny("ast")  # D = 32: bottleneck 8
    method = build_method("aat", model)
    layer = model.transformer_layers()[0]
    mlp, spatial = method.mlp_adapters(), method.spatial_adapters()
    assert set(mlp) == set(spatial) == {"encoder.layers.0", "encoder.layers.1"}
    assert layer.parallel_ffn is mlp["encoder.layers.0"] and layer.post_attn is spatial["encoder.layers.0"]
    assert layer.post_ffn is None
    assert isinstance(layer.parallel_ffn, Bottleneck) and layer.parallel_ffn.down.out_features == 8
    assert not layer.parallel_ffn.residual and layer.parallel_ffn.scale == 0.5
    assert layer.post_attn.residual and layer.post_attn.scale == 1.0


def test_the_layer_computes_what_the_paper_draws():
    model = our_tiny("ast")
    method = build_method("aat", model)
    with torch.no_grad():
        for p in method.parameters():
            p.normal_(0, 0.3)
    layer = model.transformer_layers()[1]
    x = torch.randn(2, 6, 32)

    def branch(adapter: Bottleneck, h: torch.Tensor) -> torch.Tensor:
        return adapter.up(F.gelu(adapter.down(h)))

    with torch.no_grad():
        a = layer.self_attn(layer.self_attn_layer_norm(x))
        x1 = x + a + branch(layer.post_attn, a)  # spatial adapter: serial, residual, on the attention output
        n = layer.final_layer_norm(x1)
        ffn = layer.fc2(F.gelu(layer.fc1(n)))
        expected = x1 + ffn + 0.5 * branch(layer.parallel_ffn, n)  # MLP adapter: beside the FFN, scaled
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_aat_m_and_layer_selection():
    model = our_tiny("hubert")
    method = build_method(method_config("aat", {"spatial_adapter": False, "layers": [-1]}), model)
    assert set(method.state_dict()) == {f"encoder.layers.1.parallel_ffn.{m}.{w}" for m in ("down", "up")
                                        for w in ("weight", "bias")}
    assert method.spatial_adapters() == {} and model.transformer_layers()[0].parallel_ffn is None


def test_ast_base_counts_against_the_paper():
    with torch.device("meta"):  # shapes only
        model = ASTModel(ASTConfig())  # AST-base: 12 layers, D = 768, 1212 patches
    frozen = count_parameters(model)
    assert frozen == 86_187_264
    adapter = 768 * 192 + 192 + 192 * 768 + 768  # D -> D/4 -> D with biases: 295,872
    aat_m = build_method(method_config("aat", {"spatial_adapter": False}), model)
    assert aat_m.trainable_parameters() == 12 * adapter == 3_550_464
    aat_m.detach()
    aat_ms = build_method("aat", model)
    assert aat_ms.trainable_parameters() == 24 * adapter == 7_100_928
    # The paper's 3.59M and 7.14M include its classifier; ESC-50's (LayerNorm + Linear(768, 50)) is 39,986.
    head = 2 * 768 + 768 * 50 + 50
    assert round((12 * adapter + head) / 1e6, 2) == 3.59 and round((24 * adapter + head) / 1e6, 2) == 7.14
    assert round(100 * aat_ms.trainable_parameters() / frozen, 2) == 8.24  # the paper: "7.118%"


def test_bad_configs():
    with pytest.raises(ConfigError, match="needs the MLP adapter, the spatial adapter or both"):
        AATConfig(mlp_adapter=False, spatial_adapter=False)
    with pytest.raises(ConfigError, match="bottleneck_ratio"):
        AATConfig(bottleneck_ratio=0)


def test_step_zero_is_the_frozen_unit_lm():
    torch.manual_seed(0)
    lm = UnitLM(UnitLMConfig.named("tiny")).eval()
    tokens = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frozen = lm(tokens)
        build_method("aat", lm)
        assert torch.equal(lm(tokens), frozen)
