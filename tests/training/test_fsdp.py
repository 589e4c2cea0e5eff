"""FSDP of a frozen speech-LM backbone (gloo on CPU, two processes): each process holds half of every layer's frozen
weights, and a method's update is exactly the one of a single process with the whole batch, whether its tensors live
outside the backbone (deep prompt) or inside it (LoRA, BitFit, adapters, AdapterBias, AAT, S3-Router scores). The
trained tensors stay whole (their gradients summed once), so the checkpoint of a sharded run loads in a single
process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speechprompt.config import ConfigError
from speechprompt.models.speech_lm import SpeechLM, SpeechLMConfig
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.training.distributed import Dist, shard_frozen_backbone
from speechprompt.training.optim import OptimConfig, Updater
from speechprompt.training.precision import MixedPrecision
from speechprompt.tuning import build_method, freeze_except

VOCAB = UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="slamkit")
# A method whose tensors live outside the backbone (prompt), and methods whose tensors live inside it.
METHODS = ["prompt", "lora", "bitfit", "adapter", "adapter_bias", "aat", "mask"]


def _model() -> SpeechLM:
    torch.manual_seed(0)
    cfg = SpeechLMConfig(family="qwen2", vocab_size=42, embed_dim=32, ffn_dim=48, layers=2, heads=4, kv_heads=2,
                         head_dim=8, max_positions=64)
    return SpeechLM(cfg, VOCAB).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 42, (4, 10), generator=g)
    return tokens, torch.randint(2, 42, (4, 10), generator=g)


def _step(name: str, rows: list[int], d: Dist, shard: bool) -> tuple[SpeechLM, torch.nn.Module, dict]:
    """One update of method ``name`` on ``rows`` of the batch through the trainers' :class:`Updater`: the model,
    the method, and the gradients the optimizer was given (summed over processes, normalised by the loss terms)."""
    model = _model()
    torch.manual_seed(2)
    method = build_method(name, model)
    params = freeze_except(model, method)
    if shard:
        shard_frozen_backbone(model, params)
    updater = Updater(params, OptimConfig(lr=0.01), MixedPrecision("fp32", torch.device("cpu")), d)
    names = {id(p): n for n, p in method.named_parameters()}
    grads: dict[str, torch.Tensor] = {}
    updater.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.update({names[id(p)]: p.grad.clone() for p in params if p.grad is not None}))
    tokens, targets = _batch()
    logits = model(tokens[rows], **method.forward_kwargs(len(rows)))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten(), reduction="sum")
    updater.backward(loss, targets[rows].numel())
    updater.step(lr=0.01)
    return model, method, grads


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        d = Dist(rank, 2)
        results = {}
        for name in METHODS:
            model, method, grads = _step(name, d.shard(list(range(4))), d, shard=True)
            frozen = [p for p in model.decoder.layers.parameters() if not p.requires_grad]
            full = sum(p.numel() for p in frozen)
            local = sum(p.to_local().numel() for p in frozen)
            # What a checkpoint of this run stores: the method's own tensors, full, on every process alike.
            exported = {k: v.detach().clone() for k, v in method.export_state_dict().items()}
            assert all(type(v) is torch.Tensor for v in exported.values())
            tokens, _ = _batch()
            with torch.no_grad():
                logits = model(tokens, **method.forward_kwargs(4))
            results[name] = {"grads": grads, "exported": exported, "local": local, "full": full,
                             "logits": logits}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Rank 0's results of one update of every method on a backbone sharded over two gloo processes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "rank0.pt"
    mp.spawn(_worker, args=(f"file://{tmp / 'rendezvous'}", str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("name", METHODS)
def test_sharded_backbone_gives_the_single_process_update(sharded: dict, name: str) -> None:
    saved = sharded[name]
    assert saved["local"] * 2 == saved["full"]  # half of every layer's frozen weights on each process
    model, method, grads = _step(name, list(range(4)), Dist(), shard=False)
    # The optimizer gets the single process's gradient: a gradient reduced twice (by FSDP and again by the updater)
    # would be doubled, one never reduced would be this process's half.
    assert set(grads) <= set(saved["grads"]) and grads
    for key, grad in saved["grads"].items():  # all_reduce_gradients gives unused tensors zeros
        torch.testing.assert_close(grad, grads.get(key, torch.zeros_like(grad)), rtol=1e-5, atol=1e-7)
    # And the same update (Adam's first step is lr * sign(g) but where |g| ~ eps, so a looser absolute tolerance).
    single = method.export_state_dict()
    assert set(saved["exported"]) == set(single)
    for key, value in saved["exported"].items():
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-4)
    # The sharded run's tensors load into a method on an unsharded base and give the sharded run's logits.
    fresh = _model()
    torch.manual_seed(2)
    loaded = build_method(name, fresh)
    loaded.load_exported_state_dict(saved["exported"])
    tokens, _ = _batch()
    with torch.no_grad():
        logits = fresh(tokens, **loaded.forward_kwargs(4))
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)


def test_full_finetuning_is_refused() -> None:
    model = _model()
    method = build_method("full_finetune", model)
    with pytest.raises(ConfigError, match="trains all of it"):
        shard_frozen_backbone(model, freeze_except(model, method))
