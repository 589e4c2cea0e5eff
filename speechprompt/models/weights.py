"""Loading a state dict into a model exactly: every key present, nothing extra, every shape right, or one clear error.

Shared by every loader of pretrained weights (fairseq checkpoints, Hugging Face directories), so that a checkpoint
that does not fit the architecture its config describes is always refused the same way, naming the file and the
keys, instead of loading half of it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from speechprompt.errors import CheckpointError


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_problems(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """What keeps ``state`` from loading into ``model`` with ``strict=True``: missing, unexpected, wrong shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong_shape:
        problems.append("wrong shapes: " + _listed(
            [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]))
    return problems


def load_exact(model: nn.Module, state: Mapping[str, Tensor], source: object, what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after checking keys and shapes.

    Args:
        source: the file or directory the weights came from (named in the error).
        what: the architecture, as the error should name it ("the HuBERT architecture its config describes").

    Raises:
        CheckpointError: one line naming ``source``, ``what`` and the offending keys.
    """
    problems = state_dict_problems(model, state)
    if problems:
        raise CheckpointError(f"{source}: does not match {what}; " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=True)
