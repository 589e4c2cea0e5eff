"""Unit LM throughput and memory, against Hugging Face GPT-2 of the same shape, in the same run.

Prints ONE JSON object:
  training:   tokens/s of full training steps (forward, backward, Adam) and peak memory, for the `small` and
              `gslm_big` configs, ours vs ``transformers.GPT2LMHeadModel`` (same width, depth, heads, FFN, vocab,
              activation, dropout, tied embeddings; SDPA attention), same batch and sequence length;
  generation: greedy tokens/s of the `small` config with and without the KV cache.

Every measurement runs in its own subprocess, so that peak memory is that measurement's alone: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak RSS (``ru_maxrss``) from just
before the model is built (parameters, gradients, optimizer state and activations).

    python benchmarks/ulm.py            # about 2-3 minutes on 2 CPU cores
    python benchmarks/ulm.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

# (config, batch, sequence length, timed steps). gslm_big is kept small on a CPU: it is 151M parameters.
TRAIN_CASES = {
    "cpu": [("small", 8, 128, 3), ("gslm_big", 1, 64, 2)],
    "cuda": [("small", 32, 512, 10), ("gslm_big", 8, 512, 5)],
}
GENERATION_CASE = {"cpu": ("small", 8, 64, 48), "cuda": ("small", 32, 256, 256)}  # config, batch, context, new


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this process and return its record."""
    import torch
    import torch.nn.functional as F

    from speechprompt.models.unit_lm import UnitLM, UnitLMConfig

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = UnitLMConfig.named(spec["config"])
    B, T = spec["batch"], spec["seq"]
    rss0 = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if spec["kind"] == "generate":
        from speechprompt.models.generation import greedy

        model = UnitLM(cfg).to(device).eval()
        context = torch.randint(4, cfg.vocab_size, (B, T), device=device)
        allowed = list(range(4, cfg.vocab_size))  # no </s>: every row runs the full length
        greedy(model, context[:, :8], 4, eos=2, allowed_tokens=allowed, use_cache=spec["cache"])  # warm-up
        start = time.perf_counter()
        out = greedy(model, context, spec["new_tokens"], eos=2, allowed_tokens=allowed, use_cache=spec["cache"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        return {**spec, "generated_tokens_per_s": round(out.numel() / elapsed, 1), "seconds": round(elapsed, 3)}

    if spec["impl"] == "speechprompt":
        model = UnitLM(cfg).to(device).train()

        def logits_of(tokens: torch.Tensor) -> torch.Tensor:
            return model(tokens)
    else:
        # transformers imports torchaudio when it is installed; a broken torchaudio must not sink the baseline.
        sys.modules.setdefault("torchaudio", None)
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=max(T, cfg.max_positions), n_embd=cfg.embed_dim,
            n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.ffn_dim, activation_function=cfg.activation,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=1e-5, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=2,
            pad_token_id=cfg.padding_idx,
        )
        model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").to(device).train()

        def logits_of(tokens: torch.Tensor) -> torch.Tensor:
            return model(input_ids=tokens).logits

    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
    tokens = torch.randint(4, cfg.vocab_size, (B, T), device=device)
    times = []
    for step in range(spec["steps"] + 1):  # the first step is warm-up (allocations, optimizer state)
        start = time.perf_counter()
        logits = logits_of(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak, method = _peak_rss_mb() - rss0, "ru_maxrss_growth"
    step_s = statistics.median(times)
    return {**spec, "params": params, "tokens_per_s": round(B * T / step_s, 1), "step_s": round(step_s, 4),
            "peak_memory_mb": round(peak, 1), "memory_method": method}


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="one timed step per case and short generation")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per measurement (0: torch's default). On a loaded shared machine 1 "
                             "avoids the thread-contention slowdowns that make multi-threaded timings meaningless")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    try:
        import transformers

        hf_version, note = transformers.__version__, None
    except ImportError:
        hf_version, note = None, "transformers is not installed: the GPT-2 baseline was skipped (pip install " \
                                 "transformers, checking first that it does not pull another torch)"

    training = []
    for config, batch, seq, steps in TRAIN_CASES[kind]:
        for impl in ("speechprompt", "hf_gpt2"):
            spec = {"kind": "train", "impl": impl, "config": config, "batch": batch, "seq": seq,
                    "steps": 1 if args.quick else steps, "device": device, "threads": args.threads}
            if impl == "hf_gpt2" and hf_version is None:
                training.append({**spec, "skipped": note})
                continue
            training.append(_run_worker(spec))

    config, batch, context, new = GENERATION_CASE[kind]
    if args.quick:
        new = 8
    generation = [
        _run_worker({"kind": "generate", "impl": "speechprompt", "config": config, "batch": batch, "seq": context,
                     "new_tokens": new, "cache": cache, "device": device, "threads": args.threads})
        for cache in (True, False)
    ]

    ratios = {}
    for config, *_ in TRAIN_CASES[kind]:
        ours = next((r for r in training if r["config"] == config and r["impl"] == "speechprompt"), {})
        hf = next((r for r in training if r["config"] == config and r["impl"] == "hf_gpt2"), {})
        if "tokens_per_s" in ours and "tokens_per_s" in hf:
            ratios[config] = {"train_speed_ours_over_hf": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
                              "peak_memory_ours_over_hf": round(ours["peak_memory_mb"] / hf["peak_memory_mb"], 3)}
    if all("generated_tokens_per_s" in g for g in generation):
        ratios["generation_kv_cache_speedup"] = round(
            generation[0]["generated_tokens_per_s"] / generation[1]["generated_tokens_per_s"], 2)

    print(json.dumps({
        "benchmark": "unit_lm",
        "device": device,
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "transformers": hf_version,
        "note": note,
        "training": training,
        "generation": generation,
        "ratios": ratios,
    }))


if __name__ == "__main__":
    main()
