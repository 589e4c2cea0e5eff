"""``speechprompt mask-analysis``: overlap of masks with known answers (identical 1, complementary 0, a hand-built
partial overlap), against magnitude pruning, the heat map's content, the written tables and the refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_encoders import our_tiny

from speechprompt.checkpoint import base_fingerprint, base_record, save_checkpoint
from speechprompt.cli import main
from speechprompt.config import to_dict
from speechprompt.fairseq_compat import save_fairseq_checkpoint
from speechprompt.mask_analysis import MaskAnalysisError, linear_position, overlap_figure, overlap_rows
from speechprompt.tuning import MaskConfig
from speechprompt.tuning.base import LinearName
from speechprompt.tuning.mask import pack_bitmask, top_k_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_positions():
    assert linear_position("encoder.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert linear_position("decoder.layers.11.fc2") == (11, "fc2")
    with pytest.raises(MaskAnalysisError, match="not a transformer layer's linear"):
        linear_position("encoder.pos_conv.0")


def test_known_answers():
    a = {"encoder.layers.0.fc1": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]),  # 4 kept
         "encoder.layers.0.self_attn.q_proj": torch.tensor([[1, 0], [0, 1]]),
         "encoder.layers.1.fc1": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])}
    same = overlap_rows(a, a, "same")
    assert all(r["iou"] == 1.0 for r in same)
    complement = overlap_rows(a, {k: 1 - v for k, v in a.items()}, "complement")
    assert all(r["iou"] == 0.0 for r in complement)
    b = {"encoder.layers.0.fc1": torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]),  # 5 kept, 3 shared, union 6
         "encoder.layers.0.self_attn.q_proj": torch.tensor([[1, 0], [0, 1]]),  # identical: 2 / 2
         "encoder.layers.1.fc1": torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]])}  # 2 shared, union 6
    rows = overlap_rows(a, b, "a vs b")
    by = {(r["level"], r["layer"], r["linear"]): r for r in rows}
    assert [(r["layer"], r["linear"]) for r in rows if r["level"] == "linear"] == [
        (0, "q_proj"), (0, "fc1"), (1, "fc1")]  # layer, then q, k, v, out, fc1, fc2
    fc1 = by[("linear", 0, "fc1")]
    assert (fc1["kept_a"], fc1["kept_b"], fc1["intersection"], fc1["union"]) == (4, 5, 3, 6)
    assert fc1["iou"] == pytest.approx(0.5)
    assert by[("linear", 1, "fc1")]["iou"] == pytest.approx(2 / 6)
    assert by[("layer", 0, None)]["iou"] == pytest.approx((3 + 2) / (6 + 2))  # pooled, not averaged
    assert by[("all", None, None)]["iou"] == pytest.approx((3 + 2 + 2) / (6 + 2 + 6))
    assert by[("all", None, None)]["weights"] == 8 + 4 + 8
    empty = {"encoder.layers.0.fc1": torch.zeros(2, 2)}
    assert overlap_rows(empty, empty, "nothing kept")[0]["iou"] == 1.0


def test_the_heat_map_shows_each_linears_iou():
    a = {f"encoder.layers.{i}.{n}": torch.tensor([[1, 1], [0, 0]]) for i in range(3) for n in ("fc1", "fc2")}
    b = dict(a)
    b["encoder.layers.2.fc2"] = torch.tensor([[1, 0], [1, 0]])  # 1 shared of 3: IoU 1/3
    fig = overlap_figure(overlap_rows(a, b, "x vs y"))
    ax = fig.axes[0]
    grid = np.asarray(ax.images[0].get_array())
    assert grid.shape == (3, 2)
    np.testing.assert_allclose(grid, [[1, 1], [1, 1], [1, 1 / 3]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc1", "fc2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert ax.get_title() == "x vs y" and ax.get_xlabel() == "linear" and ax.get_ylabel() == "layer"
    assert "0.33" in [t.get_text() for t in ax.texts]


# --------------------------------------------------------------------------------------------------------------
# The command, on task checkpoints over a saved encoder


def _save_encoder(path: Path) -> tuple[Path, torch.nn.Module]:
    model = our_tiny("hubert")
    save_fairseq_checkpoint(path, model.state_dict(), {"model": {"_name": "hubert", **to_dict(model.cfg)},
                                                        "task": {"normalize": False}})
    return path, model


def _save_masks(path: Path, base: Path, model: torch.nn.Module, masks: dict[str, torch.Tensor],
                config: MaskConfig) -> Path:
    meta = {"task": {"type": "superb", "labels": ["a", "b"]}, "head": "superb_classification",
            "method": {"name": "mask", "config": to_dict(config)}, "base": base_record(base, base_fingerprint(model))}
    return save_checkpoint(path, {f"{p}.router.mask": pack_bitmask(m) for p, m in masks.items()}, None, meta)


def test_the_command_on_two_tasks_and_against_magnitude_pruning(tmp_path, capsys):
    base, model = _save_encoder(tmp_path / "hubert.pt")
    config = MaskConfig(targets=[LinearName.FC1, LinearName.FC2])
    paths = [f"encoder.layers.{i}.{n}" for i in range(2) for n in ("fc1", "fc2")]
    weights = {p: model.get_submodule(p).weight.detach() for p in paths}
    g = torch.Generator().manual_seed(0)
    task_a = {p: (torch.rand(w.shape, generator=g) < 0.7).float() for p, w in weights.items()}
    task_b = {p: 1 - m for p, m in task_a.items()}  # complementary
    # A task whose mask is exactly magnitude pruning at 60% kept, except layer 1's fc2, shifted by one weight.
    magnitude = {p: top_k_mask(w.abs(), round(0.6 * w.numel())) for p, w in weights.items()}
    fc2 = "encoder.layers.1.fc2"
    magnitude[fc2] = magnitude[fc2].flatten().roll(1).view(weights[fc2].shape)
    a = _save_masks(tmp_path / "ks" / "best", base, model, task_a, config)
    b = _save_masks(tmp_path / "er" / "best", base, model, task_b, config)
    c = _save_masks(tmp_path / "mag" / "best", base, model, magnitude, config)

    out = tmp_path / "overlap"
    assert main(["mask-analysis", "--masks", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ks vs er | all |" in printed and "| 0.0000 |" in printed
    rows = json.loads((out / "overlap.json").read_text())["rows"]
    assert {r["iou"] for r in rows} == {0.0}
    assert (out / "overlap_ks_vs_er.png").stat().st_size > 0
    with open(out / "overlap.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 4 + 2 + 1
    assert (out / "overlap.md").read_text().startswith("| pair | level |")

    out2 = tmp_path / "overlap_mag"
    assert main(["mask-analysis", "--masks", str(c), "--magnitude", "--names", "mag", "--out", str(out2)]) == 0
    rows = {(r["layer"], r["linear"]): r for r in json.loads((out2 / "overlap.json").read_text())["rows"]
            if r["level"] == "linear"}
    assert all(rows[(i, n)]["iou"] == 1.0 for i in range(2) for n in ("fc1", "fc2") if (i, n) != (1, "fc2"))
    assert rows[(1, "fc2")]["iou"] < 1.0 and rows[(1, "fc2")]["kept_a"] == rows[(1, "fc2")]["kept_b"]
    assert (out2 / "overlap_mag_vs_magnitude.png").is_file()


def test_refusals(tmp_path, capsys):
    base, model = _save_encoder(tmp_path / "hubert.pt")
    config = MaskConfig(targets=[LinearName.FC1])
    masks = {f"encoder.layers.{i}.fc1": torch.ones(64, 32) for i in range(2)}
    a = _save_masks(tmp_path / "a", base, model, masks, config)
    assert main(["mask-analysis", "--masks", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to compare it with" in capsys.readouterr().err
    lora = save_checkpoint(tmp_path / "lora", {}, None, {"method": {"name": "lora", "config": {}},
                                                           "base": base_record(base, base_fingerprint(model))})
    assert main(["mask-analysis", "--masks", str(a), str(lora), "--out", str(tmp_path / "o")]) == 2
    assert "a 'lora' checkpoint" in capsys.readouterr().err
    other = _save_masks(tmp_path / "other", tmp_path / "hubert.pt", our_tiny("hubert", seed=3), masks, config)
    assert main(["mask-analysis", "--masks", str(a), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "trained on another base model" in capsys.readouterr().err
