"""Prefix tuning (Li & Liang, 2021; HF PEFT's ``PrefixTuning``): trainable post-projection keys and values.

Every layer attends to ``L`` extra key/value pairs before the real positions (the ``prefix`` hook of
:class:`~speechprompt.models.transformer.MultiheadAttention`). Unlike SpeechPrompt's deep prompt the vectors are
*already projected*, so they bypass the frozen k/v projections. Trainable: ``2 * layers * L * d``.

Optionally the prefixes are reparameterised through an MLP while training, which Li & Liang found more stable:
``embedding (L, d) -> Linear(d, hidden) -> Tanh -> Linear(hidden, 2 * layers * d)``. After training,
:meth:`PrefixTuning.fold` evaluates the MLP once and keeps only its output, so inference and checkpoints carry
``2 * layers * L * d`` numbers either way.

Works on both backbones: ``UnitLM.forward(prefix=...)`` and ``HubertModel.extract_features(prefix=...)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.models.transformer import LayerKV
from speechprompt.tuning.base import TuningError, TuningMethod, backbone_device, transformer_layers


@dataclass
class PrefixConfig:
    """Prefix tuning of every layer's attention."""

    length: int = option(10, help="prefix length L (key/value pairs per layer)")
    reparameterize: bool = option(False, help="train the prefixes through an MLP (Li & Liang); fold() removes it")
    hidden_size: int = option(512, help="hidden width of the reparameterisation MLP")
    init_std: float = option(0.02, help="std of the normal init of the prefixes (or of the MLP's input embedding)")

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ConfigError(f"prefix length must be >= 1, got {self.length}")
        if self.hidden_size < 1:
            raise ConfigError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}")


class PrefixTuning(TuningMethod):
    """Per-layer projected prefixes, given to the backbone through :meth:`forward_kwargs`.

    Parameters (one of the two forms):
        prefix: ``(layers, 2, L, D)`` keys (index 0) and values (index 1), direct form.
        embedding, mlp: ``(L, D)`` and the MLP producing ``(L, layers * 2 * D)``, reparameterised form.
    """

    config: PrefixConfig

    def __init__(self, config: PrefixConfig, model: nn.Module) -> None:
        super().__init__(config)
        layers = transformer_layers(model)
        attn = layers[0].self_attn
        # Prefixes are post-projection keys/values: as many heads as the k/v projections have (fewer than the
        # query heads under grouped-query attention), each head_dim wide.
        self.num_layers, self.num_heads, self.head_dim = len(layers), attn.num_kv_heads, attn.head_dim
        D, L = attn.kv_dim, config.length
        if config.reparameterize:
            self.embedding = nn.Parameter(torch.randn(L, D) * config.init_std)
            self.mlp = nn.Sequential(
                nn.Linear(D, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, self.num_layers * 2 * D),
            )
        else:
            self.prefix = nn.Parameter(torch.randn(self.num_layers, 2, L, D) * config.init_std)
        self.to(backbone_device(model))

    def _inject(self, model: nn.Module) -> None:
        layers = transformer_layers(model)
        attn = layers[0].self_attn
        if (len(layers), attn.num_kv_heads, attn.head_dim) != (self.num_layers, self.num_heads, self.head_dim):
            raise TuningError(
                f"prefix was built for {self.num_layers} layers x {self.num_heads} heads x {self.head_dim}, the model "
                f"has {len(layers)} x {attn.num_kv_heads} x {attn.head_dim}"
            )

    def prefixes(self) -> Tensor:
        """All prefixes as ``(layers, 2, L, D)``, through the MLP when reparameterised."""
        if self.config.reparameterize:
            L, D = self.embedding.shape
            out = self.mlp(self.embedding)  # (L, layers * 2 * D)
            return out.view(L, self.num_layers, 2, D).permute(1, 2, 0, 3)  # (layers, 2, L, D)
        return self.prefix

    def forward_kwargs(self, batch_size: int = 1) -> dict[str, Any]:
        """``prefix``: one :class:`LayerKV` per layer, ``(B, H, L, head_dim)`` keys and values."""
        p = self.prefixes()
        n, _, L, _ = p.shape
        heads = p.view(n, 2, L, self.num_heads, self.head_dim).transpose(2, 3)  # (layers, 2, H, L, hd)
        return {
            "prefix": [
                LayerKV(kv[0][None].expand(batch_size, -1, -1, -1), kv[1][None].expand(batch_size, -1, -1, -1))
                for kv in heads
            ]
        }

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output (for inference and saving); a no-op for the direct form.

        The config becomes ``reparameterize=False``, so a checkpoint saved afterwards rebuilds the folded form.
        """
        if not self.config.reparameterize:
            return
        folded = self.prefixes().detach().clone()
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(folded)
        self.config = dataclasses.replace(self.config, reparameterize=False)

    def export_state_dict(self) -> dict[str, Tensor]:
        """Always the folded ``prefix`` tensor: what inference needs, without the MLP."""
        return {"prefix": self.prefixes().detach().clone()}

    def load_exported_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a folded ``prefix`` (folding this method first if it is reparameterised)."""
        self.fold()
        self.load_state_dict(state, strict=True)
