"""Data parallelism under ``torchrun``: process group, rank-0 decisions, and one gradient all-reduce per update.

Every trainer runs the same way on one process or on N::

    speechprompt train --config C.yaml
    torchrun --nproc_per_node 2 -m speechprompt.cli train --config C.yaml

Each process takes its share of every step's batch; after the last micro-batch of an update the gradients of the
trained tensors are summed over processes (:func:`all_reduce_gradients`), and the update is normalised by the loss
terms of the whole step over all processes. So N processes take exactly the update of one process with N times
the batch (up to float summation order). The gradients travel in flat buckets once per update: with gradient
accumulation there is no communication per micro-batch, at the price of not overlapping communication with the
backward pass (what ``DistributedDataParallel`` does); for the small trained sets of parameter-efficient methods
that overlap is worth little.

gloo on CPU, nccl on CUDA (one GPU per process, chosen by ``LOCAL_RANK``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from speechprompt.config import ConfigError

_BUCKET_ELEMENTS = 1 << 24  # 64 MB of fp32 gradients per all-reduce call


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over processes, in place."""
        if self.active:
            dist.all_reduce(t)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (a decision made once: stop, best, an error message)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (e.g. the RNG states to save)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous share of one global batch (rank r of N takes the r-th of N near-equal slices;
        a short last batch may leave a process with none)."""
        n = len(items)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return list(items[lo:hi])


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun ``cuda`` means this process's
    GPU (``LOCAL_RANK``)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available (use device=auto or cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), or run alone.

    The group is destroyed on exit.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():  # alone, or inside a caller's group (tests)
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))) \
            if dist.is_initialized() else Dist()
        yield info, select_device(device_name, info.local_rank)
        return
    info = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = select_device(device_name, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield info, device
    finally:
        dist.destroy_process_group()


def all_reduce_gradients(params: Sequence[Tensor], d: Dist) -> None:
    """Sum the gradients of ``params`` over processes, in place (a missing gradient counts as zeros).

    Gradients are packed into flat buckets of one dtype, so an update costs a few all-reduce calls, not one per
    tensor.
    """
    if not d.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        bucket: list[Tensor] = []
        size = 0
        for g in grads + [None]:  # None flushes the last bucket
            if g is not None and (size + g.numel() <= _BUCKET_ELEMENTS or not bucket):
                bucket.append(g)
                size += g.numel()
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
            bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def shard_frozen_backbone(model: torch.nn.Module, trained: Sequence[Tensor]) -> int:
    """Shard a frozen backbone's weights over the process group with FSDP2 (``fully_shard``): each transformer layer
    (and its attention, whose ``project_kv`` deep prompts call outside the layer's forward) is a unit gathered just
    before it runs and freed after, and the embeddings and head form the root unit. Returns the number of units.

    Only the *frozen* weights are sharded. The trained tensors stay plain replicated tensors wherever they live:
    outside the backbone (prompts, prefixes, verbalizers) or inside it (LoRA factors, adapters, BitFit's biases,
    S3-Router scores, which FSDP is told to ignore). So their gradients are summed once, by
    :func:`all_reduce_gradients` as without FSDP, and never by FSDP's reduce-scatter (FSDP reduces gradients only of
    the parameters it manages, and every one of those is frozen); the optimizer, EMA and checkpoints see full
    tensors. Every process must run every forward (evaluation included), since each layer's frozen weights are
    gathered from all of them.

    Raises:
        ConfigError: every backbone parameter is trained (full fine-tuning): there is no frozen weight to shard.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    trained_ids = {id(p) for p in trained}
    inside = {p for p in model.parameters() if id(p) in trained_ids}
    if len(inside) == len(list(model.parameters())):
        raise ConfigError("fsdp shards the frozen backbone, but this method trains all of it (full fine-tuning); "
                          "run it without fsdp")
    layers = list(model.transformer_layers())  # type: ignore[operator]
    for layer in layers:
        fully_shard(layer.self_attn, ignored_params=inside)
        register_fsdp_forward_method(layer.self_attn, "project_kv")
        fully_shard(layer, ignored_params=inside)
    fully_shard(model, ignored_params=inside)
    return 2 * len(layers) + 1
