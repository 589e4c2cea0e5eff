"""fairseq's token dictionary (``dict.txt``), without fairseq: what unit LMs and HuBERT label sets index by."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from speechprompt.errors import CheckpointError
from speechprompt.fileio import write_text


class Dictionary:
    """fairseq's token dictionary: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, then ``dict.txt`` in order.

    For a GSLM unit dictionary (symbols "0".."99") unit ``u`` has id ``u + 4``.
    """

    def __init__(self, symbols: Iterable[str] = (), counts: Iterable[int] | None = None) -> None:
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = "<s>", "<pad>", "</s>", "<unk>"
        self.symbols: list[str] = [self.bos_word, self.pad_word, self.eos_word, self.unk_word]
        self.count: list[int] = [1, 1, 1, 1]
        self.indices: dict[str, int] = {s: i for i, s in enumerate(self.symbols)}
        self.nspecial = 4
        counts = list(counts) if counts is not None else None
        for i, sym in enumerate(symbols):
            self.add_symbol(sym, counts[i] if counts is not None else 1)

    bos_index, pad_index, eos_index, unk_index = 0, 1, 2, 3

    def add_symbol(self, symbol: str, count: int = 1, overwrite: bool = False) -> int:
        if symbol in self.indices and not overwrite:
            idx = self.indices[symbol]
            self.count[idx] += count
            return idx
        idx = len(self.symbols)
        self.indices[symbol] = idx
        self.symbols.append(symbol)
        self.count.append(count)
        return idx

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols

    def __getitem__(self, idx: int) -> str:
        return self.symbols[idx]

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.unk_index)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Dictionary:
        """Read ``dict.txt``: one ``symbol count [#fairseq:overwrite]`` per line."""
        d = cls()
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read dictionary ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            line = line.rstrip()
            if not line:
                continue
            overwrite = False
            if line.endswith(" #fairseq:overwrite"):
                overwrite = True
                line = line[: -len(" #fairseq:overwrite")]
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise CheckpointError(f"{path}:{n}: expected '<symbol> <count>', got {line!r}")
            sym, count = parts
            if sym in d.indices and not overwrite:
                raise CheckpointError(f"{path}:{n}: duplicate symbol {sym!r} (add '#fairseq:overwrite')")
            d.add_symbol(sym, int(count), overwrite=overwrite)
        return d

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, "".join(f"{s} {c}\n" for s, c in zip(self.symbols[self.nspecial:],
                                                            self.count[self.nspecial:])))

    @classmethod
    def for_units(cls, n_units: int) -> Dictionary:
        """The GSLM unit dictionary: symbols ``"0"`` .. ``str(n_units - 1)``."""
        return cls([str(u) for u in range(n_units)])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Dictionary:
        """Rebuild from the pickled state of a fairseq ``Dictionary`` (its ``symbols`` and ``count`` lists), as the
        safe unpickler of :mod:`speechprompt.fairseq_compat` records it."""
        symbols, counts = list(state.get("symbols", [])), list(state.get("count", []))
        d = cls()
        d.symbols, d.count = symbols, counts or [1] * len(symbols)
        d.indices = {s: i for i, s in enumerate(symbols)}
        d.nspecial = int(state.get("nspecial", 4))
        for attr in ("bos_word", "pad_word", "eos_word", "unk_word"):
            if attr in state:
                setattr(d, attr, state[attr])
        for attr in ("bos_index", "pad_index", "eos_index", "unk_index"):
            if attr in state:
                setattr(d, attr, int(state[attr]))
        return d

    def encode_line(self, line: str, append_eos: bool = True) -> torch.Tensor:
        """Space-separated symbols to ids (``<unk>`` for unknown ones), with ``</s>`` appended by default."""
        ids = [self.index(tok) for tok in line.split()]
        if append_eos:
            ids.append(self.eos_index)
        return torch.tensor(ids, dtype=torch.long)

    def encode_units(self, units: Sequence[int], append_eos: bool = False) -> torch.Tensor:
        """Unit ids (ints) to token ids. Raises for a unit that the dictionary does not hold."""
        ids = []
        for u in units:
            idx = self.indices.get(str(int(u)))
            if idx is None:
                raise CheckpointError(f"unit {u} is not in the dictionary ({len(self) - self.nspecial} symbols)")
            ids.append(idx)
        if append_eos:
            ids.append(self.eos_index)
        return torch.tensor(ids, dtype=torch.long)

    def string(self, ids: Iterable[int], strip_special: bool = True) -> str:
        """Token ids back to a space-separated string (special symbols dropped by default)."""
        out = []
        for i in ids:
            i = int(i)
            if strip_special and i < self.nspecial:
                continue
            out.append(self.symbols[i])
        return " ".join(out)
