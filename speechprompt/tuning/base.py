"""The contract every tuning method keeps, and the one function that decides what trains.

A method is three things, as in HF PEFT: a config dataclass, an ``nn.Module`` that owns exactly its trainable
tensors (:class:`TuningMethod`), and an injection (:meth:`TuningMethod.attach`) that wires those tensors into a
backbone through the hooks of :mod:`speechprompt.models.transformer`. Methods see a backbone only through
``model.transformer_layers()``, so each works on the unit LM and on HuBERT alike.

Naming. Tensors that a method injects into the backbone (adapters, LoRA factors, router scores, BitFit's biases) are
registered in the method under the *same dotted path they have in the backbone*, e.g.
``decoder.layers.0.self_attn.q_proj.lora.A``. So ``method.state_dict()`` keys are exactly the names of the trainable
parameters in ``model.named_parameters()`` after :func:`freeze_except`, and a checkpoint reads like the model it
belongs to. The frozen backbone tensors keep their names: nothing is renamed or wrapped under a new prefix.

Lifecycle::

    method = build_method("lora", model)   # construct (sized from the model) + attach
    freeze_except(model, method)           # backbone frozen, the method's tensors trainable
    logits = model(tokens, **method.forward_kwargs(batch_size))
    method.detach()                        # the backbone is back to its original modules

Fingerprint the frozen backbone *before* attaching a method: attached modules add state-dict entries, and BitFit
trains backbone biases in place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from speechprompt.config import ConfigError
from speechprompt.errors import SpeechPromptError
from speechprompt.models.transformer import TransformerLayer

E = TypeVar("E", bound=enum.Enum)


def as_enum(cls: type[E], value: Any, field: str) -> E:
    """``cls(value)`` for a config's ``__post_init__``, with a :class:`ConfigError` naming the valid values."""
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not one of {[m.value for m in cls]}") from None


class TuningError(SpeechPromptError, ValueError):
    """A tuning method that does not fit the model it is given (wrong backbone, shape, slot already taken)."""


class LinearName(str, enum.Enum):
    """The linear projections of a :class:`TransformerLayer` that LoRA and S3-Router masks can target.

    A layer's FFN is either ``fc1``/``fc2`` (fairseq, OPT, the encoders) or SwiGLU's ``gate_proj``/``up_proj``/
    ``down_proj`` (LLaMA, Qwen2). Either spelling works on either backbone, so one config targets "the FFN" anywhere:

    ============  ======================  =============
    name          SwiGLU layer            fc1/fc2 layer
    ============  ======================  =============
    fc1           gate_proj and up_proj   fc1
    fc2           down_proj               fc2
    gate_proj     gate_proj               fc1
    up_proj       up_proj                 fc1
    down_proj     down_proj               fc2
    ============  ======================  =============

    A projection named twice (``fc1`` and ``gate_proj``) is targeted once. LLaMA's and Qwen2's name of the attention
    output, ``o_proj``, is accepted for ``out_proj`` (:data:`LINEAR_ALIASES`).
    """

    Q = "q_proj"
    K = "k_proj"
    V = "v_proj"
    OUT = "out_proj"
    FC1 = "fc1"
    FC2 = "fc2"
    GATE = "gate_proj"
    UP = "up_proj"
    DOWN = "down_proj"

    @classmethod
    def _missing_(cls, value: object) -> LinearName | None:
        alias = LINEAR_ALIASES.get(value) if isinstance(value, str) else None
        return cls(alias) if alias is not None else None

    @property
    def path(self) -> str:
        """Dotted path of the projection inside a layer (of fairseq's kind for fc1/fc2)."""
        if self in (LinearName.FC1, LinearName.FC2):
            return self.value
        if self in (LinearName.GATE, LinearName.UP, LinearName.DOWN):
            return f"mlp.{self.value}"
        return f"self_attn.{self.value}"

    def paths(self, layer: nn.Module) -> list[str]:
        """The dotted paths this name selects in ``layer`` (see the class docstring's table)."""
        swiglu = getattr(layer, "mlp", None) is not None
        if swiglu and self is LinearName.FC1:
            return ["mlp.gate_proj", "mlp.up_proj"]
        if swiglu and self is LinearName.FC2:
            return ["mlp.down_proj"]
        if not swiglu and self in (LinearName.GATE, LinearName.UP):
            return ["fc1"]
        if not swiglu and self is LinearName.DOWN:
            return ["fc2"]
        return [self.path]


# Other names users know a projection by (the Hugging Face LLaMA/Qwen2 attention output) -> ours.
LINEAR_ALIASES = {"o_proj": "out_proj"}
# Every spelling a config or the command line may use for a projection.
LINEAR_CHOICES = [t.value for t in LinearName] + list(LINEAR_ALIASES)

# The default target set of "every linear": q, k, v, out, fc1, fc2 (fc1/fc2 cover SwiGLU's three projections).
ALL_LINEARS = [LinearName.Q, LinearName.K, LinearName.V, LinearName.OUT, LinearName.FC1, LinearName.FC2]
FFN_LINEARS = [LinearName.FC1, LinearName.FC2, LinearName.GATE, LinearName.UP, LinearName.DOWN]


def transformer_layers(model: nn.Module) -> list[TransformerLayer]:
    """The backbone's transformer layers, checked. Raises :class:`TuningError` for anything else."""
    get = getattr(model, "transformer_layers", None)
    if not callable(get):
        raise TuningError(f"{type(model).__name__} has no transformer_layers(): not a speechprompt backbone")
    layers = list(get())
    if not layers or not all(isinstance(layer, TransformerLayer) for layer in layers):
        raise TuningError(f"{type(model).__name__}.transformer_layers() must return TransformerLayer modules")
    return layers


def backbone_device(model: nn.Module) -> torch.device:
    """Where the backbone's parameters live: methods create their tensors there."""
    return next(model.parameters()).device


def select_layers(num_layers: int, indices: list[int] | None) -> list[int]:
    """Resolve a config's ``layers`` (``None`` = all; negative indices count from the top) to sorted indices."""
    if indices is None:
        return list(range(num_layers))
    out = set()
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise TuningError(f"layer index {i} is out of range for a model with {num_layers} layers")
        out.add(i % num_layers)
    return sorted(out)


def target_linears(
    model: nn.Module, layers: list[int] | None, targets: list[LinearName], method: str
) -> list[tuple[str, nn.Linear]]:
    """The ``(backbone path, linear)`` of each target projection in the chosen layers, in layer then target order.

    ``layers`` is a config's layer selection (see :func:`select_layers`); ``method`` names the caller in errors.
    A target that is no longer an ``nn.Linear`` means another method has wrapped it.
    """
    blocks = transformer_layers(model)
    paths = module_paths(model)
    out = []
    for i in select_layers(len(blocks), layers):
        chosen = dict.fromkeys(path for target in targets for path in target.paths(blocks[i]))  # once each, in order
        for path in chosen:
            linear = blocks[i].get_submodule(path)
            if not isinstance(linear, nn.Linear):
                name = path.rpartition(".")[2]
                raise TuningError(f"{method} target {name} of layer {i} is a {type(linear).__name__}, "
                                  "not an nn.Linear (is another method attached?)")
            out.append((paths[id(linear)], linear))
    return out


def module_paths(model: nn.Module) -> dict[int, str]:
    """``id(module) -> dotted name`` for every submodule, so injected tensors can be named by their location."""
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def set_submodule(root: nn.Module, path: str, module: nn.Module | None) -> None:
    """Replace the child at dotted ``path`` (``None`` empties an adapter slot)."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in ``module``'s parameters, each shared parameter counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class TuningMethod(nn.Module):
    """Base of every tuning method: owns its trainable tensors and knows how to wire them into a backbone.

    Subclasses build their tensors in ``__init__(config, model)`` (sizes come from the model; the model itself is
    not modified and not stored), and implement :meth:`_inject`. Trainable tensors are float32 on the backbone's
    device whatever the backbone's dtype (the optimizer needs the precision); injected modules cast activations.
    Methods that act through forward arguments (prompts, prefixes) override :meth:`forward_kwargs` instead and
    inject nothing.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        # Undo actions of the current attachment, most recent last. A plain list: the backbone must never become a
        # submodule of the method (it would enter the method's state dict).
        self._undo: list[Callable[[], None]] = []
        self._attached = False

    # -- injection -------------------------------------------------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        return self._attached

    def attach(self, model: nn.Module) -> None:
        """Wire this method into ``model`` (set adapter slots, wrap or hook linears). Undone by :meth:`detach`."""
        if self._attached:
            raise TuningError(f"{type(self).__name__} is already attached; call detach() first")
        self._undo = []
        try:
            self._inject(model)
        except BaseException:
            self.detach()
            raise
        self._attached = True

    def detach(self) -> None:
        """Restore the backbone's original modules. The method keeps its (trained) tensors."""
        while self._undo:
            self._undo.pop()()
        self._attached = False

    def _inject(self, model: nn.Module) -> None:
        """Inject into ``model``; register an undo action with :meth:`_on_detach` for every change."""

    def _on_detach(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def _fill_slot(self, model: nn.Module, path: str) -> None:
        """Put this method's module registered at ``path`` into the backbone's empty module slot of the same path
        (a transformer layer's ``post_ffn``, a conv front end's ``conv_adapters.3``); :meth:`detach` empties it."""
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            raise TuningError(f"the model has no {parent_path!r} to hold {path}") from None
        if not hasattr(parent, name):
            raise TuningError(f"{type(parent).__name__} at {parent_path!r} has no adapter slot {name!r}")
        if getattr(parent, name) is not None:
            raise TuningError(f"adapter slot {path} is already taken by {type(getattr(parent, name)).__name__}")
        setattr(parent, name, self.get_submodule(path))
        self._on_detach(lambda: setattr(parent, name, None))

    def forward_kwargs(self, batch_size: int = 1) -> dict[str, Any]:
        """Extra keyword arguments of the backbone's forward (``input_prompt``, ``kv_replace``, ``prefix``,
        ``embed_override``). Tensors have a leading batch dim of ``batch_size`` (1 broadcasts over any batch)."""
        return {}

    # -- parameters and checkpoints ----------------------------------------------------------------------------------

    def trainable_parameters(self) -> int:
        """How many scalars this method trains."""
        return count_parameters(self)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The tensors a task checkpoint stores. By default the state dict; a method may store a smaller,
        inference-ready form instead (a packed bitmask, a folded prefix)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_exported_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`export_state_dict` wrote (strictly: missing or unexpected keys are errors)."""
        self.load_state_dict(state, strict=True)

    def _own(self, path: str, obj: nn.Module | nn.Parameter) -> None:
        """Register ``obj`` under ``path``, the dotted path it has (or will have once attached) in the backbone."""
        parent, _, name = path.rpartition(".")
        node: nn.Module = self
        for part in parent.split(".") if parent else []:
            child = node._modules.get(part)
            if child is None:
                if hasattr(node, part):
                    raise TuningError(f"cannot mirror {path!r}: {part!r} clashes with an attribute of the method")
                child = nn.Module()
                node.add_module(part, child)
            node = child
        if isinstance(obj, nn.Parameter):
            node.register_parameter(name, obj)
        else:
            node.add_module(name, obj)


def freeze_except(model: nn.Module, method: TuningMethod) -> list[nn.Parameter]:
    """Freeze every backbone parameter, then make exactly ``method``'s own parameters trainable.

    Selection is by ownership (``method.parameters()``), never by parameter names. BitFit's parameters *are*
    backbone biases, so they end up trainable; everything else in ``model`` ends up frozen.

    Returns:
        The trainable parameters, for the optimizer.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(method.parameters())
    for p in params:
        p.requires_grad_(True)
    return params
