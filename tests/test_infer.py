"""``speechprompt infer``: audio -> the recorded unit pipeline -> prediction, one JSON line per file; bad files give
an error line and do not stop the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechprompt import config as C
from speechprompt import train as T
from speechprompt.cli import main
from speechprompt.data_prep.features import build_feature_reader
from speechprompt.data_prep.kmeans import load_quantizer, save_quantizer
from speechprompt.data_prep.manifest import read_manifest, write_manifest
from speechprompt.data_prep.speech2unit import prepare

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # whole training runs, end to end

K = 8
SR = 16000


def tone(path, freq, seconds=0.3, seed=0):
    t = np.arange(int(SR * seconds)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), SR)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread, save_tiny_unit_lm):
    """Tones -> log-mel -> a k-means of K frames -> deduplicated units (via prepare) -> a 3-step prompt run."""
    root = tmp_path_factory.mktemp("infer")
    audio = root / "audio"
    audio.mkdir()
    for i in range(6):
        tone(audio / f"{'low' if i % 2 else 'high'}{i}.wav", 300 if i % 2 else 3000, seed=i)
    manifest, _ = write_manifest(sorted(audio.glob("*.wav")), root / "train.tsv")
    (root / "train.labels").write_text("".join(f"{e.relpath.split('.')[0].rstrip('0123456789')}\n"
                                               for e in manifest.entries))
    reader = build_feature_reader("logmel")
    from speechprompt.audio import load_audio

    frames = torch.cat([reader.read(load_audio(audio / f"{n}.wav")) for n in ("high0", "low1")])
    save_quantizer(root / "km.st", frames[torch.linspace(0, len(frames) - 1, K).long()], features=reader.describe())
    prepare(root / "train.tsv", reader, load_quantizer(root / "km.st"), root / "units", deduplicate=True)
    save_tiny_unit_lm(root / "lm.pt", K, max_positions=128)
    cfg = C.load_config(T.TrainConfig, None, [
        f"data.train_units={root}/units/train.units", f"data.train_labels={root}/train.labels",
        f"base={root}/lm.pt", f"run_dir={root}/run", "batch_size=4", "max_steps=3", "method.options.length=2",
    ])
    T.train(cfg)
    return root, manifest


def test_infer_predicts_good_files_and_reports_bad_ones(trained, capsys):
    root, manifest = trained
    (root / "empty.wav").write_bytes(b"")
    (root / "junk.wav").write_bytes(b"RIFF not really audio")
    good = [str(p) for p in manifest.paths()[:2]]
    files = [good[0], str(root / "empty.wav"), str(root / "missing.wav"), good[1], str(root / "junk.wav")]
    code = main(["infer", "--checkpoint", str(root / "run" / "best.safetensors"), *files, "--batch-size", "2",
                 "--device", "cpu"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == files  # one line per file, in input order
    assert set(lines[0]) == {"path", "prediction"} and set(lines[3]) == {"path", "prediction"}
    for bad in (1, 2, 4):
        assert set(lines[bad]) == {"path", "error"} and files[bad] in lines[bad]["error"]

    # The predictions are the ones the task makes on the training units of the same files: same pipeline.
    from speechprompt.tasks.data import collate, load_split
    from speechprompt.tasks.loading import load_task

    task, _, _ = load_task(root / "run" / "best", device="cpu")
    split = load_split(root / "units" / "train.units", root / "train.labels", K)
    expected = task.predict(collate(split.tokens[:2], split.labels[:2], None))["greedy"]
    assert [lines[0]["prediction"], lines[3]["prediction"]] == expected


def test_infer_exits_1_when_every_file_fails(trained, capsys):
    root, _ = trained
    code = main(["infer", "--checkpoint", str(root / "run" / "best"), str(root / "nope.wav"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and "error" in json.loads(captured.out)
    assert "every one of the 1 files failed" in captured.err


def test_infer_refuses_another_quantizer(trained, tmp_path, capsys):
    root, manifest = trained
    other = tmp_path / "km.st"
    save_quantizer(other, torch.randn(K, 80), features=build_feature_reader("logmel").describe())
    code = main(["infer", "--checkpoint", str(root / "run" / "best"), "--kmeans", str(other),
                 str(manifest.path(0))])
    assert code == 2 and "another quantizer" in capsys.readouterr().err


# -- SUPERB checkpoints: waveforms straight into the tuned HuBERT and its head -----------------------------------


@pytest.mark.parametrize("head,split", [("classification", "dev"), ("ctc", "ctc_dev")])
def test_infer_a_superb_checkpoint_predicts_as_the_model_does_from_python(superb_runs, tmp_path, capsys, head, split):
    from speechprompt.audio import load_audio
    from speechprompt.superb import load_superb

    good = [str(p) for p in read_manifest(superb_runs[split]).paths()[:4]]
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really audio")
    files = [good[0], good[1], str(tmp_path / "empty.wav"), good[2], good[3], str(tmp_path / "junk.wav")]
    code = main(["infer", "--checkpoint", str(superb_runs[head]), *files, "--batch-size", "3", "--device", "cpu"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == files  # one line per file, in input order
    for bad in (2, 5):
        assert set(lines[bad]) == {"path", "error"} and files[bad] in lines[bad]["error"]

    # Batches of 3 files, less the bad ones: the model called from Python on the same padded batches.
    model = load_superb(superb_runs[head])
    expected = []
    with torch.no_grad():
        for batch in (good[:2], good[2:]):
            output, frame_mask = model(*model.prepare([load_audio(p) for p in batch]))
            expected += model.head.decode(output, frame_mask)
    assert [lines[i]["prediction"] for i in (0, 1, 3, 4)] == expected
    if head == "classification":
        assert set(expected) <= {"low", "high"}


def test_infer_refuses_another_upstream_and_unit_options_for_superb(superb_runs, capsys):
    wav = str(read_manifest(superb_runs["dev"]).path(0))
    checkpoint = str(superb_runs["classification"])
    code = main(["infer", "--checkpoint", checkpoint, "--upstream", str(superb_runs["other_upstream"]), wav])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "another base model" in err and str(superb_runs["other_upstream"]) in err

    code = main(["infer", "--checkpoint", checkpoint, "--upstream", str(superb_runs["dev"].parent / "gone.pt"), wav])
    assert code == 2 and "gone.pt not found; pass it with --upstream" in capsys.readouterr().err

    code = main(["infer", "--checkpoint", checkpoint, "--kmeans", "km.st", "--decoder", "greedy", wav])
    err = capsys.readouterr().err
    assert code == 2 and "is a SUPERB checkpoint" in err and "--kmeans, --decoder do not apply" in err


@pytest.mark.transformers
def test_a_fine_tuned_encoder_predicts_with_its_own_head(tmp_path, capsys):
    """A Hugging Face ``...ForCTC`` directory transcribes and a ``...ForSequenceClassification`` one classifies, out
    of the box, with what transformers itself gives on the same audio."""
    import soundfile as sf
    import transformers
    from tiny_encoders import CTC_VOCAB, build_hf, save_hf

    from speechprompt.cli import main

    wav = tmp_path / "a.wav"
    audio = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 0.1
    sf.write(wav, audio.numpy(), 16000)
    ctc = save_hf(build_hf("wav2vec2_large", head="ctc", vocab_size=len(CTC_VOCAB), pad_token_id=0), tmp_path / "ctc",
                  vocab=CTC_VOCAB)
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(ctc / "vocab.json"), word_delimiter_token="|")
    hf = transformers.Wav2Vec2ForCTC.from_pretrained(ctc).eval()
    read = torch.from_numpy(sf.read(wav, dtype="float32")[0])[None]
    with torch.no_grad():
        expected = tokenizer.decode(hf(read).logits.argmax(-1)[0])
    assert main(["infer", "--checkpoint", str(ctc), str(wav)]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(wav), "prediction": expected}

    labels = {0: "yes", 1: "no", 2: "up"}
    cls = save_hf(build_hf("hubert_base", head="classification", num_labels=3, id2label=labels,
                           label2id={v: k for k, v in labels.items()}), tmp_path / "cls")
    hf_cls = transformers.HubertForSequenceClassification.from_pretrained(cls).eval()
    with torch.no_grad():
        expected = labels[int(hf_cls(read).logits.argmax(-1)[0])]
    assert main(["infer", "--checkpoint", str(cls), str(wav), str(tmp_path / "missing.wav")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"path": str(wav), "prediction": expected} and "error" in lines[1]

    bare = save_hf(build_hf("hubert_base"), tmp_path / "bare")
    assert main(["infer", "--checkpoint", str(bare), str(wav)]) == 2
    assert "no output head" in capsys.readouterr().err
