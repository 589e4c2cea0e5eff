"""Sequence generation on the frozen unit LM: ASR-like text and slot filling through the sentencepiece verbalizer.

The target of an utterance is its transcript's sentencepiece pieces, each one unit token, then ``</s>``. Decoding
is batched greedy or beam search on the KV cache, restricted to the tokens that are pieces (and ``</s>``), and
the decoded pieces become text again. Metrics are WER and CER, plus SUPERB's slot-type F1 and slot-value CER when
the transcripts carry slot tags (``B-<type> value E-<type>``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from speechprompt.models.generation import beam_search, greedy
from speechprompt.models.unit_vocab import model_vocab
from speechprompt.tasks import metrics as M
from speechprompt.tasks.data import Batch, lm_logits, lm_loss, mean_loss
from speechprompt.verbalizers import SequenceVerbalizer
from speechprompt.verbalizers.sequence import normalize_text

_SLOT_TAG = re.compile(r"(^|\s)B-\S+")


class SequenceTask:
    """Text generation after ``<s>``.

    Args:
        model: The frozen unit LM (with the method attached).
        method: The tuning method.
        verbalizer: The sentencepiece verbalizer.
        beam_size: 1 decodes greedily, more runs beam search.
        max_new_tokens: Longest output in tokens (``</s>`` included).
        length_penalty: Beam search score normalisation exponent (0 disables it).
    """

    default_metric = "wer"
    head: nn.Module | None = None
    labels: list[str] = []
    slot_separator = None

    def __init__(
        self,
        model: nn.Module,
        method: nn.Module,
        verbalizer: SequenceVerbalizer,
        beam_size: int = 1,
        max_new_tokens: int = 200,
        length_penalty: float = 1.0,
    ) -> None:
        self.model, self.method, self.verbalizer = model, method, verbalizer
        self.beam_size, self.max_new_tokens, self.length_penalty = beam_size, max_new_tokens, length_penalty
        self.decoder = "greedy" if beam_size == 1 else f"beam{beam_size}"
        self.decoders = (self.decoder,)
        self.default_metric = f"{self.decoder}.wer"
        # Only pieces and </s> may be emitted: a special or unassigned unit would decode to nothing.
        self.eos = model_vocab(model).eos
        self.allowed = sorted({verbalizer.vocab.token(u) for _, u in verbalizer.pieces()} | {self.eos})

    def loss(self, batch: Batch) -> tuple[Tensor, int]:
        return lm_loss(lm_logits(self.model, self.method, batch.tokens), batch.targets)

    @torch.no_grad()
    def generate(self, prefix: Tensor) -> Tensor:
        """``(B, N)`` generated token ids after each left-padded ``u1..uN <s>`` prefix (``<pad>`` after ``</s>``)."""
        kwargs = self.method.forward_kwargs(prefix.size(0))
        if self.beam_size == 1:
            return greedy(self.model, prefix, self.max_new_tokens, self.eos, model_kwargs=kwargs,
                          allowed_tokens=self.allowed)
        return beam_search(self.model, prefix, self.max_new_tokens, self.eos, beam_size=self.beam_size,
                           length_penalty=self.length_penalty, model_kwargs=kwargs, allowed_tokens=self.allowed)

    def predict(self, batch: Batch) -> dict[str, list[str]]:
        return {self.decoder: [self.verbalizer.decode(row) for row in self.generate(batch.prefix).tolist()]}

    @torch.no_grad()
    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]:
        """Two passes: free decoding shares nothing with the teacher-forced loss beyond the prefix."""
        return self.predict(batch), mean_loss(self.loss(batch))

    def metrics(self, refs: Sequence[str], preds: dict[str, list[str]]) -> dict[str, float]:
        refs = [normalize_text(r) for r in refs]
        slots = any(_SLOT_TAG.search(r) for r in refs)
        out: dict[str, float] = {}
        for decoder, hyps in preds.items():
            out[f"{decoder}.wer"] = M.wer(refs, hyps)
            out[f"{decoder}.cer"] = M.cer(refs, hyps)
            if slots:
                out[f"{decoder}.slot_type_f1"] = M.slot_type_f1(refs, hyps)
                out[f"{decoder}.slot_value_cer"] = M.slot_value_cer(refs, hyps)
        return out

    def confusion(self, refs: Sequence[str], hyps: Sequence[str]) -> None:
        """Sequence tasks have no confusion matrix."""
        return None
