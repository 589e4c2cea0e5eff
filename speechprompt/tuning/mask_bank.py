"""Several S3-Router masks over one frozen backbone: one model in memory, one packed bitmask per task or language.

S3-Router's multilingual and multi-task use keeps a single pretrained model and, per language or task, only which
of its weights to keep. A :class:`MaskBank` holds those masks (each 1 bit per weight, as task checkpoints store
them) over one backbone and switches between them::

    bank = MaskBank(model)                                   # the frozen backbone, nothing attached yet
    bank.add_checkpoint("exp/ks_mask/best.safetensors", name="ks")
    bank.add("asr", asr_router.export_state_dict())          # or masks straight from a trained S3Router
    with bank.use("ks"):
        feats = model.extract_features(wav)                  # exactly the "ks" task's model
    out = bank.routed(["ks", "asr", "ks"], lambda rows: model.extract_features(wav[rows], pad[rows]))

Switching unpacks the task's bits into the routers of one :class:`~speechprompt.tuning.mask.S3Router`, so a
selected task computes exactly what its checkpoint loaded alone computes, bit for bit.

A batch whose rows belong to different tasks is served **per group**, not in one fused pass: a mask changes the
weights themselves, so rows of two tasks cannot share a matmul. :meth:`MaskBank.routed` groups the rows by task,
runs each group with its task's mask and puts the outputs back in row order (one forward per task present).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from speechprompt.checkpoint import base_fingerprint, load_checkpoint
from speechprompt.config import from_dict, to_dict
from speechprompt.tuning.base import TuningError
from speechprompt.tuning.mask import MaskConfig, S3Router, unpack_bitmask

MASK_SUFFIX = ".router.mask"


class MaskBank:
    """Named S3-Router masks over one backbone, one of them (or none) active at a time.

    Args:
        model: the frozen backbone (unit LM or encoder), with no method attached.
        fingerprint: the backbone's fingerprint as its checkpoints record it (default: taken from ``model`` now;
            pass the stored model's when ``model`` has since dropped tensors, e.g. pretraining heads).

    The routers are attached on the first :meth:`add`; :meth:`close` detaches them.
    """

    def __init__(self, model: nn.Module, fingerprint: str | None = None) -> None:
        self.model = model
        self.fingerprint = fingerprint or base_fingerprint(model)
        self.masks: dict[str, dict[str, Tensor]] = {}  # task -> {"<linear path>.router.mask": packed uint8}
        self.router: S3Router | None = None
        self.active: str | None = None

    @property
    def tasks(self) -> list[str]:
        """The task names, in the order they were added."""
        return list(self.masks)

    # -- adding ------------------------------------------------------------------------------------------------------

    def add(self, name: str, packed: Mapping[str, Tensor], config: MaskConfig | None = None) -> None:
        """Add the masks of task ``name``: what :meth:`S3Router.export_state_dict` returns (a mask checkpoint's
        method tensors). ``config`` says which linears they mask (default: all linears of every layer)."""
        if name in self.masks:
            raise TuningError(f"task {name!r} is already in the mask bank")
        packed = {k: v.detach().cpu().clone() for k, v in packed.items()}
        if self.router is None:
            # The first task decides the masked linears. The router's initial scores are never used: loading the
            # bitmask fixes every router (and checks every key and size).
            router = S3Router(config or MaskConfig(), self.model)
            router.attach(self.model)
            try:
                router.load_exported_state_dict(packed)
            except BaseException:
                router.detach()
                raise
            self.router, self.masks[name], self.active = router, packed, name
            return
        routers = self.router.routers()
        expected = {path + MASK_SUFFIX for path in routers}
        if set(packed) != expected:
            extra, missing = sorted(set(packed) - expected), sorted(expected - set(packed))
            raise TuningError(f"task {name!r} masks other linears than the bank's first task (extra {extra[:3]}, "
                              f"missing {missing[:3]}): a bank holds masks of one set of linears")
        for path, router in routers.items():  # sizes are checked now, not at the first switch
            unpack_bitmask(packed[path + MASK_SUFFIX], router.shape, f"task {name!r}: {path}")
        self.masks[name] = packed

    def add_checkpoint(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Add the masks of a task checkpoint of the ``mask`` method (unit-LM or SUPERB), after checking that it
        was trained on this backbone. The task is named ``name`` or, by default, the checkpoint's file stem.

        Returns:
            The task's name.
        """
        ckpt = load_checkpoint(path)
        method = ckpt.meta.get("method") or {}
        if method.get("name") != "mask":
            raise TuningError(f"{ckpt.path}: a {method.get('name')!r} checkpoint, not S3-Router masks (method mask)")
        ckpt.check_base(self.fingerprint)
        config = from_dict(MaskConfig, dict(method.get("config") or {}), where="mask")
        if self.router is not None and _linears(config) != _linears(self.router.config):
            raise TuningError(f"{ckpt.path} masks {_linears(config)}, the bank {_linears(self.router.config)}: a "
                              "bank holds masks of one set of linears")
        name = name or ckpt.path.stem
        self.add(name, ckpt.method_state, config)
        return name

    # -- switching ---------------------------------------------------------------------------------------------------

    def select(self, name: str | None) -> None:
        """Make task ``name``'s masks the active ones (``None``: every weight kept, the frozen backbone)."""
        if self.router is None:
            raise TuningError("the mask bank is empty")
        if name is not None and name not in self.masks:
            raise TuningError(f"unknown task {name!r}; in the bank: {', '.join(self.masks)}")
        for path, router in self.router.routers().items():
            if name is None:
                mask = torch.ones(router.shape)
            else:
                mask = unpack_bitmask(self.masks[name][path + MASK_SUFFIX], router.shape, path)
            router.fix(mask)
        self.active = name

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """:meth:`select` ``name`` for the block, then the task active before."""
        previous = self.active
        self.select(name)
        try:
            yield
        finally:
            self.select(previous)

    def routed(self, tasks: Sequence[str], run: Callable[[Tensor], Tensor]) -> Tensor:
        """Outputs of a batch whose rows belong to different tasks, each row computed with its task's masks.

        Rows are grouped by task and each group runs with its task's masks, one forward per task present (not one
        fused pass: see the module docstring); the outputs are put back in row order.

        Args:
            tasks: each row's task, ``B`` names.
            run: the forward of a group: ``rows`` (a ``(G,)`` long tensor of row indices into the batch) -> an
                output whose first dimension is ``G`` (the caller indexes its inputs with ``rows``).

        Returns:
            ``(B, ...)``: the groups' outputs in row order.
        """
        unknown = sorted(set(tasks) - set(self.masks))
        if unknown:
            raise TuningError(f"unknown task(s) {unknown}; in the bank: {', '.join(self.masks) or '(none)'}")
        out: Tensor | None = None
        groups: dict[str, list[int]] = {}
        for row, task in enumerate(tasks):
            groups.setdefault(task, []).append(row)
        previous = self.active
        try:
            for task, rows in groups.items():
                index = torch.tensor(rows, dtype=torch.long)
                self.select(task)
                y = run(index)
                if y.shape[0] != len(rows):
                    raise TuningError(f"run() returned {y.shape[0]} rows for a group of {len(rows)}")
                if out is None:
                    out = y.new_empty((len(tasks), *y.shape[1:]))
                out[index.to(y.device)] = y
        finally:
            if self.router is not None:
                self.select(previous)
        assert out is not None  # tasks is not empty: there was at least one group
        return out

    def close(self) -> None:
        """Detach the routers: the backbone is back to its original linears."""
        if self.router is not None:
            self.router.detach()
        self.router, self.active = None, None


def _linears(config: MaskConfig) -> dict[str, object]:
    """What decides which linears a mask config masks (keep ratios and inits do not matter to a fixed mask)."""
    return {k: v for k, v in to_dict(config).items() if k in ("targets", "layers")}
