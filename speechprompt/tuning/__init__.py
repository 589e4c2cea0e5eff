"""Parameter-efficient tuning methods, chosen by name from one registry.

============  ===========================  =======================================================================
name          config                       what trains
============  ===========================  =======================================================================
prompt        :class:`PromptConfig`        input prompt, deep key/value prompts, ``<s>`` separator (unit LM only)
prefix        :class:`PrefixConfig`        projected per-layer keys/values (optional MLP reparameterisation)
adapter       :class:`AdapterConfig`       bottleneck adapters: serial (Houlsby) and/or parallel (AdaptFormer)
aat           :class:`AATConfig`           AAT's MLP adapter (beside the FFN) and spatial adapter (after attention)
adapter_bias  :class:`AdapterBiasConfig`   AdapterBias: a vector per layer, scaled per token, added to the FFN output
cnn_adapter   :class:`CnnAdapterConfig`    CHAPTER's CNN adapters after the conv blocks of a waveform front end
lora          :class:`LoraConfig`          low-rank updates of chosen linears (mergeable)
bitfit        :class:`BitFitConfig`        the backbone's biases
mask          :class:`MaskConfig`          S3-Router scores selecting which frozen weights to keep
============  ===========================  =======================================================================

Several S3-Router masks over one backbone (one per task or language): :class:`~speechprompt.tuning.mask_bank.MaskBank`.

Two baselines train through the same machinery (:mod:`speechprompt.tuning.baselines`): ``full_finetune`` (every
backbone parameter) and ``linear_probe`` (the frozen backbone; only the task's head trains).

Usage::

    method = build_method(method_config("lora", {"rank": 4}), model)   # built for and attached to model
    params = freeze_except(model, method)                              # optimizer gets exactly these
    logits = model(tokens, **method.forward_kwargs())

A new method registers itself with :func:`register_method` (name, config dataclass, :class:`TuningMethod`
subclass whose ``__init__`` takes ``(config, model)``); nothing else in the toolkit needs to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from speechprompt.config import from_dict, option
from speechprompt.tuning.aat import AAT, AATConfig
from speechprompt.tuning.adapter import AdapterConfig, Adapters
from speechprompt.tuning.adapter_bias import AdapterBias, AdapterBiasConfig
from speechprompt.tuning.base import TuningError, TuningMethod, count_parameters, freeze_except
from speechprompt.tuning.baselines import FrozenBackbone, FullFinetune, FullFinetuneConfig, LinearProbeConfig
from speechprompt.tuning.bitfit import BitFit, BitFitConfig
from speechprompt.tuning.cnn_adapter import CnnAdapterConfig, CnnAdapters
from speechprompt.tuning.lora import Lora, LoraConfig
from speechprompt.tuning.mask import MaskConfig, S3Router, sparsity_sweep
from speechprompt.tuning.mask_bank import MaskBank
from speechprompt.tuning.prefix import PrefixConfig, PrefixTuning
from speechprompt.tuning.prompt import PromptConfig, PromptTuning


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config dataclass and module class.

    ``baseline`` marks the reference points of :mod:`speechprompt.tuning.baselines` (full fine-tuning, the linear
    probe), which train through the same machinery but are not parameter-efficient methods.
    """

    name: str
    config_cls: type
    method_cls: type[TuningMethod]
    baseline: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, method_cls: type[TuningMethod], baseline: bool = False) -> None:
    """Make a method available by ``name`` to :func:`build_method` and to configs."""
    if name in METHODS:
        raise ValueError(f"tuning method {name!r} is already registered")
    if any(spec.config_cls is config_cls for spec in METHODS.values()):
        raise ValueError(f"{config_cls.__name__} already belongs to another method")
    METHODS[name] = MethodSpec(name, config_cls, method_cls, baseline)


def _spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise TuningError(f"unknown tuning method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """The config of method ``name`` from a plain mapping (YAML / a checkpoint sidecar), checked strictly."""
    return from_dict(_spec(name).config_cls, dict(options or {}), where=name)


def method_name(config: Any) -> str:
    """The registered name of a config object (what a checkpoint sidecar records)."""
    for spec in METHODS.values():
        if type(config) is spec.config_cls:
            return spec.name
    raise TuningError(f"{type(config).__name__} is not the config of a registered tuning method")


def build_method(name_or_config: str | Any, model: nn.Module, attach: bool = True) -> TuningMethod:
    """Build a method for ``model`` from a registered name (default config) or a config object.

    Args:
        attach: inject it into ``model`` right away (prompt and prefix methods inject nothing either way).
    """
    config = _spec(name_or_config).config_cls() if isinstance(name_or_config, str) else name_or_config
    method = METHODS[method_name(config)].method_cls(config, model)
    if attach:
        method.attach(model)
    return method


register_method("prompt", PromptConfig, PromptTuning)
register_method("prefix", PrefixConfig, PrefixTuning)
register_method("adapter", AdapterConfig, Adapters)
register_method("aat", AATConfig, AAT)
register_method("adapter_bias", AdapterBiasConfig, AdapterBias)
register_method("cnn_adapter", CnnAdapterConfig, CnnAdapters)
register_method("lora", LoraConfig, Lora)
register_method("bitfit", BitFitConfig, BitFit)
register_method("mask", MaskConfig, S3Router)
register_method("full_finetune", FullFinetuneConfig, FullFinetune, baseline=True)
register_method("linear_probe", LinearProbeConfig, FrozenBackbone, baseline=True)


@dataclasses.dataclass
class MethodConfig:
    """What trains: a registered method (or baseline) by name, with that method's own options (checked against its
    config dataclass)."""

    name: str = option("prompt", help="prompt | prefix | adapter | aat | adapter_bias | cnn_adapter | lora | "
                       "bitfit | mask | full_finetune | linear_probe")
    options: dict[str, Any] = option({}, help="the method's config fields, e.g. {length: 5, deep: true} for prompt")

    def __post_init__(self) -> None:
        method_config(self.name, self.options)  # unknown names, keys and bad values fail here, not mid-run

    def resolved(self) -> Any:
        """The method's config dataclass."""
        return method_config(self.name, self.options)

__all__ = [
    "AAT",
    "METHODS",
    "AATConfig",
    "AdapterBias",
    "AdapterBiasConfig",
    "CnnAdapterConfig",
    "CnnAdapters",
    "AdapterConfig",
    "Adapters",
    "BitFit",
    "BitFitConfig",
    "Lora",
    "LoraConfig",
    "MaskBank",
    "MaskConfig",
    "MethodConfig",
    "MethodSpec",
    "PrefixConfig",
    "PrefixTuning",
    "PromptConfig",
    "PromptTuning",
    "S3Router",
    "TuningError",
    "TuningMethod",
    "build_method",
    "count_parameters",
    "freeze_except",
    "method_config",
    "method_name",
    "register_method",
    "sparsity_sweep",
]
