"""Feature extraction speed of each encoder architecture: ours against fairseq and transformers, on the same weights
and audio, in the same run, one utterance at a time and in padded batches.

Each architecture (``hubert``, ``wav2vec2``, ``data2vec_audio``, ``wavlm``) is built at base size with random
weights by transformers (``HubertConfig()`` etc.: speed does not depend on the values) and saved as a Hugging Face
directory. Ours loads that directory (:func:`speechprompt.models.encoders.load_encoder`); fairseq gets our state
dict, which is under fairseq's names, in its own environment (``benchmarks/oracles/fairseq_side.py`` kind
``encoder``, run like ``benchmarks/vs_fairseq.py`` runs it); transformers runs in this process. fairseq has no WavLM
(its code lives in microsoft/unilm), so that row has no fairseq column.

All three read the output of the last transformer layer. Per architecture and implementation:
  one      each utterance alone (ours: ``FeatureReader.read``, the toolkit's reader).
  batched  length-sorted batches of at most ``--batch-seconds`` of padded audio (ours: ``read_waveforms``, i.e.
           what ``prepare``/``kmeans`` run; the others on the same batches, padded as each library expects:
           fairseq with its padding mask, transformers with ``attention_mask`` only where its docs say to pass it,
           i.e. LayerNorm front ends, and zero padding alone for GroupNorm ones).
Each reports wall and CPU seconds (the best of ``--repeats`` after a warm-up), the real-time factor (seconds of
compute per second of audio), and the largest difference of its features from ours one at a time: ours batched is
exact (1e-5); the others' batches are not where GroupNorm statistics or data2vec's positional conv stack see the
padding (see docs/encoders.md).

Prints ONE JSON object (also written to ``--out``):

    python benchmarks/encoders.py                        # base size, 8 utterances of 2-8 s (about 15 minutes on CPU)
    python benchmarks/encoders.py --archs hubert --n 4   # one architecture
    python benchmarks/encoders.py --quick                # tiny models: a smoke test (a minute)
    python benchmarks/encoders.py --device cuda --dtype bf16 --n 64 --seconds 2-16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_fairseq import _ratio, run_fairseq, timed  # noqa: E402  (the shared helpers of the fairseq benchmark)

from speechprompt.data_prep.features import HubertFeatureReader, length_batches, read_waveforms  # noqa: E402
from speechprompt.models.encoders import load_encoder  # noqa: E402

SR = 16000
ARCHS = ("hubert", "wav2vec2", "data2vec_audio", "wavlm")
# transformers' config class per architecture; its defaults are the base model.
HF = {"hubert": ("HubertConfig", "HubertModel"), "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
      "data2vec_audio": ("Data2VecAudioConfig", "Data2VecAudioModel"), "wavlm": ("WavLMConfig", "WavLMModel")}
FAIRSEQ_ARCHS = ("hubert", "wav2vec2", "data2vec_audio")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    conv_dim=[16] * 5, conv_kernel=[10, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2],
                    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)


def build_hf(arch: str, quick: bool) -> torch.nn.Module:
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in HF[arch])
    overrides = dict(QUICK_CONFIG) if quick else {}
    if quick and arch == "data2vec_audio":
        overrides.pop("num_conv_pos_embeddings")
        overrides.update(num_conv_pos_embeddings=2, conv_pos_kernel_size=5)
    if quick and arch == "wavlm":
        overrides.update(num_buckets=16, max_bucket_distance=40)
    torch.manual_seed(0)
    return model_cls(config_cls(**overrides)).eval()


def waveforms(n: int, lo: float, hi: float, seed: int = 0) -> list[torch.Tensor]:
    """``n`` noise-like utterances with lengths spread over ``[lo, hi]`` seconds, in shuffled order (a manifest is not
    sorted by length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(SR * (lo + (hi - lo) * i / max(n - 1, 1))) for i in range(n)]
    return [0.1 * torch.randn(lengths[i], generator=g) for i in torch.randperm(n, generator=g).tolist()]


def hf_runner(model: torch.nn.Module, wavs: list[torch.Tensor], batches: list[list[int]],
              device: torch.device) -> dict[str, Any]:
    """transformers, one at a time and on our batches (``attention_mask`` only for LayerNorm front ends, as its
    docs advise: GroupNorm models were trained without one and are fed zero padding alone)."""
    use_mask = getattr(model.config, "feat_extract_norm", "group") == "layer"

    @torch.inference_mode()
    def one() -> list[torch.Tensor]:
        return [model(w[None]).last_hidden_state[0] for w in wavs]

    @torch.inference_mode()
    def batched() -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(wavs)
        for idx in batches:
            rows = [wavs[i] for i in idx]
            source = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T)
            lengths = torch.tensor([r.numel() for r in rows], device=device)
            mask = None
            if use_mask:
                mask = (torch.arange(source.shape[1], device=device)[None, :] < lengths[:, None]).long()  # (B, T)
            hidden = model(source, attention_mask=mask).last_hidden_state  # (B, F, D)
            frames = model._get_feat_extract_output_lengths(lengths)
            for row, i in enumerate(idx):
                out[i] = hidden[row, : int(frames[row])]
        return out  # type: ignore[return-value]

    return {"one": one, "batched": batched}


def max_diff(feats: list[torch.Tensor], reference: list[torch.Tensor]) -> float | None:
    if len(feats) != len(reference) or any(a.shape != b.shape for a, b in zip(feats, reference)):
        return None
    return max(float((a.float().cpu() - b.float().cpu()).abs().max()) for a, b in zip(feats, reference))


def summarise(times: dict[str, list[float]], audio_seconds: float) -> dict[str, Any]:
    wall, cpu = min(times["seconds"]), min(times["cpu_seconds"])
    return {"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4), "rtf": round(wall / audio_seconds, 5),
            "rtf_cpu": round(cpu / audio_seconds, 5)}


def bench_arch(arch: str, args: argparse.Namespace, tmp: Path, wavs: list[torch.Tensor]) -> dict[str, Any]:
    from speechprompt.config import to_dict

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    hf = build_hf(arch, args.quick)
    directory = tmp / arch
    hf.save_pretrained(directory)
    hf = hf.to(device, dtype)
    ours = load_encoder(directory).model
    ours.remove_pretraining_modules()
    ours.eval()
    layer = ours.num_layers
    reader = HubertFeatureReader(ours, {"normalize": False}, layer, device=args.device)
    reader.set_dtype(args.dtype)
    wavs = [w.to(device) for w in wavs]
    audio = sum(w.numel() for w in wavs) / SR
    batches = length_batches([w.numel() for w in wavs], int(args.batch_seconds * SR))

    results: dict[str, Any] = {}
    reference: list[torch.Tensor] = []
    for mode, fn in (("one", lambda: [reader.read(w) for w in wavs]),
                     ("batched", lambda: read_waveforms(reader, wavs, args.batch_seconds))):
        times, feats = timed(fn, args.repeats, device)
        reference = reference or feats
        results.setdefault("ours", {})[mode] = {**summarise(times, audio), "max_abs_diff": max_diff(feats, reference)}
    hf_wavs = [w.to(dtype) for w in wavs]
    for mode, fn in hf_runner(hf, hf_wavs, batches, device).items():
        times, feats = timed(fn, args.repeats, device)
        results.setdefault("transformers", {})[mode] = {**summarise(times, audio),
                                                        "max_abs_diff": max_diff(feats, reference)}
    del hf
    if arch in FAIRSEQ_ARCHS and not args.no_fairseq:
        torch.save({k: v.float().cpu() for k, v in ours.state_dict().items()}, tmp / f"{arch}.state.pt")
        torch.save([w.cpu() for w in wavs], tmp / "wavs.pt")
        cfg = {k: (v.value if hasattr(v, "value") else v) for k, v in to_dict(ours.cfg).items()}
        for mode in ("one", "batched"):
            spec = {"kind": "encoder", "arch": arch, "cfg": cfg, "state": str(tmp / f"{arch}.state.pt"),
                    "inputs": str(tmp / "wavs.pt"), "layer": layer, "batches": batches, "mode": mode,
                    "repeats": args.repeats, "threads": args.threads, "device": args.device, "dtype": args.dtype,
                    "features_out": str(tmp / f"{arch}.{mode}.fairseq.pt")}
            out = run_fairseq(spec)
            if "error" in out:
                results.setdefault("fairseq", {})[mode] = {"error": out["error"]}
                continue
            feats = torch.load(spec["features_out"], weights_only=True)
            results.setdefault("fairseq", {})[mode] = {**summarise(out, audio), "max_abs_diff": max_diff(feats,
                                                                                                          reference)}
    else:
        results["fairseq"] = None  # fairseq has no WavLM
    # Speed-ups (peer time / ours) in CPU seconds with one thread (other load on a shared machine stretches wall time
    # far more), in wall seconds with more threads, as benchmarks/vs_fairseq.py decides.
    key = "cpu_seconds" if args.threads == 1 else "seconds"

    def fastest(modes: tuple[str, ...]) -> float | None:
        times = [results[p][m][key] for p in ("fairseq", "transformers") if results.get(p) for m in modes
                 if key in results[p][m]]
        return min(times, default=None)

    padded = sum(len(b) * max(wavs[i].numel() for i in b) for b in batches)
    return {
        "arch": arch, "layer": layer, "batches": [len(b) for b in batches],
        "padded_fraction": round(1 - sum(w.numel() for w in wavs) / padded, 3), **results, "speedups_on": key,
        "ours_one_vs_fastest_peer_one": _ratio(fastest(("one",)), results["ours"]["one"][key]),
        "ours_batched_vs_fastest_peer_batched": _ratio(fastest(("batched",)), results["ours"]["batched"][key]),
        "ours_batched_vs_fastest_peer": _ratio(fastest(("one", "batched")), results["ours"]["batched"][key]),
        "ours_batched_vs_ours_one": _ratio(results["ours"]["one"][key], results["ours"]["batched"][key]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--n", type=int, default=8, help="utterances")
    parser.add_argument("--seconds", default="2-8", help="utterance lengths, LO-HI seconds, spread evenly")
    parser.add_argument("--batch-seconds", type=float, default=100.0, help="padded audio per batch (as prepare's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    parser.add_argument("--device", default="cpu", help="torch device of every side (e.g. cuda)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute type of every side")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up; the best is kept")
    parser.add_argument("--quick", action="store_true", help="tiny models and audio: a smoke test")
    parser.add_argument("--no-fairseq", action="store_true", help="skip the fairseq side")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"unknown --archs {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    if args.quick:
        args.n, args.seconds = 3, "0.1-0.3"
    lo, hi = (float(x) for x in args.seconds.split("-"))
    torch.set_num_threads(args.threads)
    wavs = waveforms(args.n, lo, hi)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-encoders-") as tmp:
        for arch in archs:
            rows.append(bench_arch(arch, args, Path(tmp), wavs))
    out = {"benchmark": "encoders", "quick": args.quick, "threads": torch.get_num_threads(), "device": args.device,
           "dtype": args.dtype,
           "torch": torch.__version__, "utterances": len(wavs),
           "audio_seconds": round(sum(w.numel() for w in wavs) / SR, 3), "batch_seconds": args.batch_seconds,
           "command": "python benchmarks/encoders.py " + " ".join(sys.argv[1:]), "results": rows}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
