"""fairseq's HuBERT, the oracle of tests/models/test_hubert.py and tests/data_prep/test_features.py.

Params (JSON):
    models: ``{NAME: spec}``, each spec with
        model: fields of fairseq's ``HubertConfig``;
        task: fields of ``HubertPretrainingConfig`` (``data`` and ``labels`` are filled in);
        dict_sizes: the number of units of each label set, one fairseq ``Dictionary`` each (``[504 - 4]`` is
            hubert_base_ls960's);
        randomize_seed: give every parameter a distinctive random value from this seed, so that a swapped or
            skipped one shows up; null keeps fairseq's initialisation (after ``torch.manual_seed(0)``, always);
        checkpoint: how the config is pickled: ``"container"`` (a plain dict, what fairseq's trainer saves),
            ``"dictconfig"`` (an omegaconf ``DictConfig``, as in older checkpoints), or null: no checkpoint, no
            state dict, no features (only the shapes and the config, e.g. of a 95M-parameter base model);
        gslm: optional ``{"audio": WAV, "layer": L, "max_chunk": N}``: the features of GSLM's
            ``HubertFeatureReader.get_feats`` (reading, normalising, chunking: fairseq's own code) for that file.
    inputs: optional path of a ``torch.save``d ``{"source": (B, T) float, "padding": (B, T) bool}``: every model
        with a checkpoint encodes it, unpadded and padded.
    layers: the output layers to extract (null: the final output, after the encoder's last LayerNorm if pre-LN).

Writes, for each NAME:
    NAME.pt: the checkpoint in fairseq's layout (``torch_persistent_save``), with the label dictionaries as fairseq
        ``Dictionary`` objects in ``task_state`` and a trainer's ``extra_state`` holding numpy values;
    NAME.ref.pt: ``{"shapes": {key: [sizes]}, "model_cfg": the resolved model config as a plain dict, "versions",
        "state_dict": ..., "input": (B, T) the model's input, normalised as fairseq's HubertDataset does when
        task.normalize, "features": {"unpadded" | "padded": {"1", ..., "final": (B, frames, D)}},
        "frame_padding": (B, frames) bool, "gslm_features": (frames, D)}`` (the last five as the spec asks).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from common import numpy_training_state, setup, versions
from fairseq.checkpoint_utils import torch_persistent_save
from fairseq.data.dictionary import Dictionary
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from omegaconf import OmegaConf
from torch import nn


def randomize(model: nn.Module, seed: int) -> None:
    """Give every parameter a distinctive random value, so that a swapped or skipped one shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.3 * noise)
                elif name == "weight_g":
                    p.copy_(p * (1.0 + 0.3 * noise.abs()))
                elif name == "bias":
                    p.copy_(0.1 * noise)
                else:
                    fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                    p.copy_(noise / fan_in**0.5)


def build(spec: dict) -> tuple[HubertModel, dict, list[Dictionary]]:
    dictionaries = []
    for size in spec["dict_sizes"]:
        d = Dictionary()
        for u in range(size):
            d.add_symbol(str(u))
        dictionaries.append(d)
    task = HubertPretrainingConfig(data="/data", labels=[f"km{i}" for i in range(len(dictionaries))],
                                   **spec.get("task", {}))
    full = OmegaConf.create({"common": {"seed": 1}, "model": HubertConfig(**spec["model"]), "task": task})
    torch.manual_seed(0)
    model = HubertModel(full.model, full.task, dictionaries)
    if spec.get("randomize_seed") is not None:
        randomize(model, spec["randomize_seed"])
    return model.eval(), full, dictionaries


def encode(model: HubertModel, inputs: dict, normalize: bool, layers: list) -> dict:
    source, padding = inputs["source"], inputs["padding"]
    if normalize:  # fairseq's HubertDataset.postprocess, on each waveform
        source = torch.stack([F.layer_norm(wav, wav.shape) for wav in source])
    out = {"input": source, "features": {}}
    with torch.no_grad():
        for kind, mask in (("unpadded", None), ("padded", padding)):
            out["features"][kind] = {}
            for layer in layers:
                x, frame_padding = model.extract_features(source, mask, mask=False, output_layer=layer)
                out["features"][kind]["final" if layer is None else str(layer)] = x
                if mask is not None:
                    out["frame_padding"] = frame_padding
    return out


def gslm_features(model: HubertModel, normalize: bool, audio: str, layer: int, max_chunk: int) -> torch.Tensor:
    from fairseq.examples.textless_nlp.gslm.speech2unit.pretrained.hubert_feature_reader import (
        HubertFeatureReader,
    )

    # fairseq's checkpoint loader fails under this torch (see DESIGN.md), so the GSLM reader gets the model
    # directly; get_feats, which does the reading, normalising and chunking, is fairseq's own code.
    reader = HubertFeatureReader.__new__(HubertFeatureReader)
    reader.model, reader.layer, reader.max_chunk, reader.use_cuda = model, layer, max_chunk, False
    reader.task = types.SimpleNamespace(cfg=types.SimpleNamespace(normalize=normalize, sample_rate=16000))
    return reader.get_feats(audio)


def main() -> None:
    out, params = setup()
    inputs = torch.load(params["inputs"], weights_only=True) if params.get("inputs") else None
    for name, spec in params["models"].items():
        model, full, dictionaries = build(spec)
        ref = {
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "model_cfg": OmegaConf.to_container(full.model, resolve=True, enum_to_str=True),
            "versions": versions(),
        }
        if spec.get("checkpoint") is not None:
            plain = OmegaConf.to_container(full, resolve=True, enum_to_str=True)  # what fairseq's trainer saves
            cfg = OmegaConf.create(plain) if spec["checkpoint"] == "dictconfig" else plain
            torch_persistent_save({
                "args": None, "cfg": cfg, "model": model.state_dict(), "task_state": {"dictionaries": dictionaries},
                "extra_state": numpy_training_state(), "optimizer_history": [], "last_optimizer_state": None,
            }, str(out / f"{name}.pt"))
            ref["state_dict"] = model.state_dict()
            if inputs is not None:
                ref.update(encode(model, inputs, full.task.normalize, params["layers"]))
        if spec.get("gslm"):
            ref["gslm_features"] = gslm_features(model, full.task.normalize, **spec["gslm"])
        torch.save(ref, out / f"{name}.ref.pt")


if __name__ == "__main__":
    main()
