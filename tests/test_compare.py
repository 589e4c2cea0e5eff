"""`speechprompt compare`: aggregation over seeds (mean, sample std, best checkpoint chosen on dev) and its table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from speechprompt.compare import CompareConfig, SplitFiles, aggregate, format_table
from speechprompt.config import ConfigError


def _cfg(tmp_path: Path, methods: list[str]) -> CompareConfig:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    for m in methods:
        (conf / f"{m}.yaml").write_text("# placeholder\n")
    return CompareConfig(
        conf_dir=str(conf), methods=methods, seeds=3, out=str(tmp_path / "out"),
        eval={"test": SplitFiles("t.units", "t.labels"), "test_synth": SplitFiles("s.units", "s.labels")},
    )


def _run(method: str, seed: int, dev: float, test: float, synth: float, tmp_path: Path) -> dict:
    return {
        "method": method, "seed": seed, "default_metric": "greedy.accuracy",
        "splits": {"test": {"greedy.accuracy": test}, "test_synth": {"greedy.accuracy": synth}},
        "summary": {"dev": {"greedy.accuracy": dev}, "trainable_params": 100, "checkpoint_bytes": 1234,
                    "checkpoint": str(tmp_path / f"out/{method}/seed{seed}/best.safetensors"),
                    "peak_rss_bytes": 1000 * seed, "mean_step_seconds": 0.1 * seed},
    }


def test_aggregate_statistics_and_dev_selected_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, ["a", "b"])
    runs = [
        _run("a", 1, dev=0.2, test=0.9, synth=0.5, tmp_path=tmp_path),  # best on test, but not on dev
        _run("a", 2, dev=0.6, test=0.5, synth=0.4, tmp_path=tmp_path),
        _run("a", 3, dev=0.4, test=0.7, synth=0.3, tmp_path=tmp_path),
        _run("b", 2, dev=0.1, test=0.1, synth=0.1, tmp_path=tmp_path),
        _run("b", 1, dev=0.3, test=0.3, synth=0.3, tmp_path=tmp_path),
        _run("b", 3, dev=0.2, test=0.2, synth=0.2, tmp_path=tmp_path),
    ]
    rows = aggregate(cfg, runs, base_params=1000)
    a, b = rows
    assert a["method"] == "a" and a["seeds"] == [1, 2, 3]
    assert a["accuracy_mean"] == pytest.approx(0.7)
    assert a["accuracy_std"] == pytest.approx(0.2)  # sample std (ddof = 1) of 0.9, 0.5, 0.7
    assert a["splits"]["test_synth"]["mean"] == pytest.approx(0.4)
    assert a["checkpoint"] == "out/a/seed2/best.safetensors"  # chosen on dev, relative to the working directory
    assert b["checkpoint"] == "out/b/seed1/best.safetensors"
    assert a["trainable_percent"] == pytest.approx(10.0)
    assert a["peak_rss_bytes"] == 3000 and a["mean_step_seconds"] == pytest.approx(0.2)
    table = format_table(rows, ["test", "test_synth"])
    assert "| a | 0.700 ± 0.200 | 0.400 ± 0.100 | 100 | 10 |" in table
    assert table.count("\n") == 4


def test_a_single_seed_has_zero_spread_and_the_table_shows_no_spread(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ["a"])
    cfg.seeds = 1
    rows = aggregate(cfg, [_run("a", 1, 0.5, 0.25, 0.5, tmp_path)], base_params=None)
    assert rows[0]["accuracy_std"] == 0.0 and rows[0]["trainable_percent"] is None
    assert not math.isnan(rows[0]["accuracy_mean"])
    assert "| a | 0.250 (1 seed) | 0.500 (1 seed) |" in format_table(rows, ["test", "test_synth"])  # no "± 0.000"


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config"):
        CompareConfig(conf_dir=str(tmp_path), methods=["missing"])
    cfg = _cfg(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="primary split"):
        CompareConfig(conf_dir=cfg.conf_dir, methods=["a"], eval=cfg.eval, primary="dev")


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_task(tmp_path: Path, save_tiny_unit_lm, capsys) -> None:
    """Two methods x two seeds trained for real on a separable unit task: every file compare promises, and what
    each holds."""
    import csv
    import json
    import random

    from speechprompt.cli import main

    classes = {"yes": [1, 2], "no": [5, 6]}

    def split(name: str, n: int, seed: int) -> tuple[Path, Path]:
        rng = random.Random(seed)
        labels = [rng.choice(list(classes)) for _ in range(n)]
        units = [" ".join(str(rng.choice(classes[y])) for _ in range(5)) for y in labels]
        (tmp_path / f"{name}.units").write_text("\n".join(units) + "\n")
        (tmp_path / f"{name}.labels").write_text("\n".join(labels) + "\n")
        return tmp_path / f"{name}.units", tmp_path / f"{name}.labels"

    lm = save_tiny_unit_lm(tmp_path / "lm.pt", n_units=8)
    (tr_u, tr_l), (dev_u, dev_l), (te_u, te_l) = split("train", 32, 0), split("dev", 12, 1), split("test", 12, 2)
    conf = tmp_path / "conf"
    conf.mkdir()
    common = (f"data: {{train_units: {tr_u}, train_labels: {tr_l}, dev_units: {dev_u}, dev_labels: {dev_l}}}\n"
              f"base: {lm}\nbatch_size: 8\nmax_epochs: 8\npatience: 0\ndevice: cpu\n")
    (conf / "probe.yaml").write_text(common + "method: {name: linear_probe}\noptim: {lr: 0.05}\n")
    (conf / "prompt.yaml").write_text(common + "method: {name: prompt, options: {length: 2}}\n"
                                      "verbalizer: {kind: learnable}\noptim: {lr: 0.05}\n")
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"conf_dir: {conf}\nmethods: [prompt, probe]\nseeds: 2\nout: {tmp_path / 'out'}\njobs: 2\n"
                   f"threads: 1\neval: {{test: {{units: {te_u}, labels: {te_l}}}}}\n")
    assert main(["compare", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "| prompt |" in printed and f"results: {out / 'results.json'}" in printed

    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["prompt", "probe"]
    for row in rows:
        assert row["seeds"] == [1, 2] and row["metric"] == "argmax.accuracy"
        values = row["splits"]["test"]["values"]
        assert len(values) == 2 and row["accuracy_mean"] == pytest.approx(sum(values) / 2)
        assert row["accuracy_mean"] > 0.75  # two separable classes: well above chance (0.5)
        run = Path(row["checkpoint"])
        assert run.is_file() and run.parent.parent.name == row["method"]
        assert row["checkpoint_bytes"] == run.stat().st_size
        # Each run's test report is beside its checkpoint, and its accuracy is one of the aggregated values.
        report = json.loads((run.parent / "test.metrics.json").read_text())
        assert report["argmax.accuracy"] in values
    assert rows[1]["trainable_params"] == 64 * 2 + 2  # the probe: Linear(64, 2)

    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| prompt | ") and table[3].startswith("| probe | ")
    with open(out / "results.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [(r["method"], r["split"]) for r in records] == [("prompt", "test"), ("probe", "test")]
    assert float(records[1]["mean"]) == pytest.approx(rows[1]["accuracy_mean"], abs=1e-6)
    assert (out / "metric_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "compare.yaml").is_file()

    # Started again, nothing is trained again: every run is finished, the results are the same.
    assert main(["compare", "--config", str(cfg)]) == 0
    again = json.loads((out / "results.json").read_text())
    for a, b in zip(again, rows):
        assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}


def _superb_conf(conf: Path, corpus: dict[str, Path]) -> None:
    """Two SUPERB method configs (a frozen-upstream probe and LoRA) on the tone corpus."""
    data = f"data: {{train_manifest: {corpus['train']}, dev_manifest: {corpus['dev']}}}\n"
    common = (data + f"upstream: {corpus['upstream']}\nhead: utterance\nhead_options: {{projector_dim: 8}}\n"
              "batch_size: 4\nmax_steps: 16\neval_every: 8\ndevice: cpu\noptim: {lr: 0.05}\n")
    conf.mkdir()
    (conf / "probe.yaml").write_text(common + "method: {name: linear_probe}\n")
    (conf / "lora.yaml").write_text(common + "method: {name: lora, options: {rank: 2}}\n")


@pytest.mark.slow
def test_compare_superb_methods_end_to_end(tmp_path: Path, make_tone_corpus, capsys) -> None:
    """Two encoder methods x two seeds on the tone corpus through `compare` (trainer: superb): the same files as
    the unit-LM comparison, with audio manifests as evaluation splits."""
    import csv
    import json

    from speechprompt.cli import main

    corpus = make_tone_corpus(tmp_path / "tones", train=8, dev=4, ctc_train=1, ctc_dev=1)
    conf = tmp_path / "conf"
    _superb_conf(conf, corpus)
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"conf_dir: {conf}\ntrainer: superb\nmethods: [probe, lora]\nseeds: 2\nout: {tmp_path / 'out'}\n"
                   f"jobs: 2\nthreads: 1\neval: {{test: {{manifest: {corpus['dev']}}}}}\n")
    assert main(["compare", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "| method | test accuracy (mean ± std) |" in printed and "| lora |" in printed

    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["probe", "lora"]
    for row in rows:
        assert row["seeds"] == [1, 2] and row["metric"] == "accuracy"
        values = row["splits"]["test"]["values"]
        assert row["accuracy_mean"] == pytest.approx(sum(values) / 2) and row["accuracy_mean"] > 0.75
        run = Path(row["checkpoint"])
        assert run.is_file() and run.parent.parent.name == row["method"]
        report = json.loads((run.parent / "test.metrics.json").read_text())
        assert report["accuracy"] in values and (run.parent / "test.confusion.png").is_file()
    upstream = 32 * 8 + 8 + 8 * 2 + 2 + 3  # projector, output layer, 3 layer weights
    assert rows[0]["trainable_params"] == upstream
    assert rows[1]["trainable_params"] == upstream + 2 * 2 * (2 * 32 + 2 * 32)  # LoRA r=2 on q and v, 2 layers
    n_upstream = json.loads(run.with_suffix(".json").read_text())["base"]["parameters"]
    assert rows[0]["trainable_percent"] == pytest.approx(100 * upstream / n_upstream)
    with open(out / "results.csv", newline="") as f:
        assert [(r["method"], r["metric"], r["split"]) for r in csv.DictReader(f)] == [
            ("probe", "accuracy", "test"), ("lora", "accuracy", "test")]
    assert (out / "metric_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.md").read_text().splitlines()) == 4


@pytest.mark.slow
def test_compare_superb_over_folds_reports_the_mean_of_the_folds(tmp_path: Path, make_tone_corpus) -> None:
    """Cross-validation: {fold} in the data and eval paths, runs per fold, mean and std over the folds' means."""
    import json
    import shutil

    from speechprompt.cli import main

    corpus = make_tone_corpus(tmp_path / "tones", train=8, dev=4, ctc_train=1, ctc_dev=1)
    for fold, (train, dev) in {"f1": ("train", "dev"), "f2": ("train", "train")}.items():
        (tmp_path / fold).mkdir()
        for name, src in (("train", train), ("dev", dev)):
            shutil.copy(corpus[src], tmp_path / fold / f"{name}.tsv")
            shutil.copy(corpus[src].with_suffix(".labels"), tmp_path / fold / f"{name}.labels")
    conf = tmp_path / "conf"
    _superb_conf(conf, corpus)
    cfg = tmp_path / "compare.yaml"
    fold_dir = tmp_path / "{fold}"
    cfg.write_text(f"conf_dir: {conf}\ntrainer: superb\nmethods: [probe]\nseeds: 1\nout: {tmp_path / 'out'}\n"
                   f"jobs: 2\nthreads: 1\nfolds: [f1, f2]\neval: {{test: {{manifest: '{fold_dir}/dev.tsv'}}}}\n"
                   f"overrides: ['data.train_manifest={fold_dir}/train.tsv', 'data.dev_manifest={fold_dir}/dev.tsv', "
                   "max_steps=4, eval_every=4]\n")
    assert main(["compare", "--config", str(cfg)]) == 0
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())
    folds = row["splits"]["test"]["folds"]
    assert set(folds) == {"f1", "f2"} and row["folds"] == ["f1", "f2"]
    for fold in ("f1", "f2"):
        report = json.loads((tmp_path / "out" / "probe" / fold / "seed1" / "test.metrics.json").read_text())
        assert folds[fold]["values"] == [report["accuracy"]]
    means = [folds["f1"]["mean"], folds["f2"]["mean"]]
    assert row["accuracy_mean"] == pytest.approx(sum(means) / 2)
    assert row["splits"]["test"]["values"] == means
    with pytest.raises(ConfigError, match="distinct"):
        CompareConfig(conf_dir=str(conf), methods=["probe"], trainer="superb", folds=["a", "a"],
                      eval={"test": SplitFiles(manifest="x.tsv")})


def test_eval_splits_must_fit_the_trainer(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "m.yaml").write_text("# placeholder\n")
    with pytest.raises(ConfigError, match="trainer superb evaluates audio"):
        CompareConfig(conf_dir=str(conf), methods=["m"], trainer="superb", eval={"t": SplitFiles("t.units", "t.l")})
    with pytest.raises(ConfigError, match="trainer train evaluates units"):
        CompareConfig(conf_dir=str(conf), methods=["m"], eval={"t": SplitFiles(manifest="t.tsv")})
    with pytest.raises(ConfigError, match="not both"):
        SplitFiles(units="u", manifest="m")
