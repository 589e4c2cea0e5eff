"""load_encoder: telling formats apart, the weight files of Hugging Face directories (single, sharded, ``.bin``), and
one clear line for everything it refuses. Neither fairseq nor transformers is needed: the directories here are
written by hand from our own tiny models through the key tables, and one transformers-written directory checks that
loading it never imports transformers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_encoders import TINY_HF_CONFIG, build_hf, our_tiny, save_hf, to_hf_names, waveforms, write_hf_directory

from speechprompt.config import to_dict
from speechprompt.errors import CheckpointError, UnsafeCheckpointError
from speechprompt.fairseq_compat import save_fairseq_checkpoint
from speechprompt.models.encoders import load_encoder
from speechprompt.models.hubert import load_hubert

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture
def tiny_dir(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A tiny wav2vec2 directory written by hand: config.json + model.safetensors."""
    model = our_tiny("wav2vec2")  # conv width 16 != D 32: it has post_extract_proj, as every HF model
    return write_hf_directory(model, tmp_path / "w2v"), model


def _same_features(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = waveforms()[0]
    with torch.no_grad():
        torch.testing.assert_close(a.extract_features(x), b.extract_features(x), rtol=0, atol=0)


def test_hand_written_directory_loads(tiny_dir):
    directory, model = tiny_dir
    enc = load_encoder(directory)
    assert enc.source == "huggingface" and enc.path == directory / "model.safetensors"
    assert enc.task_cfg["normalize"] is False  # no preprocessor_config.json
    _same_features(enc.model, model)
    assert load_encoder(directory / "config.json").path == enc.path  # the config file names its directory


def test_sharded_safetensors_and_torch_bin(tiny_dir, tmp_path):
    directory, model = tiny_dir
    state = to_hf_names(model.state_dict())
    keys = sorted(state)
    for kind in ("safetensors", "bin"):
        shard_dir = tmp_path / kind
        shard_dir.mkdir()
        (shard_dir / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
        halves = {f"model-0000{i + 1}-of-00002.{kind}": keys[i::2] for i in range(2)}
        for name, part in halves.items():
            tensors = {k: state[k] for k in part}
            save_file(tensors, shard_dir / name) if kind == "safetensors" else torch.save(tensors, shard_dir / name)
        index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        (shard_dir / index).write_text(json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
        _same_features(load_encoder(shard_dir).model, model)
    single = tmp_path / "single_bin"
    single.mkdir()
    (single / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    torch.save(state, single / "pytorch_model.bin")
    _same_features(load_encoder(single).model, model)


class _Pwn:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refusals_are_one_line(tiny_dir, tmp_path):
    directory, model = tiny_dir

    def refused(path: Path, *patterns: str) -> None:
        with pytest.raises(CheckpointError) as e:
            load_encoder(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path).split("/")[-1] in msg, msg
        for p in patterns:
            assert re.search(p, msg), msg

    def variant(name: str, config: dict | None = None, weights: dict | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config if config is not None else TINY_HF_CONFIG))
        if weights is not None:
            save_file(weights, d / "model.safetensors")
        return d

    state = to_hf_names(model.state_dict())
    refused(variant("gpt2", {**TINY_HF_CONFIG, "model_type": "gpt2"}, state), "model_type 'gpt2'", "wav2vec2, hubert")
    refused(variant("xvec", {**TINY_HF_CONFIG, "architectures": ["Wav2Vec2ForXVector"]}, state),
            "Wav2Vec2ForXVector", "Wav2Vec2ForCTC")
    refused(variant("adapter", {**TINY_HF_CONFIG, "add_adapter": True}, state), "add_adapter")
    refused(variant("badtype", {**TINY_HF_CONFIG, "hidden_size": "32"}, state), "hidden_size", "expected int")
    refused(variant("noweights"), "no weights", "model.safetensors", "found config.json")
    refused(variant("deeper", {**TINY_HF_CONFIG, "num_hidden_layers": 3}, state),
            "model.safetensors", "missing keys: encoder.layers.2")
    extra = dict(state, **{"encoder.layers.0.attention.rotary.weight": torch.zeros(2)})
    refused(variant("extra", weights=extra), "does not have: encoder.layers.0.attention.rotary.weight")
    wider = dict(state, **{"encoder.layer_norm.weight": torch.zeros(7)})
    refused(variant("wrongshape", weights=wider), r"wrong shapes: encoder.layer_norm.weight \(7,\) vs \(32,\)")
    truncated = variant("truncated")
    data = (directory / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(truncated, "model.safetensors", "truncated or corrupt")
    (tmp_path / "notdir").mkdir()
    refused(tmp_path / "notdir", "no config.json", "an empty directory")
    with pytest.raises(CheckpointError, match="no such file"):
        load_encoder(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="give the directory with its config.json"):
        load_encoder(directory / "model.safetensors")

    # pytorch_model.bin is read with weights_only: a pickle that would run code is refused without running it.
    marker = tmp_path / "pwned"
    evil = variant("evil")
    torch.save({"w": _Pwn(marker)}, evil / "pytorch_model.bin")
    refused(evil, "pytorch_model.bin", "refused: not a plain tensor state dict")
    assert not marker.exists()


def test_fairseq_side_refusals(tmp_path):
    model = our_tiny("hubert")
    cfg = {"model": {"_name": "hubert", **to_dict(model.cfg)}, "task": {"normalize": False}}
    save_fairseq_checkpoint(tmp_path / "lm.pt", model.state_dict(),
                            {"model": {"_name": "transformer_lm"}, "task": {}})
    with pytest.raises(CheckpointError, match="'transformer_lm' is not a supported encoder.*hubert, wav2vec2"):
        load_encoder(tmp_path / "lm.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not an encoder checkpoint.*found a list.*supported"):
        load_encoder(tmp_path / "list.pt")
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "cfg": cfg, "extra": _Pwn(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_encoder(tmp_path / "evil.pt")
    assert not marker.exists()
    # A fairseq HuBERT pretraining checkpoint: load_encoder and load_hubert agree.
    save_fairseq_checkpoint(tmp_path / "hubert.pt", model.state_dict(), cfg)
    enc = load_encoder(tmp_path / "hubert.pt")
    ours, task_cfg = load_hubert(tmp_path / "hubert.pt")
    assert enc.architecture == "hubert" and enc.task_cfg == task_cfg
    _same_features(enc.model, ours)


@pytest.mark.transformers
def test_loading_never_imports_transformers_or_fairseq(tmp_path):
    directory = save_hf(build_hf("hubert_base", head="ctc", vocab_size=8), tmp_path / "hf")
    code = textwrap.dedent(f"""
        import sys
        from speechprompt.models.encoders import load_encoder
        enc = load_encoder({str(directory)!r})
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "fairseq", "omegaconf"))
        assert not bad, bad
        print(enc.architecture, type(enc.head).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hubert CTCOutput"
