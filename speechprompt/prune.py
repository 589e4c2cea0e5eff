"""Prune a pretrained model's transformer linears, or sweep a SUPERB task's metric against sparsity.

    speechprompt prune --model hubert_base_ls960.pt --sparsity 0.3 --out hubert_base_pruned30.pt
    speechprompt prune --model wav2vec2-base-960h/ --sparsity 0.5 --out wav2vec2-base-960h-pruned50/
    speechprompt prune --mask exp/superb/ks_mask/best.safetensors --out hubert_ks_masked.pt
    speechprompt prune --sweep exp/superb/ks_lora/best.safetensors --manifest data/dev.tsv --labels data/dev.labels \\
        --sparsities 0 0.1 0.2 0.3 0.5 0.7 --out exp/superb/ks_lora/sweep

``--sparsity S`` is layer-wise magnitude pruning: in every targeted linear (all six of every transformer layer by
default), the weights of smallest ``|w|`` are set to zero, ``S`` of them (rounded down: the kept count is rounded
up, as S3-Router's keep ratio). ``--mask`` zeroes the weights a trained S3-Router mask removes (its base model is
the one recorded in the checkpoint, or ``--model``; the fingerprint is checked either way), giving a plain
checkpoint of that task's pruned model.

The pruned model is written in the input's own format, so every loader reads it back:

* a torch file (fairseq HuBERT / wav2vec 2.0 / data2vec / CTC checkpoints, official WavLM, a fairseq unit LM): the
  same file with only the pruned tensors' bytes changed; the pickle (configs, task state, dictionaries) is copied
  as it is, and ``dict.txt`` / ``dict.ltr.txt`` beside the input are copied beside the output;
* a Hugging Face directory (an encoder, or a speech LM: slamkit TWIST/SLAM, OPT, LLaMA, Qwen2): its files copied,
  the weights rewritten as ``model.safetensors`` under the original's own key names.

``--targets`` names the linears of each layer: ``q_proj k_proj v_proj out_proj fc1 fc2`` by default; on SwiGLU
layers (LLaMA, Qwen2) ``fc1`` is ``gate_proj`` + ``up_proj`` and ``fc2`` is ``down_proj``, each also selectable
alone, and ``o_proj`` (their attention output's name) is ``out_proj``.

``--sweep CHECKPOINT`` evaluates a SUPERB task checkpoint (any method) with its upstream's linears
magnitude-pruned at each sparsity (restored exactly in between; a trained method keeps acting on top) and writes
``OUT/sweep.json``, ``.csv``, ``.md`` and ``OUT/sweep.png`` (the task's metric against sparsity).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from speechprompt.checkpoint import base_fingerprint, checkpoint_kind, load_checkpoint, resolve_base
from speechprompt.config import from_dict
from speechprompt.errors import CheckpointError, SpeechPromptError
from speechprompt.fairseq_compat import safe_torch_load
from speechprompt.hf_compat import WEIGHT_FILES, read_config, read_weights
from speechprompt.mask_analysis import write_tables
from speechprompt.models.encoders import load_encoder
from speechprompt.models.hf_decoders import hf_names, is_decoder_directory, load_speech_lm
from speechprompt.models.hf_keys import AST_KEYS, MODEL_TYPES, WAV2VEC2_KEYS, rename
from speechprompt.plots import PlotError, save_figure
from speechprompt.superb import evaluate_superb, load_audio_split, load_superb
from speechprompt.tuning import MaskConfig, S3Router
from speechprompt.tuning.base import ALL_LINEARS, LINEAR_CHOICES, LinearName
from speechprompt.tuning.mask import magnitude_masks, magnitude_sweep, prunable_weights

CTC_PREFIX = "w2v_encoder.w2v_model."  # where a fairseq CTC checkpoint keeps its encoder
DICTIONARIES = ("dict.txt", "dict.ltr.txt")  # read from beside a torch file by the unit-LM and CTC loaders


class PruneError(SpeechPromptError, ValueError):
    """Arguments or inputs that cannot be pruned as asked."""


# --------------------------------------------------------------------------------------------------------------
# What to zero


def load_model(path: str | os.PathLike) -> nn.Module:
    """An encoder (any format :func:`load_encoder` reads) or, failing that, a fairseq unit LM (``dict.txt``
    beside it), as stored."""
    try:
        return load_encoder(path).model
    except CheckpointError as encoder_error:
        try:  # a unit LM: a fairseq file, or a slamkit / HF causal-LM directory
            return load_speech_lm(path)[0]
        except CheckpointError:
            raise encoder_error from None


def mask_of_checkpoint(path: str | os.PathLike, model_path: str | os.PathLike | None) -> tuple[Path, nn.Module,
                                                                                             dict[str, Tensor]]:
    """A trained S3-Router mask as ``{"<linear path>.weight": 0/1}``, with its base model (``model_path`` or the
    one recorded in the checkpoint; fingerprint-checked) and where that model was read from."""
    ckpt = load_checkpoint(path)
    method = ckpt.meta.get("method") or {}
    if method.get("name") != "mask":
        raise PruneError(f"{ckpt.path}: a {method.get('name')!r} checkpoint; --mask takes S3-Router masks (method "
                         "mask)")
    found = resolve_base(ckpt.meta, model_path, ckpt.path, flag="--model")
    model = load_model(found)
    ckpt.check_base(base_fingerprint(model), found)
    router = S3Router(from_dict(MaskConfig, dict(method.get("config") or {}), where="mask"), model)
    router.load_exported_state_dict(ckpt.method_state)
    masks = {f"{p}.weight": r().detach().clone() for p, r in router.routers().items()}
    return found, model, masks


# --------------------------------------------------------------------------------------------------------------
# Writing, in the input's format


def write_pruned(src: str | os.PathLike, model: nn.Module, masks: Mapping[str, Tensor],
                 out: str | os.PathLike) -> str:
    """Write the model read from ``src`` with ``masks`` (``{"<linear path>.weight": 0/1}``, our names) applied, in
    ``src``'s format at ``out``. Returns the format: ``torch`` or ``huggingface``."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise PruneError(f"--out {out} is the input itself; write the pruned model somewhere else")
    ours = {key: model.get_submodule(key.rpartition(".")[0]).weight for key in masks}
    if src.is_dir():
        _write_hf(src, ours, masks, out)
        return "huggingface"
    _write_torch_file(src, ours, masks, out)
    return "torch"


def _zeroed(stored: Tensor, mask: Tensor) -> Tensor:
    return stored.masked_fill(mask.to(stored.device) == 0, 0.0)  # +0.0, never -0.0


def _check_same(path: Path, key: str, stored: Tensor, ours: Tensor) -> None:
    if stored.shape != ours.shape or not torch.equal(stored.float(), ours.detach().float().cpu()):
        raise CheckpointError(f"{path}: its tensor for {key} is not the weight the model was loaded with")


def _write_hf(src: Path, ours: Mapping[str, Tensor], masks: Mapping[str, Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    state, weights_path = read_weights(src)
    to_hf: dict[str, str] = {}
    if is_decoder_directory(src):  # a speech LM (slamkit, OPT, LLaMA, Qwen2): its own key table
        to_hf = hf_names(src, state)
    else:
        architecture, prefix, _ = MODEL_TYPES[read_config(src).get("model_type")]
        table = AST_KEYS if architecture == "ast" else WAV2VEC2_KEYS
        for hf_key in state:
            inner = hf_key[len(prefix):] if hf_key.startswith(prefix) else hf_key
            renamed, _ = rename({inner: state[hf_key]}, table)
            to_hf.update({ours_key: hf_key for ours_key in renamed})
    for key, mask in masks.items():
        if key not in to_hf:
            raise CheckpointError(f"{weights_path}: no tensor maps to {key}")
        _check_same(weights_path, key, state[to_hf[key]], ours[key])
        state[to_hf[key]] = _zeroed(state[to_hf[key]], mask).contiguous()
    shards: set[str] = set()  # the input's weight shards are replaced by the one model.safetensors
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / name).is_file():
            shards |= set((json.loads((src / name).read_text()).get("weight_map") or {}).values())
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in WEIGHT_FILES and f.name not in shards:
            shutil.copy2(f, out / f.name)
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")


def _storage_bytes(t: Tensor) -> bytes:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes()


def _write_torch_file(src: Path, ours: Mapping[str, Tensor], masks: Mapping[str, Tensor], out: Path) -> None:
    """Rewrite the storage records of the pruned tensors in a copy of the torch zip file; nothing else changes."""
    if not zipfile.is_zipfile(src):
        raise CheckpointError(f"{src}: saved in torch's legacy (pre-1.6) format; load and re-save it with "
                              "torch.save to prune it")
    raw = safe_torch_load(src)
    state = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{src}: no 'model' state dict")
    by_storage: dict[int, list[tuple[Tensor, Tensor]]] = {}  # storage data_ptr -> (stored tensor, its mask)
    for key, mask in masks.items():
        stored_key = next((k for k in (key, CTC_PREFIX + key) if k in state), None)
        if stored_key is None:
            raise CheckpointError(f"{src}: no tensor {key} in its model state")
        stored = state[stored_key]
        _check_same(src, key, stored, ours[key])
        by_storage.setdefault(stored.untyped_storage().data_ptr(), []).append((stored, mask))

    # New bytes of every touched storage, found in the file by its old bytes' size and hash.
    wanted: dict[tuple[int, str], bytes] = {}
    for group in by_storage.values():
        old = _storage_bytes(group[0][0])
        buf = torch.frombuffer(bytearray(old), dtype=torch.uint8)
        for stored, mask in group:
            view = buf.view(stored.dtype).as_strided(stored.shape, stored.stride(), stored.storage_offset())
            view.masked_fill_(mask == 0, 0.0)
        wanted[(len(old), hashlib.sha256(old).hexdigest())] = buf.numpy().tobytes()
    reader = torch._C.PyTorchFileReader(str(src))
    records = reader.get_all_records()
    sizes = {size for size, _ in wanted}
    replace: dict[str, bytes] = {}
    found: dict[tuple[int, str], list[str]] = {}
    for name in records:
        if name.startswith("data/") and reader.get_record_size(name) in sizes:
            data = reader.get_record(name)
            key = (len(data), hashlib.sha256(data).hexdigest())
            if key in wanted:
                found.setdefault(key, []).append(name)
                replace[name] = wanted[key]
    for key in wanted:
        if len(found.get(key, [])) != 1:
            raise CheckpointError(f"{src}: {len(found.get(key, []))} storage records hold the bytes of a pruned "
                                  "tensor; expected exactly one")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_file = Path(tmp) / out.name  # torch names the archive after the file
        writer = torch._C.PyTorchFileWriter(str(tmp_file))
        for name in records:
            data = replace.get(name)
            if data is None:
                data = reader.get_record(name)
            writer.write_record(name, data, len(data))
        writer.write_end_of_file()
        del writer  # closes the file
        os.replace(tmp_file, out)
    for name in DICTIONARIES:
        if (src.parent / name).is_file() and not (out.parent / name).exists():
            shutil.copy2(src.parent / name, out.parent / name)


# --------------------------------------------------------------------------------------------------------------
# Sweep


def metric_vs_sparsity_figure(rows: Sequence[Mapping[str, Any]], metric: str, title: str | None = None) -> Figure:
    """A task's metric against the fraction of the upstream's linear weights removed (one marker per sweep row).

    Args:
        rows: ``{"sparsity", <metric>}`` rows in sweep order (:func:`sweep`'s).
        metric: the metric to draw (``accuracy``, ``wer`` ...).
    """
    points = [(float(r["sparsity"]), float(r[metric])) for r in rows if r.get(metric) is not None]
    if not points:
        raise PlotError(f"no sweep rows with {metric!r} to draw")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o")
    for x, y in points:
        ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("sparsity of the upstream's transformer linears")
    ax.set_ylabel(metric)
    ax.set_xlim(left=min(0.0, min(xs)) - 0.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} against magnitude pruning")
    return fig


def sweep(checkpoint: str | os.PathLike, manifest: str | os.PathLike, labels: str | os.PathLike | None,
          sparsities: Sequence[float], out: str | os.PathLike, upstream: str | os.PathLike | None = None,
          targets: Sequence[LinearName] = ALL_LINEARS, layers: list[int] | None = None, batch_size: int = 16,
          device: str = "cpu") -> list[dict[str, Any]]:
    """Evaluate a SUPERB checkpoint with its upstream magnitude-pruned at each sparsity; write the table and plot.

    Returns:
        One row per sparsity: ``{"sparsity" (asked), "zeroed" (measured fraction of zero weights), <every metric
        of the head>}``.
    """
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise PruneError(f"sparsities must be in [0, 1), got {s}")
    if checkpoint_kind(checkpoint) != "superb":
        raise PruneError(f"{checkpoint}: --sweep takes a SUPERB checkpoint (speechprompt superb); this one is a "
                         "unit-LM task")
    model = load_superb(checkpoint, upstream, device)
    split = load_audio_split(manifest, labels)
    metric = model.head.default_metric
    results: list[dict[str, Any]] = []

    def evaluate() -> float:
        metrics, _ = evaluate_superb(model, split, batch_size)
        results.append(metrics)
        return metrics[metric]

    weights = prunable_weights(model.upstream, targets, layers)
    swept = magnitude_sweep(weights, [1.0 - s for s in sparsities], evaluate)
    rows = [{"sparsity": s, "zeroed": r["sparsity"], **m} for s, r, m in zip(sparsities, swept, results)]
    columns = ["sparsity", "zeroed", *results[0].keys()]
    write_tables(rows, columns, out, "sweep", {"checkpoint": str(checkpoint), "metric": metric,
                                              "targets": [t.value for t in targets], "layers": layers})
    save_figure(metric_vs_sparsity_figure(rows, metric, f"{Path(checkpoint).parent.name}: {metric}"),
                Path(out) / "sweep.png")
    return rows


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sparsity", type=float, help="magnitude-prune --model: the fraction of each targeted "
                      "linear's weights set to zero, in [0, 1)")
    mode.add_argument("--mask", metavar="CHECKPOINT", help="apply a trained S3-Router mask (task checkpoint of the "
                      "mask method) to its base model")
    mode.add_argument("--sweep", metavar="CHECKPOINT", help="evaluate a SUPERB checkpoint at each of --sparsities")
    parser.add_argument("--model", metavar="PATH", help="the model to prune: a fairseq/WavLM .pt, a unit LM .pt or "
                        "a Hugging Face directory (with --mask: default the checkpoint's recorded base)")
    parser.add_argument("--out", required=True, help="the pruned model (a .pt file, or a directory for a Hugging "
                        "Face input); with --sweep, the output directory")
    parser.add_argument("--targets", nargs="+", default=[t.value for t in ALL_LINEARS], choices=LINEAR_CHOICES,
                        help="linears of each layer to prune; on SwiGLU layers (LLaMA, Qwen2) fc1 = gate_proj + "
                        "up_proj and fc2 = down_proj, and o_proj is out_proj")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices to prune (default all)")
    parser.add_argument("--manifest", help="--sweep: the audio manifest (fairseq TSV) to evaluate on")
    parser.add_argument("--labels", help="--sweep: its labels (default: the .labels file beside the manifest)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.7],
                        help="--sweep: sparsities to evaluate at")
    parser.add_argument("--upstream", default=None, help="--sweep: the upstream (default: the recorded one)")
    parser.add_argument("--batch-size", type=int, default=16, help="--sweep: utterances per batch")
    parser.add_argument("--device", default="cpu", help="--sweep: cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    targets = [LinearName(t) for t in args.targets]
    if args.sweep:
        if not args.manifest:
            raise PruneError("--sweep needs --manifest (and --labels unless they sit beside it)")
        rows = sweep(args.sweep, args.manifest, args.labels, args.sparsities, args.out, args.upstream, targets,
                     args.layers, args.batch_size, args.device)
        for row in rows:
            print(json.dumps(row))
        return 0
    if args.mask:
        if args.layers is not None or set(targets) != set(ALL_LINEARS):
            raise PruneError("--targets and --layers choose what magnitude pruning prunes; a --mask prunes what its "
                             "task's mask removes")
        src, model, masks = mask_of_checkpoint(args.mask, args.model)
        mode = "mask"
    else:
        if args.model is None:
            raise PruneError("--sparsity needs --model, the model to prune")
        if not 0.0 <= args.sparsity < 1.0:
            raise PruneError(f"--sparsity must be in [0, 1), got {args.sparsity}")
        src, model = Path(args.model), load_model(args.model)
        masks = magnitude_masks(prunable_weights(model, targets, args.layers), 1.0 - args.sparsity)
        mode = f"magnitude {args.sparsity}"
    fmt = write_pruned(src, model, masks, args.out)
    removed = sum(int((m == 0).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    print(json.dumps({"input": str(src), "output": str(args.out), "format": fmt, "mode": mode,
                      "linears": len(masks), "weights": total, "zeroed": removed, "sparsity": removed / total}))
    return 0
