#!/usr/bin/env bash
# The embedded default (`make demo`): SpeechPrompt end to end on a speech corpus synthesized here.
#
#   stage 1  synth        12-class Speech Commands-style words, and unlabeled sentences, from espeak-ng, flite and
#                         festival (festival is held out: it is heard only in the test_synth split)
#   stage 2  kmeans       100 units learned on mean-normalised MFCC frames of the unlabeled sentences (no HuBERT
#                         weights here)
#   stage 3  prepare      every split to deduplicated unit sequences (--nj shards at once)
#   stage 4  pretrain     a small GSLM-style unit LM on the sentences' units (--nj processes, torch DDP)
#   stage 5  compare      prompt tuning and the baselines on the frozen LM, several seeds, evaluated on unseen
#                         voices (test) and on the unseen synthesizer (test_synth); prints the results table
#
# Run from the repository root:  recipes/synthetic_commands/run.sh   (or `make demo`)
# Everything goes to exp/synthetic_commands/. Stages are resumable: a finished step is not redone.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
exp=exp/synthetic_commands
stage=1
stop_stage=5
seed=0
per_class=60
eval_per_class=20
sentences=2000
features=mfcc_cmn
k=100
ulm_steps=800
ulm_batch=16
nj=2
methods=input_prompt,deep_prompt,deep_prompt_learnable,full_finetune,linear_probe
seeds=3
jobs=2
train_options=""

usage() {
    cat <<USAGE
Usage: $0 [options]

The embedded default: synthesize -> units -> pretrain a unit LM -> prompt-tune it -> evaluate on held-out voices
and a held-out synthesizer. Writes ${exp}/results.json and prints the results table.

Options [default]:
  --stage N            first stage to run [${stage}]
  --stop-stage N       last stage to run [${stop_stage}]
  --seed S             seed of the synthesized corpus and of k-means [${seed}]
  --per-class N        training utterances per command class [${per_class}]
  --eval-per-class N   dev/test/test_synth utterances per command class [${eval_per_class}]
  --sentences N        unlabeled training sentences for k-means and the unit LM [${sentences}]
  --features NAME      mfcc_cmn, mfcc or logmel [${features}]
  --k K                number of units [${k}]
  --ulm-steps N        unit LM pretraining updates [${ulm_steps}]
  --ulm-batch N        unit LM blocks per update, split over the --nj processes [${ulm_batch}]
  --nj N               parallel unit-extraction shards and pretraining processes [${nj}]
  --methods A,B,...    training configs in ${recipe}/conf to compare [${methods}]
  --seeds N            seeds per method [${seeds}]
  --jobs N             training runs at once, one CPU thread each [${jobs}]
  --train-options "KEY=VALUE ..."
                       overrides for every training config, e.g. "max_epochs=5" [${train_options:-none}]
  -h, --help           this message
USAGE
}

while [ $# -gt 0 ]; do
    case "$1" in
        --stage) stage=$2; shift 2 ;;
        --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --per-class) per_class=$2; shift 2 ;;
        --eval-per-class) eval_per_class=$2; shift 2 ;;
        --sentences) sentences=$2; shift 2 ;;
        --features) features=$2; shift 2 ;;
        --k) k=$2; shift 2 ;;
        --ulm-steps) ulm_steps=$2; shift 2 ;;
        --ulm-batch) ulm_batch=$2; shift 2 ;;
        --nj) nj=$2; shift 2 ;;
        --methods) methods=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --train-options) train_options=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# log, die and stage_on, as in every recipe
# shellcheck source=recipes/TEMPLATE/common.sh
source "${recipe}/../TEMPLATE/common.sh"
command -v speechprompt >/dev/null || die "speechprompt is not on PATH (run 'make demo')"

data=${exp}/data
units=${exp}/units
[ $((ulm_batch % nj)) -eq 0 ] || die "--ulm-batch ${ulm_batch} does not split over --nj ${nj} processes"

# Units of one manifest into $2/<stem>.units: --nj shards at once, then merged (identical to a single run) and the
# shard files removed.
units_of() {
    local manifest=$1 out=$2 rank pids=()
    for rank in $(seq 0 $((nj - 1))); do
        speechprompt prepare --manifest "${manifest}" --features "${features}" --kmeans "${exp}/kmeans.safetensors" \
            --dedup --out "${out}" --nshard "${nj}" --rank "${rank}" &
        pids+=($!)
    done
    for rank in "${!pids[@]}"; do
        wait "${pids[${rank}]}" || die "unit extraction of ${manifest}, shard ${rank}, failed"
    done
    speechprompt prepare --manifest "${manifest}" --features "${features}" --kmeans "${exp}/kmeans.safetensors" \
        --dedup --out "${out}" --nshard "${nj}" --merge
    local stem
    stem=$(basename "${manifest}" .tsv)
    for rank in $(seq 0 $((nj - 1))); do  # the merged files say all the shards did
        rm -f "${out}/${stem}.${rank}_${nj}.units" "${out}/${stem}.${rank}_${nj}.summary.json"
    done
}

if stage_on 1; then
    log "stage 1: synthesize the commands corpus and the unlabeled sentences"
    speechprompt synth --task commands --out "${data}/commands" --seed "${seed}" --per-class "${per_class}" \
        --eval-per-class "${eval_per_class}"
    speechprompt synth --task sentences --out "${data}/sentences" --seed "${seed}" --per-class "${sentences}"
fi

if stage_on 2; then
    log "stage 2: learn ${k} units on ${features} features of the sentences"
    if [ ! -f "${exp}/kmeans.safetensors" ]; then
        speechprompt kmeans --manifest "${data}/sentences/train.tsv" --features "${features}" --k "${k}" \
            --percent 1.0 --n-init 3 --seed "${seed}" --out "${exp}/kmeans.safetensors"
    fi
fi

if stage_on 3; then
    log "stage 3: audio -> deduplicated units"
    for split in train dev test test_synth; do
        [ -f "${units}/${split}.units" ] || units_of "${data}/commands/${split}.tsv" "${units}"
    done
    for split in train dev; do
        [ -f "${units}/sentences/${split}.units" ] || units_of "${data}/sentences/${split}.tsv" "${units}/sentences"
    done
fi

if stage_on 4; then
    log "stage 4: pretrain the unit LM on the sentences (${nj} processes)"
    pretrain=(pretrain-ulm --config "${recipe}/conf/ulm.yaml" max_steps="${ulm_steps}" n_units="${k}"
              batch_size=$((ulm_batch / nj)))
    if [ "${nj}" -gt 1 ]; then  # data-parallel: nj processes of one thread, each taking ulm_batch / nj blocks
        torchrun --standalone --nproc_per_node "${nj}" "$(command -v speechprompt)" "${pretrain[@]}"
    else
        speechprompt "${pretrain[@]}"
    fi
fi

if stage_on 5; then
    log "stage 5: prompt tuning and baselines on the frozen unit LM (${seeds} seeds each)"
    overrides=$(echo ${train_options} | tr ' ' ',')
    speechprompt compare --config "${recipe}/conf/compare.yaml" --methods "${methods}" --seeds "${seeds}" \
        --jobs "${jobs}" "overrides=[${overrides}]"
    log "results: ${exp}/results.json (table: ${exp}/results.md, plots under ${exp}/<method>/seed<S>/)"
fi
