#!/usr/bin/env bash
# SUPERB SID: VoxCeleb1 speaker identification on HuBERT-base.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  compare           every method x seed: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=voxceleb1
exp=exp/voxceleb1_superb
upstream=checkpoints/hubert_base_ls960.pt
upstream_help="the HuBERT-base checkpoint (fairseq hubert_base_ls960.pt; any encoder
                     load_encoder reads)"
methods="superb finetune adapter lora prefix bitfit"
about="SUPERB speaker identification (VoxCeleb1, 1,251 speakers, iden_split.txt) with s3prl's head.
Published (test accuracy %): SUPERB HuBERT-base 81.42."
root_help="VoxCeleb1 with iden_split.txt and the dev/ and test/ archives' wav/ folders"
root_name="the VoxCeleb1 folder"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
