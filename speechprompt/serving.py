"""Multi-task serving: one frozen unit LM in memory, a bank of task checkpoints, batches that mix tasks.

Prompt, prefix and adapter checkpoints add a few kilobytes to megabytes per task to a base model of hundreds of
megabytes, so a server keeps *one* base model and every task's tensors, and answers a batch whose rows belong to
different tasks in a single forward pass. Each row gets exactly what running its task alone gives::

    bank = TaskBank(base_lm)
    bank.add_checkpoint("exp/commands/prompt/best")       # named "best" unless name= is given
    bank.add_checkpoint("exp/intent/adapter/best", name="intent")
    logits = bank.logits(tokens, ["best", "intent", ...])  # (B, T, V), one task per row
    labels = bank.predict(units, ["best", "intent", ...])   # one label per row

How each method is expressed per row (the hooks are :meth:`UnitLM.forward`'s):

* **prefix** (projected keys/values): the batch's prefix is as long as the longest prefix among its rows; a row
  with a shorter one (or none) has the missing entries masked (``prefix_padding``), like padded tokens.
* **deep prompt** (SpeechPrompt): replacing the key/value *inputs* of the L prompt positions in every layer is,
  for the token positions, the same as a prefix of ``k_proj(K_in)``, ``v_proj(V_in)`` (see
  :meth:`UnitLM.features`), whose outputs do not depend on the input prompt. So a deep prompt is served as that
  prefix, projected once when the task is added.
* **input prompt** (no deep part): the prompt sits before the tokens, has no positional embedding and, under the
  causal mask, sees only itself. So its keys and values in every layer are the same for every input: they are
  computed once when the task is added, and the prompt is served as that prefix too. No prompt position then runs
  through the network per request, and every prompt-like method reduces to one per-row prefix.
* **separator**: ``embed_override`` with one ``<s>`` vector per row; tasks without a trained separator get the
  frozen table's row, which is the row the table would give anyway.
* **adapters**: each adapter slot of the backbone holds a :class:`TaskRouter` that runs every task's own
  bottleneck on that task's rows (rows of tasks without an adapter there pass through unchanged).

Methods that change the frozen weights themselves (LoRA, BitFit, S3-Router masks, full fine-tuning) cannot share
one set of weights across rows and are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from speechprompt.checkpoint import base_fingerprint, load_base, load_checkpoint, load_into
from speechprompt.errors import CheckpointError, SpeechPromptError
from speechprompt.models.generation import greedy
from speechprompt.models.hf_decoders import load_speech_lm
from speechprompt.models.transformer import KVCache, LayerKV
from speechprompt.models.unit_lm import UnitLM
from speechprompt.models.unit_vocab import model_vocab
from speechprompt.tasks.data import collate
from speechprompt.tuning import Adapters, PrefixTuning, PromptTuning, build_method, method_config
from speechprompt.tuning.adapter import AdapterSlot
from speechprompt.tuning.base import TuningMethod, module_paths
from speechprompt.verbalizers import verbalizer_from_dict


class ServingError(SpeechPromptError, ValueError):
    """A task that cannot be served, or a request naming an unknown task."""


class TaskRouter(nn.Module):
    """Occupies one adapter slot of the shared backbone and applies each row's own task's adapter there.

    ``rows`` (set by :meth:`TaskBank.routing` around every forward) holds each batch row's task index. Rows of a
    task that has an adapter in this slot go through that adapter; the others pass through as if the slot were
    empty: unchanged for a serial slot, nothing added for a parallel one. Input and output are ``(B, T, D)``.

    Args:
        serial: the slot is serial (``post_attn``/``post_ffn``: adapters return ``x + branch``) rather than
            parallel (``parallel_ffn``: adapters return the branch alone, added to the FFN output by the layer).
    """

    def __init__(self, serial: bool) -> None:
        super().__init__()
        self.serial = serial
        self.branches = nn.ModuleDict()  # str(task index) -> the task's Bottleneck
        self.rows: Tensor | None = None  # (B,) long task indices

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is None:
            raise ServingError("the shared backbone holds per-task adapters: call it through TaskBank")
        if self.rows.shape[0] != x.shape[0]:
            raise ServingError(f"{self.rows.shape[0]} task indices for a batch of {x.shape[0]} rows")
        out = x.clone() if self.serial else torch.zeros_like(x)  # (B, T, D)
        for key, branch in self.branches.items():
            sel = (self.rows == int(key)).nonzero().squeeze(1)  # (b,) rows of this task
            if sel.numel():
                # The task's own module on its own rows: the same computation as serving the task alone.
                out.index_copy_(0, sel, branch(x.index_select(0, sel)))
        return out


@dataclass
class ServedTask:
    """One task of a :class:`TaskBank`: what it adds to the frozen model, and how its outputs read.

    Attributes:
        name: The name requests use.
        method: The registered method name (``prompt``, ``prefix`` or ``adapter``).
        prefix: ``(layers, 2, H, P, hd)`` keys (index 0) and values (index 1) that the task's tokens attend to
            before themselves in every layer (its prefix, deep prompt or input prompt), or ``None``.
        separator: ``(D,)`` the ``<s>`` vector, or ``None`` (the frozen row).
        kind: The task head (``verbalized``, ``learnable``, ...), ``None`` for a bare method.
        verbalizer: The task's verbalizer (maps labels to unit tokens), if any.
        head: The trainable head (a learnable verbalizer), if any.
        trainable_params: Scalars the task's method trains.
    """

    name: str
    method: str
    prefix: Tensor | None = None
    separator: Tensor | None = None
    kind: str | None = None
    verbalizer: Any = None
    head: nn.Module | None = None
    trainable_params: int = 0
    adapter_sites: list[str] = field(default_factory=list)


class TaskBank:
    """A frozen :class:`UnitLM` shared by many tasks; any batch may mix rows of any tasks.

    The base model is put in eval mode and frozen; its weights are never changed. Tasks' tensors are kept in
    float32 on the model's device and cast like the methods themselves cast them.

    Args:
        model: The frozen base unit LM.
        base_path: Where it was loaded from (named in fingerprint errors).
    """

    def __init__(self, model: UnitLM, base_path: str | os.PathLike | None = None) -> None:
        if not isinstance(model, UnitLM):
            raise ServingError(f"multi-task serving needs the unit LM, got {type(model).__name__}")
        self.model = model.eval()
        self.vocab = model_vocab(model)  # <s> </s> and the unit ids of this LM's vocabulary
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_path = base_path
        self.fingerprint = base_fingerprint(model)  # before any router enters a slot
        self.tasks: dict[str, ServedTask] = {}
        self._routers: dict[str, TaskRouter] = {}  # slot path in the backbone -> router
        self._banks: dict[str, Tensor] | None = None  # stacked per-task tensors, rebuilt after add()

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | os.PathLike], base: str | os.PathLike | None = None) -> TaskBank:
        """Load the base LM once (``base``, or the one the first checkpoint recorded; fingerprint-checked) and add
        every checkpoint."""
        if not paths:
            raise ServingError("no task checkpoints given")
        model, _, base = load_base(load_checkpoint(paths[0]), base, load_speech_lm, what="base unit LM",
                                   flag="base=")
        bank = cls(model, base)
        for p in paths:
            bank.add_checkpoint(p)
        return bank

    # -- adding tasks ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.decoder.embed_tokens.weight.device

    def add_checkpoint(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Add a task checkpoint (see :mod:`speechprompt.checkpoint`) trained on this bank's base model.

        Args:
            name: The task's name in requests; default: the checkpoint's file stem.
        Returns:
            The name.
        Raises:
            CheckpointError: the checkpoint belongs to another base model, or its tensors do not fit.
            ServingError: the method cannot be served from a shared backbone, or the name is taken.
        """
        ckpt = load_checkpoint(path)
        ckpt.check_base(self.fingerprint, self.base_path)
        meta = ckpt.meta
        method_name = meta["method"]["name"]
        if method_name not in _ADDERS:
            raise ServingError(f"{ckpt.path}: method {method_name!r} changes the shared weights and cannot be "
                               f"served in mixed batches; servable methods: {', '.join(_ADDERS)}")
        method = build_method(method_config(method_name, meta["method"].get("config")), self.model, attach=False)
        try:
            method.load_exported_state_dict(ckpt.method_state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: method tensors do not fit method {method_name!r} ({e})") from None
        verbalizer = verbalizer_from_dict(meta["verbalizer"], self.vocab) if meta.get("verbalizer") else None
        kind = meta.get("task", {}).get("kind")
        head = None
        if kind == "learnable":
            head = verbalizer
            load_into(head, ckpt.head_state, "head", ckpt.path)
            head.to(self.device).eval()
        return self.add(name or ckpt.path.stem, method, kind=kind, verbalizer=verbalizer, head=head)

    @torch.no_grad()
    def add(
        self, name: str, method: TuningMethod, *, kind: str | None = None, verbalizer: Any = None,
        head: nn.Module | None = None,
    ) -> str:
        """Add a trained method (not attached to the model) as task ``name``; its tensors are copied.

        Returns:
            The name.
        """
        if name in self.tasks:
            raise ServingError(f"a task named {name!r} is already served")
        if method.is_attached:
            raise ServingError(f"task {name!r}: detach the method first; the bank wires it in per row")
        adder = next((fn for cls, fn in _ADDERS.values() if isinstance(method, cls)), None)
        if adder is None:
            raise ServingError(f"task {name!r}: {type(method).__name__} cannot be served in mixed batches")
        task = ServedTask(name, _method_key(method), kind=kind, verbalizer=verbalizer, head=head,
                          trainable_params=method.trainable_parameters())
        adder(self, task, method, len(self.tasks))
        self.tasks[name] = task
        self._banks = None
        return name

    def _add_prompt(self, task: ServedTask, method: PromptTuning, index: int) -> None:
        if method.config.deep:
            prefix = []
            for layer, k_in, v_in in zip(self.model.transformer_layers(), method.deep_key, method.deep_value):
                attn = layer.self_attn
                L = k_in.shape[0]
                k = attn.k_proj(k_in.to(attn.k_proj.weight.dtype)).float()  # (L, D)
                v = attn.v_proj(v_in.to(attn.v_proj.weight.dtype)).float()
                prefix.append(torch.stack([k, v]).view(2, L, attn.num_kv_heads, attn.head_dim).transpose(1, 2))
            task.prefix = torch.stack(prefix)  # (layers, 2, H, L, hd)
        else:
            # Run the prompt once before a throw-away token: the cache then holds the prompt's keys and values.
            cache = KVCache()
            prompt = method.prompt.detach()[None].to(self.model.decoder.embed_tokens.weight.dtype)  # (1, L, D)
            token = torch.full((1, 1), self.vocab.eos, device=self.device)
            with self.routing(torch.full((1,), -1, device=self.device)):  # no task's adapter applies
                self.model(token, input_prompt=prompt, cache=cache)
            L = prompt.shape[1]
            task.prefix = torch.stack([
                torch.stack([kv.key[0, :, :L], kv.value[0, :, :L]]) for kv in cache.layers
            ]).float()  # (layers, 2, H, L, hd)
        if method.config.train_separator:
            task.separator = method.separator.detach().float().clone()  # (D,)

    def _add_prefix(self, task: ServedTask, method: PrefixTuning, index: int) -> None:
        layer_kvs = method.forward_kwargs(1)["prefix"]
        task.prefix = torch.stack([torch.stack([kv.key[0], kv.value[0]]) for kv in layer_kvs]).detach().float()

    def _add_adapter(self, task: ServedTask, method: Adapters, index: int) -> None:
        paths = module_paths(self.model)
        layer_paths = {paths[id(layer)] for layer in self.model.transformer_layers()}
        for path, slot in method.sites:
            layer_path, _, slot_name = path.rpartition(".")
            if layer_path not in layer_paths:
                raise ServingError(f"task {task.name!r}: the model has no layer {layer_path!r} for an adapter")
            router = self._routers.get(path)
            if router is None:
                layer = self.model.get_submodule(layer_path)
                if getattr(layer, slot_name) is not None:
                    raise ServingError(f"adapter slot {path} of the shared model is already taken")
                router = TaskRouter(serial=slot is not AdapterSlot.PARALLEL_FFN)
                setattr(layer, slot_name, router)
                self._routers[path] = router
            branch = copy.deepcopy(method.get_submodule(path))  # the served task no longer follows the method
            router.branches[str(index)] = branch.to(self.device).eval().requires_grad_(False)
            task.adapter_sites.append(path)

    # -- requests --------------------------------------------------------------------------------------------------

    def task_indices(self, tasks: Sequence[str]) -> Tensor:
        """``(B,)`` long index of each row's task (in the order tasks were added)."""
        order = {name: i for i, name in enumerate(self.tasks)}
        unknown = sorted({t for t in tasks if t not in order})
        if unknown:
            raise ServingError(f"unknown task(s) {unknown}; served: {', '.join(self.tasks) or '(none)'}")
        return torch.tensor([order[t] for t in tasks], dtype=torch.long, device=self.device)

    def _stacked(self) -> dict[str, Tensor]:
        """Every task's tensors padded to a common prefix length and stacked on a leading task dim (built once).

        Prefixes are right-aligned, so that a batch needing only the last ``n`` slots slices them.
        """
        if self._banks is not None:
            return self._banks
        tasks, dev = list(self.tasks.values()), self.device
        cfg = self.model.cfg
        attn = self.model.transformer_layers()[0].self_attn
        n = len(tasks)
        H, hd = attn.num_kv_heads, attn.head_dim  # prefixes are projected keys/values: the k/v heads
        P = max((t.prefix.shape[3] for t in tasks if t.prefix is not None), default=0)
        prefix = torch.zeros(n, cfg.layers, 2, H, P, hd)
        prefix_pad = torch.ones(n, P, dtype=torch.bool)
        frozen_bos = self.model.decoder.embed_tokens.weight[self.vocab.bos].detach().float().cpu()
        separator = frozen_bos.expand(n, -1).clone()  # (n, D_in): the table's width, D unless project_in
        for i, t in enumerate(tasks):
            if t.prefix is not None:
                p = t.prefix.shape[3]
                prefix[i, ..., P - p:, :] = t.prefix.cpu()
                prefix_pad[i, P - p:] = False
            if t.separator is not None:
                separator[i] = t.separator.cpu()
        self._banks = {"prefix": prefix.to(dev), "prefix_pad": prefix_pad.to(dev), "separator": separator.to(dev)}
        return self._banks

    def forward_kwargs(self, rows: Tensor) -> dict[str, Any]:
        """Keyword arguments of :meth:`UnitLM.forward` giving each row its task's prefix and separator.

        Args:
            rows: ``(B,)`` task indices (:meth:`task_indices`).
        """
        banks = self._stacked()
        kwargs: dict[str, Any] = {"embed_override": {self.vocab.bos: banks["separator"][rows]}}  # (B, D)
        prefix_pad = banks["prefix_pad"][rows]  # (B, P)
        used = prefix_pad.shape[1] - int((~prefix_pad).sum(1).max()) if prefix_pad.numel() else 0
        if prefix_pad.shape[1] > used:
            prefix = banks["prefix"][rows][..., used:, :]  # (B, layers, 2, H, P', hd): only slots someone uses
            kwargs["prefix"] = [LayerKV(prefix[:, i, 0], prefix[:, i, 1]) for i in range(prefix.shape[1])]
            kwargs["prefix_padding"] = prefix_pad[:, used:]
        return kwargs

    @contextlib.contextmanager
    def routing(self, rows: Tensor) -> Iterator[None]:
        """Within the block, the adapter slots route batch row ``b`` to task ``rows[b]``."""
        for router in self._routers.values():
            router.rows = rows
        try:
            yield
        finally:
            for router in self._routers.values():
                router.rows = None

    @torch.no_grad()
    def logits(self, tokens: Tensor, tasks: Sequence[str]) -> Tensor:
        """``(B, T, V)`` logits of ``tokens`` (B, T), row ``b`` under task ``tasks[b]``.

        Padding may sit on either side, as for :meth:`UnitLM.forward`.
        """
        rows = self.task_indices(tasks)
        with self.routing(rows):
            return self.model(tokens.to(self.device), **self.forward_kwargs(rows))

    @torch.no_grad()
    def generate(self, prefix: Tensor, tasks: Sequence[str], max_new_tokens: int) -> Tensor:
        """Greedy continuation (KV cache) of the left-padded ``prefix`` (B, T), row ``b`` under ``tasks[b]``.

        Returns:
            ``(B, N)`` generated tokens, ``<pad>`` after each row's ``</s>``.
        """
        rows = self.task_indices(tasks)
        with self.routing(rows):
            return greedy(self.model, prefix.to(self.device), max_new_tokens, self.vocab.eos,
                          model_kwargs=self.forward_kwargs(rows))

    @torch.no_grad()
    def predict(self, units: Sequence[Sequence[int]], tasks: Sequence[str]) -> list[str]:
        """One prediction per utterance: ``units[b]`` are unit ids (``0..K-1``, as in ``.units`` files) and
        ``tasks[b]`` the task to answer. Verbalized tasks decode their greedy output (the ``greedy`` decoder of
        :class:`~speechprompt.tasks.classification.VerbalizedClassifier`); learnable-verbalizer tasks take the
        argmax of their head over the vocabulary logits at ``<s>``.
        """
        if len(units) != len(tasks):
            raise ServingError(f"{len(units)} utterances but {len(tasks)} task names")
        self.task_indices(tasks)  # every name checked before any work
        served = [self.tasks[t] for t in tasks]
        for t in served:
            if t.kind not in ("verbalized", "learnable") or t.verbalizer is None:
                raise ServingError(f"task {t.name!r} ({t.kind}) has no classification verbalizer to predict with")
        for row in units:
            self.vocab.check_units(row)
        prefix = collate([[self.vocab.token(u) for u in row] for row in units], [""] * len(units), None,
                         vocab=self.vocab).prefix
        # Verbalized rows decode greedily for as many steps as the longest label among them needs; each row then
        # keeps its own task's label length, which is what its task alone generates.
        steps = max((t.verbalizer.target_length for t in served if t.kind == "verbalized"), default=0)
        generated = self.generate(prefix, tasks, steps).tolist() if steps else None
        vocab = None
        if any(t.kind == "learnable" for t in served):
            vocab = self.logits(prefix, tasks)[:, -1].float()  # (B, V) at <s>
        out = []
        for b, t in enumerate(served):
            if t.kind == "learnable":
                out.append(t.verbalizer.labels[int(t.head(vocab[b : b + 1]).argmax(dim=1))])
            else:
                out.append(t.verbalizer.decode(generated[b][: t.verbalizer.target_length]))
        return out


def _method_key(method: TuningMethod) -> str:
    return next(name for name, (cls, _) in _ADDERS.items() if isinstance(method, cls))


# Registered method name -> (method class, how its tensors enter a TaskBank).
_ADDERS: dict[str, tuple[type[TuningMethod], Any]] = {
    "prompt": (PromptTuning, TaskBank._add_prompt),
    "prefix": (PrefixTuning, TaskBank._add_prefix),
    "adapter": (Adapters, TaskBank._add_adapter),
}

__all__ = ["ServedTask", "ServingError", "TaskBank", "TaskRouter"]
