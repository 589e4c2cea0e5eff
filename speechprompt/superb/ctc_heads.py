"""Character CTC heads: SUPERB ASR (s3prl's BiLSTM), a linear probe, and fairseq's CTC fine-tuning projection.

================  ==============  ========================================================================
head              features        what
================  ==============  ========================================================================
``ctc``           weighted sum    ``Linear(D, V)`` per frame (the toolkit's linear probe for ASR)
``bilstm_ctc``    weighted sum    s3prl's ASR head: ``Linear(D, 1024)``, two BiLSTM layers of 1024 units
                                  per direction with dropout 0.2, ``Linear(2048, V)``; SpecAugment on the
                                  features while training (SUPERB ASR)
``encoder_ctc``   final output    fairseq ``wav2vec_ctc``: ``Linear(D, V)`` on the encoder's last layer, the
                                  loss summed per utterance (``sentence_avg``); for CTC fine-tuning of the
                                  encoder itself and S3-Router's protocol
================  ==============  ========================================================================

``V`` is the characters plus the blank (:class:`~speechprompt.tasks.ctc.CharVocabulary`): those of the training
transcripts, or a fixed set given as ``characters`` (a 10-minute training set may lack a letter the test set has;
fairseq's ``dict.ltr.txt`` is ``characters="ABCDEFGHIJKLMNOPQRSTUVWXYZ' "``). Decoding is greedy; WER and CER are
corpus-level, as s3prl and fairseq compute them (no language model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.superb.head_registry import Features, register_head
from speechprompt.tasks.ctc import WORD_BOUNDARY, CharVocabulary, ctc_loss, greedy_decode, normalize_text
from speechprompt.tasks.metrics import cer, wer


def _vocabulary(labels: Sequence[str], characters: str | None) -> CharVocabulary:
    """The given characters (a space is the word boundary), else those of the training transcripts."""
    if characters:
        return CharVocabulary(sorted({WORD_BOUNDARY if c == " " else c for c in characters}))
    return CharVocabulary.from_texts(labels)


class _CharDecoding:
    """Greedy CTC decoding and WER/CER: what every CTC head shares (composition, not a base class)."""

    def __init__(self, vocab: CharVocabulary) -> None:
        self.vocab = vocab

    def decode(self, log_probs: Tensor, frame_mask: Tensor) -> list[str]:
        paths = greedy_decode(log_probs, (~frame_mask).sum(1), blank=self.vocab.blank)
        return [self.vocab.decode(p) for p in paths]

    @staticmethod
    def metrics(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        refs = [normalize_text(r) for r in refs]
        return {"wer": wer(refs, hyps), "cer": cer(refs, hyps)}


@dataclass
class CTCOptions:
    """A linear CTC head."""

    characters: str | None = option(None, help="the output characters, a space for the word boundary (null: those "
                                    "of the training transcripts)")


@register_head("ctc", CTCOptions, summary="Linear(D, characters + blank) per frame, greedy CTC; WER/CER")
class CTCHead(nn.Module):
    """Character recognition: ``Linear(D, V)`` per frame, CTC loss (each utterance's divided by its target length,
    as torch's and s3prl's ``CTCLoss``), greedy decoding.

    Args:
        dim: feature size ``D``.
        vocab: the characters (``V = len(vocab)``, blank included).

    Shapes: features ``(B, F, D)`` and frame padding mask ``(B, F)`` in; log-probabilities ``(B, F, V)`` out.
    """

    default_metric = "wer"
    higher_is_better = False
    decoder = "greedy"
    labels = None

    def __init__(self, dim: int, vocab: CharVocabulary) -> None:
        super().__init__()
        self.vocab = vocab
        self._decoding = _CharDecoding(vocab)
        self.proj = nn.Linear(dim, len(vocab))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str], options: CTCOptions | None = None) -> CTCHead:
        return cls(dim, _vocabulary(labels, options.characters if options else None))

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any], options: CTCOptions | None = None) -> CTCHead:
        return cls(dim, CharVocabulary.from_dict(meta["vocabulary"]))

    def describe(self) -> dict[str, Any]:
        return {"vocabulary": self.vocab.to_dict()}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        return F.log_softmax(self.proj(features), dim=-1)  # (B, F, V)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """Summed CTC loss (each utterance's over its target length) and the number of utterances."""
        return ctc_loss(output, (~frame_mask).sum(1), [self.vocab.encode(r) for r in refs], blank=self.vocab.blank)

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        return self._decoding.decode(output, frame_mask)

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        return self._decoding.metrics(refs, hyps)


# -- SUPERB ASR ---------------------------------------------------------------------------------------------------


def spec_augment(x: Tensor, frame_mask: Tensor, time_masks: int, time_width: int, freq_masks: int,
                 freq_width: int) -> Tensor:
    """SpecAugment's masks on features: ``time_masks`` spans of 0..``time_width`` valid frames and ``freq_masks``
    bands of 0..``freq_width`` feature dimensions per utterance, set to zero (widths and positions uniform, drawn
    from torch's global RNG so that a seeded or resumed run draws the same ones).

    Args:
        x: ``(B, F, D)`` features.
        frame_mask: ``(B, F)``, True at padding (masks stay within each utterance's valid frames).

    Returns:
        The masked features ``(B, F, D)`` (a new tensor).
    """
    B, frames, D = x.shape
    keep = torch.ones(B, frames, D, dtype=torch.bool, device=x.device)
    lengths = (~frame_mask).sum(1).tolist()
    for b, n in enumerate(lengths):
        for _ in range(time_masks):
            width = int(torch.randint(0, min(time_width, n) + 1, ()))
            start = int(torch.randint(0, n - width + 1, ()))
            keep[b, start:start + width] = False
        for _ in range(freq_masks):
            width = int(torch.randint(0, min(freq_width, D) + 1, ()))
            start = int(torch.randint(0, D - width + 1, ()))
            keep[b, :, start:start + width] = False
    return x * keep.to(x.dtype)


@dataclass
class BiLSTMCTCOptions:
    """s3prl's ASR ``RNNs`` head and its SpecAugment (``downstream/asr/config.yaml``)."""

    project_dim: int = option(1024, help="width of the projector Linear(D, P) before the LSTMs (s3prl: 1024)")
    hidden: list[int] = option([1024, 1024], help="units per direction of each BiLSTM layer (s3prl: [1024, 1024])")
    dropout: float = option(0.2, help="dropout after each LSTM layer (s3prl: 0.2)")
    bidirectional: bool = option(True, help="bidirectional LSTMs")
    characters: str | None = option(None, help="the output characters, a space for the word boundary (null: those "
                                    "of the training transcripts)")
    time_masks: int = option(2, help="SpecAugment while training: time masks per utterance (s3prl: 2; 0: none)")
    time_mask_width: int = option(40, help="SpecAugment: largest time mask, in frames (s3prl: 40)")
    freq_masks: int = option(4, help="SpecAugment: feature-dimension masks per utterance (s3prl: 4; 0: none)")
    freq_mask_width: int = option(50, help="SpecAugment: largest feature mask, in dimensions (s3prl: 50)")

    def __post_init__(self) -> None:
        if self.project_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ConfigError("project_dim and every hidden size must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if min(self.time_masks, self.time_mask_width, self.freq_masks, self.freq_mask_width) < 0:
            raise ConfigError("SpecAugment counts and widths must be >= 0")


@register_head("bilstm_ctc", BiLSTMCTCOptions,
               summary="s3prl ASR: Linear(D, 1024), 2 x BiLSTM(1024), Linear(2048, V), CTC; SpecAugment; WER/CER")
class BiLSTMCTCHead(nn.Module):
    """SUPERB's ASR downstream: a projector, stacked (Bi)LSTMs over the valid frames, a linear CTC output layer.

    As s3prl's ``RNNs`` with its defaults (no downsampling, no per-layer LayerNorm or projection): each LSTM reads
    packed sequences, so padding never reaches a valid frame, and dropout follows every layer. While training, the
    features are SpecAugmented first (time and feature masks; s3prl's time warping is not done).

    Args:
        dim: feature size ``D``.
        vocab: the characters.
        options: the sizes, dropout and SpecAugment settings.

    Shapes: features ``(B, F, D)`` and frame padding mask ``(B, F)`` in; log-probabilities ``(B, F, V)`` out.
    """

    default_metric = "wer"
    higher_is_better = False
    decoder = "greedy"
    labels = None

    def __init__(self, dim: int, vocab: CharVocabulary, options: BiLSTMCTCOptions) -> None:
        super().__init__()
        self.vocab, self.options = vocab, options
        self._decoding = _CharDecoding(vocab)
        self.projector = nn.Linear(dim, options.project_dim)
        directions = 2 if options.bidirectional else 1
        sizes = [options.project_dim] + [h * directions for h in options.hidden]
        self.rnns = nn.ModuleList(
            nn.LSTM(sizes[i], h, batch_first=True, bidirectional=options.bidirectional)
            for i, h in enumerate(options.hidden)
        )
        self.dropout = nn.Dropout(options.dropout)
        self.proj = nn.Linear(sizes[-1], len(vocab))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str], options: BiLSTMCTCOptions) -> BiLSTMCTCHead:
        return cls(dim, _vocabulary(labels, options.characters), options)

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any], options: BiLSTMCTCOptions) -> BiLSTMCTCHead:
        return cls(dim, CharVocabulary.from_dict(meta["vocabulary"]), options)

    def describe(self) -> dict[str, Any]:
        return {"vocabulary": self.vocab.to_dict()}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        o = self.options
        if self.training and (o.time_masks or o.freq_masks):
            features = spec_augment(features, frame_mask, o.time_masks, o.time_mask_width, o.freq_masks,
                                    o.freq_mask_width)
        x = self.projector(features)  # (B, F, P)
        frames = x.shape[1]
        lengths = (~frame_mask).sum(1).clamp(min=1).cpu()  # (B,); packing needs at least one frame
        for rnn in self.rnns:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = rnn(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=frames)  # (B, F, H)
            x = self.dropout(x)
        return F.log_softmax(self.proj(x), dim=-1)  # (B, F, V)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """Summed CTC loss (each utterance's over its target length, s3prl's ``CTCLoss``) and the utterances."""
        return ctc_loss(output, (~frame_mask).sum(1), [self.vocab.encode(r) for r in refs], blank=self.vocab.blank)

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        return self._decoding.decode(output, frame_mask)

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        return self._decoding.metrics(refs, hyps)


# -- CTC fine-tuning of the encoder ----------------------------------------------------------------------------------


@dataclass
class EncoderCTCOptions:
    """fairseq ``wav2vec_ctc``'s output layer."""

    dropout: float = option(0.0, help="dropout on the encoder output before the projection (fairseq final_dropout)")
    characters: str | None = option(None, help="the output characters, a space for the word boundary (null: those "
                                    "of the training transcripts; fairseq's letters: \"ABCDEFGHIJKLMNOPQRSTUVWXYZ' \")")

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


@register_head("encoder_ctc", EncoderCTCOptions, features=Features.FINAL,
               summary="fairseq wav2vec_ctc: Linear(D, V) on the encoder output, CTC summed per utterance; WER/CER")
class EncoderCTCHead(nn.Module):
    """fairseq's CTC fine-tuning head: ``Linear(D, V)`` on the encoder's final output.

    The loss is each utterance's CTC loss, summed (fairseq's ``ctc`` criterion with ``sentence_avg``: an update is
    normalised by the number of utterances, not by their lengths), with ``zero_infinity``.

    Shapes: final features ``(B, F, D)`` and frame padding mask ``(B, F)`` in; log-probabilities ``(B, F, V)`` out.
    """

    default_metric = "wer"
    higher_is_better = False
    decoder = "greedy"
    labels = None

    def __init__(self, dim: int, vocab: CharVocabulary, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab = vocab
        self._decoding = _CharDecoding(vocab)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, len(vocab))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str], options: EncoderCTCOptions) -> EncoderCTCHead:
        return cls(dim, _vocabulary(labels, options.characters), options.dropout)

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any], options: EncoderCTCOptions) -> EncoderCTCHead:
        return cls(dim, CharVocabulary.from_dict(meta["vocabulary"]), options.dropout)

    def describe(self) -> dict[str, Any]:
        return {"vocabulary": self.vocab.to_dict()}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        return F.log_softmax(self.proj(self.dropout(features)), dim=-1)  # (B, F, V)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """The CTC losses of the utterances, summed without length normalisation, and their number."""
        targets = [self.vocab.encode(r) for r in refs]
        lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        flat = torch.tensor([i for t in targets for i in t], dtype=torch.long, device=output.device)
        total = F.ctc_loss(output.transpose(0, 1).float(), flat, (~frame_mask).sum(1).long(), lengths,
                           blank=self.vocab.blank, reduction="sum", zero_infinity=True)  # (frames, B, V) in
        return total, len(refs)

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        return self._decoding.decode(output, frame_mask)

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        return self._decoding.metrics(refs, hyps)
