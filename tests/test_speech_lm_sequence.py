"""Sequence (ASR-style) tasks on today's speech LMs, end to end: tones -> units -> a tiny slamkit Qwen2 (bos = eos) or
a plain HF OPT directory (its own bos, eos and pad, units after them), a deep prompt trained with ``train`` to emit a
transcript's sentencepiece pieces as unit tokens, then ``evaluate`` and ``infer`` decoding on the KV cache."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_decoders import build_hf_decoder, save_slamkit, write_tone

from speechprompt import checkpoint as ck
from speechprompt import config as C
from speechprompt import train as T
from speechprompt.audio import load_audio
from speechprompt.cli import main
from speechprompt.data_prep.features import build_feature_reader
from speechprompt.data_prep.kmeans import load_quantizer, save_quantizer
from speechprompt.data_prep.manifest import write_manifest
from speechprompt.data_prep.speech2unit import prepare
from speechprompt.models.generation import greedy
from speechprompt.tasks.data import collate, load_split
from speechprompt.tasks.generation import SequenceTask
from speechprompt.tasks.loading import load_task

pytestmark = [pytest.mark.slow, pytest.mark.transformers, pytest.mark.usefixtures("one_thread")]  # whole runs

K = 16  # k-means units; the transcripts' characters + <unk> need 12 pieces, each one unit
TRANSCRIPTS = {300: "stop now", 3000: "go left"}  # tone frequency -> what is "said"
# A plain HF directory: OPT's own specials (pad 1, bos 0, eos 2), then the units from token 4 on (GSLM-like offsets,
# but bos != eos and a vocabulary that is not the slamkit layout).
# Weights of std 0.3 rather than the families' 0.02: a random LM of width 32 then has logits far from uniform, as a
# trained one has, and a prompt can steer them within a few dozen steps.
INIT = 0.3
OPT_VOCAB = {"unit_offset": 4, "num_units": K, "bos": 0, "eos": 2, "pad": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, one_thread):
    """Tones -> log-mel -> K-means -> units (prepare), transcripts, and the two speech-LM directories."""
    root = tmp_path_factory.mktemp("speech_lm_seq")
    audio = root / "audio"
    audio.mkdir()
    freqs = [300, 3000] * 4
    for i, freq in enumerate(freqs):
        write_tone(audio / f"u{i}.wav", freq, seed=i)
    manifest, _ = write_manifest(sorted(audio.glob("*.wav")), root / "train.tsv")
    by_name = {f"u{i}.wav": TRANSCRIPTS[f] for i, f in enumerate(freqs)}
    (root / "train.labels").write_text("".join(by_name[e.relpath] + "\n" for e in manifest.entries))
    reader = build_feature_reader("logmel")
    frames = torch.cat([reader.read(load_audio(audio / f"u{i}.wav")) for i in (0, 1)])
    save_quantizer(root / "km.st", frames[torch.linspace(0, len(frames) - 1, K).long()], features=reader.describe())
    prepare(root / "train.tsv", reader, load_quantizer(root / "km.st"), root / "units", deduplicate=True)
    slam = build_hf_decoder("qwen2_tied_gqa", vocab_size=K + 2, seed=3, initializer_range=INIT)
    save_slamkit(slam, root / "slam", num_units=K)
    opt = build_hf_decoder("opt_350m_like", vocab_size=K + 4, pad=1, bos=0, eos=2, seed=4,
                           initializer_range=INIT)
    opt.save_pretrained(root / "opt")
    (root / "opt" / "unit_vocab.json").write_text(json.dumps(OPT_VOCAB))
    return root, manifest


def _config(root, base, name, *overrides):
    split = [f"data.train_units={root}/units/train.units", f"data.train_labels={root}/train.labels",
             f"data.dev_units={root}/units/train.units", f"data.dev_labels={root}/train.labels"]
    return C.load_config(T.TrainConfig, None, [
        *split, f"base={root}/{base}", f"run_dir={root}/{name}", "data.task=sequence", "verbalizer.kind=sequence",
        "method.name=prompt", "method.options.length=4", "batch_size=4", "optim.lr=0.05", "dropout=false", "patience=0",
        "decode.max_new_tokens=12", *overrides,
    ])


@pytest.mark.parametrize("base", ["slam", "opt"])
def test_deep_prompt_learns_transcripts_then_evaluate_and_infer_decode_them(corpus, base, capsys):
    root, manifest = corpus
    untrained = T.train(_config(root, base, f"{base}_0", "max_steps=1", "optim.lr=1e-9"))["dev"]
    summary = T.train(_config(root, base, f"{base}_run", "max_epochs=150", "eval_every=100"))
    assert untrained["greedy.wer"] >= 0.5  # a random LM with a random prompt says nothing sensible
    assert summary["dev"]["greedy.wer"] == 0.0 and summary["dev"]["greedy.cer"] == 0.0
    saved = ck.load_checkpoint(root / f"{base}_run" / "best")
    assert saved.meta["task"]["kind"] == "sequence" and set(saved.tensors) == {
        "method.deep_key", "method.deep_value", "method.separator"} | ({"method.prompt"} & set(saved.tensors))
    # The verbalizer stores unit ids (pieces -> units 0..K-1), never this LM's token ids.
    assert all(0 <= u < K for u in saved.meta["verbalizer"]["piece_to_unit"])

    assert main(["evaluate", "--checkpoint", str(root / f"{base}_run" / "best"), "--units",
                 str(root / "units" / "train.units"), "--labels", str(root / "train.labels"), "--out",
                 str(root / f"{base}_eval"), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[0])
    assert metrics["greedy.wer"] == 0.0

    # Decoding runs on the KV cache: it gives what recomputing the whole sequence at every step gives, and only the
    # LM's tokens for pieces (units) and its own </s>.
    task, _, vocab = load_task(root / f"{base}_run" / "best", device="cpu")
    split = load_split(root / "units" / "train.units", root / "train.labels", vocab)
    prefix = collate(split.tokens, split.labels, task.verbalizer, vocab=vocab).prefix
    cached = task.generate(prefix)
    uncached = greedy(task.model, prefix, 12, vocab.eos, model_kwargs=task.method.forward_kwargs(len(prefix)),
                      allowed_tokens=task.allowed, use_cache=False)
    assert torch.equal(cached, uncached)
    emitted = set(cached[cached.ne(vocab.pad)].tolist())
    assert vocab.eos in emitted and all(vocab.is_unit(t) for t in emitted - {vocab.eos})
    # Beam search (its cache reordered per step: rotary GQA keys on the Qwen2, learned positions on the OPT) agrees.
    beam = SequenceTask(task.model, task.method, task.verbalizer, beam_size=3, max_new_tokens=12)
    assert beam.predict(collate(split.tokens, split.labels, task.verbalizer, vocab=vocab))["beam3"] == split.labels

    files = [str(p) for p in manifest.paths()]
    assert main(["infer", "--checkpoint", str(root / f"{base}_run" / "best.safetensors"), *files,
                 "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prediction"] for line in lines] == (root / "train.labels").read_text().splitlines()
