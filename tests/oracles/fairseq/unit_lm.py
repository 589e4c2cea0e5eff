"""fairseq's transformer_lm, the oracle of tests/models/test_unit_lm.py and tests/test_score.py.

Params (JSON):
    tokens: ``{INPUT: (B, T) nested lists of token ids}``: the batches every model scores (``"padded"`` ones use
        fairseq's pad index, 1).
    build: ``{NAME: spec}``, LMs fairseq builds, randomises and saves; each spec with
        n_units: the number of units of its dictionary (+ 4 special symbols);
        cfg: fields of ``TransformerLanguageModelConfig`` (the model is built with ``TransformerLanguageModel.
            build_model``); or
        legacy_args: the ``argparse`` args of a legacy checkpoint, e.g. ``{"arch": "transformer_lm_big", ...}``:
            fairseq's arch function fills in the rest, the model is built from the result, and the checkpoint stores
            ``args`` as given (no ``cfg``), as checkpoints of fairseq < 0.10 do;
        interpolate_max_positions: save ``cfg.model.max_target_positions`` as ``${task.max_target_positions}``,
            the interpolation fairseq leaves in a saved config.
    cli: ``{NAME: {"n_units": N, "argv": [...]}}``: LMs built as ``fairseq-train`` builds them from its command line
        (``fairseq-train DATA --task language_modeling ARGV``: ``options.parse_args_and_arch``, the namespace turned
        into the omegaconf config, ``tasks.setup_task`` and ``task.build_model``), randomised and saved with the
        config the trainer writes (``OmegaConf.to_container(cfg, resolve=True)``). Their references add
        ``"model_cfg"`` (the saved ``cfg["model"]``), ``"keys"`` (the state-dict keys) and ``"incremental"``: the
        logits of fairseq's incremental decoding (``incremental_state``), one token at a time.
    load: ``{NAME: checkpoint path}``: LMs fairseq loads with ``checkpoint_utils.load_model_ensemble_and_task``
        (strict), their ``dict.txt`` beside them.
    score: ``{NAME: [lines of space-separated units]}``, for loaded models: fairseq's ``SequenceScorer`` on each
        line, conditioned on ``</s>`` as ``eval_lm`` does.

Writes, for each NAME:
    NAME/checkpoint_best.pt and NAME/dict.txt (built models): the checkpoint as fairseq's trainer saves it
        (``torch_persistent_save``, cfg as a plain dict, a trainer's ``extra_state`` with numpy values);
    NAME.ref.pt: ``{"logits": {INPUT: (B, T, V)}, "vocab": dictionary size, "pad": pad index, "versions",
        "resolved_args": the legacy args after the arch function, "scores": [{"tokens": n, "logprob": float,
        "positional_scores": (n,)}]}`` (the last two when asked).
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import numpy_training_state, setup, versions
from fairseq import checkpoint_utils, options, tasks
from fairseq.checkpoint_utils import torch_persistent_save
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from fairseq.sequence_scorer import SequenceScorer
from omegaconf import OmegaConf

DEFAULTS = dict(add_bos_token=False, tokens_per_sample=64, max_target_positions=64, tpu=False)
# What defines the architecture, taken from legacy args once the arch function has filled them in.
DEFINING = ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
            "decoder_normalize_before", "no_decoder_final_norm", "share_decoder_input_output_embed",
            "decoder_learned_pos", "no_scale_embedding", "activation_fn")


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (fairseq initialises biases and LayerNorms to constants)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def build(n_units: int, fields: dict) -> tuple[TransformerLanguageModel, Dictionary, dict]:
    d = Dictionary()
    for u in range(n_units):
        d.add_symbol(str(u))

    class Task:
        source_dictionary = target_dictionary = d

    cfg = OmegaConf.structured(TransformerLanguageModelConfig(**{**DEFAULTS, **fields}))
    torch.manual_seed(0)
    model = TransformerLanguageModel.build_model(cfg, Task()).eval()
    randomize(model)
    return model, d, OmegaConf.to_container(cfg, enum_to_str=True)


def logits(model, batches: dict) -> dict:
    with torch.no_grad():
        return {name: model(torch.tensor(tokens))[0] for name, tokens in batches.items()}


def build_and_save(spec: dict, directory, batches: dict) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "checkpoint_best.pt"
    ref: dict = {}
    if "legacy_args" in spec:
        args = argparse.Namespace(**spec["legacy_args"])
        saved = copy.deepcopy(args)
        ARCH_CONFIG_REGISTRY[args.arch](args)
        ref["resolved_args"] = {k: getattr(args, k) for k in DEFINING}
        model, d, _ = build(spec["n_units"], dict(ref["resolved_args"], decoder_input_dim=args.decoder_embed_dim,
                                                  decoder_output_dim=args.decoder_embed_dim))
        state = {"args": saved, "model": model.state_dict(), "extra_state": numpy_training_state()}
    else:
        fields = dict(spec["cfg"])
        model, d, model_cfg = build(spec["n_units"], fields)
        if spec.get("interpolate_max_positions"):
            model_cfg["max_target_positions"] = "${task.max_target_positions}"  # as fairseq saves an interpolation
        task = {"_name": "language_modeling", "data": str(directory), "tokens_per_sample": 64,
                "max_target_positions": 64}
        state = {"args": None, "cfg": {"model": model_cfg, "task": task}, "model": model.state_dict(),
                 "optimizer_history": [], "extra_state": numpy_training_state()}
    torch_persistent_save(state, str(path))
    d.save(str(directory / "dict.txt"))
    return {**ref, "logits": logits(model, batches), "vocab": len(d), "pad": d.pad()}


def build_like_the_cli(spec: dict, directory, batches: dict) -> dict:
    """The model and saved checkpoint of ``fairseq-train DIR --task language_modeling ARGV`` before its first
    update (randomised so that every weight matters)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = Dictionary()
    for u in range(spec["n_units"]):
        d.add_symbol(str(u))
    d.save(str(directory / "dict.txt"))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(directory), "--task", "language_modeling", *spec["argv"]])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    randomize(model)
    saved_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # what Trainer.state_dict stores
    state = {"args": None, "cfg": saved_cfg, "model": model.state_dict(), "criterion": None,
             "optimizer_history": [], "task_state": {}, "extra_state": numpy_training_state()}
    torch_persistent_save(state, str(directory / "checkpoint_best.pt"))
    return {"logits": logits(model, batches), "incremental": incremental_logits(model, batches),
            "model_cfg": saved_cfg["model"], "keys": sorted(model.state_dict()), "vocab": len(d), "pad": d.pad()}


def incremental_logits(model, batches: dict) -> dict:
    """fairseq's cached decoding: each step feeds the prefix and ``incremental_state`` keeps the past keys/values
    (so only the last token is computed); the step logits stacked as ``(B, T, V)``."""
    out = {}
    with torch.no_grad():
        for name, tokens in batches.items():
            tokens, state, steps = torch.tensor(tokens), {}, []
            for t in range(tokens.shape[1]):
                steps.append(model(tokens[:, : t + 1], incremental_state=state)[0][:, -1])
            out[name] = torch.stack(steps, dim=1)
    return out


def score(model, d: Dictionary, lines: list[str]) -> list[dict]:
    scorer = SequenceScorer(d)
    out = []
    for line in lines:
        ids = [d.index(u) for u in line.split()] + [d.eos()]
        src = torch.tensor([[d.eos(), *ids[:-1]]])
        sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(ids)])},
                  "target": torch.tensor([ids])}
        with torch.no_grad():
            hypo = scorer.generate([model], sample)[0][0]
        out.append({"tokens": len(ids), "logprob": float(hypo["positional_scores"].sum()),
                    "positional_scores": hypo["positional_scores"]})
    return out


def main() -> None:
    out, params = setup()
    batches = params.get("tokens", {})
    for name, spec in params.get("build", {}).items():
        ref = build_and_save(spec, out / name, batches)
        torch.save({**ref, "versions": versions()}, out / f"{name}.ref.pt")
    for name, spec in params.get("cli", {}).items():
        ref = build_like_the_cli(spec, out / name, batches)
        torch.save({**ref, "versions": versions()}, out / f"{name}.ref.pt")
    for name, path in params.get("load", {}).items():
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], strict=True)
        model, d = models[0].eval(), task.source_dictionary
        ref = {"logits": logits(model, batches), "vocab": len(d), "pad": d.pad(), "versions": versions()}
        if name in params.get("score", {}):
            ref["scores"] = score(model, task.target_dictionary, params["score"][name])
        torch.save(ref, out / f"{name}.ref.pt")


if __name__ == "__main__":
    main()
