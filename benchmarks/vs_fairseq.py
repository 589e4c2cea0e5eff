"""The hot paths against fairseq-fixed 0.12.3.1, side by side in one run, on the same weights and inputs.

fairseq runs as an oracle in its own environment (``SPEECHPROMPT_FAIRSEQ_PYTHON``, default
``<repo>/.venv-fairseq/bin/python``, as ``tests/oracle.py``): ``benchmarks/oracles/fairseq_side.py`` imports fairseq,
never the toolkit. Every measurement runs in a fresh subprocess (so that its peak memory is its own), ours and
fairseq's alternate, and the best time over all rounds is kept (the least disturbed by other load on the machine).

Cases (CPU sizes; ``--quick`` shrinks every model and input to a smoke test):
  hubert_one      HuBERT base, layer-6 features of 8 utterances x 4 s, one utterance at a time.
  hubert_batched  16 utterances of 2-6 s in length-sorted batches of 8, both sides on the same batches: ours through
                  ``HubertFeatureReader.read_batch`` (the path ``prepare``/``kmeans`` run, exact padding, as
                  ``benchmarks/encoders.py`` measures it), fairseq's model with its padding mask; also against
                  fairseq one utterance at a time (GSLM's reader has no batching). Our batched features are checked
                  against fairseq's one at a time, which exact padding must equal; fairseq's padded batches are not:
                  their GroupNorm statistics see the padding, and a frame that is only partly padding is kept, so
                  they have a few more frames than the same utterances read alone.
  lm_train        ``gslm_big`` (fairseq ``transformer_lm_big``, 151M) full training step on 4 x 128 tokens: forward,
                  cross-entropy, backward, gradient-norm clipping at 1.0, Adam with decoupled weight decay 0.01.
                  Time and peak memory. Ours with ``torch.optim.AdamW(fused=True)``, and with the default (foreach)
                  implementation the trainers use today.
  decode          greedy decoding of 16 units after a 100-unit context, batch 8, on ``gslm_big``: ours prefills the
                  KV cache once; fairseq's ``SequenceGenerator`` forces the context as a prefix (how its
                  ``language_modeling`` task generates). The generated units must be equal.
  prompt          ours only: a deep-prompt step (L=5, + ``<s>``) against a full fine-tuning step on ``gslm_big``, same
                  batch and loss (the label tokens after ``<s>``), dropout on; time and peak memory; and the deep
                  prompt again with the frozen backbone held in bf16 (``load_unit_lm(dtype=torch.bfloat16)``).

Each case runs at 1 thread and at all threads, in fp32, and in bf16 where the hardware computes it natively (CUDA
with bf16, a CPU with AVX-512 BF16/AMX). On CUDA the training step also reports the model FLOP utilisation and the
extraction cases the hours of audio per GPU-hour. Peak memory on a CPU is the growth of the process's peak RSS over
the RSS before the model was loaded, with the peak reset after loading (``/proc/self/clear_refs``), so that the
checkpoint's transient copy is not counted; on CUDA, ``max_memory_allocated``.

Prints ONE JSON object: per case and setting, both sides' best seconds, their ratio, the issue's target, whether it
is met and, if not, by how much it falls short.

    python benchmarks/vs_fairseq.py                       # the full table: about 30-40 minutes on 2 CPU cores
    python benchmarks/vs_fairseq.py --cases decode --threads 1 --rounds 2
    python benchmarks/vs_fairseq.py --quick               # a smoke run on tiny models (a minute)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from oracles.measure import current_rss_mb, peak_rss_mb, reset_peak_rss, timed, warm_up_runtime

REPO = Path(__file__).resolve().parents[1]
FAIRSEQ_SIDE = REPO / "benchmarks" / "oracles" / "fairseq_side.py"
CASES = ("hubert_one", "hubert_batched", "lm_train", "decode", "prompt")

# The targets (ours over fairseq for speed; ours over full fine-tuning for the prompt step).
TARGETS = {
    "hubert_one": {"speedup": 1.3},
    "hubert_batched": {"speedup": 2.0},
    "lm_train": {"speedup": 1.3, "memory_ratio": 1.0},
    "decode": {"speedup": 2.5},
    "prompt": {"time_ratio": 0.5, "memory_ratio": 0.35},
}

# Sizes per mode. HuBERT base and gslm_big are the real architectures with random weights (speed does not depend
# on the values); the quick mode's tiny models only check that everything runs and agrees.
SIZES = {
    "full": dict(hubert="base", lm="gslm_big", n_one=8, seconds_one=4.0, n_batched=16, seconds_range=(2.0, 6.0),
                 batch=8, train_batch=4, train_len=128, decode_batch=8, context=100, new_tokens=16, prompt_len=5,
                 repeats=2),
    "quick": dict(hubert="tiny", lm="tiny", n_one=2, seconds_one=0.5, n_batched=4, seconds_range=(0.3, 0.7),
                  batch=2, train_batch=2, train_len=16, decode_batch=2, context=8, new_tokens=4, prompt_len=2,
                  repeats=1),
}


# -- hardware -------------------------------------------------------------------------------------------------


def bf16_native(device: str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (else bf16 is emulated and far slower than fp32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Dense bf16 tensor-core peaks (FLOP/s) for the model FLOP utilisation; unknown GPUs report null.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def gpu_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), None)


def lm_train_flops(cfg: Any, batch: int, length: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), counting matmuls only: the layers'
    projections and FFN, attention scores and values (causal: half of T^2), and the output projection."""
    d, f, n, V = cfg.embed_dim, cfg.ffn_dim, cfg.layers, cfg.vocab_size
    per_token = n * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * d * length / 2) + 2 * d * V
    return 3 * per_token * batch * length


# -- our side -------------------------------------------------------------------------------------------------


def _ours_hubert(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from speechprompt.data_prep.features import HubertFeatureReader
    from speechprompt.models.hubert import HubertConfig, HubertModel

    cfg = HubertConfig(**spec["hubert_cfg"])
    model = HubertModel(cfg, [spec["hubert_classes"]])
    model.load_state_dict(torch.load(spec["hubert_state"], weights_only=True), strict=True)
    model = model.eval().to(device, dtype)
    wavs = [w.to(device, dtype) for w in torch.load(spec["inputs"], weights_only=True)]
    layer = spec["layer"]
    reader = HubertFeatureReader(model, {"normalize": False}, layer, device=str(device))

    def one_at_a_time() -> list[torch.Tensor]:
        return [reader.read(w) for w in wavs]  # the toolkit's reader: inference mode, GSLM's chunking

    def batched() -> list[torch.Tensor]:
        out = []
        for idx in spec["batches"]:  # fairseq's batches, in their order: one padded forward each
            out.extend(reader.read_batch([wavs[i] for i in idx]))
        return out

    fn = batched if spec["mode"] == "batched" else one_at_a_time
    times, feats = timed(fn, spec["repeats"], device)
    if spec.get("features_out"):
        torch.save([f.float().cpu() for f in feats], spec["features_out"])
    return {**times, "frames": sum(f.shape[0] for f in feats)}


def _memory(before: float, peak_reset: bool, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_memory_mb": peak_rss_mb() - before, "peak_reset": peak_reset}


def _ours_lm_train(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import torch.nn.functional as F

    from speechprompt.models.unit_lm import load_unit_lm

    warm_up_runtime()
    before = current_rss_mb()
    model, dictionary = load_unit_lm(spec["lm_checkpoint"])
    model = model.to(device)
    gc.collect()
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    pad = dictionary.pad_index
    tokens = torch.load(spec["inputs"], weights_only=True).to(device)  # (B, T + 1)
    source, target = tokens[:, :-1], tokens[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates each tensor in one pass with no temporaries; the default (foreach) implementation
    # allocates temporaries the size of the model and makes several passes.
    fused = spec["optimizer"] == "fused"
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                                  fused=True if fused else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            logits = model(source)  # (B, T, V)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=pad, reduction="sum")
        (nll / target.ne(pad).sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, spec["clip_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, _ = timed(step, spec["repeats"], device)
    return {**times, **_memory(before, peak_reset, device)}


def _ours_decode(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from speechprompt.models.generation import greedy
    from speechprompt.models.unit_lm import load_unit_lm

    model, dictionary = load_unit_lm(spec["lm_checkpoint"], dtype=dtype)
    model = model.eval().to(device)
    context = torch.load(spec["inputs"], weights_only=True).to(device)  # (B, C) units
    B = context.shape[0]
    eos, pad = dictionary.eos_index, dictionary.pad_index
    # fairseq starts every sequence with </s>; everything but <pad> and </s> may be generated, as there.
    tokens = torch.cat([context.new_full((B, 1), eos), context], dim=1)
    allowed = [i for i in range(len(dictionary)) if i not in (pad, eos)]

    def decode() -> torch.Tensor:
        return greedy(model, tokens, spec["new_tokens"], eos, allowed_tokens=allowed)

    times, out = timed(decode, spec["repeats"], device)
    return {**times, "tokens": out.tolist()}


def _ours_prompt(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One training step of a tuning method on the frozen LM, as ``speechprompt train`` takes it: the method's
    forward arguments, the loss on the tokens after ``<s>`` (``lm_loss``), clipping at 1.0, Adam."""
    from speechprompt.models.unit_lm import load_unit_lm
    from speechprompt.tasks.data import IGNORE, lm_logits, lm_loss
    from speechprompt.tuning import build_method
    from speechprompt.tuning.base import freeze_except

    backbone_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["backbone_dtype"]]
    warm_up_runtime()
    before = current_rss_mb()
    model, dictionary = load_unit_lm(spec["lm_checkpoint"], dtype=backbone_dtype)
    model = model.to(device)
    gc.collect()
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec["method"] == "prompt":
        from speechprompt.tuning.prompt import PromptConfig

        method = build_method(PromptConfig(length=spec["prompt_len"]), model)
    else:
        method = build_method(spec["method"], model)
    params = freeze_except(model, method)
    model.train()  # the frozen LM's dropout stays on while training, as `speechprompt train` does by default
    tokens = torch.load(spec["inputs"], weights_only=True).to(device)  # (B, T): units, <s>, label, </s>
    B, T = tokens.shape
    targets = torch.full_like(tokens, IGNORE)
    sep = T - 3  # <s> at T - 3: its position predicts the label, the label's predicts </s>
    targets[:, sep : T - 1] = tokens[:, sep + 1 :]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0,
                                  fused=True)

    def step() -> None:
        total, terms = lm_loss(lm_logits(model, method, tokens), targets)
        loss = total / terms  # the mean, as a one-micro-batch update of the trainer normalises it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, _ = timed(step, spec["repeats"], device)
    return {**times, "trainable": sum(p.numel() for p in params), **_memory(before, peak_reset, device)}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    runner = {"hubert": _ours_hubert, "lm_train": _ours_lm_train, "decode": _ours_decode,
              "prompt": _ours_prompt}[spec["kind"]]
    out = runner(spec, device, dtype)
    out.update(impl="speechprompt", threads=torch.get_num_threads(), torch=torch.__version__)
    return out


# -- the parent: inputs, alternation, summary -----------------------------------------------------------------


def fairseq_python() -> Path:
    override = os.environ.get("SPEECHPROMPT_FAIRSEQ_PYTHON")
    return Path(override) if override else REPO / ".venv-fairseq" / "bin" / "python"


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict[str, Any]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# glibc keeps freed heap memory (its mmap threshold rises to the largest freed block), so a process's RSS also counts
# holes between live tensors. With the threshold fixed, every tensor of 128 kB or more is its own mapping, returned
# on free, and RSS follows the live tensors: the "live" peak. It slows large allocations (page faults), so it is
# used only for separate memory runs, never for timing.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **LIVE_MEMORY_ENV} if spec.get("live_memory") else None
    return _run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env)


def run_fairseq(spec: dict[str, Any]) -> dict[str, Any]:
    python = fairseq_python()
    if not python.is_file():
        return {"error": f"no fairseq environment at {python} (set SPEECHPROMPT_FAIRSEQ_PYTHON)"}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if spec.get("live_memory"):
        env.update(LIVE_MEMORY_ENV)
    return _run([str(python), str(FAIRSEQ_SIDE), json.dumps(spec)], env=env)


def live_peak(runner: Any, spec: dict[str, Any]) -> float | None:
    """The peak memory of one step (after the untimed first) with RSS following the live tensors."""
    if spec["device"].startswith("cuda"):
        return None  # max_memory_allocated already counts live tensors only
    out = runner({**spec, "live_memory": True, "repeats": 1})
    return round(out["peak_memory_mb"], 1) if "peak_memory_mb" in out else None


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the fastest single repeat, with every run's best time listed."""
    ok = [r for r in runs if "seconds" in r]
    if not ok:
        return {"error": next((r["error"] for r in runs if "error" in r), "no run")}
    best = min(ok, key=lambda r: min(r["seconds"]))
    out = {k: v for k, v in best.items() if k not in ("seconds", "cpu_seconds", "tokens", "checksum")}
    out["seconds"] = round(min(best["seconds"]), 4)
    out["cpu_seconds"] = round(min(min(r["cpu_seconds"]) for r in ok), 4)
    out["runs_best_seconds"] = [round(min(r["seconds"]), 4) for r in ok]
    memories = [r["peak_memory_mb"] for r in ok if "peak_memory_mb" in r]
    if memories:
        out["peak_memory_mb"] = round(min(memories), 1)  # other load can only add to a process's own RSS
    return out


def _alternate(spec_ours: dict[str, Any], spec_fs: dict[str, Any] | None, rounds: int,
               extra: list[tuple[str, dict[str, Any], Any]] = ()) -> dict[str, list[dict[str, Any]]]:
    """Run ours, fairseq and any extra (name, spec, runner) in turn, ``rounds`` times."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "fairseq": []}
    for name, _, _ in extra:
        runs[name] = []
    for _ in range(rounds):
        runs["ours"].append(run_ours(spec_ours))
        if spec_fs is not None:
            runs["fairseq"].append(run_fairseq(spec_fs))
        for name, spec, runner in extra:
            runs[name].append(runner(spec))
    return runs


def _verdict(value: float | None, target: float, higher_is_better: bool) -> dict[str, Any]:
    if value is None:
        return {"target": target, "met": None}
    met = value >= target if higher_is_better else value <= target
    out: dict[str, Any] = {"target": target, "met": met}
    if not met:
        # By how much the measured value misses, as a fraction of the target.
        out["short_by"] = round((target - value) / target if higher_is_better else (value - target) / target, 3)
    return out


def _speedups(slow: dict[str, Any], fast: dict[str, Any], threads: int) -> dict[str, Any]:
    """``slow / fast`` in wall and in CPU seconds, and which of them the verdict uses: CPU seconds for one thread
    (other processes on the machine stretch wall time, hardly a single thread's CPU time), wall seconds for more
    (CPU seconds then add up the threads)."""
    wall = _ratio(slow.get("seconds"), fast.get("seconds"))
    cpu = _ratio(slow.get("cpu_seconds"), fast.get("cpu_seconds"))
    on_cpu = threads == 1 and cpu is not None
    return {"speedup": cpu if on_cpu else wall, "speedup_wall": wall, "speedup_cpu": cpu,
            "verdict_on": "cpu_seconds" if on_cpu else "seconds"}


def _compare_features(ours: str, theirs: str, dtype: str, order: list[int] | None = None) -> dict[str, Any]:
    """The largest difference between the two sides' features, and whether it is float rounding: 1e-4 in fp32
    (layer outputs are layer-normed, of order 1), 0.1 in bf16 (8 mantissa bits through 6 layers). ``order``: the
    utterances of ``theirs`` to compare, in the order of ``ours``."""
    try:
        a, b = (torch.load(p, weights_only=True) for p in (ours, theirs))
    except (OSError, RuntimeError) as e:
        return {"features_agree": None, "features_note": f"not compared: {e}"}
    if order is not None:
        b = [b[i] for i in order]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return {"features_agree": False, "features_note": "different shapes"}
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b)) if a else 0.0
    return {"features_max_abs_diff": diff, "features_agree": diff <= (1e-4 if dtype == "fp32" else 0.1)}


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b <= 0:
        return None
    return round(a / b, 3)


def prepare(tmp: Path, size: dict[str, Any], cases: list[str]) -> dict[str, Any]:
    """Write the shared weights and inputs; returns the spec fields that point at them."""
    from speechprompt.config import to_dict
    from speechprompt.dictionary import Dictionary
    from speechprompt.models.hubert import HubertConfig, HubertModel
    from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, save_unit_lm

    g = torch.Generator().manual_seed(0)
    paths: dict[str, Any] = {}
    if any(c.startswith("hubert") for c in cases):
        cfg = HubertConfig.base() if size["hubert"] == "base" else HubertConfig.tiny()
        classes = 504
        torch.manual_seed(0)
        model = HubertModel(cfg, [classes])
        torch.save(model.state_dict(), tmp / "hubert.pt")
        fields = {k: (v.value if hasattr(v, "value") else v) for k, v in to_dict(cfg).items()}
        paths.update(hubert_state=str(tmp / "hubert.pt"), hubert_cfg=fields, hubert_classes=classes,
                     layer=min(6, cfg.encoder_layers))
        sr = 16000
        one = [0.1 * torch.randn(int(size["seconds_one"] * sr), generator=g) for _ in range(size["n_one"])]
        torch.save(one, tmp / "wavs_one.pt")
        lo, hi = size["seconds_range"]
        n = size["n_batched"]
        lengths = [int(sr * (lo + (hi - lo) * i / max(n - 1, 1))) for i in range(n)]
        order = torch.randperm(n, generator=g).tolist()  # a manifest is not sorted by length
        varied = [0.1 * torch.randn(lengths[i], generator=g) for i in order]
        torch.save(varied, tmp / "wavs_varied.pt")
        by_length = sorted(range(n), key=lambda i: varied[i].numel(), reverse=True)
        paths["batches"] = [by_length[i : i + size["batch"]] for i in range(0, n, size["batch"])]
        paths["audio_seconds_one"] = sum(w.numel() for w in one) / sr
        paths["audio_seconds_varied"] = sum(w.numel() for w in varied) / sr
    if any(c in ("lm_train", "decode", "prompt") for c in cases):
        torch.manual_seed(0)
        lm = UnitLM(UnitLMConfig.named(size["lm"]))
        save_unit_lm(lm, Dictionary.for_units(lm.cfg.vocab_size - 4), tmp / "lm" / "checkpoint.pt")
        paths["lm_checkpoint"] = str(tmp / "lm" / "checkpoint.pt")
        paths["lm_config"] = size["lm"]
        V = lm.cfg.vocab_size
        torch.save(torch.randint(4, V, (size["train_batch"], size["train_len"] + 1), generator=g), tmp / "train.pt")
        torch.save(torch.randint(4, V, (size["decode_batch"], size["context"]), generator=g), tmp / "context.pt")
        prompt_tokens = torch.randint(4, V, (size["train_batch"], size["train_len"]), generator=g)
        prompt_tokens[:, -3] = Dictionary.bos_index  # <s>, then the label unit and </s>
        prompt_tokens[:, -1] = Dictionary().eos_index
        torch.save(prompt_tokens, tmp / "prompt.pt")
        del lm
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--threads", default="1,all", help="comma-separated torch thread counts; 'all' = every core")
    parser.add_argument("--dtypes", default="auto",
                        help="comma-separated fp32,bf16; auto = fp32, plus bf16 where the hardware has it")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement (best is kept)")
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke run")
    parser.add_argument("--force-bf16", action="store_true",
                        help="run the bf16-backbone prompt step even where bf16 matmuls are emulated (very slow)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    all_threads = os.cpu_count() or 1
    threads = sorted({all_threads if t.strip() == "all" else int(t) for t in args.threads.split(",")})
    native_bf16 = bf16_native(device)
    if args.dtypes == "auto":
        dtypes = ["fp32", "bf16"] if native_bf16 else ["fp32"]
    else:
        dtypes = [d.strip() for d in args.dtypes.split(",")]
    if device.startswith("cuda"):
        threads = threads[-1:]  # host threads hardly matter on a GPU
    size = SIZES["quick" if args.quick else "full"]
    rounds = 1 if args.quick else args.rounds

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_fairseq_") as tmp_name:
        tmp = Path(tmp_name)
        shared = prepare(tmp, size, cases)
        base = {"device": device, "repeats": size["repeats"], "seed": 0, "force_bf16": args.force_bf16,
                "quick": args.quick, **shared}
        for case in cases:
            rows = []
            for dtype in dtypes if case != "prompt" else ["fp32"]:  # the prompt case has its own bf16 variant
                for n_threads in threads:
                    setting = {**base, "dtype": dtype, "threads": n_threads}
                    rows.append(run_case(case, setting, size, rounds, device))
            results[case] = rows

    print(json.dumps({
        "benchmark": "vs_fairseq",
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu_count": all_threads,
        "bf16_native": native_bf16,
        "note": None if native_bf16 or "bf16" in dtypes else
        "bf16 skipped: this device has no native bf16 matmul (emulated, several times slower than fp32)",
        "torch": torch.__version__,
        "fairseq_python": str(fairseq_python()),
        "quick": args.quick,
        "rounds": rounds,
        "sizes": size,
        "targets": TARGETS,
        "results": results,
        "command": " ".join(["python", "benchmarks/vs_fairseq.py", *sys.argv[1:]]),
    }))
    return 0


def run_case(case: str, setting: dict[str, Any], size: dict[str, Any], rounds: int, device: str) -> dict[str, Any]:
    """Measure one case at one (dtype, threads) setting and compare."""
    row: dict[str, Any] = {"dtype": setting["dtype"], "threads": setting["threads"]}
    on_gpu = device.startswith("cuda")
    if case in ("hubert_one", "hubert_batched"):
        one = case == "hubert_one"
        inputs = setting["hubert_state"].replace("hubert.pt", "wavs_one.pt" if one else "wavs_varied.pt")
        spec = {**setting, "kind": "hubert", "inputs": inputs, "mode": "one" if one else "batched"}
        out_dir = Path(setting["hubert_state"]).parent
        spec_ours = {**spec, "features_out": str(out_dir / f"{case}_ours.pt")}
        spec_fs = {**spec, "features_out": str(out_dir / f"{case}_fairseq.pt")}
        fs_one_out = str(out_dir / f"{case}_fairseq_one.pt")
        extra = [] if one else [("fairseq_one_at_a_time", {**spec, "mode": "one", "features_out": fs_one_out},
                                 run_fairseq)]
        runs = _alternate(spec_ours, spec_fs, rounds, extra)
        ours, fs = _best(runs["ours"]), _best(runs["fairseq"])
        row.update(ours=ours, fairseq=fs, **_speedups(fs, ours, setting["threads"]))
        if one:
            row.update(_compare_features(spec_ours["features_out"], spec_fs["features_out"], setting["dtype"]))
        else:
            # read_batch pads exactly, so ours must equal fairseq one utterance at a time (read in input order; ours
            # are in the batches' order), not fairseq's padded batches (see the module docstring).
            order = [i for idx in setting["batches"] for i in idx]
            row.update(_compare_features(spec_ours["features_out"], fs_one_out, setting["dtype"], order))
            fs_one = _best(runs["fairseq_one_at_a_time"])
            row["fairseq_one_at_a_time"] = fs_one
            row["vs_fairseq_one_at_a_time"] = _speedups(fs_one, ours, setting["threads"])
        audio = setting["audio_seconds_one" if one else "audio_seconds_varied"]
        if isinstance(ours.get("seconds"), float):
            row["real_time_factor"] = round(ours["seconds"] / audio, 4)
            if on_gpu:
                row["audio_hours_per_gpu_hour"] = round(audio / ours["seconds"], 1)
        row.update(_verdict(row["speedup"], TARGETS[case]["speedup"], True))
    elif case == "lm_train":
        spec = {**setting, "kind": "lm_train", "inputs": setting["lm_checkpoint"].replace(
            "lm/checkpoint.pt", "train.pt"), "clip_norm": 1.0, "optimizer": "fused"}
        extra = [("ours_foreach_adam", {**spec, "optimizer": "foreach"}, run_ours)]
        runs = _alternate(spec, spec, rounds, extra)
        ours, fs, foreach = _best(runs["ours"]), _best(runs["fairseq"]), _best(runs["ours_foreach_adam"])
        ours["peak_live_memory_mb"], fs["peak_live_memory_mb"] = live_peak(run_ours, spec), live_peak(run_fairseq, spec)
        foreach["peak_live_memory_mb"] = live_peak(run_ours, {**spec, "optimizer": "foreach"})
        row.update(ours=ours, fairseq=fs, ours_foreach_adam=foreach, **_speedups(fs, ours, setting["threads"]),
                   memory_ratio=_ratio(ours.get("peak_memory_mb"), fs.get("peak_memory_mb")),
                   live_memory_ratio=_ratio(ours["peak_live_memory_mb"], fs["peak_live_memory_mb"]))
        row["foreach_adam_vs_fairseq"] = _speedups(fs, foreach, setting["threads"])
        row["foreach_adam_vs_fairseq"]["memory_ratio"] = _ratio(foreach.get("peak_memory_mb"),
                                                                fs.get("peak_memory_mb"))
        row["speed"] = _verdict(row["speedup"], TARGETS[case]["speedup"], True)
        row["memory"] = _verdict(row["memory_ratio"], TARGETS[case]["memory_ratio"], False)
        if on_gpu and isinstance(ours.get("seconds"), float):
            from speechprompt.models.unit_lm import UnitLMConfig

            flops = lm_train_flops(UnitLMConfig.named(setting["lm_config"]), size["train_batch"], size["train_len"])
            peak = gpu_peak_flops()
            row["model_tflops_per_s"] = round(flops / ours["seconds"] / 1e12, 2)
            row["mfu"] = None if peak is None else round(flops / ours["seconds"] / peak, 4)
    elif case == "decode":
        spec = {**setting, "kind": "decode", "new_tokens": size["new_tokens"],
                "inputs": setting["lm_checkpoint"].replace("lm/checkpoint.pt", "context.pt")}
        runs = _alternate(spec, spec, rounds)
        ours, fs = _best(runs["ours"]), _best(runs["fairseq"])
        tokens = {name: next((r["tokens"] for r in runs[name] if "tokens" in r), None) for name in runs}
        row.update(ours=ours, fairseq=fs, **_speedups(fs, ours, setting["threads"]),
                   outputs_match=None if None in tokens.values() else tokens["ours"] == tokens["fairseq"])
        row.update(_verdict(row["speedup"], TARGETS[case]["speedup"], True))
    elif case == "prompt":
        spec = {**setting, "kind": "prompt", "prompt_len": size["prompt_len"],
                "inputs": setting["lm_checkpoint"].replace("lm/checkpoint.pt", "prompt.pt")}
        full = {**spec, "method": "full_finetune", "backbone_dtype": "fp32"}
        prompt = {**spec, "method": "prompt", "backbone_dtype": "fp32"}
        variants = [("full_finetune", full, run_ours)]
        if bf16_native(device) or setting.get("force_bf16") or setting.get("quick"):  # tiny models are fast anyway
            variants.append(("prompt_bf16_backbone", {**spec, "method": "prompt", "backbone_dtype": "bf16"}, run_ours))
        runs = _alternate(prompt, None, rounds, variants)
        row["deep_prompt"], row["full_finetune"] = _best(runs["ours"]), _best(runs["full_finetune"])
        if "prompt_bf16_backbone" in runs:
            row["deep_prompt_bf16_backbone"] = _best(runs["prompt_bf16_backbone"])
        else:
            row["deep_prompt_bf16_backbone"] = {"skipped": "this device has no native bf16 matmul; the CPU fallback's "
                                                "backward matmuls are 100x+ slower than fp32 (--force-bf16 runs it)"}
        timer = "cpu_seconds" if setting["threads"] == 1 else "seconds"
        row["verdict_on"] = timer
        for name, variant in (("full_finetune", full), ("deep_prompt", prompt),
                              ("deep_prompt_bf16_backbone", {**prompt, "backbone_dtype": "bf16"})):
            if "seconds" in row[name]:
                row[name]["peak_live_memory_mb"] = live_peak(run_ours, variant)
        full_best = row["full_finetune"]
        for name in ("deep_prompt", "deep_prompt_bf16_backbone"):
            best = row[name]
            row[f"{name}_time_ratio"] = _ratio(best.get(timer), full_best.get(timer))
            row[f"{name}_memory_ratio"] = _ratio(best.get("peak_memory_mb"), full_best.get("peak_memory_mb"))
            row[f"{name}_live_memory_ratio"] = _ratio(best.get("peak_live_memory_mb"),
                                                       full_best.get("peak_live_memory_mb"))
        row["time"] = _verdict(row["deep_prompt_time_ratio"], TARGETS[case]["time_ratio"], False)
        row["memory"] = _verdict(row["deep_prompt_memory_ratio"], TARGETS[case]["memory_ratio"], False)
        row["live_memory"] = _verdict(row["deep_prompt_live_memory_ratio"], TARGETS[case]["memory_ratio"], False)
        row["bf16_backbone_native"] = bf16_native(device)
    return row


if __name__ == "__main__":
    sys.exit(main())
