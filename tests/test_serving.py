"""Multi-task serving: a batch mixing tasks of different methods and prompt lengths returns, row by row, exactly
what each task returns alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechprompt.checkpoint import base_fingerprint, save_checkpoint
from speechprompt.errors import CheckpointError
from speechprompt.models.generation import greedy
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.serving import ServingError, TaskBank
from speechprompt.tasks.classification import VerbalizedClassifier
from speechprompt.tasks.data import collate
from speechprompt.tuning import (
    AdapterConfig,
    PrefixConfig,
    PromptConfig,
    build_method,
    freeze_except,
    method_name,
)
from speechprompt.verbalizers.fixed import FixedVerbalizer

PAD, EOS = 1, 2
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> UnitLM:
    torch.manual_seed(seed)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def _perturb(method: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every tensor away from its init (zero-init up-projections would make adapters no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return method


# name -> (method, config): different methods, prompt lengths, with and without separator and deep part.
CONFIGS = {
    "deep3": ("prompt", PromptConfig(length=3, deep=True)),
    "input5": ("prompt", PromptConfig(length=5, deep=False, train_separator=False)),
    "input2sep": ("prompt", PromptConfig(length=2, deep=False)),
    "prefix4": ("prefix", PrefixConfig(length=4)),
    "houlsby": ("adapter", AdapterConfig(bottleneck=8)),
    "parallel": ("adapter", AdapterConfig(slots=["parallel_ffn"], bottleneck=4, layers=[-1], scale=0.5)),
}


def _methods(model: UnitLM, names=CONFIGS) -> dict:
    return {name: _perturb(build_method(CONFIGS[name][1], model, attach=False), i) for i, name in enumerate(names)}


def _bank(model: UnitLM, methods: dict) -> TaskBank:
    bank = TaskBank(model)
    for name, method in methods.items():
        bank.add(name, method)
    return bank


def _solo_logits(method, tokens: torch.Tensor) -> torch.Tensor:
    """The task alone: its method attached to a fresh copy of the base model, on the row without any padding."""
    model = _model()
    method.attach(model)
    try:
        with torch.no_grad():
            return model(tokens, **method.forward_kwargs(tokens.size(0)))
    finally:
        method.detach()


def _rows(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g).tolist()
    return [torch.randint(4, 104, (length,), generator=g).tolist() for length in lengths]


def _pad(rows: list[list[int]], left: bool) -> torch.Tensor:
    width = max(map(len, rows))
    out = torch.full((len(rows), width), PAD)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r):] = torch.tensor(r)
        else:
            out[i, : len(r)] = torch.tensor(r)
    return out


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_mixed_batch_equals_each_task_alone(left):
    model = _model()
    methods = _methods(model)
    bank = _bank(model, methods)
    names = list(methods)
    tasks = [names[i % len(names)] for i in range(2 * len(names))][::-1]  # every task twice, interleaved
    rows = _rows(len(tasks), seed=1)
    for r in rows:  # every row holds a separator, so the per-row <s> vector is exercised
        r.insert(len(r) // 2, 0)
    tokens = _pad(rows, left)
    mixed = bank.logits(tokens, tasks)  # (B, T, V)
    width = tokens.shape[1]
    for b, (task, row) in enumerate(zip(tasks, rows)):
        alone = _solo_logits(methods[task], torch.tensor([row]))[0]  # (n, V)
        got = mixed[b, width - len(row):] if left else mixed[b, : len(row)]
        torch.testing.assert_close(got, alone, atol=ATOL, rtol=0, msg=f"row {b} ({task})")


def test_rows_differ_by_task():
    """The same tokens under different tasks give different outputs: no task leaks into another row."""
    model = _model()
    methods = _methods(model)
    bank = _bank(model, methods)
    tokens = torch.tensor([_rows(1, seed=3)[0]] * len(methods))
    out = bank.logits(tokens, list(methods))
    for i in range(len(methods)):
        for j in range(i):
            assert not torch.allclose(out[i], out[j], atol=1e-3)


def test_prefix_task_batch_is_bitwise_the_method_alone():
    """A batch of one prefix task runs the same operations as the method alone: equal bit for bit. (Prompts are
    served as precomputed keys/values, equal to within rounding: see the mixed-batch test.)"""
    model = _model()
    methods = _methods(model, ["prefix4"])
    bank = _bank(model, methods)
    tokens = _pad(_rows(3, seed=4), left=False)
    for name, method in methods.items():
        with torch.no_grad():
            alone = model(tokens, **method.forward_kwargs(3))
        assert torch.equal(bank.logits(tokens, [name] * 3), alone)


def test_frozen_backbone_and_methods_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = base_fingerprint(model)
    methods = _methods(model)
    copies = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in methods.items()}
    bank = _bank(model, methods)
    bank.logits(_pad(_rows(4, seed=5), left=False), list(methods)[:4])
    assert bank.fingerprint == fingerprint
    adapters_free = {k: v for k, v in model.state_dict().items() if ".post_" not in k and ".parallel_" not in k}
    assert adapters_free.keys() == before.keys()
    assert all(torch.equal(adapters_free[k], before[k]) for k in before)
    assert all(not p.requires_grad for p in model.parameters())
    for name, m in methods.items():
        assert all(torch.equal(v, copies[name][k]) for k, v in m.state_dict().items())


def test_generate_matches_greedy_of_each_task_alone():
    model = _model()
    methods = _methods(model, ["deep3", "input5", "houlsby", "prefix4"])
    bank = _bank(model, methods)
    tasks = ["houlsby", "deep3", "prefix4", "input5", "deep3"]
    rows = _rows(len(tasks), seed=6)
    prefix = _pad(rows, left=True)
    mixed = bank.generate(prefix, tasks, max_new_tokens=4)
    for b, (task, row) in enumerate(zip(tasks, rows)):
        m, solo = methods[task], _model()
        m.attach(solo)
        with torch.no_grad():
            alone = greedy(solo, torch.tensor([row]), 4, EOS, model_kwargs=m.forward_kwargs(1))[0]
        m.detach()
        assert mixed[b, : len(alone)].tolist() == alone.tolist(), (b, task)


def _save_task(tmp_path, model, name, method, verbalizer):
    meta = {
        "task": {"kind": "verbalized", "labels": verbalizer.labels},
        "method": {"name": method_name(method.config), "config": _config_dict(method.config)},
        "verbalizer": verbalizer.to_dict(),
        "base": {"path": "unused", "fingerprint": base_fingerprint(model)},
    }
    return save_checkpoint(tmp_path / name, method.export_state_dict(), None, meta)


def _config_dict(config):
    from speechprompt.config import to_dict

    return to_dict(config)


def test_checkpoints_predict_like_their_classifiers(tmp_path):
    model = _model()
    fingerprint = base_fingerprint(model)
    methods = _methods(model, ["deep3", "prefix4", "houlsby"])
    verbalizers = {
        "deep3": FixedVerbalizer({"yes": [5], "no": [9], "up": [17]}, 100),
        "prefix4": FixedVerbalizer({"left": [3, 4], "right": [4, 3]}, 100),
        "houlsby": FixedVerbalizer({"a": [1], "b": [2]}, 100),
    }
    paths = {n: _save_task(tmp_path, model, n, m, verbalizers[n]) for n, m in methods.items()}
    bank = TaskBank(model)
    for n, p in paths.items():
        assert bank.add_checkpoint(p, name=n) == n
    assert base_fingerprint(model) != fingerprint or not bank._routers  # routers sit in the slots now
    tasks = ["prefix4", "houlsby", "deep3", "deep3", "prefix4", "houlsby"]
    units = [[u - 4 for u in r] for r in _rows(len(tasks), seed=7)]
    got = bank.predict(units, tasks)
    # Each task alone, through the toolkit's own classifier (which attaches the method to a fresh model).
    for b, task in enumerate(tasks):
        solo_model = _model()
        m = build_method(methods[task].config, solo_model)
        m.load_exported_state_dict(methods[task].export_state_dict())
        freeze_except(solo_model, m)
        clf = VerbalizedClassifier(solo_model, m, verbalizers[task])
        batch = collate([[u + 4 for u in units[b]]], ["?"], None)
        assert got[b] == clf.predict(batch)["greedy"][0], (b, task)


def test_refuses_other_base_and_unservable_methods(tmp_path):
    model, other = _model(0), _model(1)
    verbalizer = FixedVerbalizer({"x": [1], "y": [2]}, 100)
    path = _save_task(tmp_path, other, "t", _methods(other, ["prefix4"])["prefix4"], verbalizer)
    bank = TaskBank(model)
    with pytest.raises(CheckpointError, match="another base model"):
        bank.add_checkpoint(path)
    lora = build_method("lora", model, attach=False)
    with pytest.raises(ServingError, match="cannot be served"):
        bank.add("lora", lora)
    bank.add("p", _methods(model, ["prefix4"])["prefix4"])
    with pytest.raises(ServingError, match="already served"):
        bank.add("p", _methods(model, ["input5"])["input5"])
    with pytest.raises(ServingError, match="unknown task"):
        bank.logits(torch.tensor([[5, 6]]), ["nope"])


def test_adapter_slots_refuse_direct_calls():
    model = _model()
    bank = _bank(model, _methods(model, ["houlsby"]))
    with pytest.raises(ServingError, match="through TaskBank"):
        model(torch.tensor([[5, 6]]))
    assert bank.logits(torch.tensor([[5, 6]]), ["houlsby"]).shape == (1, 2, 104)


# -- the benchmarks of this module ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_multitask_benchmark_quick_outputs_agree():
    done = _bench("multitask.py", "--quick")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["outputs_match"] and set(out["results"]) == {"mixed", "loop_per_batch", "loop_grouped"}
    assert all(r["utterances_per_s"] > 0 for r in out["results"].values())


def test_prompt_benchmark_ratios_and_missing_demo(tmp_path):
    done = _bench("prompt.py", cwd=tmp_path)  # no exp/ here: a JSON error, exit 2
    assert done.returncode == 2 and "make demo" in json.loads(done.stdout)["error"]
    row = {"metric": "greedy.accuracy", "seeds": [1, 2], "checkpoint_bytes": 10, "checkpoint": "x"}
    rows = [
        {**row, "method": "deep_prompt", "trainable_params": 100, "mean_step_seconds": 0.5, "peak_rss_bytes": 300,
         "splits": {"test": {"mean": 0.8, "std": 0.1, "values": [0.7, 0.9]}}},
        {**row, "method": "full_finetune", "trainable_params": 10000, "mean_step_seconds": 2.0,
         "peak_rss_bytes": 400, "splits": {"test": {"mean": 0.9, "std": 0.0, "values": [0.9, 0.9]}}},
    ]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    done = _bench("prompt.py", "--results", str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr
    deep = json.loads(done.stdout)["methods"]["deep_prompt"]
    assert deep["splits"]["test"] == {"mean": 0.8, "std": 0.1, "n": 2}
    assert (deep["step_time_vs_full_ft"], deep["peak_rss_vs_full_ft"], deep["params_vs_full_ft"]) == (0.25, 0.75, 0.01)
