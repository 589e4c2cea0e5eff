import csv
import os

import numpy as np
import pytest
from matplotlib.image import imread

from speechprompt.plots import PlotError, plot_confusion_matrix, plot_learning_curves, plot_metric_vs_params

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = imread(path).shape
    assert height > 50 and width > 50 and channels in (3, 4)
    # Written atomically: no temporary file is left beside it.
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_learning_curves_from_csv_with_sparse_dev_metric(tmp_path):
    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss", "lr", "dev_loss", "dev_accuracy"])
        for step in range(1, 21):
            dev = step % 5 == 0
            writer.writerow([step, 3.0 / step, 1e-3, 2.0 / step if dev else "", step / 20 if dev else ""])
    out = plot_learning_curves(log, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert_png(out)


def test_learning_curves_from_a_run_log(tmp_path):
    from speechprompt.runlog import RunLogger

    with RunLogger(tmp_path / "run", tensorboard=False) as log:
        for step in range(1, 11):
            log.log(step, train_loss=3.0 / step, lr=1e-3)
            if step % 5 == 0:
                log.log(step, dev_loss=2.0 / step, dev_accuracy=step / 10)
    assert_png(plot_learning_curves(tmp_path / "run" / "log.csv", tmp_path / "curves.png"))


def test_learning_curves_from_rows_and_explicit_keys(tmp_path):
    rows = [{"step": s, "train_loss": 1 / s, "dev_wer": 0.5} for s in range(1, 5)]
    assert_png(plot_learning_curves(rows, tmp_path / "a.png", metric_keys=["dev_wer"], title="run"))


def test_learning_curves_errors(tmp_path):
    with pytest.raises(PlotError, match="no rows"):
        plot_learning_curves([], tmp_path / "x.png")
    with pytest.raises(PlotError, match="'step' is missing"):
        plot_learning_curves([{"epoch": 1, "train_loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(PlotError, match="nothing to plot"):
        plot_learning_curves([{"step": 1, "lr": 1.0}], tmp_path / "x.png")
    with pytest.raises(PlotError, match="cannot read"):
        plot_learning_curves(tmp_path / "missing.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png(tmp_path, normalize):
    matrix = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # a class with no reference row stays 0
    assert_png(plot_confusion_matrix(matrix, ["yes", "no", "up"], tmp_path / "cm.png", normalize=normalize))


def test_confusion_matrix_shape_mismatch(tmp_path):
    with pytest.raises(PlotError, match="3x3"):
        plot_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "cm.png")


def test_metric_vs_params(tmp_path):
    rows = [
        {"method": "prompt", "trainable_params": 128_000, "accuracy_mean": 0.91, "accuracy_std": 0.02},
        {"method": "lora", "trainable_params": 290_000, "accuracy_mean": 0.95, "accuracy_std": 0.01},
        {"method": "bitfit", "trainable_params": 100_000, "accuracy": 0.8},
    ]
    out = tmp_path / "sub" / "params.png"  # the folder is created
    assert_png(plot_metric_vs_params(rows, out))
    with pytest.raises(PlotError, match="positive"):
        plot_metric_vs_params([{"method": "x", "trainable_params": 0, "accuracy_mean": 1.0}], out)
    with pytest.raises(PlotError, match="lacks"):
        plot_metric_vs_params([{"method": "x", "accuracy_mean": 1.0}], out)


def test_plots_leave_the_global_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    plot_metric_vs_params([{"method": "a", "trainable_params": 10, "accuracy_mean": 0.5}], tmp_path / "p.png")
    assert matplotlib.get_backend() == before
    assert os.path.getsize(tmp_path / "p.png") > 0
