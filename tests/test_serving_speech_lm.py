"""Multi-task serving on the speech LMs: a mixed batch of prompt, prefix and adapter tasks on a GQA Qwen2 and on an
OPT with project_in/out returns, row by row, what each task returns alone."""

from __future__ import annotations

import pytest
import torch

from speechprompt.models.speech_lm import SpeechLM, SpeechLMConfig
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.serving import TaskBank
from speechprompt.tuning import AdapterConfig, PrefixConfig, PromptConfig, build_method

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="slamkit")
FAMILIES = {
    "qwen2_gqa": dict(family="qwen2", kv_heads=2, head_dim=8),
    "opt_project_in": dict(family="opt", norm="layer", norm_eps=1e-5, ffn="mlp", activation="relu", qkv_bias=True,
                           out_bias=True, ffn_bias=True, learned_pos=True, word_embed_dim=16, kv_heads=4, head_dim=8),
}
METHODS = {
    "deep3": PromptConfig(length=3, deep=True),
    "input4": PromptConfig(length=4, deep=False),
    "prefix2": PrefixConfig(length=2),
    "adapter": AdapterConfig(bottleneck=4),
}


def _model(family: str) -> SpeechLM:
    torch.manual_seed(0)
    cfg = SpeechLMConfig(vocab_size=42, embed_dim=32, ffn_dim=48, layers=2, heads=4, max_positions=64,
                         **FAMILIES[family])
    return SpeechLM(cfg, VOCAB).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_batch_equals_each_task_alone(family):
    model = _model(family)
    methods = {}
    for i, (name, cfg) in enumerate(METHODS.items()):
        method = build_method(cfg, model, attach=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in method.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        methods[name] = method
    bank = TaskBank(model)
    for name, method in methods.items():
        bank.add(name, method)
    names = list(methods) * 2
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(2, 42, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (len(names),),
                                                                                          generator=g)]
    for r in rows:
        r.insert(len(r) // 2, VOCAB.bos)  # the per-row separator vector is exercised
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), VOCAB.pad)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r)  # left padded
    mixed = bank.logits(tokens, names)
    for b, (name, row) in enumerate(zip(names, rows)):
        solo = _model(family)
        methods[name].attach(solo)
        with torch.no_grad():
            alone = solo(torch.tensor([row]), **methods[name].forward_kwargs(1))[0]
        methods[name].detach()
        torch.testing.assert_close(mixed[b, width - len(row):], alone, atol=1e-5, rtol=0, msg=f"{family} {name}")
