#!/usr/bin/env bash
# HuBERT pretraining in two iterations, as published (Hsu et al., 2021), on any manifest:
#
#   stage 0  synth --task sentences   only without --train: a synthetic corpus to pretrain on (CPU demo)
#   stage 1  kmeans                   K1 clusters of MFCC frames of the training audio
#   stage 2  prepare                  train and dev MFCC units, one per 10 ms frame (no dedup): 100 Hz labels
#   stage 3  pretrain-hubert          iteration 1: masked prediction of the MFCC units (label_rate 100)
#   stage 4  kmeans                   K2 clusters of layer --layer of the iteration-1 model
#   stage 5  prepare                  train and dev units of that layer, one per 20 ms frame: 50 Hz labels
#   stage 6  pretrain-hubert          iteration 2: masked prediction of the iteration-1 units (label_rate 50)
#
# The result is ${exp}/it2/checkpoint_best.pt, a fairseq-format HuBERT (an fbank-front-end one loads in speechprompt
# only); its units are what `prepare --features hubert --checkpoint ... --layer L` gives. Stages are resumable:
# a finished k-means or unit file is not redone, and pretraining resumes where it stopped.
# Run from the repository root:
#   recipes/pretrain_hubert/run.sh                                        # synthetic sentences, CPU config
#   recipes/pretrain_hubert/run.sh --train data/train.tsv --dev data/valid.tsv \
#       --config recipes/pretrain_hubert/conf/base.yaml --nj 8 --k2 500 --layer 6
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
stage=0
stop_stage=6
train=
dev=
config=${recipe}/conf/small.yaml
exp=exp/pretrain_hubert
sentences=2000
k1=100
features1=mfcc
km1=
k2=100
layer=3
percent=1.0
steps1=
steps2=
nj=1
device=auto
seed=0
options=""

usage() {
    cat <<USAGE
Usage: $0 [options]

Pretrains a HuBERT in two iterations: masked prediction of MFCC k-means units, then of the k-means units of a layer
of the first model. Without --train, a synthetic sentences corpus is made first (a CPU demo).

Options [default]:
  --stage N          first stage to run [${stage}]
  --stop-stage N     last stage to run [${stop_stage}]
  --train TSV        training manifest (empty: stage 0 synthesizes ${exp}/data/train.tsv) [${train:-synthetic}]
  --dev TSV          dev manifest [${dev:-synthetic}]
  --config FILE      pretrain-hubert config of both iterations [${config}]
  --exp DIR          where units and runs go [${exp}]
  --sentences N      synthetic training sentences (stage 0) [${sentences}]
  --k1 N             clusters of the MFCC units (iteration 1 targets) [${k1}]
  --features1 NAME   features of the iteration-1 targets: mfcc (HuBERT's), mfcc_cmn (minus the utterance
                     mean), or phones (a recognizer's, with --km1 its identity quantizer) [${features1}]
  --km1 FILE         an existing k-means of --features1 frames for the iteration-1 targets; stage 1 is then
                     skipped (the demo passes the one it has learned already) [${km1:-learned at stage 1}]
  --k2 N             clusters of the layer units (iteration 2 targets; HuBERT: 500) [${k2}]
  --layer L          1-based layer of the iteration-1 model clustered for iteration 2 (HuBERT base: 6) [${layer}]
  --percent P        fraction of the training utterances k-means learns from [${percent}]
  --steps1 N         updates of iteration 1 (empty: the config's max_steps) [${steps1:-config}]
  --steps2 N         updates of iteration 2 (empty: the config's max_steps) [${steps2:-config}]
  --nj N             unit-extraction shards at once, and pretraining processes (torchrun; each takes the
                     config's batch_size, so an update grows with N) [${nj}]
  --device DEV       auto, cpu, cuda or cuda:N [${device}]
  --seed S           seed of the synthetic corpus and of k-means [${seed}]
  --options "KEY=VALUE ..."
                     overrides of the config for both iterations, e.g. "batch_size=4" [${options:-none}]
  -h, --help         this message
USAGE
}

while [ $# -gt 0 ]; do
    case "$1" in
        --stage) stage=$2; shift 2 ;;
        --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
        --train) train=$2; shift 2 ;;
        --dev) dev=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --exp) exp=$2; shift 2 ;;
        --sentences) sentences=$2; shift 2 ;;
        --k1) k1=$2; shift 2 ;;
        --features1) features1=$2; shift 2 ;;
        --km1) km1=$2; shift 2 ;;
        --k2) k2=$2; shift 2 ;;
        --layer) layer=$2; shift 2 ;;
        --percent) percent=$2; shift 2 ;;
        --steps1) steps1=$2; shift 2 ;;
        --steps2) steps2=$2; shift 2 ;;
        --nj) nj=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --options) options=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# log, die, need_file and stage_on, as in every recipe
# shellcheck source=recipes/TEMPLATE/common.sh
source "${recipe}/../TEMPLATE/common.sh"

synthetic=false
if [ -z "${train}" ]; then
    synthetic=true
    train=${exp}/data/train.tsv
    dev=${dev:-${exp}/data/dev.tsv}
fi
[ -n "${dev}" ] || die "--dev is required with --train"
learned_km1=${km1:-${exp}/km_${features1}${k1}.safetensors}

# Units of one manifest at every frame into $3/<stem>.units, with the features $1 (options in $2): --nj shards at
# once, then merged. A finished unit file is kept.
frame_units() {
    local features=$1 options=$2 out=$3 manifest=$4 km=$5 rank pids=() stem
    stem=$(basename "${manifest}" .tsv)
    [ -f "${out}/${stem}.units" ] && return 0
    # shellcheck disable=SC2086  # ${options} is several words
    if [ "${nj}" -gt 1 ]; then
        for rank in $(seq 0 $((nj - 1))); do  # one thread each: --nj processes share the cores
            OMP_NUM_THREADS=1 speechprompt prepare --manifest "${manifest}" --features "${features}" ${options} \
                --kmeans "${km}" --out "${out}" --device "${device}" --nshard "${nj}" --rank "${rank}" &
            pids+=($!)
        done
        for rank in "${!pids[@]}"; do wait "${pids[${rank}]}" || die "units of ${manifest}, shard ${rank}, failed"; done
        speechprompt prepare --manifest "${manifest}" --features "${features}" ${options} --kmeans "${km}" \
            --out "${out}" --device "${device}" --nshard "${nj}" --merge
    else
        speechprompt prepare --manifest "${manifest}" --features "${features}" ${options} --kmeans "${km}" \
            --out "${out}" --device "${device}"
    fi
}

# One pretraining iteration: $1 run dir, $2 labels dir, $3 clusters, $4 label rate, $5 max_steps ("": config's).
pretrain() {
    local run_dir=$1 labels=$2 k=$3 rate=$4 steps=$5 args
    need_file "${config}" "the pretraining config"
    args=(pretrain-hubert --config "${config}" train="${train}" dev="${dev}" n_units="${k}" label_rate="${rate}"
          train_labels="${labels}/$(basename "${train}" .tsv).units" dev_labels="${labels}/$(basename "${dev}" .tsv).units"
          run_dir="${run_dir}" device="${device}")
    [ -z "${steps}" ] || args+=(max_steps="${steps}")
    # shellcheck disable=SC2206  # --options is a list of words
    args+=(${options})
    if [ "${nj}" -gt 1 ]; then  # data-parallel: each process takes 1/nj of every update's utterances
        torchrun --standalone --nproc_per_node "${nj}" "$(command -v speechprompt)" "${args[@]}"
    else
        speechprompt "${args[@]}"
    fi
}

if stage_on 0 && ${synthetic}; then
    log "stage 0: synthesize ${sentences} training sentences"
    speechprompt synth --task sentences --out "${exp}/data" --seed "${seed}" --per-class "${sentences}" --no-progress
fi

if stage_on 1 && [ -z "${km1}" ]; then
    log "stage 1: ${k1} clusters of ${features1} frames"
    need_file "${train}" "the training manifest"
    [ -f "${learned_km1}" ] || speechprompt kmeans --manifest "${train}" --features "${features1}" \
        --k "${k1}" --percent "${percent}" --seed "${seed}" --device "${device}" --out "${learned_km1}"
fi

if stage_on 2; then
    log "stage 2: ${features1} units of every 10 ms frame (iteration-1 labels, 100 Hz)"
    need_file "${learned_km1}" "the ${features1} k-means (run stage 1)"
    for manifest in "${train}" "${dev}"; do
        frame_units "${features1}" "" "${exp}/it1_labels" "${manifest}" "${learned_km1}"
    done
fi

if stage_on 3; then
    log "stage 3: iteration 1, ${k1} ${features1} units at 100 Hz"
    pretrain "${exp}/it1" "${exp}/it1_labels" "${k1}" 100 "${steps1}"
fi

it1=${exp}/it1/checkpoint_best.pt
if stage_on 4; then
    log "stage 4: ${k2} clusters of layer ${layer} of iteration 1"
    need_file "${it1}" "the iteration-1 model (run stage 3)"
    [ -f "${exp}/km_it1_L${layer}_${k2}.safetensors" ] || speechprompt kmeans --manifest "${train}" --features hubert \
        --checkpoint "${it1}" --layer "${layer}" --k "${k2}" --percent "${percent}" --seed "${seed}" \
        --device "${device}" --out "${exp}/km_it1_L${layer}_${k2}.safetensors"
fi

if stage_on 5; then
    log "stage 5: units of layer ${layer} at every 20 ms frame (iteration-2 labels, 50 Hz)"
    need_file "${exp}/km_it1_L${layer}_${k2}.safetensors" "the iteration-1 k-means (run stage 4)"
    for manifest in "${train}" "${dev}"; do
        frame_units hubert "--checkpoint ${it1} --layer ${layer}" "${exp}/it2_labels" "${manifest}" \
            "${exp}/km_it1_L${layer}_${k2}.safetensors"
    done
fi

if stage_on 6; then
    log "stage 6: iteration 2, ${k2} units of iteration 1 at 50 Hz"
    pretrain "${exp}/it2" "${exp}/it2_labels" "${k2}" 50 "${steps2}"
    log "done: ${exp}/it2/checkpoint_best.pt (units: prepare --features hubert --checkpoint it --layer L)"
fi
