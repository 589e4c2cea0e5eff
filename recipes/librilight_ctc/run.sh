#!/usr/bin/env bash
# CTC fine-tuning of wav2vec 2.0 / HuBERT on Libri-light (fairseq's protocol) and S3-Router.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  compare           every method x seed: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=librilight
exp=exp/librilight_ctc
upstream=checkpoints/wav2vec_small.pt
upstream_help="the pretrained encoder (fairseq wav2vec_small.pt; HuBERT works too)"
methods="finetune router lora"
eval_splits="test_clean test_other"
prepare_options="subset=1h"
about="CTC fine-tuning of the encoder itself on Libri-light's limited-resource sets, as fairseq's wav2vec_ctc
(frozen conv front end, transformer frozen for the first 10k updates, span masking, tri-stage schedule), and
S3-Router's masks under the same protocol. Published (test-clean / test-other WER %, no LM): wav2vec 2.0
Base, 1 h: 24.5 / 29.7; S3-Router (wav2vec2-base 1 h): weight fine-tuning 19.0 / 26.3, masks 18.0 / 25.5."
root_help="librispeech_finetuning as extracted (1h/0-5, 9h), with LibriSpeech beside it"
root_name="the extracted librispeech_finetuning"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
