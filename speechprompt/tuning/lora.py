"""LoRA (Hu et al., 2021): a trainable low-rank update ``(alpha / r) * B A`` beside chosen frozen linears.

Injection is a forward hook on each target ``nn.Linear``, not a wrapper: the linear keeps its class and its
``weight``/``bias`` names (so the base model's fingerprint and any ``isinstance`` check are unaffected), and gains a
child ``lora`` holding ``A`` ``(r, in)`` and ``B`` ``(out, r)``. The hook adds ``scaling * dropout(x) A^T B^T`` to
the linear's output. ``B`` starts at zero, so at step 0 the model equals the frozen one exactly.

:meth:`Lora.merge` folds ``scaling * B A`` into the frozen weights for zero-overhead inference (the hooks then
pass outputs through unchanged); :meth:`Lora.unmerge` subtracts it again. Both are float arithmetic: unmerged
weights equal the originals to rounding, not bit for bit, so fingerprint the base model before merging.

The efficient-tuning study on HuBERT-base uses r=8 on q and k (0.29M parameters); Hu et al. use q and v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from speechprompt.config import ConfigError, option
from speechprompt.tuning.base import (
    LinearName,
    TuningError,
    TuningMethod,
    as_enum,
    backbone_device,
    target_linears,
)


@dataclass
class LoraConfig:
    """Low-rank adaptation of chosen linear projections."""

    rank: int = option(8, help="rank r of the update B A")
    alpha: float = option(8.0, help="the update is scaled by alpha / rank")
    dropout: float = option(0.0, help="dropout on the LoRA branch's input (training mode only)")
    targets: list[LinearName] = option(
        [LinearName.Q, LinearName.V], help="linears to adapt: q_proj, k_proj, v_proj, out_proj, fc1, fc2 "
        "(on SwiGLU layers fc1 = gate_proj + up_proj, fc2 = down_proj), gate_proj, up_proj, down_proj; o_proj "
        "means out_proj"
    )
    layers: list[int] | None = option(None, help="layer indices to adapt (negative counts from the top); null = all")

    def __post_init__(self) -> None:
        self.targets = [as_enum(LinearName, t, "targets") for t in self.targets]
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoRA targets must be a non-empty list without repeats, got {self.targets}")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoraDelta(nn.Module):
    """The low-rank branch of one linear: ``(..., in) -> (..., out)``, ``scaling * dropout(x) A^T B^T``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's init, as PEFT
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        return (self.dropout(x) @ self.A.T @ self.B.T) * self.scaling  # (..., out)

    def delta_weight(self) -> Tensor:
        """``(out, in)``: what merging adds to the frozen weight."""
        return (self.B @ self.A) * self.scaling


def _lora_hook(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook of a LoRA-adapted linear: add the low-rank branch unless it is merged into the weight."""
    lora: LoraDelta = module.lora
    if lora.merged:
        return output
    return output + lora(args[0].to(lora.A.dtype)).to(output.dtype)


class Lora(TuningMethod):
    """A :class:`LoraDelta` per target linear, registered as ``<linear path>.lora`` in model and method alike."""

    config: LoraConfig

    def __init__(self, config: LoraConfig, model: nn.Module) -> None:
        super().__init__(config)
        self._targets: list[str] = []  # backbone paths of the adapted linears
        self._linears: list[nn.Linear] = []  # the hooked linears while attached (a plain list: not submodules)
        for path, linear in target_linears(model, config.layers, config.targets, "LoRA"):
            delta = LoraDelta(linear.in_features, linear.out_features, config.rank, config.alpha, config.dropout)
            self._own(f"{path}.lora", delta)
            self._targets.append(path)
        self.to(backbone_device(model))

    def _deltas(self) -> list[LoraDelta]:
        return [self.get_submodule(f"{path}.lora") for path in self._targets]

    def _inject(self, model: nn.Module) -> None:
        for path, delta in zip(self._targets, self._deltas()):
            try:
                linear = model.get_submodule(path)
            except AttributeError:
                raise TuningError(f"the model has no linear {path!r} for LoRA") from None
            if not isinstance(linear, nn.Linear) or hasattr(linear, "lora"):
                raise TuningError(f"{path} is not a plain nn.Linear (is another method attached?)")
            if (linear.out_features, linear.in_features) != (delta.B.shape[0], delta.A.shape[1]):
                raise TuningError(f"LoRA for {path} has shape {tuple(delta.delta_weight().shape)}, the linear "
                                  f"{tuple(linear.weight.shape)}")
            linear.lora = delta
            handle = linear.register_forward_hook(_lora_hook)
            self._linears.append(linear)

            def undo(linear: nn.Linear = linear, handle: RemovableHandle = handle) -> None:
                handle.remove()
                self._unmerge_one(linear)
                del linear.lora
                self._linears.remove(linear)

            self._on_detach(undo)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * B A`` into each frozen weight; the LoRA branches are then skipped."""
        for linear in self._attached_linears():
            delta: LoraDelta = linear.lora
            if not delta.merged:
                linear.weight += delta.delta_weight().to(linear.weight.dtype)
                delta.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added (restores the weights up to float rounding)."""
        for linear in self._attached_linears():
            self._unmerge_one(linear)

    @staticmethod
    def _unmerge_one(linear: nn.Linear) -> None:
        delta: LoraDelta = linear.lora
        if delta.merged:
            with torch.no_grad():
                linear.weight -= delta.delta_weight().to(linear.weight.dtype)
            delta.merged = False

    def _attached_linears(self) -> list[nn.Linear]:
        if not self.is_attached:
            raise TuningError("LoRA is not attached to a model: nothing to merge")
        return self._linears
