"""Baselines on the same frozen backbone, trained by the same trainer: full fine-tuning and a linear probe.

Importing this module registers both as methods of :mod:`speechprompt.tuning` (an ``nn.Module`` that owns exactly
what trains), so ``speechprompt train method.name=full_finetune`` or ``method.name=linear_probe`` go through the
same loop, checkpoint format and reports (trainable parameters, checkpoint bytes, peak memory, step time) as
prompt tuning:

* ``full_finetune``: every parameter of the unit LM trains, on the same LM-formatted data and verbalizer as the
  prompt methods. Its parameters are registered in the method under their backbone names, so the task checkpoint
  is the whole LM (it is what was trained) and reads like a fairseq state dict.
* ``linear_probe``: the LM stays frozen and nothing is attached to it; the task head
  (:class:`LinearProbe`) mean-pools the final hidden states over the unit input ``u1 ... uN`` and applies
  ``Linear(D, C)``. Trained with cross-entropy; predicted by ``argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.tasks.classification import classification_metrics, confusion
from speechprompt.tasks.data import Batch
from speechprompt.tuning import TuningMethod, register_method


@dataclass
class FullFinetuneConfig:
    """Full fine-tuning of the unit LM: every parameter trains (no options)."""


class FullFinetune(TuningMethod):
    """Owns every parameter of the backbone, under its backbone name (tied weights once)."""

    def __init__(self, config: FullFinetuneConfig, model: nn.Module) -> None:
        super().__init__(config)
        for name, param in model.named_parameters():
            self._own(name, param)


@dataclass
class LinearProbeConfig:
    """Linear probe: the backbone is frozen and untouched; the head is Linear(D, C) on mean-pooled hidden states
    (no options)."""


class FrozenBackbone(TuningMethod):
    """Trains nothing in the backbone (the linear probe's method)."""

    def __init__(self, config: LinearProbeConfig, model: nn.Module) -> None:
        super().__init__(config)


# Registered with the tuning methods, so that configs, build_method and checkpoint sidecars treat them alike.
register_method("full_finetune", FullFinetuneConfig, FullFinetune, baseline=True)
register_method("linear_probe", LinearProbeConfig, FrozenBackbone, baseline=True)


class LinearProbe:
    """Classification by ``Linear(D, C)`` on the final LM hidden states, mean-pooled over the unit input.

    Args:
        model: The frozen unit LM.
        method: :class:`FrozenBackbone` (or any method whose forward arguments should apply).
        labels: The classes, in class-index order.
    """

    decoders = ("argmax",)
    default_metric = "argmax.accuracy"
    slot_separator = None
    verbalizer = None

    def __init__(self, model: nn.Module, method: nn.Module, labels: Sequence[str]) -> None:
        self.model, self.method, self.labels = model, method, list(labels)
        dim = model.cfg.embed_dim
        self.head: nn.Module = nn.Linear(dim, len(self.labels))
        self._index = {label: i for i, label in enumerate(self.labels)}

    def class_logits(self, batch: Batch) -> Tensor:
        units = batch.prefix[:, :-1]  # (B, N): left-padded u1..uN, without the final <s>
        real = units.ne(self.model.padding_idx)  # (B, N)
        out = self.model(units, return_hidden=True, **self.method.forward_kwargs(units.size(0)))
        hidden = out.hidden.float() * real[..., None]  # (B, N, D), zero at pads
        pooled = hidden.sum(1) / real.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return self.head(pooled)  # (B, C)

    def loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self.class_logits(batch), self._targets(batch), ignore_index=-1)

    def _targets(self, batch: Batch) -> Tensor:
        return torch.tensor([self._index.get(label, -1) for label in batch.labels], device=batch.prefix.device)

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, list[str]]:
        return self.predict_with_loss(batch)[0]

    @torch.no_grad()
    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]:
        logits = self.class_logits(batch)
        loss = F.cross_entropy(logits, self._targets(batch), ignore_index=-1)
        return {"argmax": [self.labels[i] for i in logits.argmax(dim=1).tolist()]}, loss

    def metrics(self, refs: Sequence[str], preds: dict[str, list[str]]) -> dict[str, float]:
        return classification_metrics(refs, preds, self.labels)

    def confusion(self, refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        return confusion(refs, hyps, self.labels)
