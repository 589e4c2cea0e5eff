"""BitFit (Ben Zaken et al., 2022): train only the backbone's bias terms.

The method's parameters *are* the backbone's bias parameters (the same ``nn.Parameter`` objects, not copies),
registered in the method under their backbone names, so ``method.state_dict()`` is e.g.
``{"decoder.layers.0.fc1.bias": ..., ...}`` and loading it writes straight into the backbone. Biases are found by
module structure: the ``bias`` parameter of each module in scope, never by matching names.

There is nothing to inject: the biases are already on the forward path. Training changes the backbone in place,
so fingerprint the base model before training, and reload it (or :meth:`BitFit.restore`) to get the original back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from speechprompt.config import option
from speechprompt.tuning.base import TuningError, TuningMethod, as_enum, module_paths, transformer_layers


class BitFitScope(str, enum.Enum):
    """Which modules' biases train."""

    LAYERS = "transformer_layers"  # every bias inside the transformer layers (attention, FFN, LayerNorms)
    ALL = "all"  # every bias of the model (also front ends, final LayerNorm and any head in the model)


@dataclass
class BitFitConfig:
    """Bias-only fine-tuning."""

    scope: BitFitScope = option(BitFitScope.LAYERS, help="transformer_layers | all")
    layer_norm: bool = option(True, help="also train LayerNorm/GroupNorm biases (BitFit does)")

    def __post_init__(self) -> None:
        self.scope = as_enum(BitFitScope, self.scope, "scope")


_NORMS = (nn.LayerNorm, nn.GroupNorm)


class BitFit(TuningMethod):
    """Exposes the backbone's biases as the method's own parameters, under their backbone names."""

    config: BitFitConfig

    def __init__(self, config: BitFitConfig, model: nn.Module) -> None:
        super().__init__(config)
        roots = [model] if config.scope is BitFitScope.ALL else transformer_layers(model)
        paths = module_paths(model)
        seen: set[int] = set()
        for root in roots:
            for module in root.modules():
                bias = module._parameters.get("bias")
                if bias is None or id(bias) in seen or (not config.layer_norm and isinstance(module, _NORMS)):
                    continue
                seen.add(id(bias))
                self._own(f"{paths[id(module)]}.bias", bias)
        if not seen:  # LLaMA's linears and RMSNorms have no bias at all
            raise TuningError(f"BitFit found no bias to train in {type(model).__name__} (scope "
                              f"{config.scope.value}): this backbone has none")
        # The values at construction, so that restore() can undo training without reloading the base model.
        self._initial = {name: p.detach().clone() for name, p in self.named_parameters()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the backbone's biases back to their values at construction."""
        for name, p in self.named_parameters():
            p.copy_(self._initial[name].to(p.device))

