"""Tiny OPT / LLaMA / Qwen2 causal LMs built with transformers (the oracle), saved as HF or slamkit directories.

transformers is imported inside the builders only, so a test module that needs it says so with
``@pytest.mark.transformers`` on the tests that call them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

SR = 16000


def write_tone(path: str | Path, freq: float, seed: int, seconds: float = 0.3) -> None:
    """A noisy sine wave at ``freq`` Hz: the stand-in utterance of the speech-LM end-to-end tests, whose units (and
    so whose label) the tone's pitch decides."""
    t = np.arange(int(SR * seconds)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), SR)


# Two shapes per family, covering the variants the loader must tell apart.
CONFIGS: dict[str, dict[str, Any]] = {
    # OPT-350M's shape in miniature: post-LN, project_in/out (word_embed_proj_dim != hidden_size), no final norm.
    "opt_350m_like": dict(model_type="opt", hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                          num_attention_heads=4, do_layer_norm_before=False, max_position_embeddings=64),
    # OPT-1.3B's: pre-LN with the final LayerNorm, no projections.
    "opt_1b_like": dict(model_type="opt", hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                        num_attention_heads=4, do_layer_norm_before=True, max_position_embeddings=64),
    # LLaMA (TWIST-7B's family): MHA, untied head, no biases.
    "llama_mha": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                      max_position_embeddings=64, rms_norm_eps=1e-5),
    # LLaMA 3-style: GQA, llama3 rope scaling, head_dim != hidden / heads, biases on.
    "llama_gqa_llama3": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=12, attention_bias=True,
                             tie_word_embeddings=True, max_position_embeddings=64, rope_theta=500000.0,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=16)),
    # Qwen2.5-0.5B's (SLAM's): GQA, tied, q/k/v bias.
    "qwen2_tied_gqa": dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=64, rope_theta=1000000.0),
    # Qwen2, untied, MHA, linear rope scaling.
    "qwen2_linear": dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         max_position_embeddings=64, rope_scaling=dict(type="linear", factor=2.0)),
}


def build_hf_decoder(name: str, vocab_size: int = 42, pad: int = 0, bos: int = 1, eos: int = 1,
                     seed: int = 0, **overrides: Any) -> Any:
    """The HF ``...ForCausalLM`` of ``CONFIGS[name]`` with random weights (eval mode, float32)."""
    import transformers

    fields = {**CONFIGS[name], **overrides}
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size, pad_token_id=pad,
                                               bos_token_id=bos, eos_token_id=eos, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so that a swapped key shows
        for name_, p in model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_slamkit(model: Any, directory: Path, num_units: int, dedup: bool = True, tokeniser: bool = True) -> Path:
    """Write ``model`` as slamkit (TWIST/SLAM) saves it: ``config.json`` with ``model_type:
    speech_language_model`` and the decoder's config under ``base_config``, weights under ``lm.``, and a
    ``tokeniser_config.json``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    base = model.config.to_dict()  # slamkit keeps the special ids here (pad 0, bos = eos 1), not at the top level
    config = {"model_type": "speech_language_model", "base_model_name": "Qwen/Qwen2.5-0.5B", "base_config": base,
              "vocab_size": model.config.vocab_size, "twist_init": True, "tie_word_embeddings":
              model.config.tie_word_embeddings}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    if tokeniser:
        (directory / "tokeniser_config.json").write_text(json.dumps(
            {"num_units": num_units, "bos_eos_token_id": 1, "pad_token_id": 0, "dedup": dedup}))
    state = {f"lm.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm.lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"))
    return directory
