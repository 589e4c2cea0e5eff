"""Projected keys and values of every layer: prefixes (prefix tuning, deep prompts as their equivalent prefix) and
the decoding cache, which are one mechanism (entries prepended to a layer's attention)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerKV:
    """Keys and values of one attention layer, ``(B, H, S, head_dim)`` each, already projected."""

    key: Tensor
    value: Tensor

    def __len__(self) -> int:
        return self.key.shape[2]


@dataclass
class KVCache:
    """Projected keys/values of every layer for incremental decoding.

    A cache may start non-empty: prefix-tuning vectors and a prompt computed once per batch are simply its first
    entries. ``positions`` counts, per row, the *tokens* seen so far (prompts and prefixes have no positions), which
    is what positional embeddings need on the next step. ``key_padding`` remembers which cached keys were padding,
    so that later steps of a padded batch keep ignoring them.

    Without autograd (decoding and scoring run under ``no_grad``), each layer's keys/values live in a buffer with
    spare room and ``layers`` holds views of its filled part: a decoding step writes its one new position in place
    instead of copying the whole cache (``torch.cat`` made every step cost the cached length). With autograd
    enabled, entries are concatenated as before, since backward may still need the tensors a write would change.
    """

    layers: list[LayerKV | None] = field(default_factory=list)
    positions: Tensor | None = None  # (B,) long
    key_padding: Tensor | None = None  # (B, S) bool, True at padded cached keys
    # Per layer, the (B, H, capacity, hd) key and value buffers behind ``layers`` (None: not preallocated).
    _buffers: list[tuple[Tensor, Tensor] | None] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        first = self.layers[0] if self.layers else None
        return 0 if first is None else len(first)

    def update(self, idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values ``(B, H, T, hd)`` to layer ``idx`` and return everything cached so far."""
        while len(self.layers) <= idx:
            self.layers.append(None)
        while len(self._buffers) <= idx:
            self._buffers.append(None)
        old = self.layers[idx]
        if torch.is_grad_enabled():
            # Backward may need any cached view (even keys that need no gradient, to get the queries'), and writing
            # into its buffer would invalidate it: concatenate.
            if old is not None:
                key = torch.cat([old.key, key], dim=2)
                value = torch.cat([old.value, value], dim=2)
            self.layers[idx], self._buffers[idx] = LayerKV(key, value), None
            return key, value
        n, T = (0 if old is None else len(old)), key.shape[2]
        buf = self._buffers[idx]
        if buf is None or not _fills(buf, old) or buf[0].shape[2] < n + T or not _fits(buf, key, value):
            # Room for half as much again (at least 32 positions): a few regrowths over a long decoding.
            capacity = n + T + max((n + T) // 2, 32)
            B, H, _, hd = key.shape
            buf = (key.new_empty(B, H, capacity, hd), value.new_empty(B, H, capacity, value.shape[3]))
            if old is not None:
                buf[0][:, :, :n] = old.key
                buf[1][:, :, :n] = old.value
            self._buffers[idx] = buf
        buf[0][:, :, n : n + T] = key
        buf[1][:, :, n : n + T] = value
        self.layers[idx] = LayerKV(buf[0][:, :, : n + T], buf[1][:, :, : n + T])
        return self.layers[idx].key, self.layers[idx].value

    def index_select(self, rows: Tensor) -> KVCache:
        """Reorder/select batch rows (beam search). A preallocated layer keeps its spare room, so that the selected
        cache goes on writing in place; the original is left untouched."""
        layers: list[LayerKV | None] = []
        buffers: list[tuple[Tensor, Tensor] | None] = []
        for i, kv in enumerate(self.layers):
            buf = self._buffers[i] if i < len(self._buffers) else None
            if kv is not None and buf is not None and _fills(buf, kv):
                picked = (buf[0][rows], buf[1][rows])  # (B', H, capacity, hd): the filled part and the spare room
                layers.append(LayerKV(picked[0][:, :, : len(kv)], picked[1][:, :, : len(kv)]))
                buffers.append(picked)
            else:
                layers.append(None if kv is None else LayerKV(kv.key[rows], kv.value[rows]))
                buffers.append(None)
        return KVCache(
            layers,
            None if self.positions is None else self.positions[rows],
            None if self.key_padding is None else self.key_padding[rows],
            buffers,
        )


def _fills(buffers: tuple[Tensor, Tensor], kv: LayerKV | None) -> bool:
    """Whether ``kv`` is still the filled part of ``buffers`` (a caller may have replaced the layer's entry)."""
    return kv is not None and all(
        t.data_ptr() == b.data_ptr() and t.stride() == b.stride() and t.shape[:2] == b.shape[:2]
        for t, b in zip((kv.key, kv.value), buffers)
    )


def _fits(buffers: tuple[Tensor, Tensor], key: Tensor, value: Tensor) -> bool:
    """Whether new keys/values can be written into ``buffers`` (same rows, heads, width, dtype and device)."""
    return all(
        b.shape[:2] == t.shape[:2] and b.shape[3] == t.shape[3] and b.dtype == t.dtype and b.device == t.device
        for t, b in zip((key, value), buffers)
    )
