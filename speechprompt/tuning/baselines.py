"""Baselines on the same frozen backbone, trained by the same trainers: full fine-tuning and the frozen backbone.

Both are registered with the tuning methods (:mod:`speechprompt.tuning`), so ``method.name=full_finetune`` or
``method.name=linear_probe`` go through the same loop, checkpoint format and reports (trainable parameters,
checkpoint bytes, peak memory, step time) as the parameter-efficient methods:

* ``full_finetune`` (:class:`FullFinetune`): every parameter of the backbone trains. Its parameters are registered
  in the method under their backbone names, so the task checkpoint is the whole model (it is what was trained) and
  reads like the backbone's own state dict.
* ``linear_probe`` (:class:`FrozenBackbone`): the backbone stays frozen and nothing is attached to it; only the
  task's head trains (the unit LM's probe is :class:`speechprompt.tasks.probe.LinearProbe`; SUPERB's is its
  weighted layer sum and head).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from speechprompt.config import option
from speechprompt.tuning.base import TuningError, TuningMethod


@dataclass
class FullFinetuneConfig:
    """Full fine-tuning: every parameter of the backbone trains, except the modules named in ``frozen``."""

    frozen: list[str] = option([], help="module paths of the backbone that stay frozen, e.g. [feature_extractor] "
                               "for fairseq's CTC fine-tuning (its conv front end never trains)")


class FullFinetune(TuningMethod):
    """Owns every parameter of the backbone, under its backbone name (tied weights once), but those of the
    ``frozen`` modules."""

    def __init__(self, config: FullFinetuneConfig, model: nn.Module) -> None:
        super().__init__(config)
        skip: set[int] = set()
        for path in config.frozen:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise TuningError(f"full_finetune: frozen module {path!r} is not in {type(model).__name__}") from None
            skip.update(id(p) for p in module.parameters())
        for name, param in model.named_parameters():
            if id(param) not in skip:
                self._own(name, param)


@dataclass
class LinearProbeConfig:
    """Linear probe: the backbone is frozen and untouched; only the task head trains (no options)."""


class FrozenBackbone(TuningMethod):
    """Trains nothing in the backbone (the linear probe's method)."""

    def __init__(self, config: LinearProbeConfig, model: nn.Module) -> None:
        super().__init__(config)
