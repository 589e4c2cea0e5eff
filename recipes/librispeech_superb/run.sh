#!/usr/bin/env bash
# SUPERB ASR: LibriSpeech-100 character CTC with s3prl's BiLSTM head on HuBERT-base.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  compare           every method x seed: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=librispeech
exp=exp/librispeech_superb
upstream=checkpoints/hubert_base_ls960.pt
upstream_help="the HuBERT-base checkpoint (fairseq hubert_base_ls960.pt; any encoder
                     load_encoder reads)"
methods="superb finetune adapter lora prefix bitfit"
about="SUPERB ASR (train-clean-100, dev-clean, test-clean): s3prl's 2-layer BiLSTM + character CTC head, greedy
decoding. Published (test-clean WER %, no LM): SUPERB HuBERT-base 6.42."
root_help="the LibriSpeech folder (train-clean-100, dev-clean, test-clean)"
root_name="the LibriSpeech folder"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
