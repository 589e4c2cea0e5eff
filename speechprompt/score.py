"""Score unit sequences with a unit LM: one JSON line per input line.

Each input line holds space-separated unit ids. The output line is {"logprob": L, "tokens": N}: L is the summed
natural-log probability of the units and the closing </s>, with the sequence preceded by </s> (as fairseq's
eval_lm conditions it, and as ZeroSpeech sWUGGY/sBLIMP scoring needs); N counts the scored tokens (units + </s>).
The checkpoint is a fairseq or a speechprompt unit LM; its dict.txt sits beside it unless --dict says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from speechprompt.devices import resolve_device
from speechprompt.dictionary import Dictionary
from speechprompt.errors import SpeechPromptError
from speechprompt.models.generation import sequence_logprob
from speechprompt.models.hf_decoders import load_speech_lm
from speechprompt.models.unit_lm import UnitLM, load_unit_lm
from speechprompt.models.unit_vocab import UnitVocab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="unit LM: a fairseq checkpoint, or a slamkit (TWIST/SLAM) or HF causal-LM directory")
    parser.add_argument("--units", required=True, type=Path, help="file of unit sequences, one per line")
    parser.add_argument("--dict", type=Path, default=None,
                        help="the LM's dict.txt; None: the one beside --checkpoint (fairseq checkpoints only)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--device", default="auto", help="torch device, or 'auto' for cuda when available")


def read_unit_lines(path: Path, dictionary: Dictionary) -> list[list[int]]:
    """Token ids of every line of ``path`` (no </s> added). Unknown units raise with the line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SpeechPromptError(f"{path}: cannot read units ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SpeechPromptError(f"{path}: not a UTF-8 text file of units") from None
    n_units = len(dictionary) - dictionary.nspecial
    out = []
    for n, line in enumerate(lines, 1):
        ids = []
        for unit in line.split():
            idx = dictionary.indices.get(unit)
            if idx is None or idx < dictionary.nspecial:
                raise SpeechPromptError(
                    f"{path}:{n}: unit {unit!r} is not in the LM's dictionary ({n_units} units)"
                )
            ids.append(idx)
        out.append(ids)
    return out


def read_unit_ids(path: Path, vocab: UnitVocab) -> list[list[int]]:
    """Token ids of every line of ``path`` in the LM's unit layout (no </s> added); a unit the LM does not have
    raises with the line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SpeechPromptError(f"{path}: cannot read units ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SpeechPromptError(f"{path}: not a UTF-8 text file of units") from None
    out = []
    for n, line in enumerate(lines, 1):
        try:
            units = [int(u) for u in line.split()]
        except ValueError:
            raise SpeechPromptError(f"{path}:{n}: expected space-separated unit ids, got {line[:60]!r}") from None
        vocab.check_units(units, f"{path}:{n}")
        out.append([vocab.token(u) for u in units])
    return out


@torch.inference_mode()
def score_sequences(model: UnitLM, sequences: list[list[int]], eos: int, batch_size: int = 32) -> list[dict]:
    """``{"logprob", "tokens"}`` of each sequence of token ids, in order, scoring ``ids + [eos]`` after ``eos``.

    Sequences are batched by length (right-padded), so that padding costs little.
    """
    device = next(model.parameters()).device
    results: list[dict] = [{}] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        T = len(sequences[rows[0]]) + 2
        tokens = torch.full((len(rows), T), model.padding_idx, dtype=torch.long)
        for r, i in enumerate(rows):
            seq = [eos, *sequences[i], eos]
            tokens[r, : len(seq)] = torch.tensor(seq)
        logprob = sequence_logprob(model, tokens.to(device)).cpu()
        for r, i in enumerate(rows):
            results[i] = {"logprob": float(logprob[r]), "tokens": len(sequences[i]) + 1}
    return results


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SpeechPromptError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    if args.checkpoint.is_dir():
        if args.dict is not None:
            raise SpeechPromptError(f"--dict applies to fairseq checkpoints; {args.checkpoint} is a directory whose "
                                    "unit layout comes from its own files")
        model, vocab = load_speech_lm(args.checkpoint)
        sequences, eos = read_unit_ids(args.units, vocab), vocab.eos
    else:
        model, dictionary = load_unit_lm(args.checkpoint, args.dict)
        sequences, eos = read_unit_lines(args.units, dictionary), dictionary.eos_index
    if model.cfg.learned_pos:
        for n, seq in enumerate(sequences, 1):
            if len(seq) + 2 > model.cfg.max_positions:
                raise SpeechPromptError(f"{args.units}:{n}: {len(seq)} units exceed the LM's "
                                        f"{model.cfg.max_positions} positions")
    model.to(device)
    for result in score_sequences(model, sequences, eos, args.batch_size):
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
