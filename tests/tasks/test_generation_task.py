"""Sequence generation through the sentencepiece verbalizer: training, greedy and beam decoding, WER/CER, slots."""

from __future__ import annotations

import random

import pytest
import torch

from speechprompt import config as C
from speechprompt import train as T

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # whole training runs, end to end

K = 40
SENTENCES = {
    "go left": [1, 2, 3],
    "go right": [5, 6, 7],
    "B-place kitchen E-place": [9, 10, 11],
    "stop now": [13, 14, 15],
}


def write_split(path, n, seed):
    rng = random.Random(seed)
    units, texts = [], []
    for _ in range(n):
        text = rng.choice(list(SENTENCES))
        seq = [rng.randrange(K) for _ in range(2)] + [rng.choice(SENTENCES[text]) for _ in range(5)]
        units.append(" ".join(map(str, seq)))
        texts.append(text)
    path.with_suffix(".units").write_text("\n".join(units) + "\n")
    path.with_suffix(".labels").write_text("\n".join(texts) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread, save_tiny_unit_lm):
    root = tmp_path_factory.mktemp("seq")
    save_tiny_unit_lm(root / "lm.pt", K)
    write_split(root / "train", 64, 0)
    write_split(root / "dev", 16, 1)
    cfg = C.load_config(T.TrainConfig, None, [
        f"data.train_units={root}/train.units", f"data.train_labels={root}/train.labels",
        f"data.dev_units={root}/dev.units", f"data.dev_labels={root}/dev.labels", f"base={root}/lm.pt",
        f"run_dir={root}/run", "data.task=sequence", "verbalizer.kind=sequence", "verbalizer.tag_pattern=[BE]-\\S+",
        "method.name=full_finetune", "optim.lr=0.003", "batch_size=16", "max_epochs=20", "patience=0",
        "decode.max_new_tokens=20",
    ])
    summary = T.train(cfg)
    return root, summary


def test_sequence_training_decodes_the_transcripts(run):
    _, summary = run
    dev = summary["dev"]
    assert dev["greedy.wer"] <= 0.1 and dev["greedy.cer"] <= 0.1
    # Slot metrics appear because the transcripts carry B-/E- tags.
    assert dev["greedy.slot_type_f1"] >= 0.9 and dev["greedy.slot_value_cer"] <= 0.1
    assert summary["select_metric"] == "greedy.wer"


def test_reloaded_task_decodes_greedy_and_beam_alike(run):
    from speechprompt.tasks.data import load_split
    from speechprompt.tasks.evaluation import evaluate_split
    from speechprompt.tasks.generation import SequenceTask
    from speechprompt.tasks.loading import load_task

    root, summary = run
    task, ckpt, _ = load_task(root / "run" / "best.safetensors", device="cpu")
    assert isinstance(task, SequenceTask) and ckpt.meta["verbalizer"]["kind"] == "sequence"
    split = load_split(root / "dev.units", root / "dev.labels", K)
    metrics, preds = evaluate_split(task, split, 8, torch.device("cpu"))
    assert metrics["greedy.wer"] == summary["dev"]["greedy.wer"]
    beam = SequenceTask(task.model, task.method, task.verbalizer, beam_size=3, max_new_tokens=20)
    beam_metrics, beam_preds = evaluate_split(beam, split, 8, torch.device("cpu"))
    assert list(beam_preds) == ["beam3"] and beam_metrics["beam3.wer"] <= 0.1
    assert sum(p == ref for p, ref in zip(preds["greedy"], split.labels)) >= 0.8 * len(split)


def test_only_pieces_and_eos_can_be_generated(run):
    from speechprompt.tasks.data import collate
    from speechprompt.tasks.loading import load_task

    root, _ = run
    task, _, _ = load_task(root / "run" / "best", device="cpu")
    out = task.generate(collate([[4, 5, 6], [7]], ["", ""], None).prefix)
    allowed = set(task.allowed) | {1}  # <pad> after </s>
    assert set(out.flatten().tolist()) <= allowed
