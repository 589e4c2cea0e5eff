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


# -- what the figures show -------------------------------------------------------------------------------------


def _lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_learning_curves_show_losses_left_and_dev_metrics_right_on_their_steps(tmp_path):
    from speechprompt.plots import learning_curves_figure
    from speechprompt.runlog import RunLogger

    with RunLogger(tmp_path / "run", tensorboard=False) as log:
        for step in range(1, 11):
            log.log(step, train_loss=3.0 / step, lr=1e-3)
            if step % 5 == 0:
                log.log(step, dev_loss=2.0 / step, dev_accuracy=step / 10)
    fig = learning_curves_figure(tmp_path / "run" / "log.csv", title="prompt")
    left, right = fig.axes
    assert (left.get_xlabel(), left.get_ylabel(), right.get_xlabel(), right.get_ylabel()) == (
        "step", "loss", "step", "dev metric")
    losses = _lines(left)
    assert set(losses) == {"train_loss", "dev_loss"}  # lr is neither a loss nor a dev metric: not drawn
    assert losses["train_loss"] == (list(range(1, 11)), [3.0 / s for s in range(1, 11)])
    assert losses["dev_loss"] == ([5, 10], [0.4, 0.2])  # the sparse dev points, at their own steps
    assert _lines(right) == {"dev_accuracy": ([5, 10], [0.5, 1.0])}
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["train_loss", "dev_loss"]
    assert fig._suptitle.get_text() == "prompt"


def test_confusion_figure_shows_row_normalised_recall_with_class_names():
    from speechprompt.plots import confusion_figure

    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 6]])
    ax = confusion_figure(matrix, ["yes", "no", "up"], title="dev").axes[0]
    shown = ax.get_images()[0].get_array()
    np.testing.assert_allclose(shown, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0, 0.75]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["yes", "no", "up"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["yes", "no", "up"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "reference", "dev")
    assert {t.get_text() for t in ax.texts} == {"0.75", "0.25", "0.00"}
    raw = confusion_figure(matrix, ["yes", "no", "up"], normalize=False).axes[0]
    assert {t.get_text() for t in raw.texts} == {"3", "1", "0", "2", "6"}


def test_metric_vs_params_places_each_method_at_its_size_and_score():
    from speechprompt.plots import metric_vs_params_figure

    rows = [
        {"method": "prompt", "trainable_params": 128_000, "accuracy_mean": 0.91, "accuracy_std": 0.02},
        {"method": "lora", "trainable_params": 290_000, "accuracy_mean": 0.95, "accuracy_std": 0.01},
    ]
    ax = metric_vs_params_figure(rows, title="KS").axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "trainable parameters" and ax.get_ylabel() == "accuracy"
    def xy(marker: str) -> list[tuple[float, float]]:
        return sorted((float(x), float(y)) for line in ax.get_lines() if line.get_marker() == marker
                      for x, y in zip(line.get_xdata(), line.get_ydata()))

    assert xy("o") == [(128_000, 0.91), (290_000, 0.95)]  # the means
    caps = xy("_")  # the error bars' caps, at mean +- std
    assert [x for x, _ in caps] == [128_000, 128_000, 290_000, 290_000]
    assert [y for _, y in caps] == pytest.approx([0.89, 0.93, 0.94, 0.96])
    assert {(t.get_text(), t.xy) for t in ax.texts} == {("prompt", (128_000, 0.91)), ("lora", (290_000, 0.95))}
    assert ax.get_title() == "KS"
