"""The encoder feature reader: a layer of a frame-level speech encoder (HuBERT, wav2vec 2.0, data2vec-audio, WavLM)
read one utterance at a time as fairseq's GSLM reader does, or several in one exactly padded forward."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechprompt.data_prep.feature_reader import DTYPES, FeatureError, FeatureReader, file_sha256
from speechprompt.models.encoders import load_encoder
from speechprompt.models.wav2vec2 import Wav2Vec2Model, normalize_waveform


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a checkpoint file, or of a Hugging Face directory's ``config.json`` and weight files
    (in name order: a sharded model is one fingerprint)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    names = ["config.json"] + sorted(p.name for p in path.iterdir()
                                     if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    for name in names:
        h.update(name.encode() + b"\0" + bytes.fromhex(file_sha256(path / name).split(":")[1]))
    return f"sha256:{h.hexdigest()}"


class HubertFeatureReader(FeatureReader):
    """Layer ``layer`` (1-based, fairseq's ``output_layer``) of a speech encoder checkpoint: HuBERT (50 Hz, or 25 Hz
    for mHuBERT-25Hz), wav2vec 2.0, data2vec-audio, WavLM, from fairseq, WavLM or Hugging Face files.

    Matches fairseq's GSLM ``HubertFeatureReader``: the whole waveform is normalised iff the checkpoint says so
    (fairseq's task ``normalize``, HF's ``do_normalize``); then it is cut into chunks of at most ``max_chunk``
    samples, each chunk is encoded on its own (no padding mask) and the frames are concatenated. One difference: a
    last chunk shorter than the conv front end's receptive field (400 samples) gives no frame here, where fairseq
    fails in the conv.
    """

    frame_rate = 50.0
    max_chunk = 1_600_000

    def __init__(
        self,
        model: Wav2Vec2Model,
        task_cfg: dict[str, Any],
        layer: int,
        device: str = "cpu",
        checkpoint: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if getattr(model, "frame_rate", None) is None:
            raise FeatureError(f"{checkpoint or 'the model'} is a {getattr(model, 'architecture', '?')} model: its "
                               "tokens are patches of a fixed-length spectrogram, not frames in time; units need a "
                               "frame-level encoder (wav2vec2, hubert, data2vec-audio, wavlm)")
        self.frame_rate = float(model.frame_rate)
        if not 1 <= layer <= model.num_layers:
            raise FeatureError(f"--layer {layer} is out of range: {checkpoint or 'the model'} has layers "
                               f"1..{model.num_layers}")
        self.model = model.eval().to(device)
        self.task_cfg = task_cfg
        self.layer = int(layer)
        self.device = device
        self.dim = model.encoder_embed_dim
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, layer: int, device: str = "cpu") -> HubertFeatureReader:
        """Load an encoder with :func:`load_encoder` (safely, without fairseq or transformers) and fingerprint it."""
        path = Path(checkpoint)
        if not path.exists():
            raise FeatureError(f"encoder checkpoint {checkpoint} does not exist")
        enc = load_encoder(path)
        enc.model.remove_pretraining_modules()  # never used for features
        return cls(enc.model, enc.task_cfg, layer, device, checkpoint=str(path.resolve()),
                   fingerprint=checkpoint_fingerprint(path))

    @classmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> HubertFeatureReader:
        if checkpoint is None or layer is None:
            raise FeatureError(f"the {cls.name} reader needs --checkpoint (a fairseq/WavLM .pt or a Hugging Face "
                               "directory) and --layer (1-based)")
        return cls.from_checkpoint(checkpoint, layer, device)

    def set_dtype(self, dtype: str) -> None:
        """Hold (and run) the encoder in ``dtype``; its GroupNorm/LayerNorm front end still computes in float32."""
        if dtype not in DTYPES:
            raise FeatureError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        self.model.to(DTYPES[dtype])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def read_batch(self, wavs: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Features of several utterances in one padded forward, each equal to what :meth:`read` gives it alone
        (within float rounding: 1e-5 in float32).

        Each waveform is normalised on its own (if the checkpoint says so), right-padded with zeros, and the model
        runs with the padding mask in its exact mode (:meth:`~speechprompt.models.wav2vec2.Wav2Vec2Model.
        extract_features` ``exact_padding``: a base model's GroupNorm sees each utterance's own samples, and the
        attention masks exactly the frames the utterance does not have); each row is then cut to the frame count
        of its own length. Utterances longer than :attr:`max_chunk` (read in chunks) or shorter than the receptive
        field (no frame) are read one at a time, as :meth:`read` does.
        """
        xs = [self._waveform(w) for w in wavs]
        out: list[torch.Tensor | None] = [None] * len(xs)
        batch = [i for i, x in enumerate(xs) if self.model.receptive_field <= x.numel() <= self.max_chunk]
        if len(batch) < 2:
            return [self.read(x) for x in xs]
        with torch.inference_mode():
            for i in set(range(len(xs))) - set(batch):
                out[i] = self._read(xs[i])
            rows = [normalize_waveform(xs[i].to(self.device), self.task_cfg) for i in batch]
            lengths = torch.tensor([r.numel() for r in rows], device=self.device)  # (B,)
            source = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(self.dtype)  # (B, T)
            padding = torch.arange(source.shape[1], device=self.device)[None, :] >= lengths[:, None]  # (B, T)
            feats = self.model.extract_features(source, padding, output_layer=self.layer, exact_padding=True)
            for j, i in enumerate(batch):
                frames = self.model.num_frames(int(lengths[j]))
                out[i] = feats[j, :frames].to(torch.float32, copy=True)  # (frames, D), not a view of the batch
        return out  # type: ignore[return-value]

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype  # a model held in bf16 computes in bf16; features stay fp32
        x = normalize_waveform(wav.to(self.device), self.task_cfg).view(1, -1).to(dtype)  # (1, T)
        feats = []
        for start in range(0, x.size(1), self.max_chunk):
            chunk = x[:, start : start + self.max_chunk]
            if chunk.size(1) < self.model.receptive_field:
                continue
            feats.append(self.model.extract_features(chunk, padding_mask=None, output_layer=self.layer))  # (1, F, D)
        if not feats:
            return x.new_zeros(0, self.dim, dtype=torch.float32)
        return torch.cat(feats, dim=1).squeeze(0).float()  # (frames, D)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "layer": self.layer,
            "checkpoint": self.checkpoint,
            "fingerprint": self.fingerprint,
            "normalize": bool(self.task_cfg.get("normalize", False)),
            "max_chunk": self.max_chunk,
            "architecture": getattr(self.model, "architecture", "hubert"),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


class SslFeatureReader(HubertFeatureReader):
    """The same reader under a name that does not say HuBERT: ``--features ssl`` for any supported encoder."""
