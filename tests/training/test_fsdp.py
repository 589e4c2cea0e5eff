"""FSDP of a frozen speech-LM backbone (gloo on CPU, two processes): each process holds half of every layer's weights,
and a deep prompt's update is exactly the one of a single process with the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speechprompt.config import ConfigError
from speechprompt.models.speech_lm import SpeechLM, SpeechLMConfig
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.training.distributed import Dist, all_reduce_gradients, shard_frozen_backbone
from speechprompt.tuning import build_method, freeze_except

VOCAB = UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="slamkit")


def _model() -> SpeechLM:
    torch.manual_seed(0)
    cfg = SpeechLMConfig(family="qwen2", vocab_size=42, embed_dim=32, ffn_dim=48, layers=2, heads=4, kv_heads=2,
                         head_dim=8, max_positions=64)
    return SpeechLM(cfg, VOCAB).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 42, (4, 10), generator=g)
    return tokens, torch.randint(2, 42, (4, 10), generator=g)


def _grads(model: SpeechLM, rows: list[int], d: Dist, shard: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    method = build_method("prompt", model)
    params = freeze_except(model, method)
    if shard:
        shard_frozen_backbone(model, params)
    tokens, targets = _batch()
    logits = model(tokens[rows], **method.forward_kwargs(len(rows)))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten(), reduction="sum").backward()
    all_reduce_gradients(params, d)
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        d = Dist(rank, 2)
        model = _model()
        full = sum(p.numel() for p in model.decoder.layers.parameters())
        grads = _grads(model, d.shard(list(range(4))), d, shard=True)
        local = sum(p.to_local().numel() for p in model.decoder.layers.parameters())
        if rank == 0:
            torch.save({"grads": grads, "local": local, "full": full}, out)
    finally:
        dist.destroy_process_group()


def test_sharded_backbone_gives_the_single_process_update(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    assert saved["local"] * 2 == saved["full"]  # half of every layer's weights on each process
    single = _grads(_model(), list(range(4)), Dist(), shard=False)
    assert {"deep_key", "deep_value"} <= set(single) <= set(saved["grads"])
    for name, grad in saved["grads"].items():  # all_reduce_gradients gives unused tensors zeros
        torch.testing.assert_close(grad, single.get(name, torch.zeros_like(grad)), rtol=1e-5, atol=1e-6)


def test_methods_inside_the_backbone_are_refused() -> None:
    model = _model()
    method = build_method("lora", model)
    with pytest.raises(ConfigError, match="fsdp shards the frozen backbone, but this method trains tensors inside"):
        shard_frozen_backbone(model, freeze_except(model, method))
