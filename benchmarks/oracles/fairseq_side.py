"""The fairseq side of ``benchmarks/vs_fairseq.py``: one measurement with fairseq-fixed 0.12.3.1, printed as JSON.

Run by the benchmark with the interpreter of the fairseq environment (``SPEECHPROMPT_FAIRSEQ_PYTHON``, default
``<repo>/.venv-fairseq/bin/python``), never imported by the toolkit: it imports fairseq and torch only, and reads
the weights and inputs that the benchmark wrote (the unit LM as a fairseq checkpoint written by ``save_unit_lm``,
HuBERT's state dict, the waveforms and tokens as tensors).

    python benchmarks/oracles/fairseq_side.py '{"kind": "hubert", ...}'

Kinds (the benchmark's docstring says what each measures): ``hubert`` (layer features, one utterance at a time or in
padded batches), ``encoder`` (the same for HuBERT, wav2vec 2.0 or data2vec-audio built from a state dict under
fairseq's names and our config fields, for ``benchmarks/encoders.py``), ``lm_train`` (a full training step of the
unit LM: forward, fairseq's cross-entropy, backward, gradient clipping, fairseq's Adam), ``decode`` (greedy
decoding with ``SequenceGenerator`` forcing the context as a prefix, as fairseq's ``language_modeling`` task
generates).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

# Time and memory helpers, shared with the benchmarks: measure.py beside this script (on sys.path as its folder).
from measure import current_rss_mb, pad_batch, peak_rss_mb, reset_peak_rss, timed, warm_up_runtime  # noqa: E402

logging.disable(logging.WARNING)


# -- HuBERT ---------------------------------------------------------------------------------------------------


def build_hubert(spec: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf

    d = Dictionary()
    for u in range(spec["hubert_classes"] - d.nspecial):
        d.add_symbol(str(u))
    # Our config carries fields of the other encoders of the family (data2vec, WavLM, ...): fairseq's has not.
    known = set(HubertConfig.__dataclass_fields__)
    model_cfg = HubertConfig(**{k: v for k, v in spec["hubert_cfg"].items() if k in known})
    full = OmegaConf.create({"model": model_cfg,
                             "task": HubertPretrainingConfig(data="/data", labels=["km"], label_rate=50.0)})
    model = HubertModel(full.model, full.task, [d])
    if spec["hubert_state"] is not None:
        model.load_state_dict(torch.load(spec["hubert_state"], weights_only=True), strict=True)
    return model.eval().to(device)


def run_hubert(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model = build_hubert(spec, device).to(dtype)
    wavs = [w.to(device, dtype) for w in torch.load(spec["inputs"], weights_only=True)]
    layer = spec["layer"]

    def one_at_a_time() -> list[torch.Tensor]:
        return [model.extract_features(w[None], None, mask=False, output_layer=layer)[0][0] for w in wavs]

    def batched() -> list[torch.Tensor]:
        out = []
        for idx in spec["batches"]:
            source, padding = pad_batch(wavs, idx, device)
            x, frame_padding = model.extract_features(source, padding, mask=False, output_layer=layer)
            out.extend(x[row][~frame_padding[row]] for row in range(len(idx)))
        return out

    fn = batched if spec["mode"] == "batched" else one_at_a_time
    with torch.no_grad():
        times, feats = timed(fn, spec["repeats"], device)
    if spec.get("features_out"):  # for the benchmark to compare with ours
        torch.save([f.float().cpu() for f in feats], spec["features_out"])
    return {**times, "frames": sum(f.shape[0] for f in feats)}


# -- any encoder of the family (benchmarks/encoders.py) -------------------------------------------------------

# fairseq tensors that only pretraining uses: a state dict converted from another library does not have them.
_PRETRAINING_ONLY = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat", "mask_emb", "target_glu.")


def build_encoder(spec: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """fairseq's ``HubertModel`` or ``Wav2Vec2Model`` (data2vec-audio's encoder is the latter with a positional
    conv stack) from ``spec["cfg"]`` (our config fields, fairseq's names; fields fairseq lacks are dropped) and the
    state dict at ``spec["state"]``. Every tensor of ours must be used, and only pretraining tensors may be left."""
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

    if spec["arch"] == "hubert":
        model = build_hubert({"hubert_cfg": spec["cfg"], "hubert_classes": 504, "hubert_state": None}, device)
    else:
        known = set(Wav2Vec2Config.__dataclass_fields__)
        model = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in spec["cfg"].items() if k in known}))
    result = model.load_state_dict(torch.load(spec["state"], weights_only=True), strict=False)
    left = [k for k in result.missing_keys if not k.startswith(_PRETRAINING_ONLY)]
    if left or result.unexpected_keys:
        raise SystemExit(f"state dict does not fit fairseq's {spec['arch']}: missing {left[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    return model.eval().to(device)


def run_encoder(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model = build_encoder(spec, device).to(dtype)
    wavs = [w.to(device, dtype) for w in torch.load(spec["inputs"], weights_only=True)]
    layer = spec["layer"]
    hubert = spec["arch"] == "hubert"

    def features(source: torch.Tensor, padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hubert:
            return model.extract_features(source, padding, mask=False, output_layer=layer)
        out = model.extract_features(source, padding, mask=False, layer=layer - 1)  # fairseq counts from 0 here
        return out["x"], out["padding_mask"]

    def one_at_a_time() -> list[torch.Tensor]:
        return [features(w[None], None)[0][0] for w in wavs]

    def batched() -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(wavs)
        for idx in spec["batches"]:  # fairseq's own padded batches: padding mask in, frame mask out
            source, padding = pad_batch(wavs, idx, device)
            x, frame_padding = features(source, padding if len(idx) > 1 else None)
            for row, i in enumerate(idx):
                out[i] = x[row] if frame_padding is None else x[row][~frame_padding[row]]
        return out  # type: ignore[return-value]

    fn = batched if spec["mode"] == "batched" else one_at_a_time
    with torch.no_grad():
        times, feats = timed(fn, spec["repeats"], device)
    if spec.get("features_out"):
        torch.save([f.float().cpu() for f in feats], spec["features_out"])
    return {**times, "frames": sum(f.shape[0] for f in feats)}


# -- unit LM --------------------------------------------------------------------------------------------------


def load_lm(spec: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any]:
    from fairseq import checkpoint_utils

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([spec["lm_checkpoint"]], strict=True)
    return models[0].to(device), task


def run_lm_train(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from fairseq import utils
    from fairseq.optim.adam import Adam

    warm_up_runtime()
    before = current_rss_mb()
    model, task = load_lm(spec, device)
    gc.collect()
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    pad = task.target_dictionary.pad()
    tokens = torch.load(spec["inputs"], weights_only=True).to(device)  # (B, T + 1)
    source, target = tokens[:, :-1], tokens[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]
    # FairseqAdam's own Adam (what it runs on a CPU, and on a GPU without apex): decoupled weight decay, fp32 state.
    optimizer = Adam(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        with autocast:
            net_output = model(source)
            # fairseq's CrossEntropyCriterion: fp32 log-probabilities, summed NLL over non-pad targets.
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
            loss = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), target.reshape(-1), ignore_index=pad,
                              reduction="sum")
        (loss / target.ne(pad).sum()).backward()
        utils.clip_grad_norm_(params, spec["clip_norm"])
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    times, _ = timed(step, spec["repeats"], device)
    out: dict[str, Any] = dict(times)
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_memory_mb"] = peak_rss_mb() - before
        out["peak_reset"] = peak_reset
    return out


def run_decode(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from fairseq.sequence_generator import SequenceGenerator

    model, task = load_lm(spec, device)
    model = model.eval().to(dtype)
    context = torch.load(spec["inputs"], weights_only=True).to(device)  # (B, C) units, no leading </s>
    B, C = context.shape
    new = spec["new_tokens"]
    # Greedy (beam 1), exactly `new` tokens after the forced context: </s> is banned until step C + new, where
    # SequenceGenerator then forces it (and it is not counted); <pad> is always banned.
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=1, max_len_a=0, max_len_b=C + new,
                                  min_len=C + new)
    sample = {"net_input": {"src_tokens": context, "src_lengths": torch.full((B,), C, device=device)}}

    def decode() -> torch.Tensor:
        hyps = generator.generate([model], sample, prefix_tokens=context)
        return torch.stack([h[0]["tokens"][C:C + new] for h in hyps])  # (B, new)

    with torch.no_grad():
        times, out = timed(decode, spec["repeats"], device)
    return {**times, "tokens": out.tolist()}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    runner = {"hubert": run_hubert, "encoder": run_encoder, "lm_train": run_lm_train,
              "decode": run_decode}[spec["kind"]]
    out = runner(spec, device, dtype)
    out["impl"] = "fairseq"
    out["threads"] = torch.get_num_threads()
    out["torch"] = torch.__version__
    try:
        from importlib.metadata import version

        out["fairseq"] = version("fairseq-fixed")
    except Exception:  # noqa: BLE001 - an informational field only
        out["fairseq"] = None
    out["finite"] = all(math.isfinite(t) for t in out["seconds"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
