"""The unit LM: parity with fairseq's transformer_lm (run as an oracle in its own environment, see tests/oracle.py),
checkpoint import/export, and the tuning hooks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from oracle import run_oracle

from speechprompt.config import ConfigError
from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError
from speechprompt.models.transformer import KVCache, LayerKV, attention_mask
from speechprompt.models.unit_lm import (
    UnitLM,
    UnitLMConfig,
    load_unit_lm,
    make_positions,
    save_unit_lm,
    state_fingerprint,
)

N_UNITS = 20  # vocab = 24


def _tiny(**overrides) -> UnitLM:
    torch.manual_seed(0)
    cfg = UnitLMConfig.named("tiny", vocab_size=N_UNITS + 4, embed_dim=32, ffn_dim=64, **overrides)
    model = UnitLM(cfg).eval()
    _randomize(model)
    return model


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (fairseq initialises biases and LayerNorms to constants)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _batch(B: int = 3, T: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, N_UNITS + 4, (B, T), generator=g)


def _left_pad(tokens: torch.Tensor, n_pad: list[int], pad: int = 1) -> torch.Tensor:
    out = tokens.clone()
    for row, n in enumerate(n_pad):
        out[row, :n] = pad
    return out


# ---------------------------------------------------------------------------------------------------------------
# fairseq parity (tests/oracles/fairseq/unit_lm.py builds, saves and loads the fairseq models)

FS_FIELDS = dict(decoder_embed_dim=32, decoder_input_dim=32, decoder_output_dim=32, decoder_ffn_embed_dim=64,
                 decoder_layers=2, decoder_attention_heads=4)
PARITY_CONFIGS = {
    "preln_sinusoidal_tied_finalnorm": dict(decoder_normalize_before=True, share_decoder_input_output_embed=True),
    "postln_learned_untied": dict(decoder_normalize_before=False, decoder_learned_pos=True),
    "preln_no_final_norm_learned_gelu_noscale": dict(
        decoder_normalize_before=True, no_decoder_final_norm=True, decoder_learned_pos=True,
        share_decoder_input_output_embed=True, no_scale_embedding=True, activation_fn="gelu"),
}
# A legacy checkpoint stores argparse args; absent fields come from the arch (pre-LN forced, 12 layers...).
LEGACY_ARGS = dict(arch="transformer_lm_big", decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                   decoder_attention_heads=4, decoder_normalize_before=False, share_decoder_input_output_embed=True,
                   tokens_per_sample=64)
EXPORTS = {"export_default": {}, "export_postln_learned_untied": dict(
    normalize_before=False, final_layer_norm=False, learned_pos=True, tie_embeddings=False)}
FS_PAD = 1
# `fairseq-train DATA --task language_modeling` with only --decoder-embed-dim set: decoder_input_dim and
# decoder_output_dim keep their default 512, so fairseq adds project_in_dim/project_out_dim around the layers.
CLI_ARGV = {
    "cli_embed_dim_only_tied": ["--arch", "transformer_lm", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim",
                                "64", "--decoder-layers", "2", "--decoder-attention-heads", "4",
                                "--decoder-normalize-before", "--share-decoder-input-output-embed",
                                "--tokens-per-sample", "64"],
    "cli_embed_dim_only_postln_learned": ["--arch", "transformer_lm", "--decoder-embed-dim", "32",
                                          "--decoder-ffn-embed-dim", "64", "--decoder-layers", "2",
                                          "--decoder-attention-heads", "4", "--decoder-learned-pos",
                                          "--tokens-per-sample", "64"],
}


def _padded() -> torch.Tensor:
    padded = _batch().clone()
    padded[0, 4:] = FS_PAD
    padded[2, 6:] = FS_PAD
    return padded


@pytest.fixture(scope="module")
def fairseq_unit_lm(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One oracle run for the module: ``{name: (checkpoint, reference)}`` for the LMs fairseq builds and saves
    (:data:`PARITY_CONFIGS` and ``legacy``), and for our exports (:data:`EXPORTS`) that fairseq loads."""
    out = tmp_path_factory.mktemp("fairseq_unit_lm")
    exports = {}
    for name, overrides in EXPORTS.items():
        exports[name] = out / name / "ulm.pt"
        save_unit_lm(_tiny(**overrides), Dictionary.for_units(N_UNITS), exports[name], extra={"note": "test"})
        assert (exports[name].parent / "dict.txt").is_file()
    build = {name: {"n_units": N_UNITS, "cfg": {**FS_FIELDS, **fields},
                    "interpolate_max_positions": name.startswith("preln_sinusoidal")}
             for name, fields in PARITY_CONFIGS.items()}
    build["legacy"] = {"n_units": N_UNITS, "legacy_args": LEGACY_ARGS}
    cli = {name: {"n_units": N_UNITS, "argv": argv} for name, argv in CLI_ARGV.items()}
    run_oracle("fairseq", "unit_lm", out, tokens={"plain": _batch().tolist(), "padded": _padded().tolist()},
               build=build, cli=cli, load={name: str(path) for name, path in exports.items()})
    paths = {**{name: out / name / "checkpoint_best.pt" for name in (*build, *cli)}, **exports}
    return {name: (path, torch.load(out / f"{name}.ref.pt", weights_only=True)) for name, path in paths.items()}


@pytest.mark.fairseq
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_fairseq(fairseq_unit_lm, name: str) -> None:
    path, ref = fairseq_unit_lm[name]
    model, dictionary = load_unit_lm(path)
    assert len(dictionary) == ref["vocab"] == model.cfg.vocab_size
    assert model.cfg.normalize_before == PARITY_CONFIGS[name]["decoder_normalize_before"]
    assert model.cfg.max_positions == 64

    with torch.no_grad():
        ours = model(_batch())
    torch.testing.assert_close(ours, ref["logits"]["plain"], atol=1e-5, rtol=1e-5)

    # Right padding: equal on the real positions.
    assert ref["pad"] == FS_PAD == model.padding_idx
    padded = _padded()
    real = padded.ne(FS_PAD)
    with torch.no_grad():
        ours = model(padded)
    torch.testing.assert_close(ours[real], ref["logits"]["padded"][real], atol=1e-5, rtol=1e-5)


@pytest.mark.fairseq
def test_legacy_args_checkpoint_takes_transformer_lm_big_defaults(fairseq_unit_lm) -> None:
    path, ref = fairseq_unit_lm["legacy"]
    resolved = ref["resolved_args"]
    assert resolved["decoder_normalize_before"] and not LEGACY_ARGS["decoder_normalize_before"]  # the arch forces it
    model, _ = load_unit_lm(path)
    assert model.cfg.normalize_before and model.cfg.final_layer_norm and model.cfg.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(_batch()), ref["logits"]["plain"], atol=1e-5, rtol=1e-5)


@pytest.mark.fairseq
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_fairseq(fairseq_unit_lm, name: str) -> None:
    """fairseq's load_model_ensemble_and_task (strict) reads our export and gives our logits."""
    path, ref = fairseq_unit_lm[name]
    model = _tiny(**EXPORTS[name])
    assert ref["vocab"] == N_UNITS + 4
    with torch.no_grad():
        torch.testing.assert_close(model(_batch()), ref["logits"]["plain"], atol=1e-5, rtol=1e-5)
    # And our loader reads our export back exactly.
    again, _ = load_unit_lm(path)
    assert state_fingerprint(again) == state_fingerprint(model)


@pytest.mark.fairseq
@pytest.mark.parametrize("name", sorted(CLI_ARGV))
def test_cli_built_lm_with_input_output_projections_matches_fairseq(fairseq_unit_lm, name: str) -> None:
    """What `fairseq-train --decoder-embed-dim 32` writes: 512-wide embeddings and output, projected in and out."""
    path, ref = fairseq_unit_lm[name]
    assert ref["model_cfg"]["decoder_input_dim"] == ref["model_cfg"]["decoder_output_dim"] == 512
    assert {"decoder.project_in_dim.weight", "decoder.project_out_dim.weight"} <= set(ref["keys"])
    model, _ = load_unit_lm(path)
    assert (model.cfg.embed_dim, model.cfg.input_dim, model.cfg.output_dim) == (32, 512, 512)
    assert model.decoder.project_in.bias is None and model.decoder.project_out.bias is None
    assert model.cfg.tie_embeddings == name.endswith("_tied")

    tokens, padded = _batch(), _padded()
    real = padded.ne(FS_PAD)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref["logits"]["plain"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(padded)[real], ref["logits"]["padded"][real], atol=1e-5, rtol=1e-5)
        # Cached decoding, one token at a time, equals fairseq's incremental_state decoding.
        cache = KVCache()
        steps = torch.cat([model(tokens[:, t:t + 1], cache=cache) for t in range(tokens.shape[1])], dim=1)
    torch.testing.assert_close(steps, ref["incremental"]["plain"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def fairseq_projected_export(fairseq_unit_lm, tmp_path_factory) -> tuple[UnitLM, dict]:
    """The CLI-built LM loaded by us, saved with save_unit_lm, and loaded back by fairseq (strict)."""
    model, dictionary = load_unit_lm(fairseq_unit_lm["cli_embed_dim_only_tied"][0])
    out = tmp_path_factory.mktemp("fairseq_projected_export")
    save_unit_lm(model, dictionary, out / "export" / "ulm.pt")
    run_oracle("fairseq", "unit_lm", out, tokens={"plain": _batch().tolist()},
               load={"export": str(out / "export" / "ulm.pt")})
    return model, {"path": out / "export" / "ulm.pt", **torch.load(out / "export.ref.pt", weights_only=True)}


@pytest.mark.fairseq
def test_projected_lm_export_round_trips_through_fairseq(fairseq_projected_export) -> None:
    model, ref = fairseq_projected_export
    cfg = model.cfg.to_fairseq_cfg()
    assert (cfg["decoder_embed_dim"], cfg["decoder_input_dim"], cfg["decoder_output_dim"]) == (32, 512, 512)
    with torch.no_grad():
        torch.testing.assert_close(model(_batch()), ref["logits"]["plain"], atol=1e-5, rtol=1e-5)
    again, _ = load_unit_lm(ref["path"])
    assert again.cfg == model.cfg and state_fingerprint(again) == state_fingerprint(model)


@pytest.mark.fairseq
def test_deep_prompt_trains_on_a_projected_lm(fairseq_unit_lm) -> None:
    """A SpeechPrompt deep prompt lives in the layers' width (32), not the table's (512), and one step trains it."""
    from speechprompt.tuning import PromptConfig, build_method, freeze_except

    model, _ = load_unit_lm(fairseq_unit_lm["cli_embed_dim_only_tied"][0])
    method = build_method(PromptConfig(length=3, deep=True, train_separator=True, init="units",
                                       init_units="5 6 7", deep_init="activations"), model)
    assert method.prompt.shape == (3, 32) and method.deep_key.shape == (2, 3, 32)
    assert method.separator.shape == (512,)  # the <s> row of the 512-wide table
    # The input prompt starts from unit rows as the layers receive them: scaled by sqrt(32), then project_in.
    rows = model.decoder.embed_tokens.weight[torch.tensor([9, 10, 11])] * 32**0.5  # units 5 6 7 are tokens 9..11
    torch.testing.assert_close(method.prompt, model.decoder.project_in(rows).detach())
    params = freeze_except(model, method)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = _batch()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(2):
        logits = model(tokens[:, :-1], **method.forward_kwargs(tokens.shape[0]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        assert method.deep_key.grad.abs().sum() > 0 and method.separator.grad is not None
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())


def test_projections_config_checks_and_defaults() -> None:
    cfg = UnitLMConfig.named("tiny")
    assert cfg.input_dim is None and cfg.output_dim is None and cfg.token_dim == cfg.hidden_out_dim == 64
    assert "project_in" not in str(list(UnitLM(cfg).state_dict()))  # no projections unless asked
    with pytest.raises(ConfigError, match="tied embeddings need input_dim == output_dim"):
        UnitLMConfig.named("tiny", input_dim=48)
    with pytest.raises(ConfigError, match="input_dim must be positive"):
        UnitLMConfig.named("tiny", input_dim=0, tie_embeddings=False)
    model = _tiny(input_dim=48, output_dim=40, tie_embeddings=False)
    assert model.decoder.embed_tokens.weight.shape == (N_UNITS + 4, 48)
    assert model.decoder.output_projection.weight.shape == (N_UNITS + 4, 40)
    out = model(_batch(), return_hidden=True)
    assert out.hidden.shape == (3, 7, 40) and out.logits.shape == (3, 7, N_UNITS + 4)
    # One name for the projections in our modules (OPT's project_in/out); fairseq's own names in its checkpoints.
    from speechprompt.models.unit_lm import fairseq_state_dict

    ours, theirs = set(model.state_dict()), set(fairseq_state_dict(model))
    assert {"decoder.project_in.weight", "decoder.project_out.weight"} <= ours
    assert {"decoder.project_in_dim.weight", "decoder.project_out_dim.weight"} <= theirs
    assert not {"decoder.project_in.weight", "decoder.project_out.weight"} & theirs
    # from_fairseq: absent dims (fairseq < 0.10 args) mean decoder_embed_dim, as base_lm_architecture sets them.
    legacy = UnitLMConfig.from_fairseq(dict(arch="transformer_lm", decoder_embed_dim=32, decoder_layers=2,
                                            decoder_ffn_embed_dim=64, decoder_attention_heads=4))
    assert legacy.input_dim is None and legacy.output_dim is None


@pytest.mark.parametrize("flag", ["adaptive_input", "character_embeddings", "adaptive_softmax_cutoff"])
def test_adaptive_and_character_embeddings_are_refused_by_name(flag: str) -> None:
    value = "20,40" if flag == "adaptive_softmax_cutoff" else True
    with pytest.raises(CheckpointError, match=flag):
        UnitLMConfig.from_fairseq(dict(arch="transformer_lm", decoder_embed_dim=32, **{flag: value}))


# ---------------------------------------------------------------------------------------------------------------
# Architecture and checkpoint errors


def test_gslm_big_has_the_published_parameter_count() -> None:
    with torch.device("meta"):
        model = UnitLM(UnitLMConfig.named("gslm_big"))
    assert sum(p.numel() for p in model.parameters()) == 151_263_232
    keys = set(model.state_dict())
    assert "decoder.output_projection.weight" in keys and "decoder.layers.11.self_attn.k_proj.bias" in keys
    assert "decoder.layer_norm.weight" in keys and not any("embed_positions" in k for k in keys)


def test_named_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown unit LM config"):
        UnitLMConfig.named("huge")
    with pytest.raises(ConfigError, match="divisible"):
        UnitLMConfig.named("tiny", heads=5)


def test_mismatched_dict_is_a_clear_error(tmp_path: Path) -> None:
    model = _tiny()
    path = tmp_path / "ulm.pt"
    save_unit_lm(model, Dictionary.for_units(N_UNITS), path)
    Dictionary.for_units(N_UNITS + 1).save(tmp_path / "other.txt")
    with pytest.raises(CheckpointError, match=r"24 embedding rows .* 25 symbols .*mismatched dict"):
        load_unit_lm(path, dict_path=tmp_path / "other.txt")


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    from speechprompt.fairseq_compat import save_fairseq_checkpoint
    from speechprompt.models.unit_lm import fairseq_state_dict

    model = _tiny()
    state = fairseq_state_dict(model)
    state.pop("decoder.layers.1.fc2.bias")
    state["decoder.layers.1.extra.weight"] = torch.zeros(1)
    save_fairseq_checkpoint(tmp_path / "bad.pt", state, {"model": model.cfg.to_fairseq_cfg(), "task": {}})
    Dictionary.for_units(N_UNITS).save(tmp_path / "dict.txt")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.layers\.1\.fc2\.bias.*unexpected keys: "
                                              r"decoder\.layers\.1\.extra\.weight"):
        load_unit_lm(tmp_path / "bad.pt")


def test_fingerprint_tracks_weights_not_identity() -> None:
    a, b = _tiny(), _tiny()
    assert state_fingerprint(a) == state_fingerprint(b) == state_fingerprint(a.state_dict())
    with torch.no_grad():
        b.decoder.layers[0].fc1.bias[0] += 1e-3
    assert state_fingerprint(a) != state_fingerprint(b)


# ---------------------------------------------------------------------------------------------------------------
# Hooks


def test_zero_length_hooks_are_no_ops() -> None:
    model = _tiny()
    tokens = _left_pad(_batch(), [0, 2, 0])
    H, hd, D = 4, 8, 32
    empty = torch.zeros(1, 0, D)
    with torch.no_grad():
        plain = model(tokens)
        hooked = model(tokens, input_prompt=empty, kv_replace=[(empty, empty)] * 2,
                       prefix=[LayerKV(torch.zeros(1, H, 0, hd), torch.zeros(1, H, 0, hd))] * 2)
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)


def _deep_prompt_by_positions(model: UnitLM, tokens: torch.Tensor, prompt: torch.Tensor, kv: list) -> torch.Tensor:
    """SpeechPrompt's deep prompt as the paper states it: L prompt positions before the tokens run through every
    layer, whose key/value inputs at those positions are replaced; the logits of the token positions."""
    dec, (B, T), L = model.decoder, tokens.shape, prompt.shape[1]
    pad = tokens.eq(model.padding_idx)
    x = dec.embed_scale * dec.embed_tokens(tokens) + dec.embed_positions(make_positions(tokens, model.padding_idx))
    x = torch.cat([prompt.expand(B, -1, -1), x], dim=1)  # (B, L + T, D)
    mask = attention_mask(torch.cat([pad.new_zeros(B, L), pad], dim=1), L + T)
    for layer, kv_in in zip(dec.layers, kv):
        x = layer(x, mask, kv_replace=kv_in)
    return model.output_layer(dec.layer_norm(x[:, L:]))


def test_deep_prompt_equals_the_prompt_positions_run_through_every_layer() -> None:
    """UnitLM runs a deep prompt as the prefix LayerKV(k_proj(K_in), v_proj(V_in)) (see UnitLM.features): the same
    logits as running the prompt positions, which do not depend on the input prompt's values at all."""
    model = _tiny()
    tokens = _left_pad(_batch(), [0, 3, 1])
    L, D = 5, 32
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, L, D, generator=g)
    kv = [(torch.randn(1, L, D, generator=g), torch.randn(1, L, D, generator=g)) for _ in range(2)]
    with torch.no_grad():
        deep = model(tokens, input_prompt=prompt, kv_replace=kv)
        reference = _deep_prompt_by_positions(model, tokens, prompt, kv)
        other_prompt = model(tokens, input_prompt=torch.randn(1, L, D, generator=g), kv_replace=kv)
        shallow = model(tokens, input_prompt=prompt)
    real = tokens.ne(1)
    torch.testing.assert_close(deep[real], reference[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_prompt, deep, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shallow[real], model(tokens).detach()[real], atol=1e-3)


def test_deep_prompt_in_some_layers_runs_the_prompt_positions() -> None:
    """Only a deep prompt in *every* layer is a prefix; with some layers left alone the prompt positions' states
    matter and are computed."""
    model = _tiny()
    tokens = _batch()
    L, D = 3, 32
    g = torch.Generator().manual_seed(4)
    prompt = torch.randn(1, L, D, generator=g)
    kv = [(torch.randn(1, L, D, generator=g), torch.randn(1, L, D, generator=g)), None]
    with torch.no_grad():
        partial = model(tokens, input_prompt=prompt, kv_replace=kv)
        reference = _deep_prompt_by_positions(model, tokens, prompt, kv)
        other_prompt = model(tokens, input_prompt=torch.randn(1, L, D, generator=g), kv_replace=kv)
    torch.testing.assert_close(partial, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other_prompt, partial, atol=1e-3)


def test_kv_replace_needs_matching_prompt_length() -> None:
    model = _tiny()
    kv = [(torch.zeros(1, 3, 32), torch.zeros(1, 3, 32))] * 2
    with pytest.raises(ValueError, match="input prompt has 2"):
        model(_batch(), input_prompt=torch.zeros(1, 2, 32), kv_replace=kv)


def test_embed_override_replaces_the_row_and_gets_the_gradient() -> None:
    model = _tiny(tie_embeddings=False)  # tied, editing the row would also change the output projection
    tokens = _batch()
    tokens[:, 3] = 0  # the <s> separator
    vec = torch.randn(32, requires_grad=True)
    out = model(tokens, embed_override={0: vec})
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.decoder.embed_tokens.weight[0] = vec
        ref = edited(tokens)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert model.decoder.embed_tokens.weight.grad is None or model.decoder.embed_tokens.weight.grad[0].abs().sum() == 0


@pytest.mark.parametrize("hooks", ["none", "prompt", "deep", "prefix"])
def test_cached_forward_equals_full_forward_step_by_step(hooks: str) -> None:
    model = _tiny()
    tokens = _left_pad(_batch(T=9), [0, 3, 5])
    L, D, H, hd = 4, 32, 4, 8
    g = torch.Generator().manual_seed(5)
    kwargs: dict = {}
    if hooks in ("prompt", "deep"):
        kwargs["input_prompt"] = torch.randn(1, L, D, generator=g)
    if hooks == "deep":
        kwargs["kv_replace"] = [(torch.randn(1, L, D, generator=g), torch.randn(1, L, D, generator=g))] * 2
    if hooks == "prefix":
        kwargs["prefix"] = [LayerKV(torch.randn(1, H, 3, hd, generator=g), torch.randn(1, H, 3, hd, generator=g))] * 2
    with torch.no_grad():
        full = model(tokens, **kwargs)
        cache = KVCache()
        steps = [model(tokens[:, :4], cache=cache, **kwargs)]
        for t in range(4, tokens.shape[1]):
            steps.append(model(tokens[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    real = tokens.ne(1)
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)
    assert cache.positions.tolist() == real.sum(1).tolist()
    with pytest.raises(ValueError, match="first call"):
        model(tokens[:, :1], cache=cache, input_prompt=torch.zeros(1, 1, D))


def test_padding_side_does_not_change_real_positions() -> None:
    model = _tiny()
    seq = _batch(B=1, T=5)
    left = torch.cat([torch.ones(1, 3, dtype=torch.long), seq], dim=1)
    right = torch.cat([seq, torch.ones(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, b, c = model(seq), model(left)[:, 3:], model(right)[:, :5]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode() -> None:
    model = _tiny(dropout=0.3)
    tokens = _batch()
    with torch.no_grad():
        assert torch.equal(model(tokens), model(tokens))
        model.train()
        assert not torch.equal(model(tokens), model(tokens))


def test_load_in_bf16_holds_the_backbone_in_bf16_and_trains_fp32_prompts(tmp_path: Path) -> None:
    from speechprompt.tuning import build_method
    from speechprompt.tuning.base import freeze_except

    model = _tiny()
    path = tmp_path / "ulm.pt"
    save_unit_lm(model, Dictionary.for_units(N_UNITS), path)
    half, _ = load_unit_lm(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    tokens = _batch()
    with torch.no_grad():
        torch.testing.assert_close(half(tokens).float(), model(tokens), atol=0.15, rtol=0.05)
    method = build_method("prompt", half)
    params = freeze_except(half, method)
    assert {p.dtype for p in params} == {torch.float32}
    half(tokens, **method.forward_kwargs(tokens.shape[0])).float().logsumexp(-1).sum().backward()
    assert method.deep_key.grad is not None and method.deep_key.grad.dtype == torch.float32
    assert all(p.grad is None for p in half.parameters())
    with pytest.raises(ValueError, match="floating"):
        load_unit_lm(path, dtype=torch.int8)
