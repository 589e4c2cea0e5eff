"""Deep-prompt tuning of a SLAM-shaped speech LM (Qwen2.5-0.5B over 500 units, random weights) against full
fine-tuning and against transformers + HF PEFT of the same shape, in the same run.

Configurations (each in its own subprocess, so that its peak memory is its own):

  ours_deep_prompt:   speechprompt's deep prompt, L=5, with the separator (SpeechPrompt's method), frozen backbone;
  ours_full_ft:       speechprompt's model, every weight trained (Adam);
  peft_prefix:        transformers ``Qwen2ForCausalLM`` + PEFT ``PrefixTuningConfig(num_virtual_tokens=5)``, the
                      nearest PEFT method (per-layer keys/values, the equivalent of a deep prompt);
  peft_prompt:        transformers + PEFT ``PromptTuningConfig(num_virtual_tokens=5)`` (input prompt only).

Each measures a training step (forward, backward, Adam step; tokens/s) and greedy decoding on the KV cache with the
method applied (new tokens/s), and the process's peak memory (CUDA: peak allocated; CPU: peak RSS, which includes
the Python runtime). Prints ONE JSON object.

    python benchmarks/speechlm.py                  # 0.5B shape; minutes on a CPU
    python benchmarks/speechlm.py --shape twist_350m --dtype bfloat16
    python benchmarks/speechlm.py --quick          # a 2-layer smoke run, tiny batches, one repeat

transformers and peft are benchmark-only dependencies (``pip install peft``), never imported by the toolkit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

CONFIGS = ("ours_deep_prompt", "ours_full_ft", "peft_prefix", "peft_prompt")


def _hf_config(shape: dict[str, Any]) -> Any:
    import transformers

    return transformers.Qwen2Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["embed_dim"], intermediate_size=shape["ffn_dim"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], rope_theta=shape.get("rope_theta", 10000.0), tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, max_position_embeddings=32768)


def _peak(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _timed(fn: Any, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from speechprompt.models.generation import greedy
    from speechprompt.models.speech_lm import PUBLISHED_SHAPES, SpeechLM, SpeechLMConfig
    from speechprompt.models.unit_vocab import UnitVocab
    from speechprompt.tuning import PromptConfig, build_method, freeze_except

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = dict(PUBLISHED_SHAPES[args.shape], **({"layers": 2} if args.quick else {}))
    B, T, new = args.batch, args.length, args.new_tokens
    tokens = torch.randint(2, shape["vocab_size"], (B, T), device=device)
    targets = torch.randint(2, shape["vocab_size"], (B, T), device=device)
    prompt_tokens = tokens[:, : T // 2]
    out: dict[str, Any] = {"config": name}

    if name.startswith("ours"):
        vocab = UnitVocab(size=shape["vocab_size"], num_units=shape["vocab_size"] - 2, unit_offset=2, bos=1, eos=1,
                          pad=0, layout="slamkit")
        model = SpeechLM(SpeechLMConfig(**shape, padding_idx=0), vocab).to(device, dtype)
        if name == "ours_deep_prompt":
            method = build_method(PromptConfig(length=5, deep=True), model)
            params = freeze_except(model, method)
            kwargs: Any = lambda b: method.forward_kwargs(b)  # noqa: E731
        else:
            params = [p for p in model.parameters()]
            kwargs = lambda b: {}  # noqa: E731
        model.train()
        opt = torch.optim.Adam(params, lr=1e-4)

        def step() -> None:
            logits = model(tokens, **kwargs(B))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def decode() -> None:
            with torch.no_grad():
                greedy(model, prompt_tokens, new, eos=-1, model_kwargs=kwargs(B))
    else:
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_config(_hf_config(shape), attn_implementation="sdpa")
        hf = hf.to(device, dtype)
        cfg = (peft.PrefixTuningConfig if name == "peft_prefix" else peft.PromptTuningConfig)(
            task_type="CAUSAL_LM", num_virtual_tokens=5)
        model = peft.get_peft_model(hf, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        opt = torch.optim.Adam(params, lr=1e-4)

        def step() -> None:
            logits = model(input_ids=tokens).logits[:, -T:]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def decode() -> None:
            with torch.no_grad():
                model.generate(input_ids=prompt_tokens, attention_mask=torch.ones_like(prompt_tokens),
                               max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    out["trainable_params"] = sum(p.numel() for p in params)
    out["base_params"] = sum(p.numel() for p in (model.parameters()))
    step_s = _timed(step, args.repeats, device)
    out["train_tokens_per_s"] = round(B * T / step_s, 1)
    out["train_step_s"] = round(step_s, 4)
    model.eval()
    dec_s = _timed(decode, args.repeats, device)
    out["decode_new_tokens_per_s"] = round(B * new / dec_s, 1)
    out.update(_peak(device))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="slam_qwen2.5_0.5b", help="a Qwen2 shape of PUBLISHED_SHAPES")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence (25 Hz units: 2.5 s)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 16 tokens, 4 new, one repeat")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one configuration (subprocess)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.new_tokens, args.repeats = 2, 16, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0
    rows = []
    common = ["--shape", args.shape, "--dtype", args.dtype, "--device", args.device, "--batch", str(args.batch),
              "--length", str(args.length), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
              "--threads", str(args.threads), *(["--quick"] if args.quick else [])]
    for name in args.configs:
        cmd = [sys.executable, __file__, *common, "--one", name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"config": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    by = {r["config"]: r for r in rows}
    ref = by.get("ours_deep_prompt", {})
    for r in rows:
        for key in ("train_tokens_per_s", "decode_new_tokens_per_s"):
            if key in r and key in ref:
                r[f"{key}_vs_ours_deep_prompt"] = round(r[key] / ref[key], 3)
    print(json.dumps({"benchmark": "speechlm", "shape": args.shape + (" (2 layers)" if args.quick else ""),
                      "dtype": args.dtype, "device": args.device, "batch": args.batch, "length": args.length,
                      "new_tokens": args.new_tokens, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
