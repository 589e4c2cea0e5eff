"""Speech-to-unit speed on this machine; prints one JSON object.

- Real-time factor (processing seconds per second of audio) of a full-size HuBERT base (random weights: 12
  layers, 768-d; the speed does not depend on the values) reading GSLM's layer 6, and of the 39-d MFCC reader,
  on 10 s of audio.
- K-means assignment throughput (frames/s) of our chunked torch matmul against sklearn's
  ``MiniBatchKMeans.predict`` on the same frames (K=100, D=768), and whether the two agree.

Usage: python benchmarks/speech2unit.py [--frames 200000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from speechprompt.data_prep.features import HubertFeatureReader, build_feature_reader
from speechprompt.data_prep.kmeans import Quantizer
from speechprompt.models.hubert import HubertConfig, HubertModel

SR = 16000


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hubert_reader(layer: int) -> HubertFeatureReader:
    """The HuBERT reader around a randomly initialised base model (no checkpoint file needed)."""
    return HubertFeatureReader(HubertModel(HubertConfig.base()), {"normalize": False}, layer)


def bench_readers(seconds: float, repeats: int) -> dict:
    wav = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SR))).astype(np.float32)
    out = {}
    for name, reader in (("hubert_base_layer6", hubert_reader(6)), ("hubert_base_layer12", hubert_reader(12)),
                         ("mfcc", build_feature_reader("mfcc"))):
        t = best_of(lambda reader=reader: reader.read(wav), repeats)
        out[name] = {"seconds": round(t, 4), "rtf": round(t / seconds, 5), "frames": int(reader.read(wav).shape[0])}
    return out


def bench_assign(n_frames: int, k: int, dim: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    # Clustered data (not isotropic noise): distances to the nearest centroids differ as they do for speech.
    centers = rng.normal(0, 1, (k, dim)).astype(np.float32)
    frames = centers[rng.integers(0, k, n_frames)] + rng.normal(0, 0.7, (n_frames, dim)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=k, n_init=1, max_iter=5, batch_size=10000, random_state=0,
                         compute_labels=False).fit(frames[:20000])
    q = Quantizer(km.cluster_centers_)
    x = torch.from_numpy(frames)
    t_ours = best_of(lambda: q.assign(x), repeats)
    t_sklearn = best_of(lambda: km.predict(frames), repeats)
    ours, theirs = q.assign(x).numpy(), km.predict(frames)
    return {
        "frames": n_frames, "k": k, "dim": dim,
        "torch_frames_per_s": round(n_frames / t_ours),
        "sklearn_frames_per_s": round(n_frames / t_sklearn),
        "speedup": round(t_sklearn / t_ours, 2),
        "assignments_equal": bool((ours == theirs).all()),
        "disagreements": int((ours != theirs).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length for the readers")
    parser.add_argument("--frames", type=int, default=200_000, help="frames to assign")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    result = {
        "benchmark": "speech2unit",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "audio_seconds": args.seconds,
        "readers": bench_readers(args.seconds, args.repeats),
        "kmeans_assign": bench_assign(args.frames, 100, 768, args.repeats),
    }
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    # Other processes on a shared machine slow every timing; the load says how much to trust them.
    result["machine"]["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
