"""The registry, and the contract every registered method keeps on every backbone (the GSLM unit LM, HuBERT, and the
OPT / LLaMA / Qwen2 speech LMs): what trains is exactly what is saved, training never touches a frozen tensor, and
detach/reload behave."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from speechprompt.config import ConfigError, to_dict
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.speech_lm import SpeechLM, SpeechLMConfig
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.tuning import (
    METHODS,
    TuningError,
    TuningMethod,
    build_method,
    count_parameters,
    freeze_except,
    method_config,
    method_name,
    register_method,
)

UNIT_LM_ONLY = {"prompt"}
ENCODER_ONLY = {"cnn_adapter"}  # adapters in a waveform conv front end, which the unit LM does not have


def _unit_lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _hubert() -> HubertModel:
    torch.manual_seed(0)
    return HubertModel(HubertConfig.tiny()).eval()


# Tiny speech LMs of each family (slamkit's layout: pad 0, bos = eos 1, unit u = token u + 2): OPT post-LN with
# project_in/out, LLaMA with llama3 rope scaling and biases, Qwen2 with grouped-query attention.
_SPEECH_LMS = {
    "opt": dict(family="opt", norm="layer", norm_eps=1e-5, ffn="mlp", activation="relu", qkv_bias=True, out_bias=True,
                ffn_bias=True, learned_pos=True, word_embed_dim=16, normalize_before=False, final_layer_norm=False,
                kv_heads=4, head_dim=8),
    "llama": dict(family="llama", kv_heads=4, head_dim=8, qkv_bias=True, out_bias=True, tie_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8}),
    "qwen2": dict(family="qwen2", kv_heads=2, head_dim=8),
}
SPEECH_VOCAB = UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="slamkit")


def _speech_lm(family: str):
    def build() -> SpeechLM:
        torch.manual_seed(0)
        cfg = SpeechLMConfig(vocab_size=42, embed_dim=32, ffn_dim=48, layers=2, heads=4, max_positions=64,
                             **_SPEECH_LMS[family])
        return SpeechLM(cfg, SPEECH_VOCAB).eval()
    return build


BACKBONES = {"unit_lm": _unit_lm, "hubert": _hubert, **{f: _speech_lm(f) for f in _SPEECH_LMS}}
DECODERS = {"unit_lm", *_SPEECH_LMS}


def _inputs(backbone: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if backbone == "unit_lm":
        tokens = torch.randint(4, 104, (3, 9), generator=g)
        tokens[:, 4] = 0  # the <s> separator, so that the separator vector is used
        return tokens
    if backbone in DECODERS:
        tokens = torch.randint(2, 42, (3, 9), generator=g)
        tokens[:, 4] = SPEECH_VOCAB.bos
        return tokens
    return torch.randn(3, 1200, generator=g)


def _run(model: nn.Module, method: TuningMethod | None, x: torch.Tensor) -> torch.Tensor:
    kwargs = method.forward_kwargs() if method is not None else {}
    if isinstance(model, UnitLM):
        return model(x, **kwargs)  # (B, T, V)
    return model.extract_features(x, **kwargs)  # (B, frames, D)


def _toy_loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1, 1, out.shape[-1])
    return ((out - target) ** 2).mean()


# The parameter-efficient methods. The baselines (full fine-tuning, linear probe) are in the same registry (see the
# test below) and are trained end to end by the trainers' tests.
PEFT_METHODS = [name for name, spec in METHODS.items() if not spec.baseline]


def test_baselines_are_registered_with_the_methods_by_importing_tuning_alone() -> None:
    code = ("import sys; from speechprompt.tuning import METHODS; "
            "print(sorted(n for n, s in METHODS.items() if s.baseline), "
            "sorted(m for m in sys.modules if m.startswith('speechprompt.') and m.split('.')[1] in "
            "('train', 'superb', 'tasks', 'evaluate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['full_finetune', 'linear_probe'] []"


def _combos():
    for name in PEFT_METHODS:
        for backbone in BACKBONES:
            if (backbone not in DECODERS and name in UNIT_LM_ONLY) or (backbone in DECODERS and name in ENCODER_ONLY):
                continue
            yield name, backbone


COMBOS = list(_combos())


def test_all_methods_are_registered():
    assert set(PEFT_METHODS) == {"prompt", "prefix", "adapter", "aat", "adapter_bias", "cnn_adapter", "lora",
                                 "bitfit", "mask"}


def test_unknown_method_and_bad_options_are_clear_errors():
    with pytest.raises(TuningError, match="unknown tuning method 'loar'.*lora"):
        build_method("loar", _unit_lm())
    with pytest.raises(ConfigError, match="unknown config key lora.rnak"):
        method_config("lora", {"rnak": 4})
    with pytest.raises(ConfigError, match="rank"):
        method_config("lora", {"rank": 0})
    with pytest.raises(TuningError, match="not the config of a registered"):
        method_name(object())


def test_registering_twice_is_refused():
    spec = METHODS["lora"]
    with pytest.raises(ValueError, match="already registered"):
        register_method("lora", spec.config_cls, spec.method_cls)
    with pytest.raises(ValueError, match="already belongs"):
        register_method("lora2", spec.config_cls, spec.method_cls)


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_config_round_trips_through_a_plain_mapping(name):
    config = METHODS[name].config_cls()
    again = method_config(name, to_dict(config))
    assert again == config and method_name(again) == name


@pytest.mark.parametrize("name", sorted(UNIT_LM_ONLY))
def test_unit_lm_only_methods_refuse_hubert(name):
    with pytest.raises(TuningError, match="unit LM"):
        build_method(name, _hubert())


@pytest.mark.parametrize("name", sorted(ENCODER_ONLY))
def test_encoder_only_methods_refuse_the_unit_lm(name):
    model = _unit_lm()
    keys = set(model.state_dict())
    with pytest.raises(TuningError, match="UnitLM has none .*use adapter there"):
        build_method(name, model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("name,backbone", COMBOS)
def test_trainable_set_is_the_saved_set(name, backbone):
    model = BACKBONES[backbone]()
    method = build_method(name, model)
    params = freeze_except(model, method)

    trainable_in_method = {n for n, p in method.named_parameters() if p.requires_grad}
    assert set(method.state_dict()) == trainable_in_method and trainable_in_method
    assert all(p.requires_grad for p in params) and len(params) == len(trainable_in_method)
    # The backbone trains only parameters the method owns (prompts and prefixes are not in the backbone at all),
    # and those carry the same names in both.
    trainable_in_model = {n: p for n, p in model.named_parameters() if p.requires_grad}
    owned = {id(p) for p in params}
    assert all(id(p) in owned for p in trainable_in_model.values())
    if trainable_in_model:
        assert set(trainable_in_model) == set(method.state_dict())
    assert method.trainable_parameters() == count_parameters(method) == sum(p.numel() for p in params)


@pytest.mark.parametrize("name,backbone", COMBOS)
def test_training_changes_only_the_method(name, backbone):
    model = BACKBONES[backbone]()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs(backbone)
    method = build_method(name, model)
    params = freeze_except(model, method)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _toy_loss(_run(model, method, x)).backward()
        opt.step()

    trained = set(method.state_dict())  # BitFit's are backbone biases, by their backbone names
    for key, value in model.state_dict().items():
        if key in frozen and key not in trained:
            assert torch.equal(value, frozen[key]), f"{key} changed"
    changed = [k for k, v in method.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no method tensor was updated"
    for p in model.parameters():
        if not any(p is q for q in params):
            assert p.grad is None


@pytest.mark.parametrize("name,backbone", COMBOS)
def test_reload_reproduces_outputs_and_detach_restores_the_backbone(name, backbone):
    model = BACKBONES[backbone]()
    x = _inputs(backbone)
    with torch.no_grad():
        plain = _run(model, None, x)
    keys = set(model.state_dict())
    method = build_method(name, model)
    with torch.no_grad():  # move every tensor off its (often zero) init so that a reload has something to prove
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        tuned = _run(model, method, x)
        state = copy.deepcopy(method.state_dict())
        exported = copy.deepcopy(method.export_state_dict())
    assert not torch.equal(tuned, plain)

    method.detach()
    assert set(model.state_dict()) == keys
    if name != "bitfit":  # BitFit trains the backbone in place; it has nothing to detach
        assert torch.equal(_run(model, None, x), plain)

    torch.manual_seed(123)
    for load in ("state_dict", "export"):
        other = build_method(method_config(name, to_dict(method.config)), model)
        if load == "state_dict":
            other.load_state_dict(state, strict=True)
        else:
            other.load_exported_state_dict(exported)
        with torch.no_grad():
            assert torch.equal(_run(model, other, x), tuned), load
        other.detach()


@pytest.mark.parametrize("name,backbone", [c for c in COMBOS if c[0] != "prompt"])
def test_attaching_twice_is_refused(name, backbone):
    model = BACKBONES[backbone]()
    method = build_method(name, model)
    with pytest.raises(TuningError, match="already attached"):
        method.attach(model)


@pytest.mark.parametrize("name,backbone", [(n, b) for n in PEFT_METHODS for b in ("unit_lm", "qwen2")
                                            if not (n in ENCODER_ONLY and b == "qwen2")])
def test_low_precision_backbone_trains_float32_method_tensors(name, backbone):
    backbone = "hubert" if name in ENCODER_ONLY else backbone
    model = BACKBONES[backbone]().to(torch.bfloat16)
    method = build_method(name, model)
    params = freeze_except(model, method)
    x = _inputs(backbone)
    out = _run(model, method, x.to(torch.bfloat16) if x.is_floating_point() else x)
    assert out.dtype == torch.bfloat16
    _toy_loss(out.float()).backward()
    expected = torch.bfloat16 if name == "bitfit" else torch.float32  # BitFit's tensors are the backbone's own
    # A deep prompt replaces every layer's keys/values at the prompt positions: the input prompt gets no gradient.
    unused = {id(method.prompt)} if name == "prompt" else set()
    assert all(p.dtype == expected for p in params)
    assert all((p.grad is None) == (id(p) in unused) for p in params)


def test_default_counts_on_gslm_big_built_on_the_meta_device():
    with torch.device("meta"):  # shapes only: no 600 MB allocation
        model = UnitLM(UnitLMConfig.named("gslm_big"))
    d, ffn, layers = 1024, 4096, 12
    expected = {
        "prompt": (2 * layers + 1) * d * 5 + d,  # deep, L=5, separator: 129,024
        "prefix": 2 * layers * 10 * d,  # L=10
        "adapter": 2 * layers * (d * 32 + 32 + 32 * d + d),  # Houlsby, both slots, r=32
        "lora": 2 * layers * 2 * 8 * d,  # r=8 on q and v
        "bitfit": layers * (4 * d + ffn + d + 2 * d),  # attention, FFN and LayerNorm biases
        "mask": layers * (4 * d * d + 2 * d * ffn),  # one score per weight of every linear
    }
    for name, count in expected.items():
        method = build_method(name, model)
        assert method.trainable_parameters() == count, name
        method.detach()
