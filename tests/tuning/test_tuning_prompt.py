"""SpeechPrompt prompts: parameter counts, initialisation, the separator, gradients and per-sample mixing."""

from __future__ import annotations

import math

import pytest
import torch

from speechprompt.config import ConfigError
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.transformer import attention_mask
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, make_positions
from speechprompt.tuning import PromptConfig, PromptTuning, TuningError, build_method, freeze_except
from speechprompt.tuning.prompt import DeepInit, PromptInit


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _tokens() -> torch.Tensor:
    tokens = torch.randint(4, 104, (2, 6), generator=torch.Generator().manual_seed(3))
    tokens[:, 3] = 0  # u u u <s> y y
    return tokens


def test_gslm_big_deep_prompt_with_separator_has_the_published_count():
    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("gslm_big")).eval()
    method = build_method(PromptConfig(length=5, deep=True, train_separator=True), model)
    assert method.trainable_parameters() == 25 * 1024 * 5 + 1024 == 129_024
    with torch.no_grad():  # and it runs on the real architecture
        logits = model(torch.tensor([[10, 11, 0, 12]]), **method.forward_kwargs())
    assert logits.shape == (1, 4, 104) and torch.isfinite(logits).all()


@pytest.mark.parametrize("deep,sep,expected", [(False, False, 5 * 64), (False, True, 6 * 64),
                                               (True, False, 5 * 64 * 5), (True, True, 5 * 64 * 5 + 64)])
def test_tiny_counts(deep, sep, expected):
    method = build_method(PromptConfig(length=5, deep=deep, train_separator=sep), _lm())
    assert method.trainable_parameters() == expected  # 2 layers: (2 * 2 + 1) * L * d for a deep prompt


def test_forward_kwargs_shapes_and_broadcast():
    model = _lm()
    method = build_method(PromptConfig(length=4), model)
    kw = method.forward_kwargs(batch_size=3)
    assert kw["input_prompt"].shape == (3, 4, 64)
    assert len(kw["kv_replace"]) == 2 and all(k.shape == v.shape == (3, 4, 64) for k, v in kw["kv_replace"])
    assert set(kw["embed_override"]) == {0} and kw["embed_override"][0].shape == (64,)
    with torch.no_grad():  # leading dim 1 (the default) broadcasts to the batch and gives the same result
        tokens = torch.cat([_tokens(), _tokens()[:1]])
        assert torch.equal(model(tokens, **kw), model(tokens, **method.forward_kwargs()))


def test_separator_starts_as_the_frozen_bos_row_and_changes_nothing():
    model = _lm()
    method = build_method(PromptConfig(length=2, deep=False), model)
    assert torch.equal(method.separator, model.decoder.embed_tokens.weight[0])
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(model(tokens, embed_override={0: method.separator}), model(tokens))
        method.separator.add_(1.0)  # a copy: training it never writes into the frozen table
        assert not torch.equal(method.separator, model.decoder.embed_tokens.weight[0])


def test_init_from_units_uses_scaled_unit_embeddings_cycled_to_length():
    model = _lm()
    method = build_method(PromptConfig(length=5, deep=False, init=PromptInit.UNITS, init_units="7 0 42"), model)
    table = model.decoder.embed_tokens.weight.detach()
    expected = table[torch.tensor([11, 4, 46, 11, 4])] * math.sqrt(64)  # unit u is token u + 4
    assert torch.allclose(method.prompt, expected)


def test_init_from_sampled_units_picks_unit_rows():
    model = _lm()
    torch.manual_seed(5)
    method = build_method(PromptConfig(length=6, deep=False, init=PromptInit.SAMPLED_UNITS), model)
    scaled = model.decoder.embed_tokens.weight.detach() * math.sqrt(64)  # (V, D)
    for row in method.prompt.detach():
        match = (scaled - row).abs().amax(dim=1).argmin()
        assert torch.allclose(scaled[match], row) and match >= 4  # a unit, never a special token


def test_deep_init_from_activations_is_what_each_layer_feeds_its_kv_projections():
    """deep_init=activations: layer i's key and value inputs start as the pre-LN output the frozen LM computes at
    the init tokens in that layer (the unit string read as a sentence, with its positions)."""
    model = _lm().train()
    cfg = PromptConfig(length=4, init=PromptInit.UNITS, init_units="7 0 42 3", deep_init=DeepInit.ACTIVATIONS)
    method = build_method(cfg, model)
    assert model.training  # the init ran the LM in eval mode and gave the mode back
    dec = model.decoder
    ids = torch.tensor([[11, 4, 46, 7]])
    model.eval()
    with torch.no_grad():
        x = dec.embed_scale * dec.embed_tokens(ids) + dec.embed_positions(make_positions(ids, model.padding_idx))
        mask = attention_mask(None, 4)
        for i, layer in enumerate(dec.layers):
            expected = layer.self_attn_layer_norm(x)[0]  # pre-LN: what q/k/v projections read
            torch.testing.assert_close(method.deep_key[i], expected)
            torch.testing.assert_close(method.deep_value[i], expected)
            x = layer(x, mask)
    assert method.deep_key.data_ptr() != method.deep_value.data_ptr()  # two tensors, trained apart


def test_normal_init_std():
    torch.manual_seed(0)
    method = PromptTuning(PromptConfig(length=50, init_std=0.3), _lm())
    for p in (method.prompt, method.deep_key, method.deep_value):
        assert abs(p.std().item() - 0.3) < 0.03


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="length"):
        PromptConfig(length=0)
    with pytest.raises(ConfigError, match="init_units"):
        PromptConfig(init=PromptInit.UNITS, deep=False)
    with pytest.raises(ConfigError, match="would do nothing"):  # deep: the input prompt's values are never read
        PromptConfig(init=PromptInit.SAMPLED_UNITS)
    with pytest.raises(ConfigError, match="runs the LM on the init tokens"):
        PromptConfig(deep_init=DeepInit.ACTIVATIONS)
    with pytest.raises(ConfigError, match="only used with init=units"):
        PromptConfig(init_units="1 2")
    with pytest.raises(TuningError, match="knows only 100 units"):
        PromptTuning(PromptConfig(length=2, deep=False, init=PromptInit.UNITS, init_units="100"), _lm())
    with pytest.raises(TuningError, match="unit LM"):
        PromptTuning(PromptConfig(), HubertModel(HubertConfig.tiny()))


def test_gradients_reach_deep_prompts_and_separator_but_not_the_shadowed_input_prompt():
    model = _lm()
    method = build_method(PromptConfig(length=3, deep=True), model)
    freeze_except(model, method)
    model(_tokens(), **method.forward_kwargs()).logsumexp(-1).sum().backward()
    for p in (method.deep_key, method.deep_value, method.separator):
        assert p.grad.abs().sum() > 0
    # Every layer's key/value inputs at the prompt positions are replaced, so the input prompt's values never
    # reach a token position (it only provides the positions): SpeechPrompt's count includes it nonetheless.
    assert method.prompt.grad is None or method.prompt.grad.abs().sum() == 0

    shallow = build_method(PromptConfig(length=3, deep=False), model)
    model(_tokens(), **shallow.forward_kwargs()).logsumexp(-1).sum().backward()
    assert shallow.prompt.grad.abs().sum() > 0


def test_a_few_steps_teach_the_frozen_lm_a_label():
    model = _lm()
    method = build_method(PromptConfig(length=4), model)
    opt = torch.optim.Adam(freeze_except(model, method), lr=5e-2, betas=(0.9, 0.98))
    tokens = _tokens()
    target = torch.full((2,), 50)

    def loss() -> torch.Tensor:  # predict unit token 50 right after <s>
        return torch.nn.functional.cross_entropy(model(tokens, **method.forward_kwargs())[:, 3], target)

    start = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.2 * start


def test_tasks_mix_per_sample_by_stacking_forward_kwargs():
    """Multi-task serving: rows of one batch use different prompts (separators are per model, not per row)."""
    model = _lm()
    cfg = PromptConfig(length=3, train_separator=False)
    a, b = build_method(cfg, model), build_method(cfg, model)
    tokens = _tokens()
    ka, kb = a.forward_kwargs(), b.forward_kwargs()
    mixed = {
        "input_prompt": torch.cat([ka["input_prompt"], kb["input_prompt"]]),  # (2, L, D): row 0 -> a, row 1 -> b
        "kv_replace": [(torch.cat([x[0], y[0]]), torch.cat([x[1], y[1]]))
                       for x, y in zip(ka["kv_replace"], kb["kv_replace"])],
    }
    with torch.no_grad():
        out = model(tokens, **mixed)
        assert torch.allclose(out[0], model(tokens[:1], **ka)[0], atol=1e-6)
        assert torch.allclose(out[1], model(tokens[1:], **kb)[0], atol=1e-6)
