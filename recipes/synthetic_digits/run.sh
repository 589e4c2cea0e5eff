#!/usr/bin/env bash
# Spoken digit strings (3-7 digits, the words as target) recognised on the embedded synthetic corpus, end to end on
# a CPU: no dataset, no pretrained weights. A sequence task: the prompted unit LM writes the digit words.
#
#   stages 1-3  synth sentences, k-means, pretrain a small unit LM   (shared base, --base-dir)
#   stage 4     synth --task digits   the task corpus: test on unseen voices, test_synth on an unseen engine
#   stages 5-7  prepare, train (prompt tuning, one run per seed), evaluate on test and test_synth
#
# Stages 1-3 write to --base-dir, which synthetic_intent shares: after one of the two has run them, start the
# other at --stage 4. Run from the repository root:
#   recipes/synthetic_digits/run.sh
# The stages and options are those of every synthetic recipe: recipes/TEMPLATE/synthetic_task.sh.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
task=digits
config=${recipe}/conf/prompt.yaml
exp=exp/synthetic_digits
shared_with=synthetic_intent
about="Spoken digit strings (3-7 digits) on the embedded synthetic corpus with SpeechPrompt: the prompted unit LM writes
the digit words; word error rate on unseen voices (test) and an unseen synthesizer (test_synth)."
config_help="training config"
per_class_help="training utterances per digit-string length"

source "${recipe}/../TEMPLATE/synthetic_task.sh" "$@"
