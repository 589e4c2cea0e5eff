"""fairseq's TokenBlockDataset, the oracle of tests/test_lm_data.py.

Params (JSON):
    sentences: lists of token ids, each ending with its ``</s>``;
    tokens_per_sample: the block sizes to cut the stream into;
    pad, eos: the special indices.

Writes ``blocks.pt``: ``{str(tokens_per_sample): {"source": [blocks], "target": [blocks]}}``, the
``TokenBlockDataset(break_mode="none", include_targets=True)`` items in order (their past targets are not used).
"""

from __future__ import annotations

import torch
from common import setup
from fairseq.data import TokenBlockDataset


def main() -> None:
    out, params = setup()
    sentences = [torch.tensor(s) for s in params["sentences"]]
    blocks = {}
    for size in params["tokens_per_sample"]:
        dataset = TokenBlockDataset(sentences, [len(s) for s in sentences], size, pad=params["pad"],
                                    eos=params["eos"], break_mode="none", include_targets=True)
        items = [dataset[i] for i in range(len(dataset))]
        blocks[str(size)] = {"source": [source for source, _, _ in items], "target": [target for _, target, _ in items]}
    torch.save(blocks, out / "blocks.pt")


if __name__ == "__main__":
    main()
