"""Tests for speechprompt.models.hubert: config parsing, loading, tuning hooks, and parity with fairseq's HubertModel.

The parity tests have fairseq build tiny models with its own classes and save them in its checkpoint format (with
real fairseq ``Dictionary`` objects in ``task_state``), in its own environment (tests/oracles/fairseq/hubert.py, run
through tests/oracle.py); :func:`load_hubert`, which never imports fairseq, loads them here and must give fairseq's
outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import run_oracle

from speechprompt.config import ConfigError, to_dict
from speechprompt.errors import CheckpointError, UnsafeCheckpointError
from speechprompt.fairseq_compat import save_fairseq_checkpoint
from speechprompt.models.hubert import (
    ExtractorMode,
    HubertConfig,
    HubertModel,
    WeightNormConv1d,
    load_hubert,
    normalize_waveform,
    parse_conv_layers,
)
from speechprompt.models.transformer import LayerKV, TransformerLayer

TINY_CONV = "[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)] * 2"  # stride 80, receptive field 100 samples


# ---------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
         [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2),
        ("[(512, 10, 5), (256, 3, 2),]", [(512, 10, 5), (256, 3, 2)]),
        ("2 * [(8,2,2)] + [(4,3,1)]", [(8, 2, 2), (8, 2, 2), (4, 3, 1)]),
    ],
)
def test_parse_conv_layers(spec, expected):
    assert parse_conv_layers(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "__import__('os').system('echo pwned')",
        "[(512,10,5)] * 10**9",
        "[(512,10,5)] * 1000",
        "[(512,10)]",
        "[(512,10,5.0)]",
        "[(512,10,-5)]",
        "[]",
        "[(1,2,3)] + 4",
        "[x for x in range(3)]",
        "[(512,10,5)",
    ],
)
def test_parse_conv_layers_rejects(spec):
    with pytest.raises(ConfigError, match="conv_feature_layers"):
        parse_conv_layers(spec)


def test_config_from_fairseq_ignores_irrelevant_keys():
    cfg = HubertConfig.from_fairseq({
        "_name": "hubert", "label_rate": "${task.label_rate}", "mask_prob": 0.8, "logit_temp": 0.1,
        "extractor_mode": "layer_norm", "encoder_layers": 3, "dropout": 0, "layer_norm_first": True,
    })
    assert cfg.extractor_mode is ExtractorMode.LAYER_NORM
    assert cfg.encoder_layers == 3 and cfg.layer_norm_first
    assert isinstance(cfg.dropout, float) and cfg.dropout == 0.0
    assert cfg.encoder_embed_dim == 768  # fairseq's default for a key the checkpoint does not carry


@pytest.mark.parametrize(
    "model_cfg,match",
    [
        ({"_name": "hubert_ctc"}, "only pretrained 'hubert'"),
        ({"layer_type": "conformer"}, "layer_type"),
        ({"pos_conv_depth": 5}, "pos_conv_depth"),
        ({"conv_pos_batch_norm": True}, "conv_pos_batch_norm"),
        ({"encoder_layers": "12"}, "encoder_layers"),
        ({"extractor_mode": "batch_norm"}, "extractor_mode"),
        ({"activation_fn": "swish"}, "activation_fn"),
        ({"encoder_embed_dim": 30, "encoder_attention_heads": 4}, "divisible"),
    ],
)
def test_config_from_fairseq_rejects_what_it_would_misread(model_cfg, match):
    with pytest.raises(ConfigError, match=match):
        HubertConfig.from_fairseq(model_cfg)


def test_base_config_shapes():
    model = HubertModel(HubertConfig.base(), num_classes=[504])
    n_params = sum(p.numel() for p in model.parameters())
    assert 94.6e6 < n_params < 94.8e6
    sd = model.state_dict()
    assert sd["feature_extractor.conv_layers.0.2.weight"].shape == (512,)  # GroupNorm on the first conv only
    assert "feature_extractor.conv_layers.1.2.weight" not in sd
    assert sd["encoder.pos_conv.0.weight_v"].shape == (768, 48, 128)
    assert sd["encoder.pos_conv.0.weight_g"].shape == (1, 1, 128)
    assert sd["label_embs_concat"].shape == (504, 256)
    assert sd["final_proj.weight"].shape == (256, 768)
    assert len(model.transformer_layers()) == 12
    assert all(isinstance(layer, TransformerLayer) for layer in model.transformer_layers())


# ---------------------------------------------------------------------------------------------------------------
# Our model alone


def _tiny(layer_norm_first: bool = True, seed: int = 0) -> HubertModel:
    torch.manual_seed(seed)
    return HubertModel(HubertConfig.tiny(layer_norm_first=layer_norm_first), num_classes=[10]).eval()


def test_hidden_states_and_output_layers_agree():
    model = _tiny()
    x = torch.randn(2, 1600)
    with torch.no_grad():
        hidden, mask = model.hidden_states(x)
        assert mask is None and len(hidden) == model.num_layers + 1
        assert hidden[0].shape == (2, 19, 32)
        for layer in range(1, model.num_layers + 1):
            torch.testing.assert_close(model.extract_features(x, output_layer=layer), hidden[layer])
        final = model.extract_features(x)
        torch.testing.assert_close(final, model.encoder.layer_norm(hidden[-1]))  # pre-LN: final LayerNorm


def test_extract_features_rejects_bad_inputs():
    model = _tiny()
    with pytest.raises(ValueError, match="out of range"):
        model.extract_features(torch.randn(1, 1600), output_layer=0)
    with pytest.raises(ValueError, match="out of range"):
        model.extract_features(torch.randn(1, 1600), output_layer=3)
    with pytest.raises(ValueError, match="receptive field"):
        model.extract_features(torch.randn(1, 90))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model.extract_features(torch.randn(1600))


def test_stops_after_the_requested_layer():
    model = _tiny()
    calls = []
    for i, layer in enumerate(model.transformer_layers()):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    model.extract_features(torch.randn(1, 800), output_layer=1)
    assert calls == [0]


def test_prefix_none_leaves_output_unchanged():
    model = _tiny()
    x, pad = torch.randn(2, 1600), torch.zeros(2, 1600, dtype=torch.bool)
    pad[1, 1000:] = True
    with torch.no_grad():
        ref = model.extract_features(x, pad)
        torch.testing.assert_close(model.extract_features(x, pad, prefix=[None, None]), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prefix has 1 entries"):
        model.extract_features(x, prefix=[None])


def test_prefix_is_attended_and_padding_stays_masked():
    """Padded frames stay invisible with a prefix: changing samples that only padded frames see changes nothing."""
    model = _tiny(layer_norm_first=True)  # LayerNorm front end: no statistics shared across time
    torch.manual_seed(1)
    H, hd = 4, 8
    prefix = [LayerKV(torch.randn(1, H, 3, hd), torch.randn(1, H, 3, hd)) for _ in range(2)]
    x = torch.randn(2, 3200)
    pad = torch.zeros(2, 3200, dtype=torch.bool)
    pad[0, 1600:] = True
    x2 = x.clone()
    x2[0, 1700:] = 5 * torch.randn(1500)  # beyond the receptive field (100 samples) of every real frame
    with torch.no_grad():
        real = ~model.frame_padding_mask(pad, 39)[0]
        assert real.sum() == 20
        for p in (None, prefix):
            a = model.extract_features(x, pad, prefix=p)
            b = model.extract_features(x2, pad, prefix=p)
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a[0, real], b[0, real], rtol=0, atol=1e-6)
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        plain = model.extract_features(x, pad)
        with_prefix = model.extract_features(x, pad, prefix=prefix)
    assert (plain[0, real] - with_prefix[0, real]).abs().max() > 1e-2


def test_feature_grad_mult_scales_front_end_gradient():
    grads = {}
    for mult in (1.0, 0.25):
        torch.manual_seed(0)
        cfg = HubertConfig.tiny()
        cfg.feature_grad_mult = mult
        model = HubertModel(cfg)
        x = torch.randn(1, 800, generator=torch.Generator().manual_seed(3))
        model.extract_features(x).sum().backward()
        grads[mult] = model.feature_extractor.conv_layers[0][0].weight.grad.clone()
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0])


def test_normalize_waveform():
    wav = torch.randn(1000) * 3 + 1
    assert normalize_waveform(wav, {"normalize": False}) is wav
    assert normalize_waveform(wav, {}) is wav
    out = normalize_waveform(wav, {"normalize": True})
    assert abs(out.mean().item()) < 1e-5 and abs(out.std(unbiased=False).item() - 1) < 1e-3


def _our_checkpoint(path: Path, model: HubertModel, state: dict | None = None) -> Path:
    cfg = {"model": {"_name": "hubert", **to_dict(model.cfg)}, "task": {"normalize": True, "sample_rate": 16000}}
    save_fairseq_checkpoint(path, state if state is not None else model.state_dict(), cfg)
    return path


def test_load_hubert_roundtrip_and_stripped_heads(tmp_path):
    model = _tiny()
    x = torch.randn(1, 1600)
    with torch.no_grad():
        ref = model.extract_features(x, output_layer=1)
    # Without dictionaries in task_state, label_embs_concat cannot be sized, so a stripped checkpoint drops it.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("final_proj", "label_embs"))}
    loaded, task_cfg = load_hubert(_our_checkpoint(tmp_path / "m.pt", model, state))
    assert not loaded.training and task_cfg["normalize"] is True
    assert loaded.final_proj is None and loaded.label_embs_concat is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.extract_features(x, output_layer=1), ref, rtol=0, atol=0)


def test_load_hubert_key_mismatch_is_a_clear_error(tmp_path):
    model = _tiny()
    state = dict(model.state_dict())
    del state["encoder.layers.1.fc1.weight"]
    state["encoder.layers.9.fc1.weight"] = torch.zeros(1)
    state["layer_norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as e:
        load_hubert(_our_checkpoint(tmp_path / "bad.pt", model, state))
    msg = str(e.value)
    assert "missing keys: encoder.layers.1.fc1.weight" in msg
    assert "unexpected keys: encoder.layers.9.fc1.weight" in msg
    assert "wrong shapes: layer_norm.weight (7,) vs (16,)" in msg


def test_load_hubert_unsupported_architecture(tmp_path):
    model = _tiny()
    path = tmp_path / "c.pt"
    save_fairseq_checkpoint(path, model.state_dict(), {"model": {"_name": "hubert", "layer_type": "conformer"}})
    with pytest.raises(CheckpointError, match="layer_type"):
        load_hubert(path)


class _Pwn:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_hubert_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": {}}, "extra": _Pwn(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_hubert(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Parity with fairseq (tests/oracles/fairseq/hubert.py builds the models, saves them and encodes the inputs)

MODEL_FIELDS = dict(encoder_layers=3, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos_groups=4,
                    final_dim=8)
PARITY_CONFIGS = {
    # HuBERT base style: post-LN, GroupNorm on the first conv, conv dim != D (post_extract_proj), odd conv_pos.
    "post_ln_base": dict(
        model=dict(extractor_mode="default", layer_norm_first=False, conv_feature_layers=TINY_CONV,
                   encoder_embed_dim=32, conv_pos=7, conv_bias=False),
        normalize=False, n_dicts=1,
    ),
    # HuBERT large style: pre-LN, LayerNorm after every conv with bias, conv dim == D (no post_extract_proj),
    # even conv_pos (SamePad trims a frame), two label sets with an untied projection.
    "pre_ln_large": dict(
        model=dict(extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True,
                   conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)] * 2",
                   encoder_embed_dim=32, conv_pos=8, untie_final_proj=True),
        normalize=True, n_dicts=2,
    ),
}
LAYERS = [1, 2, 3, None]


def _spec(name: str, checkpoint: str = "container") -> dict:
    config = PARITY_CONFIGS[name]
    return {"model": {**MODEL_FIELDS, **config["model"]},
            "task": {"label_rate": 50.0, "normalize": config["normalize"]},
            "dict_sizes": [10 + 5 * i for i in range(config["n_dicts"])], "randomize_seed": len(name),
            "checkpoint": checkpoint}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    source = torch.randn(3, 2000, generator=g)
    padding = torch.zeros(3, 2000, dtype=torch.bool)
    padding[1, 1300:] = True
    padding[2, 777:] = True
    source[padding] = 0.0
    return {"source": source, "padding": padding}


@pytest.fixture(scope="module")
def fairseq_hubert(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every fairseq model of this module, from one oracle run: ``{name: (checkpoint or None, reference)}``.

    The parity models, ``pre_ln_large`` once more with its config pickled as an omegaconf DictConfig, and the
    base model (shapes and config only)."""
    out = tmp_path_factory.mktemp("fairseq_hubert")
    torch.save(_batch(), out / "inputs.pt")
    models = {name: _spec(name) for name in PARITY_CONFIGS}
    models["dictconfig"] = _spec("pre_ln_large", checkpoint="dictconfig")
    # hubert_base_ls960: 500 units (+ 4 special symbols = 504 classes), fairseq's defaults otherwise.
    models["base"] = {"model": dict(final_dim=256, untie_final_proj=True, dropout_input=0.1, feature_grad_mult=0.1),
                      "task": {"label_rate": 50.0}, "dict_sizes": [500], "checkpoint": None}
    run_oracle("fairseq", "hubert", out, models=models, inputs=str(out / "inputs.pt"), layers=LAYERS)
    return {name: (out / f"{name}.pt" if spec["checkpoint"] else None,
                   torch.load(out / f"{name}.ref.pt", weights_only=True))
            for name, spec in models.items()}


@pytest.mark.fairseq
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_state_dict_keys_match_fairseq(fairseq_hubert, name):
    path, ref = fairseq_hubert[name]
    ours, _ = load_hubert(path)
    fs_sd, our_sd = ref["state_dict"], ours.state_dict()
    assert sorted(our_sd) == sorted(fs_sd)
    for key in fs_sd:
        assert our_sd[key].shape == fs_sd[key].shape, key
        torch.testing.assert_close(our_sd[key], fs_sd[key], rtol=0, atol=0)


@pytest.mark.fairseq
def test_base_state_dict_keys_match_fairseq(fairseq_hubert):
    _, ref = fairseq_hubert["base"]
    ours = HubertConfig.from_fairseq(ref["model_cfg"])
    assert ours == HubertConfig.base()
    our_shapes = {k: list(v.shape) for k, v in HubertModel(ours, [504]).state_dict().items()}
    assert our_shapes == ref["shapes"]


@pytest.mark.fairseq
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_layer_outputs_match_fairseq(fairseq_hubert, name, padded):
    """Our whole path (normalize_waveform, then the model) against fairseq's (HubertDataset's normalisation, then
    its model), on every layer."""
    path, ref = fairseq_hubert[name]
    ours, task_cfg = load_hubert(path)
    assert task_cfg["normalize"] is PARITY_CONFIGS[name]["normalize"]
    batch = _batch()
    source, padding = batch["source"], batch["padding"]
    source = torch.stack([normalize_waveform(s, task_cfg) for s in source])
    torch.testing.assert_close(source, ref["input"], rtol=0, atol=1e-6)
    padding_mask = padding if padded else None
    expected = ref["features"]["padded" if padded else "unpadded"]
    with torch.no_grad():
        for layer in LAYERS:
            got = ours.extract_features(source, padding_mask, output_layer=layer)
            want = expected["final" if layer is None else str(layer)]
            assert got.shape == want.shape
            if padded:
                frame_mask = ours.frame_padding_mask(padding, got.shape[1])
                assert torch.equal(frame_mask, ref["frame_padding"])
                assert frame_mask.any() and not frame_mask.all()
                real = ~frame_mask
                torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.fairseq
def test_dictconfig_checkpoint_loads(fairseq_hubert):
    path, ref = fairseq_hubert["dictconfig"]
    ours, task_cfg = load_hubert(path)
    assert task_cfg["normalize"] is True and ours.cfg.layer_norm_first
    with torch.no_grad():
        got = ours.extract_features(ref["input"], output_layer=2)
    torch.testing.assert_close(got, ref["features"]["unpadded"]["2"], rtol=0, atol=1e-5)


@pytest.mark.fairseq
def test_loading_never_imports_fairseq(fairseq_hubert):
    path, _ = fairseq_hubert["post_ln_base"]
    code = textwrap.dedent(f"""
        import sys
        from speechprompt.models.hubert import load_hubert
        model, task_cfg = load_hubert({str(path)!r})
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("fairseq", "omegaconf", "hydra"))
        assert not bad, bad
        print(type(model).__name__, len(model.transformer_layers()))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HubertModel 3"


# ---------------------------------------------------------------------------------------------------------------
# The positional convolution by FFT


@pytest.mark.parametrize("channels,kernel,groups", [(32, 8, 4), (48, 7, 3)])
def test_positional_conv_by_fft_equals_the_direct_convolution(channels, kernel, groups):
    torch.manual_seed(0)
    conv = WeightNormConv1d(channels, kernel, groups).double()
    with torch.no_grad():
        conv.weight_g.mul_(1.5)
        conv.bias.normal_()
    for frames in (1, 40, 700):  # one short block, one block, several overlap-save blocks
        x = torch.randn(2, channels, frames, dtype=torch.float64, requires_grad=True)
        weight = conv.weight_v * (conv.weight_g / conv.weight_v.norm(dim=(0, 1), keepdim=True))
        direct = F.conv1d(x, weight, conv.bias, padding=conv.padding, groups=groups)
        ours = conv(x)
        torch.testing.assert_close(ours, direct)
        grad = torch.randn_like(ours)
        inputs = (x, conv.weight_v, conv.weight_g, conv.bias)
        torch.testing.assert_close(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(direct, inputs, grad))


def test_positional_conv_caches_the_frozen_spectrum_until_the_weights_change():
    torch.manual_seed(0)
    conv = WeightNormConv1d(16, 8, 4)
    x = torch.randn(1, 16, 30)
    with torch.no_grad():
        first = conv(x)
        spectrum = conv._cache[1]
        assert torch.equal(conv(x), first) and conv._cache[1] is spectrum  # reused
        conv.weight_g.mul_(2.0)  # an in-place update (an optimizer step, a reload) invalidates it
        assert conv._cache is not None and not torch.equal(conv(x), first) and conv._cache[1] is not spectrum
    with_grad = conv(x)  # the weights want a gradient here: no cache, same values
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), conv(x).detach())
