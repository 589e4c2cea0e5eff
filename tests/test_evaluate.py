"""``speechprompt evaluate``: per-split metrics JSON, predictions, confusion PNG; refusing a different base model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf

from speechprompt import config as C
from speechprompt import train as T
from speechprompt.cli import main

K = 10

pytestmark = pytest.mark.usefixtures("one_thread")


def write_split(path, n, seed, empty_row=None):
    rng = random.Random(seed)
    units, labels = [], []
    for i in range(n):
        label = rng.choice(["a", "b", "c"])
        units.append("" if i == empty_row else " ".join(str(rng.randrange(K)) for _ in range(rng.randint(2, 8))))
        labels.append(label)
    path.with_suffix(".units").write_text("\n".join(units) + "\n")
    path.with_suffix(".labels").write_text("\n".join(labels) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread, save_tiny_unit_lm):
    root = tmp_path_factory.mktemp("eval")
    save_tiny_unit_lm(root / "lm.pt", K)
    write_split(root / "train", 24, 0)
    write_split(root / "dev", 12, 1)
    write_split(root / "test", 9, 2, empty_row=4)  # a row that `prepare` could not convert
    cfg = C.load_config(T.TrainConfig, None, [
        f"data.train_units={root}/train.units", f"data.train_labels={root}/train.labels",
        f"data.dev_units={root}/dev.units", f"data.dev_labels={root}/dev.labels", f"base={root}/lm.pt",
        f"run_dir={root}/run", "batch_size=8", "max_steps=4", "eval_every=2",
    ])
    summary = T.train(cfg)
    return root, summary


def test_evaluate_writes_metrics_predictions_and_confusion_per_split(run, capsys):
    root, summary = run
    out = root / "eval"
    code = main(["evaluate", "--checkpoint", str(root / "run" / "best.safetensors"),
                 "--units", str(root / "dev.units"), str(root / "test.units"),
                 "--labels", str(root / "dev.labels"), str(root / "test.labels"), "--out", str(out),
                 "--batch-size", "5", "--device", "cpu"])
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["split"] for p in printed] == ["dev", "test"]
    dev = json.loads((out / "dev.metrics.json").read_text())
    # The best checkpoint, reloaded, scores dev exactly as training measured it.
    for key, value in summary["dev"].items():
        assert dev[key] == pytest.approx(value, rel=1e-6), key
    assert dev["confusion"]["labels"] == ["a", "b", "c", "<unk>"]
    assert sum(map(sum, dev["confusion"]["matrix"])) == 12
    test = json.loads((out / "test.metrics.json").read_text())
    assert test["n"] == 8  # the empty row is skipped...
    rows = [json.loads(line) for line in (out / "test.predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2, 3, 5, 6, 7, 8]  # ...and the others keep their line numbers
    assert set(rows[0]) == {"row", "label", "greedy", "constrained"}
    assert (out / "dev.confusion.png").stat().st_size > 0 and (out / "test.confusion.png").is_file()


def test_evaluate_refuses_another_base_model(run, tmp_path, capsys, save_tiny_unit_lm):
    root, _ = run
    other = tmp_path / "other"
    save_tiny_unit_lm(other / "lm.pt", K, seed=1)
    code = main(["evaluate", "--checkpoint", str(root / "run" / "best"), "--units", str(root / "dev.units"),
                 "--labels", str(root / "dev.labels"), "--base", str(other / "lm.pt")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another base model" in err and str(other / "lm.pt") in err


def test_mismatched_units_and_labels_are_a_clear_error(run, capsys):
    root, _ = run
    code = main(["evaluate", "--checkpoint", str(root / "run" / "best"), "--units", str(root / "dev.units"),
                 "--labels", str(root / "test.labels"), "--out", str(root / "x")])
    assert code == 2 and "line-aligned" in capsys.readouterr().err


# -- SUPERB checkpoints: audio manifests in, the same report files out --------------------------------------------


@pytest.mark.parametrize("head,split", [("classification", "dev"), ("ctc", "ctc_dev")])
def test_evaluate_a_superb_checkpoint_writes_what_evaluate_superb_measures(superb_runs, tmp_path, capsys, head, split):
    from speechprompt.superb import evaluate_superb, load_audio_split, load_superb

    manifest = superb_runs[split]
    code = main(["evaluate", "--checkpoint", str(superb_runs[head]), "--manifest", str(manifest),
                 "--labels", str(manifest.with_suffix(".labels")), "--out", str(tmp_path), "--names", "test",
                 "--batch-size", "4", "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    audio = load_audio_split(manifest)
    expected, hyps = evaluate_superb(load_superb(superb_runs[head]), audio, batch_size=4)
    report = json.loads((tmp_path / "test.metrics.json").read_text())
    assert {k: report[k] for k in expected} == expected  # exactly SUPERB's own evaluation
    assert report["n"] == printed["n"] == len(audio) and report["checkpoint"] == str(superb_runs[head])
    assert {k: printed[k] for k in expected} == expected
    decoder = {"classification": "argmax", "ctc": "greedy"}[head]
    rows = [json.loads(line) for line in (tmp_path / "test.predictions.jsonl").read_text().splitlines()]
    assert rows == [{"row": i, "label": label, decoder: hyp} for i, (label, hyp) in enumerate(zip(audio.labels, hyps))]
    if head == "classification":
        assert set(expected) == {"accuracy", "loss", "n", "unreadable"} and expected["unreadable"] == 0
        assert report["confusion"]["labels"] == ["high", "low", "<unk>"]
        matrix = np.array(report["confusion"]["matrix"])
        assert matrix.sum() == len(audio) and np.trace(matrix) / len(audio) == pytest.approx(expected["accuracy"])
        assert (tmp_path / "test.confusion.png").stat().st_size > 0
    else:
        assert set(expected) == {"wer", "cer", "loss", "n", "unreadable"} and "confusion" not in report
        assert not (tmp_path / "test.confusion.png").exists()


def test_evaluate_superb_skips_and_reports_unreadable_audio(superb_runs, tmp_path, caplog):
    """A corrupt and a silent file among the test audio: both are reported and scored as nothing, the rest is
    evaluated exactly as without them."""
    from speechprompt.data_prep.manifest import read_manifest

    dev = read_manifest(superb_runs["dev"])
    labels = superb_runs["dev"].with_suffix(".labels").read_text().splitlines()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(bad / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    lines = [str(bad / "corrupt.wav"), *map(str, dev.paths()), str(bad / "silent.wav")]
    (tmp_path / "t.tsv").write_text("/\n" + "".join(f"{p.lstrip('/')}\t16000\n" for p in lines))
    (tmp_path / "t.labels").write_text("\n".join([labels[0], *labels, labels[-1]]) + "\n")
    code = main(["evaluate", "--checkpoint", str(superb_runs["classification"]), "--manifest", str(tmp_path / "t.tsv"),
                 "--labels", str(tmp_path / "t.labels"), "--out", str(tmp_path / "out"), "--names", "t",
                 "--batch-size", "4", "--device", "cpu"])
    assert code == 0
    assert sum("corrupt.wav" in r.message or "silent.wav" in r.message for r in caplog.records) == 2  # once each
    report = json.loads((tmp_path / "out" / "t.metrics.json").read_text())
    assert report["n"] == len(labels) and report["unreadable"] == 2
    assert set(report["unreadable_files"]) == {str(bad / "corrupt.wav"), str(bad / "silent.wav")}
    rows = [json.loads(line) for line in (tmp_path / "out" / "t.predictions.jsonl").read_text().splitlines()]
    assert rows[0]["argmax"] is None and rows[-1]["argmax"] is None and None not in [r["argmax"] for r in rows[1:-1]]

    main(["evaluate", "--checkpoint", str(superb_runs["classification"]), "--manifest", str(superb_runs["dev"]),
          "--labels", str(superb_runs["dev"].with_suffix(".labels")), "--out", str(tmp_path / "clean"), "--names", "t",
          "--batch-size", "4", "--device", "cpu"])
    clean = json.loads((tmp_path / "clean" / "t.metrics.json").read_text())
    assert report["accuracy"] == clean["accuracy"] and np.sum(report["confusion"]["matrix"]) == len(labels)


def test_evaluate_refuses_the_wrong_input_kind_and_another_upstream(superb_runs, run, tmp_path, capsys):
    dev = superb_runs["dev"]
    labels = str(dev.with_suffix(".labels"))
    code = main(["evaluate", "--checkpoint", str(superb_runs["classification"]), "--units", labels,
                 "--labels", labels, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a SUPERB checkpoint: it reads audio" in err and "--manifest" in err

    root, _ = run
    code = main(["evaluate", "--checkpoint", str(root / "run" / "best"), "--manifest", str(dev),
                 "--labels", str(dev.with_suffix(".labels")), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a unit-LM checkpoint: it reads units" in err and "--units" in err

    code = main(["evaluate", "--checkpoint", str(superb_runs["classification"]), "--manifest", str(dev),
                 "--labels", str(dev.with_suffix(".labels")), "--upstream", str(superb_runs["other_upstream"]),
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "another base model" in err and str(superb_runs["other_upstream"]) in err
    assert not list(tmp_path.iterdir())  # nothing is written when the checkpoint is refused
