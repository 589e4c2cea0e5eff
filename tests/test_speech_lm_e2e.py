"""A new user's path on a TWIST/SLAM-shaped speech LM: a tiny slamkit directory built with transformers, then
``score``, ``train`` (deep prompt + learnable verbalizer; prefix + freq verbalizer), ``evaluate`` and ``infer`` through
the CLI, with the unit-vocabulary error on units from another quantizer."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_decoders import build_hf_decoder, save_slamkit, write_tone

from speechprompt import checkpoint as ck
from speechprompt import config as C
from speechprompt import train as T
from speechprompt.cli import main
from speechprompt.data_prep.features import build_feature_reader
from speechprompt.data_prep.kmeans import load_quantizer, save_quantizer
from speechprompt.data_prep.manifest import write_manifest
from speechprompt.data_prep.speech2unit import prepare

pytestmark = [pytest.mark.transformers, pytest.mark.usefixtures("one_thread")]

K = 8  # units of the k-means; the slamkit LM then has K + 2 tokens (pad 0, bos = eos 1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, one_thread):
    """Tones -> log-mel -> K-means -> units (prepare), labels, and a slamkit Qwen2 directory over K units."""
    root = tmp_path_factory.mktemp("speech_lm")
    audio = root / "audio"
    audio.mkdir()
    for i in range(8):
        write_tone(audio / f"{'low' if i % 2 else 'high'}{i}.wav", 300 if i % 2 else 3000, seed=i)
    manifest, _ = write_manifest(sorted(audio.glob("*.wav")), root / "train.tsv")
    (root / "train.labels").write_text("".join(f"{e.relpath.split('.')[0].rstrip('0123456789')}\n"
                                               for e in manifest.entries))
    reader = build_feature_reader("logmel")
    from speechprompt.audio import load_audio

    frames = torch.cat([reader.read(load_audio(audio / f"{n}.wav")) for n in ("high0", "low1")])
    save_quantizer(root / "km.st", frames[torch.linspace(0, len(frames) - 1, K).long()], features=reader.describe())
    prepare(root / "train.tsv", reader, load_quantizer(root / "km.st"), root / "units", deduplicate=True)
    hf = build_hf_decoder("qwen2_tied_gqa", vocab_size=K + 2, seed=3)
    save_slamkit(hf, root / "slam", num_units=K)
    return root, manifest, hf


def _train(root, name, *overrides):
    cfg = C.load_config(T.TrainConfig, None, [
        f"data.train_units={root}/units/train.units", f"data.train_labels={root}/train.labels",
        f"data.dev_units={root}/units/train.units", f"data.dev_labels={root}/train.labels",
        f"base={root}/slam", f"run_dir={root}/{name}", "batch_size=4", "max_steps=4", "eval_every=2",
        "optim.lr=0.01", *overrides,
    ])
    return T.train(cfg)


def test_score_matches_transformers(corpus, capsys):
    root, _, hf = corpus
    units = root / "units" / "train.units"
    assert main(["score", "--checkpoint", str(root / "slam"), "--units", str(units), "--device", "cpu"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = [int(u) for u in units.read_text().splitlines()[0].split()]
    ids = torch.tensor([[1, *(u + 2 for u in first), 1]])  # bos = eos 1 before and after, unit u = token u + 2
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].double(), -1)
    expected = float(logp.gather(-1, ids[0, 1:, None]).sum())
    assert results[0]["tokens"] == len(first) + 1
    assert results[0]["logprob"] == pytest.approx(expected, abs=1e-4)
    # Units of another quantizer (id K) are refused with one line naming the file and line, exit code 2.
    (root / "bad.units").write_text(f"0 1 {K}\n")
    assert main(["score", "--checkpoint", str(root / "slam"), "--units", str(root / "bad.units")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"bad.units:1: unit {K} does not fit the LM's vocabulary of {K} units" in err and "\n" not in err


def test_deep_prompt_with_learnable_verbalizer_end_to_end(corpus, capsys):
    root, manifest, _ = corpus
    summary = _train(root, "deep", "verbalizer.kind=learnable", "method.options.length=3")
    d, layers = 32, 2
    # Deep prompt (2 * layers + 1) * L * d + separator d, plus Linear(K + 2, classes) over the whole vocabulary.
    assert summary["trainable_params"] == (2 * layers + 1) * 3 * d + d + (K + 2) * 2
    saved = ck.load_checkpoint(root / "deep" / "best.safetensors")
    assert {k.split(".")[0] for k in saved.tensors} == {"method", "head"}  # task-only
    assert saved.meta["base"]["path"].endswith("slam") and saved.meta["base"]["fingerprint"].startswith("sha256:")

    assert main(["evaluate", "--checkpoint", str(root / "deep" / "best"), "--units",
                 str(root / "units" / "train.units"), "--labels", str(root / "train.labels"), "--out",
                 str(root / "eval"), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[0])
    assert metrics["argmax.accuracy"] == pytest.approx(summary["dev"]["argmax.accuracy"])

    files = [str(p) for p in manifest.paths()]
    assert main(["infer", "--checkpoint", str(root / "deep" / "best.safetensors"), *files, "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from speechprompt.tasks.data import collate, load_split
    from speechprompt.tasks.loading import load_task

    task, _, vocab = load_task(root / "deep" / "best", device="cpu")
    assert vocab.layout == "slamkit" and vocab.unit_offset == 2
    split = load_split(root / "units" / "train.units", root / "train.labels", vocab)
    expected = task.predict(collate(split.tokens, split.labels, None, vocab=vocab))["argmax"]
    assert [line["prediction"] for line in lines] == expected


def test_prefix_with_fixed_verbalizer_decodes_unit_tokens(corpus):
    root, _, _ = corpus
    summary = _train(root, "prefix", "method.name=prefix", "verbalizer.kind=freq", "max_steps=6")
    assert set(summary["dev"]) >= {"greedy.accuracy", "constrained.accuracy"}
    meta = ck.load_checkpoint(root / "prefix" / "best").meta
    # The verbalizer file stores unit ids (0..K-1), not this LM's token ids: the same map serves any LM.
    assert all(0 <= u < K for units in meta["verbalizer"]["map"].values() for u in units)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_fsdp_bf16_checkpointed_training_under_torchrun(corpus, run_cli, capsys, method):
    """Two gloo processes shard the bf16 backbone (LoRA's factors inside it stay whole, in fp32); the checkpoint then
    evaluates on one process, on a base loaded in bf16 again (its fingerprint is of the bf16 weights)."""
    root, _, _ = corpus
    # 7 utterances in updates of 2 processes x 2 micro-batches of 1: the last update of an epoch gives one process 1
    # row and the other 2, so one runs an empty micro-batch (at weight zero): the layers' weights are gathered
    # collectively, and a process that skipped a pass would leave the other waiting.
    for kind in ("units", "labels"):
        src = root / ("units/train.units" if kind == "units" else "train.labels")
        (root / f"odd.{kind}").write_text("".join(src.read_text().splitlines(keepends=True)[:7]))
    data = [f"data.train_units={root}/odd.units", f"data.train_labels={root}/odd.labels",
            f"data.dev_units={root}/units/train.units", f"data.dev_labels={root}/train.labels"]
    result = run_cli(["train", *data, f"base={root}/slam", f"run_dir={root}/fsdp_{method}", f"method.name={method}",
                      "batch_size=1", "grad_accum=2", "max_steps=4",
                      "eval_every=2", "verbalizer.kind=learnable", "fsdp=true", "base_dtype=bfloat16",
                      "activation_checkpointing=true", "device=cpu"], torchrun=2)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2
    saved = ck.load_checkpoint(root / f"fsdp_{method}" / "best")
    assert saved.meta["base"]["fingerprint"].startswith("sha256:")
    assert all(v.dtype == torch.float32 for k, v in saved.tensors.items() if k.startswith("method."))  # full fp32
    assert main(["evaluate", "--checkpoint", str(root / f"fsdp_{method}" / "best"), "--units",
                 str(root / "units" / "train.units"), "--labels", str(root / "train.labels"), "--out",
                 str(root / f"eval_fsdp_{method}"), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[0])
    assert metrics["argmax.accuracy"] == pytest.approx(summary["dev"]["argmax.accuracy"])
