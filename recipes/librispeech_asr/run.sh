#!/usr/bin/env bash
# LibriSpeech ASR (train-clean-100) with SpeechPrompt on the GSLM unit LM: the prompt makes it write text.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  prepare           HuBERT-base layer 6 -> official km.bin (100 units) -> deduplicated unit files
#   stage 3  train             deep prompt tuning of the frozen unit LM, one run per seed
#   stage 4  evaluate          the best checkpoint of every seed on the test split
#
# Run from the repository root:
#   recipes/librispeech_asr/run.sh --root /data/LibriSpeech
# Every path may be relative to the working directory. The GSLM files are the official ones (see checkpoints/).
# The stages and options are those of every public-dataset recipe: recipes/TEMPLATE/prompt_task.sh.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=librispeech
config=${recipe}/conf/prompt.yaml
exp=exp/librispeech_asr
prepare_options=""
about="LibriSpeech ASR (train-clean-100, dev-clean, test-clean) with SpeechPrompt.
Published: 34.17% WER on test-clean with 4.5M trainable parameters (SpeechPrompt v1)."
root_help="the LibriSpeech folder (train-clean-100/, dev-clean/, test-clean/)"
root_name="the LibriSpeech folder"

source "${recipe}/../TEMPLATE/prompt_task.sh" "$@"
