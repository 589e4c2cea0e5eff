"""Compare S3-Router masks: how much two tasks' masks overlap, and how far a mask is from magnitude pruning.

    speechprompt mask-analysis --masks exp/ks_mask/best.safetensors exp/er_mask/best.safetensors --out exp/overlap
    speechprompt mask-analysis --masks exp/ks_mask/best.safetensors --magnitude --out exp/overlap_ks

For each pair, every masked linear gets the intersection over union (IoU) of the weights the two masks *keep*
(1: the same weights, 0: disjoint), and so does every layer (its linears pooled) and the whole model. ``--magnitude``
compares each mask with magnitude pruning at the mask's own sparsity, linear by linear (the same number of weights
kept: those of largest ``|w|``), which is where ``init: magnitude`` starts: the IoU then says how far training
moved the mask from it.

Writes ``OUT/overlap.json`` (every row and the settings), ``OUT/overlap.csv`` and ``OUT/overlap.md`` (per linear,
per layer and overall), and one heat map per pair, ``OUT/overlap_<A>_vs_<B>.png`` (layers x linears, IoU); prints
the per-layer table.

Masks are read from task checkpoints of the ``mask`` method (unit-LM or SUPERB), whose tensors are packed bitmasks;
the frozen base model (recorded in the checkpoint, or ``--base``) gives the weights' shapes and, for
``--magnitude``, the weights. Both masks must belong to the same base model (fingerprints are checked).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor, nn

from speechprompt.checkpoint import TaskCheckpoint, checkpoint_kind, load_base, load_checkpoint
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import write_json, write_text
from speechprompt.models.encoders import load_encoder
from speechprompt.models.hf_decoders import load_speech_lm
from speechprompt.plots import PlotError, save_figure
from speechprompt.tuning.base import LinearName
from speechprompt.tuning.mask import top_k_mask, unpack_bitmask
from speechprompt.tuning.mask_bank import MASK_SUFFIX

LINEAR_ORDER = [t.value for t in LinearName]  # q, k, v, out, fc1, fc2: the heat map's columns
_LINEAR_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.)?(\w+)$")


class MaskAnalysisError(SpeechPromptError, ValueError):
    """Masks that cannot be compared (not mask checkpoints, other base models, other linears)."""


# --------------------------------------------------------------------------------------------------------------
# Overlap


def linear_position(path: str) -> tuple[int, str]:
    """``(layer index, linear name)`` of a masked linear's backbone path, e.g. ``encoder.layers.3.self_attn.q_proj``
    -> ``(3, "q_proj")``."""
    m = _LINEAR_PATH.search(path)
    if m is None or m[2] not in LINEAR_ORDER:
        raise MaskAnalysisError(f"{path!r} is not a transformer layer's linear")
    return int(m[1]), m[2]


def overlap_rows(a: Mapping[str, Tensor], b: Mapping[str, Tensor], pair: str) -> list[dict[str, Any]]:
    """Per-linear, per-layer and overall overlap of two sets of 0/1 masks (``{linear path: mask}``, same keys and
    shapes; 1 = kept).

    Returns:
        Rows ``{"pair", "level" (linear | layer | all), "layer", "linear", "weights", "kept_a", "kept_b",
        "intersection", "union", "iou"}``: the linears in layer then ``LINEAR_ORDER`` order, then one row per
        layer, then ``all``. IoU is 1.0 where both masks keep nothing.
    """
    if set(a) != set(b):
        raise MaskAnalysisError(f"{pair}: the masks cover different linears ({sorted(set(a) ^ set(b))[:3]})")
    rows = []
    for path in sorted(a, key=lambda p: (linear_position(p)[0], LINEAR_ORDER.index(linear_position(p)[1]))):
        ma, mb = a[path].bool(), b[path].bool()
        if ma.shape != mb.shape:
            raise MaskAnalysisError(f"{pair}: {path} has shapes {tuple(ma.shape)} and {tuple(mb.shape)}")
        layer, linear = linear_position(path)
        rows.append(_row(pair, "linear", layer, linear, ma.numel(), int(ma.sum()), int(mb.sum()),
                         int((ma & mb).sum()), int((ma | mb).sum())))
    for layer in sorted({r["layer"] for r in rows}):
        rows.append(_pooled(pair, "layer", layer, [r for r in rows if r["level"] == "linear" and r["layer"] == layer]))
    rows.append(_pooled(pair, "all", None, [r for r in rows if r["level"] == "linear"]))
    return rows


def _row(pair: str, level: str, layer: int | None, linear: str | None, weights: int, kept_a: int, kept_b: int,
         intersection: int, union: int) -> dict[str, Any]:
    return {"pair": pair, "level": level, "layer": layer, "linear": linear, "weights": weights, "kept_a": kept_a,
            "kept_b": kept_b, "intersection": intersection, "union": union,
            "iou": intersection / union if union else 1.0}


def _pooled(pair: str, level: str, layer: int | None, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(r[key] for r in rows)

    return _row(pair, level, layer, None, total("weights"), total("kept_a"), total("kept_b"), total("intersection"),
                total("union"))


def magnitude_like(masks: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Magnitude pruning at each mask's own sparsity: per linear, 1 at the ``|w|``-largest as many weights as the
    mask keeps (``weights`` by the same linear paths)."""
    return {path: top_k_mask(weights[path].detach().float().abs(), int(mask.sum())) for path, mask in masks.items()}


# --------------------------------------------------------------------------------------------------------------
# Figure


def overlap_figure(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """The per-linear IoU of one pair as a heat map: a row per layer, a column per linear (q, k, v, out, fc1, fc2
    that are masked), each cell annotated; unmasked cells are blank.

    Args:
        rows: :func:`overlap_rows` of one pair (only its ``linear`` rows are drawn).
        title: the figure title (default: the pair).
    """
    cells = [r for r in rows if r["level"] == "linear"]
    if not cells:
        raise PlotError("no per-linear overlap rows to draw")
    layers = sorted({r["layer"] for r in cells})
    linears = [name for name in LINEAR_ORDER if any(r["linear"] == name for r in cells)]
    grid = np.full((len(layers), len(linears)), np.nan)
    for r in cells:
        grid[layers.index(r["layer"]), linears.index(r["linear"])] = r["iou"]
    fig = Figure(figsize=(1.2 * len(linears) + 2.5, 0.35 * len(layers) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="IoU of the kept weights")
    ax.set_xticks(range(len(linears)), labels=linears)
    ax.set_yticks(range(len(layers)), labels=[str(i) for i in layers])
    ax.set_xlabel("linear")
    ax.set_ylabel("layer")
    for i in range(len(layers)):
        for j in range(len(linears)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > 0.6 else "white")
    ax.set_title(title or str(cells[0]["pair"]))
    return fig


# --------------------------------------------------------------------------------------------------------------
# Tables


def format_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns``; floats with 4 decimals, ``None`` as empty."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out_dir: str | os.PathLike, stem: str,
                 extra: Mapping[str, Any] | None = None) -> list[Path]:
    """``OUT/<stem>.json`` (``{**extra, "rows": rows}``), ``.csv`` and ``.md`` of ``rows``, each written atomically.
    Returns the three paths."""
    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.md"]
    write_json(paths[0], {**dict(extra or {}), "rows": list(rows)})
    write_text(paths[1], buf.getvalue())
    write_text(paths[2], format_markdown(rows, columns))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Reading masks


def _load_base_model(ckpt: TaskCheckpoint, base: str | os.PathLike | None) -> nn.Module:
    """The checkpoint's frozen base model (fingerprint-checked): a unit LM or an encoder."""
    if checkpoint_kind(ckpt.path) == "superb":
        model, _, _ = load_base(ckpt, base, lambda p: (load_encoder(p).model, None), what="upstream",
                                flag="--base")
    else:
        model, _, _ = load_base(ckpt, base, load_speech_lm, what="base unit LM")
    return model


def read_mask_checkpoint(path: str | os.PathLike) -> TaskCheckpoint:
    """A task checkpoint of the ``mask`` method."""
    ckpt = load_checkpoint(path)
    name = (ckpt.meta.get("method") or {}).get("name")
    if name != "mask":
        raise MaskAnalysisError(f"{ckpt.path}: a {name!r} checkpoint; mask-analysis compares S3-Router masks "
                                "(method mask)")
    return ckpt


def unpacked_masks(ckpt: TaskCheckpoint, model: nn.Module) -> dict[str, Tensor]:
    """``{linear path: 0/1 mask}`` of a mask checkpoint, shaped by ``model``'s weights."""
    out = {}
    for key, packed in ckpt.method_state.items():
        if not key.endswith(MASK_SUFFIX):
            raise MaskAnalysisError(f"{ckpt.path}: {key} is not a packed router mask")
        path = key[: -len(MASK_SUFFIX)]
        try:
            weight = model.get_submodule(path).weight
        except AttributeError:
            raise MaskAnalysisError(f"{ckpt.path}: its base model has no linear {path}") from None
        out[path] = unpack_bitmask(packed, weight.shape, f"{ckpt.path}: {key}")
    return out


def _label(path: str | os.PathLike) -> str:
    p = Path(path)
    stem = p.with_suffix("").name if p.suffix in (".safetensors", ".json") else p.name
    return p.parent.name if stem in ("best", "last") and p.parent.name else stem


# --------------------------------------------------------------------------------------------------------------
# CLI

COLUMNS = ["pair", "level", "layer", "linear", "weights", "kept_a", "kept_b", "intersection", "union", "iou"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--masks", nargs="+", required=True, metavar="CHECKPOINT",
                        help="one or two task checkpoints of the mask method")
    parser.add_argument("--magnitude", action="store_true",
                        help="also compare each mask with magnitude pruning at its own per-linear sparsity")
    parser.add_argument("--names", nargs="+", default=None,
                        help="a name per mask (default: the checkpoint's directory for best/last, else its stem)")
    parser.add_argument("--base", default=None, metavar="PATH",
                        help="the frozen base model (default: the one recorded in the checkpoints)")
    parser.add_argument("--out", required=True, help="output directory for the tables and heat maps")


def analyse(paths: Sequence[str | os.PathLike], magnitude: bool, out_dir: str | os.PathLike,
            names: Sequence[str] | None = None, base: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Compare the masks of ``paths`` (see the module docstring); write the tables and heat maps to ``out_dir``.

    Returns:
        Every row (:func:`overlap_rows`) of every pair.
    """
    if not 1 <= len(paths) <= 2:
        raise MaskAnalysisError(f"give one or two --masks, got {len(paths)}")
    if len(paths) == 1 and not magnitude:
        raise MaskAnalysisError("one mask and nothing to compare it with: give a second --masks or --magnitude")
    names = list(names) if names is not None else [_label(p) for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise MaskAnalysisError(f"--names must give {len(paths)} different names, got {names}")
    ckpts = [read_mask_checkpoint(p) for p in paths]
    model = _load_base_model(ckpts[0], base)
    for other in ckpts[1:]:  # the same base model for both: the fingerprint of the one loaded
        other.check_base(ckpts[0].meta["base"]["fingerprint"], base or ckpts[0].meta["base"].get("path"))
    masks = {name: unpacked_masks(ckpt, model) for name, ckpt in zip(names, ckpts)}
    pairs: list[tuple[str, dict[str, Tensor], dict[str, Tensor]]] = []
    if len(names) == 2:
        pairs.append((f"{names[0]} vs {names[1]}", masks[names[0]], masks[names[1]]))
    if magnitude:
        for name in names:
            weights = {path: model.get_submodule(path).weight for path in masks[name]}
            pairs.append((f"{name} vs magnitude", masks[name], magnitude_like(masks[name], weights)))
    rows: list[dict[str, Any]] = []
    out = Path(out_dir)
    for pair, a, b in pairs:
        pair_rows = overlap_rows(a, b, pair)
        rows += pair_rows
        save_figure(overlap_figure(pair_rows), out / f"overlap_{re.sub(r'[^A-Za-z0-9_.-]+', '_', pair)}.png")
    write_tables(rows, COLUMNS, out, "overlap", {"masks": {n: str(c.path) for n, c in zip(names, ckpts)}})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = analyse(args.masks, args.magnitude, args.out, args.names, args.base)
    summary = [r for r in rows if r["level"] != "linear"]
    print(format_markdown(summary, ["pair", "level", "layer", "weights", "kept_a", "kept_b", "iou"]), end="")
    return 0


__all__ = ["MaskAnalysisError", "analyse", "linear_position", "magnitude_like", "overlap_figure", "overlap_rows",
           "write_tables"]
