"""The task protocol and how a task is built: a task type, a verbalizer and a method give one of four task kinds.

================  ======================================================================================
kind              what predicts
================  ======================================================================================
``verbalized``    the LM emits the label's unit tokens (fixed verbalizers: freq, random, map)
``learnable``     ``Linear(V, C)`` on the LM's vocabulary logits at ``<s>`` (SpeechPrompt v2)
``sequence``      the LM generates sentencepiece pieces as units (ASR, slot filling)
``linear_probe``  ``Linear(D, C)`` on the frozen LM's mean-pooled hidden states
================  ======================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from torch import Tensor, nn

from speechprompt.errors import SpeechPromptError
from speechprompt.tasks.classification import LearnableClassifier, VerbalizedClassifier
from speechprompt.tasks.data import Batch
from speechprompt.tasks.generation import SequenceTask
from speechprompt.tasks.probe import LinearProbe
from speechprompt.verbalizers import Verbalizer


class Task(Protocol):
    """What the trainer and the evaluator need of a task (see :mod:`speechprompt.tasks.classification`)."""

    head: nn.Module | None
    labels: list[str]
    decoders: tuple[str, ...]
    default_metric: str

    def loss(self, batch: Batch) -> tuple[Tensor, int]:
        """The batch's summed loss and its number of terms (trainers normalise over a whole update)."""
        ...

    def predict(self, batch: Batch) -> dict[str, list[str]]: ...

    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]:
        """:meth:`predict` and the batch's mean loss, sharing what they can (the evaluator's hot path)."""
        ...

    def metrics(self, refs: list[str], preds: dict[str, list[str]]) -> dict[str, float]: ...

    def confusion(self, refs: list[str], hyps: list[str]) -> tuple[np.ndarray, list[str]] | None: ...


Builder = Callable[[nn.Module, nn.Module, Any, list[str], dict[str, Any]], Task]

# kind -> builder(model, method, verbalizer, labels, decode options)
TASK_KINDS: dict[str, Builder] = {
    "verbalized": lambda model, method, verbalizer, labels, decode: VerbalizedClassifier(model, method, verbalizer),
    "learnable": lambda model, method, verbalizer, labels, decode: LearnableClassifier(model, method, verbalizer),
    "sequence": lambda model, method, verbalizer, labels, decode: SequenceTask(model, method, verbalizer, **decode),
    "linear_probe": lambda model, method, verbalizer, labels, decode: LinearProbe(model, method, labels),
}


def task_kind(task_type: str, verbalizer_kind: str | None, method: str) -> str:
    """The task kind (a key of :data:`TASK_KINDS`) for a task type, verbalizer kind and method name."""
    if method == "linear_probe":
        if task_type == "sequence":
            raise SpeechPromptError("the linear probe classifies; it cannot be used for a sequence task")
        return "linear_probe"
    if task_type == "sequence":
        return "sequence"
    return "learnable" if verbalizer_kind == "learnable" else "verbalized"


def build_task(
    kind: str, model: nn.Module, method: nn.Module, verbalizer: Verbalizer | None, labels: list[str],
    decode: dict[str, Any] | None = None,
) -> Task:
    """Instantiate the task of ``kind`` (a key of :data:`TASK_KINDS`)."""
    return TASK_KINDS[kind](model, method, verbalizer, labels, dict(decode or {}))
