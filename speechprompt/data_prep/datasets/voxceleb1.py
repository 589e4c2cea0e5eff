"""VoxCeleb1 speaker identification (SUPERB SID): 1,251 speakers, the official identification split.

``iden_split.txt`` (s3prl ships the same file as ``veri_test_class.txt``) has one line per utterance,
``<set> <speaker>/<video>/<utterance>.wav``, where set 1 is train, 2 dev and 3 test; every speaker appears in all
three. The audio is the two archives as extracted, ``vox1_dev_wav`` and ``vox1_test_wav``, each with a ``wav/``
folder of ``<speaker>/<video>/<utterance>.wav``; a listed file is looked up under every ``ROOT/*/wav/`` (s3prl's
rule) and ``ROOT/wav/``. The label is the speaker id (``id10001``).

A listed file that is found nowhere is reported and left out (``summary.json``); audio that the split file does not
list is counted there too, and not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from speechprompt.config import option
from speechprompt.data_prep.datasets.base import DatasetError, Item, Listing, register_dataset, require_file

NAME = "voxceleb1"
SPLIT_OF_SET = {"1": "train", "2": "dev", "3": "test"}

LAYOUT = """\
  ROOT/                       VoxCeleb1 as extracted
    iden_split.txt            '<1|2|3> <speaker>/<video>/<utterance>.wav' per line (1 train, 2 dev, 3 test)
    dev/wav/<speaker>/<video>/<utterance>.wav    (vox1_dev_wav; any folder name: ROOT/*/wav/ is searched)
    test/wav/<speaker>/<video>/<utterance>.wav   (vox1_test_wav)
    or wav/<speaker>/<video>/<utterance>.wav     (both archives extracted into one folder)"""


@dataclass
class VoxCeleb1Options:
    """Options of the VoxCeleb1 identification preparer."""

    split_file: str = option("iden_split.txt", help="the identification split list, relative to ROOT or absolute "
                             "(s3prl's veri_test_class.txt is the same file)")


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """``(split, relative path)`` per line of ``iden_split.txt``; a malformed line is an error naming it."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in SPLIT_OF_SET or len(Path(parts[1]).parts) != 3:
            raise DatasetError(f"{NAME}: {path}:{n}: expected '<1|2|3> <speaker>/<video>/<utterance>.wav', got "
                               f"{line.strip()!r}")
        out.append((SPLIT_OF_SET[parts[0]], parts[1]))
    if not out:
        raise DatasetError(f"{NAME}: {path} lists no utterance")
    return out


def _wav_roots(root: Path) -> list[Path]:
    roots = sorted(p for p in root.glob("*/wav") if p.is_dir())
    if (root / "wav").is_dir():
        roots.insert(0, root / "wav")
    return roots


@register_dataset(NAME, VoxCeleb1Options, LAYOUT, task="classification")
def build(root: Path, out: Path, opts: VoxCeleb1Options) -> Listing:
    """VoxCeleb1 speaker identification (1,251 speakers) on the official iden_split.txt, as SUPERB SID."""
    split_file = Path(opts.split_file) if Path(opts.split_file).is_absolute() else root / opts.split_file
    rows = read_split_file(require_file(split_file, NAME, "the identification split"))
    wav_roots = _wav_roots(root)
    if not wav_roots:
        raise DatasetError(f"{NAME}: no wav/ folder under {root} (nor under {root}/*/). Expected layout:\n{LAYOUT}")
    on_disk = {p.relative_to(r).as_posix(): p for r in reversed(wav_roots) for p in r.glob("*/*/*.wav")}
    splits: dict[str, list[Item]] = {"train": [], "dev": [], "test": []}
    for split, rel in rows:
        # A file found nowhere keeps its first candidate path: write_split reports it as missing.
        path = on_disk.get(rel, wav_roots[0] / rel)
        splits[split].append(Item(path, Path(rel).parts[0]))
    unlisted = len(set(on_disk) - {rel for _, rel in rows})
    return Listing(splits, {"split_file": str(split_file), "wav_folders": [str(r) for r in wav_roots],
                            "speakers": len({Path(rel).parts[0] for _, rel in rows}),
                            "unlisted_audio_files": unlisted})
