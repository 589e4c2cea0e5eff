"""Every method's default trainable count on the default-size backbones, against hand formulas: HuBERT-base (the
efficient-tuning study's upstream), AST-base (AAT's) and the GSLM unit LM ``gslm_big``. These are the numbers of
``docs/methods.md``; where a paper reports its own, the test says how they relate."""

from __future__ import annotations

import pytest
import torch

from speechprompt.models.ast import ASTConfig, ASTModel
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import METHODS, TuningError, build_method, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

L = 12  # layers of all three


def _transformer(d: int, ffn: int) -> dict[str, int]:
    """Counts of the methods that see only the transformer layers, for width d and FFN size ffn."""
    houlsby = d * 32 + 32 + 32 * d + d
    quarter = d * (d // 4) + d // 4 + (d // 4) * d + d
    return {
        "prefix": 2 * L * 10 * d,  # L=10 keys and values per layer
        "adapter": 2 * L * houlsby,  # Houlsby, post_attn and post_ffn, r=32
        "aat": 2 * L * quarter,  # MLP + spatial adapter, r = d/4
        "adapter_bias": L * (d + ffn + 1),  # vector + alpha reading the FFN hidden activation
        "lora": L * 2 * 2 * 8 * d,  # r=8 on q and v
        "bitfit": L * (4 * d + ffn + d + 2 * d),  # attention, FFN and both LayerNorms' biases
        "mask": L * (4 * d * d + 2 * d * ffn),  # one score per weight of every linear
    }


@pytest.fixture(scope="module")
def backbones() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):  # shapes only
        ast, lm = ASTModel(ASTConfig()), UnitLM(UnitLMConfig.named("gslm_big"))
    return {"hubert_base": HubertModel(HubertConfig.base()), "ast_base": ast, "gslm_big": lm}  # HuBERT: faster real


def _count(model: torch.nn.Module, name: str) -> int:
    method = build_method(name, model)
    try:
        return method.trainable_parameters()
    finally:
        method.detach()


def test_hubert_base(backbones):
    model = backbones["hubert_base"]
    expected = {
        **_transformer(768, 3072),
        "cnn_adapter": 7 * (512 * 32 * 3 + 32 + 32 * 512 + 512),  # after each of the 7 conv blocks
        "full_finetune": count_parameters(model),
        "linear_probe": 0,
    }
    assert set(expected) == set(METHODS) - {"prompt"}
    assert {name: _count(model, name) for name in expected} == expected
    # The efficient-tuning study (Chen et al., SLT 2022): Houlsby 0.60M (post_ffn only), LoRA 0.29M (r=8 on q, k),
    # prefix 0.09M (one side), AdapterBias 0.046M.
    assert expected["adapter_bias"] == 46_092 and expected["lora"] == 294_912
    assert count_parameters(model) == 94_568_576  # with the pretraining heads; 94.7M in fairseq's count


def test_ast_base(backbones):
    model = backbones["ast_base"]
    expected = {**_transformer(768, 3072), "full_finetune": 86_187_264, "linear_probe": 0}
    assert {name: _count(model, name) for name in expected} == expected
    for name in ("prompt", "cnn_adapter"):
        with pytest.raises(TuningError):
            build_method(name, model)


def test_gslm_big(backbones):
    model = backbones["gslm_big"]
    expected = {**_transformer(1024, 4096), "prompt": (2 * L + 1) * 5 * 1024 + 1024,
                "full_finetune": 151_263_232, "linear_probe": 0}
    assert {name: _count(model, name) for name in expected} == expected
    with pytest.raises(TuningError):
        build_method("cnn_adapter", model)
