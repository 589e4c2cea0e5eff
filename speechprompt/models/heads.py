"""Output heads that come with fine-tuned encoder checkpoints: CTC letters, utterance classes.

A fine-tuned checkpoint (fairseq ``wav2vec_ctc``/``hubert_ctc``, Hugging Face ``...ForCTC``,
``...ForSequenceClassification``, ``ASTForAudioClassification``) is an encoder plus one of these; the loader returns
them apart (:class:`~speechprompt.models.encoders.LoadedEncoder`), so the encoder serves every command and tuning
method like any other, and the head still decodes out of the box.

Every head is called as ``head(final, hidden, frame_mask)``: the encoder's final features ``(B, F, D)`` (its
``extract_features()``), all its hidden states (``hidden_states()``, for a weighted layer sum) and the ``(B, F)``
frame padding mask (or ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class CTCOutput(nn.Module):
    """A linear CTC output layer over a letter vocabulary, and greedy decoding to text.

    Args:
        dim: the encoder width D.
        vocab: the output symbols, by index (fairseq: the dictionary's symbols, ``<s>`` first; HF: ``vocab.json``).
        blank: index of the CTC blank (fairseq: ``<s>``, index 0; HF: ``pad_token_id``).
        delimiter: the word boundary symbol, decoded as a space (``|`` in both).
        ignore: indices dropped from the text besides the blank (fairseq also drops ``</s>``).

    Shapes: ``(B, F, D)`` features -> ``(B, F, V)`` logits.
    """

    def __init__(self, dim: int, vocab: Sequence[str], blank: int, delimiter: str | None = "|",
                 ignore: Sequence[int] = ()) -> None:
        super().__init__()
        if not 0 <= blank < len(vocab):
            raise ValueError(f"blank index {blank} is outside the vocabulary of {len(vocab)} symbols")
        self.proj = nn.Linear(dim, len(vocab))
        self.vocab, self.blank, self.delimiter = list(vocab), blank, delimiter
        self.ignore = {blank, *ignore}

    def forward(self, final: Tensor, hidden: Sequence[Tensor] | None = None,
                frame_mask: Tensor | None = None) -> Tensor:
        return self.proj(final)  # (B, F, V)

    def decode(self, logits: Tensor, frame_mask: Tensor | None = None) -> list[str]:
        """Greedy CTC: the best symbol per real frame, repeats merged, blanks dropped, delimiters as spaces."""
        best = logits.argmax(dim=-1)  # (B, F)
        texts = []
        for i, row in enumerate(best):
            if frame_mask is not None:
                row = row[~frame_mask[i]]
            ids = torch.unique_consecutive(row).tolist()
            symbols = [" " if self.vocab[j] == self.delimiter else self.vocab[j] for j in ids if j not in self.ignore]
            texts.append("".join(symbols).strip())
        return texts


class SequenceClassifier(nn.Module):
    """HF ``...ForSequenceClassification``: ``projector`` (D -> P), mean over the real frames, ``classifier``
    (P -> C); the input is the final features, or a softmax-weighted sum of every hidden state when the checkpoint
    has ``layer_weights``.

    Shapes: ``(B, F, D)`` -> ``(B, C)`` logits.
    """

    def __init__(self, dim: int, proj_size: int, labels: Sequence[str], weighted_layers: int | None = None) -> None:
        super().__init__()
        self.labels = list(labels)
        self.layer_weights = nn.Parameter(torch.ones(weighted_layers) / weighted_layers) if weighted_layers else None
        self.projector = nn.Linear(dim, proj_size)
        self.classifier = nn.Linear(proj_size, len(self.labels))

    def forward(self, final: Tensor, hidden: Sequence[Tensor] | None = None,
                frame_mask: Tensor | None = None) -> Tensor:
        x = final
        if self.layer_weights is not None:
            if hidden is None or len(hidden) != len(self.layer_weights):
                raise ValueError(f"the weighted layer sum needs {len(self.layer_weights)} hidden states")
            w = torch.softmax(self.layer_weights, dim=-1)
            x = (torch.stack(list(hidden), dim=1) * w.view(1, -1, 1, 1)).sum(dim=1)  # (B, F, D)
        x = self.projector(x)  # (B, F, P)
        if frame_mask is None:
            pooled = x.mean(dim=1)
        else:
            real = (~frame_mask).to(x.dtype)[..., None]  # (B, F, 1)
            pooled = (x * real).sum(dim=1) / real.sum(dim=1)
        return self.classifier(pooled)  # (B, C)


class ASTClassifier(nn.Module):
    """HF ``ASTForAudioClassification``'s head: LayerNorm and Linear on the mean of the class and distillation
    tokens of the final features. Shapes: ``(B, N, D)`` -> ``(B, C)``."""

    def __init__(self, dim: int, labels: Sequence[str], eps: float = 1e-12) -> None:
        super().__init__()
        self.labels = list(labels)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, len(self.labels))

    def forward(self, final: Tensor, hidden: Sequence[Tensor] | None = None,
                frame_mask: Tensor | None = None) -> Tensor:
        pooled = (final[:, 0] + final[:, 1]) / 2  # (B, D)
        return self.dense(self.layernorm(pooled))
