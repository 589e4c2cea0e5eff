"""Data parallelism: sharding a global batch, and one update over two gloo processes equal to one process's."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from speechprompt.training import distributed as distributed_module
from speechprompt.training.distributed import Dist, all_reduce_gradients
from speechprompt.training.optim import OptimConfig, Updater
from speechprompt.training.precision import MixedPrecision


def test_shards_cover_a_batch_once_in_order() -> None:
    rows = list(range(7))
    shards = [Dist(r, 3).shard(rows) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    assert [Dist(r, 4).shard([9]) for r in range(4)] == [[], [], [], [9]]  # a short batch leaves some empty
    assert Dist().shard(rows) == rows and Dist().broadcast_object({"a": 1}) == {"a": 1}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g)


def _update(model: nn.Module, d: Dist, rows: list[int]) -> None:
    x, y = _data()
    up = Updater(model.parameters(), OptimConfig(lr=0.1), MixedPrecision("fp32", torch.device("cpu")), d)
    if rows:
        up.backward(nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum"), len(rows))
    up.step(0.1)


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        d = Dist(rank, 2)
        model = _model()
        # Uneven shares (2 and 3 rows) and gradients spread over several all-reduce buckets (15 + 5 + 10 + 2
        # elements in buckets of at most 7, a tensor larger than a bucket alone): still one process's update.
        distributed_module._BUCKET_ELEMENTS = 7
        _update(model, d, d.shard(list(range(5))))
        grads_zero = Dist(rank, 2)
        p = torch.zeros(4, requires_grad=True)
        if rank == 1:
            p.grad = torch.ones(4)
        all_reduce_gradients([p], grads_zero)  # a process without a gradient contributes zeros
        if rank == 0:
            torch.save({"state": model.state_dict(), "grad": p.grad}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_update_of_one_with_the_whole_batch(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    single = _model()
    _update(single, Dist(), list(range(5)))
    saved = torch.load(out, weights_only=True)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(saved["state"][key], value, rtol=1e-6, atol=1e-7)
    assert saved["grad"].tolist() == [1.0] * 4
