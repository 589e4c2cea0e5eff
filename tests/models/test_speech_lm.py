"""The OPT / LLaMA / Qwen2 decoders: parity with transformers (fp32, 1e-5) for two shapes per family, padded batches,
cached generation equal to uncached, the slamkit layout, unit vocabularies and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_decoders import CONFIGS, build_hf_decoder, save_slamkit

from speechprompt.errors import CheckpointError
from speechprompt.models.generation import greedy
from speechprompt.models.hf_decoders import load_speech_lm, save_hf_unit_vocab
from speechprompt.models.speech_lm import SpeechLM, SpeechLMConfig
from speechprompt.models.transformer import KVCache
from speechprompt.models.unit_vocab import UnitVocab, UnitVocabError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="hf")


def _hf_dir(name, tmp_path, **overrides):
    hf = build_hf_decoder(name, **overrides)
    directory = tmp_path / name
    hf.save_pretrained(directory)
    save_hf_unit_vocab(directory, VOCAB)
    return hf, directory


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 42, (3, 20), generator=g)
    tokens[1, :5] = 0  # left padding
    tokens[2, -4:] = 0  # right padding
    return tokens


def _hf_logits(hf, tokens):
    """transformers' logits with positions counting real tokens (what generate() passes for padded rows)."""
    mask = tokens.ne(0).long()
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits


@pytest.mark.transformers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers_on_padded_batches(name, tmp_path):
    hf, directory = _hf_dir(name, tmp_path)
    ours, vocab = load_speech_lm(directory)
    assert isinstance(ours, SpeechLM) and vocab == VOCAB
    tokens = _padded_batch()
    real = tokens.ne(0)
    with torch.no_grad():
        out = ours(tokens)
    torch.testing.assert_close(out[real], _hf_logits(hf, tokens)[real], atol=1e-5, rtol=1e-5)
    # Padding changes nothing: row 1 alone, unpadded, gives the same logits.
    with torch.no_grad():
        alone = ours(tokens[1:2, 5:])
    torch.testing.assert_close(alone[0], out[1, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.transformers
def test_opt_projections_are_the_unit_lms_and_hidden_is_hfs_last_hidden_state(tmp_path):
    """OPT-350M's project_in/project_out load into the attributes fairseq's projections use (one pair of names),
    and ``hidden`` is what transformers returns as the last hidden state: after ``project_out``, e wide."""
    hf, directory = _hf_dir("opt_350m_like", tmp_path)
    ours, _ = load_speech_lm(directory)
    dec = ours.decoder
    assert (dec.project_in.in_features, dec.project_in.out_features) == (16, 32) and dec.project_out.out_features == 16
    assert not hasattr(dec, "project_in_dim") and not hasattr(dec, "project_out_dim")
    tokens = torch.randint(2, 42, (2, 9))
    with torch.no_grad():
        out = ours(tokens, return_hidden=True)
        expected = hf.model.decoder(input_ids=tokens).last_hidden_state
    assert out.hidden.shape == (2, 9, 16)
    torch.testing.assert_close(out.hidden, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, hf(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    # The linear probe reads those states, so its head is as wide as they are.
    from speechprompt.tasks.data import collate
    from speechprompt.tasks.probe import LinearProbe
    from speechprompt.tuning import build_method

    probe = LinearProbe(ours, build_method("linear_probe", ours), ["a", "b", "c"])
    assert probe.head.in_features == 16
    assert probe.class_logits(collate([[3, 4, 5], [6, 7]], ["a", "b"], None, vocab=VOCAB)).shape == (2, 3)


@pytest.mark.transformers
def test_dynamic_ntk_scaling_past_the_trained_length(tmp_path):
    hf, directory = _hf_dir("qwen2_linear", tmp_path, max_position_embeddings=8,
                            rope_scaling={"type": "dynamic", "factor": 2.0})
    ours, _ = load_speech_lm(directory)
    tokens = torch.randint(2, 42, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.transformers
@pytest.mark.parametrize("name", ["opt_350m_like", "llama_gqa_llama3", "qwen2_tied_gqa"])
def test_cached_generation_equals_uncached(name, tmp_path):
    _, directory = _hf_dir(name, tmp_path)
    model, vocab = load_speech_lm(directory)
    prompt = _padded_batch(1)[:, :12]
    prompt[2, :3] = 0  # left-padded contexts only
    prompt[2, -4:] = torch.randint(2, 42, (4,))
    cached = greedy(model, prompt, 10, vocab.eos)
    uncached = greedy(model, prompt, 10, vocab.eos, use_cache=False)
    assert torch.equal(cached, uncached)
    # Step by step on the cache = one pass over the whole sequence.
    seq = torch.cat([prompt, cached.clamp(min=2)], dim=1)
    cache = KVCache()
    with torch.no_grad():
        full = model(seq)
        steps = [model(seq[:, :12], cache=cache)] + [model(seq[:, t : t + 1], cache=cache) for t in range(12, 22)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.transformers
def test_slamkit_directory_loads_with_its_unit_layout(tmp_path):
    hf = build_hf_decoder("qwen2_tied_gqa", vocab_size=42)
    directory = save_slamkit(hf, tmp_path / "slam", num_units=40)
    model, vocab = load_speech_lm(directory)
    assert vocab == UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="slamkit")
    assert vocab.token(0) == 2 and vocab.logit_columns == range(42)
    tokens = _padded_batch()
    real = tokens.ne(0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[real], _hf_logits(hf, tokens)[real], atol=1e-5, rtol=1e-5)
    # Without the tokeniser's file, the special ids come from base_config (where slamkit writes them).
    _, vocab = load_speech_lm(save_slamkit(hf, tmp_path / "bare", num_units=40, tokeniser=False))
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.unit_offset, vocab.num_units) == (0, 1, 1, 2, 40)


@pytest.mark.transformers
def test_unit_mapping_from_the_tokenizer_or_a_clear_refusal(tmp_path):
    hf = build_hf_decoder("llama_mha", vocab_size=42, pad=0, bos=1, eos=2)
    directory = tmp_path / "plain"
    hf.save_pretrained(directory)
    with pytest.raises(CheckpointError, match="cannot tell which tokens are units.*unit_vocab.json"):
        load_speech_lm(directory)
    # A tokenizer with text tokens 0..9 and the unit tokens <Un0>..<Un31> at ids 10..41.
    vocab = {f"t{i}": i for i in range(10)} | {f"<Un{u}>": 10 + u for u in range(32)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    _, v = load_speech_lm(directory)
    assert (v.unit_offset, v.num_units, v.bos, v.eos, v.pad) == (10, 32, 1, 2, 0)
    assert v.logit_columns == range(10, 42)  # the LM knows text too: a learnable verbalizer reads the unit slice
    with pytest.raises(UnitVocabError, match="unit 32 does not fit the LM's vocabulary of 32 units"):
        v.check_units([3, 32])


def test_refusals_are_one_line(tmp_path):
    base = {"model_type": "qwen2", "vocab_size": 42, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "pad_token_id": 0}
    cases = {
        "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
        "sliding": ({"use_sliding_window": True}, "sliding-window attention"),
        "gpt2": ({"model_type": "gpt2"}, "model_type 'gpt2' is not a supported decoder"),
    }
    for key, (change, message) in cases.items():
        d = tmp_path / key
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**base, **change}))
        (d / "unit_vocab.json").write_text(json.dumps({"unit_offset": 2, "num_units": 40, "bos": 1, "eos": 1,
                                                       "pad": 0}))
        torch.save({}, d / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match=message) as info:
            load_speech_lm(d)
        assert "\n" not in str(info.value)
    with pytest.raises(UnitVocabError, match="padding token 1 must differ"):
        UnitVocab(size=10, num_units=4, unit_offset=2, bos=1, eos=1, pad=1)


def test_bf16_backbone_keeps_fp32_prompt_and_normalises_in_fp32():
    cfg = SpeechLMConfig(family="qwen2", vocab_size=42, embed_dim=32, ffn_dim=48, layers=2, heads=4, kv_heads=2,
                         head_dim=8, max_positions=64)
    torch.manual_seed(0)
    model = SpeechLM(cfg, VOCAB).eval()
    tokens = torch.randint(2, 42, (2, 9))
    prompt = torch.randn(1, 3, 32)
    with torch.no_grad():
        ref = model(tokens, input_prompt=prompt).float()
        model.to(torch.bfloat16)
        low = model(tokens, input_prompt=prompt)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.transformers
def test_loading_never_imports_transformers(tmp_path):
    _, directory = _hf_dir("qwen2_tied_gqa", tmp_path)
    code = textwrap.dedent(f"""
        import sys
        from speechprompt.models.hf_decoders import load_speech_lm
        model, vocab = load_speech_lm({str(directory)!r})
        assert not [m for m in sys.modules if m.split(".")[0] in ("transformers", "fairseq")]
        print(type(model).__name__, vocab.layout)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SpeechLM hf"


def test_published_shapes_and_their_counts_on_the_meta_device():
    """Parameter counts of the published speech LMs' shapes (over 502 tokens) and of the methods' defaults on them,
    the numbers docs/speech_lms.md gives. Deep prompt L=5 with the separator: (2 * layers + 1) * 5 * d + e."""
    from speechprompt.models.speech_lm import PUBLISHED_SHAPES
    from speechprompt.tuning import TuningError, build_method

    expected = {  # base, deep prompt L=5, prefix L=10, LoRA r=8 on q and v
        "twist_350m": (305_714_176, 49 * 5 * 1024 + 512, 2 * 24 * 10 * 1024, 24 * 2 * 8 * (1024 + 1024)),
        "twist_1.3b": (1_213_829_120, 49 * 5 * 2048 + 2048, 2 * 24 * 10 * 2048, 24 * 2 * 8 * (2048 + 2048)),
        "twist_7b": (6_480_384_000, 65 * 5 * 4096 + 4096, 2 * 32 * 10 * 4096, 32 * 2 * 8 * (4096 + 4096)),
        # Qwen2.5-0.5B: GQA, so prefixes and LoRA's v side are 2 k/v heads x 64 = 128 wide.
        "slam_qwen2.5_0.5b": (358_347_904, 49 * 5 * 896 + 896, 2 * 24 * 10 * 128,
                              24 * 8 * ((896 + 896) + (896 + 128))),
    }
    for name, (base, prompt, prefix, lora) in expected.items():
        with torch.device("meta"):
            model = SpeechLM(SpeechLMConfig(**PUBLISHED_SHAPES[name], padding_idx=0))
        assert sum(p.numel() for p in model.parameters()) == base, name
        for method, count in (("prompt", prompt), ("prefix", prefix), ("lora", lora)):
            m = build_method(method, model)
            assert m.trainable_parameters() == count, (name, method)
            m.detach()
    with torch.device("meta"):
        llama = SpeechLM(SpeechLMConfig(**PUBLISHED_SHAPES["twist_7b"], padding_idx=0))
    with pytest.raises(TuningError, match="BitFit found no bias"):
        build_method("bitfit", llama)
