"""fairseq's wav2vec 2.0, data2vec-style and CTC fine-tuned models: the oracle of tests/models/test_wav2vec2.py.

Run by ``tests/oracle.py`` as ``python wav2vec2_family.py OUT_DIR JSON`` in the fairseq environment; imports only
fairseq, torch, numpy and omegaconf.

Params (JSON):
    models: ``{NAME: spec}``, each spec with
        kind: ``pretrain`` (fairseq's ``Wav2Vec2Model``), ``wav2vec_ctc`` (``Wav2VecCtc`` on a wav2vec 2.0 model)
            or ``hubert_ctc`` (``HubertCtc`` on a HuBERT model), each built by fairseq's own classes;
        name: the ``_name`` to save a pretraining checkpoint under (``wav2vec2``, or ``data2vec_audio``: data2vec's
            encoder is fairseq's wav2vec 2.0 ``TransformerEncoder`` with ``pos_conv_depth`` > 1; its checkpoints
            carry ``final_proj`` but no quantizer, so those tensors are left out);
        model: fields of the inner ``Wav2Vec2Config``/``HubertConfig``;
        normalize: the task's ``normalize``;
        letters: the CTC letters (``|`` is the word boundary);
        dictionary: where the CTC letters are saved: ``task_state`` (fairseq's trainer) or ``file``
            (``dict.ltr.txt`` beside the checkpoint only);
        randomize_seed: give every parameter a distinctive random value (fairseq's init otherwise).
    inputs: path of a ``torch.save``d ``{"source": (B, T) float, "padding": (B, T) bool}``, already normalised.
    layers: 1-based output layers to extract (the final output, after the last LayerNorm if pre-LN, always too).

Writes, for each NAME, ``NAME/checkpoint.pt`` (fairseq's layout) and ``NAME/ref.pt``: ``{"features": {"unpadded"
| "padded": {"1", ..., "final": (B, F, D)}}, "frame_padding": (B, F) bool}`` for pretraining checkpoints, and
``{"logits": {"unpadded" | "padded": (B, F, V)}, "frame_padding", "text": {"unpadded" | "padded": [str]}}`` for CTC
ones, the text decoded greedily with fairseq's dictionary and its ``letter`` post-processing.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import torch
from fairseq.data.data_utils import post_process
from fairseq.data.dictionary import Dictionary
from fairseq.models.hubert.hubert import HubertConfig
from fairseq.models.hubert.hubert_asr import HubertCtc, HubertCtcConfig
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq.models.wav2vec.wav2vec2_asr import Wav2Vec2CtcConfig, Wav2VecCtc
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from omegaconf import OmegaConf
from torch import nn

COMMON = {"tpu": False, "fp16": False, "seed": 1}  # what the configs' ${common.*} interpolations read


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


def container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def resolved(model_cfg, data: Path, normalize: bool):
    """A fine-tuning model config with its ${task.*}/${distributed_training.*} interpolations resolved, as the
    trainer saves it."""
    full = OmegaConf.create({"common": COMMON, "distributed_training": {"ddp_backend": "legacy_ddp"},
                             "task": {"data": str(data), "normalize": normalize, "autoregressive": False},
                             "model": model_cfg})
    return OmegaConf.create(container(full)["model"])


def pretrain(spec: dict, out: Path, inputs: dict, layers: list[int]) -> None:
    full = OmegaConf.create({"common": COMMON, "model": Wav2Vec2Config(**spec["model"]),
                             "task": AudioPretrainingConfig(data="/data", normalize=spec["normalize"])})
    torch.manual_seed(0)
    model = Wav2Vec2Model(full.model)
    randomize(model, spec["randomize_seed"])
    model.eval()
    state = model.state_dict()
    cfg = container(full)
    if spec["name"] == "data2vec_audio":
        state = {k: v for k, v in state.items() if not k.startswith(("quantizer.", "project_q."))}
    cfg["model"]["_name"] = spec["name"]
    torch.save({"args": None, "cfg": cfg, "model": state, "task_state": {}, "extra_state": {},
                "optimizer_history": [], "last_optimizer_state": None}, out / "checkpoint.pt")
    ref: dict = {"features": {}}
    with torch.no_grad():
        for case in ("unpadded", "padded"):
            pad = inputs["padding"] if case == "padded" else None
            feats = {}
            for layer in layers:  # fairseq's wav2vec 2.0 counts layers from 0
                feats[str(layer)] = model.extract_features(inputs["source"], pad, mask=False, layer=layer - 1)["x"]
            res = model.extract_features(inputs["source"], pad, mask=False, layer=None)
            feats["final"] = res["x"]
            ref["features"][case] = feats
            if case == "padded":
                ref["frame_padding"] = res["padding_mask"]
    torch.save(ref, out / "ref.pt")


def ctc(spec: dict, out: Path, inputs: dict) -> None:
    letters = Dictionary()
    for ch in spec["letters"]:
        letters.add_symbol(ch)
    letters.save(str(out / "dict.ltr.txt"))
    task = AudioFinetuningTask(AudioFinetuningConfig(data=str(out), labels="ltr", normalize=spec["normalize"]))
    assert len(task.target_dictionary) == len(letters)
    if spec["kind"] == "hubert_ctc":
        units = Dictionary()
        for u in range(12):
            units.add_symbol(str(u))
        units.save(str(out / "dict.km.txt"))
        inner = OmegaConf.create({
            "common": COMMON, "model": HubertConfig(**spec["model"]),
            "task": HubertPretrainingConfig(data=str(out), labels=["km"], label_dir=str(out), label_rate=50.0,
                                            normalize=spec["normalize"]),
        })
        inner = OmegaConf.create(container(inner))
        inner.model._name, inner.task._name = "hubert", "hubert_pretraining"
        cfg = resolved(HubertCtcConfig(w2v_path="unused", w2v_args=inner), out, spec["normalize"])
        cfg.autoregressive = False  # HubertEncoder reads it, HubertCtcConfig lacks it (a fairseq 0.12 quirk)
        torch.manual_seed(0)
        model = HubertCtc.build_model(cfg, task)
    else:
        inner = OmegaConf.create({"common": COMMON, "model": Wav2Vec2Config(**spec["model"]),
                                  "task": AudioPretrainingConfig(data=str(out), normalize=spec["normalize"])})
        inner = OmegaConf.create(container(inner))
        inner.model._name, inner.task._name = "wav2vec2", "audio_pretraining"
        cfg = resolved(Wav2Vec2CtcConfig(w2v_path="unused", w2v_args=inner), out, spec["normalize"])
        torch.manual_seed(0)
        model = Wav2VecCtc.build_model(cfg, task)
    randomize(model, spec["randomize_seed"])
    model.eval()
    model_cfg = container(cfg)
    model_cfg["_name"] = spec["kind"]
    task_cfg = {"_name": "audio_finetuning", "data": str(out), "labels": "ltr", "normalize": spec["normalize"]}
    task_state = task.state_dict() if spec["dictionary"] == "task_state" else {}
    name = spec["name"]
    (out / name).mkdir(exist_ok=True)
    torch.save({"args": None, "cfg": {"model": model_cfg, "task": task_cfg}, "model": model.state_dict(),
                "task_state": task_state, "extra_state": {}, "optimizer_history": [], "last_optimizer_state": None},
               out / name / "checkpoint.pt")
    if spec["dictionary"] == "file":
        letters.save(str(out / name / "dict.ltr.txt"))
    ref: dict = {"logits": {}, "text": {}}
    with torch.no_grad():
        for case in ("unpadded", "padded"):
            pad = inputs["padding"] if case == "padded" else torch.zeros_like(inputs["padding"])
            net = model(source=inputs["source"], padding_mask=pad)
            logits = net["encoder_out"].transpose(0, 1)  # (B, F, V)
            frame_pad = net["padding_mask"]
            if frame_pad is None:
                frame_pad = torch.zeros(logits.shape[:2], dtype=torch.bool)
            ref["logits"][case] = logits
            if case == "padded":
                ref["frame_padding"] = frame_pad
            texts = []
            for row, mask in zip(logits.argmax(-1), frame_pad):
                ids = [i for i, _ in itertools.groupby(row[~mask].tolist()) if i != 0]  # blank = <s> = 0
                texts.append(post_process(task.target_dictionary.string(torch.tensor(ids)), "letter"))
            ref["text"][case] = texts
    torch.save(ref, out / name / "ref.pt")


def main() -> None:
    out, params = Path(sys.argv[1]), json.loads(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    inputs = torch.load(params["inputs"])
    for name, spec in params["models"].items():
        spec = {"name": name, **spec}
        if spec["kind"] == "pretrain":
            (out / name).mkdir(exist_ok=True)
            pretrain(spec, out / name, inputs, params["layers"])
        else:
            ctc(spec, out, inputs)


if __name__ == "__main__":
    main()
