"""The linear probe on the frozen unit LM: ``Linear(D, C)`` on its final hidden states, mean-pooled over the units.

Its method is :class:`speechprompt.tuning.baselines.FrozenBackbone` (nothing attached, nothing in the LM trains);
this head is what trains. Trained with cross-entropy; predicted by ``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from speechprompt.tasks.classification import classification_metrics, confusion
from speechprompt.tasks.data import Batch, class_loss, mean_loss


class LinearProbe:
    """Classification by ``Linear(D, C)`` on the final LM hidden states, mean-pooled over the unit input (``D`` is
    their width: the layers', or the output width of a ``project_out``).

    Args:
        model: The frozen unit LM.
        method: :class:`~speechprompt.tuning.baselines.FrozenBackbone` (or any method whose forward arguments
            should apply).
        labels: The classes, in class-index order.
    """

    decoders = ("argmax",)
    default_metric = "argmax.accuracy"
    slot_separator = None
    verbalizer = None

    def __init__(self, model: nn.Module, method: nn.Module, labels: Sequence[str]) -> None:
        self.model, self.method, self.labels = model, method, list(labels)
        dim = model.decoder.output_projection.in_features  # the hidden states' width (after any project_out)
        self.head: nn.Module = nn.Linear(dim, len(self.labels))
        self._index = {label: i for i, label in enumerate(self.labels)}

    def class_logits(self, batch: Batch) -> Tensor:
        units = batch.prefix[:, :-1]  # (B, N): left-padded u1..uN, without the final <s>
        real = units.ne(self.model.padding_idx)  # (B, N)
        out = self.model(units, return_hidden=True, **self.method.forward_kwargs(units.size(0)))
        hidden = out.hidden.float() * real[..., None]  # (B, N, D), zero at pads
        pooled = hidden.sum(1) / real.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return self.head(pooled)  # (B, C)

    def loss(self, batch: Batch) -> tuple[Tensor, int]:
        return class_loss(self.class_logits(batch), self._targets(batch))

    def _targets(self, batch: Batch) -> Tensor:
        return torch.tensor([self._index.get(label, -1) for label in batch.labels], device=batch.prefix.device)

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, list[str]]:
        return self.predict_with_loss(batch)[0]

    @torch.no_grad()
    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]:
        logits = self.class_logits(batch)
        loss = mean_loss(class_loss(logits, self._targets(batch)))
        return {"argmax": [self.labels[i] for i in logits.argmax(dim=1).tolist()]}, loss

    def metrics(self, refs: Sequence[str], preds: dict[str, list[str]]) -> dict[str, float]:
        return classification_metrics(refs, preds, self.labels)

    def confusion(self, refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        return confusion(refs, hyps, self.labels)
