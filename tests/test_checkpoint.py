"""Task-only checkpoints: the safetensors + sidecar pair, fingerprints and every way loading must refuse."""

from __future__ import annotations

import json

import pytest
import torch

from speechprompt import checkpoint as ck
from speechprompt.errors import CheckpointError


def _save(tmp_path, **meta):
    method = {"prompt": torch.randn(3, 8), "sep": torch.randn(8)}
    head = {"weight": torch.randn(4, 12)}
    meta = {"task": {"type": "classification", "labels": ["a", "b"]}, "base": {"path": "lm.pt", "fingerprint":
            "sha256:abc"}, **meta}
    return ck.save_checkpoint(tmp_path / "best", method, head, meta), method, head


def test_roundtrip_keeps_exact_tensors_and_sidecar(tmp_path):
    st, method, head = _save(tmp_path, training={"steps": 3})
    assert st == tmp_path / "best.safetensors" and (tmp_path / "best.json").is_file()
    for name in ("best", "best.safetensors", "best.json"):
        loaded = ck.load_checkpoint(tmp_path / name)
        assert loaded.method_state.keys() == method.keys() and loaded.head_state.keys() == head.keys()
        for k, v in method.items():
            assert torch.equal(loaded.method_state[k], v)
        assert loaded.meta["training"] == {"steps": 3}
        assert loaded.meta["toolkit_version"] and loaded.meta["tensors"]["bytes"] == st.stat().st_size


def test_safetensors_file_holds_no_pickle_and_only_prefixed_keys(tmp_path):
    from safetensors import safe_open

    st, method, head = _save(tmp_path)
    with safe_open(str(st), framework="pt") as f:
        assert set(f.keys()) == {"method.prompt", "method.sep", "head.weight"}
        assert f.metadata()["format"] == ck.FORMAT


def test_truncated_file_gives_a_clear_error(tmp_path):
    st, *_ = _save(tmp_path)
    st.write_bytes(st.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ck.load_checkpoint(st)


def test_garbage_file_without_hash_is_still_refused_cleanly(tmp_path):
    st, *_ = _save(tmp_path)
    meta = json.loads((tmp_path / "best.json").read_text())
    del meta["tensors"]["sha256"]
    (tmp_path / "best.json").write_text(json.dumps(meta))
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ck.load_checkpoint(st)


def test_missing_or_foreign_sidecar(tmp_path):
    st, *_ = _save(tmp_path)
    (tmp_path / "best.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a speechprompt task checkpoint"):
        ck.load_checkpoint(st)
    (tmp_path / "best.json").unlink()
    with pytest.raises(CheckpointError, match="copy both"):
        ck.load_checkpoint(st)


def test_newer_format_is_refused(tmp_path):
    st, *_ = _save(tmp_path)
    meta = json.loads((tmp_path / "best.json").read_text())
    meta["format_version"] = ck.FORMAT_VERSION + 1
    (tmp_path / "best.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer"):
        ck.load_checkpoint(st)


def test_mismatched_base_names_both_fingerprints(tmp_path):
    st, *_ = _save(tmp_path)
    loaded = ck.load_checkpoint(st)
    loaded.check_base("sha256:abc")  # the same base passes
    with pytest.raises(CheckpointError) as e:
        loaded.check_base("sha256:def", "other_lm.pt")
    assert "sha256:abc" in str(e.value) and "sha256:def" in str(e.value) and "other_lm.pt" in str(e.value)


def test_mismatched_quantizer_is_refused(tmp_path):
    st, *_ = _save(tmp_path, units={"quantizer": {"path": "km.bin", "fingerprint": "sha256:111"}})
    loaded = ck.load_checkpoint(st)
    loaded.check_quantizer("sha256:111", "km.bin")
    loaded.check_quantizer(None, "unknown")  # nothing to compare with
    with pytest.raises(CheckpointError, match="sha256:222"):
        loaded.check_quantizer("sha256:222", "other_km.bin")


def test_base_fingerprint_sees_values_not_module_identity():
    from speechprompt.models.unit_lm import UnitLM, UnitLMConfig

    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("tiny", layers=1))
    twin = UnitLM(UnitLMConfig.named("tiny", layers=1))
    twin.load_state_dict(model.state_dict())
    fp = ck.base_fingerprint(model)
    assert fp.startswith("sha256:") and fp == ck.base_fingerprint(twin)
    with torch.no_grad():
        twin.decoder.layer_norm.weight[0] += 1e-3
    assert ck.base_fingerprint(twin) != fp


def test_load_into_names_missing_keys(tmp_path):
    module = torch.nn.Linear(3, 2)
    ck.load_into(module, {"weight": torch.zeros(2, 3), "bias": torch.ones(2)}, "head", "x")
    assert torch.equal(module.bias, torch.ones(2))
    with pytest.raises(CheckpointError, match="missing"):
        ck.load_into(module, {"weight": torch.zeros(2, 3)}, "head", "x")
    with pytest.raises(CheckpointError, match="shape"):
        ck.load_into(module, {"weight": torch.zeros(3, 3), "bias": torch.ones(2)}, "head", "x")
