"""Memory of one training step on the published speech-LM shapes (SLAM 0.5B, TWIST 350M/1.3B/7B), by category,
without the hardware: every tensor the step allocates is counted, none is materialised.

The model, the tuning method, the optimizer and the batch are built under torch's ``FakeTensorMode`` (tensors with a
shape, a dtype and a device, and no storage), and two training steps run under torch's ``MemTracker``, which follows
every storage the step creates and frees (rounded up to the CUDA caching allocator's 512-byte blocks). The code
that runs is the toolkit's own: ``SpeechLM`` on the shared transformer layer, ``build_method``/``freeze_except`` as
``train`` calls them, ``set_activation_checkpointing``, the frozen base in bf16 with fp32 method tensors as
``base_dtype: bfloat16`` holds it, and the trainers' optimizer (``build_optimizer``: fused Adam). The peak is the
second step's, when Adam's moments exist.

``--device`` is where the fake tensors live: ``cpu`` (default) runs the CPU code paths, whose attention is SDPA's
flash kernel (it keeps a log-sum-exp per query, as CUDA's flash kernel does, never the probabilities); ``cuda``
needs a CUDA build of torch (no GPU). What neither sees: a CUDA context (about 0.5 GB per process), kernel
workspaces (cuBLAS, tens of MB) and the allocator's fragmentation.

Configurations:

  deep_prompt_bf16:       deep prompt L=5 (SpeechPrompt), frozen base in bf16, prompts and Adam in fp32;
  deep_prompt_bf16_ckpt:  the same with activation checkpointing (each layer recomputes its activations);
  full_ft_fp32:           every weight trained, fp32 weights, gradients and Adam moments (the baseline).

``--real`` runs the same steps on real tensors: the tests check on a 2-layer shape that the fake count equals it.

    python benchmarks/speechlm_memory.py                  # all four shapes, batch 32 x 100 units (4 s at 25 Hz)
    python benchmarks/speechlm_memory.py --shapes twist_7b --batch 64

Prints ONE JSON object (and a line per measurement on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from speechprompt.models.speech_lm import PUBLISHED_SHAPES, SpeechLM, SpeechLMConfig
from speechprompt.models.transformer import set_activation_checkpointing
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.training.optim import OptimConfig, build_optimizer
from speechprompt.tuning import PromptConfig, build_method, freeze_except

CONFIGS = ("deep_prompt_bf16", "deep_prompt_bf16_ckpt", "full_ft_fp32")
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate")


class _Tracker(MemTracker):
    """torch's MemTracker, for models with frozen weights: it hooks every parameter's gradient, and a frozen one
    refuses hooks. Modules with a frozen parameter get none; their trained tensors' gradients are then counted as
    the step's temporaries instead of as gradients (the total is the same)."""

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True
                                         ) -> tuple[int, int]:
        hooks = install_grad_hooks and all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks=hooks)


class _FakeMode(FakeTensorMode):
    """Fake tensors that answer the step's two data-dependent questions as its real inputs would: a boolean (the
    model's "is any key padded?") is False, as the benchmark's batches have no padding; a number (Adam's step count,
    read with ``.item()``) is 1. Both only choose code paths; neither changes a tensor's size."""

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        return super().dispatch(func, types, args, kwargs)


def _gb(n: int) -> float:
    return round(n / 1e9, 3)


def measure(shape_name: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of the second of two training steps of ``config`` on ``shape_name``, by category."""
    mode = contextlib.nullcontext() if args.real else _FakeMode()
    # Module.to() swaps a fake parameter's payload in place, which fake tensors refuse; new Parameters instead.
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(not args.real)
    try:
        return _measure(shape_name, config, args, mode)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def _measure(shape_name: str, config: str, args: argparse.Namespace, mode: Any) -> dict[str, Any]:
    shape = dict(PUBLISHED_SHAPES[shape_name], **({"layers": args.layers} if args.layers else {}))
    device = torch.device(args.device)
    with mode:
        torch.manual_seed(0)
        vocab = UnitVocab(size=shape["vocab_size"], num_units=shape["vocab_size"] - 2, unit_offset=2, bos=1, eos=1,
                          pad=0, layout="slamkit")
        deep = config.startswith("deep_prompt")
        # Built in its dtype on its device: converting fake parameters afterwards is not supported.
        torch.set_default_dtype(torch.bfloat16 if deep else torch.float32)  # bf16: as base_dtype: bfloat16 holds it
        try:
            with torch.device(device):
                model = SpeechLM(SpeechLMConfig(**shape, padding_idx=0), vocab)
        finally:
            torch.set_default_dtype(torch.float32)
        if deep:
            method = build_method(PromptConfig(length=5, deep=True), model)  # fp32, on the model's device
            params = freeze_except(model, method)
        else:
            params = list(model.parameters())
        if config.endswith("_ckpt"):
            set_activation_checkpointing(model)
        model.train()
        opt = build_optimizer(params, OptimConfig(lr=1e-4))  # the trainers' Adam (fused where torch has it)
        tokens = torch.randint(2, shape["vocab_size"], (args.batch, args.length), device=device)
        targets = torch.randint(2, shape["vocab_size"], (args.batch, args.length), device=device)

        tracker = _Tracker()
        tracker.track_external(model, opt)
        with tracker:
            for step in range(2):  # the second step has Adam's state from the first: the steady state
                kwargs = method.forward_kwargs(args.batch) if deep else {}  # inside: its tensors count
                logits = model(tokens, **kwargs)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")[device]
    by_category = {c: _gb(peak.get(c, 0)) for c in CATEGORIES}
    return {
        "shape": shape_name, "config": config, "layers": shape["layers"],
        "parameters": sum(p.numel() for p in model.parameters()) + (
            sum(p.numel() for p in method.parameters()) if deep else 0),
        "trainable": sum(p.numel() for p in params),
        "peak_gb": _gb(peak["Total"]), "peak_gb_by_category": by_category,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(PUBLISHED_SHAPES), choices=list(PUBLISHED_SHAPES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--length", type=int, default=100, help="units per sequence (25 Hz: 4 s)")
    parser.add_argument("--device", default="cpu", help="where the (fake) tensors live (cuda: a CUDA build)")
    parser.add_argument("--layers", type=int, default=0, help="override the shape's layer count (smoke tests)")
    parser.add_argument("--real", action="store_true", help="real tensors on --device instead of fake ones")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        for config in args.configs:
            rows.append(measure(shape, config, args))
            print(f"{shape} {config}: peak {rows[-1]['peak_gb']} GB", file=sys.stderr, flush=True)
    json.dump({"benchmark": "speechlm_memory", "torch": torch.__version__, "device": args.device,
               "fake": not args.real, "batch": args.batch, "length": args.length, "results": rows},
              sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
