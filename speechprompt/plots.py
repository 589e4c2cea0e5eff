"""PNG figures of a run: learning curves, confusion matrices, and a metric against trainable parameters.

Figures are drawn on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, never through
``pyplot``: no display is needed, no global backend is switched under a user's notebook, and no figure is left
open. Each PNG is rendered to memory and then written atomically, so a reader never sees half an image.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open
from speechprompt.runlog import read_log


class PlotError(SpeechPromptError, ValueError):
    """Data a figure cannot be drawn from."""


def _save(fig: Figure, out_png: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    with atomic_open(out_png, "wb") as f:
        f.write(buf.getvalue())
    return Path(out_png)


def save_figure(fig: Figure, out_png: str | os.PathLike) -> Path:
    """Write a figure built elsewhere (a function returning a :class:`Figure`) as a PNG, atomically."""
    return _save(fig, out_png)


def _number(value: Any) -> float | None:
    """A float, or None for an empty/missing cell (dev metrics are logged less often than the loss)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _read_rows(csv_or_rows: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows as mappings. A run's ``log.csv`` (long form ``step,metric,value,time``, see
    :mod:`speechprompt.runlog`) is pivoted to one row per step with one column per metric."""
    if not isinstance(csv_or_rows, (str, os.PathLike)):
        return list(csv_or_rows)
    try:
        with open(csv_or_rows, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            long_form = {"step", "metric", "value"} <= set(reader.fieldnames or ())
    except OSError as e:
        raise PlotError(f"{csv_or_rows}: cannot read ({e.strerror})") from None
    if not long_form:
        return rows
    wide: dict[int, dict[str, Any]] = {}
    for metric, points in read_log(csv_or_rows).items():
        for step, value in points:
            wide.setdefault(step, {"step": step})[metric] = value
    return [wide[step] for step in sorted(wide)]


def plot_learning_curves(
    csv_or_rows: str | os.PathLike | Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    x: str = "step",
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """:func:`learning_curves_figure` written to ``out_png`` (returned as a path)."""
    return _save(learning_curves_figure(csv_or_rows, x, loss_keys, metric_keys, title), out_png)


def learning_curves_figure(
    csv_or_rows: str | os.PathLike | Iterable[Mapping[str, Any]],
    x: str = "step",
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Losses (left panel) and dev metrics (right panel) against the training step.

    Args:
        csv_or_rows: A run's ``log.csv`` (long form, as :class:`speechprompt.runlog.RunLogger` writes it), a
            wide CSV with one column per metric, or rows as mappings. Empty cells are skipped, so a dev metric
            logged every N steps and a loss logged every step can share one table.
        x: The column of the x axis.
        loss_keys: Columns of the left panel; default: every column whose name contains ``loss``.
        metric_keys: Columns of the right panel; default: every other column starting with ``dev``.
        title: Figure title.
    """
    rows = _read_rows(csv_or_rows)
    if not rows:
        raise PlotError("no rows to plot learning curves from")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if x not in columns:
        raise PlotError(f"column {x!r} is missing; columns: {', '.join(columns)}")
    if loss_keys is None:
        loss_keys = [c for c in columns if "loss" in c.lower()]
    if metric_keys is None:
        metric_keys = [c for c in columns if c.lower().startswith("dev") and c not in loss_keys]
    missing = [k for k in (*loss_keys, *metric_keys) if k not in columns]
    if missing:
        raise PlotError(f"column {missing[0]!r} is missing; columns: {', '.join(columns)}")
    if not loss_keys and not metric_keys:
        raise PlotError(f"nothing to plot: no loss or dev columns among {', '.join(columns)}")

    panels = [(keys, ylabel) for keys, ylabel in ((loss_keys, "loss"), (metric_keys, "dev metric")) if keys]
    fig = Figure(figsize=(5.5 * len(panels), 4))
    for i, (keys, ylabel) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for key in keys:
            points = [(_number(row.get(x)), _number(row.get(key))) for row in rows]
            points = [(a, b) for a, b in points if a is not None and b is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str],
    out_png: str | os.PathLike,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """:func:`confusion_figure` written to ``out_png`` (returned as a path)."""
    return _save(confusion_figure(matrix, labels, normalize, title), out_png)


def confusion_figure(
    matrix: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
) -> Figure:
    """A confusion matrix as a heat map (rows: reference, columns: prediction).

    Args:
        matrix: ``(C, C)`` counts, as :func:`speechprompt.tasks.metrics.confusion_matrix` returns.
        labels: The ``C`` class names.
        normalize: Divide each row by its total, so cells are recall fractions (a row with no reference stays 0).
        title: Figure title.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise PlotError(f"expected a {len(labels)}x{len(labels)} matrix for {len(labels)} labels, got {m.shape}")
    if normalize:
        totals = m.sum(axis=1, keepdims=True)
        m = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    n = len(labels)
    side = min(3 + 0.45 * n, 20)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else max(m.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=labels, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    if n <= 30:  # beyond that the numbers are unreadable
        threshold = (1 if normalize else m.max()) / 2
        for i in range(n):
            for j in range(n):
                text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > threshold else "black")
    ax.set_title(title or ("confusion matrix (row-normalized)" if normalize else "confusion matrix"))
    return fig


def plot_metric_vs_params(
    rows: Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    metric: str = "accuracy",
    params_key: str = "trainable_params",
    label_key: str = "method",
    title: str | None = None,
) -> Path:
    """:func:`metric_vs_params_figure` written to ``out_png`` (returned as a path)."""
    return _save(metric_vs_params_figure(rows, metric, params_key, label_key, title), out_png)


def metric_vs_params_figure(
    rows: Iterable[Mapping[str, Any]],
    metric: str = "accuracy",
    params_key: str = "trainable_params",
    label_key: str = "method",
    title: str | None = None,
) -> Figure:
    """Each method's metric (mean with a std error bar over seeds) against its trainable parameters, log x.

    Args:
        rows: Result rows as the demo's ``results.json`` holds them: ``{"method", "trainable_params",
            "<metric>_mean", "<metric>_std", ...}``; a plain ``"<metric>"`` is read as the mean with no error bar.
        metric: The metric's name.
        params_key: The key of the parameter count.
        label_key: The key that names each point.
        title: Figure title.
    """
    rows = list(rows)
    if not rows:
        raise PlotError("no result rows to plot")
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for row in rows:
        params = _number(row.get(params_key))
        mean = _number(row.get(f"{metric}_mean", row.get(metric)))
        if params is None or mean is None:
            raise PlotError(f"row {dict(row)} lacks {params_key!r} or {metric + '_mean'!r}")
        if params <= 0:
            raise PlotError(f"row {row.get(label_key)!r}: {params_key} must be positive for a log axis")
        std = _number(row.get(f"{metric}_std")) or 0.0
        ax.errorbar([params], [mean], yerr=[std], fmt="o", capsize=4)
        ax.annotate(str(row.get(label_key, "")), (params, mean), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # keep points and their names off the frame
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    return fig
