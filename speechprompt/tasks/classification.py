"""Classification on the frozen unit LM: single-label, multi-slot, and the learnable verbalizer.

* :class:`VerbalizedClassifier` (fixed verbalizers ``freq``/``random``/``map``): every label is ``target_length``
  unit tokens that the LM learns to emit after ``<s>``. Two predictions are made from one batch:

  - ``greedy``: free decoding, argmax over the whole vocabulary for ``target_length`` steps on the KV cache (what
    SpeechPrompt reports); a token sequence that is no label decodes to ``<unk>`` and counts as wrong;
  - ``constrained``: the summed log-probability of every class's tokens, argmax over classes. The context is run
    once per batch on the KV cache and then copied to every candidate.

  Multi-slot labels (Fluent Speech Commands ``action|object|location``) are the same thing with one token per slot:
  accuracy is the fraction with every slot right, and ``slot<i>_accuracy`` reports each slot.
* :class:`LearnableClassifier` (verbalizer ``learnable``): the vocabulary logits at ``<s>``, ``(B, V)``, go through
  ``Linear(V, C)``; trained with cross-entropy on the class, predicted by ``argmax``.

Every task object has the same small interface, used by the trainer and the evaluator: ``loss(batch)``,
``predict(batch) -> {decoder: [label, ...]}``, ``predict_with_loss(batch)`` (both, sharing what they can: the
evaluator's hot path), ``metrics(refs, preds)``, ``confusion(refs, hyps)``, ``head`` (an ``nn.Module`` trained with
the method, or ``None``) and ``default_metric``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.models.generation import greedy_from_cache, split_step_kwargs
from speechprompt.models.transformer import KVCache
from speechprompt.models.unit_vocab import model_vocab
from speechprompt.tasks import metrics as M
from speechprompt.tasks.data import IGNORE, Batch, class_loss, lm_logits, lm_loss, mean_loss
from speechprompt.verbalizers import UNKNOWN_LABEL, FixedVerbalizer, LearnableVerbalizer


def classification_metrics(
    refs: Sequence[str], preds: dict[str, list[str]], labels: Sequence[str], slot_separator: str | None = None
) -> dict[str, float]:
    """``{decoder.metric: value}``: accuracy and macro-F1 (over the known classes) per decoder, and per-slot
    accuracy when labels have slots."""
    out: dict[str, float] = {}
    for decoder, hyps in preds.items():
        out[f"{decoder}.accuracy"] = M.accuracy(refs, hyps)
        out[f"{decoder}.macro_f1"] = M.macro_f1(refs, hyps, labels=list(labels))
        if slot_separator:
            ref_slots = [r.split(slot_separator) for r in refs]
            hyp_slots = [h.split(slot_separator) for h in hyps]
            for i in range(len(ref_slots[0])):
                out[f"{decoder}.slot{i}_accuracy"] = M.accuracy(
                    [r[i] for r in ref_slots], [h[i] if len(h) > i else UNKNOWN_LABEL for h in hyp_slots]
                )
    return out


def confusion(refs: Sequence[str], hyps: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Confusion matrix over ``labels`` plus ``<unk>`` for undecodable predictions (and unseen references)."""
    names = list(labels) + [UNKNOWN_LABEL]
    known = set(labels)
    refs = [r if r in known else UNKNOWN_LABEL for r in refs]
    hyps = [h if h in known else UNKNOWN_LABEL for h in hyps]
    return M.confusion_matrix(refs, hyps, names), names


class VerbalizedClassifier:
    """Single-label or multi-slot classification through a fixed verbalizer (the LM emits the label's tokens).

    Args:
        model: The frozen unit LM (with the method attached).
        method: The tuning method; its ``forward_kwargs`` are passed to every LM call.
        verbalizer: A fixed verbalizer; its ``slot_separator`` makes the task multi-slot.
    """

    decoders = ("greedy", "constrained")
    default_metric = "greedy.accuracy"

    def __init__(self, model: nn.Module, method: nn.Module, verbalizer: FixedVerbalizer) -> None:
        self.model, self.method, self.verbalizer = model, method, verbalizer
        self.head: nn.Module | None = None
        self.labels = verbalizer.labels
        self.slot_separator = verbalizer.slot_separator
        self.eos = model_vocab(model).eos

    def loss(self, batch: Batch) -> tuple[Tensor, int]:
        return lm_loss(lm_logits(self.model, self.method, batch.tokens), batch.targets)

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, list[str]]:
        return self._predict(batch, with_loss=False)[0]

    @torch.no_grad()
    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]:
        """Both predictions and :meth:`loss`, from one pass over the prefixes (see :meth:`_predict`)."""
        preds, loss = self._predict(batch, with_loss=True)
        assert loss is not None
        return preds, loss

    def _predict(self, batch: Batch, with_loss: bool) -> tuple[dict[str, list[str]], Tensor | None]:
        """The prefixes fill a KV cache once; the teacher-forced label tokens (``with_loss``), every class's
        candidate tokens and the free greedy steps all continue from it (the first two from copies), instead of each
        running the prefixes again."""
        B, dev = len(batch), batch.prefix.device
        cache, first, step_kwargs = self._prefill(batch.prefix)
        cands = self.verbalizer.candidates().to(dev)  # (C, L)
        loss = None
        if with_loss:  # y1..yL </s> after <s>, as lm_loss on batch.tokens (an unseen label has no target)
            labels = cands[batch.class_ids.clamp(min=0)]  # (B, L)
            rest = self.model(labels, cache=cache.index_select(torch.arange(B, device=dev)), **step_kwargs)
            logits = torch.cat([first[:, None], rest.float()], dim=1)  # (B, L + 1, V)
            targets = torch.cat([labels, labels.new_full((B, 1), self.eos)], dim=1)  # (B, L + 1)
            targets = targets.masked_fill(batch.class_ids.lt(0)[:, None], IGNORE)
            loss = mean_loss(lm_loss(logits, targets))
        scores = self._candidate_scores(cache, first, cands, step_kwargs)  # (B, C)
        ids = greedy_from_cache(self.model, cache, first, self.verbalizer.target_length, self.eos,
                                step_kwargs=step_kwargs)
        preds = {
            "greedy": [self.verbalizer.decode(row) for row in ids.tolist()],
            "constrained": [self.labels[i] for i in scores.argmax(dim=1).tolist()],
        }
        return preds, loss

    def _prefill(self, prefix: Tensor) -> tuple[KVCache, Tensor, dict]:
        """A KV cache holding the prefixes, their last logits ``(B, V)``, and the kwargs of calls continuing it."""
        prefill, step_kwargs = split_step_kwargs(self.method.forward_kwargs(prefix.size(0)))
        cache = KVCache()
        first = self.model(prefix, cache=cache, **prefill)[:, -1].float()  # (B, V): after <s>
        return cache, first, step_kwargs

    @torch.no_grad()
    def candidate_scores(self, prefix: Tensor) -> Tensor:
        """``(B, C)`` summed log-probabilities of every class's tokens after each (left-padded) prefix."""
        cache, first, step_kwargs = self._prefill(prefix)
        return self._candidate_scores(cache, first, self.verbalizer.candidates().to(prefix.device), step_kwargs)

    def _candidate_scores(self, cache: KVCache, first: Tensor, cands: Tensor, step_kwargs: dict) -> Tensor:
        """Scores from a cache holding the prefixes and their last logits ``first`` ``(B, V)``: the cache is copied
        to the ``C`` candidates of each row, which only feed their first ``L - 1`` tokens (the last needs no input).
        """
        B, (C, L) = first.size(0), cands.shape
        scores = F.log_softmax(first, dim=-1)[:, cands[:, 0]]  # (B, C)
        if L > 1:
            rows = torch.arange(B, device=first.device).repeat_interleave(C)  # (B*C,): row b for each candidate
            inputs = cands[:, :-1].repeat(B, 1)  # (B*C, L-1)
            out = self.model(inputs, cache=cache.index_select(rows), **step_kwargs)
            logp = F.log_softmax(out.float(), dim=-1)  # (B*C, L-1, V)
            rest = logp.gather(-1, cands[:, 1:].repeat(B, 1)[..., None]).squeeze(-1)  # (B*C, L-1)
            scores = scores + rest.sum(dim=1).view(B, C)
        return scores

    def metrics(self, refs: Sequence[str], preds: dict[str, list[str]]) -> dict[str, float]:
        return classification_metrics(refs, preds, self.labels, self.slot_separator)

    def confusion(self, refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        return confusion(refs, hyps, self.labels)


class LearnableClassifier:
    """SpeechPrompt v2: class logits from the LM's vocabulary logits at ``<s>`` through ``Linear(V, C)``.

    Args:
        model: The frozen unit LM (with the method attached).
        method: The tuning method.
        verbalizer: The learnable verbalizer; it is the trainable ``head``.
    """

    decoders = ("argmax",)
    default_metric = "argmax.accuracy"

    def __init__(self, model: nn.Module, method: nn.Module, verbalizer: LearnableVerbalizer) -> None:
        self.model, self.method, self.verbalizer = model, method, verbalizer
        self.head: nn.Module | None = verbalizer
        self.labels = verbalizer.labels
        self.slot_separator = None

    def class_logits(self, batch: Batch) -> Tensor:
        """``(B, C)`` class logits from the vocabulary logits at the ``<s>`` position (the last prefix column)."""
        vocab = lm_logits(self.model, self.method, batch.prefix)[:, -1]  # (B, V)
        return self.verbalizer(vocab.float())  # (B, C)

    def loss(self, batch: Batch) -> tuple[Tensor, int]:
        return class_loss(self.class_logits(batch), batch.class_ids)

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, list[str]]:
        return self.predict_with_loss(batch)[0]

    @torch.no_grad()
    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]:
        logits = self.class_logits(batch)
        loss = mean_loss(class_loss(logits, batch.class_ids))
        return {"argmax": [self.labels[i] for i in logits.argmax(dim=1).tolist()]}, loss

    def metrics(self, refs: Sequence[str], preds: dict[str, list[str]]) -> dict[str, float]:
        return classification_metrics(refs, preds, self.labels)

    def confusion(self, refs: Sequence[str], hyps: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        return confusion(refs, hyps, self.labels)
