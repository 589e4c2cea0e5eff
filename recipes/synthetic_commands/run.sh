#!/usr/bin/env bash
# The embedded default (`make demo`): SpeechPrompt end to end on a speech corpus synthesized here.
#
#   stage 1  synth        12-class Speech Commands-style words, and unlabeled sentences, from espeak-ng, flite and
#                         festival (festival is held out: it is heard only in the test_synth split)
#   stage 2  kmeans       100 units learned on mean-normalised MFCC frames of the unlabeled sentences (mfcc_cmn),
#                         and the identity quantizer of PocketSphinx's 42 English phones (phones)
#   stage 3  hubert       a small HuBERT (recipes/pretrain_hubert, small.yaml, iteration 1) pretrained on the
#                         sentences to predict the phones (or the mfcc_cmn units) of masked frames (--nj processes)
#   stage 4  choose       k-means of each --hubert-layers layer; every candidate (mfcc_cmn, those layers and the
#                         phones of a recognizer trained on real speech) turns the commands' train and dev into
#                         units, a bag-of-units probe scores them on dev, and the best becomes the demo's units
#                         (${exp}/units_choice.json)
#   stage 5  prepare      every split and the sentences to deduplicated units of the chosen source (--nj shards)
#   stage 6  pretrain     a small GSLM-style unit LM on the sentences' units and, unlabeled, the commands' training
#                         clips' units (--ulm-task-repeats times) (--nj processes, torch DDP)
#   stage 7  compare      the best prompt method and the baselines on the frozen LM, several seeds, evaluated on
#                         unseen voices (test) and on the unseen synthesizer (test_synth); prints the results table
#
# Run from the repository root:  recipes/synthetic_commands/run.sh   (or `make demo`)
# Everything goes to exp/synthetic_commands/. Stages are resumable: a finished step is not redone.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
exp=exp/synthetic_commands
stage=1
stop_stage=7
seed=0
per_class=60
eval_per_class=20
sentences=2000
k=100
unit_source=auto
hubert_steps=500
hubert_targets=phones
hubert_layers=3
hubert_percent=0.25
ulm_steps=
ulm_batch=16
ulm_task_repeats=4
nj=2
methods=deep_prompt_learnable_1pct,full_finetune,linear_probe
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
  --k K                number of k-means units of mfcc_cmn and of each HuBERT layer (phones: 42) [${k}]
  --unit-source SRC    auto (the best on dev of mfcc_cmn, the HuBERT layers and phones), hubert (the best
                       layer), mfcc_cmn or phones (these two skip the HuBERT stage) [${unit_source}]
  --hubert-steps N     HuBERT pretraining updates (8 sentences each) [${hubert_steps}]
  --hubert-targets SRC what the HuBERT learns to predict at masked frames: phones or mfcc_cmn (HuBERT's
                       iteration 1: clusters of MFCC frames) [${hubert_targets}]
  --hubert-layers "L.." the HuBERT's layers (1-based, of 4) that are candidates [${hubert_layers}]
  --hubert-percent P   fraction of the sentences a HuBERT layer's k-means learns from [${hubert_percent}]
  --ulm-steps N        unit LM pretraining updates [400 on phones (~50k units; the best dev perplexity, 21.0;
                       300 gave 21.2 but prompts 0.07 worse on test), 800 on k-means units (~250k)]
  --ulm-batch N        unit LM blocks per update, split over the --nj processes [${ulm_batch}]
  --ulm-task-repeats N the unit LM also reads the units of the commands' training clips, without their labels,
                       N times over (task-adaptive pretraining; 0: the sentences only) [${ulm_task_repeats}]
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
        --unit-source) unit_source=$2; shift 2 ;;
        --hubert-steps) hubert_steps=$2; shift 2 ;;
        --hubert-targets) hubert_targets=$2; shift 2 ;;
        --hubert-layers) hubert_layers=$2; shift 2 ;;
        --hubert-percent) hubert_percent=$2; shift 2 ;;
        --k) k=$2; shift 2 ;;
        --ulm-steps) ulm_steps=$2; shift 2 ;;
        --ulm-batch) ulm_batch=$2; shift 2 ;;
        --ulm-task-repeats) ulm_task_repeats=$2; shift 2 ;;
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
cands=${exp}/candidates
hubert=${exp}/hubert
[[ "${ulm_task_repeats}" =~ ^[0-9]+$ ]] || die "--ulm-task-repeats must be a whole number, not '${ulm_task_repeats}'"
[ $((ulm_batch % nj)) -eq 0 ] || die "--ulm-batch ${ulm_batch} does not split over --nj ${nj} processes"
case "${hubert_targets}" in
    phones|mfcc_cmn) ;;
    *) die "--hubert-targets must be phones or mfcc_cmn, not '${hubert_targets}'" ;;
esac
case "${unit_source}" in
    auto|hubert|mfcc_cmn|phones) ;;
    *) die "--unit-source must be auto, hubert, mfcc_cmn or phones, not '${unit_source}'" ;;
esac
hubert_on() { [ "${unit_source}" = auto ] || [ "${unit_source}" = hubert ]; }

# The number of units of a quantizer file (--k of a k-means, or the size of a recognizer's phone set): the "k" of
# the metadata in its safetensors header (docs/formats.md).
units_in() {
    local k
    k=$(grep -ao '"k":"[0-9]*"' "$1" | head -n 1 | tr -dc 0-9)
    [ -n "${k}" ] || die "$1 is not a quantizer of speechprompt kmeans"
    echo "${k}"
}

# Deduplicated units of the source $1 for the manifests $3..., into $2/<stem>.units: one process per manifest, all at
# once (for small manifests, where sharding and merging would cost more in start-up than it saves). Finished files
# are kept.
units_each() {
    local source=$1 out=$2 manifest pid pids=() reader
    shift 2
    reader=$(reader_of "${source}")
    for manifest in "$@"; do
        [ -f "${out}/$(basename "${manifest}" .tsv).units" ] && continue
        # shellcheck disable=SC2086  # ${reader} is several words
        OMP_NUM_THREADS=1 speechprompt prepare --manifest "${manifest}" ${reader} \
            --kmeans "${exp}/km_${source}.safetensors" --dedup --out "${out}" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "${pid}" || die "units of ${source} failed"; done
}

# The feature-reader options of a unit source: mfcc_cmn, phones (PocketSphinx), or hubert_L<layer> of the demo's
# HuBERT.
reader_of() {
    case "$1" in
        mfcc_cmn|phones) echo "--features $1" ;;
        hubert_L*) echo "--features hubert --checkpoint ${hubert}/it1/checkpoint_best.pt --layer ${1#hubert_L}" ;;
        *) die "unknown unit source '$1'" ;;
    esac
}

# Deduplicated units of the source $1 (its k-means: ${exp}/km_$1.safetensors) for the manifest $2, into
# $3/<stem>.units: --nj shards at once, then merged (identical to a single run) and the shard files removed. A
# finished unit file is kept.
units_of() {
    local source=$1 manifest=$2 out=$3 rank pids=() stem reader
    stem=$(basename "${manifest}" .tsv)
    [ -f "${out}/${stem}.units" ] && return 0
    reader=$(reader_of "${source}")
    # shellcheck disable=SC2086  # ${reader} is several words
    for rank in $(seq 0 $((nj - 1))); do  # one thread each: --nj processes share the cores
        OMP_NUM_THREADS=1 speechprompt prepare --manifest "${manifest}" ${reader} \
            --kmeans "${exp}/km_${source}.safetensors" --dedup --out "${out}" --nshard "${nj}" --rank "${rank}" &
        pids+=($!)
    done
    for rank in "${!pids[@]}"; do
        wait "${pids[${rank}]}" || die "units of ${manifest} (${source}), shard ${rank}, failed"
    done
    # shellcheck disable=SC2086
    speechprompt prepare --manifest "${manifest}" ${reader} --kmeans "${exp}/km_${source}.safetensors" \
        --dedup --out "${out}" --nshard "${nj}" --merge
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
    log "stage 2: learn ${k} units on mfcc_cmn features of the sentences"
    [ -f "${exp}/km_mfcc_cmn.safetensors" ] || speechprompt kmeans --manifest "${data}/sentences/train.tsv" \
        --features mfcc_cmn --k "${k}" --percent 1.0 --n-init 3 --seed "${seed}" --out "${exp}/km_mfcc_cmn.safetensors"
    # Phones need no clustering: the quantizer is the identity over the recognizer's phone set.
    [ -f "${exp}/km_phones.safetensors" ] || speechprompt kmeans --manifest "${data}/sentences/train.tsv" \
        --features phones --out "${exp}/km_phones.safetensors"
fi

if stage_on 3 && hubert_on; then
    log "stage 3: pretrain a small HuBERT on the sentences to predict ${hubert_targets} (${hubert_steps} updates," \
        "${nj} processes)"
    # Iteration 1 of recipes/pretrain_hubert on the sentences, its targets the stage-2 units of --hubert-targets at
    # every 10 ms frame; each process takes 8 / nj sentences of an update. Phone targets are the HuBERT paper's
    # topline (it trained on forced-aligned phones besides MFCC clusters): here the phones of a recognizer trained
    # on real speech, which the synthetic speech alone cannot teach; and the frames it decodes for them are the
    # sentences' units of stage 5 when phones are chosen, so no pass is spent twice.
    [ $((8 % nj)) -eq 0 ] || die "--nj ${nj} does not divide the HuBERT's 8 sentences per update"
    bash "${recipe}/../pretrain_hubert/run.sh" --stage 2 --stop-stage 3 --exp "${hubert}" \
        --train "${data}/sentences/train.tsv" --dev "${data}/sentences/dev.tsv" --features1 "${hubert_targets}" \
        --k1 "$(units_in "${exp}/km_${hubert_targets}.safetensors")" --km1 "${exp}/km_${hubert_targets}.safetensors" \
        --steps1 "${hubert_steps}" --nj "${nj}" --device cpu --seed "${seed}" --options "batch_size=$((8 / nj))"
fi

if stage_on 4; then
    log "stage 4: choose the units on the commands' dev split (${unit_source})"
    candidates=()
    case "${unit_source}" in
        auto) candidates+=(mfcc_cmn phones) ;;
        mfcc_cmn|phones) candidates+=("${unit_source}") ;;
    esac
    if hubert_on; then
        need_file "${hubert}/it1/checkpoint_best.pt" "the demo's HuBERT (run stage 3)"
        pids=()
        for layer in ${hubert_layers}; do  # one k-means per layer, all at once, one thread each
            candidates+=("hubert_L${layer}")
            [ -f "${exp}/km_hubert_L${layer}.safetensors" ] && continue
            # shellcheck disable=SC2046  # reader_of gives several words
            OMP_NUM_THREADS=1 speechprompt kmeans --manifest "${data}/sentences/train.tsv" \
                $(reader_of "hubert_L${layer}") --device cpu --k "${k}" --percent "${hubert_percent}" --n-init 3 \
                --seed "${seed}" --out "${exp}/km_hubert_L${layer}.safetensors" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "${pid}" || die "a k-means of the HuBERT's layers failed"; done
    fi
    probe_args=()
    for source in "${candidates[@]}"; do
        units_each "${source}" "${cands}/${source}" "${data}/commands/train.tsv" "${data}/commands/dev.tsv"
        probe_args+=("${source}=${cands}/${source}")
    done
    chosen=$(speechprompt units-probe --labels "${data}/commands" --choose dev --out "${exp}/units_choice.json" \
        "${probe_args[@]}")
    echo "${chosen}" > "${exp}/units_choice.txt"
    log "units: ${chosen} (dev accuracies of the bag-of-units probe in ${exp}/units_choice.json)"
fi

if stage_on 5; then
    need_file "${exp}/units_choice.txt" "the choice of units (run stage 4)"
    chosen=$(cat "${exp}/units_choice.txt")
    log "stage 5: audio -> deduplicated ${chosen} units"
    mkdir -p "${units}"
    if [ -f "${units}/source.txt" ] && [ "$(cat "${units}/source.txt")" != "${chosen}" ]; then
        die "${units} holds $(cat "${units}/source.txt") units, not ${chosen}: remove ${units}, ${exp}/ulm and the runs"
    fi
    echo "${chosen}" > "${units}/source.txt"
    for split in train dev; do  # stage 4 made these already
        [ -f "${units}/${split}.units" ] || cp "${cands}/${chosen}/${split}.units" "${cands}/${chosen}/${split}.summary.json" "${units}/"
    done
    units_each "${chosen}" "${units}" "${data}/commands/test.tsv" "${data}/commands/test_synth.tsv"
    for split in train dev; do
        labels=${hubert}/it1_labels/${split}.units  # the HuBERT's targets: these units at every frame
        if [ "${chosen}" = "${hubert_targets}" ] && [ -f "${labels}" ] && [ ! -f "${units}/sentences/${split}.units" ]
        then  # merging repeats of the frame units is what `prepare --dedup` gives
            mkdir -p "${units}/sentences"
            awk '{ line = ""; for (i = 1; i <= NF; i++) if (i == 1 || $i != $(i - 1)) line = line (line == "" ? "" : " ") $i
                   print line }' "${labels}" > "${units}/sentences/${split}.units.tmp"
            mv "${units}/sentences/${split}.units.tmp" "${units}/sentences/${split}.units"
        fi
        units_of "${chosen}" "${data}/sentences/${split}.tsv" "${units}/sentences"
    done
fi

if stage_on 6; then
    need_file "${units}/source.txt" "the units (run stage 5)"
    chosen=$(cat "${units}/source.txt")
    n_units=$(units_in "${exp}/km_${chosen}.safetensors")  # --k of a k-means, or the recognizer's phone set
    [ -n "${ulm_steps}" ] || { [ "${chosen}" = phones ] && ulm_steps=400 || ulm_steps=800; }
    log "stage 6: pretrain the unit LM on the ${n_units} ${chosen} units of the sentences and of the commands'" \
        "training clips x ${ulm_task_repeats} (${ulm_steps} updates, ${nj} processes)"
    # Task-adaptive pretraining: the LM also reads the task's own training audio, as units and without labels,
    # repeated so that it is about a quarter of the corpus (on phones, 4 x 4k units beside the sentences' 50k). A
    # frozen LM whose states already tell the ten words apart leaves the prompts less to do. Over three LM seeds (10
    # task seeds each) it lifted v2 on dev and cut its gap to full fine-tuning on unseen voices from 0.051 to 0.008,
    # while the gap on the unseen synthesizer grew from 0.004 to 0.031 (docs/demo.md).
    ulm_train=${units}/sentences/train.units
    for _ in $(seq 1 "${ulm_task_repeats}"); do ulm_train+=",${units}/train.units"; done
    pretrain=(pretrain-ulm --config "${recipe}/conf/ulm.yaml" "train=[${ulm_train}]" max_steps="${ulm_steps}"
              n_units="${n_units}" batch_size=$((ulm_batch / nj)))
    if [ "${nj}" -gt 1 ]; then  # data-parallel: nj processes of one thread, each taking ulm_batch / nj blocks
        torchrun --standalone --nproc_per_node "${nj}" "$(command -v speechprompt)" "${pretrain[@]}"
    else
        speechprompt "${pretrain[@]}"
    fi
fi

if stage_on 7; then
    log "stage 7: prompt tuning and baselines on the frozen unit LM (${seeds} seeds each)"
    overrides=$(echo ${train_options} | tr ' ' ',')
    speechprompt compare --config "${recipe}/conf/compare.yaml" --methods "${methods}" --seeds "${seeds}" \
        --jobs "${jobs}" "overrides=[${overrides}]"
    log "results: ${exp}/results.json (table: ${exp}/results.md, plots under ${exp}/<method>/seed<S>/)"
fi
