"""S3-Router (Fu et al., 2022): learn which frozen weights to *remove*, per task, instead of new weights.

Every masked linear gets a real-valued score per weight. The binary mask keeps the weights with the largest
``|score|``: exactly ``ceil(keep_ratio * n)`` of the ``n`` weights of each layer (so at most ``1 - keep_ratio`` of
them are removed; 0.9 by default), or, in threshold mode, those with ``|score| > threshold``. The forward uses
``weight * mask``; the backward passes the gradient of the mask straight through to ``|score|``
(straight-through estimator, as edge-popup and S3-Router do).

Score init: ``kaiming`` (random, as edge-popup), ``magnitude`` (``|w|``: the first mask is magnitude pruning), or
``rank`` (the rank of ``|w|`` in its layer, scaled to (0, 1]: the same first mask with scale-free scores).

Injection wraps each target linear in a :class:`MaskedLinear` that holds the *same* ``weight``/``bias`` parameters
under the same names plus a child ``router``; :meth:`~speechprompt.tuning.base.TuningMethod.detach` puts the
original ``nn.Linear`` back. A task checkpoint stores the mask as a packed bitmask (``np.packbits``, 1 bit per weight,
32x smaller than the scores); loading it gives a fixed, inference-only router.

Pruning without training: :func:`magnitude_masks` is layer-wise magnitude pruning of any weights (the first mask of
``init=magnitude``), :func:`pruned` applies masks in place for a block and restores the weights exactly, and
:func:`magnitude_sweep` / :func:`sparsity_sweep` evaluate a model at several keep ratios (the ``speechprompt prune``
command writes pruned checkpoints and sweeps with them). Several tasks' masks over one backbone:
:class:`~speechprompt.tuning.mask_bank.MaskBank`.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.tuning.base import (
    ALL_LINEARS,
    FFN_LINEARS,
    LinearName,
    TuningError,
    TuningMethod,
    as_enum,
    module_paths,
    select_layers,
    set_submodule,
    target_linears,
    transformer_layers,
)


class ScoreInit(str, enum.Enum):
    """Initial scores, hence the first mask."""

    KAIMING = "kaiming"
    MAGNITUDE = "magnitude"
    RANK = "rank"


@dataclass
class MaskConfig:
    """S3-Router weight masks on chosen linears."""

    keep_ratio: float = option(0.9, help="fraction of each masked layer's weights kept (top-k of |score|)")
    threshold: float | None = option(None, help="keep weights with |score| > threshold instead of a fixed ratio")
    init: ScoreInit = option(ScoreInit.MAGNITUDE, help="score init: kaiming | magnitude | rank")
    targets: list[LinearName] = option(
        list(ALL_LINEARS), help="linears to mask: q_proj, k_proj, v_proj, out_proj, fc1, fc2 "
        "(on SwiGLU layers fc1 = gate_proj + up_proj, fc2 = down_proj), gate_proj, up_proj, down_proj; o_proj "
        "means out_proj"
    )
    ffn_only: bool = option(False, help="mask only the FFN (fc1, fc2) of the targets")
    layers: list[int] | None = option(None, help="layer indices to mask (negative counts from the top); null = all")

    def __post_init__(self) -> None:
        self.init = as_enum(ScoreInit, self.init, "init")
        self.targets = [as_enum(LinearName, t, "targets") for t in self.targets]
        if self.ffn_only:
            self.targets = [t for t in self.targets if t in FFN_LINEARS]
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"mask targets must be a non-empty list without repeats (after ffn_only), got "
                              f"{[t.value for t in self.targets]}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")


def keep_count(numel: int, keep_ratio: float) -> int:
    """Weights kept out of ``numel``: rounded up, so that at most ``1 - keep_ratio`` of them are removed."""
    return min(numel, math.ceil(round(keep_ratio * numel, 6)))


def top_k_mask(magnitude: Tensor, k: int) -> Tensor:
    """1 for the ``k`` largest entries of ``magnitude``, else 0, same shape and dtype (exactly ``k`` ones; ties are
    broken by ``topk``'s order). With ``magnitude = |weight|`` this is magnitude pruning of that weight."""
    mask = torch.ones_like(magnitude)
    n = magnitude.numel()
    if k < n:
        # Removing the n - k smallest is cheaper than selecting the k largest when k is most of the layer.
        drop = magnitude.reshape(-1).topk(n - k, largest=False, sorted=False).indices
        mask.view(-1)[drop] = 0.0
    return mask


class _TopKMask(torch.autograd.Function):
    """Forward: :func:`top_k_mask`. Backward: straight through."""

    @staticmethod
    def forward(ctx: Any, magnitude: Tensor, k: int) -> Tensor:
        return top_k_mask(magnitude, k)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ThresholdMask(torch.autograd.Function):
    """Forward: ``magnitude > threshold`` as 0/1. Backward: straight through."""

    @staticmethod
    def forward(ctx: Any, magnitude: Tensor, threshold: float) -> Tensor:
        return (magnitude > threshold).to(magnitude.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class Router(nn.Module):
    """The mask of one ``(out, in)`` weight: trainable ``scores`` or, after loading a bitmask, a fixed ``mask``."""

    def __init__(self, scores: Tensor, keep_ratio: float, threshold: float | None) -> None:
        super().__init__()
        self.shape = tuple(scores.shape)
        self.scores: nn.Parameter | None = nn.Parameter(scores)
        self.keep_ratio, self.threshold = keep_ratio, threshold
        # Non-persistent: a fixed router's checkpoint is the packed bitmask (see S3Router.export_state_dict).
        self.register_buffer("mask", None, persistent=False)

    @property
    def fixed(self) -> bool:
        return self.scores is None

    def forward(self) -> Tensor:
        """The current 0/1 mask ``(out, in)``, differentiable (straight through) with respect to ``scores``."""
        if self.scores is None:
            return self.mask
        magnitude = self.scores.abs()
        if self.threshold is not None:
            return _ThresholdMask.apply(magnitude, self.threshold)
        return _TopKMask.apply(magnitude, keep_count(magnitude.numel(), self.keep_ratio))

    def fix(self, mask: Tensor) -> None:
        """Freeze to a given 0/1 mask and drop the scores (inference only)."""
        if tuple(mask.shape) != self.shape:
            raise TuningError(f"mask of shape {tuple(mask.shape)} for a weight of shape {self.shape}")
        device = self.scores.device if self.scores is not None else self.mask.device
        self.scores = None
        self.mask = mask.to(device=device, dtype=torch.float32)


class MaskedLinear(nn.Module):
    """``F.linear(x, weight * router(), bias)``. Holds the original linear's ``weight``/``bias`` parameters (same
    objects, same names) and its ``router``. Input ``(..., in)``, output ``(..., out)``."""

    def __init__(self, linear: nn.Linear, router: Router) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.router = router

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.router().to(self.weight.dtype), self.bias)


def _initial_scores(weight: Tensor, init: ScoreInit) -> Tensor:
    w = weight.detach().float()
    if init is ScoreInit.KAIMING:
        scores = torch.empty_like(w)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        return scores
    if init is ScoreInit.MAGNITUDE:
        return w.abs()
    order = w.abs().reshape(-1).argsort()
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1, device=order.device)
    return (ranks.float() / order.numel()).view_as(w)  # (out, in) in (0, 1]


class S3Router(TuningMethod):
    """One :class:`Router` per target linear, registered as ``<linear path>.router`` in model and method alike."""

    config: MaskConfig

    def __init__(self, config: MaskConfig, model: nn.Module) -> None:
        super().__init__(config)
        self._targets: list[str] = []  # backbone paths of the masked linears
        for path, linear in target_linears(model, config.layers, config.targets, "mask"):
            self._own(f"{path}.router", Router(_initial_scores(linear.weight, config.init), config.keep_ratio,
                                               config.threshold))
            self._targets.append(path)

    def routers(self) -> dict[str, Router]:
        """Backbone path of each masked linear -> its router."""
        return {path: self.get_submodule(f"{path}.router") for path in self._targets}

    def _inject(self, model: nn.Module) -> None:
        for path, router in self.routers().items():
            try:
                linear = model.get_submodule(path)
            except AttributeError:
                raise TuningError(f"the model has no linear {path!r} to mask") from None
            if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks:
                # A wrapper would bypass the hooks of another method (LoRA, AdapterBias) on this linear.
                raise TuningError(f"{path} is not a plain nn.Linear ({type(linear).__name__} with "
                                  f"{len(linear._forward_hooks)} forward hooks): is another method attached?")
            if tuple(linear.weight.shape) != router.shape:
                raise TuningError(f"router for {path} has shape {router.shape}, the weight "
                                  f"{tuple(linear.weight.shape)}")
            set_submodule(model, path, MaskedLinear(linear, router))
            self._on_detach(lambda path=path, linear=linear: set_submodule(model, path, linear))

    # -- sparsity ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of weights removed in each masked linear."""
        return {path: 1.0 - float(router().mean()) for path, router in self.routers().items()}

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of all masked weights removed."""
        removed = total = 0
        for router in self.routers().values():
            mask = router()
            removed += int(mask.numel() - mask.sum())
            total += mask.numel()
        return removed / total

    def set_keep_ratio(self, keep_ratio: float, threshold: float | None = None) -> None:
        """Change every router's keep ratio (or threshold) without touching the scores."""
        if not 0.0 < keep_ratio <= 1.0:
            raise TuningError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        for path, router in self.routers().items():
            if router.fixed:
                raise TuningError(f"the router of {path} is fixed (loaded from a bitmask); it has no scores")
            router.keep_ratio, router.threshold = keep_ratio, threshold

    # -- checkpoints -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def export_state_dict(self) -> dict[str, Tensor]:
        """``{"<linear path>.router.mask": uint8 (ceil(n / 8),)}``: each mask packed 8 weights per byte, row-major."""
        return {f"{path}.router.mask": pack_bitmask(router()) for path, router in self.routers().items()}

    def load_exported_state_dict(self, state: dict[str, Tensor]) -> None:
        """Fix every router to a packed bitmask from :meth:`export_state_dict` (the scores are dropped)."""
        routers = {f"{path}.router.mask": router for path, router in self.routers().items()}
        if set(state) != set(routers):
            missing, unexpected = sorted(set(routers) - set(state)), sorted(set(state) - set(routers))
            raise TuningError(f"bitmask does not fit this router: missing {missing[:3]}, unexpected {unexpected[:3]}")
        # Every mask is checked before any router changes.
        masks = {key: unpack_bitmask(state[key], router.shape, key) for key, router in routers.items()}
        for key, router in routers.items():
            router.fix(masks[key])


def pack_bitmask(mask: Tensor) -> Tensor:
    """A 0/1 mask of any shape -> uint8 ``(ceil(n / 8),)``, 8 weights per byte, row-major (``np.packbits``)."""
    return torch.from_numpy(np.packbits(mask.detach().reshape(-1).to(torch.bool).cpu().numpy()))


def unpack_bitmask(packed: Tensor, shape: Sequence[int], name: str = "bitmask") -> Tensor:
    """:func:`pack_bitmask` undone: float32 0/1 of ``shape``, on the CPU.

    Raises:
        TuningError: not ``ceil(n / 8)`` uint8 bytes for the ``n`` weights of ``shape`` (``name`` says which).
    """
    n = math.prod(shape)
    bits = packed.cpu().numpy()
    if bits.dtype != np.uint8 or bits.shape != ((n + 7) // 8,):
        raise TuningError(f"{name}: expected {(n + 7) // 8} packed bytes (uint8) for {n} weights, got "
                          f"{bits.shape} {bits.dtype}")
    return torch.from_numpy(np.unpackbits(bits, count=n).reshape(tuple(shape)).astype(np.float32))


def sparsity_sweep(
    method: S3Router, keep_ratios: Sequence[float], evaluate: Callable[[], float]
) -> list[dict[str, float]]:
    """Evaluate the masked model at several keep ratios (with ``init=magnitude`` and untrained scores this is
    layer-wise magnitude pruning). The method's own ratio/threshold is restored afterwards.

    Returns:
        One ``{"keep_ratio", "sparsity", "metric"}`` row per ratio, in the given order.
    """
    saved = {path: (r.keep_ratio, r.threshold) for path, r in method.routers().items()}

    def apply(ratio: float) -> float:
        method.set_keep_ratio(ratio)
        return method.sparsity()

    def restore() -> None:
        for path, router in method.routers().items():
            router.keep_ratio, router.threshold = saved[path]

    return _sweep(keep_ratios, apply, evaluate, restore)


def prunable_weights(model: nn.Module, targets: Sequence[LinearName] = ALL_LINEARS,
                     layers: list[int] | None = None) -> dict[str, nn.Parameter]:
    """``{"<linear path>.weight": weight}`` of the target linears of the chosen transformer layers, whether they are
    plain or wrapped by a method (a :class:`MaskedLinear` keeps the same weight). Targets resolve per layer as
    :class:`LinearName` says (``fc1`` is SwiGLU's ``gate_proj`` and ``up_proj``; ``down_proj`` is an fc1/fc2
    layer's ``fc2``)."""
    blocks = transformer_layers(model)
    paths = module_paths(model)
    out = {}
    for i in select_layers(len(blocks), layers):
        for path in dict.fromkeys(p for target in targets for p in target.paths(blocks[i])):  # once each, in order
            linear = blocks[i].get_submodule(path)
            out[f"{paths[id(linear)]}.weight"] = linear.weight
    return out


@torch.no_grad()
def magnitude_masks(weights: Mapping[str, Tensor], keep_ratio: float) -> dict[str, Tensor]:
    """Layer-wise magnitude pruning: for each weight, 1 at its ``keep_count(n, keep_ratio)`` largest ``|w|``, else 0
    (the first mask of ``init=magnitude`` at that keep ratio). Float32 masks of the weights' shapes."""
    if not 0.0 < keep_ratio <= 1.0:
        raise TuningError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return {name: top_k_mask(w.detach().float().abs(), keep_count(w.numel(), keep_ratio))
            for name, w in weights.items()}


@contextlib.contextmanager
def pruned(weights: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> Iterator[float]:
    """Zero the masked-out entries of ``weights`` in place for the block; the exact values are put back after.

    Yields:
        The fraction of the weights' entries that are zero inside the block.
    """
    saved = {name: w.detach().clone() for name, w in weights.items()}
    try:
        zero = total = 0
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(masks[name].to(device=w.device, dtype=w.dtype))
                zero += int((w == 0).sum())
                total += w.numel()
        yield zero / total
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(saved[name])


def magnitude_sweep(
    weights: Mapping[str, nn.Parameter], keep_ratios: Sequence[float], evaluate: Callable[[], float]
) -> list[dict[str, float]]:
    """:func:`sparsity_sweep` for any model: ``evaluate`` with ``weights`` magnitude-pruned in place at each keep
    ratio (whatever method is attached keeps acting on top), the weights restored exactly afterwards.

    Returns:
        One ``{"keep_ratio", "sparsity" (measured fraction of zero weights), "metric"}`` row per ratio.
    """
    stack = contextlib.ExitStack()

    def apply(ratio: float) -> float:
        stack.close()
        return stack.enter_context(pruned(weights, magnitude_masks(weights, ratio)))

    return _sweep(keep_ratios, apply, evaluate, stack.close)


def _sweep(keep_ratios: Sequence[float], apply: Callable[[float], float], evaluate: Callable[[], float],
           restore: Callable[[], None]) -> list[dict[str, float]]:
    """``apply`` each ratio (it returns the resulting sparsity), ``evaluate``, and ``restore`` in the end."""
    rows = []
    try:
        for ratio in keep_ratios:
            sparsity = apply(ratio)
            rows.append({"keep_ratio": ratio, "sparsity": sparsity, "metric": float(evaluate())})
    finally:
        restore()
    return rows
