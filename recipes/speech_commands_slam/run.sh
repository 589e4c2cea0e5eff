#!/usr/bin/env bash
# Speech Commands v1 keyword spotting (12 classes) with SpeechPrompt on a TWIST/SLAM speech LM over mHuBERT-25Hz.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  prepare           mHuBERT-25Hz layer 11 -> its 500-unit k-means -> deduplicated unit files
#   stage 3  train             deep prompt + learnable verbalizer on the frozen speech LM, one run per seed
#   stage 4  evaluate          the best checkpoint of every seed on the test split
#
# Run from the repository root:
#   recipes/speech_commands_slam/run.sh --root /data/speech_commands_v0.01
# Checkpoints: see this folder's README (nothing is downloaded by the recipe).
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=recipes/TEMPLATE/common.sh
source "${recipe}/../TEMPLATE/common.sh"
need_dir() { [ -d "$1" ] || die "missing $2: $1"; }

stage=1
stop_stage=4
root=
hubert=checkpoints/mhubert-base-25hz
kmeans=checkpoints/mhubert_base_25hz_cp_mls_cv_sp_fisher_L11_km500.bin
ulm=checkpoints/slam_scaled
layer=11
config=${recipe}/conf/prompt_v2.yaml
exp=exp/speech_commands_slam
seeds="1 2 3"
nj=1
device=auto

usage() {
    cat <<USAGE
Usage: $0 --root DIR [options]

Speech Commands v1 keyword spotting (12 classes), SpeechPrompt v2 (deep prompt L=5 + learnable verbalizer) on a
speech LM of today: SLAM (Qwen2.5-0.5B) or TWIST (OPT-350M/1.3B, LLaMA-7B), all over mHuBERT-25Hz's 500 units.
No published number exists for this pairing; the GSLM recipe's are 95.16% (v1) and .946 (v2).

Options [default]:
  --root DIR         speech_commands_v0.01 as extracted [required by stage 1]
  --stage N          first stage to run [${stage}]
  --stop-stage N     last stage to run [${stop_stage}]
  --hubert DIR       mHuBERT-25Hz, the Hugging Face directory of slprl/mhubert-base-25hz [${hubert}]
  --kmeans FILE      its 500-unit k-means of layer 11 [${kmeans}]
  --ulm DIR          the speech LM: a slamkit directory (TWIST/SLAM) or an HF causal-LM directory [${ulm}]
  --layer N          mHuBERT layer the k-means was learned on [${layer}]
  --config FILE      training config [${config}]
  --exp DIR          where data, units and runs go [${exp}]
  --seeds "S ..."    training seeds [${seeds}]
  --nj N             parallel unit-extraction jobs per split [${nj}]
  --device DEV       auto, cpu, cuda or cuda:N [${device}]
  -h, --help         this message
USAGE
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=$2; shift 2 ;;
        --stage) stage=$2; shift 2 ;;
        --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
        --hubert) hubert=$2; shift 2 ;;
        --kmeans) kmeans=$2; shift 2 ;;
        --ulm) ulm=$2; shift 2 ;;
        --layer) layer=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --exp) exp=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --nj) nj=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

data=${exp}/data
units=${exp}/units
runs=${exp}/$(basename "${config}" .yaml)

if stage_on 1; then
    log "stage 1: manifests and labels from ${root:-<unset>}"
    [ -n "${root}" ] || die "--root is required for stage 1 (the extracted speech_commands_v0.01)"
    speechprompt prepare-dataset speech_commands --root "${root}" --out "${data}"
fi

if stage_on 2; then
    log "stage 2: mHuBERT-25Hz layer ${layer} units (deduplicated, as slamkit's tokeniser) of every split"
    need_dir "${hubert}" "the mHuBERT-25Hz directory (slprl/mhubert-base-25hz)"
    need_file "${kmeans}" "the mHuBERT-25Hz k-means (layer 11, 500 units)"
    for split in train dev test; do
        need_file "${data}/${split}.tsv" "the ${split} manifest (run stage 1)"
        args=(--manifest "${data}/${split}.tsv" --features hubert --checkpoint "${hubert}" --layer "${layer}"
              --kmeans "${kmeans}" --out "${units}" --dedup --device "${device}")
        if [ "${nj}" -le 1 ]; then
            speechprompt prepare "${args[@]}"
        else
            for ((rank = 0; rank < nj; rank++)); do
                speechprompt prepare "${args[@]}" --nshard "${nj}" --rank "${rank}" &
            done
            wait
            speechprompt prepare "${args[@]}" --nshard "${nj}" --merge
        fi
    done
fi

if stage_on 3; then
    log "stage 3: train ${config} on ${ulm} for seeds ${seeds}"
    need_dir "${ulm}" "the speech LM directory (config.json and weights)"
    train_per_seed 2
fi

if stage_on 4; then
    log "stage 4: evaluate every seed on test"
    need_file "${units}/test.units" "the test units (run stage 2)"
    evaluate_per_seed 3 test
    log "test metrics: ${runs}/seed*/test.metrics.json"
fi
