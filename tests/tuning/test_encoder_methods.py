"""Every tuning method on every encoder architecture (wav2vec 2.0 post-/pre-LN, HuBERT, data2vec-audio, WavLM, AST):
methods see an encoder only through ``transformer_layers()`` and the ``prefix`` argument, so each must attach
unchanged. For every (encoder, method):

* step 0 equals the frozen encoder where the method starts at the identity (adapters, LoRA, BitFit, baselines);
* the saved keys are exactly the trainable set, and training moves only those: every frozen tensor of the encoder
  is bitwise unchanged, and none gets a gradient;
* a checkpoint (``export_state_dict``) reloaded into a fresh copy of the encoder gives the trained outputs exactly.

A method that does not apply to an architecture (CNN adapters need a conv waveform front end, which AST lacks) is
refused with a message that says why.
"""

from __future__ import annotations

import pytest
import torch
from tiny_encoders import OUR_TINY, our_tiny, waveforms

from speechprompt.config import to_dict
from speechprompt.tuning import METHODS, TuningError, build_method, freeze_except, method_config

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT_LM_ONLY = {"prompt"}  # input prompts and the <s> separator exist only in the unit LM
METHOD_NAMES = [name for name in METHODS if name not in UNIT_LM_ONLY]
STARTS_AT_IDENTITY = {"adapter", "aat", "adapter_bias", "cnn_adapter", "lora", "bitfit", "full_finetune",
                      "linear_probe"}
NOT_ON = {"cnn_adapter": {"ast"}}  # method -> encoders it does not apply to


def test_every_method_is_covered():
    assert set(METHOD_NAMES) == {"prefix", "adapter", "aat", "adapter_bias", "cnn_adapter", "lora", "bitfit", "mask",
                                 "full_finetune", "linear_probe"}


def test_cnn_adapters_refuse_an_encoder_without_a_conv_front_end():
    with pytest.raises(TuningError, match="cnn_adapter adapts the convolutional waveform front end.*ASTModel has none"):
        build_method("cnn_adapter", our_tiny("ast"))


def _outputs(model, method, x, pad) -> list[torch.Tensor]:
    kwargs = method.forward_kwargs(x.shape[0]) if method is not None else {}
    hidden, _ = model.hidden_states(x, pad, **kwargs)
    return [*hidden, model.final_features(hidden)]


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    target = torch.linspace(-1, 1, outputs[-1].shape[-1])
    return sum(((h - target) ** 2).mean() for h in outputs[1:])


@pytest.mark.parametrize("encoder,method_name", [(e, m) for e in OUR_TINY for m in METHOD_NAMES
                                                  if e not in NOT_ON.get(m, ())])
def test_method_on_encoder(encoder, method_name):
    model = our_tiny(encoder)
    x, pad = waveforms(samples=2400)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = _outputs(model, None, x, pad)

    method = build_method(method_name, model)
    params = freeze_except(model, method)
    with torch.no_grad():
        step0 = _outputs(model, method, x, pad)
    if method_name in STARTS_AT_IDENTITY:
        for a, b in zip(step0, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(step0, plain))

    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert set(method.state_dict()) == trainable
    assert (len(params) > 0) is (method_name != "linear_probe")  # the probe's head lives outside the encoder

    if params:
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            _loss(_outputs(model, method, x, pad)).backward()
            opt.step()
        owned = {id(p) for p in params}
        for p in model.parameters():
            assert p.grad is None or id(p) in owned
    trained_keys = set(method.state_dict())  # BitFit and full fine-tuning train backbone tensors, by their names
    for key, value in model.state_dict().items():
        if key in frozen and key not in trained_keys:
            assert torch.equal(value, frozen[key]), f"{key} changed"
    with torch.no_grad():
        trained = _outputs(model, method, x, pad)
        exported = {k: v.clone() for k, v in method.export_state_dict().items()}

    fresh = our_tiny(encoder)
    other = build_method(method_config(method_name, to_dict(method.config)), fresh)
    other.load_exported_state_dict(exported)
    freeze_except(fresh, other)
    with torch.no_grad():
        reloaded = _outputs(fresh, other, x, pad)
    for a, b in zip(reloaded, trained):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
