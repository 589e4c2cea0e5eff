"""Bottleneck adapters in the adapter slots of every transformer layer.

* Houlsby et al. (2019): a serial ``d -> r -> d`` bottleneck with a residual after the attention output
  (``post_attn``) and after the FFN output (``post_ffn``), each before the layer's own residual and LayerNorm. The
  efficient-tuning study on HuBERT-base uses only the ``post_ffn`` one, r=32, GELU (0.60M parameters).
* AAT / AdaptFormer: a bottleneck *in parallel* with the FFN (``parallel_ffn``): it reads the FFN input and its
  output, times ``scale``, is added to the FFN output. AAT uses a bottleneck ratio of 0.25 (r = d/4).

Every up-projection starts at zero, so at step 0 each adapter is the identity (serial) or adds nothing (parallel)
and the model's output equals the frozen model's exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.models.transformer import ACTIVATIONS
from speechprompt.tuning.base import (
    TuningMethod,
    as_enum,
    backbone_device,
    module_paths,
    select_layers,
    transformer_layers,
)


class AdapterSlot(str, enum.Enum):
    """Where in a :class:`~speechprompt.models.transformer.TransformerLayer` an adapter goes."""

    POST_ATTN = "post_attn"  # serial, on the attention output (Houlsby's first adapter; AAT's "spatial" adapter)
    POST_FFN = "post_ffn"  # serial, on the FFN output (Houlsby's second adapter)
    PARALLEL_FFN = "parallel_ffn"  # beside the FFN (AAT / AdaptFormer)


@dataclass
class AdapterConfig:
    """Bottleneck adapters."""

    slots: list[AdapterSlot] = option(
        [AdapterSlot.POST_ATTN, AdapterSlot.POST_FFN],
        help="adapter positions in each layer: post_attn, post_ffn (serial, Houlsby) and/or parallel_ffn (AAT)",
    )
    bottleneck: int = option(32, help="bottleneck width r (ignored when bottleneck_ratio is set)")
    bottleneck_ratio: float | None = option(None, help="r = round(ratio * d) instead of a fixed width (AAT: 0.25)")
    activation: str = option("gelu", help=f"bottleneck activation, one of {sorted(ACTIVATIONS)}")
    scale: float = option(1.0, help="multiplies the adapter's output (AdaptFormer uses 0.1 for parallel adapters)")
    layers: list[int] | None = option(None, help="layer indices to adapt (negative counts from the top); null = all")

    def __post_init__(self) -> None:
        self.slots = [as_enum(AdapterSlot, s, "slots") for s in self.slots]
        if not self.slots or len(set(self.slots)) != len(self.slots):
            raise ConfigError(f"adapter slots must be a non-empty list without repeats, got {self.slots}")
        if self.bottleneck < 1:
            raise ConfigError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.bottleneck_ratio is not None and not 0 < self.bottleneck_ratio <= 8:
            raise ConfigError(f"bottleneck_ratio must be in (0, 8], got {self.bottleneck_ratio}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")

    def width(self, embed_dim: int) -> int:
        """The bottleneck width for a model of width ``embed_dim``."""
        if self.bottleneck_ratio is None:
            return self.bottleneck
        return max(1, round(self.bottleneck_ratio * embed_dim))


class Bottleneck(nn.Module):
    """``y = [x +] scale * up(act(down(x)))`` with ``up`` zero-initialised. Input and output are ``(..., D)``.

    Args:
        residual: add the input back (serial adapters); parallel adapters return only the branch.
    """

    def __init__(self, dim: int, width: int, activation: str, scale: float, residual: bool) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation, self.scale, self.residual = activation, scale, residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(ACTIVATIONS[self.activation](self.down(x.to(self.down.weight.dtype))))  # (..., D)
        h = (h * self.scale).to(x.dtype)
        return x + h if self.residual else h


class Adapters(TuningMethod):
    """One :class:`Bottleneck` per chosen slot of each chosen layer, registered under the slot's backbone path
    (e.g. ``decoder.layers.3.post_ffn.down.weight``)."""

    config: AdapterConfig

    def __init__(self, config: AdapterConfig, model: nn.Module) -> None:
        super().__init__(config)
        layers = transformer_layers(model)
        paths = module_paths(model)
        dim = layers[0].self_attn.embed_dim
        width = config.width(dim)
        # (path in the backbone, slot) of every adapter, in a fixed order.
        self._sites: list[tuple[str, AdapterSlot]] = []
        for i in select_layers(len(layers), config.layers):
            for slot in config.slots:
                path = f"{paths[id(layers[i])]}.{slot.value}"
                module = Bottleneck(dim, width, config.activation, config.scale, slot is not AdapterSlot.PARALLEL_FFN)
                self._own(path, module)
                self._sites.append((path, slot))
        self.to(backbone_device(model))

    @property
    def sites(self) -> list[tuple[str, AdapterSlot]]:
        """``(path in the backbone, slot)`` of every adapter, in a fixed order (its module is
        ``self.get_submodule(path)``)."""
        return list(self._sites)

    def _inject(self, model: nn.Module) -> None:
        for path, _slot in self._sites:
            self._fill_slot(model, path)
