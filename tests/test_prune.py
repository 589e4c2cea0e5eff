"""``speechprompt prune``: a pruned checkpoint in the input's own format that every loader reads back, with exactly
the zeros asked for and nothing else changed; a trained S3-Router mask applied; a metric-against-sparsity sweep of a
SUPERB checkpoint; and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import run_oracle
from tiny_encoders import our_tiny, waveforms, write_hf_directory

from speechprompt.checkpoint import base_fingerprint, base_record, save_checkpoint
from speechprompt.cli import main
from speechprompt.config import to_dict
from speechprompt.fairseq_compat import safe_torch_load, save_fairseq_checkpoint
from speechprompt.models.encoders import load_encoder
from speechprompt.models.unit_lm import load_unit_lm
from speechprompt.prune import metric_vs_sparsity_figure
from speechprompt.superb import evaluate_superb, load_audio_split, load_superb
from speechprompt.tuning import MaskConfig, build_method
from speechprompt.tuning.base import LinearName
from speechprompt.tuning.mask import ScoreInit, keep_count, magnitude_masks, prunable_weights, pruned

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_fairseq_hubert(path: Path) -> Path:
    model = our_tiny("hubert")
    save_fairseq_checkpoint(path, model.state_dict(), {"model": {"_name": "hubert", **to_dict(model.cfg)},
                                                        "task": {"normalize": False, "sample_rate": 16000}})
    return path


def _zero_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {k: (int((w == 0).sum()), w.numel()) for k, w in prunable_weights(model).items()}


def _features(model: torch.nn.Module) -> torch.Tensor:
    x, pad = waveforms(batch=2, samples=1600)
    with torch.no_grad():
        return model.extract_features(x, pad)


@pytest.mark.parametrize("fmt", ["fairseq", "huggingface"])
def test_magnitude_pruning_is_exact_and_read_back_by_the_loader(tmp_path, capsys, fmt):
    if fmt == "fairseq":
        src, out = _save_fairseq_hubert(tmp_path / "hubert.pt"), tmp_path / "pruned" / "hubert_p50.pt"
    else:
        src, out = write_hf_directory(our_tiny("wav2vec2"), tmp_path / "w2v"), tmp_path / "w2v_p50"
        (src / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    assert main(["prune", "--model", str(src), "--sparsity", "0.5", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == ("torch" if fmt == "fairseq" else "huggingface") and summary["sparsity"] == 0.5

    original, pruned_model = load_encoder(src).model, load_encoder(out).model
    assert load_encoder(out).task_cfg == load_encoder(src).task_cfg
    counts = _zero_counts(pruned_model)
    assert len(counts) == 2 * 6
    for key, (zero, n) in counts.items():
        assert zero == n - keep_count(n, 0.5) == n // 2, key  # exactly half of every linear
    weights = prunable_weights(original)
    for key, w in prunable_weights(pruned_model).items():  # the zeros are the smallest |w|, the rest untouched
        kept = w != 0
        assert torch.equal(w[kept], weights[key][kept])
        assert weights[key][~kept].abs().max() <= weights[key][kept].abs().min()
    others = {k: v for k, v in original.state_dict().items() if f"{k}" not in weights}
    assert all(torch.equal(v, pruned_model.state_dict()[k]) for k, v in others.items())
    with pruned(weights, magnitude_masks(weights, 0.5)):  # the same model as pruning in memory
        expected = _features(original)
    torch.testing.assert_close(_features(pruned_model), expected, rtol=0, atol=1e-6)


def test_a_torch_file_keeps_everything_but_the_pruned_bytes(tmp_path, capsys):
    src = _save_fairseq_hubert(tmp_path / "hubert.pt")
    out = tmp_path / "out.pt"
    assert main(["prune", "--model", str(src), "--sparsity", "0.25", "--targets", "fc1", "fc2", "--layers", "-1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    a, b = safe_torch_load(src), safe_torch_load(out)
    assert a["cfg"] == b["cfg"] and a.keys() == b.keys()
    changed = {k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])}
    assert changed == {"encoder.layers.1.fc1.weight", "encoder.layers.1.fc2.weight"}
    reader_a, reader_b = (torch._C.PyTorchFileReader(str(p)) for p in (src, out))
    assert reader_a.get_all_records() == reader_b.get_all_records()
    assert reader_a.get_record("data.pkl") == reader_b.get_record("data.pkl")  # the pickle is copied as it is


def test_a_unit_lm_is_pruned_with_its_dictionary(tmp_path, save_tiny_unit_lm, capsys):
    src = save_tiny_unit_lm(tmp_path / "lm" / "checkpoint_best.pt", n_units=20)
    out = tmp_path / "pruned" / "lm.pt"
    assert main(["prune", "--model", str(src), "--sparsity", "0.3", "--out", str(out)]) == 0
    capsys.readouterr()
    model, dictionary = load_unit_lm(out)  # dict.txt was copied beside it
    assert len(dictionary) == 24
    for key, (zero, n) in _zero_counts(model).items():
        assert zero == n - keep_count(n, 0.7), key


def test_a_trained_mask_is_applied(tmp_path, capsys):
    src = _save_fairseq_hubert(tmp_path / "hubert.pt")
    base = load_encoder(src).model
    torch.manual_seed(0)
    config = MaskConfig(keep_ratio=0.6, init=ScoreInit.KAIMING, targets=[LinearName.Q, LinearName.FC1])
    method = build_method(config, base)
    with torch.no_grad():
        masked = _features(base)
    meta = {"task": {"type": "superb", "labels": ["a", "b"]}, "head": "superb_classification",
            "method": {"name": "mask", "config": to_dict(config)},
            "base": base_record(src, base_fingerprint(load_encoder(src).model))}
    ckpt = save_checkpoint(tmp_path / "task" / "best", method.export_state_dict(), None, meta)
    out = tmp_path / "masked.pt"
    assert main(["prune", "--mask", str(ckpt), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "mask" and summary["linears"] == 4
    model = load_encoder(out).model
    torch.testing.assert_close(_features(model), masked, rtol=0, atol=1e-6)  # the task's model, as a checkpoint
    for key, (zero, n) in _zero_counts(model).items():
        assert zero == (n - keep_count(n, 0.6) if key.endswith(("q_proj.weight", "fc1.weight")) else 0), key


@pytest.mark.fairseq
def test_a_fairseq_ctc_checkpoint_keeps_its_task_state(tmp_path, capsys):
    spec = dict(kind="wav2vec_ctc", normalize=True, randomize_seed=4, letters=list("|ABCDE"), dictionary="task_state",
                model=dict(extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True,
                           conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)] * 2", encoder_layers=2,
                           encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8,
                           conv_pos_groups=4))
    source, padding = waveforms()
    torch.save({"source": source, "padding": padding}, tmp_path / "inputs.pt")
    run_oracle("fairseq", "wav2vec2_family", tmp_path, models={"ctc": spec}, inputs=str(tmp_path / "inputs.pt"),
               layers=[1])
    src, out = tmp_path / "ctc" / "checkpoint.pt", tmp_path / "pruned" / "ctc.pt"
    assert main(["prune", "--model", str(src), "--sparsity", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    enc = load_encoder(out)  # its letters come from the fairseq Dictionary in task_state, copied with the pickle
    assert enc.head.vocab == load_encoder(src).head.vocab
    for key, (zero, n) in _zero_counts(enc.model).items():
        assert zero == n // 2, key
    wav, pad = enc.batch([source[0].numpy()])
    assert len(enc.transcribe(wav, pad)) == 1


def test_refusals(tmp_path, capsys):
    src = _save_fairseq_hubert(tmp_path / "hubert.pt")
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(src, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    cases = [
        (["--model", str(legacy), "--sparsity", "0.5", "--out", str(tmp_path / "x.pt")], "legacy"),
        (["--model", str(src), "--sparsity", "0.5", "--out", str(src)], "is the input itself"),
        (["--model", str(src), "--sparsity", "1.0", "--out", str(tmp_path / "x.pt")], "in [0, 1)"),
        (["--sparsity", "0.5", "--out", str(tmp_path / "x.pt")], "needs --model"),
        (["--sweep", str(tmp_path / "none"), "--out", str(tmp_path / "s")], "needs --manifest"),
    ]
    for argv, message in cases:
        assert main(["prune", *argv]) == 2, argv
        assert message in capsys.readouterr().err or pytest.fail(f"{argv}: no {message!r}")
    lora = save_checkpoint(tmp_path / "lora", {}, None, {"method": {"name": "lora", "config": {}}})
    assert main(["prune", "--mask", str(lora), "--out", str(tmp_path / "x.pt")]) == 2
    assert "--mask takes S3-Router masks" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Sweep


def test_sweep_of_a_superb_checkpoint(superb_runs, tmp_path, capsys):
    ckpt = superb_runs["classification"]  # adapters inside a tiny HuBERT, classification head
    out = tmp_path / "sweep"
    assert main(["prune", "--sweep", str(ckpt), "--manifest", str(superb_runs["dev"]), "--sparsities", "0", "0.5",
                 "0.9", "--out", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert printed == rows and [r["sparsity"] for r in rows] == [0, 0.5, 0.9]
    assert rows[0]["zeroed"] == 0.0 and rows[1]["zeroed"] == pytest.approx(0.5, abs=1e-3)
    assert rows[2]["zeroed"] == pytest.approx(0.9, abs=1e-2)
    model = load_superb(ckpt)
    unpruned, _ = evaluate_superb(model, load_audio_split(superb_runs["dev"]))
    assert rows[0]["accuracy"] == unpruned["accuracy"] and rows[0]["loss"] == pytest.approx(unpruned["loss"])
    assert rows[2]["loss"] != pytest.approx(unpruned["loss"])  # 90% of the upstream's weights gone shows
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep.md").is_file() and (out / "sweep.csv").is_file()


def test_the_sweep_figure_draws_the_rows():
    rows = [{"sparsity": 0.0, "accuracy": 0.9}, {"sparsity": 0.5, "accuracy": 0.8}, {"sparsity": 0.9, "accuracy": 0.5}]
    fig = metric_vs_sparsity_figure(rows, "accuracy", "ks")
    ax = fig.axes[0]
    x, y = ax.lines[0].get_data()
    assert list(x) == [0.0, 0.5, 0.9] and list(y) == [0.9, 0.8, 0.5]
    assert ax.get_ylabel() == "accuracy" and "sparsity" in ax.get_xlabel() and ax.get_title() == "ks"


# --------------------------------------------------------------------------------------------------------------
# Speech LMs (LLaMA / Qwen2 SwiGLU layers)


@pytest.mark.transformers
@pytest.mark.parametrize("layout", ["slamkit", "llama"])
def test_a_swiglu_speech_lm_is_pruned_by_its_own_names(tmp_path, capsys, layout):
    """``--targets gate_proj down_proj o_proj`` on a Qwen2 slamkit directory and a plain LLaMA one: exactly those
    linears get the zeros, written under the original's key names, and the loader reads the result back."""
    from tiny_decoders import build_hf_decoder, save_slamkit

    from speechprompt.models.hf_decoders import load_speech_lm, save_hf_unit_vocab
    from speechprompt.models.unit_vocab import UnitVocab

    src = tmp_path / "lm"
    if layout == "slamkit":
        save_slamkit(build_hf_decoder("qwen2_tied_gqa", vocab_size=12), src, num_units=10)
    else:
        build_hf_decoder("llama_mha", vocab_size=13, pad=0, bos=1, eos=2).save_pretrained(src)
        save_hf_unit_vocab(src, UnitVocab(size=13, num_units=10, unit_offset=3, bos=1, eos=2, pad=0, layout="hf"))
    before, _ = load_speech_lm(src)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--sparsity", "0.5", "--out", str(out), "--targets", "gate_proj",
                 "down_proj", "o_proj"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "huggingface" and report["linears"] == 2 * 3  # 2 layers x 3 linears
    after, _ = load_speech_lm(out)
    pruned_names = ("mlp.gate_proj.weight", "mlp.down_proj.weight", "self_attn.out_proj.weight")
    old = dict(before.named_parameters())
    for name, w in after.named_parameters():
        if name.startswith("decoder.layers.") and name.endswith(pruned_names):
            assert int((w == 0).sum()) == w.numel() - keep_count(w.numel(), 0.5), name
            kept = w != 0
            torch.testing.assert_close(w[kept], old[name][kept], rtol=0, atol=0)
        else:
            torch.testing.assert_close(w, old[name], rtol=0, atol=0, msg=name)  # up_proj, q/k/v, norms untouched
    if layout == "llama":  # transformers reads the pruned directory too: the original's names, the same tensors
        import transformers

        original = dict(transformers.AutoModelForCausalLM.from_pretrained(src).named_parameters())
        changed = {name: p != original[name]
                   for name, p in transformers.AutoModelForCausalLM.from_pretrained(out).named_parameters()}
        assert {n.split(".")[-2] for n, c in changed.items() if c.any()} == {"gate_proj", "down_proj", "o_proj"}
        assert sum(int(c.sum()) for c in changed.values()) == report["zeroed"]
    # The default targets cover every linear of a SwiGLU layer: fc1 is gate_proj + up_proj, fc2 is down_proj.
    assert main(["prune", "--model", str(src), "--sparsity", "0.5", "--out", str(tmp_path / "all")]) == 0
    assert json.loads(capsys.readouterr().out)["linears"] == 2 * 7
