"""CNN adapters in the convolutional feature extractor (CHAPTER; Chen, Sung and Lee, 2023).

Adapters in the transformer layers leave the waveform front end of a wav2vec 2.0-family encoder (the strided
convolutions that turn samples into 50 Hz frames) as pretrained. CHAPTER adds an adapter after conv blocks of that
front end too, which helped most on speaker and emotion tasks (SUPERB SID 87.71 -> 91.56 accuracy on HuBERT-base).

Each adapter is a residual bottleneck over the block's channels, ``(B, C, T) -> (B, C, T)``::

    x + up(act(down(x)))      down: Conv1d(C, r, kernel_size, 'same' padding)   up: Conv1d(r, C, 1), zero-initialised

so at step 0 it is the identity and the encoder's outputs are the frozen encoder's exactly. The paper gives no
reference implementation; the bottleneck width, kernel and activation here are our defaults (a 3-tap kernel, so that
an adapter sees neighbouring frames, and the front end's own GELU), each an option.

CHAPTER combines them with Houlsby adapters in the transformer layers: ``transformer_slots: [post_attn, post_ffn]``
adds those (:class:`~speechprompt.tuning.adapter.Bottleneck`, the ``adapter`` method's modules) in the same method.

The adapters sit in the front end's ``conv_adapters`` slots (``feature_extractor.conv_adapters.{i}``, empty by
default; see :class:`~speechprompt.models.wav2vec2.ConvFeatureExtractor`). The unit LM and AST have no such front
end and are refused. With adapters in it, the front end runs with gradients whatever the checkpoint's
``feature_grad_mult`` (whose 0 would otherwise skip it); its convs stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.models.transformer import ACTIVATIONS
from speechprompt.models.wav2vec2 import ConvFeatureExtractor
from speechprompt.tuning.adapter import AdapterSlot, Bottleneck
from speechprompt.tuning.base import (
    TuningError,
    TuningMethod,
    as_enum,
    backbone_device,
    module_paths,
    select_layers,
    transformer_layers,
)


@dataclass
class CnnAdapterConfig:
    """Bottleneck adapters after the conv blocks of a waveform front end (and optionally in the transformer)."""

    bottleneck: int = option(32, help="bottleneck channels r of each conv adapter")
    kernel_size: int = option(3, help="kernel of the down-projection conv (odd: frames keep their count; 1 is a "
                              "pointwise bottleneck over channels)")
    activation: str = option("gelu", help=f"bottleneck activation, one of {sorted(ACTIVATIONS)}")
    conv_layers: list[int] | None = option(None, help="conv blocks to adapt (negative counts from the last); "
                                           "null = all")
    transformer_slots: list[AdapterSlot] = option([], help="also Houlsby adapters in these transformer slots "
                                                  "(post_attn, post_ffn: CHAPTER's full setup); [] = none")
    transformer_bottleneck: int = option(32, help="bottleneck width of the transformer adapters")

    def __post_init__(self) -> None:
        self.transformer_slots = [as_enum(AdapterSlot, s, "transformer_slots") for s in self.transformer_slots]
        if len(set(self.transformer_slots)) != len(self.transformer_slots):
            raise ConfigError(f"transformer_slots has repeats: {[s.value for s in self.transformer_slots]}")
        if self.bottleneck < 1 or self.transformer_bottleneck < 1:
            raise ConfigError("bottleneck and transformer_bottleneck must be >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd and positive (frames keep their count), got "
                              f"{self.kernel_size}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")


class ConvBottleneck(nn.Module):
    """``x + up(act(down(x)))`` over channels with ``up`` zero-initialised. Input and output ``(B, C, T)``."""

    def __init__(self, channels: int, width: int, kernel_size: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Conv1d(channels, width, kernel_size, padding=kernel_size // 2)
        self.up = nn.Conv1d(width, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(ACTIVATIONS[self.activation](self.down(x.to(self.down.weight.dtype))))  # (B, C, T)
        return x + h.to(x.dtype)


class CnnAdapters(TuningMethod):
    """A :class:`ConvBottleneck` per chosen conv block, registered as ``feature_extractor.conv_adapters.{i}``, plus
    the optional transformer adapters under their slot paths (``encoder.layers.{j}.post_ffn``)."""

    config: CnnAdapterConfig

    def __init__(self, config: CnnAdapterConfig, model: nn.Module) -> None:
        super().__init__(config)
        front = getattr(model, "feature_extractor", None)
        if not isinstance(front, ConvFeatureExtractor):
            raise TuningError(f"cnn_adapter adapts the convolutional waveform front end of a wav2vec 2.0-family "
                              f"encoder (wav2vec 2.0, HuBERT, data2vec, WavLM); {type(model).__name__} has none "
                              "(the unit LM reads units and AST a spectrogram): use adapter there")
        paths = module_paths(model)
        self._slots: list[str] = []  # backbone paths of every adapter, conv ones first
        for i in select_layers(len(front.conv_layers), config.conv_layers):
            channels = front.conv_layers[i][0].out_channels
            path = f"{paths[id(front.conv_adapters)]}.{i}"
            self._own(path, ConvBottleneck(channels, config.bottleneck, config.kernel_size, config.activation))
            self._slots.append(path)
        if config.transformer_slots:
            layers = transformer_layers(model)
            dim = layers[0].self_attn.embed_dim
            for layer in layers:
                for slot in config.transformer_slots:
                    path = f"{paths[id(layer)]}.{slot.value}"
                    self._own(path, Bottleneck(dim, config.transformer_bottleneck, "gelu", 1.0, residual=True))
                    self._slots.append(path)
        self.to(backbone_device(model))

    @property
    def sites(self) -> list[str]:
        """Backbone path of every adapter (conv adapters first), in a fixed order."""
        return list(self._slots)

    def _inject(self, model: nn.Module) -> None:
        for path in self._slots:
            self._fill_slot(model, path)
