"""SpeechPrompt: input prompts, deep prompts and the trainable ``<s>`` separator (unit LM only).

* Input prompt: ``L`` vectors of size ``d`` placed before the unit tokens, after token embedding, scaling and
  positions (prompts get no positional embedding).
* Deep prompt (SpeechPrompt style): in every layer, ``L`` key inputs and ``L`` value inputs replace the key/value
  *inputs* of the prompt positions, before the frozen k/v projections (the ``kv_replace`` hook), plus the input
  prompt that provides those ``L`` positions. Trainable: ``(2 * layers + 1) * L * d``.
* Separator: the ``<s>`` row of the frozen embedding table is replaced by a trainable vector initialised from it
  (``embed_override``; the table itself is never copied or touched).
* Init: normal (the papers), or from unit tokens (sampled, or a given unit string). An input prompt starts as
  their scaled embeddings; a deep prompt (``deep_init=activations``) as the k/v inputs the frozen LM computes for
  them in every layer. The papers' normal init stays the default (see docs/demo.md for how the two compared).

For gslm_big (d=1024, 12 layers), L=5, deep, with the separator: ``25 * 1024 * 5 + 1024 = 129,024`` trainable
parameters, the count SpeechPrompt reports. The speech LMs of :mod:`speechprompt.models.speech_lm` (OPT, LLaMA, Qwen2)
take the same prompts: their width is the layers' (``cfg.embed_dim``), the separator is their vocabulary's ``<s>``
(slamkit's BOS) and unit-token inits use their own unit ids. On a model with fewer k/v heads (GQA) the deep prompt
is still ``d`` wide per position: it is the key/value *input*, before the k/v projections.

Note on deep prompts: when every layer's key/value inputs at the prompt positions are replaced, the token outputs no
longer depend on the input prompt's values (see ``UnitLM.features``), so it receives no gradient. It is kept, as in
SpeechPrompt, because it provides the positions and belongs to the published parameter count.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from speechprompt.config import ConfigError, option
from speechprompt.models.unit_lm import UnitLM
from speechprompt.models.unit_vocab import model_vocab
from speechprompt.tuning.base import TuningError, TuningMethod, as_enum


class PromptInit(str, enum.Enum):
    """How the input prompt starts."""

    NORMAL = "normal"  # N(0, init_std^2)
    SAMPLED_UNITS = "sampled_units"  # scaled embeddings of L unit tokens drawn at random
    UNITS = "units"  # scaled embeddings of the unit string ``init_units``


class DeepInit(str, enum.Enum):
    """How the deep prompt's per-layer key/value inputs start."""

    NORMAL = "normal"  # N(0, init_std^2), as in the papers
    # What the frozen LM itself feeds its k/v projections at the init tokens (``init``: sampled units or
    # ``init_units``), layer by layer: the prompts start in distribution (Li & Liang's initialisation with real
    # activations, which they found to matter in low-data settings).
    ACTIVATIONS = "activations"


@dataclass
class PromptConfig:
    """SpeechPrompt's prompt tuning of the frozen unit LM."""

    length: int = option(5, help="prompt length L (vectors per layer)")
    deep: bool = option(True, help="deep prompt: per-layer key/value inputs at the prompt positions (SpeechPrompt "
                        "v1/v2); false = input prompt only")
    train_separator: bool = option(True, help="replace the <s> separator embedding by a trainable vector "
                                   "initialised from the frozen row")
    init: PromptInit = option(PromptInit.NORMAL, help="input prompt init: normal | sampled_units | units")
    init_std: float = option(0.02, help="std of the normal init (also used for the deep key/value prompts)")
    deep_init: DeepInit = option(DeepInit.NORMAL, help="deep key/value init: normal | activations (the frozen LM's "
                                 "own k/v inputs at the init tokens of `init`, which must then be unit tokens)")
    init_units: str = option("", help="space-separated unit ids (as in .units files) for init=units; "
                             "repeated or cut to L")

    def __post_init__(self) -> None:
        self.init = as_enum(PromptInit, self.init, "init")
        self.deep_init = as_enum(DeepInit, self.deep_init, "deep_init")
        if self.deep and self.deep_init is DeepInit.NORMAL and self.init is not PromptInit.NORMAL:
            raise ConfigError(f"init={self.init.value} would do nothing: a deep prompt never reads its input prompt's "
                              "values; set deep_init=activations to start the deep prompt from those tokens")
        if self.deep_init is DeepInit.ACTIVATIONS and self.init is PromptInit.NORMAL:
            raise ConfigError("deep_init=activations runs the LM on the init tokens: set init to sampled_units or "
                              "units")
        if self.length < 1:
            raise ConfigError(f"prompt length must be >= 1, got {self.length}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, got {self.init_std}")
        if self.init is PromptInit.UNITS:
            units = self.init_units.split()
            if not units or not all(u.isdigit() for u in units):
                raise ConfigError(f"init=units needs init_units as space-separated unit ids, got {self.init_units!r}")
        elif self.init_units:
            raise ConfigError("init_units is only used with init=units")


class PromptTuning(TuningMethod):
    """Input/deep prompts and the separator vector; all reach the model through :meth:`forward_kwargs`.

    Parameters:
        prompt: ``(L, D)`` input prompt.
        deep_key, deep_value: ``(layers, L, D)`` key/value inputs of the prompt positions (``deep`` only).
        separator: ``(D,)`` the ``<s>`` embedding before scaling (``train_separator`` only).
    """

    config: PromptConfig

    def __init__(self, config: PromptConfig, model: nn.Module) -> None:
        super().__init__(config)
        if not isinstance(model, UnitLM):
            raise TuningError(f"prompt tuning prepends to unit tokens: needs the unit LM, got {type(model).__name__}")
        table = model.decoder.embed_tokens.weight.detach()  # (V, E): E = D but for project_in (OPT's, fairseq's)
        L, D, n_layers = config.length, model.cfg.embed_dim, len(model.transformer_layers())
        self.length = L
        self.vocab = model_vocab(model)
        ids = self._init_tokens()
        self.prompt = nn.Parameter(self._initial_prompt(model, ids))
        if config.deep and config.deep_init is DeepInit.ACTIVATIONS:
            kv_in = _kv_inputs(model, ids.to(table.device))  # (layers, L, D)
            self.deep_key = nn.Parameter(kv_in.clone())
            self.deep_value = nn.Parameter(kv_in.clone())
        elif config.deep:
            self.deep_key = nn.Parameter(torch.randn(n_layers, L, D) * config.init_std)
            self.deep_value = nn.Parameter(torch.randn(n_layers, L, D) * config.init_std)
        self.separator_id = self.vocab.bos
        if config.train_separator:
            self.separator = nn.Parameter(table[self.separator_id].to(torch.float32, copy=True))
        if any(p.device != table.device for p in self.parameters()):  # not a no-op .to(): fake tensors refuse it
            self.to(table.device)

    def _init_tokens(self) -> torch.Tensor | None:
        """``(L,)`` token ids the prompts start from (``None`` for ``init=normal``)."""
        cfg, vocab = self.config, self.vocab
        first_unit = vocab.unit_offset  # GSLM: <s> <pad> </s> <unk>, then the units: unit u is token u + 4
        if cfg.init is PromptInit.NORMAL:
            return None
        if cfg.init is PromptInit.SAMPLED_UNITS:
            return torch.randint(first_unit, first_unit + vocab.num_units, (cfg.length,))
        units = [int(u) for u in cfg.init_units.split()]
        ids = torch.tensor([units[i % len(units)] for i in range(cfg.length)]) + first_unit
        if int(ids.max()) >= first_unit + vocab.num_units:
            raise TuningError(f"init_units has unit {int(ids.max()) - first_unit}, but the LM knows only "
                              f"{vocab.num_units} units")
        return ids

    def _initial_prompt(self, model: UnitLM, ids: torch.Tensor | None) -> torch.Tensor:
        """``(L, D)`` starting values: the input prompt lives where the first layer's input does (after scaling,
        and OPT's or fairseq's ``project_in``), so unit rows are taken from there too."""
        if ids is None:
            return torch.randn(self.config.length, model.cfg.embed_dim) * self.config.init_std
        device = model.decoder.embed_tokens.weight.device
        with torch.no_grad():
            return model.input_embeddings(ids.to(device)[None])[0].float().clone()  # (L, D)

    def _inject(self, model: nn.Module) -> None:
        if not isinstance(model, UnitLM):
            raise TuningError(f"prompt tuning needs the unit LM; got {type(model).__name__}")
        n_layers = len(model.transformer_layers())
        if self.config.deep and self.deep_key.shape[0] != n_layers:
            raise TuningError(f"deep prompt has {self.deep_key.shape[0]} layers, the model {n_layers}")
        if self.prompt.shape[1] != model.cfg.embed_dim:
            raise TuningError(f"prompt width {self.prompt.shape[1]} != model width {model.cfg.embed_dim}")

    def forward_kwargs(self, batch_size: int = 1) -> dict[str, Any]:
        """``input_prompt`` (B, L, D), ``kv_replace`` (per layer ``(B, L, D)`` twice) and ``embed_override``."""
        kwargs: dict[str, Any] = {"input_prompt": self.prompt[None].expand(batch_size, -1, -1)}  # (B, L, D)
        if self.config.deep:
            kwargs["kv_replace"] = [
                (k[None].expand(batch_size, -1, -1), v[None].expand(batch_size, -1, -1))  # (B, L, D) each
                for k, v in zip(self.deep_key, self.deep_value)
            ]
        if self.config.train_separator:
            kwargs["embed_override"] = {self.separator_id: self.separator}
        return kwargs


@torch.no_grad()
def _kv_inputs(model: UnitLM, ids: torch.Tensor) -> torch.Tensor:
    """``(layers, L, D)`` float32: the input each layer's attention gives its k/v projections (after the pre-LN) when
    the frozen LM reads the tokens ``ids`` in eval mode."""
    captured: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0][0].float()))
             for layer in model.transformer_layers()]
    was_training = model.training
    try:
        model.eval()
        model(ids[None])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return torch.stack(captured)
