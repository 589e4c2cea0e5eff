"""The configuration of ``speechprompt pretrain-hubert``: the named architectures and :class:`PretrainHubertConfig`
(every key with its help text, as ``--help`` prints it). The trainer is :mod:`speechprompt.pretrain_hubert`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from speechprompt.config import ConfigError, from_dict, option, to_dict
from speechprompt.models.hubert import HubertConfig
from speechprompt.models.hubert_pretraining import min_maskable_frames
from speechprompt.models.wav2vec2 import FrontEnd
from speechprompt.training.config import PretrainOptions

# Named architectures: HubertConfig fields, and the recipe values that go with them in fairseq's configs.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # 2 layers of width 32: for tests.
    "tiny": {"model": dict(conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", encoder_layers=2,
                           encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=16,
                           conv_pos_groups=4, final_dim=16, untie_final_proj=True),
             "layerdrop": 0.0, "normalize": False},
    # 4 layers of width 128 (0.9M parameters in the transformer): pretrains on an hour of speech on one CPU thread.
    "small": {"model": dict(conv_feature_layers="[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2",
                            encoder_layers=4, encoder_embed_dim=128, encoder_ffn_embed_dim=512,
                            encoder_attention_heads=4, conv_pos=32, conv_pos_groups=8, final_dim=64,
                            untie_final_proj=True),
              "layerdrop": 0.0, "normalize": False},
    # fairseq's hubert_base_librispeech.yaml (95M parameters).
    "base": {"model": to_dict(HubertConfig.base()), "layerdrop": 0.05, "normalize": False},
    # fairseq's hubert_large_librivox.yaml (316M parameters): LayerNorm conv stack on normalised audio.
    "large": {"model": to_dict(HubertConfig.large()), "layerdrop": 0.0, "normalize": True},
}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclasses.dataclass(kw_only=True)
class PretrainHubertConfig(
    PretrainOptions, max_steps=400000, lr=5e-4, warmup_steps=32000, schedule="polynomial_decay", adam_eps=1e-6,
    clip_norm=10.0, eval_every=10000, save_every=10000,
    weight_decay=option(0.01, help="decoupled (AdamW) weight decay, on every parameter as fairseq"),
    num_workers=option(0, help="DataLoader worker processes reading and cropping audio"),
):
    """Everything ``speechprompt pretrain-hubert`` reads; see ``--help`` for each key."""

    train: str = option("", help="training manifest (root line, then relpath<TAB>num_samples at 16 kHz)")
    train_labels: str | list[str] = option(
        [], help="frame-label file(s) of the training manifest, one per label set: one line of units per row "
        "(`speechprompt prepare` without --dedup)")
    dev: str = option("", help="dev manifest, for the dev loss and checkpoint_best.pt")
    dev_labels: str | list[str] = option([], help="frame-label file(s) of the dev manifest, as train_labels")
    n_units: int | list[int] = option(100, help="clusters of each label set (unit u is class u+4 of dict.<label>.txt)")
    label_rate: float = option(100.0, help="label frames per second: 100 for MFCC units (iteration 1), 50 for "
                               "HuBERT units (iteration 2)")
    normalize: bool | None = option(None, help="layer-normalise each waveform (fairseq's task.normalize; null: the "
                                    "architecture's, true for large)")
    max_sample_size: int = option(250000, help="crop utterances to at most this many samples")
    min_sample_size: int = option(32000, help="skip utterances shorter than this (samples); a batch is cropped to "
                                  "its shortest utterance")
    model: str = option("base", help=f"architecture: {', '.join(ARCHITECTURES)}")
    frontend: str = option("conv", help="conv: the waveform conv stack (a fairseq architecture); fbank: stacked "
                           "log-mel frames instead (MelHuBERT's light front end; loads in speechprompt only)")
    model_overrides: dict[str, Any] = option(
        {}, help="HubertConfig fields over the architecture's, e.g. model_overrides.encoder_layers=6")
    layerdrop: float | None = option(None, help="probability of skipping a transformer layer in training (null: the "
                                     "architecture's, 0.05 for base)")
    mask_prob: float = option(0.8, help="span starts per frame, times mask_length (HuBERT: 0.8)")
    mask_length: int = option(10, help="frames per masked span (HuBERT: 10)")
    logit_temp: float = option(0.1, help="cosine similarities are divided by this")
    pred_masked_weight: float = option(1.0, help="weight of the loss on masked frames")
    pred_nomask_weight: float = option(0.0, help="weight of the loss on unmasked frames")
    features_pen_weight: float = option(10.0, help="weight of the mean squared conv output (fairseq's "
                                        "loss_weights: [10]); nothing to penalise with the fbank front end")
    skip_nomask: bool = option(False, help="do not compute unmasked frames' logits (then acc_u is not logged)")
    batch_size: int = option(8, help="utterances per micro-batch and process (an update takes batch_size x "
                             "grad_accum x processes)")
    seed: int = option(1337, help="seeds model init, dropout, the batch order, crops and masks")
    run_dir: str = option("exp/pretrain_hubert", help="output directory (a moved run directory resumes where it is)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train_labels = [str(p) for p in _as_list(self.train_labels)]
        self.dev_labels = [str(p) for p in _as_list(self.dev_labels)]
        self.n_units = [int(k) for k in _as_list(self.n_units)]
        if not self.train or not self.train_labels:
            raise ConfigError("train and train_labels: give the training manifest and its label file(s)")
        if not self.dev or not self.dev_labels:
            raise ConfigError("dev and dev_labels: give the dev manifest and its label file(s)")
        if not len(self.train_labels) == len(self.dev_labels) == len(self.n_units):
            raise ConfigError(f"train_labels ({len(self.train_labels)}), dev_labels ({len(self.dev_labels)}) and "
                              f"n_units ({len(self.n_units)}) must name the same label sets")
        if min(self.n_units) < 1 or self.label_rate <= 0:
            raise ConfigError("n_units and label_rate must be positive")
        for name in ("batch_size", "mask_length", "max_sample_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("min_sample_size", "pred_masked_weight", "pred_nomask_weight", "features_pen_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.model not in ARCHITECTURES:
            raise ConfigError(f"model {self.model!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.frontend not in {m.value for m in FrontEnd}:
            raise ConfigError(f"frontend {self.frontend!r} is not one of {[m.value for m in FrontEnd]}")
        if not 0 < self.mask_prob < 1 or self.logit_temp <= 0:
            raise ConfigError("mask_prob must be in (0, 1) and logit_temp positive")
        if self.layerdrop is not None and not 0 <= self.layerdrop < 1:
            raise ConfigError(f"layerdrop must be in [0, 1), got {self.layerdrop}")
        if self.pred_masked_weight == 0 and self.pred_nomask_weight == 0:
            raise ConfigError("pred_masked_weight and pred_nomask_weight are both 0: nothing to learn")
        if self.pred_nomask_weight > 0 and self.skip_nomask:
            raise ConfigError("pred_nomask_weight > 0 needs the unmasked frames' logits: set skip_nomask=false")
        if self.max_sample_size < self.min_sample_size:
            raise ConfigError(f"max_sample_size {self.max_sample_size} < min_sample_size {self.min_sample_size}")
        cfg = self.model_config()
        # A crop of min_sample_size must leave frames that cannot all be masked (fairseq fails there mid-run).
        need = min_maskable_frames(self.mask_prob, self.mask_length)
        have = cfg.num_frames(self.min_sample_size) - 1  # one frame may go to label trimming
        if have < need:
            raise ConfigError(f"min_sample_size={self.min_sample_size} gives {have} frames, but spans of "
                              f"mask_length={self.mask_length} at mask_prob={self.mask_prob} need at least {need}: "
                              f"raise min_sample_size to {math.ceil((need + 2) * 16000 / cfg.num_frames(16000))}")

    def model_config(self) -> HubertConfig:
        """The architecture: the named one, the front end, then ``model_overrides``."""
        fields = {**ARCHITECTURES[self.model]["model"], "frontend": self.frontend, **self.model_overrides}
        return from_dict(HubertConfig, fields, "model_overrides")

    @property
    def encoder_layerdrop(self) -> float:
        return ARCHITECTURES[self.model]["layerdrop"] if self.layerdrop is None else self.layerdrop

    @property
    def task_normalize(self) -> bool:
        return ARCHITECTURES[self.model]["normalize"] if self.normalize is None else self.normalize

    def label_names(self) -> list[str]:
        """A name per label set for ``task.labels`` and ``dict.<name>.txt``: the label file's suffix (``km``,
        ``units``), numbered when two sets share one."""
        names = []
        for path in self.train_labels:
            name = Path(path).suffix.lstrip(".") or "km"
            names.append(name if name not in names else f"{name}{len(names)}")
        return names
