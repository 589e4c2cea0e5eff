#!/usr/bin/env bash
# The demo's checkpoint on recordings of real people: Debian's pocketsphinx-testdata (CMU's test recordings: "go
# forward ten meters", card names, LibriVox sentences, digits; 16 kHz WAV and raw PCM). A smoke test of the path from
# real audio to a label, not an accuracy claim: none of these recordings is one of the demo's 12 commands alone.
#
#   scripts/demo_on_real_speech.sh [CHECKPOINT]     (default: the best prompt method's checkpoint in results.json)
#
# Prints one JSON line per recording, as `speechprompt infer` does. Needs: apt-get install pocketsphinx-testdata sox
set -euo pipefail

data=${SPEECHPROMPT_REAL_SPEECH:-/usr/share/pocketsphinx/test/data}
checkpoint=${1:-}
if [ -z "${checkpoint}" ]; then
    [ -f exp/synthetic_commands/results.json ] || { echo "$0: error: no checkpoint given and no" \
        "exp/synthetic_commands/results.json (run 'make demo' first)" >&2; exit 2; }
    # the first row is the best prompt method (make demo's --methods order)
    checkpoint=$(grep -o '"checkpoint": *"[^"]*"' exp/synthetic_commands/results.json | head -n 1 | cut -d'"' -f4)
fi
[ -f "${checkpoint}" ] || { echo "$0: error: checkpoint not found: ${checkpoint}" >&2; exit 2; }
[ -d "${data}" ] || { echo "$0: error: ${data} not found (apt-get install pocketsphinx-testdata)" >&2; exit 2; }
command -v sox >/dev/null || { echo "$0: error: sox not found (apt-get install sox)" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "${tmp}"' EXIT
wavs=()
for raw in "${data}"/*.raw; do  # headerless 16 kHz 16-bit mono PCM
    [ -f "${raw}" ] || continue
    wav=${tmp}/$(basename "${raw}" .raw).wav
    sox -t raw -r 16000 -e signed-integer -b 16 -c 1 "${raw}" "${wav}"
    wavs+=("${wav}")
done
while IFS= read -r -d '' wav; do wavs+=("${wav}"); done < <(find "${data}" -name '*.wav' -print0 | sort -z)
[ ${#wavs[@]} -gt 0 ] || { echo "$0: error: no recordings under ${data}" >&2; exit 2; }
speechprompt infer --checkpoint "${checkpoint}" "${wavs[@]}"
