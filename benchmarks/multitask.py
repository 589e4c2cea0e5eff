"""Multi-task serving throughput: mixed batches on one frozen unit LM vs looping over the tasks one at a time.

A stream of requests, each an utterance's units and the task to answer, arrives in random task order. Three ways
to score it (the LM's logits over each utterance, as classification and scoring need), on the same inputs in the
same run:

  mixed:            :class:`~speechprompt.serving.TaskBank`: each arrival batch is answered in one forward pass,
                    whatever tasks its rows belong to;
  loop_per_batch:   what a server without mixed batches does at the same latency: each arrival batch is split by
                    task, and each task's rows run with that task's method attached (attach, forward, detach);
  loop_grouped:     offline: the whole stream regrouped by task, full batches per task. The best a per-task loop
                    can do, at the price of holding every request until its task's batch fills.

Every way's outputs are checked against each other (max abs difference reported). CPU, one thread.

Prints ONE JSON object. About a minute on one CPU core:

    python benchmarks/multitask.py
    python benchmarks/multitask.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import torch

from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.serving import TaskBank
from speechprompt.tuning import AdapterConfig, PrefixConfig, PromptConfig, build_method

PAD = 1

# name -> method config: the three servable methods, at different lengths.
TASKS = {
    "prompt_deep_L5": PromptConfig(length=5, deep=True),
    "prompt_deep_L20": PromptConfig(length=20, deep=True),
    "prompt_input_L10": PromptConfig(length=10, deep=False),
    "prefix_L5": PrefixConfig(length=5),
    "prefix_L15": PrefixConfig(length=15),
    "adapter_r32": AdapterConfig(bottleneck=32),
    "adapter_parallel": AdapterConfig(slots=["parallel_ffn"], bottleneck_ratio=0.25, scale=0.1),
    "prompt_deep_L10": PromptConfig(length=10, deep=True),
}


def _perturb(method: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Trained-looking tensors (zero-init up-projections would make adapters no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return method


def _pad(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _timed_rounds(fns: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Best wall time of each function over ``repeats`` rounds, after a warm-up round, and its last result.

    The functions take turns within each round, so that load from other processes on a shared machine falls on
    all of them alike.
    """
    results = {name: fn() for name, fn in fns.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="unit LM architecture (a UnitLMConfig name)")
    parser.add_argument("--requests", type=int, default=256, help="utterances in the request stream")
    parser.add_argument("--batch", type=int, default=32, help="arrival batch size")
    parser.add_argument("--min-len", type=int, default=20, help="shortest utterance, in units")
    parser.add_argument("--max-len", type=int, default=60, help="longest utterance, in units")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, few requests")
    args = parser.parse_args()
    if args.quick:
        args.config, args.requests, args.repeats = "tiny", 48, 1

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named(args.config)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    methods = {name: _perturb(build_method(cfg, model, attach=False), i) for i, (name, cfg) in enumerate(TASKS.items())}
    # The loop baselines attach methods to their own copy of the base: the bank's copy holds task routers.
    solo = UnitLM(model.cfg).eval()
    solo.load_state_dict(model.state_dict())
    bank = TaskBank(model)
    for name, method in methods.items():
        bank.add(name, method)

    g = torch.Generator().manual_seed(1)
    names = list(TASKS)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.requests,), generator=g).tolist()
    units = [torch.randint(4, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    tasks = [names[i] for i in torch.randint(len(names), (args.requests,), generator=g).tolist()]
    arrivals = [range(s, min(s + args.batch, args.requests)) for s in range(0, args.requests, args.batch)]
    n_tokens = sum(lengths)

    def run_task(name: str, idx: list[int], out: dict[int, torch.Tensor]) -> None:
        method = methods[name]
        method.attach(solo)
        try:
            tokens = _pad([units[i] for i in idx])
            logits = solo(tokens, **method.forward_kwargs(len(idx)))  # (b, T, V)
        finally:
            method.detach()
        for row, i in enumerate(idx):
            out[i] = logits[row, : lengths[i]]

    @torch.no_grad()
    def mixed() -> dict[int, torch.Tensor]:
        out = {}
        for batch in arrivals:
            idx = list(batch)
            logits = bank.logits(_pad([units[i] for i in idx]), [tasks[i] for i in idx])
            for row, i in enumerate(idx):
                out[i] = logits[row, : lengths[i]]
        return out

    @torch.no_grad()
    def loop_per_batch() -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for batch in arrivals:
            by_task = defaultdict(list)
            for i in batch:
                by_task[tasks[i]].append(i)
            for name, idx in by_task.items():
                run_task(name, idx, out)
        return out

    @torch.no_grad()
    def loop_grouped() -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        by_task = defaultdict(list)
        for i, name in enumerate(tasks):
            by_task[name].append(i)
        for name, idx in by_task.items():
            for s in range(0, len(idx), args.batch):
                run_task(name, idx[s : s + args.batch], out)
        return out

    seconds, outputs = _timed_rounds(
        {"mixed": mixed, "loop_per_batch": loop_per_batch, "loop_grouped": loop_grouped}, args.repeats)
    results = {label: {"seconds": round(t, 4), "utterances_per_s": round(args.requests / t, 2),
                       "tokens_per_s": round(n_tokens / t, 1)} for label, t in seconds.items()}
    max_diff = {
        label: max(float((outputs["mixed"][i] - outputs[label][i]).abs().max()) for i in range(args.requests))
        for label in ("loop_per_batch", "loop_grouped")
    }
    task_bytes = sum(4 * sum(p.numel() for p in m.parameters()) for m in methods.values())
    print(json.dumps({
        "benchmark": "multitask_serving",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "model": args.config,
        "base_parameters": sum(p.numel() for p in solo.parameters()),
        "tasks": {name: type(cfg).__name__.removesuffix("Config").lower() for name, cfg in TASKS.items()},
        "task_tensor_bytes_total": task_bytes,
        "requests": args.requests,
        "arrival_batch": args.batch,
        "tokens": n_tokens,
        "mean_tasks_per_arrival_batch": round(
            sum(len({tasks[i] for i in b}) for b in arrivals) / len(arrivals), 2),
        "results": results,
        "speedup_mixed_vs_loop_per_batch": round(results["loop_per_batch"]["seconds"] / results["mixed"]["seconds"],
                                                 3),
        "speedup_mixed_vs_loop_grouped": round(results["loop_grouped"]["seconds"] / results["mixed"]["seconds"], 3),
        "max_abs_logit_diff_vs_mixed": max_diff,
        "outputs_match": all(d <= 1e-4 for d in max_diff.values()),
    }, indent=2))


if __name__ == "__main__":
    main()
