"""Phone units from a recognizer trained on real people: CMU PocketSphinx's English acoustic model, phone loop.

``--features phones`` decodes each utterance into phones with PocketSphinx's allphone search (a phone loop
weighted by a phone bigram LM, context-independent phones) and gives them as one-hot frames at 100 Hz, so the
rest of the pipeline is the one every reader uses: ``speechprompt kmeans --features phones`` writes the identity
quantizer over the phone set (no clustering: the phones already are the units), and ``prepare --dedup`` turns
the frames into the phone sequence, one unit per phone.

Why it is here: the HuBERT units of the embedded default are learned from a few minutes of synthetic speech,
while PocketSphinx's acoustic model was trained on hours of real speakers. Its phones carry word identity across
voices and channels the demo never saw (``docs/demo.md`` measures both), which makes them a strong unit source
for a CPU-only world, and a baseline any self-supervised unit source should beat.

PocketSphinx is an optional dependency (``pip install pocketsphinx``, or ``speechprompt[phones]``): its wheel
ships the US English model (``en-us``: 42 phones with SIL and two noise fillers, and ``en-us-phone.lm.bin``).
``--checkpoint DIR`` takes another acoustic model directory in the same format (``mdef``, ``means``, ...); its
phone LM is the ``*-phone.lm.bin`` beside it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechprompt.data_prep.feature_reader import FeatureError, FeatureReader

# The files of a PocketSphinx acoustic model whose bytes decide the decoding (the fingerprint covers them all).
_MODEL_FILES = ("mdef", "means", "variances", "mixture_weights", "sendump", "transition_matrices", "feat.params",
                "noisedict")
# The phone LM search is pruned as PocketSphinx's defaults, but with the language weight lowered from 6.5: with
# the default weight, the phone LM's prior swallows short words (4 phones per second of commands); 2 lets the
# acoustics speak (measured by the bag-of-units probe on the demo's dev split, docs/demo.md).
LANGUAGE_WEIGHT = 2.0


def read_phone_set(mdef: str | os.PathLike) -> tuple[list[str], str]:
    """The context-independent phones of a binary PocketSphinx ``mdef`` file, in id order, and the silence phone.

    The binary format (sphinxbase ``bin_mdef``): ``BMDF``, int32 version, int32 length of a text description, the
    description, then ten int32 counts (the first the number of CI phones, the last the silence phone's id), then
    the CI phone names, each NUL-terminated.
    """
    data = Path(mdef).read_bytes()
    if data[:4] != b"BMDF":
        raise FeatureError(f"{mdef}: not a binary PocketSphinx mdef file (text mdef files are not supported)")
    for order in ("<", ">"):  # the file is in its writer's byte order; version 1 tells which
        version, text_len = struct.unpack(order + "ii", data[4:12])
        if version == 1:
            break
    else:
        raise FeatureError(f"{mdef}: unknown mdef version")
    counts = struct.unpack(order + "10i", data[12 + text_len : 52 + text_len])
    n_phones, silence = counts[0], counts[9]
    names, pos = [], 52 + text_len
    for _ in range(n_phones):
        end = data.index(b"\0", pos)
        names.append(data[pos:end].decode("ascii"))
        pos = end + 1
    if not 0 <= silence < n_phones:
        raise FeatureError(f"{mdef}: silence phone id {silence} out of range")
    return names, names[silence]


def _default_model() -> Path:
    return Path(_pocketsphinx().get_model_path()) / "en-us" / "en-us"


def _pocketsphinx() -> Any:
    try:
        import pocketsphinx
    except ImportError:
        raise FeatureError("--features phones needs PocketSphinx: pip install pocketsphinx (or "
                           "'speechprompt[phones]')") from None
    return pocketsphinx


def _phone_lm(model: Path) -> Path:
    found = sorted(model.parent.glob("*-phone.lm.bin"))
    if not found:
        raise FeatureError(f"no phone LM (*-phone.lm.bin) beside the acoustic model {model}")
    return found[0]


class PhoneFeatureReader(FeatureReader):
    """One-hot phone frames (100 Hz, D = the model's phone set) from PocketSphinx's phone-loop decoding.

    Args:
        model: a PocketSphinx acoustic model directory; ``None`` is the wheel's US English model.
    """

    frame_rate = 100.0
    discrete = True  # its frames are symbols: `kmeans` writes the identity quantizer instead of clustering

    def __init__(self, model: str | os.PathLike | None = None) -> None:
        ps = _pocketsphinx()
        self.model = Path(model) if model is not None else _default_model()
        if not (self.model / "mdef").is_file():
            raise FeatureError(f"{self.model}: not a PocketSphinx acoustic model directory (no mdef)")
        self.phone_lm = _phone_lm(self.model)
        self.symbols, self.silence = read_phone_set(self.model / "mdef")
        self.dim = len(self.symbols)
        self._index = {p: i for i, p in enumerate(self.symbols)}
        self.fingerprint = self._fingerprint()
        config = ps.Config(lm=None, hmm=str(self.model), allphone=str(self.phone_lm), lw=LANGUAGE_WEIGHT,
                           logfn=os.devnull)
        self._decoder = ps.Decoder(config)

    @classmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> PhoneFeatureReader:
        if layer is not None:
            raise FeatureError("--layer is for the hubert/ssl readers; the phones reader takes none")
        return cls(checkpoint)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in [self.model / n for n in _MODEL_FILES if (self.model / n).is_file()] + [self.phone_lm]:
            h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return f"sha256:{h.hexdigest()}"

    def phones(self, wav: np.ndarray | torch.Tensor) -> list[tuple[str, int, int]]:
        """The decoded phones of one utterance: ``(phone, first frame, last frame)``, frames of 10 ms."""
        x = self._waveform(wav).numpy()
        # PocketSphinx reads 16-bit little-endian PCM; x 32768 makes 16-bit audio read as float give back its samples.
        pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
        dec = self._decoder
        # The feature front end carries state from one utterance to the next (its noise and cepstral-mean
        # estimates): reset it, so that an utterance's phones do not depend on what was decoded before it (shards
        # and batches must give the units one run gives).
        dec.reinit_feat()
        dec.start_utt()
        dec.process_raw(pcm.tobytes(), full_utt=True)  # full_utt: cepstral mean over the whole utterance
        dec.end_utt()
        return [(s.word, s.start_frame, s.end_frame) for s in dec.seg()]

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        segments = self.phones(wav)
        frames = max([end + 1 for _, _, end in segments] + [self._decoder.n_frames(), 1])
        # Frames no segment covers (none in practice) are silence.
        ids = torch.full((frames,), self._index[self.silence], dtype=torch.long)
        for phone, start, end in segments:
            ids[start : end + 1] = self._index[phone]
        return torch.nn.functional.one_hot(ids, self.dim).float()  # (frames, D)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fingerprint": self.fingerprint, "model": str(self.model),
                "symbols": self.symbols}
