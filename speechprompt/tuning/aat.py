"""AAT (Liang et al., ICASSP 2024): the two adapters of "Adapting Audio Transformer", under the paper's names.

AAT freezes an audio transformer (AST) and trains, per layer:

* the **MLP adapter**: a bottleneck *in parallel* with the FFN. It reads the FFN's input and its output, times
  ``mlp_scale``, is added to the FFN's output (the ``parallel_ffn`` slot of the shared transformer layer);
* the **spatial adapter**: a serial bottleneck with a residual on the self-attention output, before the layer's
  own residual (the ``post_attn`` slot). AAT takes its name from AIM's spatial adaptation.

Both are ``D -> D/4 -> D`` (bottleneck ratio 0.25) with GELU and a zero-initialised up-projection, so step 0 is the
frozen model exactly. The paper reports AAT-M (MLP adapter only, 3.59M trainable) and AAT-MS (both, 7.14M;
"7.118% of the parameters"), at or above full fine-tuning on audio classification (ESC-50 98.7 against 95.8).

``mlp_scale`` defaults to 0.5, AIM's value for its parallel MLP adapter, which AAT's MLP adapter follows; we could
not read the AAT paper's own value. The modules are the ``adapter`` method's
(:class:`~speechprompt.tuning.adapter.Bottleneck`) in the same slots, so a checkpoint names its tensors as an
``adapter`` checkpoint of those slots would (``encoder.layers.3.parallel_ffn.down.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from speechprompt.config import ConfigError, option
from speechprompt.models.transformer import ACTIVATIONS
from speechprompt.tuning.adapter import AdapterSlot, Bottleneck
from speechprompt.tuning.base import TuningMethod, backbone_device, module_paths, select_layers, transformer_layers

# The paper's names -> the slots of the shared transformer layer they occupy.
MLP_ADAPTER = AdapterSlot.PARALLEL_FFN
SPATIAL_ADAPTER = AdapterSlot.POST_ATTN


@dataclass
class AATConfig:
    """AAT's adapters: the MLP adapter (parallel to the FFN) and the spatial adapter (after self-attention).
    Defaults are AAT-MS."""

    mlp_adapter: bool = option(True, help="the MLP adapter, in parallel with each FFN (AAT-M alone)")
    spatial_adapter: bool = option(True, help="the spatial adapter, after each self-attention (with the MLP "
                                   "adapter: AAT-MS)")
    bottleneck_ratio: float = option(0.25, help="bottleneck width as a fraction of the model width D")
    mlp_scale: float = option(0.5, help="multiplies the MLP adapter's output (AIM's 0.5)")
    activation: str = option("gelu", help=f"bottleneck activation, one of {sorted(ACTIVATIONS)}")
    layers: list[int] | None = option(None, help="layer indices to adapt (negative counts from the top); null = all")

    def __post_init__(self) -> None:
        if not (self.mlp_adapter or self.spatial_adapter):
            raise ConfigError("AAT needs the MLP adapter, the spatial adapter or both")
        if not 0 < self.bottleneck_ratio <= 8:
            raise ConfigError(f"bottleneck_ratio must be in (0, 8], got {self.bottleneck_ratio}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def slots(self) -> list[AdapterSlot]:
        """The slots these adapters occupy, spatial first (forward order)."""
        return [slot for slot, on in ((SPATIAL_ADAPTER, self.spatial_adapter), (MLP_ADAPTER, self.mlp_adapter))
                if on]


class AAT(TuningMethod):
    """AAT's adapters in every chosen layer, registered under their slot paths in model and method alike."""

    config: AATConfig

    def __init__(self, config: AATConfig, model: nn.Module) -> None:
        super().__init__(config)
        layers = transformer_layers(model)
        paths = module_paths(model)
        dim = layers[0].self_attn.embed_dim
        width = max(1, round(config.bottleneck_ratio * dim))
        self._sites: list[str] = []
        for i in select_layers(len(layers), config.layers):
            for slot in config.slots:
                path = f"{paths[id(layers[i])]}.{slot.value}"
                if slot is MLP_ADAPTER:
                    module = Bottleneck(dim, width, config.activation, config.mlp_scale, residual=False)
                else:
                    module = Bottleneck(dim, width, config.activation, 1.0, residual=True)
                self._own(path, module)
                self._sites.append(path)
        self.to(backbone_device(model))

    def mlp_adapters(self) -> dict[str, Bottleneck]:
        """Layer path -> its MLP adapter."""
        return self._named(MLP_ADAPTER)

    def spatial_adapters(self) -> dict[str, Bottleneck]:
        """Layer path -> its spatial adapter."""
        return self._named(SPATIAL_ADAPTER)

    def _named(self, slot: AdapterSlot) -> dict[str, Bottleneck]:
        suffix = f".{slot.value}"
        return {p[: -len(suffix)]: self.get_submodule(p) for p in self._sites if p.endswith(suffix)}

    def _inject(self, model: nn.Module) -> None:
        for path in self._sites:
            self._fill_slot(model, path)
