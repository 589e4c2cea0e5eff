"""AdapterBias (Fu et al., 2022): a token-dependent shift of each FFN output, ``h + alpha(x) * v``.

Per layer, a vector ``v`` (D) and a linear ``alpha`` that gives each token one scalar weight; the FFN output ``h``
of token ``t`` becomes ``h_t + alpha(x_t) v``: every token moves along the same direction, by its own amount, so a
task learns *which* tokens to shift. Placement and init follow the authors' code (BERT's ``BertOutput``):

* ``alpha`` reads the FFN's hidden activation (the input of ``fc2``, width ``ffn_dim``), and the shift is added
  to the FFN output before the layer's residual and LayerNorm. ``alpha_input: ffn_output`` reads the FFN output
  (width D) instead, as the paper's figure draws it.
* ``v`` starts at zero, so step 0 is the frozen model exactly; ``alpha`` has ``nn.Linear``'s default init.
* On HuBERT-base this is ``12 * (768 + 3072 + 1) = 46,092`` parameters: the 0.046M of the speech efficient-tuning
  study (Chen et al., SLT 2022). The authors' NLP runs also trained each layer's FFN LayerNorm (``layer_norm:
  true``), which the speech count leaves out.

Injection is a forward hook on each layer's ``fc2`` (as LoRA's), which gains a child ``adapter_bias`` holding
``vector`` and ``alpha``; the backbone's own modules keep their names and classes. In training mode the layer's
dropout acts on the shifted output, where the authors' code adds the shift after it; in eval mode (a frozen
upstream) the two are the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from speechprompt.config import option
from speechprompt.tuning.base import (
    LinearName,
    TuningError,
    TuningMethod,
    as_enum,
    backbone_device,
    module_paths,
    select_layers,
    transformer_layers,
)


class AlphaInput(str, enum.Enum):
    """What ``alpha`` reads to weigh each token."""

    FFN_HIDDEN = "ffn_hidden"  # the FFN's hidden activation, fc2's input (the authors' code)
    FFN_OUTPUT = "ffn_output"  # the FFN output, fc2's output (the paper's figure)


@dataclass
class AdapterBiasConfig:
    """AdapterBias: a learned vector per layer, scaled per token, added to the FFN output."""

    alpha_input: AlphaInput = option(AlphaInput.FFN_HIDDEN, help="what the per-token weight reads: ffn_hidden "
                                     "(fc2's input, as the authors' code) or ffn_output")
    layer_norm: bool = option(False, help="also train each layer's FFN LayerNorm (final_layer_norm), as the "
                              "authors' NLP runs did; the speech study's 0.046M leaves it out")
    layers: list[int] | None = option(None, help="layer indices to adapt (negative counts from the top); null = all")

    def __post_init__(self) -> None:
        self.alpha_input = as_enum(AlphaInput, self.alpha_input, "alpha_input")


class TokenShift(nn.Module):
    """``alpha(x) * vector``: input ``(..., in_dim)``, output ``(..., dim)``; zero while ``vector`` is zero."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(dim))
        self.alpha = nn.Linear(in_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha(x.to(self.vector.dtype)) * self.vector  # (..., 1) * (D,) -> (..., D)


def _shift_hook(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook of ``fc2``: add the token-dependent shift, read from fc2's input or its output."""
    shift: TokenShift = module.adapter_bias
    source = args[0] if module.adapter_bias_reads_input else output
    return output + shift(source).to(output.dtype)


class AdapterBias(TuningMethod):
    """One :class:`TokenShift` per chosen layer, registered as ``<layer>.fc2.adapter_bias`` in model and method
    alike (and, with ``layer_norm``, the layer's ``final_layer_norm`` parameters under their own names)."""

    config: AdapterBiasConfig

    def __init__(self, config: AdapterBiasConfig, model: nn.Module) -> None:
        super().__init__(config)
        blocks = transformer_layers(model)
        paths = module_paths(model)
        self._targets: list[str] = []  # backbone paths of the hooked fc2 linears
        for i in select_layers(len(blocks), config.layers):
            fc2 = blocks[i].get_submodule(LinearName.FC2.paths(blocks[i])[0])  # SwiGLU: down_proj
            if not isinstance(fc2, nn.Linear):
                raise TuningError(f"AdapterBias: fc2 of layer {i} is a {type(fc2).__name__}, not an nn.Linear "
                                  "(is another method attached?)")
            reads = fc2.in_features if config.alpha_input is AlphaInput.FFN_HIDDEN else fc2.out_features
            path = paths[id(fc2)]
            self._own(f"{path}.adapter_bias", TokenShift(reads, fc2.out_features))
            self._targets.append(path)
            if config.layer_norm:
                norm = blocks[i].final_layer_norm
                for name, p in norm.named_parameters():
                    self._own(f"{paths[id(norm)]}.{name}", p)  # the backbone's own tensors, trained in place
        self.to(backbone_device(model))

    def _inject(self, model: nn.Module) -> None:
        for path in self._targets:
            try:
                fc2 = model.get_submodule(path)
            except AttributeError:
                raise TuningError(f"the model has no linear {path!r} for AdapterBias") from None
            if type(fc2) is not nn.Linear or hasattr(fc2, "adapter_bias") or fc2._forward_hooks:
                raise TuningError(f"{path} is not a plain nn.Linear (is another method attached?)")
            shift: TokenShift = self.get_submodule(f"{path}.adapter_bias")
            expected = fc2.in_features if self.config.alpha_input is AlphaInput.FFN_HIDDEN else fc2.out_features
            if shift.alpha.in_features != expected or shift.vector.numel() != fc2.out_features:
                raise TuningError(f"AdapterBias for {path} does not fit its linear {tuple(fc2.weight.shape)}")
            fc2.adapter_bias = shift
            fc2.adapter_bias_reads_input = self.config.alpha_input is AlphaInput.FFN_HIDDEN
            handle = fc2.register_forward_hook(_shift_hook)

            def undo(fc2: nn.Linear = fc2, handle: RemovableHandle = handle) -> None:
                handle.remove()
                del fc2.adapter_bias
                del fc2.adapter_bias_reads_input

            self._on_detach(undo)
