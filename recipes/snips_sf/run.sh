#!/usr/bin/env bash
# Audio SNIPS slot filling (SUPERB SF) with SpeechPrompt on the GSLM unit LM: text with B-/E- slot tags.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  prepare           HuBERT-base layer 6 -> official km.bin (100 units) -> deduplicated unit files
#   stage 3  train             deep prompt tuning of the frozen unit LM, one run per seed
#   stage 4  evaluate          the best checkpoint of every seed on the test split
#
# Run from the repository root:
#   recipes/snips_sf/run.sh --root /data/SNIPS
# Every path may be relative to the working directory. The GSLM files are the official ones (see checkpoints/).
# The stages and options are those of every public-dataset recipe: recipes/TEMPLATE/prompt_task.sh.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=snips
config=${recipe}/conf/prompt.yaml
exp=exp/snips_sf
prepare_options="lowercase=true"
about="Audio SNIPS slot filling (SUPERB SF format) with SpeechPrompt.
Published: slot-type F1 66.90 with 4.5M trainable parameters (SpeechPrompt v1)."
root_help="the SNIPS folder of s3prl's preprocessing
                     (all.iob.snips.txt, train/ valid/ test/)"
root_name="the SNIPS folder (all.iob.snips.txt, train/, valid/, test/)"

source "${recipe}/../TEMPLATE/prompt_task.sh" "$@"
